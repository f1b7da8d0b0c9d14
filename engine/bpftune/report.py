"""What the query interface answers: upstream's queries in upstream's formats, and the
complete state as JSON for machines (the PCP PMDA).

Every query answers from a :class:`Snapshot`: a copy of the engine's in-memory state made in
one go under ``engine.lock``. What is slow (switching into namespaces, reading sysctls,
formatting) happens afterwards, without the lock, so a flood of queries never holds up
events. The live values ``state`` reads are shared for ``LIVE_SECONDS`` (while the ledger
stays the same), so a flood of ``state`` queries does one read pass, not one each.
"""

from __future__ import annotations

import copy
import json
import os
import resource
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from bpftune import __version__, handback
from bpftune.access import from_spec
from bpftune.advice import Recommendation
from bpftune.audit import value_text
from bpftune.changes import GLOBAL, Changes, Record
from bpftune.log import log
from bpftune.metrics import published_metric, scenario_metric, tunable_metrics
from bpftune.query import Query
from bpftune.sysctl import Value, format_value

if TYPE_CHECKING:
    from bpftune.audit import AuditTrail
    from bpftune.engine import Engine
    from bpftune.netns import Namespaces
    from bpftune.tuner import Published, Scenario, Strategy, Tunable

STATE_VERSION = 1
LIVE_SECONDS = 0.5


@dataclass(frozen=True)
class TunerView:
    """A tuner as it was when the snapshot was taken."""

    name: str
    id: int
    cluster: int
    state: str
    strategy: str | None
    strategies: tuple[Strategy, ...]
    tunables: tuple[Tunable, ...]
    scenarios: tuple[Scenario, ...]
    #: Its summary lines (its own and the ledger's), for the queries that ask for them.
    summary: tuple[str, ...]
    published: tuple[Published, ...] = ()
    published_values: dict = field(default_factory=dict)
    #: Strategy name -> its last evaluation (None: it failed); absent: not evaluated yet.
    strategy_evaluations: dict[str, float | None] = field(default_factory=dict)

    @property
    def sysctls(self) -> list[Tunable]:
        return [t for t in self.tunables if t.sysctl]


@dataclass(frozen=True)
class Snapshot:
    """What the queries need from the engine, copied under its lock."""

    changes: Changes  # only to read live values: read_many does not touch the ledger
    tuners: tuple[TunerView, ...]
    records: dict[tuple[str, int], Record]  # copies
    scenario_counts: dict[tuple[str, str, int, int], int]
    manual: frozenset[tuple[str, int]]
    cookies: tuple[int, ...]  # the namespaces ``state`` reports (see _active_cookies)
    netns_names: dict[int, str]
    command_prefixes: dict[int, str]  # for the namespaces of changed records
    started: float
    learning_rate: int
    rollback: bool
    events_received: int
    events_dropped: int
    bpf_programs: int
    tables: dict[str, int]  # entries kept per namespace (Engine.table_sizes)
    unloaded: dict[str, str]  # tuners that did not load -> why
    #: Advice mode: the recommendations (copies); None when the daemon tunes.
    advice: tuple[Recommendation, ...] | None = None
    audit: AuditTrail | None = None  # read (its file, not memory) by ``history``
    #: Verified changes (bpftune.verify): the windows, or why there are none...
    verification: dict | str = "off"
    #: ...per tuner its verdict counts, open verifications and holds...
    verifying: dict[str, dict] = field(default_factory=dict)
    #: ...and per ledger key the last verdict.
    verdicts: dict[tuple[str, int], dict] = field(default_factory=dict)

    @property
    def generation(self) -> tuple[int, ...]:
        """Changes whenever the ledger does."""
        return (len(self.records), sum(r.changes for r in self.records.values()),
                sum(self.scenario_counts.values()), len(self.manual),
                sum(r.proposals for r in self.advice or ()))


def _published_values(tuner) -> dict:
    try:
        return tuner.published_values() if tuner.state.value == "active" else {}
    except Exception as e:  # one tuner's bug must not break the state query
        log.err(f"{tuner.name}: cannot read published values: {e!r}")
        return {}


