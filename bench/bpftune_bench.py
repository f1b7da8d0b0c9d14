#!/usr/bin/env python3
"""bpftune's benchmarks: footprint, idle CPU, overhead, tuning benefit and reaction, scale
with many namespaces, PMDA fetch time; each figure beside its target (issue 13).

Run as root from a checkout:  bench/run [--quick] [--compare | --against FILE] [SECTION...]
(or .venv/bin/python bench/bpftune_bench.py with the same arguments, after
scripts/setup.sh). Baseline and bpftune runs are alternated, several rounds each, which goes
first turned each round; a ratio is the median of the rounds' ratios, spreads are
(max - min) / median. Every run is recorded in bench/results/
(record.py); --compare prints each figure beside the latest committed record.
Everything runs between network namespaces this script creates; sysctls are restored and
namespaces removed at the end, also when the run is interrupted (SIGINT, SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pmda_latency
import record
from delayline import DelayLine
from procfs import Watch, busy_cpu_seconds, compiler_libraries, cpu_seconds, status_kib
from pyroute2 import netns as pyroute2_netns
from record import Figure

from bpftune.tuners.net_buffer import BUDGET_CEILING, USECS_CAP
from helpers import (
    Hosts,
    Sysctls,
    bpftune_state,
    churn_namespace,
    daemon,
    ns_prefix,
    paced_udp,
    wait_until,
)

RMEM, WMEM = "net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem"
ROOMY = {RMEM: "4096 131072 268435456", WMEM: "4096 16384 268435456"}  # no change needed
# ... and NAPI budgets at net_buffer's caps (global only): under iperf3 on a busy VM, time
# squeezes otherwise had it raise them during the overhead rounds.
ROOMY_GLOBAL = {"net.core.netdev_budget": str(BUDGET_CEILING),
                "net.core.netdev_budget_usecs": str(USECS_CAP)}
SQUEEZED = {RMEM: "4096 131072 131072", WMEM: "4096 16384 16384"}
BEST = {RMEM: "4096 131072 16777216", WMEM: "4096 16384 16777216"}
SCENARIO = re.compile(r"Scenario '([^']+)' occurred for tunable '([^']+)'")
SCALE_PREFIX, CHURN_PREFIX = "bpftune-bench-scale-", "bpftune-bench-react-"
T = TypeVar("T")
SETTLE = 5  # seconds for the daemon to take in what changed (start, new namespaces)


@dataclass(frozen=True)
class Plan:
    """How long and how often; --quick checks that everything works in a few minutes."""

    rounds: int = 7  # alternated rounds (overhead, plans)
    seconds: int = 4  # one workload run
    idle: int = 30  # idle CPU window
    steady: int = 60  # footprint: seconds idle, then under traffic, before reading VmRSS
    benefit_rounds: int = 3
    namespaces: int = 1000
    window: int = 30  # scale: idle window with and without the namespaces, each round
    scale_rounds: int = 2  # scale: none, then the namespaces, alternated
    # scale: new namespaces whose reaction is timed, each round (about 20 ms each; 10
    # until 2026-12-03). The CPU-per-namespace ratio moves with the host's speed (one
    # run's rounds: 0.865 and 1.359), and it found two walks of every namespace at each
    # destruction (bench/README, 2026-12-04).
    churns: int = 50
    sampler_ticks: int = 10  # scale: busy ticks of the verifier's sampler timed
    pmda_rounds: int = 40
    pminfo_rounds: int = 10


FULL = Plan()
QUICK = Plan(rounds=3, seconds=2, idle=10, steady=10, benefit_rounds=1, window=10,
             scale_rounds=1, churns=3, sampler_ticks=3, pmda_rounds=10, pminfo_rounds=3)


def spread(xs: list[float]) -> float:
    m = statistics.median(xs)
    return (max(xs) - min(xs)) / m * 100 if m else 0.0


def iperf(server_ns: str | None, client_ns: str | None, addr: str, seconds: int,
          port: int = 5410, started: list[float] | None = None) -> dict:
    """One iperf3 transfer; returns iperf3's JSON summary. The client's start time is
    appended to ``started``."""
    server = subprocess.Popen([*ns_prefix(server_ns), "iperf3", "-s", "-1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    if started is not None:
        started.append(time.monotonic())
    try:
        out = subprocess.run([*ns_prefix(client_ns), "iperf3", "-c", addr, "-p", str(port),
                              "-t", str(seconds), "-J"], capture_output=True, text=True,
                             timeout=seconds + 30).stdout
    finally:
        server.wait(timeout=30)
    return json.loads(out)["end"]


@contextlib.contextmanager
def traffic(hosts: Hosts, seconds: int, port: int = 5411) -> Iterator[None]:
    """iperf3 from the global netns into the test netns while the block runs (at most
    ``seconds`` + 30); both ends stopped by PID."""
    server = subprocess.Popen([*ns_prefix(hosts.ns), "iperf3", "-s", "-1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    client = subprocess.Popen(["iperf3", "-c", hosts.ns_addr, "-p", str(port), "-t",
                               str(seconds + 30)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        yield
        if client.poll() is not None:
            raise RuntimeError(f"iperf3 client ended early (exit {client.returncode})")
    finally:
        for proc in (client, server):
            if proc.poll() is None:
                proc.terminate()
            proc.wait(timeout=30)


def mbits(end: dict) -> float:
    return end["sum_received"]["bits_per_second"] / 1e6


def stress_sock(seconds: int) -> float:
    """stress-ng's socket stressor (loopback): bogo operations per second."""
    out = subprocess.run(["stress-ng", "--sock", "2", "-t", f"{seconds}s", "--metrics-brief"],
                         capture_output=True, text=True, timeout=seconds + 60)
    m = re.search(r"sock\s+\d+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+([\d.]+)", out.stdout + out.stderr)
    return float(m.group(1))


