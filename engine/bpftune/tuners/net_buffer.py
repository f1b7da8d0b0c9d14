"""net_buffer: the per-CPU input backlog, NAPI budgets and high-order skb allocations.

Packets a driver or a veth hands to the stack with netif_rx wait in the receiving CPU's
backlog queue; when it holds net.core.netdev_max_backlog packets, more are dropped (drop
reason CPU_BACKLOG). bpf/net_buffer.bpf.c counts those drops and proposes a longer queue,
and flow limiting on the dropping CPU (net.core.flow_limit_cpu_bitmap) so that small flows
are not starved by big ones while the queue fills. NAPI polling stops when it has used
net.core.netdev_budget packets or netdev_budget_usecs of time with work left: the kernel
counts a "time squeeze" (/proc/net/softnet_stat, read here once a second), and the budgets
grow, unless the time tasks wait for a CPU grows with them, when they shrink. Upstream
behaviour: reference section 5.6; deliberate differences are marked "Upstream".
"""

from __future__ import annotations

import os
import re
import time
from typing import TYPE_CHECKING, ClassVar

from bpftune import procnet
from bpftune.changes import GLOBAL, due_to
from bpftune.events import Event
from bpftune.hooks import Watch, raw_tp
from bpftune.log import log
from bpftune.memory import total_ram_bytes
from bpftune.sysctl import SysctlError
from bpftune.tuner import Published, Scenario, Tunable, Tuner
from bpftune.verify import BACKLOG_DROPS, CPU_WAIT, TIME_SQUEEZES

if TYPE_CHECKING:
    from bpftune.engine import Engine


# Upstream's limit for netdev_budget_usecs: a softirq that may poll for 50 ms keeps every
# task on that CPU waiting that long. Upstream reached ~300 ms on a Kubernetes node
# (oracle/bpftune#178); here it is also the tunable's hard ceiling, so nothing passes it.
USECS_CAP = 50_000
# A NAPI cycle can only use a packet budget it can process within USECS_CAP: at the ~1 Mpps
# a CPU handles in the kernel stack, that is about 50000 packets, rounded up to 2^16.
BUDGET_CEILING = 1 << 16
BACKLOG_CEILING = 1 << 20
BYTES_PER_QUEUED_PACKET = 2048  # truesize of a full-MTU skb, roughly
BACKOFF_HOLD_SECONDS = 60  # after shrinking the budgets for wait time, no growth this long
HIGH_ORDER_FIXED_IN = (5, 14)  # per-CPU page frag caches: no zone-lock contention


