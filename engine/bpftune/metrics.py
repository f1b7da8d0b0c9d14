"""Names of bpftune's PCP metrics: one definition for the daemon's state (which the PMDA
serves from) and for the Grafana, pmlogger and pmie templates, so they cannot drift."""

from __future__ import annotations

import re
from collections.abc import Iterable

PREFIX = "bpftune"


def slug(text: str) -> str:
    """A PMNS name component: lower case letters, digits and underscores."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def tunable_metrics(tuner: str, sysctl: str) -> dict[str, str]:
    """current keeps upstream's name (bpftune.<tuner>.<sysctl>)."""
    return {
        "current": f"{PREFIX}.{tuner}.{sysctl}",
        "original": f"{PREFIX}.{tuner}.original.{sysctl}",
        "changes": f"{PREFIX}.{tuner}.changes.{sysctl}",
        "last_change": f"{PREFIX}.{tuner}.last_change.{sysctl}",
    }


def subtrees(tuners: Iterable[str]) -> list[str]:
    """Every part of the PMNS bpftune's PMDA serves, for pmlogger configurations."""
    return [f"{PREFIX}.daemon", f"{PREFIX}.tuner", f"{PREFIX}.advice",
            *(f"{PREFIX}.{t}" for t in tuners)]


def published_metric(tuner: str, name: str) -> str:
    return f"{PREFIX}.{tuner}.{name}"


def scenario_metric(tuner: str, scenario: str) -> str:
    return f"{PREFIX}.{tuner}.scenarios.{slug(scenario)}"


# Metrics of the PMDA's fixed part (pmda/pmdabpftune.python registers them).
DAEMON = {name: f"{PREFIX}.daemon.{name}" for name in (
    "up", "version", "pid", "uptime", "learning_rate", "rollback", "events.received",
    "events.dropped", "bpf.programs", "cpu", "rss", "advise")}
TUNER = {name: f"{PREFIX}.tuner.{name}" for name in (
    "state", "state_code", "strategy", "changes", "scenarios", "manual_netns",
    "strategy_evaluation", "advice", "verdict.kept", "verdict.reverted",
    "verdict.inconclusive", "verifying", "held")}
ADVICE = {name: f"{PREFIX}.advice.{name}" for name in (
    "proposed", "current", "proposals", "last", "command")}
