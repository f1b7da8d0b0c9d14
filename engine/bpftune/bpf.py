"""Loading BPF programs with BCC: the shared ring buffer, per-tuner objects, cgroup attach.

Every tuner's program is its own BCC module (compiled once at start, so one broken tuner
never takes the others down); all of them write to the one ring buffer created by the core
module, which the engine polls.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import gc
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

from bpftune.btf import Btf, Field, offset_defines
from bpftune.events import Event
from bpftune.hooks import SAMPLE_EVERY, SAMPLE_SLOTS
from bpftune.learning import LearningRate
from bpftune.log import log
from bpftune.netns import current_cookie
from bpftune.paths import RUN_DIR, data_dir

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
BPF_F_ALLOW_MULTI = 2
BPF_PROG_TYPE_CGROUP_SYSCTL = 23  # BCC 0.26 has no name for it
BPF_CGROUP_SYSCTL = 18  # enum bpf_attach_type
#: Cgroup program kinds a tuner can declare: (program type, attach type).
CGROUP_ATTACH = {"sysctl": (BPF_PROG_TYPE_CGROUP_SYSCTL, BPF_CGROUP_SYSCTL),
                 "sock_ops": (13, 3)}  # BPF_PROG_TYPE_SOCK_OPS, BPF_CGROUP_SOCK_OPS
BPF_PROG_NAME_LEN = 15  # the kernel keeps 15 characters of a program's name


class BpfError(Exception):
    pass


def bpf_dir() -> Path:
    """Where the BPF sources are: a checkout, an installed wheel, or the RPM's location."""
    try:
        return data_dir("bpf", SHARED_HEADER)
    except FileNotFoundError as e:
        raise BpfError(str(e)) from None


@contextlib.contextmanager
def compiler_output_to_log() -> Iterator[None]:
    """BCC prints compiler diagnostics on fd 2: show them only when debugging."""
    if log.level >= 7:
        yield
        return
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def bcc_module():
    try:
        import bcc
    except ImportError as e:
        raise BpfError("BCC is not installed (python3-bpfcc / python3-bcc)") from e
    return bcc


def _compiled_only():
    """BCC's BPF, but compiling only: BPF() loads and attaches tracepoints and kfuncs."""
    class CompiledOnly(bcc_module().BPF):
        def _trace_autoload(self) -> None:
            pass

    return CompiledOnly


class Programs:
    """The core BPF module (ring buffer, rate-limit map) and compilation of tuner programs."""

    def __init__(self, btf: Btf, learning_rate: LearningRate,
                 on_event: Callable[[Event], None]) -> None:
        self.btf: Btf | None = btf
        self.dir = bpf_dir()
        self.learning_rate = learning_rate
        self.on_event = on_event
        self.events_received = 0
        # Offset flags of each set of fields compiled for: a tuner compiled at start-up can
        # be compiled again once the BTF is freed (a strategy switch).
        self._offsets: dict[frozenset[tuple[str, Field]], list[str]] = {}
        bcc = bcc_module()
        with compiler_output_to_log():
            try:
                self.core = bcc.BPF(text=b'#define BPFTUNE_CORE\n#include "bpftune.bpf.h"\n',
                                    cflags=[f"-I{self.dir}"])
            except Exception as e:
                raise BpfError(f"cannot create the BPF ring buffer: {e}") from e
        # Keep a reference: BCC holds only a C pointer to the callback.
        self._callback = self._on_ring_buffer
        for ring in (b"bpftune_events", b"bpftune_admin_events"):
            self.core[ring].open_ring_buffer(self._callback)

    def _on_ring_buffer(self, _ctx, data, size) -> int:
        event = Event.from_buffer_address(data, size)
        if event is None:
            log.err(f"unexpected size event {size}")
            return 0
        self.events_received += 1
        self.on_event(event)
        return 0

    def _text(self, source: Path, text: str | None, checks: str = "") -> bytes:
        """The source with bpftune.bpf.h pasted in: BCC rewrites map method calls
        (``bpftune_events.ringbuf_output(...)``) only in the main file, not in headers."""
        if text is None:
            # Read by path only what ships with bpftune: a plugin's source comes as text
            # read through the plugin checks (plugins.read_bpf_source).
            if source.resolve().parent != self.dir.resolve():
                raise BpfError(f"refusing to read BPF source '{source}' outside {self.dir}")
            text = source.read_text()
        header = (self.dir / SHARED_HEADER).read_text()
        return (text.replace(f'#include "{SHARED_HEADER}"', header) + checks).encode()

    def compile(self, source: Path, tuner_id: int, fields: dict[str, Field], *,
                text: str | None = None, defines: list[str] | None = None,
                checks: str = "", attach: bool = True):
        """Compile a tuner's BPF source; tracepoints and fentry attach automatically, unless
        not ``attach`` (then nothing is loaded into the kernel but its maps).
        ``text`` is the source's content when the caller has read it (a plugin's, after the
        trust checks); otherwise ``source`` must be a file of bpf_dir(). ``defines`` are the
        tuner's ids and its plan's hooks (-D flags); ``checks`` is C appended to the source
        (static assertions of the tuner's event payload layout)."""
        cflags = [
            f"-I{self.dir}",
            f"-DTUNER_ID={tuner_id}",
            f"-DLEARNING_SHIFT={self.learning_rate.shift}",
            f"-DBPFTUNE_PID={os.getpid()}",
            f"-DGLOBAL_NETNS_COOKIE={current_cookie()}ULL",
            f"-DSAMPLE_EVERY={SAMPLE_EVERY}",
            f"-DSAMPLE_SLOTS={SAMPLE_SLOTS}",
            *self._offset_defines(COMMON_FIELDS | fields),
            *(defines or []),
        ]
        with compiler_output_to_log():
            try:
                bpf_class = bcc_module().BPF if attach else _compiled_only()
                return bpf_class(text=self._text(source, text, checks), cflags=cflags)
            except BpfError:
                raise
            except Exception as e:
                raise BpfError(f"cannot load BPF program {source.name}: {e}") from e

    def _offset_defines(self, fields: dict[str, Field]) -> list[str]:
        key = frozenset(fields.items())
        if key not in self._offsets:
            if self.btf is None:
                raise BpfError("BPF programs can only be loaded at start-up")
            self._offsets[key] = offset_defines(self.btf, fields)
        return self._offsets[key]

    @property
    def events_dropped(self) -> int:
        """Events lost because a ring buffer was full (tuning and administrators' events)."""
        table = self.core[b"bpftune_dropped"]
        return sum(sum(table[i]) for i in range(2))

    def loading_done(self) -> None:
        """Once every program is compiled, give back what the parsed BTF (over 100 MB of
        Python objects) and LLVM hold; a later compile (a strategy switch) can only reuse the
        field offsets of an earlier one."""
        self.btf = None
        gc.collect()
        self.release_memory()

    def release_memory(self) -> None:
        """Give back what compiling took (LLVM's code pages, freed heap)."""
        self.core.free_bcc_memory()
        ct.CDLL(None).malloc_trim(0)  # hand freed heap pages back to the kernel

    def poll(self, timeout_ms: int) -> None:
        self.core.ring_buffer_poll(timeout_ms)

    def drain(self) -> None:
        """Handle every event already in the ring buffers, now."""
        self.core.ring_buffer_consume()

    def close(self) -> None:
        self.core.cleanup()


