"""tcp_buffer's decisions, driven with synthetic events through the real change path
(``Changes.apply``: ceilings, ordering, staleness, read-back, the ledger journal) over an
in-memory kernel, so that what the change path would cap, refuse or drop is seen as such.
The kernel side is tested in test_tcp_buffer.py with real traffic."""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from bpftune import memory, procnet, sysctl
from bpftune.changes import GLOBAL, Changes, StateFile
from bpftune.correlation import Correlations
from bpftune.events import Event
from bpftune.learning import LearningRate
from bpftune.sysctl import SysctlError
from bpftune.tuner import Scenario, Tunable
from bpftune.tuners import tcp_buffer
from bpftune.tuners.tcp_buffer import TcpBufferTuner as T
from helpers import recorded

COOKIE, OTHER = 4242, 4343
MiB, GiB = 1 << 20, 1 << 30
RMEM, WMEM, MODERATE = "net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem", "net.ipv4.tcp_moderate_rcvbuf"
BACKLOG, SYNCOOKIES = "net.ipv4.tcp_max_syn_backlog", "net.ipv4.tcp_syncookies"


class Kernel:
    """In-memory sysctls, one table per network namespace, standing in for /proc/sys.

    It is also the ``Namespaces`` the change path enters: reading a sysctl in a namespace
    where it does not exist (a global-only one outside the global netns) is an error, as
    writing in the wrong namespace would show. Writes to the (cookie, name) pairs in
    ``ignored`` are accepted but do not take, as when the kernel or a concurrent writer
    leaves another value there."""

    def __init__(self, tables: dict[int, dict[str, tuple[int, ...]]]) -> None:
        self.tables = tables
        self.cookie = GLOBAL
        self.writes: list[tuple[int, str, tuple[int, ...]]] = []
        self.ignored: set[tuple[int, str]] = set()

    @classmethod
    def with_values(cls, values: dict[str, tuple[int, ...]],
                    cookies: tuple[int, ...] = (COOKIE,)) -> Kernel:
        """Every tunable in the global netns, namespaced ones also in each of ``cookies``."""
        namespaced = {t.name for t in T.tunables if t.namespaced}
        tables: dict[int, dict[str, tuple[int, ...]]] = {GLOBAL: dict(values)}
        for c in cookies:
            tables[c] = {n: v for n, v in values.items() if n in namespaced}
        return cls(tables)

    # Namespaces, as Changes and the tuner use them.
    def is_global(self, cookie: int) -> bool:
        return cookie == GLOBAL

    def name(self, cookie: int) -> str:
        return "global" if self.is_global(cookie) else f"cookie-{cookie}"

    @contextlib.contextmanager
    def entered(self, cookie: int) -> Iterator[None]:
        outer, self.cookie = self.cookie, cookie
        try:
            yield
        finally:
            self.cookie = outer

    # bpftune.sysctl.read / write.
    def read(self, name: str, *, string: bool = False) -> tuple[int, ...]:
        try:
            return self.tables[self.cookie][name]
        except KeyError:
            raise SysctlError(errno.ENOENT, f"no sysctl '{name}' in {self.cookie}") from None

    def write(self, name: str, value: tuple[int, ...]) -> None:
        self.read(name)
        self.writes.append((self.cookie, name, tuple(value)))
        if (self.cookie, name) not in self.ignored:
            self.tables[self.cookie][name] = tuple(value)

    def value(self, name: str, cookie: int = COOKIE) -> tuple[int, ...]:
        """What is live, wherever the tunable lives."""
        table = self.tables[cookie]
        return table[name] if name in table else self.tables[GLOBAL][name]

    def installed(self, monkeypatch: pytest.MonkeyPatch) -> Kernel:
        monkeypatch.setattr(sysctl, "read", self.read)
        monkeypatch.setattr(sysctl, "write", self.write)
        return self


