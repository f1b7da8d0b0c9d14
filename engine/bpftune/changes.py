"""The one path every tunable change takes, and the ledger of what bpftune changed.

``Changes.apply`` checks the tuner may act in that namespace, clamps growth to hard ceilings,
writes in the right netns, reads the value back, logs upstream's two lines, counts the
scenario per netns and records the original value, which is saved to a state file before the
write so that a crash or ``kill -9`` cannot lose it. Summary and rollback work from the ledger.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from bpftune import sysctl
from bpftune.log import log
from bpftune.netns import Namespaces, NetnsError
from bpftune.sysctl import SysctlError, Value, format_value

if TYPE_CHECKING:
    from bpftune.tuner import Tunable, Tuner

GLOBAL = 0  # cookie used for the global (initial) network namespace in the ledger


def due_to(why: str, tunable: Tunable) -> str:
    """Upstream's reason line, e.g. ``Due to ... change net.ipv4.tcp_rmem(min default max)
    from ({old}) -> ({new})``; the placeholders are filled in by ``Changes.apply``."""
    labels = f"({' '.join(tunable.positions)})" if tunable.values > 1 else ""
    return f"Due to {why} change {tunable.name}{labels} from ({{old}}) -> ({{new}})"


def limit_growth(old: tuple[int, ...], new: tuple[int, ...],
                 ceiling: tuple[int, ...]) -> tuple[int, ...]:
    """Cap every increase at its ceiling; never raise a value already above it, never block
    a decrease."""
    return tuple(min(n, max(c, o)) if n > o else n
                 for o, n, c in zip(old, new, ceiling, strict=True))


def ordered(values: tuple[int, ...]) -> bool:
    """Three-value tunables (min default max, min pressure max) must stay non-decreasing."""
    return all(a <= b for a, b in itertools.pairwise(values))


@dataclass
class Record:
    """A tunable in one namespace that bpftune changed."""

    tuner: str
    tunable: str
    cookie: int
    original: list[int] | str
    current: list[int] | str
    changes: int = 0
    last_change: float = 0.0

    @property
    def where(self) -> str:
        return "global ns" if self.cookie == GLOBAL else f"netns cookie {self.cookie}"


def _as_value(v: list[int] | str | Value) -> Value:
    return v if isinstance(v, str) else tuple(v)


def boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


class StateFile:
    """Changes and originals, rewritten atomically on every change."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, "state.json")
        os.makedirs(directory, mode=0o755, exist_ok=True)

    def load(self) -> dict | None:
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.err(f"ignoring unreadable state file '{self.path}': {e}")
            return None

    def save(self, records: list[Record]) -> None:
        state = {"pid": os.getpid(), "boot_id": boot_id(),
                 "records": [asdict(r) for r in records]}
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


