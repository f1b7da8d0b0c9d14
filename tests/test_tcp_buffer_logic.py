"""tcp_buffer's decisions, driven with synthetic events (the kernel side is tested in
test_tcp_buffer.py with real traffic)."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest

from bpftune import procnet
from bpftune.correlation import Correlations
from bpftune.events import Event
from bpftune.learning import LearningRate
from bpftune.tuners.tcp_buffer import TcpBufferTuner as T

COOKIE = 4242


class Recorder:
    """Stands in for the engine's change path: applies changes to a dict of values."""

    def __init__(self, values: dict[str, tuple]) -> None:
        self.values = values
        self.calls: list[tuple[str, int, tuple]] = []

    def apply(self, tuner, tunable, scenario, cookie, new, reason, *, expect=None):
        if expect is not None and self.values[tunable.name] != expect:
            return False
        if self.values[tunable.name] == new:
            return False
        self.values[tunable.name] = new
        self.calls.append((tunable.name, scenario, new))
        return True

    def read(self, tunable, cookie=0):
        return self.values[tunable.name]


def make_tuner(values: dict[str, tuple]) -> tuple[T, Recorder]:
    changes = Recorder(values)
    engine = SimpleNamespace(changes=changes, correlations=Correlations(),
                             learning_rate=LearningRate(4),
                             namespaces=SimpleNamespace(entered=lambda c: contextlib.nullcontext()))
    tuner = T(engine, 0)
    tuner.init()
    return tuner, changes


def event(tunable_id: int, scenario: int, old, new, metric: int = 0) -> Event:
    e = Event(tuner_id=0, scenario_id=scenario, netns_cookie=COOKIE, tunable_id=tunable_id)
    e.old[:len(old)] = old
    e.new[:len(new)] = new
    e.metric[0] = metric
    return e


def grow_rmem(tuner: T, rtt: int) -> None:
    old = tuner.engine.changes.values["net.ipv4.tcp_rmem"]
    new = (old[0], old[1], tuner.engine.learning_rate.grow(old[2]))
    tuner.handle(event(T.RMEM, T.NEED_INCREASE, old, new, metric=rtt))


def test_growth_correlated_with_latency_is_reversed_and_held():
    tuner, changes = make_tuner({"net.ipv4.tcp_rmem": (4096, 131072, 131072),
                                 "net.ipv4.tcp_moderate_rcvbuf": (0,)})
    for i in range(9):  # latency rises with every increase
        grow_rmem(tuner, rtt=100 + 50 * i)
    assert [c[1] for c in changes.calls].count(T.NEED_INCREASE) == 9
    assert ("net.ipv4.tcp_moderate_rcvbuf", T.MATCH_RCVBUF, (1,)) in changes.calls
    grown = changes.values["net.ipv4.tcp_rmem"][2]
    grow_rmem(tuner, rtt=600)  # tenth sample: correlation is now clear
    name, scenario, new = changes.calls[-1]
    assert (name, scenario) == ("net.ipv4.tcp_rmem", T.LATENCY)
    assert new[2] == LearningRate(4).shrink(grown)
    before = len(changes.calls)
    grow_rmem(tuner, rtt=100)  # growth is held off after a latency decrease
    assert len(changes.calls) == before


def test_uncorrelated_latency_keeps_growing():
    tuner, changes = make_tuner({"net.ipv4.tcp_rmem": (4096, 131072, 131072),
                                 "net.ipv4.tcp_moderate_rcvbuf": (1,)})
    for i in range(20):
        grow_rmem(tuner, rtt=(100, 300)[i % 2])
    assert all(c[1] == T.NEED_INCREASE for c in changes.calls)
    assert len(changes.calls) == 20


def test_stale_proposal_is_dropped():
    tuner, changes = make_tuner({"net.ipv4.tcp_wmem": (4096, 16384, 40000)})
    tuner.handle(event(T.WMEM, T.NEED_INCREASE, (4096, 16384, 32000), (4096, 16384, 40000)))
    assert changes.calls == []


