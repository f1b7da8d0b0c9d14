"""tcp_buffer: TCP buffer limits, TCP memory limits, SYN backlog and syncookies.

What happens when a connection's receive buffer fills up: bpf/tcp_buffer.bpf.c sees the
socket's sk_rcvbuf within the learning-rate fraction of tcp_rmem's max and proposes a bigger
max; this module checks the proposal against latency (growing buffers that only add queueing
delay is bufferbloat), applies it through the engine and makes sure receive-buffer
auto-tuning is on. Upstream behaviour: reference section 5.1; deliberate differences are
marked "Upstream".
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from bpftune import procnet
from bpftune.bpf import PROTO_MEMORY_FIELDS
from bpftune.btf import Field
from bpftune.changes import due_to
from bpftune.events import Event
from bpftune.hooks import Watch, fentry, raw_tp, sock_ops, tp
from bpftune.log import log
from bpftune.memory import total_ram_bytes, total_ram_pages
from bpftune.sysctl import INT_MAX
from bpftune.tuner import Scenario, Tunable, Tuner
from bpftune.verify import (
    RCV_PRUNE,
    RETRANS,
    SYN_REFUSED,
    TCP_MEM_PRESSURE,
    TUNER,
    Figure,
    Scope,
)

if TYPE_CHECKING:
    from bpftune.correlation import Correlation
    from bpftune.engine import Engine


def _socket_buffer_ceiling() -> tuple[int, ...]:
    # One socket's buffer may never exceed 1/32 of RAM (and INT_MAX, the kernel's limit).
    return (INT_MAX, INT_MAX, min(INT_MAX, total_ram_bytes() // 32))


def _tcp_mem_ceiling() -> tuple[int, ...]:
    # TCP as a whole: pressure at most 1/8, hard limit at most 1/4 of RAM (in pages).
    ram = total_ram_pages()
    return (ram // 16, ram // 8, ram // 4)


def _queue_builds(latency: Correlation) -> bool:
    """Whether sRTT (µs) rises with the buffer max by a queue worth a buffer's throughput."""
    lowest = min(rtt for _, rtt in latency.samples)
    return latency.rise() >= max(QUEUE_MIN_US, QUEUE_MIN_FRACTION * lowest)


def _flag() -> tuple[int, ...]:
    return (1,)


BUFFER = ("min", "default", "max")
MIN_SYN_BACKLOG = 128
SYN_BACKLOG_CEILING = 1 << 18
SYNCOOKIE_FAILURES = 1024
# SYN floods are judged on what a namespace's counters say over a window of this many ticks
# (seconds): SYNs the kernel refused against connections it accepted.
SYN_WINDOW_TICKS = 3
# At least this many refused SYNs per accepted connection in a window is an attack. A
# legitimate overload shows a few: a client whose SYN is dropped retries after 1, 3, 7 s
# and is then accepted (2 to 7 in a second, measured here with twice as many new clients a
# second as the SYN queue could take); a flood from addresses that never answer shows no
# accepts at all.
SYN_ATTACK_RATIO = 8
# Fewer refused SYNs in a window are no attack, whatever else happened.
SYN_ATTACK_MIN_REFUSED = 64
LATENCY_HOLD_SECONDS = 60  # after shrinking for latency, do not grow again this long
# Upstream shrinks a buffer max whenever sRTT correlates with it, however little sRTT rose:
# on a 40 ms path a rise of 0.1 ms (measured in bench/run benefit) shrank tcp_rmem, and one
# of 3 ms shrank tcp_wmem below the path's needs, for 22 % less throughput. Only a queue
# worth trading throughput for counts: sRTT rising across the samples' buffer sizes by at
# least this many microseconds and this fraction of the lowest sRTT among them.
QUEUE_MIN_US = 1000
QUEUE_MIN_FRACTION = 0.25
CALM_TICKS = 5  # seconds of eased TCP memory before low-memory settings are undone
# Senders' smoothed RTT in the namespace, from the netns_rtt map tcp_probe fills (sampled,
# only sockets with data queued). Growing buffers can add queueing delay (bufferbloat):
# a rise of more than 1 ms and half the RTT before is harm.
SRTT = Figure("sRTT us", TUNER, ("tcp_buffer:rtt_sum_us",), ("tcp_buffer:rtt_samples",),
              activity_min=4, floor=1000, floor_rel=0.5)


