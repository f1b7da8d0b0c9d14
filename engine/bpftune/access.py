"""How a tunable is read and written. A sysctl is the default; an ordered group of sysctls
(ipfrag_low_thresh <= ipfrag_high_thresh, gc_thresh1 <= gc_thresh2 <= gc_thresh3) changes as
one decision, so it is one tunable with one value per member: one scenario, one ledger entry,
one rollback. A neighbour table's thresholds are read and written over netlink.

Every kind goes through the one change path (bpftune.changes): ceilings, read-back, ledger,
rollback, scenario count, log lines. The ledger stores ``spec()`` with each record, so a
later run can roll a change back without the tuner that made it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from bpftune import neigh, sysctl
from bpftune.sysctl import Value


@dataclass(frozen=True)
class Access:
    kind: ClassVar[str]

    def read(self, name: str, string: bool = False) -> Value:
        raise NotImplementedError

    def write(self, name: str, new: Value, old: Value) -> None:
        raise NotImplementedError

    def names(self, name: str) -> tuple[str, ...]:
        """The sysctls an administrator may write to change this tunable."""
        return ()

    def spec(self) -> dict | None:
        """What the ledger keeps to find this access again (None: a plain sysctl)."""
        return {"kind": self.kind}

    def replicate(self, name: str, value: Value) -> list[str]:
        """Commands that set ``value`` on another system, for the exit summary."""
        return []

    def commands(self, name: str, value: Value, old: Value) -> list[str]:
        """Commands that change ``old`` to ``value`` here (advice mode), as bpftune would."""
        return self.replicate(name, value)


@dataclass(frozen=True)
class Sysctl(Access):
    kind: ClassVar[str] = "sysctl"

    def read(self, name: str, string: bool = False) -> Value:
        return sysctl.read(name, string=string)

    def write(self, name: str, new: Value, old: Value) -> None:
        sysctl.write(name, new)

    def names(self, name: str) -> tuple[str, ...]:
        return (name,)

    def spec(self) -> dict | None:
        return None

    def replicate(self, name: str, value: Value) -> list[str]:
        return [f'sysctl -w {name}="{sysctl.format_value(value)}"']


@dataclass(frozen=True)
class SysctlGroup(Access):
    """Single-valued sysctls that must stay in non-decreasing order, written so that they
    are in order after every single write (the kernel refuses some out-of-order writes:
    ipfrag_high_thresh may not go below ipfrag_low_thresh)."""

    kind: ClassVar[str] = "sysctl_group"
    members: tuple[str, ...]

    def read(self, name: str, string: bool = False) -> Value:
        return tuple(sysctl.read(m)[0] for m in self.members)

    def write(self, name: str, new: Value, old: Value) -> None:
        order = list(zip(self.members, new, strict=True))
        if new[-1] >= old[-1]:  # growing: the highest first, so none passes the next
            order.reverse()
        for member, value in order:
            sysctl.write(member, (value,))

    def names(self, name: str) -> tuple[str, ...]:
        return self.members

    def spec(self) -> dict | None:
        return {"kind": self.kind, "members": list(self.members)}

    def replicate(self, name: str, value: Value) -> list[str]:
        pairs = list(zip(self.members, value, strict=True))
        return [f'sysctl -w {m}="{v}"' for m, v in pairs]

    def commands(self, name: str, value: Value, old: Value) -> list[str]:
        """In the order ``write`` uses: the kernel refuses a low threshold above the high."""
        commands = self.replicate(name, value)
        return commands[::-1] if value[-1] >= old[-1] else commands


@dataclass(frozen=True)
class NeighTable(Access):
    """A neighbour table's gc_thresh1-3 (bpftune.neigh): one table per family for the whole
    host, set over netlink from the initial namespace. The value is the three thresholds."""

    kind: ClassVar[str] = "neigh_table"
    family: int

    def read(self, name: str, string: bool = False) -> Value:
        return neigh.table_state(self.family).thresholds

    def write(self, name: str, new: Value, old: Value) -> None:
        neigh.set_thresholds(self.family, new)

    def names(self, name: str) -> tuple[str, ...]:
        return neigh.sysctl_names(self.family)

    def spec(self) -> dict | None:
        return {"kind": self.kind, "family": self.family}

    def replicate(self, name: str, value: Value) -> list[str]:
        return SysctlGroup(self.names(name)).replicate(name, value)

    def commands(self, name: str, value: Value, old: Value) -> list[str]:
        """The netlink change bpftune makes (the table's own thresholds), as iproute2
        writes it."""
        table = neigh.TABLES[self.family]
        thresholds = " ".join(f"thresh{i} {v}" for i, v in enumerate(value, start=1))
        return [f"ip ntable change name {table} {thresholds}"]


SYSCTL = Sysctl()


def from_spec(spec: dict | None) -> Access:
    if spec is None:
        return SYSCTL
    if spec.get("kind") == SysctlGroup.kind:
        return SysctlGroup(tuple(spec["members"]))
    if spec.get("kind") == NeighTable.kind:
        return NeighTable(int(spec["family"]))
    raise ValueError(f"unknown tunable access {spec!r}")
