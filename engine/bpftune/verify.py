"""Verified changes: after a change, watch the figures it was meant to help or could hurt,
in its namespace, and end it with a verdict: kept, reverted or inconclusive.

Every figure is, per tick, Δnumerator / Δdenominator * scale (per second without a
denominator), so that more or less traffic is not taken for harm. The before window is the
ticks just before the change; the after window starts after the tick of the change and a
grace tick. A figure worsens clearly when its after mean passes its before mean by more than
K per-tick standard deviations and by more than its floors, with enough events behind it.
A clear worsening reverts the change (through ``Changes.revert``) and holds the tunable.
Design: notes/verified-changes-design.md.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

from bpftune import procnet
from bpftune.log import log
from bpftune.netns import NetnsError
from bpftune.sysctl import SysctlError, Value, format_value

if TYPE_CHECKING:
    from bpftune.changes import Changes
    from bpftune.netns import Namespaces
    from bpftune.tuner import Tunable, Tuner

GLOBAL = 0
# What a figure is read in: a namespace (GLOBAL or a netns cookie), or a subject within one
# (netns cookie, name), such as tcp_conn's remote host.
Scope = int | tuple[int, str]
# Namespaces sampled besides the global one and those being verified: a namespace's
# counters take 0.28 ms to read (netstat alone 0.15: the kernel sums them per CPU), so 16
# keep a busy host's sampling near 0.5 % of a CPU (bench: "verified changes: sampler").
MAX_SAMPLED = 16
# Of those, namespaces sampled only for being the newest (no tuner acted there yet): a
# change needs a window before it, and a new container's first change comes soon. Few:
# with 1000 idle namespaces, reading the 16 newest each busy tick made the daemon's CPU
# per new namespace 1.25 times that with none (bench scale).
NEWEST_SAMPLED = 4
# Subjects (tcp_conn's hosts) sampled besides those being verified: a map lookup each, so
# many more, and apart from namespaces (busy hosts must not push out namespaces).
MAX_SUBJECTS = 128
MAX_SUBJECT_VERDICTS = 4096  # last verdicts kept of subjects (hosts), the oldest dropped
# Host-wide packets a second below which only open verifications' namespaces, and the
# global figures whose activity is not packets, are sampled: an idle host pays a few small
# reads a second, not three files per namespace. Most packet figures need 50 or more a
# tick to count; reassembly needs 10 fragments, so a namespace reassembling 10 to 99 a
# second on an otherwise quiet host gets no baseline.
QUIET_PPS = 100
HISTORY_ALPHA = 1 / 60  # long-run mean and variance of a figure, per active tick
HISTORY_MIN_TICKS = 30  # active ticks before the long-run history may stand for a baseline
ENV = "BPFTUNE_TEST_VERIFY"

# Where a figure's counters come from.
SNMP = "snmp"  # /proc/thread-self/net/{netstat,snmp,snmp6} of the scope
SOFTNET = "softnet"  # /proc/net/softnet_stat (global)
SCHED = "sched"  # schedstat or PSI (global)
NEIGH = "neigh"  # /proc/net/stat/{arp,ndisc}_cache (global)
UNPACKETED = frozenset({SCHED, NEIGH})  # sampled on quiet ticks too
# A tuner's own counters (Tuner.figure_counters, e.g. from its BPF maps), per scope: the
# keys are "<tuner name>:<counter>". The only source of figures with scope "subject".
TUNER = "tuner"

# Each reads the counters of its source; given the keys the figures need.
Reader = Callable[[set[str]], dict[str, int]]
# The counters of the tuner named in a scope, without the tuner's name as prefix.
TunerCounters = Callable[[str, Scope], dict[str, int]]
READERS: dict[str, Reader] = {
    SNMP: procnet.thread_counters,
    SOFTNET: lambda _keys: procnet.softnet_totals(),
    SCHED: lambda _keys: procnet.cpu_wait_totals(),
    NEIGH: lambda _keys: procnet.neigh_cache_totals(),
}


@dataclass(frozen=True)
class Figure:
    """A key figure: Σnum / Σper * scale per tick (per second when ``per`` is empty)."""

    label: str
    source: str
    num: tuple[str, ...]
    per: tuple[str, ...] = ()
    scale: float = 1.0
    #: A tick counts (is active) when these keys (default: ``per``) grew by activity_min.
    activity: tuple[str, ...] = ()
    activity_min: float = 0
    #: "netns": the namespace of the change; "global": only global; "subject": what in the
    #: namespace the change was for (Verification.subject), from its tuner's counters
    scope: str = "netns"
    worse: str = "up"  # "up": a rise is harm; "down": a fall is
    floor: float = 0.0  # the least change that can count as clear, absolute...
    floor_rel: float = 0.0  # ...and relative to the before mean
    min_events: float = 0  # Σnum over the after window needed for a clear worsening

    def keys(self) -> set[str]:
        return {*self.num, *self.per, *self.activity}

    def tick(self, prev: dict[str, int], cur: dict[str, int], seconds: float) -> Tick:
        def grew(keys: Iterable[str]) -> float:
            return float(sum(max(cur.get(k, 0) - prev.get(k, 0), 0) for k in keys))

        num = grew(self.num)
        den = grew(self.per) if self.per else max(seconds, 1e-9)
        if not all(k in cur and k in prev for k in self.num):
            return Tick(0.0, 0.0, False)  # a counter this kernel (or scope) does not have
        activity = grew(self.activity or self.per) if (self.activity or self.per) else den
        return Tick(num, den, activity >= self.activity_min and den > 0, self.scale)


@dataclass(frozen=True)
class Tick:
    num: float
    den: float
    active: bool
    scale: float = 1.0

    @property
    def value(self) -> float:
        return self.num / self.den * self.scale if self.den else 0.0


# Figures shared by the tuners (design §1).
RETRANS = Figure("retransmits/segment", SNMP, ("Tcp:RetransSegs",), ("Tcp:OutSegs",),
                 activity_min=50, floor=0.005, floor_rel=0.5, min_events=10)
RCV_PRUNE = Figure("rcv prune+collapse/1000 segs", SNMP,
                   ("TcpExt:PruneCalled", "TcpExt:RcvPruned", "TcpExt:OfoPruned",
                    "TcpExt:TCPRcvCollapsed", "TcpExt:TCPRcvQDrop"), ("Tcp:InSegs",),
                   scale=1000, activity_min=50, floor=1, floor_rel=0.5, min_events=10)
TCP_MEM_PRESSURE = Figure("TCP memory pressure ms/s", SNMP,
                          ("TcpExt:TCPMemoryPressuresChrono",),
                          activity=("Tcp:InSegs", "Tcp:OutSegs"), activity_min=50, floor=50)
SYN_REFUSED = Figure("SYNs refused/1000", SNMP, ("TcpExt:ListenDrops",),
                     ("Tcp:PassiveOpens", "TcpExt:ListenDrops"), scale=1000,
                     activity_min=10, floor=10, min_events=10)
_UDP_DATAGRAMS = ("Udp:InDatagrams", "Udp6InDatagrams")
UDP_RCVBUF = Figure("UDP rcvbuf drops/1000", SNMP, ("Udp:RcvbufErrors", "Udp6RcvbufErrors"),
                    (*_UDP_DATAGRAMS, "Udp:RcvbufErrors", "Udp6RcvbufErrors"), scale=1000,
                    activity_min=50, floor=1, min_events=10)
UDP_MEM = Figure("UDP memory drops/1000", SNMP, ("Udp:MemErrors", "Udp6MemErrors"),
                 (*_UDP_DATAGRAMS, "Udp:MemErrors", "Udp6MemErrors"), scale=1000,
                 activity_min=50, floor=1, min_events=10)
BACKLOG_DROPS = Figure("backlog drops/1000 pkts", SOFTNET, ("softnet:dropped",),
                       ("softnet:processed", "softnet:dropped"), scale=1000,
                       activity_min=100, scope="global", floor=1, min_events=10)
TIME_SQUEEZES = Figure("time squeezes/1000 pkts", SOFTNET, ("softnet:squeezed",),
                       ("softnet:processed",), scale=1000, activity_min=100,
                       scope="global", floor=1, min_events=10)
CPU_WAIT = Figure("CPU wait %", SCHED, ("sched:wait",), ("sched:total",), scale=100,
                  scope="global", floor=5, floor_rel=0.5)
REASM_FAILS = Figure("reassembly failures/1000", SNMP, ("Ip:ReasmFails",), ("Ip:ReasmReqds",),
                     scale=1000, activity_min=10, floor=10, min_events=10)
REASM6_FAILS = Figure("IPv6 reassembly failures/1000", SNMP, ("Ip6ReasmFails",),
                      ("Ip6ReasmReqds",), scale=1000, activity_min=10, floor=10, min_events=10)
ARP_REFUSALS = Figure("neigh refusals/1000 allocs", NEIGH, ("arp_cache:table_fulls",),
                      ("arp_cache:allocs",), scale=1000, activity_min=1, scope="global",
                      floor=1, min_events=3)
NDISC_REFUSALS = Figure("IPv6 neigh refusals/1000 allocs", NEIGH, ("ndisc_cache:table_fulls",),
                        ("ndisc_cache:allocs",), scale=1000, activity_min=1, scope="global",
                        floor=1, min_events=3)


class VerifyError(ValueError):
    """Bad ``BPFTUNE_TEST_VERIFY``: the message is the one line the user sees."""


@dataclass(frozen=True)
class Windows:
    """Ticks before and after a change, grace ticks skipped after the tick of the change,
    the first hold (seconds), K and the least active ticks a window needs."""

    before: int = 10
    after: int = 10
    grace: int = 1
    hold: float = 600.0
    k: float = 3.0
    min_active: int = 3
    max_hold: float = 3600.0

    @classmethod
    def from_env(cls, text: str | None = None) -> Windows:
        """``BPFTUNE_TEST_VERIFY="before=4,after=4,grace=1,hold=30,min_active=2"`` (a test
        hook: shorter windows)."""
        text = os.environ.get(ENV, "") if text is None else text
        known = {f.name: f.type for f in fields(cls)}
        values: dict[str, float] = {}
        for item in filter(None, (p.strip() for p in text.split(","))):
            name, _, raw = item.partition("=")
            if name not in known:
                raise VerifyError(f"{ENV}: unknown setting '{name}' (known: "
                                  f"{', '.join(known)})")
            try:
                number = float(raw)
            except ValueError:
                raise VerifyError(f"{ENV}: '{item}' is not name=number") from None
            integral = known[name] == "int"
            if not math.isfinite(number) or number < (1 if integral else 0) or (
                    integral and number != int(number)):
                raise VerifyError(f"{ENV}: '{item}' is out of range")
            values[name] = int(number) if integral else number
        return cls(**values)

    def hold_for(self, reverts: int) -> float:
        """The hold after the n-th revert of one tunable: doubled each time, capped."""
        return min(self.hold * 2 ** max(reverts - 1, 0), max(self.max_hold, self.hold))


@dataclass
class History:
    """Long-run mean and variance of a figure's active ticks in one scope."""

    mean: float = 0.0
    var: float = 0.0
    n: int = 0

    def add(self, value: float) -> None:
        self.n += 1
        if self.n == 1:
            self.mean = value
            return
        delta = value - self.mean
        self.mean += HISTORY_ALPHA * delta
        self.var = (1 - HISTORY_ALPHA) * (self.var + HISTORY_ALPHA * delta * delta)


