"""ip_frag: real fragmented pings between the global netns and a test netns whose
reassembly memory limit is too small for one datagram, and its decisions with fakes.

An 8 KiB echo request leaves the sender as 6 fragments (MTU 1500) that hold more than
8192 bytes of reassembly memory together, so with ipfrag_high_thresh at 8192 no such ping
is ever answered until bpftune raises the limit in the namespace that reassembles them.
"""

from __future__ import annotations

import contextlib
import errno
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from bpftune import sysctl
from bpftune.changes import GLOBAL, Changes, StateFile
from bpftune.correlation import Correlations
from bpftune.events import Event
from bpftune.hooks import Plan, fentry, raw_tp
from bpftune.learning import LearningRate
from bpftune.sysctl import SysctlError
from bpftune.tuners import ip_frag
from bpftune.tuners.ip_frag import IpFragTuner as T
from helpers import (
    BEFORE_WINDOW_SECONDS,
    VERIFY_WINDOWS,
    daemon,
    netns_cookie,
    ns_prefix,
    read_sysctl,
    verdict,
    wait_until,
)

HIGH, LOW = "net.ipv4.ipfrag_high_thresh", "net.ipv4.ipfrag_low_thresh"
HIGH6, LOW6 = "net.ipv6.ip6frag_high_thresh", "net.ipv6.ip6frag_low_thresh"
SQUEEZED, SQUEEZED_LOW = 8192, 4096
PING_BYTES = 8192
SMALL_PING_BYTES = 2000  # 2 fragments, within 8192 bytes of reassembly memory
INCREASE = ("Scenario 'need to increase IP fragmentation high threshold' occurred for tunable "
            "'{name}' in {where} ns. this allows additional memory to be used to accommodate "
            "more defragmentation.")
FIRST_GROWTH = ("Due to approaching fragmentation maximum threshold change {name} from "
                "(8192) -> (10240)")


def squeeze(sysctls, ns: str | None, high: str = HIGH, low: str = LOW) -> None:
    """high_thresh 8192: less than one 8 KiB ping's fragments need. The kernel refuses a
    high below low (and low above high), so low goes first, and high is remembered first
    so that it is restored first."""
    sysctls.remember(high, ns)
    sysctls.set(low, str(SQUEEZED_LOW), ns)
    sysctls.set(high, str(SQUEEZED), ns)


def answered(src_ns: str | None, dst: str, count: int = 20, size: int = PING_BYTES) -> int:
    """Percentage of ``count`` pings of ``size`` bytes (8 KiB) from ``src_ns`` to ``dst``
    that got a reply."""
    r = subprocess.run([*ns_prefix(src_ns), "ping", "-q", "-n", "-c", str(count), "-i", "0.05",
                        "-W", "1", "-s", str(size), dst],
                       capture_output=True, text=True, check=False, timeout=count + 30)
    m = re.search(r"(\d+) packets transmitted, (\d+) received", r.stdout)
    assert m, r.stdout + r.stderr
    return int(m[2]) * 100 // int(m[1])


def reasm_fails(ns: str | None) -> int:
    out = subprocess.run([*ns_prefix(ns), "cat", "/proc/net/snmp"], capture_output=True,
                         text=True, check=True).stdout
    header, values = [line.split() for line in out.splitlines() if line.startswith("Ip:")]
    return int(values[header.index("ReasmFails")])


def ping_until_answered(src_ns: str | None, dst: str, timeout: float = 30) -> bool:
    return wait_until(lambda: answered(src_ns, dst, count=10) == 100, timeout=timeout,
                      interval=0)