def idle_window(pid: int, seconds: int) -> tuple[float, float]:
    """The daemon's CPU seconds per minute over ``seconds``, and its VmRSS in MiB after."""
    before = cpu_seconds(pid)
    time.sleep(seconds)
    return (cpu_seconds(pid) - before) * 60 / seconds, status_kib(pid, "VmRSS") / 1024


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


def ratio_figure(key: str, label: str, with_: list[float], without: list[float],
                 unit: str) -> Figure:
    """The median of each round's ratio, with the daemon over without. The host's speed
    drifts over minutes (a run of stress-ng resembles the one before it: correlation 0.55
    between neighbours here), so a round's two runs, side by side, are compared with each
    other rather than all runs with all. Each side's median and spread are in the detail."""
    ratios = [w / b for w, b in zip(with_, without, strict=True)]
    return Figure(key, label, statistics.median(ratios), target=">= 0.99", digits=3,
                  detail=f"rounds' ratios spread {spread(ratios):.0f}%; "
                         f"{statistics.median(with_):.0f} vs {statistics.median(without):.0f}"
                         f" {unit}, spread {spread(with_):.0f}%/{spread(without):.0f}%, "
                         f"{len(with_)} rounds")


def in_turn(arms: list[T], round_: int) -> list[T]:
    """The order of a round's runs: rotated each round, so that no arm always runs first
    or right after starting a daemon (with two arms: ABBA)."""
    shift = round_ % len(arms)
    return arms[shift:] + arms[:shift]


@dataclass(frozen=True)
class BpfRun:
    """Time the kernel counted in some BPF programs, and their calls, with
    kernel.bpf_stats_enabled on."""

    ns: int
    calls: int

    @classmethod
    def now(cls, others: set[int]) -> BpfRun:
        """The programs not in ``others`` (the daemon's), so far."""
        progs = [p for i, p in bpf_objects()[0].items() if i not in others]
        return cls(sum(p.get("run_time_ns", 0) for p in progs),
                   sum(p.get("run_cnt", 0) for p in progs))

    def since(self, earlier: BpfRun, per_call_ns: float) -> tuple[float, float]:
        """Seconds counted since ``earlier``: as counted, and less ``per_call_ns`` a call
        (what bpf_stats counts for an empty program: stats_clock_ns)."""
        ns, calls = self.ns - earlier.ns, self.calls - earlier.calls
        return ns / 1e9, (ns - calls * per_call_ns) / 1e9


@contextlib.contextmanager
def empty_programs(tmp: Path) -> Iterator[Callable[[str, str], contextlib.AbstractContextManager]]:
    """``load(hook, text)``: a context in which an empty program is on the hook (loaded
    through the loader, as the daemon's are)."""
    from bpftune.bpf import Cgroup, Programs
    from bpftune.btf import Btf
    from bpftune.learning import LearningRate

    programs = Programs(Btf.load(), LearningRate(), lambda _event: None)
    cgroup = Cgroup(str(tmp / "cgroup"))

    @contextlib.contextmanager
    def load(hook: str, text: str) -> Iterator[None]:
        sock_ops = {"empty": "sock_ops"} if hook == "sock_ops" else None
        module = programs.compile(tmp / f"{hook}.bpf.c", 0, {}, text=text, cgroup=sock_ops)
        try:
            if sock_ops:
                cgroup.attach(module, "empty", "sock_ops")
            yield
        finally:
            module.close()

    try:
        yield load
    finally:
        cgroup.close()
        programs.close()


