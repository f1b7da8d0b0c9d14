"""What a tuner is: its tunables, scenarios, BPF program and event handling.

A tuner is a subclass of :class:`Tuner` in a module of the ``bpftune.tuners`` package (or a
trusted plugin file). It never writes a sysctl itself: it asks the engine through
:meth:`Tuner.change`, the single path that checks ceilings, writes in the right netns, reads
back, logs, counts and records the change.
"""

from __future__ import annotations

import ctypes as ct
import enum
import math
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from bpftune.access import SYSCTL, Access
from bpftune.btf import Btf, BtfError, Field
from bpftune.events import MAX_VALUES, payload_checks
from bpftune.hooks import SAMPLE_EVERY, SAMPLE_SLOTS, Plan, PlanError, Watch, make_plan
from bpftune.sysctl import LONG_MAX, SysctlError, Value

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from bpftune.correlation import Correlation
    from bpftune.engine import Engine
    from bpftune.events import Event
    from bpftune.learning import LearningRate
    from bpftune.verify import Figure, Scope, Verification


PLUGIN_CLUSTERS, PLUGIN_CLUSTER_RANGE = 200, 1800
MAX_TUNABLES = 32  # as bpftune.bpf.h: the tunable_values map's size


class TunerState(enum.Enum):
    INACTIVE = "inactive"
    ACTIVE = "active"
    MANUAL = "manual"  # an administrator changed one of its tunables
    GONE = "gone"  # the resource it tuned went away


Ceiling = Callable[[], tuple[int, ...]]
#: Tunable.absent_when of the IPv6 sysctls.
NO_IPV6 = "no IPv6: built without CONFIG_IPV6 or booted with ipv6.disable=1"


@dataclass(frozen=True)
class Tunable:
    """A sysctl a tuner manages. ``ceiling`` gives the hard upper bound of each value."""

    name: str
    values: int = 1
    namespaced: bool = False
    optional: bool = False
    string: bool = False
    sysctl: bool = True  # False for things not read through /proc/sys (per-socket settings)
    ceiling: Ceiling | None = None
    #: What each value means, e.g. ("min", "default", "max"); used in logs and metric names.
    positions: tuple[str, ...] = ()
    #: Unit of the values for metrics: "bytes", "pages" or "" (a plain number).
    unit: str = ""
    #: How it is read and written (bpftune.access): a sysctl unless said otherwise.
    access: Access = SYSCTL
    #: For a string tunable its BPF program compares against: the number it stands for
    #: (e.g. a hex cpumask), as published in tunable_values.
    as_number: Callable[[str], int] | None = None
    #: The key figures a change of it is verified with (bpftune.verify): watched in the
    #: namespace of the change for a window after it, and reverted if one clearly worsens.
    figures: tuple[Figure, ...] = ()
    #: For an optional tunable: which kernels lack it, and what the tuner then leaves
    #: undone; said on such a kernel with the tuner's hooks (bpftune -S, and at start).
    absent_when: str = ""
    absent_means: str = ""

    def here(self) -> bool:
        """Whether this kernel has it (in the caller's namespace)."""
        try:
            self.access.read(self.name, self.string)
        except SysctlError:
            return False
        return True

    def absence(self) -> str:
        """What a kernel without it (an optional tunable) leaves undone."""
        return f"this kernel has no {self.name} ({self.absent_when}): {self.absent_means}"

    def position_names(self) -> tuple[str, ...]:
        return self.positions or tuple(str(i) for i in range(self.values))

    def limits(self) -> tuple[int, ...]:
        return self.ceiling() if self.ceiling else (LONG_MAX,) * self.values


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    #: It happens per connection in normal operation (tcp_conn's choices): no pmie rule
    #: alarms on it repeating.
    routine: bool = False
    #: Its changes are verified (bpftune.verify). False for scenarios that trade a figure
    #: on purpose or undo an emergency: judging them by those figures would undo them.
    verify: bool = True


@dataclass(frozen=True)
class CgroupProgram:
    """A function of the tuner's BPF source that the engine attaches to the cgroup (and
    detaches on unload, or at the next start after a crash)."""

    function: str
    kind: str  # a key of bpftune.bpf.CGROUP_ATTACH: "sysctl" or "sock_ops"