@dataclass(frozen=True)
class Outcome:
    """What one figure says: "worse", "ok" or "inactive" (with a reason)."""

    status: str
    reason: str = ""
    before: float = 0.0
    sd: float = 0.0
    after: float = 0.0
    limit: float = 0.0


def _pooled(ticks: list[Tick]) -> float:
    den = sum(t.den for t in ticks)
    return sum(t.num for t in ticks) / den * ticks[0].scale if den else 0.0


def _stdev(values: list[float]) -> float:
    """The sample standard deviation (as statistics.stdev, whose import, with decimal and
    fractions, costs the daemon 2 MiB)."""
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def judge(before: list[Tick], after: list[Tick], figure: Figure, windows: Windows,
          history: History | None = None) -> Outcome:
    """Whether ``figure`` worsened clearly from ``before`` to ``after`` (design §2)."""
    active_a = [t for t in after if t.active]
    if len(active_a) < windows.min_active:
        return Outcome("inactive", "no traffic after the change")
    active_b = [t for t in before if t.active]
    if len(active_b) >= windows.min_active:
        mu_b = _pooled(active_b)
        sd_b = _stdev([t.value for t in active_b])
    elif history is not None and history.n >= HISTORY_MIN_TICKS:
        mu_b, sd_b = history.mean, math.sqrt(history.var)
    else:
        return Outcome("inactive", "no baseline (too little traffic before the change)")
    mu_a = _pooled(active_a)
    margin = max(windows.k * sd_b, figure.floor, figure.floor_rel * abs(mu_b))
    events = sum(t.num for t in active_a)
    if figure.worse == "up":
        limit = mu_b + margin
        worse = mu_a > limit
    else:
        limit = mu_b - margin
        worse = mu_a < limit
    worse = worse and events >= figure.min_events
    return Outcome("worse" if worse else "ok", "", mu_b, sd_b, mu_a, limit)


