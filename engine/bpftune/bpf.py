"""BPF programs: compiled by a short-lived loader child, held and read by the daemon.

Every tuner's program is its own BCC module (so one broken tuner never takes the others
down). BCC maps LLVM for as long as a process lives, so the daemon never imports it: a loader
child (bpftune.loader) compiles and attaches, and hands over file descriptors; the daemon
works on them with libbpf (bpftune.libbpf). All modules write to the ring buffers the daemon
creates, which it polls.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import bpftune
from bpftune import libbpf
from bpftune.btf import Btf, Field, offset_defines
from bpftune.events import Event
from bpftune.hooks import SAMPLE_EVERY, SAMPLE_SLOTS
from bpftune.learning import LearningRate
from bpftune.libbpf import BpfError
from bpftune.log import log
from bpftune.mounts import mount, mounted_fstype, umount
from bpftune.netns import current_cookie
from bpftune.paths import RUN_DIR, data_dir

__all__ = ["BpfError", "Cgroup", "Module", "Programs", "bpf_dir", "ensure_tracefs"]

COMMON_FIELDS = {
    "OFF_SK_NET": Field("sock.__sk_common.skc_net", 8),
    "OFF_NET_COOKIE": Field("net.net_cookie", 8),
}
#: What proto_memory() in the shared header reads: tuners that compare a protocol's memory
#: with its limits (tcp_mem, udp_mem) add these to their fields.
PROTO_MEMORY_FIELDS = {
    "OFF_SK_PROT": Field("sock.__sk_common.skc_prot", 8),
    "OFF_PROTO_MEMORY_ALLOCATED": Field("proto.memory_allocated", 8),
    "OFF_PROTO_SYSCTL_MEM": Field("proto.sysctl_mem", 8),
}
SHARED_HEADER = "bpftune.bpf.h"
#: Cgroup program kinds a tuner can declare: (program type, attach type).
CGROUP_ATTACH = {"sysctl": (23, libbpf.BPF_CGROUP_SYSCTL),  # BPF_PROG_TYPE_CGROUP_SYSCTL
                 "sock_ops": (13, libbpf.BPF_CGROUP_SOCK_OPS)}  # BPF_PROG_TYPE_SOCK_OPS
#: Where the loader child pins the shared maps: a bpffs in its own mount namespace.
PIN_DIR = "/sys/fs/bpf"
LOADER_TIMEOUT_S = 120  # a compile takes well under a second; LLVM can hang
RING_PAGES = 64  # each ring buffer, as bpftune.bpf.h declares them
SCM_MAX_FD = 253  # the most fds one message carries


def bpf_dir() -> Path:
    """Where the BPF sources are: a checkout, an installed wheel, or the RPM's location."""
    try:
        return data_dir("bpf", SHARED_HEADER)
    except FileNotFoundError as e:
        raise BpfError(str(e)) from None


@dataclass
class Module:
    """A tuner's compiled BPF module, as the daemon holds it: maps by name (BCC's table
    idioms, through libbpf), program fds, and the fds that keep its hooks attached."""

    name: str
    functions: list[str]
    maps: dict[str, tuple[int, object, object]] = field(default_factory=dict)
    programs: dict[str, int] = field(default_factory=dict)
    attachments: list[int] = field(default_factory=list)
    _tables: dict[str, libbpf.Table] = field(default_factory=dict)

    def __getitem__(self, name: str | bytes) -> libbpf.Table:
        name = name.decode() if isinstance(name, bytes) else name
        if name not in self._tables:
            fd, key, leaf = self.maps[name]
            self._tables[name] = libbpf.Table(name, fd, key, leaf)
        return self._tables[name]

    def close(self) -> None:
        """Detach and unload: closing the last fds is what the kernel needs."""
        for fd in (*self.attachments, *self.programs.values(),
                   *(fd for fd, _, _ in self.maps.values())):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.attachments, self.programs, self.maps, self._tables = [], {}, {}, {}


@dataclass
class CompileRequest:
    """One module for a loader child: the source text (shared header pasted in) and flags."""

    name: str
    text: str
    cflags: list[str]
    cgroup: dict[str, int] = field(default_factory=dict)  # function -> program type
    attach: bool = True


@dataclass
class _Child:
    """A loader child at work: the module it was handed (None once told there is no more),
    and when, for its deadline."""

    proc: subprocess.Popen
    sock: socket.socket
    diagnostics: IO[bytes]
    compiling: CompileRequest | None = None
    since: float = 0.0


