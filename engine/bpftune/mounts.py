"""The file systems bpftune mounts (Python's os has no mount(2)): tracefs and cgroup2 in the
daemon, a private bpffs and /proc/kallsyms in each loader child's own mount namespace.

Its own module, with only the C library: the loader child imports it without bpftune.bpf,
which would load libbpf beside BCC's own copy."""

from __future__ import annotations

import ctypes as ct
import os

CLONE_NEWNS = 0x00020000
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000

_libc = ct.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ct.get_errno()
        raise OSError(err, f"cannot {what}: {os.strerror(err)}")


def mount(source: str, target: str, fstype: str | None, flags: int = 0,
          options: str | None = None) -> None:
    _check(_libc.mount(source.encode(), target.encode(), fstype and fstype.encode(), flags,
                       options and options.encode()),
           f"mount {fstype or source} at {target}")


def umount(target: str) -> None:
    _check(_libc.umount2(target.encode(), 0), f"unmount {target}")


def unshare_mounts() -> None:
    """This process's own mount namespace, whose mounts nobody else sees (nor their
    undoing: none propagates back)."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare the mount namespace")
    mount("none", "/", None, MS_REC | MS_PRIVATE)


def mounted_fstype(path: str) -> str | None:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == path:
                return fields[fields.index("-") + 1]
    return None
