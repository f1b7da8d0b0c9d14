"""What the benchmarks read about processes in /proc: CPU time, memory, mappings, and a
watcher of the daemon's start and of its children."""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from pathlib import Path

from helpers import BPFTUNE

READY_LINE = "started; active tuners"
COMPILER_LIBRARIES = re.compile(r"libbcc|libLLVM|libclang")


def stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat from field 3 (state) on: the command name may hold spaces."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """CPU time of the process's threads, from schedstat (nanoseconds): /proc/PID/stat
    counts 10 ms ticks, as coarse as an idle daemon's whole minute. Threads that ended are
    not counted; the daemon's threads live as long as it does."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            total += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
    return total / 1e9


def status_kib(pid: int, field: str) -> int:
    m = re.search(rf"^{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(m.group(1))


class Watch(threading.Thread):
    """Watches the daemon from outside while it starts and runs: when its "started" line
    appears, and the peak RSS (VmHWM) of each of its descendants: the loader children that
    compile with BCC (issue 13's design), or whatever else it runs. Polls /proc: this
    kernel has no /proc/PID/task/TID/children. A child's VmHWM only grows, so the last poll
    before it exits holds its peak but for the last poll interval."""

    def __init__(self, log_path: Path) -> None:
        super().__init__(daemon=True)
        self.log_path = log_path
        self.done = threading.Event()
        self.pid: int | None = None
        self.ready: float | None = None  # seconds from the daemon's exec to "started"
        self.children: dict[int, tuple[str, str, int]] = {}  # pid: (cmdline, comm, VmHWM kB)

    def run(self) -> None:
        while not self.done.wait(0.1 if self.ready else 0.025):
            parents = self._parents()
            if self.pid is None:
                self.pid = self._find_daemon(parents)
            if self.pid is not None:
                self._check_ready()
                self._sample(parents)

    def stop(self) -> None:
        self.done.set()
        self.join()

    @staticmethod
    def _parents() -> dict[int, int]:
        parents = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError, IndexError):
                    parents[int(entry)] = int(stat_fields(int(entry))[1])
        return parents

    @staticmethod
    def _command(pid: int) -> str:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()

    def _find_daemon(self, parents: dict[int, int]) -> int | None:
        """The daemon is this process's child running bpftune (daemon() starts it)."""
        for pid, parent in parents.items():
            with contextlib.suppress(OSError):
                if parent == os.getpid() and BPFTUNE in self._command(pid):
                    return pid
        return None

    def _check_ready(self) -> None:
        """Its start time in /proc counts clock ticks since boot (CLOCK_BOOTTIME)."""
        with contextlib.suppress(OSError):
            if self.ready is None and READY_LINE in self.log_path.read_text():
                start = int(stat_fields(self.pid)[19]) / os.sysconf("SC_CLK_TCK")
                self.ready = time.clock_gettime(time.CLOCK_BOOTTIME) - start

    def _sample(self, parents: dict[int, int]) -> None:
        below, todo = set(), [self.pid]
        while todo:
            pid = todo.pop()
            kids = [p for p, parent in parents.items() if parent == pid]
            below.update(kids)
            todo += kids
        for pid in below:
            with contextlib.suppress(OSError, AttributeError):
                command, hwm = self._command(pid), status_kib(pid, "VmHWM")
                name = Path(f"/proc/{pid}/comm").read_text().strip()
                old_command, _, old = self.children.get(pid, (command, name, 0))
                # before exec a child shows the daemon's command and memory: start over
                self.children[pid] = (command, name, max(hwm, old) if old_command == command
                                      else hwm)

    def peaks(self, loader: bool) -> tuple[float | None, str]:
        """The highest VmHWM in MiB among loader children (or the others), and a summary."""
        chosen = [(hwm, name) for cmd, name, hwm in self.children.values()
                  if ("bpftune.loader" in cmd) == loader]
        if not chosen:
            return None, "none seen"
        names = ", ".join(sorted({name for _, name in chosen}))
        return max(chosen)[0] / 1024, f"{len(chosen)} processes: {names}"


def compiler_libraries(pid: int) -> list[str]:
    """The libbcc/LLVM/clang libraries mapped in a process."""
    return sorted({Path(line.split()[-1]).name for line in
                   Path(f"/proc/{pid}/maps").read_text().splitlines()
                   if COMPILER_LIBRARIES.search(line)})


def busy_cpu_seconds() -> float:
    """CPU time every CPU spent working (user, nice, system, irq, softirq; not idle, iowait
    or steal) since boot, from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")