def stats_clock_ns(tmp: Path, hosts: Hosts, sysctls: Sysctls, seconds: int) -> float:
    """The run time kernel.bpf_stats_enabled counts for each call of an empty program on
    tcp_probe under iperf3: its own clock reads around the call, and entering the program
    (which the hooks section measures by throughput). 80 ns on this VM, where the
    daemon's tcp_probe program counted 130 in all: over half of what the programs' share
    showed was the counting itself, which costs nothing with the stats off."""
    others = set(bpf_objects()[0])
    with empty_programs(tmp) as load, load("tcp_probe", EMPTY_PROGRAMS["tcp_probe"]):
        sysctls.set("kernel.bpf_stats_enabled", "1")
        try:
            before = BpfRun.now(others)
            iperf(hosts.ns, None, hosts.ns_addr, seconds)
            after = BpfRun.now(others)
        finally:
            sysctls.set("kernel.bpf_stats_enabled", "0")
    return (after.ns - before.ns) / max(after.calls - before.calls, 1)


# Overhead on the workload, daemon CPU.
WITHOUT, DAEMON, AGAIN = "without", "daemon", "again"


def overhead(tmp: Path, hosts: Hosts, sysctls: Sysctls, plan: Plan) -> list[Figure]:
    set_sysctls(sysctls, ROOMY, [None, hosts.ns])
    set_sysctls(sysctls, ROOMY_GLOBAL, [None])
    # Each arm's runs of each workload; AGAIN is the baseline run a second time.
    runs: dict[str, dict[str, list[float]]] = {
        arm: {"iperf": [], "sock": []} for arm in (WITHOUT, DAEMON, AGAIN)}
    cpu_per_gb, bpf_per_gb, bpf_share, bpf_busy_share = [], [], [], []
    counted_share, counted_busy_share = [], []
    changed: set[str] = set()
    cpus = os.cpu_count() or 1
    clock_ns = stats_clock_ns(tmp, hosts, sysctls, plan.seconds)

    def without(arm: str) -> None:
        runs[arm]["iperf"].append(mbits(iperf(hosts.ns, None, hosts.ns_addr, plan.seconds)))
        runs[arm]["sock"].append(stress_sock(plan.seconds))

    def with_daemon(i: int) -> None:
        others = set(bpf_objects()[0])
        with daemon(tmp / f"overhead{i}") as d:
            sysctls.set("kernel.bpf_stats_enabled", "1")  # run times: only while measured
            before, run = cpu_seconds(d.proc.pid), BpfRun.now(others)
            busy = busy_cpu_seconds()
            end = iperf(hosts.ns, None, hosts.ns_addr, plan.seconds)
            gb = end["sum_received"]["bytes"] / 1e9
            counted, work = BpfRun.now(others).since(run, clock_ns)
            busy = busy_cpu_seconds() - busy
            bpf_busy_share.append(work / busy * 100)
            counted_busy_share.append(counted / busy * 100)
            cpu_per_gb.append((cpu_seconds(d.proc.pid) - before) / gb)
            bpf_per_gb.append(work * 1000 / gb)
            runs[DAEMON]["iperf"].append(mbits(end))
            run = BpfRun.now(others)
            runs[DAEMON]["sock"].append(stress_sock(plan.seconds))
            counted, work = BpfRun.now(others).since(run, clock_ns)
            bpf_share.append(work / (plan.seconds * cpus) * 100)
            counted_share.append(counted / (plan.seconds * cpus) * 100)
            sysctls.set("kernel.bpf_stats_enabled", "0")
            changed.update(SCENARIO.findall(d.log))

    for i in range(plan.rounds):
        for arm in in_turn([WITHOUT, DAEMON, AGAIN], i):
            if arm == DAEMON:
                with_daemon(i)
            else:
                without(arm)
    # The same workload twice, no daemon: how far from 1 the host's noise alone puts a
    # ratio in this run.
    noise = [ratio_figure(f"overhead.noise_{key}", f"no daemon, a second run: {label}",
                          runs[AGAIN][key], runs[WITHOUT][key], unit)
             for key, label, unit in (("iperf", "iperf3", "Mbit/s"),
                                      ("sock", "stress-ng --sock 2", "bogo-ops/s"))]
    for figure in noise:
        figure.target = ""
    return [
        ratio_figure("overhead.iperf3", "overhead: iperf3 over veth, with / without",
                     runs[DAEMON]["iperf"], runs[WITHOUT]["iperf"], "Mbit/s"),
        ratio_figure("overhead.sock", "overhead: stress-ng --sock 2, with / without",
                     runs[DAEMON]["sock"], runs[WITHOUT]["sock"], "bogo-ops/s"),
        *noise,
        Figure("overhead.cpu_per_gb", "daemon CPU per GB moved (iperf3)",
               statistics.median(cpu_per_gb) * 1000, "ms"),
        # What the programs themselves cost, without the VM's throughput noise: their run
        # time less what bpf_stats counts for an empty program (its clock reads, and
        # entering a hook: see the hooks section). As counted, in the details.
        Figure("overhead.stats_clock", "bpf_stats' count for an empty program, a call",
               clock_ns, "ns", digits=0, detail="on tcp_probe, under iperf3"),
        Figure("overhead.bpf_per_gb", "BPF programs' run time per GB moved (iperf3)",
               statistics.median(bpf_per_gb), "ms",
               detail="kernel.bpf_stats_enabled, less the empty program's count"),
        # iperf3's throughput varies 25-40% between runs on this VM (also pinned to CPUs,
        # without any daemon): its ratio cannot show 1%. The CPU the transfer kept busy can:
        # the programs' share of it is the fraction of the transfer's work they add.
        Figure("overhead.bpf_busy_share", "BPF programs' share of the CPU iperf3 kept busy",
               statistics.median(bpf_busy_share), "%", "< 1", 3,
               detail=f"spread {spread(bpf_busy_share):.0f}%, {len(bpf_busy_share)} rounds; "
                      f"/proc/stat user+system+irq+softirq; as counted "
                      f"{statistics.median(counted_busy_share):.3f}%"),
        Figure("overhead.bpf_share", "BPF programs' share of CPU, stress-ng --sock",
               statistics.median(bpf_share), "%", "< 1", 3,
               detail=f"run time over {plan.seconds} s x {cpus} CPUs; as counted "
                      f"{statistics.median(counted_share):.3f}%"),
        # Tuning is kept out of the way (ROOMY): a change means the figures include it.
        Figure("overhead.tuned", "overhead: the daemon changed a tunable",
               "yes" if changed else "no", target="no",
               detail=", ".join(f"{t}: {s}" for s, t in sorted(changed))),
    ]