def fake_ram(monkeypatch: pytest.MonkeyPatch, ram_bytes: int, page_size: int = 4096) -> None:
    """Make bpftune see ``ram_bytes`` of RAM in ``page_size`` pages: every bpftune module
    holding memory's functions (tcp_buffer imports them by name) gets the fakes."""
    fakes = {id(memory.total_ram_pages): lambda: ram_bytes // page_size,
             id(memory.page_size): lambda: page_size}
    for name, module in list(sys.modules.items()):
        if name == "bpftune" or name.startswith("bpftune."):
            for attr, value in list(vars(module).items()):
                if id(value) in fakes:
                    monkeypatch.setattr(module, attr, fakes[id(value)])


def ledger(changes: Changes) -> dict[tuple[str, int], dict]:
    """The ledger as its journal on disk says, by (tunable, cookie)."""
    return {(r["tunable"], r["cookie"]): r
            for r in recorded(os.path.dirname(changes.state.path))}


def counted(changes: Changes, scenario: Scenario) -> int:
    """Changes made for ``scenario`` (as the change path counts them)."""
    return sum(n for (tuner, _, s, _), n in changes.scenario_counts.items()
               if tuner == T.name and s == T.scenarios.index(scenario))


def make_tuner(kernel: Kernel, tmp_path) -> tuple[T, Changes]:
    changes = Changes(kernel, StateFile(str(tmp_path)))  # type: ignore[arg-type]
    engine = SimpleNamespace(changes=changes, correlations=Correlations(),
                             learning_rate=LearningRate(4), namespaces=kernel)
    tuner = T(engine, 0)  # type: ignore[arg-type]
    tuner.init()
    return tuner, changes


@pytest.fixture
def tuned(monkeypatch, tmp_path):
    """``tuned(values, cookies=...)`` -> (tuner, changes, kernel) on 1 GiB of (fake) RAM."""
    fake_ram(monkeypatch, GiB)
    runs = iter(range(1000))

    def make(values, cookies=(COOKIE,)):
        kernel = Kernel.with_values(values, cookies).installed(monkeypatch)
        state = tmp_path / f"state{next(runs)}"
        return (*make_tuner(kernel, state), kernel)

    return make


def event(tunable: Tunable, scenario: Scenario, old, new, metric: int = 0,
          cookie: int = COOKIE) -> Event:
    """The event the BPF side sends (ids as the compile's TUNABLE_* and SCENARIO_*)."""
    e = Event(tuner_id=0, scenario_id=T.scenarios.index(scenario), netns_cookie=cookie,
              tunable_id=T.tunables.index(tunable))
    e.old[:len(old)] = old
    e.new[:len(new)] = new
    e.metric[0] = metric
    return e


def grow(tuner: T, kernel: Kernel, tunable: Tunable = T.RMEM, rtt: int = 0,
         cookie: int = COOKIE) -> None:
    """What the BPF side sends when a socket's buffer is nearly at the max: max + 25 %."""
    old = kernel.value(tunable.name, cookie)
    new = (old[0], old[1], tuner.engine.learning_rate.grow(old[2]))
    tuner.handle(event(tunable, T.NEED_INCREASE, old, new, metric=rtt, cookie=cookie))


