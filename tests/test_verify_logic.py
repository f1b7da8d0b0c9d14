"""Verified changes without traffic: the statistics (judge), the windows, the verifier with a
fake sampler, and Changes.revert and the hold on real sysctls in a test namespace."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bpftune.changes import Changes, StateFile
from bpftune.netns import Namespaces
from bpftune.tuners.tcp_buffer import SRTT, TcpBufferTuner
from bpftune.verify import (
    ARP_REFUSALS,
    GLOBAL,
    MAX_SAMPLED,
    NEWEST_SAMPLED,
    RETRANS,
    Figure,
    History,
    Sampler,
    Tick,
    Verifier,
    VerifyError,
    Windows,
    judge,
)
from helpers import read_sysctl, values, write_sysctl

RMEM = TcpBufferTuner.RMEM
W = Windows(before=4, after=4, grace=1, min_active=2)


def ticks(values_: list[float], per: float = 1000, active: bool = True) -> list[Tick]:
    """Ticks whose figure is ``v`` (per segment) with ``per`` segments each."""
    return [Tick(v * per, per, active) for v in values_]


@pytest.mark.parametrize("before, after, status", [
    ([0.0, 0.0, 0.0, 0.0], [0.05, 0.05, 0.04, 0.05], "worse"),  # a clear rise
    ([0.02, 0.04, 0.02, 0.04], [0.05, 0.04, 0.05, 0.04], "ok"),  # within 3 sigma
    ([0.0, 0.0, 0.0, 0.0], [0.004, 0.004, 0.004, 0.004], "ok"),  # below the floor
])
def test_judge_needs_a_rise_past_the_spread_and_the_floors(before, after, status):
    assert judge(ticks(before), ticks(after), RETRANS, W).status == status


def test_judge_needs_enough_events_and_activity():
    # 9 retransmits in all: past the floor but fewer than min_events
    few = [Tick(3, 60, True)] * 3
    assert judge(ticks([0.0] * 4), few, RETRANS, W).status == "ok"
    idle = ticks([0.0] * 4, active=False)
    assert judge(ticks([0.0] * 4), idle, RETRANS, W).reason == "no traffic after the change"
    assert judge(idle, ticks([0.05] * 4), RETRANS, W).reason.startswith("no baseline")


def test_judge_falls_back_on_the_long_run_history():
    history = History()
    for _ in range(40):
        history.add(0.0)
    idle = ticks([0.0] * 4, active=False)
    outcome = judge(idle, ticks([0.05] * 4), RETRANS, W, history)
    assert outcome.status == "worse" and outcome.before == 0.0


def test_judge_a_down_figure():
    rate = Figure("rate", "snmp", ("n",), ("d",), worse="down", floor_rel=0.2)
    assert judge(ticks([1.0] * 4), ticks([0.5] * 4), rate, W).status == "worse"
    assert judge(ticks([1.0] * 4), ticks([0.9] * 4), rate, W).status == "ok"


def test_windows_from_the_environment():
    w = Windows.from_env("before=3,after=5,grace=1,hold=30,min_active=2")
    assert (w.before, w.after, w.grace, w.hold, w.min_active) == (3, 5, 1, 30.0, 2)
    assert Windows.from_env("") == Windows()
    assert [w.hold_for(n) for n in (1, 2, 3)] == [30, 60, 120]
    assert Windows().hold_for(5) == 3600
    for bad in ("before=x", "nope=1", "after=0", "grace=1.5", "hold=-1"):
        with pytest.raises(VerifyError, match="BPFTUNE_TEST_VERIFY"):
            Windows.from_env(bad)


class FakeNamespaces:
    def is_global(self, cookie):
        return cookie == 0

    def name(self, cookie):
        return "global" if cookie == 0 else f"cookie-{cookie}"

    def entered(self, cookie):
        import contextlib
        return contextlib.nullcontext()

    def newest(self, count):
        return []


class FakeChanges:
    """What the verifier asks of Changes: live values, revert, audit."""

    def __init__(self) -> None:
        self.namespaces = FakeNamespaces()
        self.live: dict = {}
        self.reverts: list = []
        self.audited: list = []

    def read(self, tunable, cookie):
        return self.live[(tunable.name, cookie)]

    def revert(self, tuner, tunable, where, to, expect, evidence, scenario):
        self.reverts.append((tunable.name, where, to, expect, evidence))
        self.live[(tunable.name, where)] = to
        return True

    def _audit(self, kind, tuner, tunable, cookie, **fields):
        self.audited.append((kind, tunable, cookie, fields, tuner))


class Counters:
    """Cumulative counters the fake sampler reads: segments and retransmits per tick."""

    def __init__(self) -> None:
        self.out = self.retrans = 0

    def step(self, segments: int, retransmits: int) -> None:
        self.out += segments
        self.retrans += retransmits

    def read(self, keys: set[str]) -> dict[str, int]:
        return {"Tcp:OutSegs": self.out, "Tcp:RetransSegs": self.retrans}


def fake_tuner(name="tcp_buffer"):
    t = SimpleNamespace(name=name, scenarios=TcpBufferTuner.scenarios, reverted_calls=[])
    t.figures = lambda tunable, scenario: TcpBufferTuner.figures(t, tunable, scenario)
    t.reverted = lambda tunable, cookie: t.reverted_calls.append((tunable.name, cookie))
    return t


def verifier(counters: Counters) -> tuple[Verifier, FakeChanges]:
    changes = FakeChanges()
    sampler = Sampler(changes.namespaces, [RETRANS], W, readers={"snmp": counters.read},
                      packets=None)
    return Verifier(changes, [RETRANS], W, sampler), changes


def run(v: Verifier, counters: Counters, n: int, segments: int, retransmits: int) -> None:
    for _ in range(n):
        counters.step(segments, retransmits)
        v.tick(float(v.sampler.index + 1))


def test_verifier_reverts_a_series_to_its_first_value_and_keeps_the_window():
    c = Counters()
    v, changes = verifier(c)
    tuner, cookie = fake_tuner(), 7
    v.warm(cookie)
    run(v, c, 5, 1000, 0)
    start = v.sampler.index
    v.changed(tuner, RMEM, 0, cookie, cookie, (1, 2, 3), (1, 2, 4))
    run(v, c, 2, 1000, 0)
    v.changed(tuner, RMEM, 0, cookie, cookie, (1, 2, 4), (1, 2, 5))  # joins the series
    changes.live[(RMEM.name, cookie)] = (1, 2, 5)
    assert v.open[(RMEM.name, cookie)].start == start
    run(v, c, 4, 1000, 50)
    assert changes.reverts == [(RMEM.name, cookie, (1, 2, 3), (1, 2, 5),
                                changes.reverts[0][4])]
    assert "retransmits/segment 0.0000±0.0000 -> 0.0500" in changes.reverts[0][4]
    assert v.counts[("tcp_buffer", "reverted")] == 1 and not v.open
    assert tuner.reverted_calls == [(RMEM.name, cookie)]
    assert changes.audited[-1][0] == "verdict"
    assert changes.audited[-1][3]["verdict"] == "reverted"


def test_verifier_keeps_a_harmless_change_and_unverified_scenarios_end_at_once():
    c = Counters()
    v, changes = verifier(c)
    tuner = fake_tuner()
    run(v, c, 5, 1000, 0)
    latency = TcpBufferTuner.scenarios.index(TcpBufferTuner.LATENCY)
    v.changed(tuner, RMEM, latency, 0, 0, (1, 2, 3), (1, 2, 2))
    assert not v.open and v.counts[("tcp_buffer", "inconclusive")] == 1
    assert changes.audited[-1][3]["reason"] == ("not verified: the scenario trades a figure "
                                                "on purpose or undoes an emergency")
    v.changed(tuner, RMEM, 0, 0, 0, (1, 2, 3), (1, 2, 4))
    changes.live[(RMEM.name, 0)] = (1, 2, 4)
    run(v, c, 7, 1000, 0)
    assert v.counts[("tcp_buffer", "kept")] == 1 and not changes.reverts


def test_verifier_inconclusive_cases():
    c = Counters()
    v, changes = verifier(c)
    tuner = fake_tuner()
    run(v, c, 5, 1000, 0)
    for cookie in (0, 5, 6, 8):
        v.warm(cookie)
        changes.live[(RMEM.name, cookie)] = (1, 2, 4)
        v.changed(tuner, RMEM, 0, cookie, cookie, (1, 2, 3), (1, 2, 4))
    v.cancel("tcp_buffer", 5, "handed over to the administrator")
    v.forget_netns(6)
    v.changed(fake_tuner("other"), RMEM, 0, 8, 8, (1, 2, 4), (1, 2, 9))  # superseded
    changes.live[(RMEM.name, 0)] = (9, 9, 9)  # an administrator's write
    run(v, c, 7, 1000, 0)
    reasons = {a[2]: a[3]["reason"] for a in changes.audited if a[4] == "tcp_buffer"}
    assert reasons[5] == "handed over to the administrator"
    assert reasons[6] == "namespace gone"
    assert reasons[8] == "superseded by another change"
    assert reasons[0].startswith("value changed by someone else")
    assert v.counts[("tcp_buffer", "inconclusive")] == 4 and not changes.reverts
    assert 6 not in v.sampler.rings and not v.open


def test_idle_after_window_is_inconclusive():
    c = Counters()
    v, changes = verifier(c)
    run(v, c, 5, 1000, 0)
    changes.live[(RMEM.name, 0)] = (1, 2, 4)
    v.changed(fake_tuner(), RMEM, 0, 0, 0, (1, 2, 3), (1, 2, 4))
    run(v, c, 7, 0, 0)
    assert changes.audited[-1][3]["reason"] == "no traffic after the change"


def test_a_quiet_host_samples_only_open_verifications_and_unpacketed_figures():
    c, packets = Counters(), [0]
    changes = FakeChanges()
    neigh = {"arp_cache:table_fulls": 0, "arp_cache:allocs": 0}
    sampler = Sampler(changes.namespaces, [RETRANS, ARP_REFUSALS], W,
                      readers={"snmp": c.read, "neigh": lambda keys: dict(neigh)},
                      packets=lambda: packets[0])
    v = Verifier(changes, [RETRANS, ARP_REFUSALS], W, sampler)
    v.warm(7)

    def ticks(n: int, pps: int) -> None:
        for _ in range(n):
            packets[0] += pps
            c.step(1000, 0)
            v.tick(float(sampler.index + 1))

    ticks(3, 5000)  # busy: global and the warm namespace, every figure
    assert [len(sampler.rings[s]) for s in (0, 7)] == [3, 3]
    history = sampler.history[(7, RETRANS.label)].n
    busy_scopes = sampler.scopes
    # quiet: the warm namespace is not read (nor are namespaces listed: that was most of
    # an idle tick's extra cost with 1000 of them), and nothing is forgotten
    sampler.scopes = lambda: pytest.fail("listed every scope on a quiet tick")
    ticks(4, 10)
    sampler.scopes = busy_scopes
    assert len(sampler.rings[7]) == 3
    assert sampler.history[(7, RETRANS.label)].n == history
    # ... while neighbours, which are not packets, are still counted in the global scope
    assert [sorted(s.counters) for s in list(sampler.rings[0])[-4:]] == [sorted(neigh)] * 4
    changes.live[(RMEM.name, 7)] = (1, 2, 4)
    v.changed(fake_tuner(), RMEM, 0, 7, 7, (1, 2, 3), (1, 2, 4))
    ticks(2, 10)  # quiet, but a verification is open there
    assert sampler.rings[7][-1].index == sampler.index
    assert "Tcp:OutSegs" in sampler.rings[7][-1].counters


class RttSums:
    """What tcp_buffer's figure_counters gives: cumulative sRTT sums per netns."""

    def __init__(self) -> None:
        self.sums: dict[int, list[int]] = {}
        self.asked: set[tuple[str, int]] = set()

    def step(self, cookie: int, samples: int, srtt_us: int) -> None:
        s = self.sums.setdefault(cookie, [0, 0])
        s[0] += samples * srtt_us
        s[1] += samples

    def read(self, name: str, cookie: int) -> dict[str, int]:
        self.asked.add((name, cookie))
        total, samples = self.sums.get(cookie, (0, 0))
        return {"rtt_sum_us": total, "rtt_samples": samples}