# tcp_buffer's hooks as chosen on this kernel, the same on every kernel without fentry
# (6.1 to 6.18).
PLANS = {"no-fentry": ("tcp_probe", {})}


def plans(tmp: Path, hosts: Hosts, sysctls: Sysctls, plan: Plan) -> list[Figure]:
    """stress-ng --sock and iperf3 with tcp_buffer alone under each plan, against none."""
    set_sysctls(sysctls, ROOMY, [None, hosts.ns])
    set_sysctls(sysctls, ROOMY_GLOBAL, [None])
    sock: dict[str, list[float]] = {"": [], **{name: [] for name in PLANS}}
    iperf3: dict[str, list[float]] = {"": [], **{name: [] for name in PLANS}}
    for i in range(plan.rounds):
        for name in in_turn(["", *PLANS], i):
            with (daemon(tmp / f"plan{i}-{name}", "-a", "tcp_buffer", env=PLANS[name][1])
                  if name else contextlib.nullcontext()):
                sock[name].append(stress_sock(plan.seconds))
                iperf3[name].append(mbits(iperf(hosts.ns, None, hosts.ns_addr,
                                                 plan.seconds)))
    figures = []
    for name, (hooks, _) in PLANS.items():
        for key, label, runs, unit in (("sock", "stress-ng --sock", sock, "bogo-ops/s"),
                                       ("iperf3", "iperf3", iperf3, "Mbit/s")):
            f = ratio_figure(f"plans.{name}.{key}", f"tcp_buffer, {name} plan: {label}",
                             runs[name], runs[""], unit)
            f.detail += f"; hooks {hooks}"
            figures.append(f)
    return figures


# Hooks a tuner uses that fire per packet or per syscall (and sock_send_length, which
# tcp_buffer gave up for tcp_probe): what entering an empty program there costs.
EMPTY_PROGRAMS = {
    "tcp_probe": "RAW_TRACEPOINT_PROBE(tcp_probe) { return 0; }",
    "kfree_skb": "RAW_TRACEPOINT_PROBE(kfree_skb) { return 0; }",
    "sock_ops": "int empty(struct bpf_sock_ops *ops) { return 1; }",
    # Not used, shown for what they would cost: per sendmsg, per recvmsg.
    "sock_send_length": "RAW_TRACEPOINT_PROBE(sock_send_length) { return 0; }",
    "tcp_rcv_space_adjust": "RAW_TRACEPOINT_PROBE(tcp_rcv_space_adjust) { return 0; }",
}
UNUSED_HOOKS = ("sock_send_length", "tcp_rcv_space_adjust")
NO_PROGRAM, NO_PROGRAM_AGAIN = "", "again"