def _copy(record: Record) -> Record:
    c = copy.copy(record)
    for attr in ("original", "current"):
        if isinstance(value := getattr(c, attr), list):
            setattr(c, attr, list(value))
    return c


def _active_cookies(records: dict[tuple[str, int], Record],
                    counts: dict[tuple[str, str, int, int], int],
                    manual: frozenset[tuple[str, int]], namespaces: Namespaces) -> list[int]:
    """The global netns, and others that still exist where bpftune did or was told
    something (namespaces that are gone are not looked for again here: this runs every
    second for the PMDA)."""
    cookies = {r.cookie for r in records.values()}
    cookies |= {key[3] for key in counts}
    cookies |= {c for (_, c) in manual}
    return sorted({GLOBAL} | {c for c in cookies if namespaces.has(c)})


def snapshot(engine: Engine, *, summaries: bool = False) -> Snapshot:
    """Copy what queries need, briefly holding ``engine.lock``; nothing here enters a
    namespace or reads a sysctl."""
    with engine.lock:
        changes, namespaces, programs = engine.changes, engine.namespaces, engine.programs
        records = {key: _copy(r) for key, r in changes.records.items()}
        counts = dict(changes.scenario_counts)
        manual = frozenset(changes.manual)
        cookies = _active_cookies(records, counts, manual, namespaces)
        tuners = tuple(TunerView(
            name=t.name, id=t.id, cluster=t.cluster(), state=t.state.value,
            strategy=t.strategy.name if t.strategy else None, strategies=tuple(t.strategies),
            tunables=tuple(t.tunables), scenarios=tuple(t.scenarios),
            summary=tuple(t.summarize() + changes.summary(t)) if summaries else (),
            published=t.published, published_values=_published_values(t),
            strategy_evaluations=dict(t.strategy_evaluations))
            for t in engine.tuners)
        return Snapshot(
            changes=changes, tuners=tuners, records=records, scenario_counts=counts,
            manual=manual, cookies=tuple(cookies),
            netns_names={c: namespaces.name(c) for c in cookies},
            command_prefixes={r.cookie: namespaces.command_prefix(r.cookie)
                              for r in records.values() if r.cookie != GLOBAL},
            started=engine.started, learning_rate=engine.learning_rate.rate,
            rollback=engine.options.rollback,
            events_received=programs.events_received if programs else 0,
            events_dropped=programs.events_dropped if programs else 0,
            bpf_programs=sum(len(t.bpf.programs) for t in engine.tuners if t.bpf is not None),
            tables=engine.table_sizes(), unloaded=dict(engine.unloaded),
            advice=None if changes.advice is None else tuple(
                copy.deepcopy(r) for r in changes.advice.ordered()),
            audit=engine.audit, **_verification(engine))


def _verification(engine: Engine) -> dict:
    verifier, changes = engine.verifier, engine.changes
    if verifier is None:
        return {"verification": "off (advice mode)" if changes.advice is not None else "off"}
    now_mono, now = time.monotonic(), time.time()
    name = engine.namespaces.name
    per_tuner = {t.name: verifier.tuner_state(t.name) | {"held": []} for t in engine.tuners}
    for (tunable, cookie), hold in changes.held.items():
        if hold.until > now_mono and hold.tuner in per_tuner:
            per_tuner[hold.tuner]["held"].append(
                {"tunable": tunable, "netns": name(cookie),
                 "until": now + hold.until - now_mono, "reverts": hold.reverts})
    for t in engine.tuners:  # subjects (tcp_conn's hosts): holds and last verdicts
        per_tuner[t.name]["held"] += [
            {"subject": subject, "netns": name(cookie), "until": now + until - now_mono,
             "reverts": reverts} for cookie, subject, until, reverts in t.held_subjects()]
        tunables = {x.name for x in t.tunables}
        if subjects := [{"tunable": key[0], "netns": name(key[1]), "subject": key[2],
                         **verdict.as_dict()} for key, verdict in verifier.last.items()
                        if len(key) == 3 and key[0] in tunables]:
            per_tuner[t.name]["subjects"] = subjects
    return {"verification": verifier.snapshot(), "verifying": per_tuner,
            "verdicts": {k: v.as_dict() for k, v in verifier.last.items()}}


