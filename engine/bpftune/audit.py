"""The audit trail: every change, rollback, revert, hand-over and recommendation, as one JSON
object a line in an append-only file (``/var/log/bpftune/audit.jsonl`` by default), and, where
journald runs, as a structured journal entry with the same fields.

The daemon only ever appends (``O_APPEND``, one ``write()`` per record, so a record reaches
the kernel at once) and never truncates or rewrites a record: when the file would grow past
``max_bytes`` it is renamed ``audit.jsonl.1`` (the older ones ``.2`` ... up to ``backups``,
the oldest dropped) and a new one is started. A file renamed or removed by someone else
(logrotate) is noticed at the next record and started anew. Writing must never stop tuning:
an error is logged once (and again once writing works, with the number of records lost).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

from bpftune import paths
from bpftune.log import DEBUG, INFO, NOTICE, WARNING, log

KINDS = ("change", "rollback", "revert", "hand_over", "hand_back", "recommendation", "verdict")
JOURNAL_SOCKET = "/run/systemd/journal/socket"
#: Journal priority per kind; the others are NOTICE, like the log lines they go with.
PRIORITIES = {"revert": WARNING, "recommendation": INFO, "verdict": INFO}
READ_BLOCK = 1 << 16


def _plain(value: Any) -> Any:
    """A tunable's value as the ledger stores it: a list of numbers, or a string."""
    return list(value) if isinstance(value, tuple) else value


def value_text(value: Any) -> str:
    """A value as the log lines and ``sysctl`` show it (``4096 131072 6291456``)."""
    if value is None:
        return "-"
    if isinstance(value, list | tuple):
        return " ".join(str(v) for v in value)
    return str(value)


def _iso(epoch: float) -> str:
    """ISO 8601 in UTC, e.g. ``2026-12-03T06:04:12.345678Z`` (with time, not datetime,
    which the daemon does not otherwise import)."""
    seconds = int(epoch)
    micros = round((epoch - seconds) * 1_000_000)
    if micros == 1_000_000:
        seconds, micros = seconds + 1, 0
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(seconds))}.{micros:06d}Z"


def _field(name: str) -> str:
    """A journal field name: upper-case letters, digits and underscores."""
    return "BPFTUNE_" + re.sub(r"[^A-Z0-9_]", "_", name.upper())


def summary(record: dict) -> str:
    """One line for a record: the journal's MESSAGE."""
    line = (f"{record['kind']} by '{record['tuner']}': '{record.get('tunable') or '-'}' in "
            f"netns {record.get('netns') or record.get('cookie')}")
    if record.get("old") is not None or record.get("new") is not None:
        line += f" ({value_text(record.get('old'))}) -> ({value_text(record.get('new'))})"
    if record.get("verdict"):
        line += f" [{record['verdict']}]"
    if record.get("reason"):
        line += f": {record['reason']}"
    return line


def _journal_sender():
    """``systemd.journal.send`` where journald runs and python3-systemd is installed."""
    if not os.path.exists(JOURNAL_SOCKET):
        log.debug(f"audit trail: journald is not running (no {JOURNAL_SOCKET}); file only")
        return None
    try:
        from systemd import journal
    except ImportError:
        log.debug("audit trail: python3-systemd is not installed; file only")
        return None
    return journal.send