def hooks(tmp: Path, plan: Plan) -> list[Figure]:
    """stress-ng --sock with an empty program on each hook, alternated with none."""
    arms = [NO_PROGRAM, *EMPTY_PROGRAMS, NO_PROGRAM_AGAIN]
    runs: dict[str, list[float]] = {arm: [] for arm in arms}
    with empty_programs(tmp) as load:
        for i in range(plan.rounds):
            for arm in in_turn(arms, i):
                with (load(arm, EMPTY_PROGRAMS[arm]) if arm in EMPTY_PROGRAMS
                      else contextlib.nullcontext()):
                    runs[arm].append(stress_sock(plan.seconds))
    figures = [ratio_figure(f"hooks.{hook}", f"empty program on {hook}: stress-ng --sock",
                            runs[hook], runs[NO_PROGRAM], "bogo-ops/s")
               for hook in EMPTY_PROGRAMS]
    # The same workload twice, nothing loaded: how far from 1 this host's noise alone puts
    # a ratio in this run.
    figures.append(ratio_figure("hooks.noise", "no program, a second run: stress-ng --sock",
                                runs[NO_PROGRAM_AGAIN], runs[NO_PROGRAM], "bogo-ops/s"))
    for figure in figures:
        if figure.key.removeprefix("hooks.") in (*UNUSED_HOOKS, "noise"):
            figure.target = ""
    return figures


STEADY_PPS = 1000  # datagrams a second: a host that is never quiet, but not loaded


def idle_cpu(tmp: Path, hosts: Hosts, plan: Plan) -> list[Figure]:
    """Idle, and with a trickle of traffic: above verify.QUIET_PPS packets a second (most
    hosts of a fleet, always) the verifier reads every sampled scope's counters each
    second, where a quiet tick reads only the global ones that are not packets."""
    with daemon(tmp / "idle") as d:
        time.sleep(2)
        per_minute, _ = idle_window(d.proc.pid, plan.idle)
        with paced_udp((hosts.ns_addr, 9), STEADY_PPS):
            time.sleep(SETTLE)
            steady, _ = idle_window(d.proc.pid, plan.idle)
    return [Figure("idle.cpu", "daemon CPU per minute, idle", per_minute, "s", "< 0.1", 3,
                   f"over {plan.idle} s"),
            Figure("idle.cpu_steady", f"daemon CPU per minute, {STEADY_PPS} datagrams/s",
                   steady, "s", digits=3, detail=f"over {plan.idle} s, into the test namespace")]


# Reaction time and benefit over a path whose bandwidth-delay product exceeds the squeezed
# buffers.
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


def benefit(tmp: Path, sysctls: Sysctls, plan: Plan) -> list[Figure]:
    untuned, tuned, best, first, settled = [], [], [], [], []
    with DelayLine(delay_ms=20, rate="50mbit") as dl:
        def run(started: list[float] | None = None) -> float:
            return mbits(iperf(dl.b, dl.a, dl.addr_b, seconds=8, started=started))

        for i in range(plan.benefit_rounds):
            set_sysctls(sysctls, SQUEEZED, [dl.a, dl.b])
            untuned.append(run())
            with daemon(tmp / f"benefit{i}"):
                with watching(dl.b, RMEM) as changes:
                    client: list[float] = []
                    run(client)  # bpftune reacts and settles during this transfer
                    time.sleep(1)
                # From the client's start (its control connection's RTTs included), not
                # the server's, 0.3 s earlier (before 2026-12-03).
                start = client[0]
                first.append(changes[1][0] - start if len(changes) > 1 else float("nan"))
                settled.append(changes[-1][0] - start if len(changes) > 1 else float("nan"))
                tuned.append(run())
            set_sysctls(sysctls, BEST, [dl.a, dl.b])
            best.append(run())
    med = statistics.median
    rounds = f"{plan.benefit_rounds} rounds"
    return [
        Figure("benefit.untuned", "benefit: untuned", med(untuned), "Mbit/s", digits=1),
        Figure("benefit.tuned", "benefit: with bpftune", med(tuned), "Mbit/s", digits=1),
        Figure("benefit.best", "benefit: hand-tuned (16 MiB max)", med(best), "Mbit/s",
               digits=1),
        Figure("benefit.tuned_best", "benefit: tuned / best", med(tuned) / med(best),
               target=">= 0.95", digits=3, detail=f"spread {spread(tuned):.0f}%, {rounds}"),
        Figure("benefit.tuned_untuned", "benefit: tuned / untuned", med(tuned) / med(untuned),
               digits=3),
        Figure("reaction.first", "reaction: first tcp_rmem change", med(first), "s", "<= 0.5",
               3, rounds),
        Figure("reaction.settled", "reaction: growth stops after", med(settled), "s",
               digits=3),
    ]