@pytest.mark.parametrize("after_us, verdict", [(2000, "reverted"), (900, "kept")])
def test_srtt_comes_from_the_tuners_counters_and_needs_a_rise_past_1_ms(after_us, verdict):
    c, rtt, cookie = Counters(), RttSums(), 7
    changes = FakeChanges()
    sampler = Sampler(changes.namespaces, [RETRANS, SRTT], W, readers={"snmp": c.read},
                      packets=None, tuner_counters=rtt.read)
    v = Verifier(changes, [RETRANS, SRTT], W, sampler)
    v.warm(cookie)

    def run_rtt(n: int, srtt_us: int) -> None:
        for _ in range(n):
            rtt.step(cookie, 100, srtt_us)
            run(v, c, 1, 1000, 0)

    run_rtt(5, 50)
    changes.live[(RMEM.name, cookie)] = (1, 2, 4)
    v.changed(fake_tuner(), RMEM, 0, cookie, cookie, (1, 2, 3), (1, 2, 4))
    run_rtt(7, after_us)
    assert v.counts[("tcp_buffer", verdict)] == 1
    evidence = changes.audited[-1][3]["evidence"]["sRTT us"]
    assert (evidence["before"], evidence["after"]) == (50, after_us)
    assert evidence["limit"] == 1050  # the floor: 1 ms over the mean before
    if verdict == "reverted":
        assert f"sRTT us 50.0±0.0 -> {after_us:.1f} (limit 1050.0)" in changes.reverts[0][4]
    # only the tuner the figure names is asked, in each sampled scope
    assert rtt.asked == {("tcp_buffer", 0), ("tcp_buffer", cookie)}


