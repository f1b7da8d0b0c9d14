"""How long the loader child would take for bpftune's real tuners, and how big it gets.

Runs what a start-up loader child would run, with the read-only checkout /work/main: parse
BTF, make every built-in tuner's strategy plans, compile its current plan and LOAD (verify)
each program without attaching anything (no tracepoint, no cgroup: the machine's CI is not
disturbed), and compile-check the other strategies as Engine._check_other_strategies does.
Prints per-step seconds and the peak RSS. Run with /usr/bin/python3 (it has bcc).
``--part I/N``: only every N-th tuner from the I-th (0-based), to time N loader children
running side by side (each parses BTF and makes the core module itself).
"""

import resource
import sys
import time

T0 = time.monotonic()
sys.path.insert(0, "/work/main/engine")

import bcc

T_BCC = time.monotonic()

from bpftune import plugins
from bpftune.bpf import CGROUP_ATTACH, Programs, bpf_dir
from bpftune.btf import Btf
from bpftune.events import event_tuner_id
from bpftune.hooks import NotNeeded, PlanError
from bpftune.learning import LearningRate

# What bpftune -S finds on this machine (PLATFORM.md): no fentry, no kprobes.
FEATURES = {"btf", "ringbuf", "tracepoints", "raw_tracepoints", "cgroup_sysctl", "sockops",
            "netns_cookie"}
PREFIX_TYPES = {b"tracepoint__": bcc.BPF.TRACEPOINT, b"raw_tracepoint__": bcc.BPF.RAW_TRACEPOINT}


def load_without_attaching(b, tuner) -> int:
    """Load (verify) every program the plan uses, as BCC's autoload and the engine's cgroup
    attach would, but attach none."""
    kinds = {p.function.encode(): CGROUP_ATTACH[p.kind][0] for p in tuner.cgroup_attachments()}
    n = 0
    for i in range(bcc.lib.bpf_num_functions(b.module)):
        name = bcc.lib.bpf_function_name(b.module, i)
        prog_type = next((t for p, t in PREFIX_TYPES.items() if name.startswith(p)),
                         kinds.get(name))
        if prog_type is not None:
            b.load_func(name, prog_type)
            n += 1
    return n


def main() -> None:
    t = time.monotonic()
    btf = Btf.load()
    steps = {"python+import bcc": T_BCC - T0, "Btf.load": time.monotonic() - t}
    t = time.monotonic()
    programs = Programs(btf, LearningRate(), lambda _e: None)
    steps["core module (ring buffers)"] = time.monotonic() - t
    part, parts = 0, 1
    if "--part" in sys.argv:
        part, parts = map(int, sys.argv[sys.argv.index("--part") + 1].split("/"))
    for index, cls in enumerate(plugins.builtin_tuners()):
        if index % parts != part:
            continue
        t = time.monotonic()
        tuner = cls(None, index)
        try:
            tuner.plans = cls.strategy_plans(btf, FEATURES)
        except (PlanError, NotNeeded) as e:
            steps[f"{cls.name}: not loaded ({e})"] = time.monotonic() - t
            continue
        loaded = 0
        for strategy, plan in tuner.plans.items():
            tuner.strategy, tuner.hooks = strategy, plan
            current = strategy is next(iter(tuner.plans))
            b = programs.compile(
                bpf_dir() / cls.bpf_source, event_tuner_id(index, 0), cls.fields,
                defines=cls.id_defines() + plan.cflags() + tuner.compile_defines(),
                checks=cls.compile_checks(), attach=False)
            if current:
                loaded = load_without_attaching(b, tuner)
            b.cleanup()
        steps[f"{cls.name} ({len(tuner.plans)} plan(s), {loaded} programs loaded)"] = \
            time.monotonic() - t
    programs.close()
    total = time.monotonic() - T0
    for name, s in steps.items():
        print(f"{s:7.3f} s  {name}")
    print(f"{total:7.3f} s  total; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