# Real traffic. This kernel refuses fentry: the kfree_skb fallback is what runs here.
def test_limit_grows_in_the_namespace_only_and_pings_get_through(tmp_path, sysctls, hosts):
    squeeze(sysctls, hosts.ns)
    global_high = read_sysctl(HIGH)
    before = answered(None, hosts.ns_addr, count=40)
    assert before == 0, f"{before}% of 8 KiB pings answered with high_thresh {SQUEEZED}"
    cookie = netns_cookie(hosts.ns)
    with daemon(tmp_path, "-R") as d:
        assert ping_until_answered(None, hosts.ns_addr), d.log
        after = answered(None, hosts.ns_addr, count=40)
        grown = int(read_sysctl(HIGH, hosts.ns))
        assert read_sysctl(HIGH) == global_high  # upstream would have raised this one
        d.stop()
    print(f"\n8 KiB pings answered: {before}% before, {after}% after bpftune raised "
          f"{HIGH} in the namespace from {SQUEEZED} to {grown}")
    assert after >= 95
    assert SQUEEZED < grown <= ip_frag._ceiling()[0]
    log = d.log
    assert "bpftune: ip_frag: raw_tp/kfree_skb\n" in log
    assert INCREASE.format(name=HIGH, where="non-global") in log
    assert FIRST_GROWTH.format(name=HIGH) in log
    assert "need to decrease" not in log
    assert f"# sysctl '{HIGH}' changed from ({SQUEEZED}) -> ({grown}) in netns cookie {cookie}" \
        in log
    # -R: the namespace's limit is back where it was.
    assert int(read_sysctl(HIGH, hosts.ns)) == SQUEEZED
    assert read_sysctl(HIGH) == global_high