def test_tcp_buffer_reads_srtt_sums_from_its_map_and_forgets_a_netns():
    """figure_counters: the global scope is the global netns's cookie; a netns without
    samples yet counts from zero; netns_destroyed deletes the netns's entry."""
    class Map(dict):
        Key = int

    rtt = Map({1: SimpleNamespace(sum_us=500, samples=10),
               9: SimpleNamespace(sum_us=30, samples=1)})
    tuner = TcpBufferTuner.__new__(TcpBufferTuner)
    tuner.bpf = {"netns_rtt": rtt}
    tuner.engine = SimpleNamespace(namespaces=SimpleNamespace(global_cookie=1))
    tuner.growth_held_until, tuner.low_memory_undo = {}, {}
    tuner.syn_windows, tuner.syncookie_baseline = {}, {}
    assert tuner.figure_counters(0) == {"rtt_sum_us": 500, "rtt_samples": 10}
    assert tuner.figure_counters(5) == {"rtt_sum_us": 0, "rtt_samples": 0}
    tuner.netns_destroyed(9)
    tuner.netns_destroyed(5)  # none there: no error
    assert list(rtt) == [1]
    tuner.bpf = None
    assert tuner.figure_counters(0) == {}


def test_a_subject_is_judged_on_its_tuners_counters_and_undone_by_the_tuner():
    """tcp_conn's switch of one host to BBR: figures of scope "subject" read from the
    tuner's counters for (netns, host), no live value, the tuner's undo (its hold)."""
    from bpftune.tuners.tcp_conn import DELIVERY_RATE, MIN_RTT, TcpConnTuner

    c, sums, host = Counters(), {}, (7, "10.0.0.1")

    def counters(name: str, scope) -> dict[str, int]:
        assert name == "tcp_conn"
        closed, rate, rtt = sums.get(scope, (0, 0, 0))
        return {"closed": closed, "rate_sum": rate, "rtt_sum": rtt} if scope == host else {}

    def connections(n: int, rate: int, rtt: int) -> None:
        closed, total, rtts = sums.get(host, (0, 0, 0))
        sums[host] = (closed + n, total + n * rate, rtts + n * rtt)

    changes = FakeChanges()
    figures = [RETRANS, DELIVERY_RATE, MIN_RTT]
    sampler = Sampler(changes.namespaces, figures, W, readers={"snmp": c.read}, packets=None,
                      tuner_counters=counters)
    v = Verifier(changes, figures, W, sampler)
    v.warm(host)
    tuner = SimpleNamespace(name="tcp_conn", scenarios=TcpConnTuner.scenarios, undone=[])
    tuner.figures = lambda tunable, scenario: TcpConnTuner.figures(tuner, tunable, scenario)
    tuner.undo = lambda verification, evidence: tuner.undone.append(
        (verification.key, evidence)) or True
    for _ in range(5):
        connections(2, 100_000_000, 50)
        run(v, c, 1, 1000, 0)
    scenario = TcpConnTuner.scenarios.index(TcpConnTuner.BBR_ON_LOSS)
    v.changed(tuner, TcpConnTuner.PER_SOCKET, scenario, 7, 7, "cubic", "bbr",
              subject="10.0.0.1")
    key = ("TCP congestion control", 7, "10.0.0.1")
    assert list(v.open) == [key]
    for _ in range(7):
        connections(2, 10_000_000, 60)
        run(v, c, 1, 1000, 0)
    ((undone_key, evidence),) = tuner.undone
    assert undone_key == key
    assert "delivery rate MB/s 100.0±0.0 -> 10.0 (limit 80.0)" in evidence
    assert "min RTT us 50.0±0.0 -> 60.0" in evidence  # within its floor
    assert v.counts[("tcp_conn", "reverted")] == 1 and v.last[key].verdict == "reverted"
    assert not changes.reverts  # no sysctl to revert
    kind, _tunable, cookie, fields, _ = changes.audited[-1]
    assert (kind, cookie, fields["subject"], fields["verdict"]) == ("verdict", 7, "10.0.0.1",
                                                                    "reverted")
    v.forget_netns(7)  # the namespace goes, and its hosts with it
    assert host not in sampler.rings and host not in sampler.recent_subjects and key not in v.last