class TcpBufferTuner(Tuner):
    name = "tcp_buffer"
    pmda_cluster = 10
    bpf_source = "tcp_buffer.bpf.c"
    features = frozenset({"btf", "ringbuf"})
    watches = (
        # tcp_probe on every segment received (every kernel has it), sampled: a receiver
        # whose buffer is at tcp_rmem's max is seen within its first segments (0.36 s from
        # the start of an iperf3 client over a 40 ms path). Not tcp_rcvbuf_grow (6.18+):
        # it fires when the bytes read per RTT grow, which a buffer held at its max stops,
        # so it came 1.6-2.8 s late there; not tcp_rcv_space_adjust (every read): an empty
        # program there cost 1.8% of stress-ng --sock's operations, on tcp_probe 0.5%
        # (bench/run hooks).
        Watch("receive buffer growth", (raw_tp("tcp_probe", sampled=True),),
              sample="rcv_space_sample"),
        # tcp_sndbuf_expand fires only when a send buffer grows; tcp_probe also sees the
        # ACKs that free send space (sampled). Not sock_send_length (6.2+): an empty
        # program on every sendmsg cost 3.4%.
        Watch("send buffer growth", (fentry("tcp_sndbuf_expand"),
                                     raw_tp("tcp_probe", sampled=True)),
              sample="sndbuf_sample"),
        Watch("TCP memory limits", (tp("sock/sock_exceed_buf_limit"),)),
        Watch("SYN queue overflow", (tp("tcp/tcp_retransmit_synack"),)),
        # Once per connection, after the kernel sized its send buffer (see the C source):
        # a connection that sends little is then seen too, not only by chance of sampling.
        Watch("send buffer at connection setup",
              (sock_ops("connection_setup", needs="BPF_SOCK_OPS_RTT_CB"),), optional=True),
    )
    fields: ClassVar[dict[str, Field]] = {
        **PROTO_MEMORY_FIELDS,
        "OFF_SK_RCVBUF": Field("sock.sk_rcvbuf", 4),
        "OFF_SK_SNDBUF": Field("sock.sk_sndbuf", 4),
        # tcp_probe: whether the socket has data to send, whether the segment has data.
        "OFF_SK_WMEM_QUEUED": Field("sock.sk_wmem_queued", 4),
        "OFF_SKB_CB": Field("sk_buff.cb", 48),
        "OFF_TCP_SKB_CB_SEQ": Field("tcp_skb_cb.seq", 4),
        "OFF_TCP_SKB_CB_END_SEQ": Field("tcp_skb_cb.end_seq", 4),
        # A 4-bit bitfield before Linux 6.9, a byte since: READ_FIELD reads both.
        "OFF_SK_USERLOCKS": Field("sock.sk_userlocks", 1),
        "OFF_SK_MAX_ACK_BACKLOG": Field("sock.sk_max_ack_backlog", 4),
        "OFF_NET_TCP_RMEM": Field("net.ipv4.sysctl_tcp_rmem", 12),
        "OFF_NET_TCP_WMEM": Field("net.ipv4.sysctl_tcp_wmem", 12),
        "OFF_NET_MAX_SYN_BACKLOG": Field("net.ipv4.sysctl_max_syn_backlog", 4),
        "OFF_NET_TCP_SYNCOOKIES": Field("net.ipv4.sysctl_tcp_syncookies", 1),
        "OFF_TCP_SRTT_US": Field("tcp_sock.srtt_us", 4),
        "OFF_ICSK_ACCEPT_QUEUE_QLEN": Field("inet_connection_sock.icsk_accept_queue.qlen", 4),
    }
    # Tunables; the attribute names are the TUNABLE_* ids in bpf/tcp_buffer.bpf.c.
    WMEM = Tunable("net.ipv4.tcp_wmem", 3, namespaced=True, ceiling=_socket_buffer_ceiling,
                   positions=BUFFER, unit="bytes", figures=(RETRANS, SRTT, TCP_MEM_PRESSURE))
    RMEM = Tunable("net.ipv4.tcp_rmem", 3, namespaced=True, ceiling=_socket_buffer_ceiling,
                   positions=BUFFER, unit="bytes",
                   figures=(RETRANS, RCV_PRUNE, SRTT, TCP_MEM_PRESSURE))
    MEM = Tunable("net.ipv4.tcp_mem", 3, ceiling=_tcp_mem_ceiling,
                  positions=("min", "pressure", "max"), unit="pages",
                  figures=(TCP_MEM_PRESSURE, RETRANS))
    MODERATE_RCVBUF = Tunable("net.ipv4.tcp_moderate_rcvbuf", namespaced=True, ceiling=_flag,
                              figures=(RETRANS, RCV_PRUNE, SRTT, TCP_MEM_PRESSURE))
    NO_METRICS_SAVE = Tunable("net.ipv4.tcp_no_metrics_save", namespaced=True, ceiling=_flag)
    NO_SSTHRESH_METRICS_SAVE = Tunable("net.ipv4.tcp_no_ssthresh_metrics_save",
                                       namespaced=True, optional=True, ceiling=_flag)
    # Upstream marks it namespaced; the kernel keeps one value for all namespaces.
    HIGH_ORDER_ALLOC_DISABLE = Tunable("net.core.high_order_alloc_disable", optional=True,
                                       ceiling=_flag)
    # Upstream declares this one with a wrong type, so never reads it; we do.
    SYNCOOKIES = Tunable("net.ipv4.tcp_syncookies", namespaced=True, ceiling=lambda: (2,))
    MAX_SYN_BACKLOG = Tunable("net.ipv4.tcp_max_syn_backlog", namespaced=True,
                              ceiling=lambda: (SYN_BACKLOG_CEILING,),
                              figures=(SYN_REFUSED, TCP_MEM_PRESSURE))
    MAX_ORPHANS = Tunable("net.ipv4.tcp_max_orphans")
    # Scenarios; the attribute names are the SCENARIO_* ids in bpf/tcp_buffer.bpf.c.
    NEED_INCREASE = Scenario("need to increase TCP buffer size(s)",
                             "Need to increase buffer size(s) to maximize throughput")
    NEED_DECREASE = Scenario("need to decrease TCP buffer size(s)",
                             "Need to decrease buffer size(s) to reduce memory utilization",
        verify=False)
    LATENCY = Scenario("need to decrease TCP buffer size due to latency",
                       "Latency is starting to correlate with buffer size increases, so "
                       "decrease buffer size to avoid this effect",
        verify=False)
    MEM_PRESSURE = Scenario("approaching TCP memory pressure",
                            "Since memory pressure/exhaustion are unstable system states, "
                            "adjust tcp memory-related tunables")
    MEM_EXHAUSTION = Scenario("approaching TCP memory exhaustion",
                              "Since memory exhaustion is a highly unstable state, adjust TCP "
                              "memory-related tunables to avoid exhaustion")
    MATCH_RCVBUF = Scenario("match receive buffer size with throughput needs",
                            "Since we are tuning rcvbuf max size, ensure auto-tuning of rcvbuf "
                            "size for the connection is enabled to pick optimal rcvbuf size")
    ENTER_LOW_MEMORY = Scenario("set tunable on entering low-memory state",
                                "In low-memory situations, avoid activities like skb high "
                                "order allocations, per-path TCP metric collection which can "
                                "lead to overheads",
        verify=False)
    LEAVE_LOW_MEMORY = Scenario("unset tunable set earlier in low-memory state",
                                "Due to easing of memory strain, unset tunables to allow skb "
                                "high order allocations, (re)-enable TCP metrics collection "
                                "etc",
        verify=False)
    SYN_BACKLOG_INCREASE = Scenario(
        "increase maximum syn backlog under load since syncookies are disabled",
        "Due to the fact that syncookies are disabled and we are seeing a large number of "
        "legitimate-seeming TCP connections, increase TCP maximum SYN backlog queue length")
    SYN_BACKLOG_DECREASE = Scenario(
        "decrease maximum syn backlog due to large numbers of uncompleted connections",
        "A large number of connection requests (SYNs) uncorrelated with connection "
        "establishment suggest a more cautious approach to handling pending connections to "
        "avoid Denial of Service attacks",
        verify=False)
    # Upstream spells this "furthern"; a scenario name is user-facing text, so fixed.
    ENABLE_SYNCOOKIES = Scenario(
        "enable syncookies as further SYN backlog increases do not help",
        "SYN flood conditions have been detected, but further increases to SYN backlog are "
        "not advisable; try using syncookies instead",
        verify=False)
    DISABLE_SYNCOOKIES = Scenario(
        "disable syncookies as they are ineffective",
        "TCP syncookies are not effective; none have been validated successfully",
        verify=False)
    LOW_MEMORY_FLAGS = (NO_METRICS_SAVE, NO_SSTHRESH_METRICS_SAVE, HIGH_ORDER_ALLOC_DISABLE)

    def __init__(self, engine: Engine, tuner_id: int) -> None:
        super().__init__(engine, tuner_id)
        self.growth_held_until: dict[tuple[str, int], float] = {}
        # Per netns: what we changed on entering low memory, to undo exactly that on leaving.
        self.low_memory_undo: dict[int, dict[Tunable, tuple[int, ...]]] = {}
        self.calm_ticks = 0
        # Namespaces whose SYN queue was seen at a limit, and what has happened there since.
        self.syn_windows: dict[int, SynWindow] = {}
        self.syncookie_baseline: dict[int, dict[str, int]] = {}

    def table_sizes(self) -> dict[str, int]:
        return {"growth_held": len(self.growth_held_until),
                "low_memory": len(self.low_memory_undo), "syn_windows": len(self.syn_windows),
                "syncookie_baseline": len(self.syncookie_baseline)}

    def netns_destroyed(self, cookie: int) -> None:
        self.growth_held_until = {k: t for k, t in self.growth_held_until.items()
                                  if k[1] != cookie}
        for table in (self.low_memory_undo, self.syn_windows, self.syncookie_baseline):
            table.pop(cookie, None)
        if (rtt := self._netns_rtt()) is not None:
            with contextlib.suppress(KeyError):
                del rtt[rtt.Key(cookie)]

    def _netns_rtt(self):
        """The BPF map of senders' sRTT per netns (None: not loaded, or no tcp_probe)."""
        try:
            return self.bpf["netns_rtt"] if self.bpf is not None else None
        except KeyError:
            return None

    def figure_counters(self, cookie: Scope) -> dict[str, int]:
        """SRTT's sums in the namespace; zeros until its first sample, so that the first
        sums count from zero."""
        rtt = self._netns_rtt()
        if rtt is None or not isinstance(cookie, int):
            return {}
        key = self.engine.namespaces.global_cookie if cookie == 0 else cookie
        try:
            found = rtt[rtt.Key(key)]
        except KeyError:
            return {"rtt_sum_us": 0, "rtt_samples": 0}
        return {"rtt_sum_us": found.sum_us, "rtt_samples": found.samples}

    def handle(self, event: Event) -> None:
        tunable = self.tunables[event.tunable_id]
        if tunable in (self.WMEM, self.RMEM):
            self._grow_buffer(tunable, event)
        elif tunable == self.MEM:
            self._tcp_memory(event)
        elif tunable == self.MAX_SYN_BACKLOG:
            self._syn_queue_at_limit(event)

    # Buffer limits.
    def _grow_buffer(self, tunable: Tunable, event: Event) -> None:
        cookie = event.netns_cookie
        old, proposed = event.old_values(3), event.new_values(3)
        latency = self.correlation(tunable.name, cookie)
        latency.add(old[2], event.metric[0])
        if latency.correlated() and _queue_builds(latency):
            self._shrink_for_latency(tunable, cookie, old)
            return
        if time.monotonic() < self.growth_held_until.get((tunable.name, cookie), 0):
            return
        why = "need to increase max buffer size to maximize throughput"
        changed = self.change(tunable, self.NEED_INCREASE, cookie, proposed,
                              due_to(why, tunable), expect=old)
        if changed and tunable == self.RMEM:
            moderate = self.MODERATE_RCVBUF
            self.change(moderate, self.MATCH_RCVBUF, cookie, (1,),
                        f"Because we are changing rcvbuf parameters, set '{moderate.name}' to "
                        f"auto-tune receive buffer size to match the size required by the path "
                        f"for full throughput.")

    def _shrink_for_latency(self, tunable: Tunable, cookie: int, old: tuple[int, ...]) -> None:
        smaller = self.learning_rate.shrink(old[2])
        if smaller <= old[1]:
            return
        why = "correlation between buffer size increase and latency"
        if self.change(tunable, self.LATENCY, cookie, (old[0], old[1], smaller),
                       due_to(why, tunable), expect=old):
            # Upstream keeps growing and shrinking in turn; we stop growth for a while and
            # start the correlation afresh.
            self.correlation(tunable.name, cookie).reset()
            self.growth_held_until[(tunable.name, cookie)] = time.monotonic() + LATENCY_HOLD_SECONDS

    # TCP memory.
    def _tcp_memory(self, event: Event) -> None:
        exhaustion = self.scenarios[event.scenario_id] == self.MEM_EXHAUSTION
        why = "near memory exhaustion" if exhaustion else "near memory pressure"
        tunable = self.MEM
        self.change(tunable, event.scenario_id, 0, event.new_values(3),
                    due_to(why, tunable), expect=event.old_values(3))
        self.calm_ticks = 0
        if exhaustion:
            self._enter_low_memory(event.netns_cookie)

    def _enter_low_memory(self, cookie: int) -> None:
        undo = self.low_memory_undo.setdefault(cookie, {})
        for tunable in self.LOW_MEMORY_FLAGS:
            if tunable not in undo and self.change(
                    tunable, self.ENTER_LOW_MEMORY, cookie, (1,),
                    f"Due to low memory conditions, set '{tunable.name}'", expect=(0,)):
                undo[tunable] = (0,)
        backlog = self.MAX_SYN_BACKLOG
        if backlog not in undo:
            (current,) = self.value(backlog, cookie)
            smaller = self.learning_rate.shrink(current)
            if smaller >= MIN_SYN_BACKLOG and self.change(
                    backlog, self.ENTER_LOW_MEMORY, cookie, (smaller,),
                    due_to("low memory conditions", backlog), expect=(current,)):
                undo[backlog] = (current,)

    def tick(self, now: float) -> None:
        self._judge_syn_windows()
        if not self.low_memory_undo:
            return
        if self._memory_eased():
            self.calm_ticks += 1
            if self.calm_ticks >= CALM_TICKS:
                self._leave_low_memory()
        else:
            self.calm_ticks = 0

    def _memory_eased(self) -> bool:
        """Whether TCP memory strain has eased: the kernel has left memory-pressure mode
        (it does so only once use is back below tcp_mem's min) and use is not near the
        pressure value.

        Upstream (and bpftune before issue 10) judges only by use against the current
        tcp_mem, which growing tcp_mem brings below pressure under an unchanged load: with
        tcp_mem at 20 50 50 and 100 streams, the settings were undone and made again while
        the streams still ran."""
        if procnet.tcp_under_memory_pressure():
            return False
        (_, pressure, _) = self.value(self.MEM)
        return not self.learning_rate.nearly_full(procnet.memory_pages("TCP"), pressure)

    def _leave_low_memory(self) -> None:
        """Undo what entering low memory did (upstream undoes whatever the cached values say,
        including settings an administrator made)."""
        for cookie, undo in self.low_memory_undo.items():
            for tunable, value in undo.items():
                self.change(tunable, self.LEAVE_LOW_MEMORY, cookie, value,
                            f"Due to leaving low memory conditions, set '{tunable.name}'"
                            if tunable in self.LOW_MEMORY_FLAGS else
                            due_to("leaving low memory conditions", tunable))
        self.low_memory_undo.clear()

    # SYN floods.
    #
    # How they are seen: the BPF side reports a namespace when a SYN-ACK retransmission finds
    # a listener's SYN queue at a limit where the kernel refuses SYNs (a hook that fires from
    # a timer, never per packet). From then on, while SYNs are refused, the namespace's own
    # counters are read once per window: TcpExt TCPReqQFullDrop and TCPReqQFullDoCookies are
    # what tcp_syn_flood_action counts (the function upstream hooks, whose fentry we may not
    # have), ListenDrops also counts the SYNs dropped at tcp_max_syn_backlog, and Tcp
    # PassiveOpens the connections accepted. These counters exist in every namespace on
    # every kernel (6.1, 6.12, 6.18); the drop reasons of the kfree_skb tracepoint do not
    # name a listen overflow before 6.18, and that hook fires on every dropped packet. Nor
    # are all namespaces polled: with many containers that would cost every second what a
    # SYN flood costs only while it lasts.
    def _syn_queue_at_limit(self, event: Event) -> None:
        cookie = event.netns_cookie
        window = self.syn_windows.get(cookie)
        if window is None:
            with self.entered(cookie):
                counters = procnet.counters()
            window = self.syn_windows[cookie] = SynWindow(counters)
            # Syncookie failures count from the first flood bpftune sees (_check_syncookies).
            self.syncookie_baseline.setdefault(cookie, counters)
        window.half_open = max(window.half_open, event.metric[0])

    def _judge_syn_windows(self) -> None:
        for cookie, window in list(self.syn_windows.items()):
            window.ticks += 1
            if window.ticks < SYN_WINDOW_TICKS:
                continue
            del self.syn_windows[cookie]
            try:
                self._judge_syn_window(cookie, window)
            except OSError as e:  # the namespace is gone
                log.debug(f"{self.name}: {e}")

    def _judge_syn_window(self, cookie: int, window: SynWindow) -> None:
        with self.entered(cookie):
            counters = procnet.counters()
        seen = SynCounts.between(window.counters, counters)
        if not seen.refused or self.engine.changes.is_manual(self, cookie):
            return  # the flood is over: wait for the next report
        attack = seen.attack()
        if attack and not window.attack:
            log.notice(f"SYN flood in netns {self.engine.namespaces.name(cookie)}: "
                       f"{seen.describe()} in {SYN_WINDOW_TICKS} s, "
                       f"{window.half_open} half-open")
        # SYNs are still refused: go on watching, report or not.
        self.syn_windows[cookie] = SynWindow(counters, attack=attack)
        self._syn_flood(cookie, seen, counters)

    def _syn_flood(self, cookie: int, seen: SynCounts, counters: dict[str, int]) -> None:
        """A window in which the kernel refused SYNs in the namespace ``cookie``."""
        (syncookies,) = self.value(self.SYNCOOKIES, cookie)
        if syncookies:
            self._check_syncookies(cookie, counters)
            return  # the SYN backlog limit only applies when syncookies are off
        if self.low_memory_undo:
            tunable = self.SYNCOOKIES
            self.change(tunable, self.ENABLE_SYNCOOKIES, cookie, (1,),
                        f"Due to low memory conditions under SYN flood, enable "
                        f"'{tunable.name}' rather than increasing max SYN backlog")
            return
        backlog = self.MAX_SYN_BACKLOG
        (old,) = self.value(backlog, cookie)
        # Upstream correlates two cumulative counts (flood events, connections established)
        # over all time, so a flood with one accepted connection per 8 refused SYNs reads as
        # legitimate (r = 0.97); we compare their rates within one window.
        if seen.attack():
            # Upstream does not shrink when one step would go below 128; we stop at 128.
            smaller = max(self.learning_rate.shrink(old), MIN_SYN_BACKLOG)
            if smaller < old:
                self.change(backlog, self.SYN_BACKLOG_DECREASE, cookie, (smaller,),
                            f"Due to SYN flood not correlated with TCP connection acceptance "
                            f"- suggesting an attack - reduce '{backlog.name}' from {{old}} "
                            f"-> {{new}}", expect=(old,))
        elif seen.at_syn_backlog and seen.accepted:
            self.change(backlog, self.SYN_BACKLOG_INCREASE, cookie,
                        (self.learning_rate.grow(old),),
                        f"Due to SYN flood events on a system with TCP syncookies disabled and "
                        f"no low memory issues, increase '{backlog.name}'", expect=(old,))
        else:
            # Upstream grows the backlog whenever tcp_syn_flood_action runs, i.e. also when a
            # listener's own listen() backlog is the limit, which no tcp_max_syn_backlog helps.
            log.debug(f"{self.name}: netns {cookie}: {seen.describe()}; "
                      f"'{backlog.name}' is not the limit")

    def _check_syncookies(self, cookie: int, counters: dict[str, int]) -> None:
        # Upstream compares counters accumulated since boot, so bogus ACKs sent before any
        # flood could make it turn syncookies off. We count from the first flood bpftune
        # sees, and also require that cookies were really sent in that time.
        base = self.syncookie_baseline.setdefault(cookie, counters)
        sent, failed, recv = (counters.get(f"TcpExt:Syncookies{k}", 0)
                              - base.get(f"TcpExt:Syncookies{k}", 0)
                              for k in ("Sent", "Failed", "Recv"))
        if min(sent, failed) >= SYNCOOKIE_FAILURES and recv == 0:
            tunable = self.SYNCOOKIES
            self.change(tunable, self.DISABLE_SYNCOOKIES, cookie, (0,),
                        f"Due to receiving {failed} invalid syncookies and no valid ones, "
                        f"disable '{tunable.name}' as they are ineffective under current "
                        f"network conditions")


