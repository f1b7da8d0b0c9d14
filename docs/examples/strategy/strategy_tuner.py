"""An example tuner with strategies, after upstream's test/strategy: two strategies, each
with a BPF program of its own (strategy.bpf.c), taking turns every 30 seconds.

Install it as a plugin: copy both files into a root-owned directory that only root can
write (every directory above it too), then run ``bpftune -s -l DIR -a strategy``. This
shell renames itself to "bpftune-strat" (strategy_A's trigger), then reads
kernel.core_pattern under that name (strategy_B's)::

    sh -c 'printf bpftune-strat > /proc/self/comm; read -r x < /proc/sys/kernel/core_pattern'

Every event is logged with the strategy that handled it and the one whose program sent it;
the switch is one line: ``tuner 'strategy': strategy 'strategy_A' -> 'strategy_B' ...``.
"""

from bpftune.events import Event
from bpftune.hooks import Watch, tp
from bpftune.log import log
from bpftune.tuner import CgroupProgram, Scenario, Strategy, Tuner


class StrategyTuner(Tuner):
    name = "strategy"
    bpf_source = "strategy.bpf.c"
    acts_in_netns = False  # it tunes nothing, in no namespace

    EVENT = Scenario("strategy event", "a strategy's BPF program saw its trigger")

    A = Strategy("strategy_A", "tasks renaming themselves to bpftune-strat (tracepoint)",
                 timeout=30, evaluate="evaluate",
                 watches=(Watch("renames", (tp("task/task_rename"),)),))
    B = Strategy("strategy_B", "reads of kernel.core_pattern by a task named bpftune-strat "
                 "(cgroup/sysctl program)", timeout=30, evaluate="evaluate",
                 cgroup_programs=(CgroupProgram("strategy_b_sysctl", "sysctl"),))

    def evaluate(self, strategy: Strategy) -> float:
        """0 for the current strategy, 1 for the other: they take turns."""
        return 0 if strategy is self.strategy else 1

    def handle(self, event: Event) -> None:
        sender = self.strategies[event.metric[0]].name
        log.notice(f"event  (scenario {event.scenario_id}) for tuner {self.name}, strategy "
                   f"{self.strategy.name} (sent by {sender}'s program)")