def _backlog_ceiling() -> tuple[int, ...]:
    """Upstream has none. The queue is per CPU, in packets: 2^20 queued packets are over a
    second of work for a CPU even at 1 Mpps, so a longer queue only adds latency; and every
    CPU's queue full at once must fit in 1/16 of RAM."""
    cpus = os.cpu_count() or 1
    return (min(BACKLOG_CEILING, total_ram_bytes() // 16 // (cpus * BYTES_PER_QUEUED_PACKET)),)


def _all_cpus() -> tuple[int, ...]:
    # A cpumask string is not clamped by the change path; this says what the tuner may set.
    return ((1 << min(os.cpu_count() or 1, 63)) - 1,)


def _flag() -> tuple[int, ...]:
    return (1,)


def kernel_version(release: str | None = None) -> tuple[int, int]:
    """(major, minor) of ``release`` (default: the running kernel), e.g. "6.18.44-x" -> (6, 18)."""
    found = re.match(r"(\d+)\.(\d+)", release or os.uname().release)
    return (int(found[1]), int(found[2])) if found else (0, 0)


# flow_limit_cpu_bitmap is a cpumask: hex, in comma-separated 32-bit groups, each group as
# wide as the CPUs it covers ("3" with 2 CPUs, "03" with 8, "00000000,00000001" with 64).
# Upstream reads and writes it as a decimal number, which is the same only below 10.
def parse_cpumask(text: str) -> int:
    return int(text.replace(",", "") or "0", 16)


def format_cpumask(mask: int, like: str) -> str:
    """``mask`` in the layout of ``like`` (a value the kernel printed), so the read-back
    matches what was written."""
    widths = [len(group) for group in like.split(",")]
    groups, rest = [], mask
    for width in reversed(widths):
        groups.append(f"{rest & 0xFFFFFFFF:0{width}x}")
        rest >>= 32
    return ",".join(reversed(groups))


def softnet_stat() -> dict[str, tuple[int, int]]:
    """Per CPU: (packets dropped for a full backlog, NAPI cycles that ended with work left),
    the second and third hex columns of softnet_stat."""
    return {f"cpu{cpu}": (dropped, squeezed)
            for cpu, (_, dropped, squeezed) in procnet.softnet_columns().items()}


def time_squeezes() -> int:
    """NAPI cycles that ended with work left, summed over CPUs."""
    return sum(squeezed for _, squeezed in softnet_stat().values())


class WaitShare:
    """Percent of time tasks spent waiting for a CPU since the last sample. Upstream divides
    wait by run time (often over 100 %); a share of run + wait stays in 0..100."""

    def __init__(self) -> None:
        self.last: tuple[int, int] | None = None

    def sample(self) -> float | None:
        now = procnet.cpu_wait()
        last, self.last = self.last, now
        if now is None or last is None or now[1] <= last[1]:
            return None
        return 100 * max(now[0] - last[0], 0) / (now[1] - last[1])


class NetBufferTuner(Tuner):
    name = "net_buffer"
    pmda_cluster = 15
    bpf_source = "net_buffer.bpf.c"
    features = frozenset({"btf", "ringbuf"})
    # kfree_skb fires for dropped packets only (consumed ones go to consume_skb), and its
    # reason says which were dropped for a full backlog; every kernel we know has it.
    watches = (Watch("backlog drops", (raw_tp("kfree_skb"),)),)
    constants: ClassVar[dict[str, tuple[str, str]]] = {
        "DROP_CPU_BACKLOG": ("skb_drop_reason", "SKB_DROP_REASON_CPU_BACKLOG"),
    }
    # What the decisions rest on, for the PMDA (bpftune.net_buffer.*, per CPU).
    published = (
        Published("backlog_drops", "packets dropped because a CPU's input backlog queue "
                  "(net.core.netdev_max_backlog) was full", unit="count", counter=True,
                  instances="cpu"),
        Published("time_squeeze", "NAPI polls that ended with packets left because "
                  "netdev_budget or netdev_budget_usecs ran out", unit="count", counter=True,
                  instances="cpu"),
    )
    # Tunables (all global: the queues and budgets are per CPU, not per namespace); the
    # attribute names are the TUNABLE_* ids in bpf/net_buffer.bpf.c.
    MAX_BACKLOG = Tunable("net.core.netdev_max_backlog", ceiling=_backlog_ceiling,
                          figures=(BACKLOG_DROPS,))
    # A hex cpumask; BPF sees the first 63 CPUs' bits as a number.
    FLOW_LIMIT_CPU_BITMAP = Tunable("net.core.flow_limit_cpu_bitmap", string=True,
                                    optional=True,
                                    absent_when="built without CONFIG_NET_FLOW_LIMIT",
                                    absent_means="backlog drops grow the backlog, and no "
                                                 "CPU is given flow limits",
                                    ceiling=_all_cpus,
                                    as_number=lambda t: parse_cpumask(t) & ((1 << 63) - 1),
                                    figures=(BACKLOG_DROPS,))
    BUDGET = Tunable("net.core.netdev_budget", ceiling=lambda: (BUDGET_CEILING,),
                     figures=(TIME_SQUEEZES, CPU_WAIT))
    BUDGET_USECS = Tunable("net.core.netdev_budget_usecs", ceiling=lambda: (USECS_CAP,),
                           figures=(TIME_SQUEEZES, CPU_WAIT))
    # Also tcp_buffer's (it sets 1 near TCP memory exhaustion and undoes that): as upstream,
    # one administrator write hands both tuners over.
    HIGH_ORDER_ALLOC_DISABLE = Tunable("net.core.high_order_alloc_disable", optional=True,
                                       ceiling=_flag)
    # Scenarios; the attribute names are the SCENARIO_* ids in bpf/net_buffer.bpf.c.
    NEED_BACKLOG = Scenario("need to increase max backlog size",
                            "Need to increase backlog size to prevent drops for faster "
                            "connection")
    SET_FLOW_LIMIT = Scenario("need to set per-cpu bitmap value",
                              "Need to set flow limit per-cpu to prioritize small flows")
    BUDGET_INCREASE = Scenario("need to increase # of packets processed per NAPI poll",
                               "Need to increase number of packets processed across network "
                               "devices during NAPI poll to use all of "
                               "net.core.netdev_budget_usecs")
    BUDGET_DECREASE = Scenario(
        "need to decrease # of packets processed per NAPI poll",
        "Need to decrease netdev_budget[_usecs] since the ratio of time spent waiting to run "
        "versus time spent running for tasks has increased as we have increased netdev "
        "budget.  This indicates either our budget increases directly let to increased wait "
        "times for other tasks, or that general load has increased; either way spending too "
        "much time in NAPI processing will hurt system performance.",
        verify=False)
    ENABLE_HIGH_ORDER = Scenario(
        "need to enable high-order allocation for skb page frags",
        "Before Linux 5.14, disabling high-order allocations for skb page frags avoided "
        "contention on the page allocator's zone lock; since then page frags come from "
        "per-CPU caches, so disabling them only costs performance",
        verify=False)
    BUDGET_REASON = "To maximize # packets processed per NAPI cycle, change {name} from " \
                    "({{old}}) -> ({{new}})"

    def __init__(self, engine: Engine, tuner_id: int) -> None:
        super().__init__(engine, tuner_id)
        self.squeezes: int | None = None
        self.wait_share = WaitShare()
        self.growth_held_until = 0.0
        self.cap_logged = False

    def published_values(self) -> dict[str, int | dict[str, int]]:
        stats = softnet_stat()
        return {"backlog_drops": {cpu: d for cpu, (d, _) in stats.items()},
                "time_squeeze": {cpu: q for cpu, (_, q) in stats.items()}}

    def init(self) -> None:
        log.debug(f"{self.name}: task wait share from {procnet.cpu_wait_source()}")
        self._enable_high_order_allocs()
        self.tick(time.monotonic())  # baselines, so the first tick can act

    # High-order allocations.
    def _enable_high_order_allocs(self) -> None:
        """Only at start: later a 1 is tcp_buffer's, set near TCP memory exhaustion (and
        undone by it when memory eases); so is a 1 an earlier tcp_buffer left in the
        ledger. Not when given back (bpftune -E): the administrator's value is the
        baseline."""
        tunable = self.HIGH_ORDER_ALLOC_DISABLE
        if kernel_version() < HIGH_ORDER_FIXED_IN or self.given_back:
            return
        if self.changed_by(tunable) not in (None, self.name):
            return
        try:
            (disabled,) = self.value(tunable)
        except SysctlError:
            return  # optional: kernels without it are fine
        if disabled:
            self.change(tunable, self.ENABLE_HIGH_ORDER, GLOBAL, (0,),
                        f"To maximize performance, set {tunable.name}=0 on more recent kernel "
                        f"since it is not needed as contention in high-order allocs is not "
                        f"present", expect=(disabled,))

    # Backlog drops (events from BPF).
    def handle(self, event: Event) -> None:
        tunable = self.tunables[event.tunable_id]
        if tunable == self.MAX_BACKLOG:
            # "Due to excessive drops, change net.core.netdev_max_backlog from (..) -> (..)"
            self.change(tunable, self.NEED_BACKLOG, GLOBAL, event.new_values(1),
                        due_to("excessive drops,", tunable), expect=event.old_values(1))
        elif tunable == self.FLOW_LIMIT_CPU_BITMAP:
            self._limit_flows(int(event.metric[0]))

    def _limit_flows(self, cpu: int) -> None:
        tunable = self.FLOW_LIMIT_CPU_BITMAP
        try:
            old = self.value(tunable)
        except SysctlError:
            return  # no flow limits in this kernel (said at start)
        mask = parse_cpumask(old)
        if mask & (1 << cpu):
            return
        self.change(tunable, self.SET_FLOW_LIMIT, GLOBAL, format_cpumask(mask | 1 << cpu, old),
                    f"To prioritize small flows, change {tunable.name} from ({{old}}) -> "
                    f"({{new}})", expect=old)

    # NAPI budgets (polled).
    def tick(self, now: float) -> None:
        wait = self.wait_share.sample()
        try:
            squeezes = time_squeezes()
        except (OSError, ValueError, IndexError):
            return
        last, self.squeezes = self.squeezes, squeezes
        if last is not None and squeezes > last:
            log.debug(f"{self.name}: {squeezes - last} time squeezes; tasks waited "
                      f"{'?' if wait is None else f'{wait:.1f}'}% of the time")
            self._squeezed(wait, now)

    def _squeezed(self, wait: float | None, now: float) -> None:
        (budget,) = self.value(self.BUDGET)
        (usecs,) = self.value(self.BUDGET_USECS)
        lr = self.learning_rate
        starving = self.correlation(self.BUDGET.name, GLOBAL)
        if wait:  # x: the budget in effect while the wait share was measured
            starving.add(budget, wait)
        if starving.correlated():
            # Upstream checks the usecs cap first, so at the cap it never backs off; and it
            # shrinks on every squeeze while the (cumulative) correlation lasts. We start
            # the correlation afresh and hold growth for a while.
            starving.reset()
            self.growth_held_until = now + BACKOFF_HOLD_SECONDS
            self._set_budgets(self.BUDGET_DECREASE, budget, lr.shrink(budget), usecs,
                              lr.shrink(usecs))
            return
        if now < self.growth_held_until:
            return
        if usecs >= USECS_CAP:
            if not self.cap_logged:
                log.notice(f"netdev_budget_usecs approached {usecs} usec, increasing beyond "
                           f"{USECS_CAP} usec is excessive, so ignoring.")
            self.cap_logged = True
            return
        self.cap_logged = False
        self._set_budgets(self.BUDGET_INCREASE, budget, lr.grow(budget), usecs,
                          min(lr.grow(usecs), USECS_CAP))

    def _set_budgets(self, scenario: Scenario, budget: int, new_budget: int, usecs: int,
                     new_usecs: int) -> None:
        """Both limits end a NAPI cycle (and count a squeeze), so they move together; usecs
        only if the budget moved, as upstream."""
        if self.change(self.BUDGET, scenario, GLOBAL, (new_budget,),
                       self.BUDGET_REASON.format(name=self.BUDGET.name), expect=(budget,)):
            self.change(self.BUDGET_USECS, scenario, GLOBAL, (new_usecs,),
                        self.BUDGET_REASON.format(name="netdev_budget_usecs"),
                        expect=(usecs,))