def _number(x: float, like: float | None = None) -> str:
    """Small figures (per segment) with 4 decimals, others with 1; ``like``: in the style
    of that number (a spread as its mean)."""
    return f"{x:.4f}" if abs(x if like is None else like) < 1 else f"{x:.1f}"


@dataclass
class Verdict:
    verdict: str  # "kept", "reverted" or "inconclusive"
    reason: str
    evidence: dict[str, Outcome] = field(default_factory=dict)
    at: float = field(default_factory=time.time)

    def evidence_text(self) -> str:
        return ", ".join(f"{label} {_number(o.before)}±{_number(o.sd, o.before)} -> "
                         f"{_number(o.after)}"
                         + (f" (limit {_number(o.limit)})" if o.status == "worse" else "")
                         for label, o in self.evidence.items() if o.status != "inactive")

    def as_dict(self) -> dict:
        return {"verdict": self.verdict, "reason": self.reason, "at": self.at,
                "evidence": {label: {"before": o.before, "sd": o.sd, "after": o.after,
                                     "limit": o.limit}
                             for label, o in self.evidence.items() if o.status != "inactive"}}


def decide(outcomes: dict[str, Outcome]) -> Verdict:
    """Any figure clearly worse: reverted; else any figure with activity: kept; else
    inconclusive, with the first reason."""
    if any(o.status == "worse" for o in outcomes.values()):
        worse = [label for label, o in outcomes.items() if o.status == "worse"]
        return Verdict("reverted", f"{', '.join(worse)} worse", outcomes)
    if any(o.status == "ok" for o in outcomes.values()):
        return Verdict("kept", "no figure worse", outcomes)
    reasons = [o.reason for o in outcomes.values()] or ["no figures"]
    reason = next((r for r in reasons if r.startswith("no baseline")), reasons[0])
    return Verdict("inconclusive", reason, outcomes)


