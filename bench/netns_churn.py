#!/usr/bin/env python3
"""Namespace churn: does the daemon stay the same size as namespaces come and go?

Run as root from a checkout:  .venv/bin/python bench/netns_churn.py [COUNT]   (default 1000)
Each namespace is created, gets loopback traffic until bpftune grows its tcp_rmem (new
namespaces copy the global namespace's squeezed tcp_rmem), and is deleted. Before and
after: the daemon's fds, RSS, state file size, per-namespace table entries, and the time
bpftune took to react in the first and the last namespaces (median of WINDOW each).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from procfs import status_kib

from bpftune import query
from helpers import Sysctls, churn_namespace, daemon, daemon_fds, wait_until

WINDOW = 50


def measure(pid: int, state_dir: Path) -> dict:
    tables = json.loads(query.request("state"))["daemon"].get("tables")  # None before 2026-12
    return {"fds": daemon_fds(pid), "rss_kib": status_kib(pid, "VmRSS"),
            "state_bytes": sum(f.stat().st_size for f in state_dir.iterdir()),
            "table_entries": sum(tables.values()) if tables is not None else -1,
            "tables": tables}


def main(count: int) -> None:
    sysctls = Sysctls()
    sysctls.set("net.ipv4.tcp_rmem", "4096 131072 131072")
    try:
        with tempfile.TemporaryDirectory() as tmp, daemon(Path(tmp)) as d:
            time.sleep(2)
            before = measure(d.proc.pid, Path(tmp) / "state")
            started = time.monotonic()
            reactions = [churn_namespace(f"bpftune-bench-{i}") for i in range(count)]
            elapsed = time.monotonic() - started
            wait_until(lambda: measure(d.proc.pid, Path(tmp) / "state")["table_entries"]
                       <= before["table_entries"], timeout=30)
            after = measure(d.proc.pid, Path(tmp) / "state")
            missed = sum(r is None for r in reactions)
            first = statistics.median(r for r in reactions[:WINDOW] if r is not None)
            last = statistics.median(r for r in reactions[-WINDOW:] if r is not None)
    finally:
        sysctls.restore()
    print(f"{count} namespaces in {elapsed:.0f} s ({count / elapsed:.1f}/s), bpftune acted "
          f"in {count - missed}")
    print(f"{'measure':<34}{'before':>10}{'after':>10}")
    for key in ("fds", "rss_kib", "state_bytes", "table_entries"):
        print(f"{key:<34}{before[key]:>10}{after[key]:>10}")
    print(f"{'reaction ms (median of ' + str(WINDOW) + ')':<34}{first * 1000:>10.0f}"
          f"{last * 1000:>10.0f}")
    print("tables after:", after["tables"])


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