def _quoted(value: Value) -> str:
    return f'"{value}"' if isinstance(value, str) else format_value(value)


def _live_global(snap: Snapshot, tuner: TunerView) -> dict[str, Value]:
    return snap.changes.read_many(tuner.sysctls, GLOBAL)


def help_text(_snap: Snapshot | None = None) -> str:
    """Every query, then the request that changes the daemon (root only)."""
    return ("".join(f"{q.name:>20} {q.description:>40}\n" for q in QUERIES)
            + f"{handback.USAGE:>20} {handback.DESCRIPTION:>40}\n")


def tuners(snap: Snapshot) -> str:
    """Upstream's lines for the loaded tuners; then the others, inactive, with the reason
    (as ``bpftune -S`` gives it)."""
    return ("".join(f"{t.name:>20} {t.state:>20}\n" for t in snap.tuners)
            + "".join(f"{name:>20} {'inactive':>20} {why}\n"
                      for name, why in snap.unloaded.items()))


def tunables(snap: Snapshot) -> str:
    return "".join(f"{tuner.name:>16} {t.name:>50} {'string' if t.string else 'integer':>8} "
                   f"{t.values:2d}\n" for tuner in snap.tuners for t in tuner.tunables)


def _tab_json(objects: list[tuple[str, list[str]]]) -> str:
    """Upstream's tab-indented JSON: {"tuner":{ entries }, ...}, always valid JSON (upstream
    leaves a trailing comma when a tuner's last tunable is not a sysctl)."""
    blocks = []
    for name, entries in objects:
        body = ",\n".join(f"\t\t{e}" for e in entries)
        blocks.append(f'\t"{name}":{{\n{body}\n\t}}' if entries else f'\t"{name}":{{\n\t}}')
    return "{\n" + ",\n".join(blocks) + "\n}"


def jtunables(snap: Snapshot) -> str:
    return _tab_json([
        (tuner.name, [f'"{t.name}":{{\n\t\t\t"type":"{"string" if t.string else "integer"}",'
                      f'\n\t\t\t"num_values":{t.values}\n\t\t}}' for t in tuner.tunables])
        for tuner in snap.tuners])


def status(snap: Snapshot) -> str:
    """Live values, read from the kernel now (upstream shows values cached at start)."""
    return "".join(f"{tuner.name:>16} {name:>50} {_quoted(value):>34}\n"
                   for tuner in snap.tuners
                   for name, value in _live_global(snap, tuner).items())


def jstatus(snap: Snapshot) -> str:
    def entry(name: str, value: Value) -> str:
        if isinstance(value, str):
            return f'"{name}": "{value}" '
        if len(value) > 1:
            return f'"{name}":[ {", ".join(map(str, value))} ]'
        return f'"{name}": {value[0]} '

    return _tab_json([(tuner.name, [entry(n, v) for n, v in _live_global(snap, tuner).items()])
                      for tuner in snap.tuners])


def summary(snap: Snapshot) -> str:
    lines = ["# Summary of changes made across all tuners:"]
    for tuner in snap.tuners:
        lines += tuner.summary
    return "\n".join(lines) + "\n"


def rollback(snap: Snapshot) -> str:
    lines = ["# Summary of rollback operations needed to restore original state for all tuners:"]
    for r in snap.records.values():
        if r.original == r.current:
            continue
        original = r.original if isinstance(r.original, str) else tuple(r.original)
        commands = from_spec(r.access).replicate(r.tunable, original)
        if r.cookie != GLOBAL:
            commands = [f"{snap.command_prefixes[r.cookie]} {c}" for c in commands]
        lines += [f"# To roll back changes to '{r.tunable}', run the following as a privileged "
                  f"user in a terminal:", *commands]
    return "\n".join(lines) + "\n"


def _values(value: Value | None) -> list[int] | str | None:
    return value if value is None or isinstance(value, str) else list(value)