@dataclass
class Sample:
    index: int
    at: float
    counters: dict[str, int]


class Sampler:
    """Cumulative counters per scope (the global namespace, namespaces being verified, up
    to MAX_SAMPLED others with recent tuner events or among the newest, and up to
    MAX_SUBJECTS subjects), a ring of them per scope, and each figure's long-run history
    there. While the host is quiet (``packets``, host-wide, grew by less than QUIET_PPS a
    second; None: never quiet) other namespaces than open verifications' are not read,
    nor the global packet figures."""

    def __init__(self, namespaces: Namespaces, figures: Iterable[Figure], windows: Windows,
                 readers: dict[str, Reader] | None = None,
                 packets: Callable[[], int] | None = procnet.packets_received,
                 tuner_counters: TunerCounters | None = None) -> None:
        self.namespaces = namespaces
        self.figures = tuple(dict.fromkeys(figures))
        self.windows = windows
        self.readers = readers or READERS
        #: What figures with source TUNER read.
        self.tuner_counters: TunerCounters = tuner_counters or (lambda _name, _cookie: {})
        self.packets = packets
        self.last_packets: tuple[float, int] | None = None
        self.ring_length = windows.before + windows.after + windows.grace + 3
        self.rings: dict[Scope, deque[Sample]] = {GLOBAL: deque(maxlen=self.ring_length)}
        self.history: dict[tuple[Scope, str], History] = {}
        self.recent: OrderedDict[int, None] = OrderedDict()  # warm namespaces, LRU
        self.recent_subjects: OrderedDict[tuple[int, str], None] = OrderedDict()  # the same
        #: Scopes with open verifications, and how many (a scope with none is deleted).
        self.pinned: Counter[Scope] = Counter()
        self.index = 0

    def _wanted(self, scope: Scope) -> list[Figure]:
        """The figures read in a scope: a subject's in a subject, the namespace's in a
        namespace, and in the global one also those that exist only there."""
        if isinstance(scope, tuple):
            return [f for f in self.figures if f.scope == "subject"]
        return [f for f in self.figures if f.scope == "netns"
                or (scope == GLOBAL and f.scope == "global")]

    def warm(self, cookie: Scope) -> None:
        """A tuner acted in this namespace (or on this subject): sample it (the least
        recent beyond the cap is no longer sampled)."""
        if isinstance(cookie, tuple):
            recent, cap = self.recent_subjects, MAX_SUBJECTS
        elif cookie == GLOBAL or self.namespaces.is_global(cookie):
            return
        else:
            recent, cap = self.recent, MAX_SAMPLED
        recent[cookie] = None
        recent.move_to_end(cookie)
        while len(recent) > cap:
            old, _ = recent.popitem(last=False)
            if old not in self.pinned and old not in self.scopes():
                self._drop(old)

    def sampled(self, cookie: Scope) -> bool:
        return cookie in self.rings

    def scopes(self) -> list[Scope]:
        """Global, those being verified, those with recent tuner events, then the
        NEWEST_SAMPLED newest namespaces, up to MAX_SAMPLED besides global."""
        scopes = dict.fromkeys([GLOBAL, *self.pinned, *reversed(self.recent)])
        for cookie in self.namespaces.newest(NEWEST_SAMPLED):
            if len(scopes) > MAX_SAMPLED:
                break
            scopes.setdefault(cookie)
        return [*scopes, *(s for s in reversed(self.recent_subjects) if s not in scopes)]

    def forget(self, cookie: int) -> None:
        """A namespace is gone: so are its subjects."""
        subjects = {s for s in (*self.recent_subjects, *self.pinned, *self.rings)
                    if isinstance(s, tuple) and s[0] == cookie}
        self.recent.pop(cookie, None)
        for subject in subjects:
            self.recent_subjects.pop(subject, None)
        for scope in (cookie, *subjects):
            self.pinned.pop(scope, None)
            self._drop(scope)

    def _drop(self, cookie: Scope) -> None:
        self.rings.pop(cookie, None)
        for key in [k for k in self.history if k[0] == cookie]:
            del self.history[key]

    def quiet(self, now: float) -> bool:
        """Whether the host received fewer than QUIET_PPS packets a second since the last
        call (softnet_stat counts every namespace's)."""
        if self.packets is None:
            return False
        count = self.packets()
        last, self.last_packets = self.last_packets, (now, count)
        return last is not None and count - last[1] < QUIET_PPS * (now - last[0])

    def _quiet_scopes(self) -> list[Scope]:
        """What a quiet tick reads: global, open verifications and subjects. The other
        namespaces' packet figures would not count, so they are not even listed (with
        many namespaces, listing them was most of an idle tick's extra cost)."""
        return list(dict.fromkeys([GLOBAL, *self.pinned, *reversed(self.recent_subjects)]))

    def sample(self, now: float) -> None:
        self.index += 1
        quiet = self.quiet(now)
        if quiet:  # the rings of namespaces not read are kept, for the next busy tick
            scopes = self._quiet_scopes()
        else:
            scopes = self.scopes()
            for stale in set(self.rings) - set(scopes):
                self._drop(stale)
        for cookie in scopes:
            only = None
            if quiet and cookie not in self.pinned and not isinstance(cookie, tuple):
                only = UNPACKETED  # global: what is not packets still counts
            try:
                counters = self._read(cookie, only)
            except (OSError, NetnsError, ValueError) as e:
                log.debug(f"verify: cannot sample netns cookie {cookie}: {e}")
                continue
            ring = self.rings.setdefault(cookie, deque(maxlen=self.ring_length))
            if ring and ring[-1].index == self.index - 1:
                self._learn(cookie, ring[-1], counters, now)
            ring.append(Sample(self.index, now, counters))

    def _read(self, cookie: Scope, only: frozenset[str] | None = None) -> dict[str, int]:
        """The counters of the scope's figures (of the ``only`` sources, if given)."""
        wanted = self._wanted(cookie)
        if only is not None:
            wanted = tuple(f for f in wanted if f.source in only)
        sources = {f.source for f in wanted}
        keys = set().union(*(f.keys() for f in wanted)) if wanted else set()
        if isinstance(cookie, tuple):  # a subject: its tuner's counters, no namespace
            return {k: v for k, v in self._tuner_counters(cookie, wanted).items() if k in keys}
        found: dict[str, int] = {}
        with self.namespaces.entered(cookie):
            if SNMP in sources:
                found |= self.readers[SNMP](keys)
        for source in sources - {SNMP, TUNER}:
            found |= self.readers[source](keys)
        if TUNER in sources:
            found |= self._tuner_counters(cookie, wanted)
        return {k: v for k, v in found.items() if k in keys}

    def _tuner_counters(self, cookie: Scope, wanted: Iterable[Figure]) -> dict[str, int]:
        """The counters of the tuners that TUNER figures name (a map lookup or so each)."""
        names = {k.partition(":")[0] for f in wanted if f.source == TUNER for k in f.num}
        return {f"{name}:{k}": v for name in names
                for k, v in self.tuner_counters(name, cookie).items()}

    def _learn(self, cookie: Scope, prev: Sample, cur: dict[str, int], now: float) -> None:
        for f in self._wanted(cookie):
            t = f.tick(prev.counters, cur, now - prev.at)
            if t.active:
                self.history.setdefault((cookie, f.label), History()).add(t.value)

    def ticks(self, cookie: Scope, figure: Figure, first: int, last: int) -> list[Tick]:
        """The figure's ticks ``first``..``last`` (sample indexes; tick i ends at sample i)
        in that scope; ticks with a missing sample are left out."""
        samples = {s.index: s for s in self.rings.get(cookie, ())}
        found = []
        for i in range(first, last + 1):
            prev, cur = samples.get(i - 1), samples.get(i)
            if prev is not None and cur is not None:
                found.append(figure.tick(prev.counters, cur.counters, cur.at - prev.at))
        return found