class Loader:
    """Runs loader children and turns their answers into Modules (or BpfErrors)."""

    def __init__(self, shared: dict[str, int]) -> None:
        self.shared = shared

    def load(self, requests: list[CompileRequest], children: int = 1
             ) -> dict[str, Module | BpfError]:
        """Compile every request in up to ``children`` processes side by side, each handed
        the next module when it answers one: compile times differ (0.3 to 0.8 s here), and
        batches fixed in advance left one child working 0.5 s after the other.
        A child that dies (LLVM aborts on some errors) or outlives LOADER_TIMEOUT_S on one
        module (LLVM can hang) costs that module only; a new child takes the rest."""
        queue = deque(requests)
        results: dict[str, Module | BpfError] = {}
        running = [self._spawn() for _ in range(min(children, len(requests)))]
        for child in running:
            self._hand_next(child, queue)
        while running:
            now = time.monotonic()
            for child in running:
                if now - child.since > LOADER_TIMEOUT_S:
                    child.proc.kill()  # our own child, by its PID; its socket ends
            wait = min(child.since for child in running) + LOADER_TIMEOUT_S - now
            ready, _, _ = select.select([c.sock for c in running], [], [], max(wait, 0.01))
            for child in [c for c in running if c.sock in ready]:
                message, fds, _, _ = socket.recv_fds(child.sock, 1 << 20, SCM_MAX_FD)
                if message:
                    answer = json.loads(message)
                    results[answer["name"]] = _module(answer, fds)
                    self._hand_next(child, queue)
                    continue
                running.remove(child)
                failed = self._ended(child, queue)
                results |= failed
                if queue:  # it died compiling one: the rest go on
                    running.append(replacement := self._spawn())
                    self._hand_next(replacement, queue)
        return results

    def _ended(self, child: _Child, queue: deque[CompileRequest]
               ) -> dict[str, BpfError]:
        """A child's socket closed: it exited. What failed with it: the module it was
        compiling, and all modules still queued if it failed on its own (bpftune.loader's
        main: any other child would too)."""
        child.sock.close()
        status = child.proc.wait()
        said = _log_diagnostics(child.diagnostics)
        if child.compiling is None:
            return {}
        if status > 0:
            failed = [child.compiling, *queue]
            queue.clear()
            return {r.name: BpfError(f"BPF loader failed: {said}") for r in failed}
        return {child.compiling.name:
                BpfError(f"BPF loader died compiling it ({_how_ended(status)})")}

    def _hand_next(self, child: _Child, queue: deque[CompileRequest]) -> None:
        """Write the next module to the child's stdin (one JSON line), or close it: the
        child exits when it reads the end."""
        child.compiling = queue.popleft() if queue else None
        child.since = time.monotonic()
        with contextlib.suppress(BrokenPipeError):  # it died: its socket tells
            if child.compiling is None:
                child.proc.stdin.close()
                return
            child.proc.stdin.write(json.dumps(vars(child.compiling)).encode() + b"\n")
            child.proc.stdin.flush()

    def _spawn(self) -> _Child:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # A file, not a pipe, which could fill while we wait; closed by _log_diagnostics.
        diagnostics = tempfile.TemporaryFile()  # noqa: SIM115
        request = {"sock": theirs.fileno(), "pin_dir": PIN_DIR, "shared": self.shared}
        engine_path = str(Path(bpftune.__file__).resolve().parent.parent)
        env = os.environ | {"PYTHONPATH": os.pathsep.join(
            p for p in (engine_path, os.environ.get("PYTHONPATH")) if p)}
        try:
            proc = subprocess.Popen([sys.executable, "-m", "bpftune.loader"],
                                    stdin=subprocess.PIPE, stdout=diagnostics,
                                    stderr=diagnostics, env=env,
                                    pass_fds=[theirs.fileno(), *self.shared.values()])
        except OSError as e:
            ours.close()
            diagnostics.close()
            raise BpfError(f"cannot start the BPF loader: {e}") from None
        finally:
            theirs.close()
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(json.dumps(request).encode() + b"\n")
            proc.stdin.flush()
        return _Child(proc, ours, diagnostics, since=time.monotonic())