def test_revert_restores_keeps_the_original_and_holds(ns_changes):
    changes, tuner, cookie, ns, _ = ns_changes
    assert changes.apply(tuner, RMEM, 0, cookie, (4096, 131072, 262144), "{old} {new}")
    assert changes.revert(tuner, RMEM, cookie, (4096, 131072, 131072),
                          (4096, 131072, 262144), "evidence")
    assert values(read_sysctl(RMEM.name, ns)) == [4096, 131072, 131072]
    record = changes.records[(RMEM.name, cookie)]
    assert record.original == record.current == [4096, 131072, 131072]
    assert record.changes == 2
    assert 590 < changes.held_for((RMEM.name, cookie)) <= 600
    # held: no change of it in that namespace, whatever the tuner
    assert not changes.apply(tuner, RMEM, 0, cookie, (4096, 131072, 262144), "{old} {new}")
    other = SimpleNamespace(name="other", scenarios=TcpBufferTuner.scenarios)
    assert not changes.apply(other, RMEM, 0, cookie, (4096, 131072, 262144), "{old} {new}")
    changes.rollback()  # nothing to undo: current is the original
    assert values(read_sysctl(RMEM.name, ns)) == [4096, 131072, 131072]
    # a second revert doubles the hold; -E (hand_back) clears the tuner's holds there
    changes.held[(RMEM.name, cookie)].until = 0
    assert changes.apply(tuner, RMEM, 0, cookie, (4096, 131072, 262144), "{old} {new}")
    assert changes.revert(tuner, RMEM, cookie, (4096, 131072, 131072),
                          (4096, 131072, 262144), "evidence")
    assert 1190 < changes.held_for((RMEM.name, cookie)) <= 1200
    changes.hand_back("tcp_buffer", cookie)
    assert changes.held_for((RMEM.name, cookie)) == 0