@dataclass
class Verification:
    tuner: Tuner
    tunable: Tunable
    scenario: str
    where: int  # the ledger cookie of the tunable
    origin: int  # the namespace its "netns" figures are read in
    old: Value
    new: Value
    start: int  # the last sample index before the change
    figures: tuple[Figure, ...]
    since: float = field(default_factory=time.time)
    #: What in the namespace the change was for, when not the tunable's value there (e.g.
    #: tcp_conn's BBR for one remote host): no live value to check, and the tuner undoes it
    #: (Tuner.undo) instead of Changes.revert.
    subject: str = ""

    @property
    def key(self) -> tuple:
        return verification_key(self.tunable.name, self.where, self.subject)

    def scope(self, figure: Figure) -> Scope:
        if figure.scope == "subject":
            return (self.origin, self.subject)
        return GLOBAL if figure.scope == "global" else self.origin


def verification_key(tunable: str, where: int, subject: str = "") -> tuple:
    """(tunable, ledger cookie), and the subject if there is one."""
    return (tunable, where, subject) if subject else (tunable, where)


class Verifier:
    """Opens a verification per change, samples, judges each when its after window is
    full, reverts (through Changes.revert) what made a figure clearly worse."""

    def __init__(self, changes: Changes, figures: Iterable[Figure], windows: Windows,
                 sampler: Sampler | None = None) -> None:
        self.changes = changes
        self.windows = windows
        self.sampler = sampler or Sampler(changes.namespaces, figures, windows)
        self.open: dict[tuple, Verification] = {}
        self.counts: Counter[tuple[str, str]] = Counter()
        self.last: dict[tuple, Verdict] = {}

    def use_figures(self, figures: Iterable[Figure]) -> None:
        """The figures the loaded tuners declare: what the sampler reads."""
        self.sampler.figures = tuple(dict.fromkeys(figures))

    def use_tuners(self, tuners: list[Tuner]) -> None:
        """The engine's tuners: the figures they declare, and their own counters for TUNER
        figures. The list is the engine's own, which a hand-back (-E) updates in place with
        a new tuner object: it is searched at each read."""
        self.use_figures(all_figures(tuners))

        def counters(name: str, cookie: Scope) -> dict[str, int]:
            tuner = next((t for t in tuners if t.name == name), None)
            return tuner.figure_counters(cookie) if tuner is not None else {}

        self.sampler.tuner_counters = counters

    # Events from the change path.
    def changed(self, tuner: Tuner, tunable: Tunable, scenario: int, origin: int, where: int,
                old: Value, new: Value, subject: str = "") -> None:
        key = verification_key(tunable.name, where, subject)
        figures = tuner.figures(tunable, scenario)
        current = self.open.get(key)
        if current is not None:
            if current.tuner.name == tuner.name and figures:
                current.new = new  # a series: the window stays anchored at its first step
                return
            self._end(current, Verdict("inconclusive", "superseded by another change"))
        origin = GLOBAL if self.changes.namespaces.is_global(origin) else origin
        v = Verification(tuner, tunable, tuner.scenarios[scenario].name, where, origin, old,
                         new, self.sampler.index, figures, subject=subject)
        if not figures:  # every change ends with a verdict (issue 14), these at once
            self._end(v, Verdict("inconclusive", "not verified: " + (
                "the scenario trades a figure on purpose or undoes an emergency"
                if tunable.figures else "no key figure for this tunable")))
            return
        self.open[key] = v
        for f in figures:
            self.sampler.pinned[v.scope(f)] += 1

    def cancel(self, tuner_name: str, cookie: int | None, reason: str) -> None:
        """End the tuner's open verifications in namespace ``cookie`` (None or GLOBAL: in
        every namespace) as inconclusive."""
        for v in [v for v in self.open.values() if v.tuner.name == tuner_name
                  and (cookie in (None, GLOBAL) or v.where == cookie)]:
            self._end(v, Verdict("inconclusive", reason))

    def forget_netns(self, cookie: int) -> None:
        for v in [v for v in self.open.values() if cookie in (v.where, v.origin)]:
            self._end(v, Verdict("inconclusive", "namespace gone"), log_it=False)
        self.last = {k: v for k, v in self.last.items() if k[1] != cookie}
        self.sampler.forget(cookie)

    def warm(self, cookie: Scope) -> None:
        self.sampler.warm(cookie)

    # The tick.
    def tick(self, now: float) -> None:
        self.sampler.sample(now)
        due = self.sampler.index - self.windows.grace - self.windows.after - 1
        for v in [v for v in self.open.values() if v.start <= due]:
            self._judge(v)

    def due_index(self, v: Verification) -> int:
        return v.start + 1 + self.windows.grace + self.windows.after

    def _judge(self, v: Verification) -> None:
        if not v.subject and not self._still_set(v):
            return
        w = self.windows
        outcomes: dict[str, Outcome] = {}
        for f in v.figures:
            scope = v.scope(f)
            if not self.sampler.sampled(scope):
                outcomes[f.label] = Outcome("inactive", "scope not sampled")
                continue
            before = self.sampler.ticks(scope, f, v.start - w.before + 1, v.start)
            first_after = v.start + 2 + w.grace
            after = self.sampler.ticks(scope, f, first_after, first_after + w.after - 1)
            outcomes[f.label] = judge(before, after, f, w,
                                      self.sampler.history.get((scope, f.label)))
        verdict = decide(outcomes)
        if verdict.verdict == "reverted" and not self._revert(v, verdict):
            verdict = Verdict("inconclusive", "not undone" if v.subject else
                              "value changed by someone else (revert refused)", outcomes)
        self._end(v, verdict)

    def _still_set(self, v: Verification) -> bool:
        """Whether the tunable still has the value bpftune set (else: inconclusive)."""
        try:
            live = self.changes.read(v.tunable, v.where)
        except (OSError, SysctlError):
            self._end(v, Verdict("inconclusive", "namespace gone"))
            return False
        if live != v.new:
            self._end(v, Verdict("inconclusive", f"value changed by someone else (now "
                                                 f"({format_value(live)}))"))
            return False
        return True

    def _revert(self, v: Verification, verdict: Verdict) -> bool:
        if v.subject:
            return self._undo(v, verdict)
        reverted = self.changes.revert(v.tuner, v.tunable, v.where, v.old, v.new,
                                       verdict.evidence_text(), v.scenario)
        if reverted:
            try:
                v.tuner.reverted(v.tunable, v.where)
            except Exception as e:  # one tuner's bug must not stop the verifier
                log.err(f"{v.tuner.name}: error after a revert: {e!r}")
        return reverted

    def _undo(self, v: Verification, verdict: Verdict) -> bool:
        try:
            return v.tuner.undo(v, verdict.evidence_text())
        except Exception as e:  # one tuner's bug must not stop the verifier
            log.err(f"{v.tuner.name}: error undoing a change: {e!r}")
            return False

    def _end(self, v: Verification, verdict: Verdict, *, log_it: bool = True) -> None:
        self.open.pop(v.key, None)
        for f in v.figures:
            scope = v.scope(f)
            self.sampler.pinned[scope] -= 1
            if self.sampler.pinned[scope] <= 0:
                del self.sampler.pinned[scope]
                if scope != GLOBAL and scope not in (*self.sampler.recent,
                                                     *self.sampler.recent_subjects):
                    self.sampler._drop(scope)
        self.counts[(v.tuner.name, verdict.verdict)] += 1
        self.last.pop(v.key, None)  # the newest last, for the bound below
        self.last[v.key] = verdict
        if v.subject:
            subjects = [k for k in self.last if len(k) == 3]
            for key in subjects[:len(subjects) - MAX_SUBJECT_VERDICTS]:
                del self.last[key]
        line = (f"Verdict {verdict.verdict} for '{v.tunable.name}' in "
                f"{self._where(v.where)}{f' for {v.subject}' if v.subject else ''} "
                f"({format_value(v.old)}) -> ({format_value(v.new)}) "
                f"({v.tuner.name}): {verdict.evidence_text() or verdict.reason}")
        if verdict.verdict == "inconclusive" and verdict.evidence_text():
            line += f"; {verdict.reason}"
        if log_it:
            log.notice(line)
        self.changes._audit("verdict", v.tuner.name, v.tunable.name, v.where, old=v.old,
                            new=v.new, scenario=v.scenario, verdict=verdict.verdict,
                            reason=verdict.reason,
                            evidence=verdict.as_dict()["evidence"],
                            window={"before": self.windows.before,
                                    "after": self.windows.after},
                            **({"subject": v.subject} if v.subject else {}))

    def _where(self, cookie: int) -> str:
        if cookie == GLOBAL:
            return "global ns"
        return f"netns '{self.changes.namespaces.name(cookie)}'"

    # Reports.
    def finish_all(self, reason: str) -> None:
        for v in list(self.open.values()):
            self._end(v, Verdict("inconclusive", reason))

    def tuner_state(self, tuner_name: str) -> dict:
        names = self.changes.namespaces.name
        return {
            "verdicts": {k: self.counts[(tuner_name, k)]
                         for k in ("kept", "reverted", "inconclusive")},
            "verifying": [{"tunable": v.tunable.name, "netns": names(v.where),
                           "from": _plain(v.old), "to": _plain(v.new), "since": v.since,
                           "due": time.time() + self.due_index(v) - self.sampler.index,
                           **({"subject": v.subject} if v.subject else {})}
                          for v in self.open.values() if v.tuner.name == tuner_name],
        }

    def snapshot(self) -> dict:
        return {"before": self.windows.before, "after": self.windows.after,
                "grace": self.windows.grace, "hold": self.windows.hold,
                "sampled_netns": len(self.sampler.rings) - 1}

    def table_sizes(self) -> dict[str, int]:
        return {"verify.open": len(self.open), "verify.last": len(self.last),
                "verify.rings": len(self.sampler.rings),
                "verify.history": len(self.sampler.history),
                "verify.recent": len(self.sampler.recent) + len(self.sampler.recent_subjects)}


def _plain(value: Value) -> list[int] | str:
    return value if isinstance(value, str) else list(value)


def all_figures(tuners: Iterable[Tuner]) -> list[Figure]:
    """Every figure the tuners declare on their tunables."""
    return list(dict.fromkeys(f for t in tuners for tunable in t.tunables
                              for f in tunable.figures))

