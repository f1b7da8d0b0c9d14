"""Benchmark figures, the record of a run (one JSON file in bench/results/) and the
comparison with an earlier record.

A record holds the date, the machine (kernel, CPUs, RAM, distro), the versions that shape
the figures (Python, BCC, libbpf, PCP, pyroute2, iperf3, stress-ng), the git commit, the
command and every figure with its target. The baseline for a comparison is the latest
record committed to git (of the same mode, full or --quick, when there is one), so that
"better or worse than last time" means better or worse than the last clean run someone
chose to keep.
"""

from __future__ import annotations

import ctypes
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
TARGET = re.compile(r"(<=|>=|<|>)\s*([\d.]+)")


@dataclass
class Figure:
    """One measured figure. ``value`` None means "n/a" (nothing to measure on this code)."""

    key: str  # stable across runs: the comparison matches figures by it
    label: str
    value: float | str | None
    unit: str = ""
    target: str = ""  # "<= 40", ">= 0.99" or a word the value must equal ("no")
    digits: int = 2
    detail: str = ""  # medians, spreads, counts: what the value alone does not say

    def __post_init__(self) -> None:
        if isinstance(self.value, float) and math.isnan(self.value):
            self.value = None  # nothing measured (JSON has no NaN)

    def shown(self) -> str:
        if self.value is None:
            return "n/a"
        if isinstance(self.value, str):
            return self.value
        return f"{self.value:.{self.digits}f}"

    def met(self) -> str:
        """'yes', 'NO', or '' when there is no target or no value."""
        if not self.target or self.value is None:
            return ""
        m = TARGET.fullmatch(self.target)
        if m is None or isinstance(self.value, str):
            return "yes" if str(self.value) == self.target else "NO"
        op, bound = m.group(1), float(m.group(2))
        ok = {"<=": self.value <= bound, ">=": self.value >= bound, "<": self.value < bound,
              ">": self.value > bound}[op]
        return "yes" if ok else "NO"


# The machine and the software: what a reader needs to judge whether two runs compare.
def _first_line(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = (out.stdout or out.stderr).splitlines()
    return lines[0].strip() if lines else None


def _field(path: str, name: str, sep: str = ":") -> str | None:
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    m = re.search(rf"^{re.escape(name)}\s*{sep}\s*(.+)$", text, re.M)
    return m.group(1).strip().strip('"') if m else None


def machine() -> dict:
    mem = _field("/proc/meminfo", "MemTotal")
    return {"kernel": platform.release(), "arch": platform.machine(),
            "cpus": os.cpu_count(), "cpu_model": _field("/proc/cpuinfo", "model name"),
            "ram_mib": int(mem.split()[0]) // 1024 if mem else None,
            "distro": _field("/etc/os-release", "PRETTY_NAME", "=")}


def _package(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _libbpf() -> str | None:
    try:
        fn = ctypes.CDLL("libbpf.so.1").libbpf_version_string
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_char_p
    return fn().decode()


def _version(cmd: list[str]) -> str | None:
    line = _first_line(cmd)
    m = re.search(r"\d+(\.\d+)+", line or "")
    return m.group(0) if m else None


def versions() -> dict:
    return {"python": platform.python_version(), "bcc": _package("bcc"), "libbpf": _libbpf(),
            "pcp": _version(["pminfo", "--version"]), "pyroute2": _package("pyroute2"),
            "iperf3": _version(["iperf3", "--version"]),
            "stress-ng": _version(["stress-ng", "--version"])}


def git_state() -> dict:
    commit = _first_line(["git", "-C", str(REPO), "rev-parse", "HEAD"])
    status = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", ".",
                             ":!bench/results"], capture_output=True, text=True)
    return {"commit": commit, "dirty": bool(status.stdout.strip()) if commit else None}


def new_record(command: str, quick: bool, sections: list[str]) -> dict:
    """The run's facts, taken before it starts (the git state is the code measured)."""
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": command, "quick": quick, "sections": sections,
            "machine": machine(), "versions": versions(), "git": git_state()}