@dataclass(frozen=True)
class Published:
    """A value a tuner publishes beyond its tunables and scenarios (e.g. choices per
    congestion-control algorithm): the PMDA serves it as bpftune.<tuner>.<name>, with a
    number that never changes, this help text and unit."""

    name: str  # a PMNS name component (letters, digits, underscores)
    help: str
    unit: str = ""  # "bytes", "count" or "" (a plain number)
    counter: bool = False  # a count that only grows (PCP counter semantics)
    instances: str = ""  # what instances are ("cpu", "algorithm"); "" for a single value
    #: A pmie rule fires when some instance passes this (per second for a counter); the
    #: text says what it means and what to do. None: no rule.
    alarm: float | None = None
    alarm_help: str = ""


@dataclass(frozen=True)
class Strategy:
    """One way of working of a tuner with strategies (upstream's struct bpftunable_strategy),
    with BPF programs of its own. One strategy runs at a time, the first at start; when its
    ``timeout`` ends the engine evaluates every strategy and runs the best
    (:func:`choose_strategy`), unloading the programs of the one it leaves."""

    name: str
    description: str
    #: Seconds until the strategies are evaluated again; 0: never.
    timeout: float = 0
    #: How good the strategy is now (negative: rule it out), as a number: the name of a
    #: method of the tuner, or a function, called with (tuner, strategy).
    evaluate: str | Callable[[Tuner, Strategy], float] | None = None
    #: What only this strategy's BPF programs watch, besides the tuner's ``watches``: the
    #: compile for this strategy has their HOOK_* defines (and STRATEGY_ID, its index).
    watches: tuple[Watch, ...] = ()
    #: Cgroup programs only this strategy attaches, besides the tuner's.
    cgroup_programs: tuple[CgroupProgram, ...] = ()


def choose_strategy(evaluations: Iterable[tuple[Strategy, float | None]]) -> Strategy | None:
    """Upstream's rule: the highest evaluation wins, the later strategy on a tie; a negative
    (or failed: None) evaluation never wins. None if no strategy qualifies."""
    best, best_value = None, 0.0
    for strategy, value in evaluations:
        if value is not None and value >= best_value:
            best, best_value = strategy, value
    return best