def _module(answer: dict, fds: list[int]) -> Module | BpfError:
    if "error" in answer:
        return BpfError(answer["error"])
    return Module(answer["name"], answer["functions"],
                  maps={n: (fds[m["fd"]], m["key"], m["leaf"])
                        for n, m in answer.get("maps", {}).items()},
                  programs={n: fds[i] for n, i in answer.get("programs", {}).items()},
                  attachments=[fds[i] for i in answer.get("attachments", [])])


def _how_ended(status: int) -> str:
    return f"killed by signal {-status}" if status < 0 else f"exit status {status}"


def _log_diagnostics(diagnostics) -> str:
    """The compiler's warnings and errors: only when debugging (as BCC's on stderr were).
    Returns the last line."""
    with diagnostics:
        diagnostics.seek(0)
        lines = [line for line in diagnostics.read().decode(errors="replace").splitlines()
                 if line.strip()]
    for line in lines:
        log.debug(f"loader: {line}")
    return lines[-1] if lines else "no message"


class Programs:
    """The shared maps and ring buffers, and compilation of tuner programs (in children)."""

    def __init__(self, btf: Btf | None, learning_rate: LearningRate,
                 on_event: Callable[[Event], None]) -> None:
        self.btf = btf
        self.dir = bpf_dir()
        self.learning_rate = learning_rate
        self.on_event = on_event
        self.events_received = 0
        page = os.sysconf("SC_PAGE_SIZE")
        try:
            self.shared = {
                "bpftune_events": libbpf.map_create(libbpf.MAP_RINGBUF, "bpftune_events",
                                                    0, 0, RING_PAGES * page),
                "bpftune_admin_events": libbpf.map_create(libbpf.MAP_RINGBUF, "bpftune_admin",
                                                          0, 0, RING_PAGES * page),
                # struct rate_key (16 bytes) -> u64, as bpftune.bpf.h declares it
                "bpftune_last_event": libbpf.map_create(libbpf.MAP_LRU_HASH, "bpftune_last",
                                                        16, 8, 16384),
                "bpftune_dropped": libbpf.map_create(libbpf.MAP_PERCPU_ARRAY,
                                                     "bpftune_dropped", 4, 8, 2),
            }
            self.rings = libbpf.RingBuffers()
            for ring in ("bpftune_events", "bpftune_admin_events"):
                self.rings.add(self.shared[ring], self._on_ring_buffer)
        except BpfError as e:
            raise BpfError(f"cannot create the BPF ring buffer: {e}") from e
        self.dropped = libbpf.Table("bpftune_dropped", self.shared["bpftune_dropped"],
                                    "int", "unsigned long long")
        self.loader = Loader(self.shared)

    def _on_ring_buffer(self, data: int, size: int) -> None:
        event = Event.from_buffer_address(data, size)
        if event is None:
            log.err(f"unexpected size event {size}")
            return
        self.events_received += 1
        self.on_event(event)

    def _text(self, source: Path, text: str | None, checks: str = "") -> str:
        """The source with bpftune.bpf.h pasted in: BCC rewrites map method calls
        (``bpftune_events.ringbuf_output(...)``) only in the main file, not in headers."""
        if text is None:
            # Read by path only what ships with bpftune: a plugin's source comes as text
            # read through the plugin checks (plugins.read_bpf_source).
            if source.resolve().parent != self.dir.resolve():
                raise BpfError(f"refusing to read BPF source '{source}' outside {self.dir}")
            text = source.read_text()
        header = (self.dir / SHARED_HEADER).read_text()
        return text.replace(f'#include "{SHARED_HEADER}"', header) + checks

    def request(self, name: str, source: Path, tuner_id: int, fields: dict[str, Field], *,
                text: str | None = None, defines: list[str] | None = None,
                checks: str = "", cgroup: dict[str, str] | None = None,
                attach: bool = True) -> CompileRequest:
        """What a loader child needs to compile a tuner's BPF source; tracepoints and fentry
        attach there, cgroup programs (function -> kind) are loaded for the daemon to attach.
        Not ``attach``: compiled and checked, nothing kept.
        ``text`` is the source's content when the caller has read it (a plugin's, after the
        trust checks); otherwise ``source`` must be a file of bpf_dir(). ``defines`` are the
        tuner's ids and its plan's hooks (-D flags); ``checks`` is C appended to the source
        (static assertions of the tuner's event payload layout)."""
        cflags = [
            f"-DTUNER_ID={tuner_id}",
            f"-DLEARNING_SHIFT={self.learning_rate.shift}",
            f"-DBPFTUNE_PID={os.getpid()}",
            f"-DGLOBAL_NETNS_COOKIE={current_cookie()}ULL",
            f"-DSAMPLE_EVERY={SAMPLE_EVERY}",
            f"-DSAMPLE_SLOTS={SAMPLE_SLOTS}",
            f'-DPIN_DIR="{PIN_DIR}"',
            *self._offset_defines(COMMON_FIELDS | fields),
            *(defines or []),
        ]
        return CompileRequest(name, self._text(source, text, checks), cflags,
                              {f: CGROUP_ATTACH[kind][0] for f, kind in (cgroup or {}).items()},
                              attach)

    def load(self, requests: list[CompileRequest]) -> dict[str, Module | BpfError]:
        """Compile and load in loader children, one per CPU (up to 3) side by side: BCC's
        compile of each module (0.3 s) is most of the time to start. Each child peaks
        near 130 MiB while it compiles; the daemon itself never does."""
        children = max(1, min(3, len(os.sched_getaffinity(0))))
        # The longest sources first (tcp_conn's compile is the longest, 0.75 s): one
        # started last would keep a child working alone at the end.
        longest_first = sorted(requests, key=lambda r: len(r.text), reverse=True)
        return self.loader.load(longest_first, children)

    def compile(self, source: Path, tuner_id: int, fields: dict[str, Field],
                **options) -> Module:
        """One module, loaded (or a BpfError)."""
        request = self.request(source.stem, source, tuner_id, fields, **options)
        result = self.loader.load([request])[request.name]
        if isinstance(result, BpfError):
            raise BpfError(f"cannot load BPF program {source.name}: {result}")
        return result

    def _offset_defines(self, fields: dict[str, Field]) -> list[str]:
        # Freed after start-up; a strategy switch reads it again (milliseconds) for the
        # time of its compile.
        return offset_defines(self.btf or Btf.load(), fields)

    @property
    def events_dropped(self) -> int:
        """Events lost because a ring buffer was full (tuning and administrators' events)."""
        return sum(sum(self.dropped[i]) for i in range(2))

    def loading_done(self) -> None:
        """The BTF (6 MiB) is needed again only for a strategy switch."""
        self.btf = None

    def poll(self, timeout_ms: int) -> None:
        self.rings.poll(timeout_ms)  # -EINTR when a signal arrives: the loop checks

    def drain(self) -> None:
        """Handle every event already in the ring buffers, now."""
        self.rings.consume()

    def close(self) -> None:
        self.rings.close()
        for fd in self.shared.values():
            os.close(fd)
        self.shared = {}


