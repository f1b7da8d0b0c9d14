"""Strategies (upstream's test/strategy): the example plugin of docs/examples/strategy takes
turns between two strategies, each with a BPF program of its own, every 30 seconds; and the
rule that picks the next strategy."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time

import pytest

from bpftune.btf import Btf
from bpftune.events import Event, event_tuner_id
from bpftune.hooks import PlanError, Watch, raw_tp, tp
from bpftune.tuner import CgroupProgram, Strategy, Tuner, choose_strategy
from helpers import BPFTUNE, REPO, daemon, wait_until

EXAMPLE = REPO / "docs" / "examples" / "strategy"
#: Renames itself to the name both programs wait for (strategy_A's trigger), then reads
#: kernel.core_pattern under that name (strategy_B's).
TRIGGER = "printf bpftune-strat > /proc/self/comm; read -r x < /proc/sys/kernel/core_pattern"
HANDLED = re.compile(r"event  \(scenario 0\) for tuner strategy, strategy (\w+) "
                     r"\(sent by (\w+)'s program\)")
SWITCH = ("tuner 'strategy': strategy 'strategy_A' -> 'strategy_B' "
          "(evaluations: strategy_A=0, strategy_B=1)")
CGROUP = "/run/bpftune/cgroupv2"

A = Strategy("a", "first")
B = Strategy("b", "second")
C = Strategy("c", "third")


# The choice (pure).
@pytest.mark.parametrize(("evaluations", "chosen"), [
    ([(A, 1.0), (B, 2.0), (C, 0.5)], B),  # the highest
    ([(A, 1.0), (B, 1.0), (C, 0.5)], B),  # a tie goes to the later one
    ([(A, 0.0), (B, 0.0), (C, 0.0)], C),  # all zero: the last
    ([(A, -1.0), (B, 0.0)], B),  # zero beats a negative
    ([(A, -1.0), (B, -0.5)], None),  # a negative never wins, even the best of them
    ([(A, None), (B, -2.0)], None),  # nor a failed evaluation
    ([(A, None), (B, 0.25)], B),
    ([], None),
])
def test_the_highest_evaluation_wins_ties_go_to_the_later_negatives_never(evaluations, chosen):
    assert choose_strategy(evaluations) is chosen


class Taking(Tuner):
    """Two strategies declared as attributes, evaluated by a method and by a function."""

    name = "taking"
    FIRST = Strategy("first", "one", timeout=5, evaluate="score",
                     watches=(Watch("x", (tp("cat/common"),)),))
    SECOND = Strategy("second", "two", timeout=5, evaluate=lambda tuner, s: tuner.bonus,
                      watches=(Watch("y", (raw_tp("newer"), raw_tp("common"))),),
                      cgroup_programs=(CgroupProgram("second_sysctl", "sysctl"),))
    bonus = 2

    def score(self, strategy: Strategy) -> float:
        return 0.5 if strategy is self.strategy else 1


HOOK_BTF = Btf([
    {"id": 1, "kind": "TYPEDEF", "name": "btf_trace_common", "type_id": 0},
    {"id": 2, "kind": "TYPEDEF", "name": "btf_trace_newer", "type_id": 0},
])


def test_strategies_are_declared_as_attributes_and_compiled_in():
    assert Taking.strategies == (Taking.FIRST, Taking.SECOND)
    assert Taking.id_defines() == ["-DSTRATEGY_FIRST=0", "-DSTRATEGY_SECOND=1"]
    plans = Taking.strategy_plans(HOOK_BTF, {"raw_tracepoints", "tracepoints"})
    first, second = plans[Taking.FIRST], plans[Taking.SECOND]
    assert (first.describe(), first.cflags()) == (
        "tp/cat/common", ["-DHOOK_TP_common", "-DSTRATEGY_ID=0"])
    assert (second.describe(), second.cflags()) == (
        "raw_tp/newer, cgroup/sysctl", ["-DHOOK_RAW_TP_newer", "-DSTRATEGY_ID=1"])
    assert Taking.plan(HOOK_BTF, {"raw_tracepoints", "tracepoints"}) == first


def test_a_strategy_without_hooks_keeps_the_tuner_from_loading():
    with pytest.raises(PlanError, match=r"^strategy 'second': no hook for y"):
        Taking.strategy_plans(HOOK_BTF, {"tracepoints"})


def test_evaluations_by_method_or_function_and_what_is_refused():
    tuner = Taking(None, 0)
    assert tuner.strategy is Taking.FIRST
    assert [tuner.evaluate_strategy(s) for s in Taking.strategies] == [0.5, 2.0]
    tuner.bonus = math.nan
    with pytest.raises(ValueError, match="not a finite number"):
        tuner.evaluate_strategy(Taking.SECOND)
    tuner.arm_strategy_timeout(100.0)
    assert tuner.strategy_due == 105.0


@pytest.mark.parametrize(("strategies", "message"), [
    ((Strategy("s", "no evaluate", timeout=1),), "strategy 's' has no evaluate"),
    ((Strategy("s", "x", timeout=1, evaluate="absent"),), "'absent', which is not a method"),
    ((Strategy("s", "x", timeout=1, evaluate="evaluate_strategy"),), "not a method of its own"),
    ((Strategy("s", "x"), Strategy("s", "y")), "strategies need different names"),
])
def test_bad_strategies_are_refused_when_the_tuner_is_defined(strategies, message):
    with pytest.raises(TypeError, match=message):
        type("Bad", (Tuner,), {"name": "bad", "strategies": strategies})


def test_events_carry_the_generation_of_the_programs_that_sent_them():
    event = Event(tuner_id=event_tuner_id(3, 2))
    assert (event.tuner_index, event.generation) == (3, 2)
    assert event_tuner_id(3, 0) == 3  # tuners without strategies keep their plain ids


# The example, end to end.
@pytest.fixture
def strategy_plugin_dir():
    """The example installed in a trusted plugin directory (root's, mode 755/644)."""
    d = tempfile.mkdtemp(prefix="bpftune-plugins-", dir="/run")
    os.chmod(d, 0o755)
    for name in ("strategy_tuner.py", "strategy.bpf.c"):
        shutil.copy(EXAMPLE / name, d)
        os.chmod(os.path.join(d, name), 0o644)
    yield d
    shutil.rmtree(d)


class Triggers:
    """Sets both programs off every half second, in the background."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            subprocess.run(["sh", "-c", TRIGGER], check=True)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def strategy_state() -> tuple[str, dict[str, float | None]]:
    out = subprocess.run([BPFTUNE, "-q", "state"], capture_output=True, text=True,
                         check=True).stdout
    (tuner,) = [t for t in json.loads(out)["tuners"] if t["name"] == "strategy"]
    return tuner["strategy"], {s["name"]: s["evaluation"] for s in tuner["strategies"]}


def loaded_programs() -> set[str]:
    """Names (as the kernel keeps them, 15 characters) of the BPF programs loaded."""
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True,
                         check=True).stdout
    return {p.get("name", "")[:15] for p in json.loads(out)}


def cgroup_programs() -> set[str]:
    out = subprocess.run(["bpftool", "-j", "cgroup", "show", CGROUP], capture_output=True,
                         text=True, check=True).stdout
    return {p["name"][:15] for p in json.loads(out.strip() or "[]")}


A_PROGRAM, B_PROGRAM = "tracepoint__tas", "strategy_b_sysc"


def test_strategies_take_turns_with_their_own_programs(tmp_path, strategy_plugin_dir):
    with daemon(tmp_path, "-l", strategy_plugin_dir, "-a", "strategy") as d:
        started = time.monotonic()
        d.wait_for(r"active tuners: strategy\n")
        assert strategy_state() == ("strategy_A", {"strategy_A": None, "strategy_B": None})
        assert A_PROGRAM in loaded_programs() and B_PROGRAM not in cgroup_programs()
        triggers = Triggers()
        try:
            d.wait_for(HANDLED.pattern.replace(r"(\w+)", "strategy_A"))
            d.wait_for(re.escape(SWITCH), timeout=45)
            switched = time.monotonic() - started
            assert strategy_state() == ("strategy_B", {"strategy_A": 0.0, "strategy_B": 1.0})
            d.wait_for(re.escape(SWITCH) + r"\n(.*\n)*.*"
                       + HANDLED.pattern.replace(r"(\w+)", "strategy_B"))
            assert B_PROGRAM in cgroup_programs()
            assert wait_until(lambda: A_PROGRAM not in loaded_programs())
        finally:
            triggers.close()
    assert 25 <= switched <= 40  # the 30 s timeout, seen from the test
    before, after = d.log.split(SWITCH)
    assert {m.groups() for m in HANDLED.finditer(before)} == {("strategy_A", "strategy_A")}
    assert {m.groups() for m in HANDLED.finditer(after)} == {("strategy_B", "strategy_B")}
    assert d.log.count("strategy 'strategy_A' -> ") == 1  # the next turn is 30 s away
