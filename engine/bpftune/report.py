"""What the query interface answers: upstream's queries in upstream's formats, and the
complete state as JSON for machines (the PCP PMDA)."""

from __future__ import annotations

import json
import os
import resource
import time
from typing import TYPE_CHECKING

from bpftune import __version__
from bpftune.changes import GLOBAL
from bpftune.metrics import scenario_metric, tunable_metrics
from bpftune.query import Query
from bpftune.sysctl import Value, format_value

if TYPE_CHECKING:
    from bpftune.engine import Engine
    from bpftune.tuner import Tunable, Tuner

STATE_VERSION = 1


def _quoted(value: Value) -> str:
    return f'"{value}"' if isinstance(value, str) else format_value(value)


def _sysctl_tunables(tuner: Tuner) -> list[Tunable]:
    return [t for t in tuner.tunables if t.sysctl]


def _live_global(engine: Engine, tuner: Tuner) -> dict[str, Value]:
    return engine.changes.read_many(_sysctl_tunables(tuner), GLOBAL)


def help_text(engine: Engine) -> str:
    return "".join(f"{q.name:>20} {q.description:>40}\n" for q in QUERIES)


def tuners(engine: Engine) -> str:
    return "".join(f"{t.name:>20} {t.state.value:>20}\n" for t in engine.tuners)


def tunables(engine: Engine) -> str:
    return "".join(f"{tuner.name:>16} {t.name:>50} {'string' if t.string else 'integer':>8} "
                   f"{t.values:2d}\n" for tuner in engine.tuners for t in tuner.tunables)


def _tab_json(objects: list[tuple[str, list[str]]]) -> str:
    """Upstream's tab-indented JSON: {"tuner":{ entries }, ...}, always valid JSON (upstream
    leaves a trailing comma when a tuner's last tunable is not a sysctl)."""
    blocks = []
    for name, entries in objects:
        body = ",\n".join(f"\t\t{e}" for e in entries)
        blocks.append(f'\t"{name}":{{\n{body}\n\t}}' if entries else f'\t"{name}":{{\n\t}}')
    return "{\n" + ",\n".join(blocks) + "\n}"


def jtunables(engine: Engine) -> str:
    return _tab_json([
        (tuner.name, [f'"{t.name}":{{\n\t\t\t"type":"{"string" if t.string else "integer"}",'
                      f'\n\t\t\t"num_values":{t.values}\n\t\t}}' for t in tuner.tunables])
        for tuner in engine.tuners])


def status(engine: Engine) -> str:
    """Live values, read from the kernel now (upstream shows values cached at start)."""
    return "".join(f"{tuner.name:>16} {name:>50} {_quoted(value):>34}\n"
                   for tuner in engine.tuners
                   for name, value in _live_global(engine, tuner).items())


def jstatus(engine: Engine) -> str:
    def entry(name: str, value: Value) -> str:
        if isinstance(value, str):
            return f'"{name}": "{value}" '
        if len(value) > 1:
            return f'"{name}":[ {", ".join(map(str, value))} ]'
        return f'"{name}": {value[0]} '

    return _tab_json([(tuner.name, [entry(n, v) for n, v in _live_global(engine, tuner).items()])
                      for tuner in engine.tuners])


def summary(engine: Engine) -> str:
    lines = ["# Summary of changes made across all tuners:"]
    for tuner in engine.tuners:
        lines += tuner.summarize() + engine.changes.summary(tuner)
    return "\n".join(lines) + "\n"


def rollback(engine: Engine) -> str:
    lines = ["# Summary of rollback operations needed to restore original state for all tuners:"]
    for r in engine.changes.records.values():
        if r.original == r.current:
            continue
        original = r.original if isinstance(r.original, str) else format_value(tuple(r.original))
        command = f'sysctl -w {r.tunable}="{original}"'
        if r.cookie != GLOBAL:
            command = f"{engine.namespaces.command_prefix(r.cookie)} {command}"
        lines += [f"# To roll back changes to '{r.tunable}', run the following as a privileged "
                  f"user in a terminal:", command]
    return "\n".join(lines) + "\n"


def _values(value: Value | None) -> list[int] | str | None:
    return value if value is None or isinstance(value, str) else list(value)