class Tuner:
    name: ClassVar[str]
    tunables: ClassVar[tuple[Tunable, ...]] = ()
    scenarios: ClassVar[tuple[Scenario, ...]] = ()
    #: BPF source file in the bpf/ directory, compiled with the fields below as -D offsets.
    bpf_source: ClassVar[str | None] = None
    fields: ClassVar[dict[str, Field]] = {}
    #: Kernel features this tuner needs besides its hooks' (bpftune.support.FEATURES).
    features: ClassVar[frozenset[str]] = frozenset()
    #: What the BPF program watches, each with its hooks in order of preference.
    watches: ClassVar[tuple[Watch, ...]] = ()
    cgroup_programs: ClassVar[tuple[CgroupProgram, ...]] = ()
    #: Enum values the BPF source compares against, taken from the kernel's BTF (they
    #: differ per kernel: SKB_DROP_REASON_CPU_BACKLOG is 46, 61, 71 on 6.1, 6.12, 6.18):
    #: C name -> (enum, enumerator), passed as -D<C name>=<value>. A missing one is a
    #: PlanError.
    constants: ClassVar[dict[str, tuple[str, str]]] = {}
    #: The tuner's own event record (in the event's ``str`` area), e.g. a device's ifindex
    #: and name: a ctypes struct, and the name of the C struct it must match (checked at
    #: compile time). Read it with ``event.payload(self.payload)``.
    payload: ClassVar[type[ct.Structure] | None] = None
    payload_struct: ClassVar[str] = ""
    #: A tuner that never loads on any kernel we know (it only says why, in -S and
    #: -q tuners) has no metrics, so no dashboard or pmlogger configuration.
    reports_only: ClassVar[bool] = False
    #: Ways of working the engine switches between (see Strategy), the first at start.
    #: Declared as class attributes (``FAST = Strategy(...)``) they also give the BPF
    #: compile ``-DSTRATEGY_<NAME>=<index>``, to compare with STRATEGY_ID.
    strategies: ClassVar[tuple[Strategy, ...]] = ()
    #: Extra values for the PMDA; ``published_values`` gives them.
    published: ClassVar[tuple[Published, ...]] = ()
    #: Set for plugin tuners: their BPF source lives beside the plugin file.
    plugin_dir: ClassVar[str | None] = None
    #: Whether its events are about tuning in the event's namespace (so only namespaces
    #: bpftune can enter are passed on); False for tuners that watch namespaces themselves.
    acts_in_netns: ClassVar[bool] = True
    #: PCP cluster of this tuner's metrics: fixed, so PMIDs never change. Plugins may leave it
    #: None for one derived from the name (site-local range).
    pmda_cluster: ClassVar[int | None] = None

    def __init_subclass__(cls, **kwargs) -> None:
        """Tunables and scenarios declared as class attributes (``WMEM = Tunable(...)``)
        become ``tunables`` and ``scenarios`` in declaration order; their attribute names
        are the ``TUNABLE_<NAME>`` and ``SCENARIO_<NAME>`` ids the BPF source is compiled
        with, so ids are declared once, here."""
        super().__init_subclass__(**kwargs)
        own = vars(cls)
        for kind, attr in ((Tunable, "tunables"), (Scenario, "scenarios"),
                           (Strategy, "strategies")):
            declared = {k: v for k, v in own.items() if isinstance(v, kind)}
            if declared:
                if attr in own:
                    raise TypeError(f"{cls.__name__}: declare {attr} as attributes or as a "
                                    f"tuple, not both")
                setattr(cls, attr, tuple(declared.values()))
                setattr(cls, f"_{attr}_keys", tuple(declared))
        if len(cls.tunables) > MAX_TUNABLES:
            raise TypeError(f"{cls.__name__}: more than {MAX_TUNABLES} tunables")
        unnamed = [w.what for w in cls.all_watches() if not w.sample
                   and any(h.sampled for h in w.hooks)]
        if unnamed:
            raise TypeError(f"{cls.__name__}: sampled hooks of {unnamed} need a sample name")
        if len(cls.sample_names()) > SAMPLE_SLOTS:
            raise TypeError(f"{cls.__name__}: more than {SAMPLE_SLOTS} samples")
        cls._check_strategies()

    @classmethod
    def _check_strategies(cls) -> None:
        names = [s.name for s in cls.strategies]
        if len(set(names)) < len(names):
            raise TypeError(f"{cls.__name__}: strategies need different names")
        evaluated = any(s.timeout > 0 for s in cls.strategies)
        for s in cls.strategies:
            if evaluated and s.evaluate is None:
                raise TypeError(f"{cls.__name__}: strategy '{s.name}' has no evaluate")
            if isinstance(s.evaluate, str) and (s.evaluate in vars(Tuner) or not callable(
                    getattr(cls, s.evaluate, None))):
                raise TypeError(f"{cls.__name__}: strategy '{s.name}' evaluates with "
                                f"'{s.evaluate}', which is not a method of its own")

    @classmethod
    def all_watches(cls) -> tuple[Watch, ...]:
        """The tuner's watches and those of each of its strategies."""
        return tuple(dict.fromkeys(cls.watches + tuple(w for s in cls.strategies
                                                       for w in s.watches)))

    @classmethod
    def sample_names(cls) -> list[str]:
        """The watches' sample names; a sample's index is its slot in bpftune_samples (the
        same in every strategy's compile)."""
        return list(dict.fromkeys(w.sample for w in cls.all_watches() if w.sample))

    @classmethod
    def id_defines(cls) -> list[str]:
        """``-DTUNABLE_<NAME>=<id>``, ``-DSCENARIO_<NAME>=<id>`` and
        ``-DSTRATEGY_<NAME>=<id>`` for the BPF compile."""
        flags = []
        for attr, prefix in (("tunables", "TUNABLE"), ("scenarios", "SCENARIO"),
                             ("strategies", "STRATEGY")):
            keys = getattr(cls, f"_{attr}_keys", ())
            flags += [f"-D{prefix}_{key}={i}" for i, key in enumerate(keys)]
        slots = {w.sample_define: cls.sample_names().index(w.sample)
                 for w in cls.all_watches() if w.sample}
        return flags + [f"-D{define}={slot}" for define, slot in slots.items()]

    @classmethod
    def check_needed(cls, btf: Btf) -> None:
        """Raise hooks.NotNeeded if this kernel does not need the tuner."""

    @classmethod
    def plan(cls, btf: Btf, features: set[str]) -> Plan:
        """How this tuner would watch the kernel described by ``btf`` (PlanError if it
        cannot, NotNeeded if it need not); with strategies, how its first one would."""
        return next(iter(cls.strategy_plans(btf, features).values()))

    @classmethod
    def strategy_plans(cls, btf: Btf, features: set[str]) -> dict[Strategy | None, Plan]:
        """The plan of each strategy (the key None for a tuner without strategies). Every
        strategy must have one: a switch must never find that its programs cannot load."""
        missing = sorted(cls.features - features)
        if missing:
            raise PlanError(f"missing {', '.join(missing)}")
        cls.check_needed(btf)
        for field in cls.fields.values():
            try:
                btf.field(field)
            except BtfError as e:
                raise PlanError(str(e)) from None
        return {s: cls._plan_strategy(btf, features, s) for s in cls.strategies or (None,)}

    @classmethod
    def _plan_strategy(cls, btf: Btf, features: set[str], strategy: Strategy | None) -> Plan:
        watches, cgroup = cls.watches, cls.cgroup_programs
        if strategy is not None:
            watches, cgroup = watches + strategy.watches, cgroup + strategy.cgroup_programs
        try:
            plan = make_plan(watches, btf, features)
        except PlanError as e:
            if strategy is None:
                raise
            raise PlanError(f"strategy '{strategy.name}': {e}") from None
        plan.cgroup = [p.kind for p in cgroup]
        for name, (enum_name, enumerator) in cls.constants.items():
            value = btf.enum_value(enum_name, enumerator)
            if value is None:
                raise PlanError(f"kernel has no {enumerator} in enum {enum_name}")
            plan.defines.append(f"-D{name}={value}")
        if strategy is not None:
            plan.defines.append(f"-DSTRATEGY_ID={cls.strategies.index(strategy)}")
        return plan

    @classmethod
    def cluster(cls) -> int:
        if cls.pmda_cluster is not None:
            return cls.pmda_cluster
        return PLUGIN_CLUSTERS + zlib.crc32(cls.name.encode()) % PLUGIN_CLUSTER_RANGE

    def __init__(self, engine: Engine, tuner_id: int) -> None:
        self.engine = engine
        self.id = tuner_id
        self.state = TunerState.INACTIVE
        self.bpf = None
        self.hooks = Plan()  # what its BPF program attached to, chosen at load
        #: Loaded again by ``bpftune -E`` (Engine.enable): init must take the live values
        #: as they are, not apply what it sets at start.
        self.given_back = False
        #: The plan of each strategy (None: no strategies), made at load: a switch happens
        #: after the kernel's BTF is freed.
        self.plans: dict[Strategy | None, Plan] = {}
        self.strategy: Strategy | None = self.strategies[0] if self.strategies else None
        #: Strategy name -> its last evaluation (None: it failed).
        self.strategy_evaluations: dict[str, float | None] = {}
        #: When (time.monotonic()) the strategies are evaluated next; None: never.
        self.strategy_due: float | None = None
        #: Counts its strategy switches (loads of new BPF programs): events carry it
        #: (events.event_tuner_id).
        self.generation = 0

    def __repr__(self) -> str:
        return f"{self.name}[{self.id}]"

    # Life cycle, overridden by tuners as needed.
    def init(self) -> None:
        """Called after the BPF program is loaded and initial values are read (again after
        each strategy switch, as upstream)."""

    @classmethod
    def compile_checks(cls) -> str:
        """C appended to the tuner's source: its payload layout's static assertions."""
        return payload_checks(cls.payload, cls.payload_struct) if cls.payload else ""

    def compile_defines(self) -> list[str]:
        """Extra -D flags known only at run time (e.g. kernel addresses), for the compile."""
        return []

    def started(self) -> None:
        """Called once every tuner is loaded."""

    def fini(self) -> None:
        """Called before the BPF program is unloaded (also before a strategy switch)."""

    def handle(self, event: Event) -> None:
        """An event from this tuner's BPF program."""

    def tick(self, now: float) -> None:
        """Called about once a second from the main loop."""

    def netns_created(self, cookie: int) -> None:
        """A network namespace was created while bpftune runs."""

    def netns_destroyed(self, cookie: int) -> None:
        """A network namespace is gone: drop what the tuner keeps about it."""

    def handed_over(self, cookie: int) -> None:
        """An administrator took the tuner over in the namespace ``cookie`` (not the global
        one, which unloads the tuner): its BPF program should leave that namespace alone
        where it acts on its own (the engine already drops the namespace's events)."""

    def handed_back(self, cookie: int) -> None:
        """The administrator gave the namespace ``cookie`` back (``bpftune -E``): undo what
        ``handed_over`` did there."""

    def figures(self, tunable: Tunable, scenario: int) -> tuple[Figure, ...]:
        """What a change of ``tunable`` for ``scenario`` is verified with (none: no
        verification, no verdict)."""
        return tunable.figures if self.scenarios[scenario].verify else ()

    def figure_counters(self, scope: Scope) -> dict[str, int]:
        """The tuner's own cumulative counters in a namespace (a cookie, 0: the global one)
        or, for figures with scope "subject", on a subject (netns cookie, subject), for
        figures with source ``verify.TUNER`` (keys without the "<name>:" prefix the figures
        give them). Read once a tick per sampled scope: keep it cheap."""
        return {}

    def undo(self, verification: Verification, evidence: str) -> bool:
        """Undo a change that made a figure clearly worse when it was not a sysctl's value
        but a subject's (``verification.subject``, e.g. tcp_conn's BBR for a host), and log
        it with ``evidence``; False if it was not undone. (Sysctls: Changes.revert.)"""
        return False

    def held_subjects(self) -> list[tuple[int, str, float, int]]:
        """Subjects held after ``undo``: (netns cookie, subject, until (time.monotonic),
        reverts), for the state query."""
        return []

    def reverted(self, tunable: Tunable, cookie: int) -> None:
        """A change of ``tunable`` in ``cookie`` was reverted after its verdict: the BPF
        program sees the restored global value."""
        if not tunable.namespaced or cookie == 0:
            self.publish_values(tunable)

    def table_sizes(self) -> dict[str, int]:
        """Sizes of the tuner's per-namespace tables (see ``Engine.table_sizes``)."""
        return {}

    def published_values(self) -> dict[str, int | dict[str, int]]:
        """The current values of ``published``: a number, or {instance: number}."""
        return {}

    def summarize(self) -> list[str]:
        """Extra summary lines (beyond the per-scenario ones the engine prints)."""
        return []

    def sample_lines(self) -> list[str]:
        """Upstream's exit line for each sampled hook the program runs: how often it was
        called, and that it looked at one call in SAMPLE_EVERY."""
        if self.bpf is None:
            return []
        counted_in: dict[str, str] = {}  # sample -> the slot its hook counts in
        first_of: dict = {}  # hook -> the sample of the first watch using it
        for w in self.all_watches():
            if (hook := self.hooks.hooks.get(w.what)) is not None and hook.sampled:
                # Watches sharing a hook share its program, which counts in the first's slot.
                counted_in.setdefault(w.sample, first_of.setdefault(hook, w.sample))
        table = self.bpf["bpftune_samples"] if counted_in else None
        lines = []
        for name, slot in counted_in.items():
            calls = sum(table[table.Key(self.sample_names().index(slot))])  # over all CPUs
            lines.append(f"Sample '{name}': associated program was called {calls} times, "
                         f"collected data every {SAMPLE_EVERY} of these.")
        return lines

    def cgroup_attachments(self) -> list[CgroupProgram]:
        """What the engine attaches to the cgroup: the tuner's own cgroup programs, its
        strategy's, and its plan's sock_ops hooks."""
        return self._cgroup_programs(self.strategy, self.hooks)

    def every_cgroup_attachment(self) -> list[CgroupProgram]:
        """What any of its strategies attaches (a killed bpftune may have left any)."""
        return list(dict.fromkeys(p for strategy, plan in self.plans.items()
                                  for p in self._cgroup_programs(strategy, plan)))

    def _cgroup_programs(self, strategy: Strategy | None, plan: Plan) -> list[CgroupProgram]:
        return [*self.cgroup_programs, *(strategy.cgroup_programs if strategy else ()),
                *(CgroupProgram(f, "sock_ops") for f in plan.sock_ops_programs())]

    # Strategies.
    def evaluate_strategy(self, strategy: Strategy) -> float:
        """What ``strategy.evaluate`` says of it now (exceptions are the caller's)."""
        how = strategy.evaluate
        value = float(getattr(self, how)(strategy) if isinstance(how, str)
                      else how(self, strategy))
        if not math.isfinite(value):
            raise ValueError(f"evaluation {value} is not a finite number")
        return value

    def arm_strategy_timeout(self, now: float) -> None:
        """Evaluate the strategies again when the current one's timeout ends."""
        timeout = self.strategy.timeout if self.strategy else 0
        self.strategy_due = now + timeout if timeout > 0 else None

    # Helpers for tuners.
    def tunable(self, name: str) -> Tunable:
        for t in self.tunables:
            if t.name == name:
                return t
        raise KeyError(name)

    def scenario_id(self, scenario: Scenario | int) -> int:
        return scenario if isinstance(scenario, int) else self.scenarios.index(scenario)

    def tunable_id(self, tunable: Tunable) -> int:
        return self.tunables.index(tunable)

    @property
    def learning_rate(self) -> LearningRate:
        """How near a limit counts as near, and how far a limit moves (bpftune -r)."""
        return self.engine.learning_rate

    def correlation(self, key: str, cookie: int) -> Correlation:
        """The tuner's correlation ``key`` (e.g. a tunable's name) in a namespace; forgotten
        with the namespace."""
        return self.engine.correlations[(self.name, key, cookie)]

    def entered(self, cookie: int) -> AbstractContextManager:
        """Run the block in the namespace ``cookie`` (e.g. to read its /proc/net counters)."""
        return self.engine.namespaces.entered(cookie)

    def changed_by(self, tunable: Tunable, cookie: int = 0) -> str | None:
        """The tuner whose change of ``tunable`` the ledger holds (this run's or one an
        earlier run left), if any."""
        record = self.engine.changes.records.get(
            (tunable.name, self.engine.changes.ledger_cookie(tunable, cookie)))
        return record.tuner if record else None

    @classmethod
    def absences(cls) -> list[str]:
        """What this kernel's lack of optional tunables leaves undone (bpftune -S)."""
        return [t.absence() for t in cls.tunables if t.absent_means and not t.here()]

    def value(self, tunable: Tunable, cookie: int = 0) -> Value:
        """The live value of a tunable in the namespace ``cookie``."""
        return self.engine.changes.read(tunable, cookie)

    def change(self, tunable: Tunable, scenario: Scenario | int, cookie: int, new: Value,
               reason: str, *, expect: Value | None = None) -> bool:
        """Ask the engine to change ``tunable``; see ``Changes.apply``."""
        changed = self.engine.changes.apply(self, tunable, self.scenario_id(scenario), cookie,
                                            new, reason, expect=expect)
        if changed and (not tunable.namespaced or self.engine.namespaces.is_global(cookie)):
            self.publish_values(tunable)
        return changed

    def publish_values(self, *tunables: Tunable) -> None:
        """Let the BPF program see the global values of ``tunables`` (all by default) in
        its ``tunable_values`` map (bpftune.bpf.h)."""
        if self.bpf is None:
            return
        table = self.bpf["tunable_values"]
        for tunable in tunables or self.tunables:
            if not tunable.sysctl or (tunable.string and tunable.as_number is None):
                continue
            try:
                values = self.engine.changes.read(tunable)
                if isinstance(values, str):
                    values = (tunable.as_number(values),)
            except (SysctlError, ValueError):
                continue  # an optional tunable this kernel does not have
            base = self.tunable_id(tunable) * MAX_VALUES
            for position, value in enumerate(values[:MAX_VALUES]):
                table[table.Key(base + position)] = table.Leaf(value)

    def count(self, tunable: Tunable, scenario: Scenario | int, cookie: int,
              reason: str | None = None, times: int = 1) -> None:
        """Count a scenario acted on without a change of the tunable (and with ``reason``,
        log the scenario and the reason)."""
        self.engine.changes.count(self, tunable, self.scenario_id(scenario), cookie, times)
        if reason is not None:
            self.report(tunable, scenario, cookie, reason)

    def report(self, tunable: Tunable, scenario: Scenario | int, cookie: int,
               reason: str) -> None:
        """Log a scenario and its reason, as a change is logged, without counting it."""
        self.engine.changes.report(self, tunable, self.scenario_id(scenario), cookie, reason)