def test_growth_correlated_with_latency_is_reversed_and_held(tuned, monkeypatch):
    tuner, changes, kernel = tuned({RMEM: (4096, 131072, 131072), MODERATE: (0,)})
    for i in range(9):  # latency rises with every increase: 10 ms more each time
        grow(tuner, kernel, rtt=40_000 + 10_000 * i)
    assert counted(changes, T.NEED_INCREASE) == 9
    assert kernel.value(MODERATE) == (1,) and counted(changes, T.MATCH_RCVBUF) == 1
    grown = kernel.value(RMEM)[2]
    assert grown > 131072
    grow(tuner, kernel, rtt=130_000)  # tenth sample: correlation is now clear
    assert counted(changes, T.LATENCY) == 1 and counted(changes, T.NEED_INCREASE) == 9
    assert kernel.value(RMEM) == (4096, 131072, LearningRate(4).shrink(grown))
    writes = len(kernel.writes)
    grow(tuner, kernel, rtt=100)  # growth is held off after a latency decrease
    assert len(kernel.writes) == writes
    # ... for LATENCY_HOLD_SECONDS only: then the same event grows the max again.
    later = time.monotonic() + tcp_buffer.LATENCY_HOLD_SECONDS + 1
    monkeypatch.setattr(tcp_buffer, "time", SimpleNamespace(monotonic=lambda: later))
    grow(tuner, kernel, rtt=100)
    assert counted(changes, T.NEED_INCREASE) == 10
    record = ledger(changes)[(RMEM, COOKIE)]
    assert record["current"] == list(kernel.value(RMEM)) and record["changes"] == 11