def _tunable_state(snap: Snapshot, tuner: TunerView, t: Tunable,
                   live: dict[int, dict[str, Value]]) -> dict:
    netns = {}
    for cookie, values in live.items():
        if cookie != GLOBAL and not t.namespaced:
            continue
        record = snap.records.get((t.name, cookie))
        current = values.get(t.name)
        if current is None and record is None:
            continue
        netns[str(cookie)] = {
            "current": _values(current),
            "original": record.original if record else _values(current),
            "changes": record.changes if record else 0,
            "last_change": record.last_change if record else None,
        }
        if (verdict := snap.verdicts.get((t.name, cookie))) is not None:
            netns[str(cookie)]["verdict"] = verdict
    return {"name": t.name, "type": "string" if t.string else "integer", "values": t.values,
            "metrics": tunable_metrics(tuner.name, t.name),
            "positions": list(t.position_names()), "unit": t.unit, "namespaced": t.namespaced,
            "sysctl": t.sysctl, "netns": netns}


def _tuner_state(snap: Snapshot, tuner: TunerView, live: dict[int, dict[str, Value]]) -> dict:
    counts: dict[int, dict[str, int]] = {}
    for (tname, _tunable, scenario, cookie), n in snap.scenario_counts.items():
        if tname == tuner.name:
            per_netns = counts.setdefault(scenario, {})
            per_netns[str(cookie)] = per_netns.get(str(cookie), 0) + n
    return {
        "name": tuner.name,
        "id": tuner.id,
        "cluster": tuner.cluster,
        "state": tuner.state,
        "manual_netns": sorted(c for (name, c) in snap.manual if name == tuner.name),
        "advice": sum(r.tuner == tuner.name for r in snap.advice or ()),
        **snap.verifying.get(tuner.name, {}),
        "strategy": tuner.strategy,
        "strategies": [{"name": s.name, "description": s.description, "timeout": s.timeout,
                        "evaluation": tuner.strategy_evaluations.get(s.name)}
                       for s in tuner.strategies],
        "tunables": [_tunable_state(snap, tuner, t, live) for t in tuner.tunables],
        "published": [{"name": p.name, "help": p.help, "unit": p.unit, "counter": p.counter,
                       "instances": p.instances,
                       "metric": published_metric(tuner.name, p.name),
                       "value": tuner.published_values.get(p.name)}
                      for p in tuner.published],
        "scenarios": [{"id": i, "name": s.name, "description": s.description,
                       "metric": scenario_metric(tuner.name, s.name),
                       "counts": counts.get(i, {})} for i, s in enumerate(tuner.scenarios)],
    }