# Footprint.
def footprint(tmp: Path, hosts: Hosts, plan: Plan) -> list[Figure]:
    progs0, maps0 = bpf_objects()
    watch = Watch(tmp / "footprint" / "bpftune.log")
    watch.start()
    try:
        with daemon(tmp / "footprint") as d:
            pid = d.proc.pid
            wait_until(lambda: watch.ready is not None, timeout=5, interval=0.05)
            ready = watch.ready  # None (n/a) if the line never showed up
            mapped = compiler_libraries(pid)
            progs1, maps1 = bpf_objects()
            time.sleep(plan.steady)
            rss_idle = status_kib(pid, "VmRSS") / 1024
            with traffic(hosts, plan.steady):
                time.sleep(plan.steady)
                rss_busy = status_kib(pid, "VmRSS") / 1024
            hwm = status_kib(pid, "VmHWM") / 1024
    finally:
        watch.stop()
    progs = [p for i, p in progs1.items() if i not in progs0]
    maps = [m for i, m in maps1.items() if i not in maps0]
    memlock = sum(m.get("bytes_memlock", 0) for m in maps) + sum(
        p.get("bytes_memlock", 0) for p in progs)
    loader, loaders = watch.peaks(loader=True)
    other, others = watch.peaks(loader=False)
    return [
        Figure("footprint.ready", 'footprint: start to "started" line', ready, "s", "<= 3"),
        Figure("footprint.rss_idle", f"footprint: daemon VmRSS after {plan.steady} s idle",
               rss_idle, "MiB", "<= 40", 1),
        Figure("footprint.rss_traffic",
               f"footprint: daemon VmRSS after {plan.steady} s of iperf3", rss_busy, "MiB",
               "<= 40", 1),
        Figure("footprint.hwm", "footprint: daemon peak RSS (VmHWM)", hwm, "MiB", digits=1),
        Figure("footprint.loader_hwm", "footprint: loader children peak RSS", loader, "MiB",
               digits=1, detail=loaders),
        Figure("footprint.other_children_hwm", "footprint: other children peak RSS", other,
               "MiB", digits=1, detail=others),
        Figure("footprint.compiler_mapped", "footprint: libbcc/LLVM/clang mapped when ready",
               "yes" if mapped else "no", target="no", detail=", ".join(mapped)),
        Figure("footprint.bpf_programs", "footprint: BPF programs", len(progs), digits=0),
        Figure("footprint.bpf_maps", "footprint: BPF maps", len(maps), digits=0),
        Figure("footprint.bpf_memlock", "footprint: memory locked by BPF", memlock / 1024,
               "KiB", digits=0),
    ]


# Scale: the cost of many namespaces that exist, idle.
@contextlib.contextmanager
def namespaces(count: int) -> Iterator[None]:
    """``count`` empty network namespaces; each removed afterwards by the name created."""
    leftovers = [n for n in pyroute2_netns.listnetns() if n.startswith(SCALE_PREFIX)]
    if leftovers:
        raise SystemExit(f"bench: namespaces {SCALE_PREFIX}* exist ({len(leftovers)}, from "
                         "an interrupted run?): remove them first")
    created = []
    try:
        for i in range(count):
            pyroute2_netns.create(f"{SCALE_PREFIX}{i}")
            created.append(f"{SCALE_PREFIX}{i}")
        yield
    finally:
        for name in created:
            with contextlib.suppress(OSError):
                pyroute2_netns.remove(name)


def reactions(pid: int, count: int) -> tuple[list[float], float, int]:
    """Times (ms) bpftune took to grow tcp_rmem in ``count`` new namespaces with traffic
    (helpers.churn_namespace), one after another, for those it acted in; and the daemon's
    CPU seconds meanwhile. The times are wall-clock, so they move with the host's
    scheduling; the CPU is the per-event handling cost itself."""
    before = cpu_seconds(pid)
    times = [churn_namespace(f"{CHURN_PREFIX}{i}") for i in range(count)]
    return [t * 1000 for t in times if t is not None], cpu_seconds(pid) - before, count


@dataclass
class ScaleSide:
    """One side of the scale comparison (no other namespaces, or many), over its rounds."""

    cpu: list[float] = field(default_factory=list)  # s/min, each idle window
    rss: list[float] = field(default_factory=list)  # MiB, after each
    reactions: list[float] = field(default_factory=list)  # ms
    churn_cpu: list[float] = field(default_factory=list)  # s, each round
    churned: int = 0

    def measure(self, pid: int, plan: Plan) -> None:
        cpu, rss = idle_window(pid, plan.window)
        self.cpu.append(cpu)
        self.rss.append(rss)
        times, cpu_s, count = reactions(pid, plan.churns)
        self.reactions += times
        self.churn_cpu.append(cpu_s)
        self.churned += count

    def reaction(self) -> float | None:
        return statistics.median(self.reactions) if self.reactions else None

    def cpu_per_namespace_ms(self) -> float:
        return sum(self.churn_cpu) * 1000 / self.churned


