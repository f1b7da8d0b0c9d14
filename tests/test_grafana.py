"""Grafana dashboards rendered from the registry: schema, lint, golden files, and every
panel's metric fetched live through pmproxy (the API PCP's Vector datasource uses)."""

from __future__ import annotations

import json
import os
import re
import shutil
import urllib.parse
import urllib.request
from pathlib import Path

import jsonschema
import pytest

from bpftune.render import VALKEY_TYPE, VECTOR_TYPE, render_grafana
from helpers import metrics_this_kernel_lacks

SCHEMAS = Path(__file__).resolve().parents[2] / "shared" / "grafana-schema"
GOLDEN = Path(__file__).parent / "golden" / "grafana"
PANEL_SCHEMAS = {"timeseries": "timeseries", "stat": "stat", "table": "table",
                 "state-timeline": "statetimeline", "text": "text", "gauge": "gauge",
                 "bargauge": "bargauge", "heatmap": "heatmap"}
ANGULAR = {"graph", "singlestat", "table-old"}
BUILTIN_VARIABLES = {"__interval", "__interval_ms", "__range", "__rate_interval", "__from",
                     "__to", "__dashboard", "__user", "__org", "timeFilter"}
PCP_LEGEND_VARIABLES = {"instance", "metric", "metric0", "expr"}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("grafana")
    render_grafana(out)
    return out


def dashboards(out: Path) -> list[tuple[str, dict]]:
    return [(f"{p.parent.name}/{p.name}", json.loads(p.read_text()))
            for p in sorted(out.glob("*/*.json"))]


def schema(name: str) -> dict:
    return json.loads((SCHEMAS / f"{name}.jsonschema.json").read_text())


def without_required(node):
    """Option schemas mark as required what Grafana fills in with defaults."""
    if isinstance(node, dict):
        return {k: without_required(v) for k, v in node.items() if k != "required"}
    if isinstance(node, list):
        return [without_required(v) for v in node]
    return node


def test_every_tuner_with_metrics_has_a_dashboard_in_both_flavours(rendered):
    names = {name for name, _ in dashboards(rendered)}
    for flavour in ("vector", "valkey"):
        assert {f"{flavour}/bpftune-overview.json", f"{flavour}/bpftune-tcp_buffer.json",
                f"{flavour}/bpftune-netns.json"} <= names


def test_dashboards_validate_against_grafana_schema(rendered):
    dashboard_schema = schema("dashboard")
    for name, d in dashboards(rendered):
        jsonschema.validate(d, dashboard_schema)  # raises with the path of the problem
        for panel in d["panels"]:
            kind = PANEL_SCHEMAS[panel["type"]]
            options = without_required(schema(kind))
            definitions = options["definitions"]
            top = next(k for k in definitions if k.lower() == "options")
            jsonschema.validate(panel["options"], {"definitions": definitions,
                                                   "$ref": f"#/definitions/{top}"})
            custom = next((k for k in definitions if k.lower() == "fieldconfig"), None)
            if custom and panel["fieldConfig"]["defaults"]["custom"]:
                jsonschema.validate(panel["fieldConfig"]["defaults"]["custom"],
                                    {"definitions": definitions,
                                     "$ref": f"#/definitions/{custom}"}), name


def overlaps(a: dict, b: dict) -> bool:
    return (a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"]
            and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"])


def test_lint_ids_grid_datasources_and_variables(rendered):
    uids = set()
    for name, d in dashboards(rendered):
        assert d["uid"] not in uids and len(d["uid"]) <= 40, name
        uids.add(d["uid"])
        variables = {v["name"] for v in d["templating"]["list"]}
        ds_type = VALKEY_TYPE if name.startswith("valkey/") else VECTOR_TYPE
        ds = {"type": ds_type, "uid": "${datasource}"}
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        for i, p in enumerate(d["panels"]):
            g = p["gridPos"]
            assert 0 <= g["x"] < 24 and g["w"] > 0 and g["x"] + g["w"] <= 24, (name, p["title"])
            for q in d["panels"][i + 1:]:
                assert not overlaps(g, q["gridPos"]), f"{name}: {p['title']} / {q['title']}"
            assert p["type"] not in ANGULAR
            assert p["datasource"] == ds
            assert p["targets"], f"{name}: {p['title']} has no query"
            refs = [t["refId"] for t in p["targets"]]
            assert len(refs) == len(set(refs))
            for t in p["targets"]:
                assert t["datasource"] == ds
                used = set(re.findall(r"\$\{?(\w+)", t["expr"]))
                assert used <= variables | BUILTIN_VARIABLES, (name, t["expr"])
                legend = set(re.findall(r"\$\{?(\w+)", t["legendFormat"]))
                assert legend <= variables | PCP_LEGEND_VARIABLES, (name, t["legendFormat"])
        if name.startswith("valkey/"):
            assert "host" in variables
            exprs = [t["expr"] for p in d["panels"] for t in p["targets"]]
            assert all(e.endswith('{hostname == "$host"}') for e in exprs)


def test_datasource_type_is_a_render_parameter(tmp_path):
    render_grafana(tmp_path, vector_type="pcp-vector-datasource",
                   valkey_type="pcp-valkey-datasource")
    text = "".join(p.read_text() for p in tmp_path.rglob("*.json"))
    assert "performancecopilot-" not in text
    assert '"type": "pcp-vector-datasource"' in text and '"pcp-valkey-datasource"' in text
    provisioning = (tmp_path / "provisioning/datasources/bpftune-pcp.yaml").read_text()
    assert "type: pcp-vector-datasource" in provisioning


def test_golden_files(rendered):
    """Rendered output is committed; a template change shows up as a diff here. To accept
    one: BPFTUNE_UPDATE_GOLDEN=1 scripts/test -k golden"""
    fresh = {p.relative_to(rendered): p.read_text() for p in rendered.rglob("*") if p.is_file()}
    if os.environ.get("BPFTUNE_UPDATE_GOLDEN"):
        shutil.rmtree(GOLDEN, ignore_errors=True)
        for rel, text in fresh.items():
            (GOLDEN / rel).parent.mkdir(parents=True, exist_ok=True)
            (GOLDEN / rel).write_text(text)
    golden = {p.relative_to(GOLDEN): p.read_text() for p in GOLDEN.rglob("*") if p.is_file()}
    assert sorted(map(str, fresh)) == sorted(map(str, golden))
    for rel, text in fresh.items():
        assert text == golden[rel], f"{rel} differs from tests/golden/grafana/{rel}"


def pmproxy_fetch(metric: str) -> dict:
    url = "http://localhost:44322/pmapi/fetch?" + urllib.parse.urlencode({"names": metric})
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def test_every_vector_panel_metric_has_values_through_pmproxy(rendered, tuned_pmda):
    metrics = {t["expr"] for name, d in dashboards(rendered) if name.startswith("vector/")
               for p in d["panels"] for t in p["targets"]}
    empty = []
    lacking = metrics_this_kernel_lacks()
    for metric in sorted(m for m in metrics if m.split("{")[0] not in lacking):
        reply = pmproxy_fetch(metric)
        values = [i for v in reply.get("values", []) for i in v["instances"]]
        if not values:
            empty.append(metric)
    assert not empty, f"no values through pmproxy for {empty}"
