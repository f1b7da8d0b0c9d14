"""Log sinks compatible with upstream bpftune: syslog (ident bpftune, LOG_DAEMON) or stderr.

Upstream prefixes every stderr line with ``bpftune: `` and filters by syslog level; so do we.
"""

from __future__ import annotations

import os
import stat
import sys
import syslog
import threading
import time
from typing import TextIO

EMERG, ALERT, CRIT, ERR, WARNING, NOTICE, INFO, DEBUG = range(8)
SYSLOG_SOCKET = "/dev/log"
LIMIT_LINES, LIMIT_WINDOW = 10, 60.0


def _syslog_socket_exists(path: str = SYSLOG_SOCKET) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


class Log:
    """One process-wide logger; thread-safe so the query server can log too."""

    def __init__(self) -> None:
        self.level = NOTICE
        self.use_syslog = False
        self.stream: TextIO = sys.stderr
        self._lock = threading.Lock()
        self._limits: dict[str, tuple[float, int, int]] = {}  # key -> start, logged, skipped

    @property
    def debugging(self) -> bool:
        return self.level >= DEBUG

    def configure(self, *, to_stderr: bool, debug: bool, stream: TextIO | None = None) -> None:
        self.level = DEBUG if debug else NOTICE
        if stream is not None:
            self.stream = stream
        self.use_syslog = False
        if to_stderr:
            return
        if not _syslog_socket_exists():
            self.notice(f"no syslog socket at {SYSLOG_SOCKET}; logging to stderr")
            return
        syslog.openlog("bpftune", syslog.LOG_PID | syslog.LOG_NDELAY, syslog.LOG_DAEMON)
        syslog.setlogmask(syslog.LOG_UPTO(self.level))
        self.use_syslog = True

    def log(self, level: int, message: str) -> None:
        if level > self.level:
            return
        if self.use_syslog:
            syslog.syslog(level, message)
            return
        with self._lock:
            self.stream.write(f"bpftune: {message}\n")
            self.stream.flush()

    def limited(self, key: str, message: str, level: int = NOTICE) -> None:
        """Log at most LIMIT_LINES lines per ``key`` a minute: what anyone can cause as fast
        as they like (writes in namespaces of their own) must not flood the log. The first
        line after a quiet spell says how many were left out."""
        now = time.monotonic()
        with self._lock:
            start, logged, skipped = self._limits.get(key, (now, 0, 0))
            if now - start >= LIMIT_WINDOW:
                start, logged = now, 0
            if logged >= LIMIT_LINES:
                self._limits[key] = (start, logged, skipped + 1)
                return
            self._limits[key] = (start, logged + 1, 0)
        if skipped:
            message += f" ({skipped} similar messages suppressed)"
        self.log(level, message)

    def err(self, message: str) -> None:
        self.log(ERR, message)

    def warning(self, message: str) -> None:
        self.log(WARNING, message)

    def notice(self, message: str) -> None:
        self.log(NOTICE, message)

    def info(self, message: str) -> None:
        self.log(INFO, message)

    def debug(self, message: str) -> None:
        self.log(DEBUG, message)


log = Log()
