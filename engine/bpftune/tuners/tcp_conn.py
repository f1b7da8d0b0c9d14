"""tcp_conn: each TCP connection's congestion control, chosen per remote host by
reinforcement learning; lossy connections switched to BBR.

Everything per connection happens in bpf/tcp_conn.bpf.c, a sockops program: it picks an
algorithm for each new connection by epsilon-greedy learning over the algorithms this kernel
offers (the cost: how far a connection's min RTT is above its host's best and its delivery
rate below its host's best), and switches a connection whose retransmissions exceed 1/64 of
its segments to BBR (Upstream: also a connection that has sent no data, a receiver).
Loopback connections are left alone (Upstream: learned as one more host). This module
names the algorithms, logs the loss switches (coalesced per host), counts, summarizes and
publishes what the program learned. The system default ``net.ipv4.tcp_congestion_control``
is never changed; an administrator's write to it (or to the allowed list, or to
tcp_thin_linear_timeouts) hands the tuner over.

Upstream behaviour: reference section 5.2. We differ where marked "Upstream".
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import ipaddress
import shutil
import socket
import subprocess
import time
from functools import cached_property
from typing import TYPE_CHECKING, ClassVar

from bpftune import rtnl, sysctl
from bpftune.btf import Field
from bpftune.events import Event
from bpftune.hooks import Watch, sock_ops
from bpftune.log import log
from bpftune.tuner import Published, Scenario, Tunable, Tuner
from bpftune.verify import TUNER, Figure, Scope, Verification

if TYPE_CHECKING:
    from bpftune.engine import Engine

#: Upstream's algorithms, in its order, and reno, which every kernel has. Those the kernel
#: offers (built in, or as a module we can load) are learned over.
CANDIDATES = ("cubic", "bbr", "htcp", "dctcp", "reno")
MODULES = ("tcp_htcp", "tcp_dctcp")
MAX_ALGS = 6  # as bpf/tcp_conn.bpf.c
#: A host's loss switches are logged at most once this often, and all hosts' at most
#: LOSS_LINES times a minute: 10,000 lossy connections a second must not write as many lines.
LOSS_LOG_SECONDS, LOSS_LINES = 60.0, 20
MAX_LOGGED_HOSTS = 4096
# A host's first switch to BBR is verified (bpftune.verify) with its connections' delivery
# rate and min RTT, summed per host by the program when a connection closes: clearly worse
# after the switch (a fifth of the mean before, and past the spread before), the host is
# held (bbr_hold): its lossy connections keep their algorithm for a while.
DELIVERY_RATE = Figure("delivery rate MB/s", TUNER, ("tcp_conn:rate_sum",),
                       ("tcp_conn:closed",), scale=1e-6, activity_min=1, scope="subject",
                       worse="down", floor_rel=0.2)
MIN_RTT = Figure("min RTT us", TUNER, ("tcp_conn:rtt_sum",), ("tcp_conn:closed",),
                 activity_min=1, scope="subject", floor=1000, floor_rel=0.2)


class LossReport(ct.Structure):
    """The event payload (struct loss_report)."""

    _fields_ = [("addr", ct.c_uint32 * 4), ("host", ct.c_uint32 * 4),
                ("family", ct.c_uint32), ("from_alg", ct.c_int32),
                ("switches", ct.c_uint64), ("retrans", ct.c_uint64),
                ("segs_out", ct.c_uint64)]


def address_of(words) -> str:
    """An address as the BPF program stores it (IPv6, IPv4-mapped: u32 words, or their 16
    bytes), as people write it."""
    address = ipaddress.IPv6Address(bytes(words))
    return str(address.ipv4_mapped or address)


def available_algorithms(load_modules: bool = True) -> list[str]:
    """Upstream loads the modules of its algorithms; we load those the kernel has as
    modules (errors ignored, as upstream) and take what it then offers. Advice mode loads
    none: it changes nothing, kernel modules included."""
    modprobe = shutil.which("modprobe") if load_modules else None
    if modprobe:
        for module in MODULES:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run([modprobe, "-q", module], check=False, timeout=10,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    offered = sysctl.read("net.ipv4.tcp_available_congestion_control", string=True).split()
    return [a for a in CANDIDATES if a in offered][:MAX_ALGS]


class TcpConnTuner(Tuner):
    name = "tcp_conn"
    pmda_cluster = 11
    bpf_source = "tcp_conn.bpf.c"
    features = frozenset({"btf", "ringbuf", "sockops"})
    watches = (Watch("connections", (sock_ops("conn_tuner", needs="BPF_SOCK_OPS_RETRANS_CB"),)),)
    fields: ClassVar[dict[str, Field]] = {
        "OFF_SK_DST_CACHE": Field("sock.sk_dst_cache", 8),
        "OFF_RT_GW_FAMILY": Field("rtable.rt_gw_family", 1),
        "OFF_RT_GW4": Field("rtable.rt_gw4", 4),
        "OFF_RT6_GATEWAY": Field("rt6_info.rt6i_gateway", 16),
        "OFF_RT6_FLAGS": Field("rt6_info.rt6i_flags", 4),
        # the socket's algorithm, read directly rather than with bpf_getsockopt
        "OFF_ICSK_CA_OPS": Field("inet_connection_sock.icsk_ca_ops", 8),
        "OFF_CA_NAME": Field("tcp_congestion_ops.name", 16),
    }
    payload = LossReport
    payload_struct = "loss_report"
    published = (
        Published("connections", "connections set to each congestion control algorithm",
                  unit="count", counter=True, instances="algorithm"),
        Published("bbr_switches", "connections switched to BBR because of loss, per host "
                  "(instances: netns/address)", unit="count", counter=True, instances="host",
                  alarm=0.1,
                  alarm_help="Loss keeps forcing connections to one host (or gateway) onto "
                  "BBR: more than one connection every 10 seconds retransmitted more than 1/64 "
                  "of its segments. bpftune switches each to BBR, which copes with random loss, "
                  "but the loss itself is on the path to that host: check its links, queues "
                  "and firewall rules (the instance names the namespace and address)."),
        Published("host_metric", "learned cost of each algorithm per host, lower is better "
                  "(parts per million above the host's least RTT plus below its best delivery "
                  "rate; 0 until measured)", instances="host/algorithm"),
        Published("host_connections", "connections measured per host and algorithm",
                  unit="count", counter=True, instances="host/algorithm"),
    )
    # Per socket: set with bpf_setsockopt, no sysctl (upstream's net.persock tunable).
    PER_SOCKET = Tunable("TCP congestion control", sysctl=False, namespaced=True,
                         figures=(DELIVERY_RATE, MIN_RTT))
    # Never changed: declared so an administrator's write hands the tuner over. Upstream
    # adds its algorithms to the allowed list at start; bpf_setsockopt is not bound by it
    # (the kernel treats BPF as CAP_NET_ADMIN), so we leave it as it is.
    ALLOWED = Tunable("net.ipv4.tcp_allowed_congestion_control", string=True)
    DEFAULT = Tunable("net.ipv4.tcp_congestion_control", string=True, namespaced=True)
    THIN_LINEAR_TIMEOUTS = Tunable("net.ipv4.tcp_thin_linear_timeouts", namespaced=True)
    SPECIFY = Scenario("specify TCP congestion control algorithm",
                       "To optimize TCP performance, a TCP congestion control algorithm was "
                       "chosen to mimimize round-trip time and maximize delivery rate.",
                       routine=True, verify=False)  # the learner's own trials
    BBR_ON_LOSS = Scenario("specify bbr congestion control",
                           "Because loss rate has exceeded 1 percent for a connection, use bbr "
                           "congestion control algorithm instead of default",
                           routine=True)  # the bbr_switches alarm watches it per host

    def __init__(self, engine: Engine, tuner_id: int) -> None:
        super().__init__(engine, tuner_id)
        self.choices_counted = 0
        self.switches_counted: dict[int, int] = {}  # netns -> loss switches counted
        #: (netns, address) -> (when last logged, switches then)
        self.logged: dict[tuple[int, str], tuple[float, int]] = {}
        self.lines: list[float] = []  # when loss lines were written, the last minute's
        self.clock = time.monotonic
        #: (netns, host address bytes) -> its connections established when last looked at:
        #: hosts with new ones are sampled, so that a switch to BBR has a window before it.
        self.host_instances: dict[tuple[int, bytes], int] = {}
        #: (netns, host) -> its BBR holds so far, and until when (time.monotonic) the last
        self.holds: dict[tuple[int, str], tuple[int, float]] = {}

    @cached_property
    def algorithms(self) -> list[str]:
        return available_algorithms(load_modules=not self.engine.options.advise)

    def compile_defines(self) -> list[str]:
        bbr = self.algorithms.index("bbr") if "bbr" in self.algorithms else -1
        advise = ["-DADVISE"] if self.engine.options.advise else []
        return [f"-DN_ALGS={len(self.algorithms)}", f"-DALG_BBR={bbr}", *advise]

    def init(self) -> None:
        table = self.bpf["algorithms"]
        for index, name in enumerate(self.algorithms):
            table[table.Key(index)] = table.Leaf(name.encode())
        log.debug(f"{self.name}: learning over {', '.join(self.algorithms)}")

    # What the program did.
    def _choices(self) -> list[int]:
        table = self.bpf["choices"]
        return [sum(table[table.Key(i)]) for i in range(len(self.algorithms))]

    def _hosts(self) -> list[tuple[str, object]]:
        """(instance name, state) of each host the program keeps."""
        return [(f"{self.engine.namespaces.name(k.netns_cookie)}/{address_of(k.addr)}", v)
                for k, v in self.bpf["hosts"].items()]

    def tick(self, now: float) -> None:
        """Scenario counts follow the program's own counters (events are coalesced): loss
        switches per namespace, choices (counted per algorithm only) in the global one."""
        choices = sum(self._choices())
        self.count(self.PER_SOCKET, self.SPECIFY, 0, times=choices - self.choices_counted)
        self.choices_counted = choices
        switches: dict[int, int] = {}
        instances = {}
        for key, host in self.bpf["hosts"].items():
            switches[key.netns_cookie] = switches.get(key.netns_cookie, 0) + host.bbr_switches
            instances[(key.netns_cookie, bytes(key.addr))] = host.instances
        self._warm_busy_hosts(instances)
        for cookie, n in switches.items():
            counted = self.switches_counted.get(cookie, 0)
            if n > counted:  # hosts dropped from the program's table take their counts away
                self.count(self.PER_SOCKET, self.BBR_ON_LOSS, cookie, times=n - counted)
                self.switches_counted[cookie] = n

    def _subject(self, cookie: int, words: bytes | ct.Array) -> tuple[int, str]:
        """A host as the verifier's scope: (netns cookie, 0 for the global one; address)."""
        return (0 if self.engine.namespaces.is_global(cookie) else cookie, address_of(words))

    def _warm_busy_hosts(self, instances: dict[tuple[int, bytes], int]) -> None:
        verifier = self.engine.verifier
        if verifier is not None:
            for (cookie, addr), n in instances.items():
                if self.host_instances.get((cookie, addr)) != n:
                    verifier.warm(self._subject(cookie, addr))
        self.host_instances = instances

    def handle(self, event: Event) -> None:
        report = event.payload(LossReport)
        address = address_of(report.addr)
        if self.engine.changes.advice is not None:
            self._advise_bbr(event.netns_cookie, address, report.family)
            return
        key = (event.netns_cookie, address)
        now = self.clock()
        last, switches_then = self.logged.get(key, (-LOSS_LOG_SECONDS, 0))
        self.lines = [t for t in self.lines if now - t < 60]
        if now - last < LOSS_LOG_SECONDS or len(self.lines) >= LOSS_LINES:
            return
        if len(self.logged) >= MAX_LOGGED_HOSTS:
            self.logged.pop(next(iter(self.logged)))
        if key not in self.logged:  # the host's first switch (this run)
            self._verify_switch(event.netns_cookie, report)
        self.logged[key] = (now, report.switches)
        self.lines.append(now)
        since = report.switches - switches_then
        where = ("" if self.engine.namespaces.is_global(event.netns_cookie)
                 else f" in netns '{self.engine.namespaces.name(event.netns_cookie)}'")
        more = f" ({since} connections to it so far)" if since > 1 else ""
        self.report(self.PER_SOCKET, self.BBR_ON_LOSS, event.netns_cookie,
                    f"due to loss events for {address}{where}, specify 'bbr' congestion "
                    f"control algorithm{more}")

    # Verified switches.
    def _verify_switch(self, cookie: int, report: LossReport) -> None:
        """Verify the host's switch to BBR: its connections before and after."""
        verifier = self.engine.verifier
        if verifier is None:
            return
        where, host = self._subject(cookie, report.host)
        old = (self.algorithms[report.from_alg] if 0 <= report.from_alg < len(self.algorithms)
               else "default")
        verifier.changed(self, self.PER_SOCKET, self.scenario_id(self.BBR_ON_LOSS), where,
                         where, old, "bbr", subject=host)

    def figure_counters(self, scope: Scope) -> dict[str, int]:
        """A host's (scope: (netns cookie, address)) connections measured at close, and
        their delivery rates and min RTTs, summed over the algorithms."""
        if not isinstance(scope, tuple) or self.bpf is None:
            return {}
        hosts = self.bpf["hosts"]
        try:
            host = hosts[self._host_key(hosts, *scope)]
        except KeyError:
            return {"closed": 0, "rate_sum": 0, "rtt_sum": 0}
        algs = host.algs[:len(self.algorithms)]
        return {"closed": sum(a.count for a in algs), "rate_sum": sum(a.sum_rate for a in algs),
                "rtt_sum": sum(a.sum_rtt for a in algs)}

    def _host_key(self, table, cookie: int, address: str):
        """The program's struct host_key for a host (IPv4 as IPv4-mapped IPv6)."""
        key = table.Key()
        key.netns_cookie = self.engine.namespaces.global_cookie if cookie == 0 else cookie
        ip = ipaddress.ip_address(address)
        packed = (ipaddress.IPv6Address(f"::ffff:{ip}") if ip.version == 4 else ip).packed
        ct.memmove(ct.addressof(key) + type(key).addr.offset, packed, len(packed))
        return key

    def undo(self, verification: Verification, evidence: str) -> bool:
        """A switch to BBR made the host's connections clearly worse: hold the host (its
        lossy connections are not switched) for the verifier's hold, doubled each time."""
        if self.bpf is None or self.engine.verifier is None:
            return False
        subject = (verification.origin, verification.subject)
        reverts = self.holds.get(subject, (0, 0.0))[0] + 1
        seconds = self.engine.verifier.windows.hold_for(reverts)
        self.holds[subject] = (reverts, time.monotonic() + seconds)
        table = self.bpf["bbr_hold"]
        table[self._host_key(table, *subject)] = ct.c_uint64(
            time.monotonic_ns() + int(seconds * 1e9))  # bpf_ktime_get_ns's clock
        where = ("" if verification.origin == 0
                 else f" in netns '{self.engine.namespaces.name(verification.origin)}'")
        line = (f"Holding 'bbr' for {verification.subject}{where} ({self.name}): "
                f"{evidence}; lossy connections keep their algorithm for {seconds:.0f} s")
        log.notice(line)
        self.engine.changes._audit("revert", self.name, self.PER_SOCKET.name,
                                   verification.where, old="bbr", new=verification.old,
                                   scenario=verification.scenario, reason=line,
                                   verdict="reverted", subject=verification.subject)
        return True

    def held_subjects(self) -> list[tuple[int, str, float, int]]:
        now = time.monotonic()
        return [(cookie, host, until, reverts)
                for (cookie, host), (reverts, until) in self.holds.items() if until > now]

    def _advise_bbr(self, cookie: int, address: str, family: int) -> None:
        """Advice mode: what a user would set for a lossy host, BBR on the route to it
        (``congctl``: each new connection over that route gets it)."""
        try:
            with self.entered(cookie):
                gateway, oif = rtnl.route_to(address, family)
                device = socket.if_indextoname(oif) if oif else None
            default = self.engine.changes.read(self.DEFAULT, cookie)
        except (OSError, rtnl.NetlinkError, IndexError, sysctl.SysctlError) as e:
            log.debug(f"{self.name}: no route to advise BBR for {address}: {e}")
            return
        host = f"{address}/{32 if family == socket.AF_INET else 128}"
        route = (f"ip route replace {host}" + (f" via {gateway}" if gateway else "")
                 + (f" dev {device}" if device else "") + " congctl bbr")
        self.engine.changes.advise(
            self, self.PER_SOCKET, self.scenario_id(self.BBR_ON_LOSS), cookie, default, "bbr",
            f"Due to loss events for {address}, use bbr congestion control on the route to "
            f"it instead of ({{old}})", commands=self.engine.changes.in_netns(cookie, [route]),
            subject=address)

    def netns_destroyed(self, cookie: int) -> None:
        self.logged = {k: v for k, v in self.logged.items() if k[0] != cookie}
        self.holds = {k: n for k, n in self.holds.items() if k[0] != cookie}
        self.host_instances = {k: n for k, n in self.host_instances.items() if k[0] != cookie}
        self.switches_counted.pop(cookie, None)
        if self.bpf is not None:
            for table in (self.bpf["hosts"], self.bpf["bbr_hold"]):
                for key in [k for k in table if k.netns_cookie == cookie]:
                    with contextlib.suppress(KeyError):
                        del table[key]
        self.handed_back(cookie)  # its manual_netns entry, if any

    def table_sizes(self) -> dict[str, int]:
        return {"logged": len(self.logged), "switches_counted": len(self.switches_counted),
                "host_instances": len(self.host_instances), "holds": len(self.holds)}

    # Metrics and summary.
    def published_values(self) -> dict[str, int | dict[str, int]]:
        if self.bpf is None:
            return {}
        hosts = self._hosts()
        per_alg = [(f"{name}/{alg}", v.algs[i]) for name, v in hosts
                   for i, alg in enumerate(self.algorithms)]
        return {"connections": dict(zip(self.algorithms, self._choices(), strict=True)),
                "bbr_switches": {name: v.bbr_switches for name, v in hosts},
                "host_metric": {name: a.metric for name, a in per_alg},
                "host_connections": {name: a.count for name, a in per_alg}}

    def summarize(self) -> list[str]:
        if self.bpf is None:
            return []
        prefix = "# Summary: tcp_conn_tuner:"
        lines = []
        thin = self.bpf["thin_timeouts"][ct.c_int(0)].value
        if thin:  # upstream's line, its typo included
            lines.append(f"{prefix} set 'net.ipv4.tcp_thin_linear_timeouts' for {thin} "
                         f"connections to improve responsiveness of thin flows durning "
                         f"retransmission")
        lines.append(f"{prefix} {'CongAlg':>20} {'Count':>20}")
        lines += [f"{prefix} {alg:>20} {n:>20}"
                  for alg, n in zip(self.algorithms, self._choices(), strict=True)]
        if log.debugging:
            lines.append(f"{prefix} {'IPAddress':>48} {'CongAlg':>8} {'Metric':>20} "
                         f"{'Count':>8} {'Greedy':>8} {'MinRtt':>8} {'MaxDlvr':>8}")
            for name, v in self._hosts():
                for i, alg in enumerate(self.algorithms):
                    a = v.algs[i]
                    lines.append(f"{prefix} {name:>48} {alg:>8} {a.metric:>20} {a.count:>8} "
                                 f"{a.greedy:>8} {a.min_rtt:>8} {a.max_rate:>8}")
        return lines

    def handed_over(self, cookie: int) -> None:
        """Upstream's sockops program goes on choosing in a namespace handed to an
        administrator; ours is told to leave its connections alone."""
        if self.bpf is not None:
            table = self.bpf["manual_netns"]
            table[ct.c_uint64(cookie)] = ct.c_uint8(1)

    def handed_back(self, cookie: int) -> None:
        if self.bpf is not None:
            with contextlib.suppress(KeyError):
                del self.bpf["manual_netns"][ct.c_uint64(cookie)]

