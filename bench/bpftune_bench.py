#!/usr/bin/env python3
"""bpftune's benchmarks: overhead, daemon CPU, reaction time, tuning benefit, footprint.

Run as root from a checkout:  bench/run   (or .venv/bin/python bench/bpftune_bench.py
[footprint] [idle] [overhead] [plans] [benefit] for some sections only)
Baseline and bpftune runs are alternated, several rounds each; the table shows medians,
their spread ((max - min) / median) and ratios. Everything runs between network
namespaces this script creates; sysctls are restored and namespaces removed at the end.
"""

from __future__ import annotations

import contextlib
import json
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from delayline import DelayLine
from pyroute2 import netns as pyroute2_netns

from helpers import Hosts, Sysctls, daemon, ns_prefix

RMEM, WMEM = "net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem"
ROUNDS = 7
SECONDS = 4
ROOMY = {RMEM: "4096 131072 268435456", WMEM: "4096 16384 268435456"}  # no change needed
SQUEEZED = {RMEM: "4096 131072 131072", WMEM: "4096 16384 16384"}
BEST = {RMEM: "4096 131072 16777216", WMEM: "4096 16384 16777216"}


def spread(xs: list[float]) -> float:
    m = statistics.median(xs)
    return (max(xs) - min(xs)) / m * 100 if m else 0.0