def sampler_tick_ms(ticks: int) -> tuple[float, str]:
    """Median ms of a busy tick of the verifier's sampler (bpftune.verify, every figure)
    over the global namespace and as many others as it samples, in this process."""
    from bpftune import verify
    from bpftune.netns import Namespaces

    figures = [v for v in vars(verify).values() if isinstance(v, verify.Figure)]
    namespaces = Namespaces()
    try:
        namespaces.scan()
        sampler = verify.Sampler(namespaces, figures, verify.Windows(), packets=None)
        times = []
        for tick in range(ticks):
            start = time.perf_counter()
            sampler.sample(float(tick))
            times.append((time.perf_counter() - start) * 1000)
        return statistics.median(times), f"{len(sampler.rings)} scopes, {ticks} ticks"
    finally:
        namespaces.close()


def tracked_namespaces() -> int:
    """How many namespaces the running daemon tracks."""
    return bpftune_state()["daemon"]["tables"]["namespaces"]


def scale(tmp: Path, plan: Plan) -> list[Figure]:
    """No other namespaces and ``plan.namespaces`` of them, alternated, which goes first
    turning each round (the host's speed drifts over minutes: a ratio of two windows taken
    one after the other showed it; the daemon's CPU per new namespace follows the time
    each takes, 12-21 ms)."""
    sysctls = Sysctls()
    # New namespaces copy the global tcp_rmem: squeezed, bpftune grows it in each.
    sysctls.set(RMEM, SQUEEZED[RMEM])
    none, many = ScaleSide(), ScaleSide()
    try:
        with daemon(tmp / "scale") as d:
            time.sleep(SETTLE)
            known = tracked_namespaces()
            for i in range(plan.scale_rounds):
                for side in in_turn([none, many], i):
                    if side is none:
                        none.measure(d.proc.pid, plan)
                        continue
                    with namespaces(plan.namespaces):
                        time.sleep(SETTLE)
                        many.measure(d.proc.pid, plan)
                        sampler_ms, sampled = sampler_tick_ms(plan.sampler_ticks)
                    # The kernel frees namespaces in batches, seconds after they are
                    # deleted, and the daemon forgets each then: not in the next window.
                    if not wait_until(lambda: tracked_namespaces() <= known, timeout=120,
                                      interval=1):
                        raise SystemExit(
                            f"bench: the daemon still tracks {tracked_namespaces()} "
                            f"namespaces 120 s after deleting them ({known} before)")
                    time.sleep(SETTLE)
    finally:
        sysctls.restore()
    n, rounds = plan.namespaces, f"{plan.scale_rounds} rounds alternated"
    react0, react1 = none.reaction(), many.reaction()
    churns = f"{len(none.reactions)}/{none.churned} and {len(many.reactions)}/{many.churned}"
    cpu_ratios = [b / a for a, b in zip(none.cpu, many.cpu, strict=True)]
    return [
        Figure("scale.cpu_none", "scale: daemon CPU per minute idle, no namespaces",
               statistics.mean(none.cpu), "s", digits=3,
               detail=f"{plan.window} s windows, {rounds}"),
        Figure("scale.cpu_many", f"scale: daemon CPU per minute idle, {n} namespaces",
               statistics.mean(many.cpu), "s", digits=3),
        Figure("scale.cpu_ratio", f"scale: idle CPU, {n} namespaces / none",
               sum(many.cpu) / sum(none.cpu), target="< 1.1", digits=3,
               detail="each round: " + ", ".join(f"{r:.3f}" for r in cpu_ratios)),
        Figure("scale.rss_none", "scale: daemon VmRSS, no namespaces", none.rss[-1], "MiB",
               digits=1),
        Figure("scale.rss_many", f"scale: daemon VmRSS, {n} namespaces", many.rss[-1], "MiB",
               digits=1),
        Figure("scale.rss_ratio", f"scale: VmRSS, {n} namespaces / none",
               many.rss[-1] / none.rss[-1], target="< 1.1", digits=3),
        Figure("scale.reaction_none", "scale: reaction in a new namespace, no others", react0,
               "ms", digits=1, detail=f"acted in {churns}"),
        Figure("scale.reaction_many", f"scale: reaction in a new namespace, {n} others",
               react1, "ms", digits=1),
        # Wall-clock, a few ms: the host's scheduling shows in it. The cost that must not
        # grow with namespaces is the CPU below.
        Figure("scale.reaction_ratio", f"scale: reaction, {n} namespaces / none",
               react1 / react0 if react0 and react1 else None, digits=3),
        Figure("scale.event_cpu_none", "scale: daemon CPU per new namespace, no others",
               none.cpu_per_namespace_ms(), "ms", digits=2),
        Figure("scale.event_cpu_many", f"scale: daemon CPU per new namespace, {n} others",
               many.cpu_per_namespace_ms(), "ms", digits=2),
        Figure("scale.event_cpu_ratio", f"scale: CPU per new namespace, {n} / none",
               many.cpu_per_namespace_ms() / none.cpu_per_namespace_ms(), target="< 1.1",
               detail="each round: " + ", ".join(
                   f"{b / a:.3f}" for a, b in zip(none.churn_cpu, many.churn_cpu,
                                                  strict=True)),
               digits=3),
        # Verified changes sample only while the host moves packets (Sampler.quiet): then
        # this is their cost each second, in ms of one CPU.
        Figure("scale.verify_sampler", "verified changes: sampler, a busy tick", sampler_ms,
               "ms", "< 10", digits=2, detail=sampled),
    ]