def save(record: dict, figures: list[Figure], directory: Path = RESULTS) -> Path:
    record = {**record, "figures": [asdict(f) for f in figures]}
    directory.mkdir(parents=True, exist_ok=True)
    stamp = record["date"][:19].replace(":", "")
    path = directory / f"{stamp}{'-quick' if record['quick'] else ''}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def load(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"bench: cannot read {path}: {e}") from None
    if not isinstance(record, dict) or "figures" not in record:
        raise SystemExit(f"bench: {path} is not a benchmark record")
    return record


def _committed(directory: Path) -> list[Path]:
    """The records committed to git (all on disk when this is not a git checkout)."""
    rel = directory.relative_to(REPO)
    out = subprocess.run(["git", "-C", str(REPO), "ls-tree", "-r", "--name-only", "HEAD",
                          "--", str(rel)], capture_output=True, text=True)
    if out.returncode != 0:
        return sorted(directory.glob("*.json"))
    return [REPO / line for line in out.stdout.splitlines() if line.endswith(".json")]


def baseline(quick: bool, directory: Path = RESULTS) -> Path | None:
    """The latest committed record, preferring one of the same mode (full or quick)."""
    records = [(load(p), p) for p in _committed(directory)]
    same = [r for r in records if r[0].get("quick", False) == quick]
    latest = max(same or records, key=lambda r: r[0]["date"], default=None)
    return latest[1] if latest else None


# Printing.
def describe(record: dict) -> str:
    m, v, g = record["machine"], record["versions"], record["git"]
    dirty = " (uncommitted changes)" if g.get("dirty") else ""
    return (f"{record['date']}{', quick' if record.get('quick') else ''}: {m['distro']}, "
            f"kernel {m['kernel']}, {m['cpus']} CPUs ({m['cpu_model']}), "
            f"{m['ram_mib']} MiB; Python {v['python']}, BCC {v['bcc']}, libbpf {v['libbpf']}, "
            f"PCP {v['pcp']}; commit {(g.get('commit') or '?')[:12]}{dirty}; "
            f"`{record['command']}`")


def differences(new: dict, old: dict) -> list[str]:
    """What differs between two runs' conditions, so a reader knows what the ratio covers."""
    out = []
    for part in ("machine", "versions"):
        for key, value in new[part].items():
            if old.get(part, {}).get(key) != value:
                out.append(f"{key} {old.get(part, {}).get(key)} -> {value}")
    if new.get("quick") != old.get("quick"):
        out.append("mode " + ("quick" if old.get("quick") else "full") + " -> "
                   + ("quick" if new.get("quick") else "full"))
    return out


def _as_figure(saved: dict) -> Figure:
    fields = Figure.__dataclass_fields__
    return Figure(**{k: v for k, v in saved.items() if k in fields})


def _ratio(new: Figure, old: dict | None) -> str:
    if old is None or isinstance(new.value, str) or new.value is None:
        return ""
    if not isinstance(old.get("value"), int | float) or old["value"] == 0:
        return ""
    return f"{new.value / old['value']:.3f}"


def table(figures: list[Figure], old: dict | None = None) -> str:
    """One line per figure: value, target and whether it is met; with ``old`` (a record),
    the old value and new/old beside it."""
    previous = {f["key"]: f for f in old["figures"]} if old else {}
    head = f"{'measure':54} {'value':>9} {'target':>7} {'met':>3}"
    if old:
        head += f" {'last':>9} {'new/old':>7}"
    lines = [head + "  detail"]
    for f in figures:
        label = f"{f.label} {f.unit}".rstrip()
        line = f"{label:54} {f.shown():>9} {f.target:>7} {f.met():>3}"
        if old:
            p = previous.get(f.key)
            last = _as_figure(p).shown() if p else "-"
            line += f" {last:>9} {_ratio(f, p):>7}"
        lines.append((line + "  " + f.detail).rstrip())
    return "\n".join(lines)
