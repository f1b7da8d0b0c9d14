"""The one path every tunable change takes, and the ledger of what bpftune changed.

``Changes.apply`` checks the tuner may act in that namespace, clamps growth to hard ceilings,
announces the value it is about to write in the ledger's journal (on disk before the write),
writes in the right netns, reads the value back, records it, logs upstream's two lines and
counts the scenario per netns. A crash at any point leaves a journal from which the next
start tells bpftune's values from an administrator's. Summary and rollback work from the
ledger.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import time
from collections import Counter, UserDict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, TypeVar

from bpftune.access import from_spec
from bpftune.advice import Advice, Recommendation
from bpftune.log import log
from bpftune.netns import Namespaces, NetnsError
from bpftune.sysctl import SysctlError, Value, format_value
from bpftune.verify import Windows

if TYPE_CHECKING:
    from bpftune.audit import AuditTrail
    from bpftune.tuner import Tunable, Tuner
    from bpftune.verify import Verifier

GLOBAL = 0  # cookie used for the global (initial) network namespace in the ledger


def due_to(why: str, tunable: Tunable) -> str:
    """Upstream's reason line, e.g. ``Due to ... change net.ipv4.tcp_rmem(min default max)
    from ({old}) -> ({new})``; the placeholders are filled in by ``Changes.apply``."""
    labels = f"({' '.join(tunable.positions)})" if tunable.values > 1 else ""
    return f"Due to {why} change {tunable.name}{labels} from ({{old}}) -> ({{new}})"


def within_ceiling(new: tuple[int, ...], ceiling: tuple[int, ...]) -> tuple[int, ...]:
    """Every value bpftune writes is at most its ceiling, including one it found above it
    and did not mean to move: a tcp_mem max of 2e9 pages stays no more than the proposal
    to grow it does. (Before issue 10 such a value was kept; upstream pulls the tcp_mem
    max down to its RAM-based limit too.)"""
    return tuple(min(n, c) for n, c in zip(new, ceiling, strict=True))


def ordered(values: tuple[int, ...]) -> bool:
    """Three-value tunables (min default max, min pressure max) must stay non-decreasing."""
    return all(a <= b for a, b in itertools.pairwise(values))


@dataclass
class Record:
    """A tunable in one namespace that bpftune changed.

    ``intended`` is the value bpftune is about to write: it is on disk before the write, so
    that after a crash at any point the next start can tell bpftune's value from an
    administrator's (see ``Changes.adopt_leftovers``)."""

    tuner: str
    tunable: str
    cookie: int
    original: list[int] | str
    current: list[int] | str
    changes: int = 0
    last_change: float = 0.0
    intended: list[int] | str | None = None
    #: How the tunable is read and written (bpftune.access spec); None for a sysctl.
    access: dict | None = None

    @property
    def key(self) -> tuple[str, int]:
        return (self.tunable, self.cookie)

    @property
    def where(self) -> str:
        return "global ns" if self.cookie == GLOBAL else f"netns cookie {self.cookie}"


def _as_value(v: list[int] | str | Value) -> Value:
    return v if isinstance(v, str) else tuple(v)


def _as_record_value(v: Value) -> list[int] | str:
    return v if isinstance(v, str) else list(v)


def boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def crash_point(name: str) -> None:
    """Fault injection for tests: ``BPFTUNE_TEST_CRASH_AT=<point>[:<n>]`` kills the daemon
    (SIGKILL, like ``kill -9``) the n-th time the change path reaches ``point``."""
    wanted = os.environ.get("BPFTUNE_TEST_CRASH_AT")
    if not wanted:
        return
    point, _, nth = wanted.partition(":")
    if point != name:
        return
    _crash_counts[name] += 1
    if _crash_counts[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


_crash_counts: Counter[str] = Counter()


@dataclass
class Hold:
    """A tunable reverted after a verdict: no change of it in that namespace until
    ``until`` (time.monotonic()); ``reverts`` counts its reverts, each doubling the hold."""

    tuner: str
    until: float
    reverts: int


@dataclass(frozen=True)
class Leftover:
    """A change an earlier run left, as this run adopted it."""

    pid: int | None
    value: Value  # what that run had set


@dataclass
class Leftovers:
    """What a state file says an earlier run left: its pid, its records, and (a daemon in
    advice mode) its mode and recommendations."""

    pid: int | None
    boot_id: str | None
    records: list[Record]
    mode: str = "tune"
    advice: list[dict] = field(default_factory=list)


class StateFile:
    """The ledger on disk: a journal of JSON lines, each appended and fsynced before the
    sysctl write it announces. Line 1 names the daemon (pid, boot id, and "mode": "advise"
    for a daemon in advice mode); every later line is a record as it now is, a record
    forgotten, or a recommendation (advice mode: never a change, never rolled back).
    Replaying it gives the ledger; a torn last line (a crash while appending) is ignored.
    The journal is rewritten with only the live records at start and whenever it grows
    past ``COMPACT_LINES`` plus twice their number, so its size follows the ledger, not the
    history."""

    COMPACT_LINES = 256

    def __init__(self, directory: str, mode: str = "tune") -> None:
        self.mode = mode
        self.path = os.path.join(directory, "state.jsonl")
        self.legacy_path = os.path.join(directory, "state.json")
        os.makedirs(directory, mode=0o755, exist_ok=True)
        self.lines = 0

    def load(self) -> Leftovers:
        try:
            with open(self.path) as f:
                text = f.read()
        except FileNotFoundError:
            return self._load_legacy()
        except OSError as e:
            log.err(f"ignoring unreadable state file '{self.path}': {e}")
            return Leftovers(None, None, [])
        header: dict = {}
        records: dict[tuple[str, int], Record] = {}
        advice: dict[str, dict] = {}
        for n, line in enumerate(text.splitlines()):
            try:
                entry = json.loads(line)
                if n == 0:
                    header = entry
                elif "forget" in entry:
                    records.pop(tuple(entry["forget"]), None)
                elif "advice" in entry:
                    advice[entry["advice"]["id"]] = entry["advice"]
                else:
                    r = Record(**entry["record"])
                    records[r.key] = r
            except (ValueError, TypeError, KeyError):
                log.err(f"ignoring unreadable line {n + 1} of '{self.path}'")
        return Leftovers(header.get("pid"), header.get("boot_id"), list(records.values()),
                         header.get("mode", "tune"), list(advice.values()))

    def _load_legacy(self) -> Leftovers:
        """The single JSON document versions before the journal wrote (``state.json``),
        so that an upgrade keeps the originals a crashed older daemon left."""
        try:
            with open(self.legacy_path) as f:
                state = json.load(f)
            records = [Record(**raw) for raw in state["records"]]
        except FileNotFoundError:
            return Leftovers(None, None, [])
        except (OSError, ValueError, TypeError, KeyError) as e:
            log.err(f"ignoring unreadable state file '{self.legacy_path}': {e}")
            return Leftovers(None, None, [])
        return Leftovers(state.get("pid"), state.get("boot_id"), records)

    def rewrite(self, records: Iterable[Record], advice: Iterable[dict] = ()) -> None:
        header = {"pid": os.getpid(), "boot_id": boot_id()}
        if self.mode != "tune":
            header["mode"] = self.mode
        lines = [json.dumps(header)]
        lines += [json.dumps({"record": asdict(r)}) for r in records]
        lines += [json.dumps({"advice": a}) for a in advice]
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            f.write("\n".join(lines) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self.lines = len(lines)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.legacy_path)  # its records are in the journal now

    def append(self, entry: dict, live: dict[tuple[str, int], Record],
               advice: list[dict] | None = None) -> None:
        """Add ``entry``; ``live`` is the whole ledger (and ``advice`` the recommendations)
        with the entry applied, which is what a compaction (or a journal not started yet)
        writes instead."""
        advice = advice or []
        if not self.lines or self.lines > self.COMPACT_LINES + 2 * (len(live) + len(advice)):
            self.rewrite(live.values(), advice)
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(entry) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            self.lines = 0  # a torn line may be left: the next entry rewrites the journal
            raise
        self.lines += 1


K = TypeVar("K", bound=tuple)
V = TypeVar("V")


class ByCookie(UserDict[K, V]):
    """A mapping whose keys hold a namespace cookie (at ``cookie_at``), with each cookie's
    keys at hand: forgetting a namespace costs what it had, not what every namespace has.
    (Each namespace is counted once as created: with 1000 of them, a walk of every key at
    each destruction was 40 % of what a namespace churned cost the daemon more than with
    none.) ``default`` makes it a counter (a missing key is 0)."""

    def __init__(self, cookie_at: int, default: V | None = None) -> None:
        self.cookie_at = cookie_at
        self.default = default
        self.keys_by_cookie: dict[int, set[K]] = {}
        super().__init__()

    def __missing__(self, key: K) -> V:
        if self.default is None:
            raise KeyError(key)
        return self.default

    def __setitem__(self, key: K, value: V) -> None:
        self.data[key] = value
        self.keys_by_cookie.setdefault(key[self.cookie_at], set()).add(key)

    def __delitem__(self, key: K) -> None:
        del self.data[key]
        keys = self.keys_by_cookie[key[self.cookie_at]]
        keys.discard(key)
        if not keys:
            del self.keys_by_cookie[key[self.cookie_at]]

    def keys_of(self, cookie: int) -> list[K]:
        return list(self.keys_by_cookie.get(cookie, ()))


class Changes:
    def __init__(self, namespaces: Namespaces, state: StateFile, *,
                 advise: bool = False) -> None:
        self.namespaces = namespaces
        self.state = state
        #: Advice mode: proposals become recommendations and nothing is written.
        self.advice: Advice | None = Advice() if advise else None
        #: (tunable, ledger cookie) -> the change in force.
        self.records: ByCookie[tuple[str, int], Record] = ByCookie(cookie_at=1)
        #: (tuner, tunable, scenario, ledger cookie) -> how many times.
        self.scenario_counts: ByCookie[tuple[str, str, int, int], int] = ByCookie(
            cookie_at=3, default=0)
        #: Scenario counts of namespaces that are gone, folded per (tuner, tunable, scenario).
        self.departed_counts: Counter[tuple[str, str, int]] = Counter()
        #: (tuner, cookie) handed to an administrator -> when (time.monotonic())
        self.manual: dict[tuple[str, int], float] = {}
        #: Ledger keys adopted from an earlier run, and what that run had set.
        self.leftovers: dict[tuple[str, int], Leftover] = {}
        #: Ledger keys this run changed, and their value before its first change.
        self.run_start: dict[tuple[str, int], Value] = {}
        #: Where changes, rollbacks and hand-overs are recorded (set by the engine).
        self.audit: AuditTrail | None = None
        #: Judges each change (bpftune.verify); None in advice mode and unit tests.
        self.verifier: Verifier | None = None
        #: Ledger keys reverted after a verdict, held (see Hold).
        self.held: dict[tuple[str, int], Hold] = {}

    def ledger_cookie(self, tunable: Tunable, cookie: int) -> int:
        if not tunable.namespaced or self.namespaces.is_global(cookie):
            return GLOBAL
        return cookie

    def read(self, tunable: Tunable, cookie: int = GLOBAL) -> Value:
        with self.namespaces.entered(self.ledger_cookie(tunable, cookie)):
            return tunable.access.read(tunable.name, tunable.string)

    def read_many(self, tunables: Iterable[Tunable], cookie: int) -> dict[str, Value]:
        """Values of several tunables in one namespace, switching into it once; unreadable
        tunables (or a namespace that is gone) are left out."""
        found: dict[str, Value] = {}
        with contextlib.suppress(OSError), self.namespaces.entered(cookie):
            for t in tunables:
                with contextlib.suppress(SysctlError):
                    found[t.name] = t.access.read(t.name, t.string)
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
        if (left := self.held_for((tunable.name, where))) > 0:
            log.debug(f"holding '{tunable.name}' in {self.namespaces.name(where)} for "
                      f"{left:.0f} s after a revert")
            return False
        try:
            with self.namespaces.entered(where):
                changed = self._apply_here(tuner, tunable, scenario, where, new, reason,
                                           expect)
        except NetnsError as e:
            log.debug(f"{tuner.name}: not changing '{tunable.name}': {e}")
            return False
        if changed is not None:
            if self.verifier is not None:
                self.verifier.changed(tuner, tunable, scenario, cookie, where, *changed)
            return True
        return False

    def held_for(self, key: tuple[str, int]) -> float:
        """Seconds the ledger key is still held after a revert (0: not held)."""
        hold = self.held.get(key)
        return max(hold.until - time.monotonic(), 0.0) if hold else 0.0

    def _apply_here(self, tuner: Tuner, tunable: Tunable, scenario: int, where: int,
                    new: Value, reason: str, expect: Value | None
                    ) -> tuple[Value, Value] | None:
        """The change in the namespace entered: (old, new as read back) if it changed."""
        try:
            old = tunable.access.read(tunable.name, tunable.string)
        except SysctlError as e:
            log.debug(f"{tuner.name}: {e}")
            return None
        if expect is not None and old != expect:
            log.debug(f"{tuner.name}: stale proposal for '{tunable.name}' "
                      f"({format_value(expect)} is now {format_value(old)})")
            return None
        if not isinstance(new, str):
            new = self._within_ceiling(tuner, tunable, old, new)
            if len(new) == 3 and not ordered(new):
                log.debug(f"{tuner.name}: refusing out-of-order '{tunable.name}' {new}")
                return None
        if new == old:
            return None
        if self.advice is not None:
            self.advise(tuner, tunable, scenario, where, old, new, reason)
            return None
        written = self._write_recorded(tuner, tunable, where, old, new)
        if written is None:
            return None
        readback = written
        self.scenario_counts[(tuner.name, tunable.name, scenario, where)] += 1
        self._log_change(tuner, tunable, scenario, where)
        why = reason.format(old=format_value(old), new=format_value(readback))
        log.notice(why)
        extra = {} if readback == new else {"requested": new}
        self._audit("change", tuner.name, tunable.name, where, old=old, new=readback,
                    scenario=tuner.scenarios[scenario].name, reason=why, **extra)
        return old, readback

    def _write_recorded(self, tuner: Tuner, tunable: Tunable, where: int, old: Value,
                        new: Value) -> Value | None:
        """Announce ``new`` in the journal, write it, read it back and journal the record
        (in the namespace entered): the value read back, if it changed."""
        record = self._announce(tuner, tunable, where, old, new)
        if record is None:
            return None
        crash_point("intent")
        try:
            tunable.access.write(tunable.name, new, old)
        except SysctlError as e:
            log.err(f"{tuner.name}: {e}")
            readback = old
        else:
            try:
                readback = tunable.access.read(tunable.name, tunable.string)
            except SysctlError as e:  # written or not: the announcement stays, see _announce
                log.err(f"{tuner.name}: {e}")
                return None
        crash_point("written")
        if readback != new:
            # The kernel adjusted the value, or someone wrote it at the same moment: record
            # what is there (so rollback can tell) and write nothing more.
            log.err(f"{tuner.name}: wrote ({format_value(new)}) to '{tunable.name}' but read "
                    f"back ({format_value(readback)})")
        changed = readback != old
        record.intended = None
        if changed:
            self.run_start.setdefault(record.key, old)
            record.current = _as_record_value(readback)
            record.changes += 1
            record.last_change = time.time()
        self._journal(record)
        crash_point("recorded")
        return readback if changed else None

    def revert(self, tuner: Tuner, tunable: Tunable, where: int, to: Value, expect: Value,
               evidence: str, scenario: str | None = None) -> bool:
        """Undo a change a verdict found harmful: write ``to`` back if the live value is
        still ``expect`` (what bpftune set), then hold the tunable there. False if it was
        not reverted (someone else changed it, or the write failed)."""
        try:
            with self.namespaces.entered(where):
                return self._revert_here(tuner, tunable, where, to, expect, evidence, scenario)
        except NetnsError as e:
            log.debug(f"{tuner.name}: not reverting '{tunable.name}': {e}")
            return False

    def _revert_here(self, tuner: Tuner, tunable: Tunable, where: int, to: Value,
                     expect: Value, evidence: str, scenario: str | None) -> bool:
        ns = self._where_text(where)
        try:
            live = tunable.access.read(tunable.name, tunable.string)
        except SysctlError as e:
            log.debug(f"{tuner.name}: {e}")
            return False
        if live != expect:
            log.notice(f"Not reverting '{tunable.name}' in {ns}: it is now "
                       f"({format_value(live)}), not the ({format_value(expect)}) bpftune set")
            return False
        readback = self._write_recorded(tuner, tunable, where, live, to)
        if readback is None:
            return False
        hold = self._hold(tuner.name, (tunable.name, where))
        line = (f"Reverting '{tunable.name}' in {ns} from ({format_value(live)}) to "
                f"({format_value(readback)}) ({tuner.name}): {evidence}; held for "
                f"{hold:.0f} s")
        log.notice(line)
        self._audit("revert", tuner.name, tunable.name, where, old=live, new=readback,
                    scenario=scenario, reason=line, verdict="reverted")
        return True

    def _hold(self, tuner_name: str, key: tuple[str, int]) -> float:
        """Hold ``key`` after a revert; returns for how long (doubled per revert)."""
        before = self.held.get(key)
        reverts = before.reverts + 1 if before else 1
        windows = self.verifier.windows if self.verifier else Windows()
        seconds = windows.hold_for(reverts)
        self.held[key] = Hold(tuner_name, time.monotonic() + seconds, reverts)
        return seconds

    def _where_text(self, cookie: int) -> str:
        if cookie == GLOBAL:
            return "global ns"
        return f"netns '{self.namespaces.name(cookie)}'"

    @staticmethod
    def _within_ceiling(tuner: Tuner, tunable: Tunable, old: Value, new: Value) -> Value:
        ceiling = tunable.limits()
        capped = within_ceiling(new, ceiling)
        if any(c < min(o, n) for o, n, c in zip(old, new, capped, strict=True)):
            log.notice(f"{tuner.name}: '{tunable.name}' ({format_value(old)}) is above its "
                       f"ceiling ({format_value(ceiling)}): writing at most the ceiling")
        return capped

    def _advice_entries(self) -> list[dict]:
        return [] if self.advice is None else [r.as_dict() for r in self.advice.ordered()]

    def _journal(self, record: Record) -> bool:
        try:
            self.state.append({"record": asdict(record)}, self.records, self._advice_entries())
        except OSError as e:
            log.err(f"cannot save '{self.state.path}': {e}")
            return False
        return True

    def _announce(self, tuner: Tuner, tunable: Tunable, where: int, old: Value,
                  new: Value) -> Record | None:
        """The ledger entry for this change, with the value about to be written on disk
        before the write (None, and no change, when it cannot be saved)."""
        record = self.records.get((tunable.name, where))
        if record is None:
            value = _as_record_value(old)
            record = Record(tuner.name, tunable.name, where, value, value,
                            access=tunable.access.spec())
        elif record.intended is not None and _as_value(record.intended) == old:
            record.current = record.intended  # an earlier write landed; its read-back failed
        elif _as_value(record.current) != old:
            # An administrator wrote this tunable while the tuner stayed active (its write
            # was not seen, or it happened before start-up): what is live now is the value
            # to restore, not the one bpftune once found.
            log.notice(f"sysctl '{tunable.name}' in {record.where} was changed from "
                       f"({format_value(_as_value(record.current))}) to ({format_value(old)}) "
                       f"by someone else; that is now its original value")
            record = replace(record, original=_as_record_value(old),
                             current=_as_record_value(old))
        record.intended = _as_record_value(new)
        before = self.records.get(record.key)
        self.records[record.key] = record
        if not self._journal(record):
            if before is None:
                del self.records[record.key]
            else:
                before.intended = None
                self.records[record.key] = before
            return None
        return record

    # Advice mode.
    def advise(self, tuner: Tuner, tunable: Tunable, scenario: int, cookie: int, current: Value,
               proposed: Value, reason: str, commands: list[str] | None = None,
               subject: str = "") -> Recommendation | None:
        """Record what a change would be (advice mode); ``commands`` apply it, by default
        the tunable's own (``Access.commands``) in that namespace; ``subject`` is what a
        per-socket tunable is advised for. A new recommendation is logged as a change is;
        one that only repeats is not, and counts no scenario."""
        if self.advice is None:
            return None
        where = self.ledger_cookie(tunable, cookie)
        if commands is None:
            commands = self.commands(tunable, where, proposed, current)
        rec, new, changed = self.advice.propose(
            tuner=tuner.name, tunable=tunable.name, netns=self.namespaces.name(where),
            cookie=where, scenario=tuner.scenarios[scenario].name,
            reason=reason.format(old=format_value(current), new=format_value(proposed)),
            current=current, proposed=proposed, commands=commands, subject=subject)
        if changed:
            self.scenario_counts[(tuner.name, tunable.name, scenario, where)] += 1
            with contextlib.suppress(OSError):
                self.state.append({"advice": rec.as_dict()}, self.records,
                                  self._advice_entries())
            self._audit("recommendation", tuner.name, tunable.name, where, old=current,
                        new=proposed, scenario=rec.scenario, reason=rec.reason,
                        advice_id=rec.id, commands=commands,
                        **({"subject": subject} if subject else {}))
        if new:
            self._log_change(tuner, tunable, scenario, where)
            log.notice(f"advice {rec.id}: {rec.reason}; to apply: {' ; '.join(commands)}")
        return rec

    def commands(self, tunable: Tunable, cookie: int, value: Value, old: Value) -> list[str]:
        """Shell commands that change ``old`` to ``value`` in the namespace ``cookie``."""
        return self.in_netns(cookie, tunable.access.commands(tunable.name, value, old))

    def in_netns(self, cookie: int, commands: list[str]) -> list[str]:
        """``commands`` as run from the global namespace in the namespace ``cookie``."""
        if self.namespaces.is_global(cookie):
            return commands
        return [f"{self.namespaces.command_prefix(cookie)} {c}" for c in commands]

    def _log_change(self, tuner: Tuner, tunable: Tunable, scenario: int, where: int) -> None:
        s = tuner.scenarios[scenario]
        ns = "" if where == GLOBAL else "non-"
        log.notice(f"Scenario '{s.name}' occurred for tunable '{tunable.name}' in {ns}global "
                   f"ns. {s.description}")

    def count(self, tuner: Tuner, tunable: Tunable, scenario: int, cookie: int,
              times: int = 1) -> None:
        """Count a scenario that was acted on without a change of the tunable."""
        if times > 0:
            where = self.ledger_cookie(tunable, cookie)
            self.scenario_counts[(tuner.name, tunable.name, scenario, where)] += times

    def report(self, tuner: Tuner, tunable: Tunable, scenario: int, cookie: int,
               reason: str) -> None:
        """Log a scenario as a change is logged (upstream's ``tunable_update``)."""
        self._log_change(tuner, tunable, scenario, self.ledger_cookie(tunable, cookie))
        log.notice(reason)

    def forget_netns(self, cookie: int) -> None:
        """A namespace is gone: drop its records and its administrator hand-overs; its
        scenario counts live on, folded, in ``departed_counts``."""
        if self.advice is not None:
            self.advice.forget_netns(cookie)
        for key in self.records.keys_of(cookie):
            self._forget(key)
        for key in self.scenario_counts.keys_of(cookie):
            self.departed_counts[key[:3]] += self.scenario_counts.pop(key)
        self.manual = {m: t for m, t in self.manual.items() if m[1] != cookie}
        self.held = {k: h for k, h in self.held.items() if k[1] != cookie}

    def _forget(self, key: tuple[str, int]) -> None:
        """Drop a record, in the journal too (so that the next start agrees)."""
        del self.records[key]
        self.leftovers.pop(key, None)
        self.run_start.pop(key, None)
        try:
            self.state.append({"forget": list(key)}, self.records, self._advice_entries())
        except OSError as e:
            log.err(f"cannot save '{self.state.path}': {e}")

    def hand_over(self, tuner_name: str, cookie: int, tunable: str | None = None,
                  new: Value | None = None, reason: str | None = None) -> None:
        """An administrator wrote one of the tuner's tunables (``tunable``, now ``new``, if
        the caller knows) in that namespace."""
        if (tuner_name, cookie) in self.manual:
            return
        self.manual[(tuner_name, cookie)] = time.monotonic()
        if self.verifier is not None:
            self.verifier.cancel(tuner_name, cookie, "handed over to the administrator")
        ours = self.records.get((tunable, cookie)) if tunable else None
        self._audit("hand_over", tuner_name, tunable, cookie,
                    old=ours.current if ours else None, new=new, reason=reason)

    def audit_hand_back(self, tuner_name: str, cookie: int, uid: int, reason: str) -> None:
        self._audit("hand_back", tuner_name, None, cookie, reason=reason, uid=uid)

    def _audit(self, kind: str, tuner: str, tunable: str | None, cookie: int,
               **fields) -> None:
        """Add a record to the audit trail (if there is one: unit tests may have none)."""
        if self.audit is not None:
            self.audit.record(kind, tuner=tuner, tunable=tunable, cookie=cookie,
                              netns=self.namespaces.name(cookie), **fields)

    def hand_back(self, tuner_name: str, cookie: int) -> None:
        """The administrator gives the tuner back in that namespace (GLOBAL: everywhere it
        was handed over as a whole). The values there now are its new baseline: its records
        there are dropped, so that its next change records the live value as the original,
        and -R never restores what was there before the administrator took over."""
        self.manual.pop((tuner_name, cookie), None)
        # Its holds there go too: the administrator's values are the new baseline.
        self.held = {k: h for k, h in self.held.items()
                     if not (h.tuner == tuner_name and k[1] == cookie)}
        for key in [k for k, r in self.records.items()
                    if r.tuner == tuner_name and k[1] == cookie]:
            self._forget(key)

    def forget_unknown_hand_overs(self, scanned_at: float) -> None:
        """Hand-overs in namespaces a full scan (at ``scanned_at``) made after them did not
        find: nothing can be tuned there, and keeping them would let a user who makes
        namespaces as fast as possible grow the table without end."""
        self.manual = {m: t for m, t in self.manual.items()
                       if m[1] == GLOBAL or self.namespaces.tracked(m[1]) or t >= scanned_at}

    # Summary and rollback.
    def summary(self, tuner: Tuner) -> list[str]:
        counts: Counter[tuple[str, int, bool]] = Counter()
        for (tname, tunable, scenario, where), n in self.scenario_counts.items():
            if tname == tuner.name:
                counts[(tunable, scenario, where == GLOBAL)] += n
        for (tname, tunable, scenario), n in self.departed_counts.items():
            if tname == tuner.name:
                counts[(tunable, scenario, False)] += n
        lines = []
        for (tunable, scenario, is_global), n in sorted(counts.items()):
            s = tuner.scenarios[scenario]
            ns = "" if is_global else "non-"
            lines.append(f"# Summary: scenario '{s.name}' occurred {n} times for tunable "
                         f"'{tunable}' in {ns}global ns. {s.description}")
        for r in self.records.values():
            if r.tuner == tuner.name and self.namespaces.tracked(r.cookie):
                lines += self._record_summary(r)
        return lines

    def _record_summary(self, r: Record) -> list[str]:
        """This run's change of a tunable (upstream's lines), and apart from it what an
        earlier run left changed (upstream, with no ledger across runs, reports neither)."""
        current = _as_value(r.current)
        suffix = "" if r.cookie == GLOBAL else f" in {r.where}"
        lines = []
        left = self.leftovers.get(r.key)
        if left is not None:
            lines.append(f"# sysctl '{r.tunable}' was left changed by an earlier run (pid "
                         f"{left.pid}) from ({format_value(_as_value(r.original))}) -> "
                         f"({format_value(left.value)}){suffix}")
        start = self.run_start.get(r.key)
        if start is not None and start != current:
            lines.append(f"# sysctl '{r.tunable}' changed from ({format_value(start)}) -> "
                         f"({format_value(current)}){suffix}")
        if lines and current != _as_value(r.original):
            lines += ["# To replicate this change on another system, run the following as "
                      "a privileged user in a terminal:",
                      *from_spec(r.access).replicate(r.tunable, current)]
        return lines

    def rollback(self, tuner_name: str | None = None) -> None:
        """Restore the original value of everything ``tuner_name`` (or any tuner) changed,
        wherever the value is still what bpftune set, whatever the tuner's state: an
        administrator's write to one tunable leaves bpftune's other changes to be undone."""
        for key, r in list(self.records.items()):
            if tuner_name is not None and r.tuner != tuner_name:
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
            self.leftovers.pop(key, None)
            self.run_start.pop(key, None)
        self._rewrite()

    def _rewrite(self) -> None:
        try:
            self.state.rewrite(self.records.values(), self._advice_entries())
        except OSError as e:
            log.err(f"cannot save '{self.state.path}': {e}")

    def _rollback_here(self, r: Record) -> None:
        string = isinstance(r.original, str)
        access = from_spec(r.access)
        live = access.read(r.tunable, string)
        original, current = _as_value(r.original), _as_value(r.current)
        if r.intended is not None and live == _as_value(r.intended):
            current = live  # written, though its read-back failed
        if live == original:
            return
        if live != current:
            log.notice(f"Not rolling back '{r.tunable}' in {r.where}: it is now "
                       f"({format_value(live)}), not the ({format_value(current)}) bpftune set")
            return
        log.notice(f"Rolling back sysctl values for '{r.tunable}' from ({format_value(live)}) "
                   f"to original values ({format_value(original)})...")
        access.write(r.tunable, original, live)
        if access.read(r.tunable, string) != original:
            raise SysctlError(0, f"read back of '{r.tunable}' does not match")
        self._audit("rollback", r.tuner, r.tunable, r.cookie, old=live, new=original,
                    reason="restoring the value bpftune found")

    def adopt_leftovers(self) -> None:
        """Take over the changes an earlier run recorded (after a crash, or a clean exit
        without -R), so -R can roll them back, but only those whose live value is still
        what bpftune set: anything else was changed by an administrator since."""
        left = self.state.load()
        if self.advice is not None and left.mode == "advise" and left.boot_id == boot_id():
            self.advice = Advice(left.advice)  # logged already: not logged again
        if left.records and left.boot_id != boot_id():
            log.notice("ignoring changes recorded before the last reboot")
        elif left.records:
            for r in left.records:
                if self._adoptable(r, left.pid):
                    self.records[r.key] = r
                    self.leftovers[r.key] = Leftover(left.pid, _as_value(r.current))
        self._rewrite()

    def _adoptable(self, r: Record, pid: int | None) -> bool:
        try:
            with self.namespaces.entered(r.cookie):
                live = from_spec(r.access).read(r.tunable, isinstance(r.original, str))
        except OSError as e:  # a namespace that is gone, or a sysctl that is
            log.debug(f"forgetting what bpftune (pid {pid}) changed in {r.where}: {e}")
            return False
        if r.intended is not None and live == _as_value(r.intended):
            # It crashed between writing and recording the write.
            r.current, r.changes = r.intended, r.changes + 1
        r.intended = None
        original, current = _as_value(r.original), _as_value(r.current)
        if live == original:
            return False
        if live != current:
            log.notice(f"sysctl '{r.tunable}' in {r.where} is ({format_value(live)}), not the "
                       f"({format_value(current)}) bpftune (pid {pid}) set: an administrator "
                       f"changed it since, so its original ({format_value(original)}) is "
                       f"forgotten")
            return False
        log.notice(f"bpftune (pid {pid}) left sysctl '{r.tunable}' changed in {r.where} "
                   f"from ({format_value(original)}) -> ({format_value(current)})")
        return True