def _tunable_state(engine: Engine, tuner: Tuner, t: Tunable,
                   live: dict[int, dict[str, Value]]) -> dict:
    netns = {}
    for cookie, values in live.items():
        if cookie != GLOBAL and not t.namespaced:
            continue
        record = engine.changes.records.get((t.name, cookie))
        current = values.get(t.name)
        if current is None and record is None:
            continue
        netns[str(cookie)] = {
            "current": _values(current),
            "original": record.original if record else _values(current),
            "changes": record.changes if record else 0,
            "last_change": record.last_change if record else None,
        }
    return {"name": t.name, "type": "string" if t.string else "integer", "values": t.values,
            "metrics": tunable_metrics(tuner.name, t.name),
            "positions": list(t.position_names()), "unit": t.unit, "namespaced": t.namespaced,
            "sysctl": t.sysctl, "netns": netns}


def _tuner_state(engine: Engine, tuner: Tuner, live: dict[int, dict[str, Value]]) -> dict:
    counts: dict[int, dict[str, int]] = {}
    for (tname, _tunable, scenario, cookie), n in engine.changes.scenario_counts.items():
        if tname == tuner.name:
            per_netns = counts.setdefault(scenario, {})
            per_netns[str(cookie)] = per_netns.get(str(cookie), 0) + n
    return {
        "name": tuner.name,
        "id": tuner.id,
        "cluster": tuner.cluster(),
        "state": tuner.state.value,
        "manual_netns": sorted(c for (name, c) in engine.changes.manual if name == tuner.name),
        "strategy": tuner.strategy.name if tuner.strategy else None,
        "strategies": [{"name": s.name, "description": s.description}
                       for s in tuner.strategies],
        "tunables": [_tunable_state(engine, tuner, t, live) for t in tuner.tunables],
        "scenarios": [{"id": i, "name": s.name, "description": s.description,
                       "metric": scenario_metric(tuner.name, s.name),
                       "counts": counts.get(i, {})} for i, s in enumerate(tuner.scenarios)],
    }


def _active_cookies(engine: Engine) -> list[int]:
    """The global netns, and others that still exist where bpftune did or was told
    something (namespaces that are gone are not looked for again here: this runs every
    second for the PMDA)."""
    cookies = {r.cookie for r in engine.changes.records.values()}
    cookies |= {key[3] for key in engine.changes.scenario_counts}
    cookies |= {c for (_, c) in engine.changes.manual}
    return sorted({GLOBAL} | {c for c in cookies if engine.namespaces.has(c)})


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def state(engine: Engine) -> str:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cookies = _active_cookies(engine)
    programs = engine.programs
    daemon = {
        "pid": os.getpid(),
        "version": __version__,
        "started": engine.started,
        "uptime": time.time() - engine.started,
        "learning_rate": engine.learning_rate.rate,
        "rollback": engine.options.rollback,
        "events_received": programs.events_received if programs else 0,
        "events_dropped": programs.events_dropped if programs else 0,
        "bpf_programs": sum(len(t.bpf.funcs) for t in engine.tuners if t.bpf is not None),
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "rss_bytes": _rss_bytes(),
    }
    netns = {str(c): {"name": engine.namespaces.name(c), "global": c == GLOBAL}
             for c in cookies}
    sysctls = [t for tuner in engine.tuners for t in tuner.tunables if t.sysctl]
    live = {c: engine.changes.read_many([t for t in sysctls if c == GLOBAL or t.namespaced], c)
            for c in cookies}  # one switch into each namespace
    return json.dumps({"version": STATE_VERSION, "daemon": daemon, "netns": netns,
                       "tuners": [_tuner_state(engine, t, live) for t in engine.tuners]})


QUERIES = (
    Query("help", "list supported queries", help_text),
    Query("tuners", "show state of tuners", tuners),
    Query("tunables", "show list of tunables", tunables),
    Query("jtunables", "show list of tunables(json)", jtunables),
    Query("summary", "show summary of changes", summary),
    Query("status", "show status of tunables", status),
    Query("jstatus", "show status of tunables(json)", jstatus),
    Query("rollback", "show changes needed to roll back", rollback),
    Query("state", "complete state for machines(json)", state),
)