def iperf(server_ns: str | None, client_ns: str | None, addr: str, seconds: int = SECONDS,
          port: int = 5410) -> dict:
    """One iperf3 transfer; returns iperf3's JSON summary."""
    server = subprocess.Popen([*ns_prefix(server_ns), "iperf3", "-s", "-1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    try:
        out = subprocess.run([*ns_prefix(client_ns), "iperf3", "-c", addr, "-p", str(port),
                              "-t", str(seconds), "-J"], capture_output=True, text=True,
                             timeout=seconds + 30).stdout
    finally:
        server.wait(timeout=30)
    return json.loads(out)["end"]


def mbits(end: dict) -> float:
    return end["sum_received"]["bits_per_second"] / 1e6


def stress_sock(seconds: int = SECONDS) -> float:
    """stress-ng's socket stressor (loopback): bogo operations per second."""
    out = subprocess.run(["stress-ng", "--sock", "2", "-t", f"{seconds}s", "--metrics-brief"],
                         capture_output=True, text=True, timeout=seconds + 60)
    m = re.search(r"sock\s+\d+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+([\d.]+)", out.stdout + out.stderr)
    return float(m.group(1))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, clock ticks


def status_kib(pid: int, field: str) -> int:
    m = re.search(rf"^{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(m.group(1))


def set_sysctls(sysctls: Sysctls, values: dict[str, str], namespaces: list) -> None:
    for ns in namespaces:
        for name, value in values.items():
            sysctls.set(name, value, ns)


def bpf_objects() -> tuple[dict, dict]:
    progs = json.loads(subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True,
                                      text=True, check=True).stdout)
    maps = json.loads(subprocess.run(["bpftool", "-j", "map", "show"], capture_output=True,
                                     text=True, check=True).stdout)
    return {p["id"]: p for p in progs}, {m["id"]: m for m in maps}


# 1 and 2: overhead on the workload, daemon CPU.
def overhead(tmp: Path, hosts: Hosts, sysctls: Sysctls) -> list[tuple]:
    set_sysctls(sysctls, ROOMY, [None, hosts.ns])
    results: dict[str, list[float]] = {k: [] for k in ("iperf0", "iperf1", "sock0", "sock1")}
    cpu_per_gb = []
    for i in range(ROUNDS):
        results["iperf0"].append(mbits(iperf(hosts.ns, None, hosts.ns_addr)))
        results["sock0"].append(stress_sock())
        with daemon(tmp / f"overhead{i}") as d:
            before = cpu_seconds(d.proc.pid)
            end = iperf(hosts.ns, None, hosts.ns_addr)
            cpu_per_gb.append((cpu_seconds(d.proc.pid) - before)
                              / (end["sum_received"]["bytes"] / 1e9))
            results["iperf1"].append(mbits(end))
            results["sock1"].append(stress_sock())
            changed = "Scenario '" in d.log
    rows = []
    for name, label in (("iperf", "iperf3 Mbit/s"), ("sock", "stress-ng --sock bogo-ops/s")):
        base, with_ = results[f"{name}0"], results[f"{name}1"]
        rows.append((f"overhead: {label}", f"{statistics.median(with_):.0f} vs "
                     f"{statistics.median(base):.0f} (spread {spread(with_):.0f}%/"
                     f"{spread(base):.0f}%)", statistics.median(with_) / statistics.median(base),
                     ">= 0.99"))
    rows.append(("daemon CPU ms per GB moved (iperf3)",
                 f"{statistics.median(cpu_per_gb) * 1000:.2f} (resolution 10 ms per run)",
                 None, ""))
    if changed:
        rows.append(("note: the daemon changed a tunable during overhead runs", "", None, ""))
    return rows


# tcp_buffer's hooks as chosen on this kernel, and the plan a kernel without fentry,
# tcp_rcvbuf_grow and sock_send_length gets (Debian 12's 6.1 refusing fentry).
PLANS = {"6.18 plan (tcp_rcvbuf_grow, sock_send_length)": {},
         "6.1 plan (tcp_rcv_space_adjust, tcp_probe)":
             {"BPFTUNE_AVOID_HOOKS": "tcp_rcvbuf_grow,sock_send_length"}}


def plans(tmp: Path, hosts: Hosts, sysctls: Sysctls) -> list[tuple]:
    """stress-ng --sock and iperf3 with tcp_buffer alone under each plan, against none."""
    set_sysctls(sysctls, ROOMY, [None, hosts.ns])
    sock: dict[str, list[float]] = {"": [], **{name: [] for name in PLANS}}
    iperf3: dict[str, list[float]] = {"": [], **{name: [] for name in PLANS}}
    for i in range(ROUNDS):
        sock[""].append(stress_sock())
        iperf3[""].append(mbits(iperf(hosts.ns, None, hosts.ns_addr)))
        for j, (name, env) in enumerate(PLANS.items()):
            with daemon(tmp / f"plan{i}-{j}", "-a", "tcp_buffer", env=env):
                sock[name].append(stress_sock())
                iperf3[name].append(mbits(iperf(hosts.ns, None, hosts.ns_addr)))
    rows = []
    for name in PLANS:
        for label, runs in (("stress-ng --sock", sock), ("iperf3", iperf3)):
            rows.append((f"{name[:25]}: {label}",
                         f"{statistics.median(runs[name]):.0f} vs "
                         f"{statistics.median(runs['']):.0f} (spread "
                         f"{spread(runs[name]):.0f}%/{spread(runs['']):.0f}%)",
                         statistics.median(runs[name]) / statistics.median(runs[""]), ">= 0.99"))
    return rows


def idle_cpu(tmp: Path, seconds: int = 30) -> list[tuple]:
    with daemon(tmp / "idle") as d:
        time.sleep(2)
        before = cpu_seconds(d.proc.pid)
        time.sleep(seconds)
        per_minute = (cpu_seconds(d.proc.pid) - before) * 60 / seconds
    return [("daemon CPU s per minute, idle", f"{per_minute:.3f}", None, "< 0.1")]


# 3 and 4: reaction time and benefit over a path whose bandwidth-delay product exceeds the
# squeezed buffers.
@contextlib.contextmanager
def watching(ns: str, name: str) -> Iterator[list[tuple[float, str]]]:
    """Record (time, value) of a sysctl in a namespace each time it changes (1 ms polls)."""
    changes: list[tuple[float, str]] = []
    stop = threading.Event()

    def poll() -> None:
        pyroute2_netns.setns(ns, flags=0)  # this thread only
        path = "/proc/sys/" + name.replace(".", "/")
        last = None
        while not stop.is_set():
            with open(path) as f:
                value = f.read().split()[-1]
            if value != last:
                changes.append((time.monotonic(), value))
                last = value
            time.sleep(0.001)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    try:
        yield changes
    finally:
        stop.set()
        t.join()


def benefit(tmp: Path, sysctls: Sysctls) -> list[tuple]:
    untuned, tuned, best, first, settled = [], [], [], [], []
    with DelayLine(delay_ms=20, rate="50mbit") as dl:
        run = lambda: mbits(iperf(dl.b, dl.a, dl.addr_b, seconds=8))  # noqa: E731
        for i in range(3):
            set_sysctls(sysctls, SQUEEZED, [dl.a, dl.b])
            untuned.append(run())
            with daemon(tmp / f"benefit{i}"):
                with watching(dl.b, RMEM) as changes:
                    start = time.monotonic()
                    run()  # bpftune reacts and settles during this transfer
                    time.sleep(1)
                first.append(changes[1][0] - start if len(changes) > 1 else float("nan"))
                settled.append(changes[-1][0] - start if len(changes) > 1 else float("nan"))
                tuned.append(run())
            set_sysctls(sysctls, BEST, [dl.a, dl.b])
            best.append(run())
    med = statistics.median
    return [
        ("benefit: Mbit/s untuned / bpftune / hand-tuned",
         f"{med(untuned):.1f} / {med(tuned):.1f} / {med(best):.1f}", None, ""),
        ("benefit: tuned / best", f"spread {spread(tuned):.0f}%", med(tuned) / med(best),
         ">= 0.9"),
        ("benefit: tuned / untuned", "", med(tuned) / med(untuned), ""),
        ("reaction: first tcp_rmem change s", f"{med(first):.3f}", None, "< 1"),
        ("reaction: growth stops after s", f"{med(settled):.3f}", None, ""),
    ]


# 5: footprint.
def footprint(tmp: Path) -> list[tuple]:
    progs0, maps0 = bpf_objects()
    start = time.monotonic()
    with daemon(tmp / "footprint") as d:
        ready = time.monotonic() - start
        progs1, maps1 = bpf_objects()
        peak = status_kib(d.proc.pid, "VmHWM")
        time.sleep(10)
        steady = status_kib(d.proc.pid, "VmRSS")
    progs = [p for i, p in progs1.items() if i not in progs0]
    maps = [m for i, m in maps1.items() if i not in maps0]
    memlock = sum(m.get("bytes_memlock", 0) for m in maps) + sum(
        p.get("bytes_memlock", 0) for p in progs)
    return [
        ("footprint: start to ready s", f"{ready:.2f}", None, "< 3"),
        ("footprint: RSS peak / steady MiB", f"{peak / 1024:.0f} / {steady / 1024:.0f}", None,
         ""),
        ("footprint: BPF programs / maps", f"{len(progs)} / {len(maps)}", None, ""),
        ("footprint: memory locked by BPF KiB", f"{memlock / 1024:.0f}", None, ""),
    ]


def main() -> int:
    import os
    import tempfile

    if os.geteuid() != 0:
        print("bpftune_bench: run as root", file=sys.stderr)
        return 1
    wanted = sys.argv[1:] or ["footprint", "idle", "overhead", "plans", "benefit"]
    rows: list[tuple] = []
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        sysctls = Sysctls()
        hosts = Hosts(ns="bpftune-bench", global_if="btb0", ns_if="btb1",
                      global_addr="10.231.20.1", ns_addr="10.231.20.2")
        hosts.create()
        try:
            sections: dict[str, Callable[[], list[tuple]]] = {
                "footprint": lambda: footprint(tmp), "idle": lambda: idle_cpu(tmp),
                "overhead": lambda: overhead(tmp, hosts, sysctls),
                "plans": lambda: plans(tmp, hosts, sysctls),
                "benefit": lambda: benefit(tmp, sysctls)}
            for name in wanted:
                rows += sections[name]()
        finally:
            hosts.destroy()
            sysctls.restore()
    print(f"{'measure':46} {'value':42} {'ratio':>6}  target")
    for name, value, ratio, target in rows:
        r = f"{ratio:6.3f}" if ratio is not None else ""
        print(f"{name:46} {value:42} {r:>6}  {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