def ensure_tracefs(path: str = "/sys/kernel/tracing") -> None:
    """Tracepoints need tracefs; a fresh machine may not have it mounted."""
    if not os.path.isdir(os.path.join(path, "events")):
        mount("none", path, "tracefs")


class Cgroup:
    """A cgroup2 mount whose root covers every process; cgroup programs attach here."""

    def __init__(self, path: str) -> None:
        self.path = os.path.realpath(path)
        os.makedirs(self.path, exist_ok=True)
        # Unmount at exit what we mounted, and also a mount a killed bpftune left in its
        # run directory.
        self.owned = self.path.startswith(RUN_DIR + "/")
        if mounted_fstype(self.path) != "cgroup2":
            mount("none", self.path, "cgroup2")
            self.owned = True
        self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def detach_stale(self, names: list[str]) -> None:
        """Detach programs a bpftune before links left attached after a kill -9 (links
        go with the daemon's fds; the attachments of older versions stay)."""
        for kind in {CGROUP_ATTACH[k][1] for k in CGROUP_ATTACH}:
            try:
                for detached in libbpf.detach_stale(self.fd, kind, set(names)):
                    log.debug(f"detached old BPF program {detached}")
            except BpfError as e:
                log.debug(f"cannot look for old BPF programs: {e}")

    def attach(self, module: Module, function: str, kind: str) -> None:
        """A bpf_link: detached when its fd closes, so also when the daemon is killed.
        Deliberately not upstream's BPF_F_ALLOW_MULTI attachment, which a kill -9 leaves
        running with nobody reading its events (reference 1.9)."""
        link = libbpf.cgroup_link(module.programs[function], self.fd, CGROUP_ATTACH[kind][1])
        module.attachments.append(link)

    def close(self) -> None:
        os.close(self.fd)
        if self.owned:
            with contextlib.suppress(OSError):
                umount(self.path)
            with contextlib.suppress(OSError):
                os.rmdir(self.path)