SYN = {"net.ipv4.tcp_max_syn_backlog": (1024,), "net.ipv4.tcp_syncookies": (0,),
       "net.ipv4.tcp_no_metrics_save": (0,), "net.ipv4.tcp_no_ssthresh_metrics_save": (0,),
       "net.core.high_order_alloc_disable": (0,), "net.ipv4.tcp_mem": (10, 20, 30)}


def syn_event(tuner: T) -> Event:
    (old,) = tuner.engine.changes.values["net.ipv4.tcp_max_syn_backlog"]
    return event(T.MAX_SYN_BACKLOG_ID, T.SYN_BACKLOG_INCREASE, (old,), (old + old // 4,))


@pytest.fixture
def counters(monkeypatch):
    c = {"Tcp:PassiveOpens": 0, "TcpExt:SyncookiesRecv": 0, "TcpExt:SyncookiesFailed": 0,
         "TcpExt:SyncookiesSent": 0}
    monkeypatch.setattr(procnet, "counters", lambda: dict(c))
    return c


def test_syn_backlog_grows_while_connections_are_accepted(counters):
    tuner, changes = make_tuner(dict(SYN))
    for _ in range(15):
        counters["Tcp:PassiveOpens"] += 10
        tuner.handle(syn_event(tuner))
    assert {c[1] for c in changes.calls} == {T.SYN_BACKLOG_INCREASE}
    assert changes.values["net.ipv4.tcp_max_syn_backlog"][0] > 1024


def test_syn_backlog_shrinks_when_floods_are_not_accepted(counters):
    tuner, changes = make_tuner(dict(SYN))
    for _ in range(15):  # SYNs keep coming, nothing is accepted: an attack
        tuner.handle(syn_event(tuner))
    assert changes.calls[-1][1] == T.SYN_BACKLOG_DECREASE


def test_syncookies_enabled_under_low_memory_and_disabled_when_ineffective(counters):
    tuner, changes = make_tuner(dict(SYN))
    tuner.handle(event(T.MEM, T.MEM_EXHAUSTION, (10, 20, 30), (10, 20, 37)))
    assert changes.values["net.ipv4.tcp_no_metrics_save"] == (1,)
    tuner.handle(syn_event(tuner))
    assert changes.calls[-1] == ("net.ipv4.tcp_syncookies", T.ENABLE_SYNCOOKIES, (1,))
    counters["TcpExt:SyncookiesFailed"] = 5000  # before bpftune saw a flood: not counted
    tuner.handle(syn_event(tuner))
    assert changes.calls[-1][1] == T.ENABLE_SYNCOOKIES
    counters["TcpExt:SyncookiesFailed"] += 2000  # failures without cookies sent: spoofed
    tuner.handle(syn_event(tuner))
    assert changes.calls[-1][1] == T.ENABLE_SYNCOOKIES
    counters["TcpExt:SyncookiesSent"] += 2000  # sent, and none came back valid
    tuner.handle(syn_event(tuner))
    assert changes.calls[-1] == ("net.ipv4.tcp_syncookies", T.DISABLE_SYNCOOKIES, (0,))


def test_leaving_low_memory_undoes_only_what_entering_did(counters, monkeypatch):
    values = dict(SYN, **{"net.ipv4.tcp_no_ssthresh_metrics_save": (1,)})  # admin's choice
    tuner, changes = make_tuner(values)
    tuner.handle(event(T.MEM, T.MEM_EXHAUSTION, (10, 20, 30), (10, 20, 37)))
    monkeypatch.setattr(procnet, "tcp_memory_pages", lambda: 0)
    for now in range(10):
        tuner.tick(float(now))
    assert values["net.ipv4.tcp_no_metrics_save"] == (0,)
    assert values["net.core.high_order_alloc_disable"] == (0,)
    assert values["net.ipv4.tcp_no_ssthresh_metrics_save"] == (1,)
    assert values["net.ipv4.tcp_max_syn_backlog"] == (1024,)
    assert T.LEAVE_LOW_MEMORY in {c[1] for c in changes.calls}