def test_revert_is_refused_when_an_administrator_changed_the_value(ns_changes):
    changes, tuner, cookie, ns, _ = ns_changes
    assert changes.apply(tuner, RMEM, 0, cookie, (4096, 131072, 262144), "{old} {new}")
    write_sysctl(RMEM.name, "4096 131072 300000", ns)
    assert not changes.revert(tuner, RMEM, cookie, (4096, 131072, 131072),
                              (4096, 131072, 262144), "evidence")
    assert values(read_sysctl(RMEM.name, ns)) == [4096, 131072, 300000]
    assert changes.held_for((RMEM.name, cookie)) == 0


def test_no_verifier_in_advice_mode(tmp_path):
    namespaces = Namespaces()
    try:
        changes = Changes(namespaces, StateFile(str(tmp_path)), advise=True)
        assert changes.verifier is None
    finally:
        namespaces.close()


def test_sampled_scopes_are_global_and_the_newest_namespaces_up_to_the_cap():
    """However many namespaces exist, each tick looks at NEWEST_SAMPLED of them besides
    global, the last found first; Namespaces.newest hands over only those."""
    namespaces = Namespaces()
    try:
        found = [namespaces.global_cookie, *range(1000, 1000 + 3 * MAX_SAMPLED)]
        for cookie in found:  # as registered, in the order found
            namespaces._by_cookie[cookie] = None
        assert namespaces.newest(3) == found[:-4:-1]
        sampler = Sampler(namespaces, [RETRANS], W, readers={}, packets=None)
        assert sampler.scopes() == [GLOBAL, *found[:-NEWEST_SAMPLED - 1:-1]]
    finally:
        namespaces.close()


def test_a_destroyed_namespace_not_yet_forgotten_by_the_verifier_is_not_looked_for(
        monkeypatch):
    """The netns watch thread forgets a destroyed namespace (Namespaces.forget) before the
    engine's lock lets the verifier forget it too. A tick in between is told it is gone
    (Namespaces remembers namespaces destroyed lately): looking for it would walk every
    namespace (50 ms with 1000) and find nothing."""
    namespaces = Namespaces()
    try:
        scans: list[int] = []
        monkeypatch.setattr(namespaces, "_full_scan_allowed", lambda: True)
        monkeypatch.setattr(namespaces, "scan", lambda: scans.append(1) or [])
        sampler = Sampler(namespaces, [RETRANS], W, readers={"snmp": lambda keys: {}},
                          packets=None)
        cookie = namespaces.global_cookie + 1_000_000
        sampler.warm(cookie)
        namespaces._tracked.add(cookie)  # found once, its path gone: it is looked for
        sampler.sample(1.0)
        assert scans == [1] and cookie not in sampler.rings
        namespaces.forget(cookie)  # destroyed
        sampler.sample(2.0)
        assert scans == [1] and cookie not in sampler.rings
    finally:
        namespaces.close()