class Changes:
    def __init__(self, namespaces: Namespaces, state: StateFile) -> None:
        self.namespaces = namespaces
        self.state = state
        self.records: dict[tuple[str, int], Record] = {}
        self.scenario_counts: Counter[tuple[str, str, int, int]] = Counter()
        self.manual: set[tuple[str, int]] = set()  # (tuner, cookie) handed to an administrator

    def ledger_cookie(self, tunable: Tunable, cookie: int) -> int:
        if not tunable.namespaced or self.namespaces.is_global(cookie):
            return GLOBAL
        return cookie

    def read(self, tunable: Tunable, cookie: int = GLOBAL) -> Value:
        with self.namespaces.entered(self.ledger_cookie(tunable, cookie)):
            return sysctl.read(tunable.name, string=tunable.string)

    def read_many(self, tunables: Iterable[Tunable], cookie: int) -> dict[str, Value]:
        """Values of several tunables in one namespace, switching into it once; unreadable
        tunables (or a namespace that is gone) are left out."""
        found: dict[str, Value] = {}
        with contextlib.suppress(OSError), self.namespaces.entered(cookie):
            for t in tunables:
                with contextlib.suppress(SysctlError):
                    found[t.name] = sysctl.read(t.name, string=t.string)
        return found

    def is_manual(self, tuner: Tuner, cookie: int) -> bool:
        return (tuner.name, GLOBAL if self.namespaces.is_global(cookie) else cookie) in self.manual

    def apply(self, tuner: Tuner, tunable: Tunable, scenario: int, cookie: int, new: Value,
              reason: str, *, expect: Value | None = None) -> bool:
        """Change ``tunable`` to ``new`` in the namespace ``cookie``; True if it changed.

        ``reason`` is the second log line with ``{old}`` and ``{new}`` placeholders.
        ``expect`` is the value the proposal was computed from: if the live value differs,
        the proposal is stale (another event already acted) and is dropped.
        """
        where = self.ledger_cookie(tunable, cookie)
        if self.is_manual(tuner, where):
            log.notice(f"Skipping update of '{tunable.name}' ; tuner '{tuner.name}' is "
                       f"disabled in netns (cookie {where})")
            return False
        try:
            with self.namespaces.entered(where):
                return self._apply_here(tuner, tunable, scenario, where, new, reason, expect)
        except NetnsError as e:
            log.debug(f"{tuner.name}: not changing '{tunable.name}': {e}")
            return False

    def _apply_here(self, tuner: Tuner, tunable: Tunable, scenario: int, where: int,
                    new: Value, reason: str, expect: Value | None) -> bool:
        try:
            old = sysctl.read(tunable.name, string=tunable.string)
        except SysctlError as e:
            log.debug(f"{tuner.name}: {e}")
            return False
        if expect is not None and old != expect:
            log.debug(f"{tuner.name}: stale proposal for '{tunable.name}' "
                      f"({format_value(expect)} is now {format_value(old)})")
            return False
        if not isinstance(new, str):
            new = limit_growth(old, new, tunable.limits())
            if len(new) == 3 and not ordered(new):
                log.debug(f"{tuner.name}: refusing out-of-order '{tunable.name}' {new}")
                return False
        if new == old:
            return False
        record = self._record(tuner, tunable, where, old)
        if record is None:
            return False
        try:
            sysctl.write(tunable.name, new)
            readback = sysctl.read(tunable.name, string=tunable.string)
        except SysctlError as e:
            log.err(f"{tuner.name}: {e}")
            return False
        if readback != new:
            # The kernel adjusted the value, or someone wrote it at the same moment: record
            # what is there (so rollback can tell) and write nothing more.
            log.err(f"{tuner.name}: wrote ({format_value(new)}) to '{tunable.name}' but read "
                    f"back ({format_value(readback)})")
            if readback == old:
                return False
            new = readback
        record.current = list(new) if not isinstance(new, str) else new
        record.changes += 1
        record.last_change = time.time()
        self.scenario_counts[(tuner.name, tunable.name, scenario, where)] += 1
        self._save()
        self._log_change(tuner, tunable, scenario, where)
        log.notice(reason.format(old=format_value(old), new=format_value(new)))
        return True

    def _save(self) -> bool:
        try:
            self.state.save(list(self.records.values()))
        except OSError as e:
            log.err(f"cannot save '{self.state.path}': {e}")
            return False
        return True

    def _record(self, tuner: Tuner, tunable: Tunable, where: int, old: Value) -> Record | None:
        """The ledger entry for this change; its original value is on disk before any write
        (None, and no change, when it cannot be saved)."""
        key = (tunable.name, where)
        if key not in self.records:
            value = old if isinstance(old, str) else list(old)
            self.records[key] = Record(tuner.name, tunable.name, where, value, value)
            if not self._save():
                del self.records[key]
                return None
        return self.records[key]

    def _log_change(self, tuner: Tuner, tunable: Tunable, scenario: int, where: int) -> None:
        s = tuner.scenarios[scenario]
        ns = "" if where == GLOBAL else "non-"
        log.notice(f"Scenario '{s.name}' occurred for tunable '{tunable.name}' in {ns}global "
                   f"ns. {s.description}")

    def count(self, tuner: Tuner, tunable: Tunable, scenario: int, cookie: int) -> None:
        """Count a scenario that was acted on without a sysctl write (e.g. netlink)."""
        self.scenario_counts[(tuner.name, tunable.name, scenario,
                              self.ledger_cookie(tunable, cookie))] += 1

    # Summary and rollback.
    def summary(self, tuner: Tuner) -> list[str]:
        lines = []
        for (tname, tunable, scenario, where), n in sorted(self.scenario_counts.items()):
            if tname != tuner.name:
                continue
            s = tuner.scenarios[scenario]
            ns = "" if where == GLOBAL else "non-"
            lines.append(f"# Summary: scenario '{s.name}' occurred {n} times for tunable "
                         f"'{tunable}' in {ns}global ns. {s.description}")
        for r in self.records.values():
            if r.tuner != tuner.name or r.original == r.current:
                continue
            suffix = "" if r.cookie == GLOBAL else f" in {r.where}"
            new = format_value(_as_value(r.current))
            lines += [
                f"# sysctl '{r.tunable}' changed from ({format_value(_as_value(r.original))}) "
                f"-> ({new}){suffix}",
                "# To replicate this change on another system, run the following as a "
                "privileged user in a terminal:",
                f'sysctl -w {r.tunable}="{new}"',
            ]
        return lines

    def rollback(self, tuner_name: str | None = None) -> None:
        """Restore the original value of everything ``tuner_name`` (or any tuner) changed,
        where the value is still what bpftune set (an administrator's change is left alone)."""
        for key, r in list(self.records.items()):
            if tuner_name is not None and r.tuner != tuner_name:
                continue
            if (r.tuner, r.cookie) in self.manual:
                log.notice(f"Not rolling back '{r.tunable}' in {r.where}: an administrator "
                           f"changed it")
                continue
            try:
                with self.namespaces.entered(r.cookie):
                    self._rollback_here(r)
            except NetnsError:  # NetnsError is an OSError: keep this clause first
                log.debug(f"not rolling back '{r.tunable}': {r.where} no longer exists")
            except OSError as e:
                log.err(f"cannot roll back '{r.tunable}' in {r.where}: {e}")
                continue
            del self.records[key]
        self._save()

    def _rollback_here(self, r: Record) -> None:
        string = isinstance(r.original, str)
        live = sysctl.read(r.tunable, string=string)
        original, current = _as_value(r.original), _as_value(r.current)
        if live == original:
            return
        if live != current:
            log.notice(f"Not rolling back '{r.tunable}' in {r.where}: it is now "
                       f"({format_value(live)}), not the ({format_value(current)}) bpftune set")
            return
        log.notice(f"Rolling back sysctl values for '{r.tunable}' from ({format_value(live)}) "
                   f"to original values ({format_value(original)})...")
        sysctl.write(r.tunable, original)
        if sysctl.read(r.tunable, string=string) != original:
            raise SysctlError(0, f"read back of '{r.tunable}' does not match")

    def adopt_leftovers(self) -> None:
        """Take over the changes a previous run recorded, so -R can roll them back."""
        state = self.state.load()
        if not state or not state.get("records"):
            return
        if state.get("boot_id") != boot_id():
            log.notice("ignoring changes recorded before the last reboot")
            self._save()
            return
        pid = state.get("pid")
        for raw in state["records"]:
            try:
                r = Record(**raw)
            except TypeError:
                log.err(f"ignoring unreadable change record in '{self.state.path}': {raw}")
                continue
            if r.original == r.current:
                continue
            log.notice(f"bpftune (pid {pid}) left sysctl '{r.tunable}' changed in {r.where} "
                       f"from ({format_value(_as_value(r.original))}) -> "
                       f"({format_value(_as_value(r.current))})")
            self.records[(r.tunable, r.cookie)] = r
        self._save()