class AuditTrail:
    def __init__(self, path: str = paths.AUDIT_FILE, max_bytes: int = 8 << 20,
                 backups: int = 4) -> None:
        if max_bytes <= 0 or backups < 1:  # no backup: a rotation would drop every record
            raise ValueError("audit trail: max_bytes and backups must be positive")
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._newline_first = False  # the file ends in a torn line: start on a new one
        self._lost = 0  # records not written since the last error was logged
        self._journal_lost = 0
        self._journal = _journal_sender()
        # libsystemd keeps the socket it makes for its first message for good, and a socket
        # keeps its network namespace alive: make it now, in the namespace we start in, not
        # at a first record written while the engine is inside a namespace it tunes.
        self._journal_send(MESSAGE=f"bpftune audit trail: {path}", PRIORITY=str(DEBUG),
                           BPFTUNE_AUDIT_FILE=path)

    def files(self) -> list[str]:
        """The trail's files, newest first."""
        return [self.path, *(f"{self.path}.{i}" for i in range(1, self.backups + 1))]

    # Writing.
    def record(self, kind: str, *, tuner: str, tunable: str | None = None,
               cookie: int = 0, netns: str | None = None, old=None, new=None,
               scenario: str | None = None, reason: str | None = None,
               verdict: str | None = None, **extra) -> None:
        now = time.time()
        entry = {
            "time": _iso(now),
            "epoch": now,
            "kind": kind,
            "tuner": tuner,
            "tunable": tunable,
            "cookie": cookie,
            "netns": netns,
            "old": _plain(old),
            "new": _plain(new),
            "scenario": scenario,
            "reason": reason,
            "verdict": verdict,
            "pid": os.getpid(),
        }
        if clash := entry.keys() & extra.keys():
            raise TypeError(f"audit record: extra fields {sorted(clash)} clash with its own")
        entry |= {k: _plain(v) for k, v in extra.items()}
        line = json.dumps(entry, separators=(",", ":"), default=str) + "\n"
        with self._lock:
            self._write(line.encode())
        self._to_journal(entry)

    def _write(self, data: bytes) -> None:
        try:
            fd = self._open()
            size = os.fstat(fd).st_size
            if size and size + len(data) > self.max_bytes:
                self._rotate()
                fd = self._open()
            if self._newline_first:
                data = b"\n" + data
            written = os.write(fd, data)
            self._newline_first = written < len(data)
            if self._newline_first:
                raise OSError(f"short write ({written} of {len(data)} bytes)")
        except OSError as e:
            self._close()
            if self._lost == 0:
                log.err(f"cannot write audit trail '{self.path}': {e}; bpftune keeps "
                        f"tuning, without it")
            self._lost += 1
            return
        if self._lost:
            log.notice(f"audit trail '{self.path}' is written again; {self._lost} records "
                       f"were lost")
            self._lost = 0

    def _open(self) -> int:
        """The file's descriptor, opened anew if the file was renamed or removed."""
        if self._fd is not None:
            try:
                if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                    return self._fd
            except FileNotFoundError:
                pass
            self._close()
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, mode=0o755, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        size = os.fstat(fd).st_size  # (read-write: to see how the file ends)
        self._newline_first = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
        self._fd = fd
        return fd

    def _close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def _rotate(self) -> None:
        """audit.jsonl -> .1 -> .2 ... -> .backups (the oldest goes); no record is rewritten."""
        self._close()
        for older, newer in reversed(list(itertools.pairwise(self.files()))):
            with contextlib.suppress(FileNotFoundError):
                os.replace(older, newer)

    def close(self) -> None:
        with self._lock:
            self._close()

    # journald.
    def _to_journal(self, entry: dict) -> None:
        if self._journal is None:
            return
        fields = {_field(k): _journal_value(v) for k, v in entry.items() if v is not None}
        self._journal_send(MESSAGE=summary(entry),
                           PRIORITY=str(PRIORITIES.get(entry["kind"], NOTICE)), **fields)

    def _journal_send(self, **fields: str) -> None:
        if self._journal is None:
            return
        try:
            self._journal(SYSLOG_IDENTIFIER="bpftune", **fields)
        except (OSError, ValueError) as e:
            if self._journal_lost == 0:
                log.err(f"cannot send audit records to journald: {e}")
            self._journal_lost += 1
        else:
            self._journal_lost = 0

    # Reading.
    def history(self, n: int) -> list[dict]:
        """The last ``n`` records, oldest first, from the file and the rotated ones; torn
        or unreadable lines are skipped. Raises OSError if a file cannot be read."""
        found: list[dict] = []
        if n <= 0:
            return found
        with self._lock:  # no rotation half-way through
            for name in self.files():
                for line in _lines_backwards(name):
                    with contextlib.suppress(ValueError):
                        entry = json.loads(line)
                        if isinstance(entry, dict) and "kind" in entry:
                            found.append(entry)
                            if len(found) == n:
                                return found[::-1]
        return found[::-1]


def _journal_value(value: Any) -> str:
    return value_text(value) if isinstance(value, str | list) else json.dumps(value)


def _lines_backwards(path: str) -> Iterator[bytes]:
    """The lines of a file, last first, read in blocks from its end (a missing file has
    none)."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below, also when the caller stops early
    except FileNotFoundError:
        return
    with f:
        end = f.seek(0, os.SEEK_END)
        rest = b""
        while end > 0:
            start = max(0, end - READ_BLOCK)
            f.seek(start)
            block = f.read(end - start) + rest
            end = start
            lines = block.split(b"\n")
            rest = lines.pop(0)  # may continue in the block before
            yield from (line for line in reversed(lines) if line.strip())
        if rest.strip():
            yield rest