@contextlib.contextmanager
def small_pings(dst: str) -> Iterator[None]:
    """100 pings a second of SMALL_PING_BYTES from the global netns to ``dst``, for the
    body: steady reassembly (2 fragments each) that fits under a squeezed limit."""
    ping = subprocess.Popen(["ping", "-q", "-n", "-i", "0.01", "-s", str(SMALL_PING_BYTES),
                             dst], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        ping.kill()
        ping.wait(timeout=10)


def test_limit_growth_that_lets_pings_through_is_kept(tmp_path, sysctls, hosts):
    """Verified changes: pings of 2 KiB, reassembled in the test netns within its squeezed
    limit, make the window before the change active with no reassembly failures; 8 KiB
    pings fail until the limit has grown (a series of steps); the small pings go on over
    the window after the change, with the 8 KiB ones now answered. The change is kept,
    with the namespace's reassembly failures as evidence."""
    squeeze(sysctls, hosts.ns)
    assert answered(None, hosts.ns_addr, count=10, size=SMALL_PING_BYTES) == 100
    with daemon(tmp_path, env=VERIFY_WINDOWS) as d, small_pings(hosts.ns_addr):
        time.sleep(BEFORE_WINDOW_SECONDS)
        assert ping_until_answered(None, hosts.ns_addr), d.log
        assert answered(None, hosts.ns_addr, count=20) >= 95
        before, _, after = verdict(d, "ip_frag", HIGH, "reassembly failures/1000")
        assert after <= max(before, 10)  # at most the floor of a clear rise
        assert int(read_sysctl(HIGH, hosts.ns)) > SQUEEZED
    assert re.search(rf"Verdict kept for '{HIGH}' in netns '{hosts.ns}' \(8192\) -> ", d.log)


def test_global_limit_grows_for_pings_from_a_namespace(tmp_path, sysctls, hosts):
    squeeze(sysctls, None)
    ns_high = read_sysctl(HIGH, hosts.ns)
    assert answered(hosts.ns, hosts.global_addr) == 0
    with daemon(tmp_path) as d:
        assert ping_until_answered(hosts.ns, hosts.global_addr), d.log
        assert answered(hosts.ns, hosts.global_addr) >= 95
        grown = int(read_sysctl(HIGH))
        assert grown > SQUEEZED
        assert read_sysctl(HIGH, hosts.ns) == ns_high
        d.stop()
    assert INCREASE.format(name=HIGH, where="global") in d.log
    assert FIRST_GROWTH.format(name=HIGH) in d.log
    assert f"# sysctl '{HIGH}' changed from ({SQUEEZED}) -> ({grown})\n" in d.log


def test_ipv6_limit_grows_in_the_namespace(tmp_path, sysctls, hosts):
    """IPv6 fragments over the namespace's loopback (MTU lowered to 1500), reassembled
    by ipv6_frag_rcv under ip6frag_high_thresh."""
    squeeze(sysctls, hosts.ns, HIGH6, LOW6)
    subprocess.run(["ip", "-n", hosts.ns, "link", "set", "lo", "mtu", "1500"], check=True)
    assert answered(hosts.ns, "::1") == 0
    with daemon(tmp_path) as d:
        assert ping_until_answered(hosts.ns, "::1"), d.log
        assert int(read_sysctl(HIGH6, hosts.ns)) > SQUEEZED
        d.stop()
    assert INCREASE.format(name=HIGH6, where="non-global") in d.log
    assert FIRST_GROWTH.format(name=HIGH6) in d.log


def test_admin_write_in_a_namespace_hands_it_over(tmp_path, sysctls, hosts):
    squeeze(sysctls, hosts.ns)
    admin = str(SQUEEZED + 1)
    with daemon(tmp_path) as d:
        subprocess.run(["ip", "netns", "exec", hosts.ns, "sysctl", "-qw", f"{HIGH}={admin}"],
                       check=True)
        d.wait_for(rf"modified sysctl '{HIGH}' that tuner 'ip_frag' uses; disabling "
                   rf"'ip_frag' for namespace cookie {netns_cookie(hosts.ns)}")
        fails = reasm_fails(hosts.ns)
        assert answered(None, hosts.ns_addr, count=40) == 0
        assert reasm_fails(hosts.ns) > fails  # the tuner would have acted on these
        assert read_sysctl(HIGH, hosts.ns) == admin
        d.stop()
    assert "Scenario 'need to increase IP fragmentation" not in d.log


# Decisions, with an in-memory kernel and the real change path (ceilings, ledger).
COOKIE, OTHER = 4242, 4343


class Kernel:
    """Per-namespace sysctl tables standing in for /proc/sys, and the ``Namespaces`` the
    change path enters; reassembly counters per (namespace, tunable)."""

    def __init__(self, cookies=(GLOBAL, COOKIE, OTHER)) -> None:
        self.cookie = GLOBAL
        self.tables = {c: {HIGH: (SQUEEZED,), LOW: (SQUEEZED_LOW,), HIGH6: (SQUEEZED,),
                           LOW6: (SQUEEZED_LOW,)} for c in cookies}
        self.counters: dict[tuple[int, str], tuple[int, int]] = {}
        self.writes: list[tuple[int, str, tuple[int, ...]]] = []

    def is_global(self, cookie: int) -> bool:
        return cookie == GLOBAL

    @contextlib.contextmanager
    def entered(self, cookie: int) -> Iterator[None]:
        outer, self.cookie = self.cookie, cookie
        try:
            yield
        finally:
            self.cookie = outer

    def read(self, name: str, *, string: bool = False) -> tuple[int, ...]:
        try:
            return self.tables[self.cookie][name]
        except KeyError:
            raise SysctlError(errno.ENOENT, f"no {name}") from None

    def write(self, name: str, value: tuple[int, ...]) -> None:
        if value[0] < self.read(LOW if name == HIGH else LOW6)[0]:
            raise SysctlError(errno.EINVAL, "below low_thresh")  # as the kernel does
        self.writes.append((self.cookie, name, tuple(value)))
        self.tables[self.cookie][name] = tuple(value)

    def reassembly(self, tunable, cookie: int) -> tuple[int, int]:
        return self.counters.get((cookie, tunable.name), (0, 0))

    def add(self, cookie: int, name: str, fails: int, reqds: int) -> None:
        """``reqds`` more fragments in the namespace, ``fails`` of them failed."""
        f, r = self.counters.get((cookie, name), (0, 0))
        self.counters[(cookie, name)] = (f + fails, r + reqds)


@pytest.fixture
def tuned(monkeypatch, tmp_path):
    kernel = Kernel()
    monkeypatch.setattr(sysctl, "read", kernel.read)
    monkeypatch.setattr(sysctl, "write", kernel.write)
    monkeypatch.setattr(ip_frag, "total_ram_bytes", lambda: 64 << 20)  # 1 MiB ceiling
    changes = Changes(kernel, StateFile(str(tmp_path)))  # type: ignore[arg-type]
    engine = SimpleNamespace(changes=changes, correlations=Correlations(),
                             learning_rate=LearningRate(4), namespaces=kernel)
    tuner = T(engine, 0)  # type: ignore[arg-type]
    tuner.reassembly_counters = kernel.reassembly  # type: ignore[method-assign]
    return tuner, changes, kernel


def grow(tuner: T, kernel: Kernel, name: str = HIGH, cookie: int = COOKIE) -> None:
    """What the BPF side sends when reassembly memory nears the limit: limit + 25 %."""
    tunable = tuner.tunable(name)
    (old,) = kernel.tables[cookie][name]
    e = Event(tuner_id=0, scenario_id=T.scenarios.index(T.NEED_INCREASE), netns_cookie=cookie,
              tunable_id=T.tunables.index(tunable))
    e.old[0], e.new[0], e.metric[0] = old, LearningRate(4).grow(old), old
    tuner.handle(e)


def counted(changes: Changes, scenario, cookie: int = COOKIE) -> int:
    return sum(n for (_, _, s, c), n in changes.scenario_counts.items()
               if s == T.scenarios.index(scenario) and c == cookie)


def test_failures_rising_with_the_limit_shrink_it_and_hold_growth(tuned):
    tuner, changes, kernel = tuned
    for i in range(10):  # each higher limit sees a larger share of fragments fail
        kernel.add(COOKIE, HIGH, fails=10 * i, reqds=100)
        grow(tuner, kernel)  # the first event only starts counting: 9 samples
    assert counted(changes, T.NEED_INCREASE) == 10 and counted(changes, T.NEED_DECREASE) == 0
    (grown,) = kernel.tables[COOKIE][HIGH]
    kernel.add(COOKIE, HIGH, fails=100, reqds=100)
    grow(tuner, kernel)  # the tenth sample makes the correlation clear
    assert counted(changes, T.NEED_DECREASE) == 1 and counted(changes, T.NEED_INCREASE) == 10
    assert kernel.tables[COOKIE][HIGH] == (LearningRate(4).shrink(grown),)
    writes = len(kernel.writes)
    kernel.add(COOKIE, HIGH, fails=0, reqds=100)
    grow(tuner, kernel)  # held off
    assert len(kernel.writes) == writes
    later = tuner.clock() + ip_frag.HOLD_SECONDS + 1
    tuner.clock = lambda: later
    grow(tuner, kernel)  # no requests since: a rate of 0, and growth again
    assert counted(changes, T.NEED_INCREASE) == 11
    assert all(c == COOKIE for c, _, _ in kernel.writes)  # the event's namespace only


def test_falling_failure_rate_keeps_growing(tuned):
    tuner, changes, kernel = tuned
    for i in range(12):  # what real pings show: the higher the limit, the fewer failures
        kernel.add(COOKIE, HIGH, fails=max(90 - 10 * i, 0), reqds=100)
        grow(tuner, kernel)
    assert counted(changes, T.NEED_INCREASE) == 12 and counted(changes, T.NEED_DECREASE) == 0
    assert kernel.tables[GLOBAL][HIGH] == (SQUEEZED,)


def test_failures_since_namespace_start_are_not_mistaken_for_correlation(tuned):
    """After 10000 good reassemblies, half of all fragments fail from now on, whatever the
    limit: upstream's rate (counters since boot) would creep up from 0 with each increase
    (0.5 %, 1 %, ...) and call that a correlation; per interval it is a flat 50 %."""
    tuner, changes, kernel = tuned
    kernel.add(COOKIE, HIGH, fails=0, reqds=10000)
    for _ in range(15):
        kernel.add(COOKIE, HIGH, fails=50, reqds=100)
        grow(tuner, kernel)
    assert counted(changes, T.NEED_DECREASE) == 0


def test_no_reassembly_requests_is_a_zero_rate(tuned):
    tuner, _, kernel = tuned
    assert tuner.fail_rate(tuner.HIGH_THRESH, COOKIE) is None  # the first: no interval yet
    assert tuner.fail_rate(tuner.HIGH_THRESH, COOKIE) == 0  # upstream divides by zero
    kernel.add(COOKIE, HIGH, fails=3, reqds=4)
    assert tuner.fail_rate(tuner.HIGH_THRESH, COOKIE) == 75
    assert tuner.fail_rate(tuner.HIGH_THRESH, COOKIE) == 0  # nothing new since


def test_shrink_stops_at_low_thresh(tuned):
    """The kernel refuses a high_thresh below low_thresh: the decrease stops there."""
    tuner, changes, kernel = tuned
    for i in range(10):
        kernel.add(COOKIE, HIGH, fails=10 * i, reqds=100)
        grow(tuner, kernel)
    (grown,) = kernel.tables[COOKIE][HIGH]
    kernel.tables[COOKIE][LOW] = (grown - 10,)
    kernel.add(COOKIE, HIGH, fails=100, reqds=100)
    grow(tuner, kernel)
    assert counted(changes, T.NEED_DECREASE) == 1
    assert kernel.tables[COOKIE][HIGH] == (grown - 10,)


def test_growth_stops_at_one_64th_of_ram(tuned):
    tuner, _, kernel = tuned
    kernel.tables[COOKIE][HIGH] = ((1 << 20) - 100,)
    grow(tuner, kernel)
    assert kernel.tables[COOKIE][HIGH] == (1 << 20,)
    grow(tuner, kernel)
    assert kernel.tables[COOKIE][HIGH] == (1 << 20,)


def test_families_and_namespaces_are_tuned_and_correlated_apart(tuned):
    tuner, _, kernel = tuned
    for i in range(11):
        kernel.add(COOKIE, HIGH, fails=10 * i, reqds=100)
        kernel.add(OTHER, HIGH, fails=0, reqds=100)
        grow(tuner, kernel, HIGH, COOKIE)
        grow(tuner, kernel, HIGH6, COOKIE)
        grow(tuner, kernel, HIGH, OTHER)
    assert kernel.tables[COOKIE][HIGH][0] < kernel.tables[COOKIE][HIGH6][0]
    assert kernel.tables[OTHER][HIGH] == kernel.tables[COOKIE][HIGH6]
    assert kernel.tables[GLOBAL][HIGH] == kernel.tables[GLOBAL][HIGH6] == (SQUEEZED,)
    tuner.netns_destroyed(COOKIE)
    assert all(k[1] == OTHER for k in tuner.last_counters)


def test_stale_proposal_adds_no_sample(tuned):
    tuner, _, kernel = tuned
    e = Event(tuner_id=0, scenario_id=0, netns_cookie=COOKIE, tunable_id=0)
    e.old[0], e.new[0] = SQUEEZED - 1, SQUEEZED + 1
    tuner.handle(e)
    assert not kernel.writes
    assert len(tuner.engine.correlations[(T.name, HIGH, COOKIE)]) == 0


def test_kallsyms_ranges_end_at_the_next_symbol(tmp_path: Path):
    kallsyms = tmp_path / "kallsyms"
    kallsyms.write_text("ffffffff82057730 T ip_check_defrag\n"
                        "ffffffff8124421f t ip_defrag.cold\n"
                        "ffffffff82056f00 T ip_defrag\n"
                        "ffffffff82057720 T __pfx_ip_check_defrag\n"
                        "ffffffff8217d7e0 t ipv6_frag_rcv\n"
                        "ffffffff8217e380 t __pfx_ip6frag_key_hashfn\t[ipv6]\n")
    assert ip_frag.kallsyms_ranges(str(kallsyms)) == {
        "ip_defrag": (0xffffffff82056f00, 0xffffffff82057720),
        "ipv6_frag_rcv": (0xffffffff8217d7e0, 0xffffffff8217e380)}
    hidden = tmp_path / "hidden"  # kptr_restrict: every address reads as 0
    hidden.write_text("0000000000000000 T ip_defrag\n0000000000000000 T ip_check_defrag\n")
    assert ip_frag.kallsyms_ranges(str(hidden)) == {}


def test_compile_defines_only_for_the_kfree_skb_hook(tuned):
    tuner, _, _ = tuned
    tuner.hooks = Plan(hooks={"IPv4": fentry("ip_defrag"), "IPv6": fentry("ipv6_frag_rcv")})
    assert tuner.compile_defines() == []
    tuner.hooks = Plan(hooks={"IPv4": raw_tp("kfree_skb"), "IPv6": raw_tp("kfree_skb")})
    defines = tuner.compile_defines()
    values = {d.split("=")[0]: int(d.split("=")[1].removesuffix("ULL"), 16) for d in defines}
    assert sorted(values) == ["-DIPV6_FRAG_RCV_END", "-DIPV6_FRAG_RCV_START",
                              "-DIP_DEFRAG_END", "-DIP_DEFRAG_START"]
    for fn in ("IP_DEFRAG", "IPV6_FRAG_RCV"):  # this kernel's own ranges
        assert 0 < values[f"-D{fn}_START"] < values[f"-D{fn}_END"]


def test_snmp6_counters(tmp_path: Path):
    snmp6 = tmp_path / "snmp6"
    snmp6.write_text("Ip6InReceives                   \t12\nIp6ReasmReqds                   "
                     "\t1020\nIp6ReasmFails                   \t154\n")
    counters = ip_frag.snmp6_counters(str(snmp6))
    assert (counters["Ip6ReasmFails"], counters["Ip6ReasmReqds"]) == (154, 1020)