def _libc_mount(source: str, target: str, fstype: str) -> None:
    libc = ct.CDLL(None, use_errno=True)
    if libc.mount(source.encode(), target.encode(), fstype.encode(), 0, None) != 0:
        err = ct.get_errno()
        raise OSError(err, f"cannot mount {fstype} at {target}: {os.strerror(err)}")


def _libc_umount(target: str) -> None:
    libc = ct.CDLL(None, use_errno=True)
    libc.umount(target.encode())


def mounted_fstype(path: str) -> str | None:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == path:
                return fields[fields.index("-") + 1]
    return None


def ensure_tracefs(path: str = "/sys/kernel/tracing") -> None:
    """Tracepoints need tracefs; a fresh machine may not have it mounted."""
    if not os.path.isdir(os.path.join(path, "events")):
        _libc_mount("none", path, "tracefs")


class Cgroup:
    """A cgroup2 mount whose root covers every process; cgroup programs attach here."""

    def __init__(self, path: str) -> None:
        self.path = os.path.realpath(path)
        os.makedirs(self.path, exist_ok=True)
        # Unmount at exit what we mounted, and also a mount a killed bpftune left in its
        # run directory.
        self.owned = self.path.startswith(RUN_DIR + "/")
        if mounted_fstype(self.path) != "cgroup2":
            _libc_mount("none", self.path, "cgroup2")
            self.owned = True
        self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def detach_stale(self, names: list[str]) -> None:
        """Detach programs left attached by a bpftune that was killed (kill -9)."""
        try:
            out = subprocess.run(["bpftool", "-j", "cgroup", "show", self.path],
                                 capture_output=True, check=True, text=True).stdout
            attached = json.loads(out or "[]")
        except (OSError, subprocess.CalledProcessError, ValueError):
            return
        prefixes = {n[:BPF_PROG_NAME_LEN] for n in names}
        for prog in attached:
            if prog.get("name", "")[:BPF_PROG_NAME_LEN] not in prefixes:
                continue
            log.debug(f"detaching old BPF program '{prog['name']}'")
            # bpftool names the attach type "cgroup_sysctl"; older ones only accept "sysctl".
            for attach_type in (prog["attach_type"], prog["attach_type"].removeprefix("cgroup_")):
                done = subprocess.run(["bpftool", "cgroup", "detach", self.path, attach_type,
                                       "id", str(prog["id"])], capture_output=True, check=False)
                if done.returncode == 0:
                    break

    def attach(self, bpf, fn_name: str, kind: str) -> None:
        prog_type, attach_type = CGROUP_ATTACH[kind]
        fn = bpf.load_func(fn_name.encode(), prog_type)
        bpf.attach_func(fn, self.fd, attach_type, BPF_F_ALLOW_MULTI)

    def detach(self, bpf, fn_name: str, kind: str) -> None:
        with contextlib.suppress(Exception):
            bpf.detach_func(bpf.funcs[fn_name.encode()], self.fd, CGROUP_ATTACH[kind][1])

    def close(self) -> None:
        os.close(self.fd)
        if self.owned:
            _libc_umount(self.path)
            with contextlib.suppress(OSError):
                os.rmdir(self.path)
