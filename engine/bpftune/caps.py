"""Capabilities: once its programs are loaded, the daemon keeps only what running needs.

Loading needs much more (CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN to load and attach programs,
CAP_SYS_ADMIN to mount cgroup2 and tracefs, CAP_SYS_RESOURCE for RLIMIT_MEMLOCK). Afterwards
:func:`drop` keeps :data:`KEPT` in the permitted and effective sets and, when it may
(CAP_SETPCAP), in the bounding set, so that no program bpftune runs gets the others back.
Inheritable and ambient sets end up empty.

Dropped because running does not need them (each checked on a 6.x kernel by dropping to a
candidate set and trying the operation): programs loaded after start (see cap_syslog below)
need no more than the kept set, and the ring buffer is polled and maps are read through
descriptors already open; sysctl writes need no
capability for uid 0, in any namespace (the kernel checks euid 0, not the file's owner, so
writes into a namespace owned by another user namespace work too), except the one below;
detaching the cgroup programs at exit needs none; files under /run/bpftune and the state
directory are root's own.

Upstream (reference 1.12) keeps a set permitted-only and raises it around each privileged
call. Here the kept set stays effective: namespace switches happen throughout the engine
(tuning, queries, rollback) and in the query threads, and raising around each would put
capability calls in all of them, for a set this small.

Capabilities belong to threads, and a thread starts with its creator's: the drop must come
before any other thread is started, which :func:`drop` checks.
"""

from __future__ import annotations

import os

from bpftune.log import log

#: Capabilities kept after the drop, and why.
KEPT = (
    # Giving the query socket to group pcp (chown; root is not a member of pcp, EPERM
    # without it). The socket is made after the drop, because the query server's threads
    # start with it and must inherit the reduced set.
    "cap_chown",
    # RTM_NEWNSID: netns.assign_nsid gives each namespace found an nsid in ours, so that its
    # destruction is reported (RTM_DELNSID). rtnetlink checks CAP_NET_ADMIN for every
    # NEW/DEL/SET message; without it no nsid is assigned and no destruction is seen.
    "cap_net_admin",
    # setns() into other network namespaces: tuning there, the state/status queries, the
    # rollback at exit. Writing net.core.high_order_alloc_disable (a static key: the kernel
    # checks CAP_SYS_ADMIN; EPERM without it even for uid 0). umount() of bpftune's cgroup2
    # mount at exit.
    "cap_sys_admin",
    # Opening /proc/PID/ns/net (and stat() on it) of a process owned by another user, or of a
    # root process whose capabilities are not a subset of ours (any other root process once
    # we dropped ours; container processes): how namespaces that are not bind-mounted are
    # found. EACCES without it, even with CAP_DAC_OVERRIDE or CAP_DAC_READ_SEARCH.
    "cap_sys_ptrace",
    # Loading a tuner's programs again after start (``bpftune -E`` after a global hand-over,
    # a strategy switch): the loader child, which gets only this set, and ip_frag's compile
    # defines read kernel addresses in /proc/kallsyms, all 0 without it (unless
    # kernel.perf_event_paranoid <= 1). BCC then takes the kernel for one without
    # bpf_probe_read_kernel and compiles bpf_probe_read, which sock_ops programs may not
    # call (tcp_buffer's would not load), and ip_frag loses its drop-site ranges.
    "cap_syslog",
)


class CapsError(Exception):
    pass


def _capng():
    try:
        import capng
    except ImportError:
        raise CapsError("cannot drop capabilities: the libcap-ng Python binding is not "
                        "installed (python3-cap-ng or python3-libcap-ng)") from None
    return capng


def number(name: str) -> int:
    """``cap_sys_admin`` -> 21."""
    cap = _capng().capng_name_to_capability(name.removeprefix("cap_"))
    if cap < 0:
        raise CapsError(f"unknown capability {name}")
    return cap


def kept_mask() -> int:
    return sum(1 << number(name) for name in KEPT)


def _other_threads() -> list[str]:
    return [tid for tid in os.listdir("/proc/self/task") if int(tid) != os.getpid()]


def _apply() -> tuple[list[int], bool]:
    """Keep :data:`KEPT` in this thread; returns the capabilities kept and whether the
    bounding set was reduced too."""
    capng = _capng()
    if capng.capng_get_caps_process() != 0:
        raise CapsError("cannot drop capabilities: cannot read this process's")
    bounding = capng.capng_have_capability(capng.CAPNG_EFFECTIVE, capng.CAP_SETPCAP) == 1
    keep = []
    for name in KEPT:
        cap = number(name)
        if capng.capng_have_capability(capng.CAPNG_PERMITTED, cap) == 1:
            keep.append(cap)
        else:  # not given to us (e.g. by a service manager's bounding set): cannot keep it
            log.debug(f"capability {name} was not permitted at start")
    capng.capng_clear(capng.CAPNG_SELECT_BOTH)
    sets = capng.CAPNG_EFFECTIVE | capng.CAPNG_PERMITTED
    if bounding:
        sets |= capng.CAPNG_BOUNDING_SET
    for cap in keep:  # not capng_updatev: its binding pads the varargs with 0 (CAP_CHOWN)
        capng.capng_update(capng.CAPNG_ADD, sets, cap)
    # Bounding set first (needs CAP_SETPCAP, which the capset that follows drops).
    rc = capng.capng_apply(capng.CAPNG_SELECT_BOTH if bounding else capng.CAPNG_SELECT_CAPS)
    if rc != 0:
        raise CapsError(f"cannot drop capabilities: libcap-ng error {rc}")
    return keep, bounding


def drop() -> None:
    """Keep only :data:`KEPT`. Raises StartError (one line) if that cannot be done: missing
    libcap-ng binding, or threads already started that would keep everything."""
    from bpftune.engine import StartError  # the engine imports this module

    try:
        if others := _other_threads():
            raise CapsError(f"cannot drop capabilities: threads {', '.join(others)} already "
                            f"run and would keep them all")
        kept, bounding = _apply()
        names = ", ".join("cap_" + _capng().capng_capability_to_name(c) for c in kept)
    except CapsError as e:
        raise StartError(str(e)) from None
    log.debug(f"dropped capabilities; kept {names or 'none'} "
              f"({'permitted, effective, bounding' if bounding else 'permitted, effective'})")