@pytest.mark.parametrize("rise_us", [96, 3000], ids=["0.2%", "3ms-of-40"])
def test_a_correlated_but_small_rise_of_latency_keeps_growing(tuned, rise_us):
    """sRTT in lockstep with the max (r near 1), but by less than a queue worth a buffer's
    throughput: as the delay-line benchmark showed on a 40 ms path."""
    tuner, changes, kernel = tuned({RMEM: (4096, 131072, 131072), MODERATE: (1,)})
    for i in range(16):
        grow(tuner, kernel, rtt=40_700 + rise_us * i // 15)
    assert counted(changes, T.NEED_INCREASE) == 16 and counted(changes, T.LATENCY) == 0


def test_uncorrelated_latency_keeps_growing(tuned):
    tuner, changes, kernel = tuned({RMEM: (4096, 131072, 131072), MODERATE: (1,)})
    for i in range(20):
        grow(tuner, kernel, rtt=(100, 300)[i % 2])
    assert counted(changes, T.NEED_INCREASE) == 20 and counted(changes, T.LATENCY) == 0
    assert kernel.value(RMEM)[2] > 131072 * 80  # 1.25 ** 20 is 86.7
    assert counted(changes, T.MATCH_RCVBUF) == 0  # already on: nothing to change


@pytest.mark.parametrize("tunable", [T.RMEM, T.WMEM], ids=["rmem", "wmem"])
def test_growth_stops_at_one_32nd_of_ram(tuned, tunable):
    """On 1 GiB of RAM no socket buffer max may pass 32 MiB, however full buffers are."""
    name = tunable.name
    tuner, changes, kernel = tuned({name: (4096, 131072, 30 * MiB), MODERATE: (0,)})
    grow(tuner, kernel, tunable)  # proposes 37.5 MiB
    assert kernel.value(name) == (4096, 131072, 32 * MiB)
    assert counted(changes, T.NEED_INCREASE) == 1
    writes = len(kernel.writes)
    grow(tuner, kernel, tunable)  # proposes 40 MiB: nothing left to grow
    assert kernel.value(name) == (4096, 131072, 32 * MiB)
    assert len(kernel.writes) == writes and counted(changes, T.NEED_INCREASE) == 1


def test_out_of_order_growth_is_refused_and_triggers_nothing(tuned):
    """A max grown but still below the default (an administrator left default > max) would
    leave tcp_rmem out of order: refused, and receive auto-tuning is not touched either.
    In the other namespace, ordered, the same growth goes through."""
    tuner, changes, kernel = tuned({RMEM: (4096, 131072, 131072), MODERATE: (0,)},
                                   cookies=(COOKIE, OTHER))
    kernel.tables[OTHER][RMEM] = (4096, 262144, 131072)
    for cookie in (COOKIE, OTHER):
        grow(tuner, kernel, cookie=cookie)  # 131072 -> 163840
    assert kernel.value(RMEM, COOKIE) == (4096, 131072, 163840)
    assert kernel.value(MODERATE, COOKIE) == (1,)
    assert kernel.value(RMEM, OTHER) == (4096, 262144, 131072)
    assert kernel.value(MODERATE, OTHER) == (0,)
    assert all(cookie == COOKIE for cookie, _, _ in kernel.writes)
    assert set(ledger(changes)) == {(RMEM, COOKIE), (MODERATE, COOKIE)}


def test_stale_proposal_is_dropped(tuned):
    tuner, changes, kernel = tuned({WMEM: (4096, 16384, 40000)})
    # Computed from a max of 32000 that another event has already grown to 40000.
    tuner.handle(event(T.WMEM, T.NEED_INCREASE, (4096, 16384, 32000), (4096, 16384, 50000)))
    assert kernel.value(WMEM) == (4096, 16384, 40000) and kernel.writes == []
    # The same proposal computed from the live value goes through.
    tuner.handle(event(T.WMEM, T.NEED_INCREASE, (4096, 16384, 40000), (4096, 16384, 50000)))
    assert kernel.value(WMEM) == (4096, 16384, 50000)
    assert counted(changes, T.NEED_INCREASE) == 1


def test_a_write_that_does_not_take_is_not_a_change(tuned):
    """The change path reads the value back: a grown max the kernel did not keep is not
    counted, and receive auto-tuning is not turned on for it. In the other namespace, where
    the write takes, both happen."""
    tuner, changes, kernel = tuned({RMEM: (4096, 131072, 131072), MODERATE: (0,)},
                                   cookies=(COOKIE, OTHER))
    kernel.ignored.add((OTHER, RMEM))
    for cookie in (COOKIE, OTHER):
        grow(tuner, kernel, cookie=cookie)
    assert kernel.value(RMEM, COOKIE) == (4096, 131072, 163840)
    assert kernel.value(MODERATE, COOKIE) == (1,)
    assert (OTHER, RMEM, (4096, 131072, 163840)) in kernel.writes  # written, not kept
    assert kernel.value(RMEM, OTHER) == (4096, 131072, 131072)
    assert kernel.value(MODERATE, OTHER) == (0,)
    assert counted(changes, T.NEED_INCREASE) == 1 and counted(changes, T.MATCH_RCVBUF) == 1
    record = ledger(changes)[(RMEM, OTHER)]
    assert record["current"] == record["original"] == [4096, 131072, 131072]
    assert record["changes"] == 0


SYN = {BACKLOG: (1024,), SYNCOOKIES: (0,),
       "net.ipv4.tcp_no_metrics_save": (0,), "net.ipv4.tcp_no_ssthresh_metrics_save": (0,),
       "net.core.high_order_alloc_disable": (0,), "net.ipv4.tcp_mem": (10, 20, 30)}


def syn_window(tuner: T, kernel: Kernel, counters: dict[str, int], *, at_syn_backlog: int = 0,
               at_listen_backlog: int = 0, cookies: int = 0, accepted: int = 0,
               reported: bool = True) -> None:
    """One window of SYN trouble in the namespace: the BPF side reports its SYN queue at a
    limit (unless ``reported`` is False: a window that follows one with refused SYNs needs
    no report), the kernel counts what it refused and accepted, and the window's ticks
    pass."""
    if reported:
        (old,) = kernel.value(BACKLOG)
        tuner.handle(event(T.MAX_SYN_BACKLOG, T.SYN_BACKLOG_INCREASE, (old,), (old,),
                           metric=193))
    counters["TcpExt:ListenDrops"] += at_syn_backlog + at_listen_backlog
    counters["TcpExt:TCPReqQFullDrop"] += at_listen_backlog
    counters["TcpExt:TCPReqQFullDoCookies"] += cookies
    counters["TcpExt:SyncookiesSent"] += cookies
    counters["Tcp:PassiveOpens"] += accepted
    for _ in range(tcp_buffer.SYN_WINDOW_TICKS):
        tuner.tick(0.0)


def exhaust_memory(tuner: T) -> None:
    """TCP memory is global: the BPF side reports it for the global netns."""
    tuner.handle(event(T.MEM, T.MEM_EXHAUSTION, (10, 20, 30), (10, 20, 37), cookie=GLOBAL))


@pytest.fixture
def counters(monkeypatch):
    c = {"Tcp:PassiveOpens": 0, "TcpExt:ListenDrops": 0, "TcpExt:ListenOverflows": 0,
         "TcpExt:TCPReqQFullDrop": 0, "TcpExt:TCPReqQFullDoCookies": 0,
         "TcpExt:SyncookiesRecv": 0, "TcpExt:SyncookiesFailed": 0, "TcpExt:SyncookiesSent": 0}
    monkeypatch.setattr(procnet, "counters", lambda: dict(c))
    return c


@pytest.mark.parametrize(("at_syn_backlog", "accepted", "increases", "decreases"), [
    (500, 200, 5, 0),  # clients retry dropped SYNs and are accepted: a busy server
    (800, 100, 0, 5),  # one accepted per 8 refused (upstream: r = 0.97, legitimate)
    (3000, 0, 0, 5),  # nothing accepted: an attack
])
def test_syn_backlog_follows_connection_acceptance(tuned, counters, at_syn_backlog, accepted,
                                                   increases, decreases):
    tuner, changes, kernel = tuned(dict(SYN))
    seen = []
    for _ in range(5):
        syn_window(tuner, kernel, counters, at_syn_backlog=at_syn_backlog, accepted=accepted)
        seen.append(kernel.value(BACKLOG)[0])
    assert counted(changes, T.SYN_BACKLOG_INCREASE) == increases
    assert counted(changes, T.SYN_BACKLOG_DECREASE) == decreases
    if increases:
        assert seen == [1280, 1600, 2000, 2500, 3125]  # one step per window
    else:
        assert seen == [768, 576, 432, 324, 243]


def test_a_reported_syn_queue_is_judged_after_its_window(tuned, counters):
    tuner, _, kernel = tuned(dict(SYN))
    (old,) = kernel.value(BACKLOG)
    tuner.handle(event(T.MAX_SYN_BACKLOG, T.SYN_BACKLOG_INCREASE, (old,), (old,), metric=193))
    counters["TcpExt:ListenDrops"] += 3000
    for _ in range(tcp_buffer.SYN_WINDOW_TICKS - 1):
        tuner.tick(0.0)
    assert kernel.value(BACKLOG) == (1024,)
    tuner.tick(0.0)
    assert kernel.value(BACKLOG) == (768,)


def test_syn_windows_go_on_while_syns_are_refused_and_end_after(tuned, counters):
    tuner, _, kernel = tuned(dict(SYN))
    syn_window(tuner, kernel, counters, at_syn_backlog=3000)
    syn_window(tuner, kernel, counters, at_syn_backlog=3000, reported=False)
    assert kernel.value(BACKLOG) == (576,)
    assert tuner.table_sizes()["syn_windows"] == 1
    syn_window(tuner, kernel, counters, reported=False)  # the flood is over
    assert tuner.table_sizes()["syn_windows"] == 0
    syn_window(tuner, kernel, counters, at_syn_backlog=3000, reported=False)  # unreported
    assert kernel.value(BACKLOG) == (576,)


@pytest.mark.parametrize(("refused", "accepted", "backlog"), [
    (3000, 0, 768),  # a flood against a listener whose listen() backlog is the limit
    (500, 200, 1024),  # legitimate: a bigger tcp_max_syn_backlog would not help
])
def test_syns_refused_at_a_listen_backlog(tuned, counters, refused, accepted, backlog):
    tuner, changes, kernel = tuned(dict(SYN))
    syn_window(tuner, kernel, counters, at_listen_backlog=refused, accepted=accepted)
    assert kernel.value(BACKLOG) == (backlog,)
    assert counted(changes, T.SYN_BACKLOG_INCREASE) == 0


def test_a_few_refused_syns_are_no_attack(tuned, counters):
    tuner, _, kernel = tuned(dict(SYN))
    syn_window(tuner, kernel, counters, at_syn_backlog=tcp_buffer.SYN_ATTACK_MIN_REFUSED - 1)
    assert kernel.value(BACKLOG) == (1024,)  # nor grown: nothing was accepted


def test_syn_backlog_stops_at_its_ceiling_and_floor(tuned, counters):
    tuner, _, kernel = tuned(dict(SYN, **{BACKLOG: (250000,)}))
    syn_window(tuner, kernel, counters, at_syn_backlog=500, accepted=200)  # proposes 312500
    assert kernel.value(BACKLOG) == (262144,)  # 2^18
    syn_window(tuner, kernel, counters, at_syn_backlog=500, accepted=200)
    assert kernel.value(BACKLOG) == (262144,)
    tuner, changes, kernel = tuned(dict(SYN, **{BACKLOG: (150,)}))
    syn_window(tuner, kernel, counters, at_syn_backlog=3000)  # one step would be 113
    assert kernel.value(BACKLOG) == (128,)
    syn_window(tuner, kernel, counters, at_syn_backlog=3000)
    assert kernel.value(BACKLOG) == (128,)
    assert counted(changes, T.SYN_BACKLOG_DECREASE) == 1


@pytest.mark.parametrize("low_memory", [True, False])
def test_syncookies_are_enabled_under_syn_flood_in_low_memory(tuned, counters, monkeypatch,
                                                              low_memory):
    monkeypatch.setattr(procnet, "memory_pages", lambda protocol: 30)  # still at the limit
    tuner, changes, kernel = tuned(dict(SYN))
    if low_memory:
        exhaust_memory(tuner)
        assert kernel.value("net.ipv4.tcp_no_metrics_save", GLOBAL) == (1,)
    syn_window(tuner, kernel, counters, at_syn_backlog=500, accepted=200)
    if low_memory:  # syncookies rather than more memory for half-open connections
        assert kernel.value(SYNCOOKIES) == (1,)
        assert counted(changes, T.ENABLE_SYNCOOKIES) == 1
        assert counted(changes, T.SYN_BACKLOG_INCREASE) == 0
        assert kernel.value(BACKLOG) == (1024,)
    else:
        assert kernel.value(SYNCOOKIES) == (0,)
        assert kernel.value(BACKLOG) == (1280,)
        assert counted(changes, T.ENABLE_SYNCOOKIES) == 0


def syncookies_after(tuned, counters, before_first_flood: dict[str, int],
                     after_first_flood: dict[str, int]) -> tuple[int, ...]:
    """Syncookies on; counters grow by ``before_first_flood``, a flood is seen, they grow by
    ``after_first_flood`` in its window: is tcp_syncookies still on?"""
    tuner, changes, kernel = tuned(dict(SYN, **{SYNCOOKIES: (1,)}))
    counters.update({k: 0 for k in counters})
    for k, v in before_first_flood.items():
        counters[f"TcpExt:Syncookies{k}"] += v
    (old,) = kernel.value(BACKLOG)
    tuner.handle(event(T.MAX_SYN_BACKLOG, T.SYN_BACKLOG_INCREASE, (old,), (old,), metric=5))
    for k, v in after_first_flood.items():
        counters[f"TcpExt:Syncookies{k}"] += v
    counters["TcpExt:TCPReqQFullDoCookies"] += after_first_flood.get("Sent", 0) or 100
    syn_window(tuner, kernel, counters, reported=False)
    assert kernel.value(BACKLOG) == (1024,)  # with syncookies on, the backlog is not tuned
    assert counted(changes, T.DISABLE_SYNCOOKIES) == (kernel.value(SYNCOOKIES) == (0,))
    return kernel.value(SYNCOOKIES)


INEFFECTIVE = {"Sent": 2000, "Failed": 2000, "Recv": 0}


def test_syncookies_are_disabled_when_sent_and_never_validated(tuned, counters):
    assert syncookies_after(tuned, counters, {}, INEFFECTIVE) == (0,)
    assert syncookies_after(tuned, counters, {}, {"Sent": 1024, "Failed": 1024}) == (0,)


@pytest.mark.parametrize(("before", "after"), [
    pytest.param(INEFFECTIVE, {}, id="failures-before-the-first-flood"),
    pytest.param({}, dict(INEFFECTIVE, Sent=0), id="failures-without-cookies-sent"),
    pytest.param({}, dict(INEFFECTIVE, Recv=1), id="one-cookie-validated"),
    pytest.param({}, {"Sent": 1023, "Failed": 1023}, id="below-the-threshold"),
])
def test_syncookies_stay_on_unless_shown_ineffective_since_the_first_flood(
        tuned, counters, before, after):
    # Baseline: the ineffective case, counted from the first flood, turns them off ...
    assert syncookies_after(tuned, counters, {}, INEFFECTIVE) == (0,)
    # ... and this one difference keeps them on.
    assert syncookies_after(tuned, counters, before, after) == (1,)


def test_leaving_low_memory_undoes_only_what_entering_did(tuned, counters, monkeypatch):
    admin = {"net.ipv4.tcp_no_ssthresh_metrics_save": (1,)}  # the administrator's choice
    tuner, changes, kernel = tuned(dict(SYN, **admin))
    exhaust_memory(tuner)
    entered = {n: kernel.value(n, GLOBAL) for n in (*SYN, *admin)}
    assert entered["net.ipv4.tcp_no_metrics_save"] == (1,)
    assert entered["net.core.high_order_alloc_disable"] == (1,)
    assert entered[BACKLOG] == (768,)
    monkeypatch.setattr(procnet, "memory_pages", lambda protocol: 0)
    monkeypatch.setattr(procnet, "tcp_under_memory_pressure", lambda: False)
    for now in range(tcp_buffer.CALM_TICKS - 1):
        tuner.tick(float(now))
    assert {n: kernel.value(n, GLOBAL) for n in entered} == entered  # not calm long enough
    tuner.tick(float(tcp_buffer.CALM_TICKS))
    assert kernel.value("net.ipv4.tcp_no_metrics_save", GLOBAL) == (0,)
    assert kernel.value("net.core.high_order_alloc_disable", GLOBAL) == (0,)
    assert kernel.value("net.ipv4.tcp_no_ssthresh_metrics_save", GLOBAL) == (1,)
    assert kernel.value(BACKLOG, GLOBAL) == (1024,)
    assert counted(changes, T.LEAVE_LOW_MEMORY) == 3


def test_low_memory_lasts_while_the_kernel_reports_memory_pressure(tuned, counters,
                                                                    monkeypatch):
    """tcp_mem grown under a load leaves use below the new pressure value though the load
    goes on: the settings stay while the kernel keeps TCP in memory-pressure mode."""
    tuner, _, kernel = tuned(SYN)
    exhaust_memory(tuner)
    assert kernel.value("net.ipv4.tcp_no_metrics_save", GLOBAL) == (1,)
    monkeypatch.setattr(procnet, "memory_pages", lambda protocol: 0)
    monkeypatch.setattr(procnet, "tcp_under_memory_pressure", lambda: True)
    for now in range(3 * tcp_buffer.CALM_TICKS):
        tuner.tick(float(now))
    assert kernel.value("net.ipv4.tcp_no_metrics_save", GLOBAL) == (1,)
    monkeypatch.setattr(procnet, "tcp_under_memory_pressure", lambda: False)
    for now in range(tcp_buffer.CALM_TICKS):
        tuner.tick(float(now))
    assert kernel.value("net.ipv4.tcp_no_metrics_save", GLOBAL) == (0,)
