"""``bpftune-render``: Grafana dashboards, pmlogger and pmie configuration rendered from
the engine's registry of tuners, so they never drift from what the PMDA serves.

  bpftune-render grafana OUTDIR [--vector-type ID] [--valkey-type ID]
  bpftune-render pcp OUTDIR [--interval 10sec]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jinja2

from bpftune import metrics
from bpftune.paths import data_dir
from bpftune.plugins import builtin_tuners

# grafana-pcp's datasource type ids (upstream); Fedora/RHEL builds use pcp-*-datasource.
VECTOR_TYPE = "performancecopilot-vector-datasource"
VALKEY_TYPE = "performancecopilot-valkey-datasource"
UNITS = {"bytes": "bytes", "pages": "short", "": "short"}


def registry() -> list[dict]:
    """Built-in tuners as the templates see them: what has metrics, and their names."""
    tuners = []
    for cls in builtin_tuners():
        if cls.reports_only:
            continue
        tunables = [{"name": t.name, "values": t.values, "positions": list(t.position_names()),
                     "unit": UNITS.get(t.unit, "short"), "pages": t.unit == "pages",
                     "metrics": metrics.tunable_metrics(cls.name, t.name)}
                    for t in cls.tunables if t.sysctl and t.values >= 1]
        scenarios = [{"name": s.name, "description": s.description, "routine": s.routine,
                      "metric": metrics.scenario_metric(cls.name, s.name)}
                     for s in cls.scenarios]
        published = [{"name": p.name, "help": p.help, "instances": p.instances,
                      "unit": "ops" if p.counter else UNITS.get(p.unit, "short"),
                      "metric": metrics.published_metric(cls.name, p.name),
                      "counter": p.counter, "alarm": p.alarm, "alarm_help": p.alarm_help}
                     for p in cls.published]
        tuners.append({"name": cls.name, "tunables": tunables, "scenarios": scenarios,
                       "published": published, "strategies": [s.name for s in cls.strategies]})
    return tuners


def _environment(directory: Path) -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(directory),
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                              trim_blocks=True, lstrip_blocks=True)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _json(text: str, name: str) -> str:
    """Parse what a template produced (a template bug fails here, not in Grafana) and write
    it in one canonical layout, so packaged files compare byte for byte with a fresh render."""
    try:
        return json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    except ValueError as e:
        raise SystemExit(f"bpftune-render: {name} is not valid JSON: {e}") from None


def render_grafana(out: Path, vector_type: str = VECTOR_TYPE,
                   valkey_type: str = VALKEY_TYPE) -> list[Path]:
    env = _environment(data_dir("grafana", "overview.json.j2"))
    tuners = registry()
    written = []
    flavours = {"vector": vector_type, "valkey": valkey_type}
    for flavour, ds_type in flavours.items():
        common = {"flavour": flavour, "datasource_type": ds_type, "tuners": tuners,
                  "daemon": metrics.DAEMON, "tuner_metrics": metrics.TUNER}
        pages = [("bpftune-overview.json", "overview.json.j2", {})]
        pages += [(f"bpftune-{t['name']}.json", "tuner.json.j2", {"tuner": t})
                  for t in tuners if t["tunables"] or t["scenarios"]]
        for filename, template, extra in pages:
            text = env.get_template(template).render(**common, **extra)
            path = out / flavour / filename
            _write(path, _json(text, str(path)))
            written.append(path)
    for template, path in (("dashboards.yaml.j2", "provisioning/dashboards/bpftune.yaml"),
                           ("datasources.yaml.j2", "provisioning/datasources/bpftune-pcp.yaml")):
        _write(out / path, env.get_template(template).render(vector_type=vector_type,
                                                              valkey_type=valkey_type))
        written.append(out / path)
    return written


def render_pcp(out: Path, interval: str = "10 sec") -> list[Path]:
    env = _environment(data_dir("pmlogger", "bpftune.config.j2"))
    tuners = registry()
    context = {"tuners": tuners, "interval": interval, "tuner_metrics": metrics.TUNER,
               "scenarios": [s for t in tuners for s in t["scenarios"]],
               "subtrees": metrics.subtrees(t["name"] for t in tuners
                                            if t["tunables"] or t["scenarios"])}
    files = {
        "pmlogconf/bpftune/summary": "pmlogconf.j2",
        "pmlogger/bpftune.config": "bpftune.config.j2",
        "pmieconf/bpftune/tuner_disabled": "pmieconf-tuner-disabled.j2",
        "pmieconf/bpftune/advice": "pmieconf-advice.j2",
    }
    for path, template in files.items():
        _write(out / path, env.get_template(template).render(**context))
    # One rule per tuner: pmieconf refuses a predicate string past about 2 KB.
    repeated = env.get_template("pmieconf-scenario-repeated.j2")
    for tuner in tuners:
        alarming = [s for s in tuner["scenarios"] if not s["routine"]]
        if alarming:
            path = f"pmieconf/bpftune/scenario_repeated_{tuner['name']}"
            _write(out / path, repeated.render(tuner=tuner["name"], scenarios=alarming))
            files[path] = ""
    alarm = env.get_template("pmieconf-published-alarm.j2")
    for tuner in tuners:
        for p in tuner["published"]:
            if p["alarm"] is not None:
                path = f"pmieconf/bpftune/{tuner['name']}_{p['name']}"
                _write(out / path, alarm.render(tuner=tuner["name"], published=p))
                files[path] = ""
    return [out / p for p in files]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bpftune-render", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    g = sub.add_parser("grafana", help="Grafana dashboards and provisioning files")
    g.add_argument("outdir", type=Path)
    g.add_argument("--vector-type", default=VECTOR_TYPE, help="PCP Vector datasource type id")
    g.add_argument("--valkey-type", default=VALKEY_TYPE, help="PCP Valkey datasource type id")
    c = sub.add_parser("pcp", help="pmlogconf group, pmlogger config, pmieconf rules")
    c.add_argument("outdir", type=Path)
    c.add_argument("--interval", default="10 sec",
                   help='pmlogger sampling interval, e.g. "10 sec" or "500 msec"')
    args = p.parse_args(argv)
    try:
        if args.what == "grafana":
            written = render_grafana(args.outdir, args.vector_type, args.valkey_type)
        else:
            written = render_pcp(args.outdir, args.interval)
    except (OSError, jinja2.TemplateError) as e:
        sys.stderr.write(f"bpftune-render: {e}\n")
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
