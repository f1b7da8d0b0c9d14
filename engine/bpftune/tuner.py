"""What a tuner is: its tunables, scenarios, BPF program and event handling.

A tuner is a subclass of :class:`Tuner` in a module of the ``bpftune.tuners`` package (or a
trusted plugin file). It never writes a sysctl itself: it asks the engine through
:meth:`Tuner.change`, the single path that checks ceilings, writes in the right netns, reads
back, logs, counts and records the change.
"""

from __future__ import annotations

import enum
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from bpftune.btf import Field
from bpftune.sysctl import LONG_MAX, Value

if TYPE_CHECKING:
    from bpftune.engine import Engine
    from bpftune.events import Event


PLUGIN_CLUSTERS, PLUGIN_CLUSTER_RANGE = 200, 1800


class TunerState(enum.Enum):
    INACTIVE = "inactive"
    ACTIVE = "active"
    MANUAL = "manual"  # an administrator changed one of its tunables
    GONE = "gone"  # the resource it tuned went away


Ceiling = Callable[[], tuple[int, ...]]


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

    def position_names(self) -> tuple[str, ...]:
        return self.positions or tuple(str(i) for i in range(self.values))

    def limits(self) -> tuple[int, ...]:
        return self.ceiling() if self.ceiling else (LONG_MAX,) * self.values


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str


@dataclass(frozen=True)
class Strategy:
    name: str
    description: str


class Tuner:
    name: ClassVar[str]
    tunables: ClassVar[tuple[Tunable, ...]] = ()
    scenarios: ClassVar[tuple[Scenario, ...]] = ()
    #: BPF source file in the bpf/ directory, compiled with the fields below as -D offsets.
    bpf_source: ClassVar[str | None] = None
    fields: ClassVar[dict[str, Field]] = {}
    #: Kernel features this tuner needs (names from bpftune.support.FEATURES).
    features: ClassVar[frozenset[str]] = frozenset()
    #: Tracepoints ("category/name") the BPF program attaches to.
    tracepoints: ClassVar[tuple[str, ...]] = ()
    strategies: ClassVar[tuple[Strategy, ...]] = ()
    #: Set for plugin tuners: their BPF source lives beside the plugin file.
    plugin_dir: ClassVar[str | None] = None
    #: Whether its events are about tuning in the event's namespace (so only namespaces
    #: bpftune can enter are passed on); False for tuners that watch namespaces themselves.
    acts_in_netns: ClassVar[bool] = True
    #: PCP cluster of this tuner's metrics: fixed, so PMIDs never change. Plugins may leave it
    #: None for one derived from the name (site-local range).
    pmda_cluster: ClassVar[int | None] = None

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
        self.strategy: Strategy | None = self.strategies[0] if self.strategies else None

    def __repr__(self) -> str:
        return f"{self.name}[{self.id}]"

    # Life cycle, overridden by tuners as needed.
    def init(self) -> None:
        """Called after the BPF program is loaded and initial values are read."""

    def started(self) -> None:
        """Called once every tuner is loaded."""

    def fini(self) -> None:
        """Called before the BPF program is unloaded."""

    def handle(self, event: Event) -> None:
        """An event from this tuner's BPF program."""

    def tick(self, now: float) -> None:
        """Called about once a second from the main loop."""

    def netns_created(self, cookie: int) -> None:
        """A network namespace was created while bpftune runs."""

    def netns_destroyed(self, cookie: int) -> None:
        """A network namespace is gone: drop what the tuner keeps about it."""

    def table_sizes(self) -> dict[str, int]:
        """Sizes of the tuner's per-namespace tables (see ``Engine.table_sizes``)."""
        return {}

    def summarize(self) -> list[str]:
        """Extra summary lines (beyond the per-scenario ones the engine prints)."""
        return []

    # Helpers for tuners.
    def tunable(self, name: str) -> Tunable:
        for t in self.tunables:
            if t.name == name:
                return t
        raise KeyError(name)

    def scenario_id(self, name: str) -> int:
        return next(i for i, s in enumerate(self.scenarios) if s.name == name)

    def value(self, tunable: Tunable, cookie: int = 0) -> Value:
        """The live value of a tunable in the namespace ``cookie``."""
        return self.engine.changes.read(tunable, cookie)

    def change(self, tunable: Tunable, scenario: int, cookie: int, new: Value,
               reason: str, *, expect: Value | None = None) -> bool:
        """Ask the engine to change ``tunable``; see ``Changes.apply``."""
        return self.engine.changes.apply(self, tunable, scenario, cookie, new, reason,
                                         expect=expect)
