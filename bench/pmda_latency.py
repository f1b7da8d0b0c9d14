#!/usr/bin/env python3
"""How fast `pminfo -f bpftune` answers, with the daemon running (100+ values) and down,
side by side with pmcd's own metrics as the baseline; and the PMDA's memory.

Run as root from a checkout (after scripts/setup.sh):  .venv/bin/python bench/pmda_latency.py
The PMDA is installed from the checkout for the run and removed afterwards if it was not
installed before.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from record import Figure

from helpers import Hosts, Sysctls, daemon, transfer_both_ways
from pcp_helpers import PMDAS_DIR, pmda_installed
from test_tcp_buffer import squeeze_buffers

ROUNDS = 40
PMINFO_ROUNDS = 10
FETCH = """
import sys, time, json
from pcp import pmapi
import cpmapi as c
ctx = pmapi.pmContext(c.PM_CONTEXT_HOST, "local:")
def ids(root):
    names = []
    ctx.pmTraversePMNS(root, names.append)
    return ctx.pmLookupName(names)
def fetch(pmids):
    t = time.perf_counter()
    r = ctx.pmFetch(pmids)
    ms = (time.perf_counter() - t) * 1000
    n = sum(max(r.contents.get_numval(i), 0) for i in range(r.contents.numpmid))
    ctx.pmFreeResult(r)
    return ms, n
ours, base = ids("bpftune"), ids("pmcd")
out = {"ours": [], "base": [], "values": 0}
for _ in range(int(sys.argv[1])):   # alternate, so both see the same machine state
    ms, out["values"] = fetch(ours)
    out["ours"].append(ms)
    out["base"].append(fetch(base)[0])
print(json.dumps(out))
"""


def fetch_latencies(rounds: int) -> dict:
    import json

    r = subprocess.run(["/usr/bin/python3", "-c", FETCH, str(rounds)], check=True,
                       capture_output=True, text=True)
    return json.loads(r.stdout)


def pminfo_ms(args: list[str], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        subprocess.run(["pminfo", *args], check=True, capture_output=True)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def pmda_rss_mib() -> float:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"pmdabpftune.python" in cmdline:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            continue
    return float("nan")


def measure(case: str, rounds: int, pminfo_rounds: int) -> dict:
    time.sleep(2)  # let the PMDA poll the new state
    lat = fetch_latencies(rounds)
    return {
        "case": case,
        "values": lat["values"],
        "rounds": len(lat["ours"]),
        "ours": statistics.median(lat["ours"]),
        "ours_p90": statistics.quantiles(lat["ours"], n=10)[-1],
        "base": statistics.median(lat["base"]),
        "pminfo": pminfo_ms(["-f", "bpftune"], pminfo_rounds),
        "pminfo_base": pminfo_ms(["-f", "pmcd"], pminfo_rounds),
        "rss": pmda_rss_mib(),
    }


def tuned_daemon_rows(tmp: Path, rounds: int, pminfo_rounds: int) -> list[dict]:
    sysctls = Sysctls()
    hosts = [Hosts(ns=f"bpftune-bench-{i}", global_if=f"btb{i}0", ns_if=f"btb{i}1",
                   global_addr=f"10.231.{10 + i}.1", ns_addr=f"10.231.{10 + i}.2")
             for i in range(2)]
    try:
        for h in hosts:
            h.create()
        for ns in [None] + [h.ns for h in hosts]:
            squeeze_buffers(sysctls, ns)
        with daemon(tmp / "daemon"):
            for h in hosts:
                transfer_both_ways(h)
            running = measure("daemon running", rounds, pminfo_rounds)
        down = measure("daemon down", rounds, pminfo_rounds)
    finally:
        for h in hosts:
            h.destroy()
        sysctls.restore()
    return [running, down]


def rows(tmp: Path, rounds: int = ROUNDS, pminfo_rounds: int = PMINFO_ROUNDS) -> list[dict]:
    """Both cases, with the PMDA installed from the checkout for the run unless it is
    installed already."""
    if PMDAS_DIR.exists():
        return tuned_daemon_rows(tmp, rounds, pminfo_rounds)
    with pmda_installed():
        return tuned_daemon_rows(tmp, rounds, pminfo_rounds)


def figures(measured: list[dict]) -> list[Figure]:
    """The figures bench/run records: fetch time against issue 13's 1 ms, and the rest."""
    running, down = measured
    rounds = f"median of {running['rounds']}, p90 {running['ours_p90']:.2f} ms"
    return [
        Figure("pmda.fetch", "PMDA: pmFetch of every bpftune metric", running["ours"], "ms",
               "< 1", detail=f"{running['values']} values, {rounds}"),
        Figure("pmda.fetch_ratio", "PMDA: fetch / pmcd's own metrics' fetch",
               running["ours"] / running["base"], detail=f"pmcd {running['base']:.2f} ms"),
        Figure("pmda.pminfo", "PMDA: pminfo -f bpftune", running["pminfo"], "ms", digits=1,
               detail=f"pminfo -f pmcd {running['pminfo_base']:.1f} ms"),
        Figure("pmda.fetch_down", "PMDA: pmFetch, daemon down", down["ours"], "ms",
               detail=f"{down['values']} values"),
        Figure("pmda.rss", "PMDA: VmRSS", running["rss"], "MiB", digits=1),
    ]


def main() -> int:
    if os.geteuid() != 0:
        print("pmda_latency: run as root", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        measured = rows(Path(tmp))
    print(f"pmFetch of every bpftune metric vs pmcd's own metrics (baseline), {ROUNDS} "
          f"alternated rounds; `pminfo -f`, median of {PMINFO_ROUNDS}")
    print(f"{'case':16} {'values':>6} {'fetch ms':>9} {'p90':>6} {'base ms':>8} {'ratio':>6} "
          f"{'pminfo ms':>10} {'base':>6} {'ratio':>6} {'PMDA RSS MiB':>13}")
    for r in measured:
        print(f"{r['case']:16} {r['values']:6d} {r['ours']:9.2f} {r['ours_p90']:6.2f} "
              f"{r['base']:8.2f} {r['ours'] / r['base']:6.2f} {r['pminfo']:10.1f} "
              f"{r['pminfo_base']:6.1f} {r['pminfo'] / r['pminfo_base']:6.2f} {r['rss']:13.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