class _LiveValues:
    """The live values ``state`` reports, read at most once per ``LIVE_SECONDS`` while the
    ledger and the namespaces reported stay the same; queries arriving during a read pass
    wait for it rather than start their own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._read_at = 0.0
        self._live: dict[int, dict[str, Value]] = {}

    def get(self, snap: Snapshot) -> dict[int, dict[str, Value]]:
        key = (id(snap.changes), snap.cookies, snap.generation)
        with self._lock:
            now = time.monotonic()
            if key != self._key or now - self._read_at >= LIVE_SECONDS:
                self._live = self._read(snap)
                self._key, self._read_at = key, now
            return self._live

    @staticmethod
    def _read(snap: Snapshot) -> dict[int, dict[str, Value]]:
        sysctls = [t for tuner in snap.tuners for t in tuner.sysctls]
        return {c: snap.changes.read_many([t for t in sysctls if c == GLOBAL or t.namespaced], c)
                for c in snap.cookies}  # one switch into each namespace


_live_values = _LiveValues()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def state(snap: Snapshot) -> str:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    daemon = {
        "pid": os.getpid(),
        "version": __version__,
        "started": snap.started,
        "uptime": time.time() - snap.started,
        "learning_rate": snap.learning_rate,
        "rollback": snap.rollback,
        "events_received": snap.events_received,
        "events_dropped": snap.events_dropped,
        "bpf_programs": snap.bpf_programs,
        "tables": snap.tables,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "rss_bytes": _rss_bytes(),
        "mode": "tune" if snap.advice is None else "advise",
        "verification": snap.verification,
    }
    netns = {str(c): {"name": snap.netns_names[c], "global": c == GLOBAL} for c in snap.cookies}
    live = _live_values.get(snap)
    return json.dumps({"version": STATE_VERSION, "daemon": daemon, "netns": netns,
                       "unloaded": snap.unloaded,
                       "tuners": [_tuner_state(snap, t, live) for t in snap.tuners],
                       "advice": [r.as_dict() for r in snap.advice or ()]})


NOT_ADVISING = "error: bpftune is not in advice mode (start it with --advise)"


def advice(snap: Snapshot) -> str:
    """The recommendations, each with its reason and the commands that apply it."""
    if snap.advice is None:
        return NOT_ADVISING
    if not snap.advice:
        return "# no recommendations yet"
    lines = [f"# {len(snap.advice)} recommendations; bpftune changed nothing"]
    for r in snap.advice:
        current, proposed = r.text_values
        where = "" if r.netns == "global" else f" in netns '{r.netns}'"
        last = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.last))
        subject = f" for {r.subject}" if r.subject else ""
        lines += [f"[{r.id}] {r.tuner}: {r.tunable}{subject}{where}: ({current}) -> "
                  f"({proposed})",
                  f"    scenario '{r.scenario}', proposed {r.proposals} times, last {last}",
                  f"    {r.reason}",
                  *(f"    apply: {c}" for c in r.commands)]
    return "\n".join(lines)


def jadvice(snap: Snapshot) -> str:
    if snap.advice is None:
        return NOT_ADVISING
    return json.dumps({"advice": [r.as_dict() for r in snap.advice]}, indent=1)


HISTORY_DEFAULT, HISTORY_MAX = 20, 10000


def _history_line(r: dict) -> str:
    """One record as a table row; whatever a hand-edited line holds, never an error."""
    def field(key: str) -> str:
        value = r.get(key)
        return "-" if value in (None, "", []) else value_text(value)

    netns = field("netns") if r.get("netns") else field("cookie")
    return (f"{field('time')[:19]:<19} {field('kind'):<14} {field('tuner'):<12} "
            f"{field('tunable'):<36} {netns:<16} ({field('old')}) -> ({field('new')}) "
            f"{field('verdict')} {field('reason')}")


def history(snap: Snapshot, argument: str) -> str:
    """The audit trail's last N records (``history N``; 20 without N), oldest first, read
    from its files: records of earlier runs show too."""
    try:
        n = int(argument) if argument else HISTORY_DEFAULT
    except ValueError:
        n = 0
    if not 1 <= n <= HISTORY_MAX:
        return f"error: history takes a number of records from 1 to {HISTORY_MAX}"
    try:
        records = snap.audit.history(n)
    except OSError as e:
        return f"error: cannot read audit trail '{snap.audit.path}': {e.strerror or e}"
    if not records:
        return f"# no records in audit trail '{snap.audit.path}'"
    header = (f"{'TIME (UTC)':<19} {'KIND':<14} {'TUNER':<12} {'TUNABLE':<36} {'NETNS':<16} "
              f"OLD -> NEW VERDICT REASON")
    return "\n".join([header, *map(_history_line, records)])  # the client ends the line


QUERIES = (
    Query("help", "list supported queries", help_text),
    Query("tuners", "show state of tuners", tuners),
    Query("tunables", "show list of tunables", tunables),
    Query("jtunables", "show list of tunables(json)", jtunables),
    Query("summary", "show summary of changes", summary, summaries=True),
    Query("status", "show status of tunables", status),
    Query("jstatus", "show status of tunables(json)", jstatus),
    Query("rollback", "show changes needed to roll back", rollback),
    Query("state", "complete state for machines(json)", state),
    Query("jadvice", "show recommendations(json)", jadvice),
    Query("advice", "show recommendations (advice mode)", advice),
    Query("history", "show last N audit records (20)", history, argument=True),
)