@dataclass
class SynCounts:
    """What a namespace's counters say happened to SYNs in one window."""

    at_listen_backlog: int  # refused because a listener's queue was at its listen() backlog
    at_syn_backlog: int  # dropped at tcp_max_syn_backlog (syncookies off)
    accepted: int  # connections established by listeners

    @classmethod
    def between(cls, before: dict[str, int], after: dict[str, int]) -> SynCounts:
        def grew(name: str) -> int:
            return max(after.get(name, 0) - before.get(name, 0), 0)

        # tcp_syn_flood_action counts each SYN refused at the listen backlog as a drop or,
        # with syncookies on, as a cookie sent. ListenDrops counts every SYN or handshake
        # ACK a listener dropped: those SYNs again, the ACKs refused for a full accept queue
        # (ListenOverflows), and the rest, which are the SYNs dropped at
        # tcp_max_syn_backlog (and the rare one without a route or memory).
        drops, overflows = grew("TcpExt:ListenDrops"), grew("TcpExt:ListenOverflows")
        full_drops = grew("TcpExt:TCPReqQFullDrop")
        return cls(at_listen_backlog=full_drops + grew("TcpExt:TCPReqQFullDoCookies"),
                   at_syn_backlog=max(drops - overflows - full_drops, 0),
                   accepted=grew("Tcp:PassiveOpens"))

    @property
    def refused(self) -> int:
        return self.at_listen_backlog + self.at_syn_backlog

    def attack(self) -> bool:
        return (self.refused >= SYN_ATTACK_MIN_REFUSED
                and self.refused >= SYN_ATTACK_RATIO * self.accepted)

    def describe(self) -> str:
        return (f"{self.refused} SYNs refused ({self.at_syn_backlog} at tcp_max_syn_backlog, "
                f"{self.at_listen_backlog} at listen backlogs), {self.accepted} connections "
                f"accepted")


@dataclass
class SynWindow:
    """A namespace's counters at the start of a window, and what the window saw so far."""

    counters: dict[str, int]
    ticks: int = 0
    half_open: int = 0  # the fullest SYN queue the BPF side reported
    attack: bool = False  # the previous window was an attack (to log an attack once)