def pmda(tmp: Path, plan: Plan) -> list[Figure]:
    return pmda_latency.figures(pmda_latency.rows(tmp, plan.pmda_rounds, plan.pminfo_rounds))


SECTIONS = ("footprint", "idle", "overhead", "plans", "hooks", "benefit", "scale", "pmda")


def run_sections(wanted: list[str], plan: Plan) -> list[Figure]:
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        sysctls = Sysctls()
        hosts = Hosts(ns="bpftune-bench", global_if="btb0", ns_if="btb1",
                      global_addr="10.231.20.1", ns_addr="10.231.20.2")
        hosts.create()
        try:
            sections: dict[str, Callable[[], list[Figure]]] = {
                "footprint": lambda: footprint(tmp, hosts, plan),
                "idle": lambda: idle_cpu(tmp, hosts, plan),
                "overhead": lambda: overhead(tmp, hosts, sysctls, plan),
                "plans": lambda: plans(tmp, hosts, sysctls, plan),
                "hooks": lambda: hooks(tmp, plan),
                "benefit": lambda: benefit(tmp, sysctls, plan),
                "scale": lambda: scale(tmp, plan),
                "pmda": lambda: pmda(tmp, plan)}
            for name in wanted:
                started = time.monotonic()
                print(f"bench: {name}...", file=sys.stderr, flush=True)
                figures += sections[name]()
                print(f"bench: {name} took {time.monotonic() - started:.0f} s",
                      file=sys.stderr, flush=True)
        finally:
            hosts.destroy()
            sysctls.restore()
    return figures


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/run", description="Run bpftune's benchmarks, record the figures in "
        "bench/results/ and print them beside their targets.")
    p.add_argument("sections", nargs="*", metavar="SECTION",
                   help=f"run only these ({', '.join(SECTIONS)}; default: all)")
    p.add_argument("--quick", action="store_true",
                   help="fewer rounds, shorter windows: checks that everything works")
    p.add_argument("--compare", action="store_true",
                   help="print each figure beside the latest committed record's")
    p.add_argument("--against", type=Path, metavar="FILE",
                   help="compare with this record instead (implies --compare)")
    args = p.parse_args(argv)
    if unknown := [s for s in args.sections if s not in SECTIONS]:
        p.error(f"unknown section {', '.join(unknown)} (choose from {', '.join(SECTIONS)})")
    args.sections = args.sections or list(SECTIONS)
    return args


def baseline(args: argparse.Namespace) -> tuple[Path | None, dict | None]:
    """The record to compare with, read before the run so that a bad file fails at once."""
    path = args.against or (record.baseline(args.quick) if args.compare else None)
    return path, record.load(path) if path else None


def report(new: dict, figures: list[Figure], old_path: Path | None, old: dict | None,
           compare: bool) -> None:
    print("this run:", record.describe(new))
    if old_path and old:
        print(f"compared with {old_path}: {record.describe(old)}")
        if diffs := record.differences(new, old):
            print("  differs in:", "; ".join(diffs))
    elif compare:
        print("no committed record in bench/results/ to compare with")
    print(record.table(figures, old))


def main(argv: list[str]) -> int:
    args = parse(argv)
    if os.geteuid() != 0:
        print("bench: run as root", file=sys.stderr)
        return 1
    old_path, old = baseline(args)
    command = os.environ.get("BPFTUNE_BENCH_COMMAND") or shlex.join(
        ["bench/bpftune_bench.py", *argv])
    plan = QUICK if args.quick else FULL
    new = record.new_record(command, args.quick, args.sections) | {"settings": asdict(plan)}
    # An ended run still puts back sysctls and removes namespaces (finally blocks).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    figures = run_sections(args.sections, plan)
    report(new, figures, old_path, old, args.compare or args.against is not None)
    print("recorded in", record.save(new, figures).relative_to(record.REPO))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
