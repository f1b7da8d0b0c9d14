"""Kernel counters from /proc/net (read in whatever netns the calling thread is in), and
the global ones (softnet_stat, CPU wait, neighbour caches) the tuners and the verifier of
changes (bpftune.verify) share."""

from __future__ import annotations

import contextlib
import functools
import re
import time
from collections.abc import Collection

SOFTNET_STAT = "/proc/net/softnet_stat"
SCHEDSTAT = "/proc/schedstat"
CPU_PRESSURE = "/proc/pressure/cpu"
# /proc/net follows the thread-group leader's namespace; this follows the calling thread's
# (the verifier reads namespaces it entered with setns).
THREAD_NET = "/proc/thread-self/net"


# Within one_reading() (the engine's tick), each global file below is read once: the tuners
# and the verifier of changes want the same counters at the same moment, and reading them
# twice was a fifth of an idle tick's cost.
_readings: dict | None = None


@contextlib.contextmanager
def one_reading():
    global _readings
    _readings = {}
    try:
        yield
    finally:
        _readings = None


def _read_once(read):
    @functools.wraps(read)
    def shared(*args):
        if _readings is None:
            return read(*args)
        key = (read, args)
        if key not in _readings:
            _readings[key] = read(*args)
        return _readings[key]
    return shared


NETSTAT_PREFIXES = frozenset({"TcpExt:", "IpExt:", "MPTcpExt:"})  # the rest are snmp's


def _pairs(path: str) -> dict[str, int]:
    """``Prefix: name name`` / ``Prefix: value value`` line pairs -> {"Prefix:name": value}."""
    counters: dict[str, int] = {}
    with open(path) as f:
        lines = f.read().splitlines()
    for header, values in zip(lines[::2], lines[1::2], strict=False):
        prefix, *names = header.split()
        for name, value in zip(names, values.split()[1:], strict=True):
            counters[f"{prefix}{name}"] = int(value)
    return counters


def counters() -> dict[str, int]:
    """TcpExt/IpExt (netstat) and Ip/Tcp/Udp (snmp) counters, e.g. ``TcpExt:SyncookiesRecv``."""
    return _pairs("/proc/net/netstat") | _pairs("/proc/net/snmp")


def snmp6_counters(path: str = f"{THREAD_NET}/snmp6") -> dict[str, int]:
    """IPv6 counters of the calling thread's namespace (``name value`` lines)."""
    counters = {}
    with open(path) as f:
        for line in f:
            name, value = line.split()
            counters[name] = int(value)
    return counters


def _text(path: str) -> str:
    with open(path, "rb", buffering=0) as f:
        return f.readall().decode()


@functools.cache
def _columns(header: str, wanted: frozenset[str]) -> tuple[tuple[int, str], ...]:
    """(column, key) of the ``wanted`` keys in a ``Prefix: name name`` header line (the
    headers are the same each read: split once)."""
    prefix, *names = header.split()
    return tuple((i, prefix + n) for i, n in enumerate(names, 1) if prefix + n in wanted)


def _wanted_pairs(path: str, wanted: frozenset[str]) -> dict[str, int]:
    lines = _text(path).splitlines()
    found: dict[str, int] = {}
    for header, values in zip(lines[::2], lines[1::2], strict=False):
        if columns := _columns(header, wanted):
            fields = values.split()
            found.update((key, int(fields[i])) for i, key in columns)
    return found


@functools.cache
def _plan(wanted: frozenset[str]) -> tuple[bool, bool, re.Pattern[str] | None]:
    """Whether netstat and snmp hold any of the keys, and a pattern for those of snmp6."""
    prefixes = {k[:k.index(":") + 1] for k in wanted if ":" in k}
    names6 = sorted(re.escape(k) for k in wanted if ":" not in k)
    pattern = re.compile(rf"^({'|'.join(names6)})\s+(\d+)$", re.M) if names6 else None
    return bool(prefixes & NETSTAT_PREFIXES), bool(prefixes - NETSTAT_PREFIXES), pattern


def thread_counters(keys: Collection[str]) -> dict[str, int]:
    """These netstat, snmp and (where IPv6 is) snmp6 counters of the calling thread's netns
    (``TcpExt:ListenDrops``, ``Tcp:OutSegs``, ``Udp6RcvbufErrors``). The verifier reads
    them in up to 33 namespaces each second: only the files and lines that hold them are
    parsed (all 400 counters took 0.5 ms a namespace; this, 0.2)."""
    wanted = frozenset(keys)
    netstat, snmp, snmp6 = _plan(wanted)
    found: dict[str, int] = {}
    if netstat:
        found |= _wanted_pairs(f"{THREAD_NET}/netstat", wanted)
    if snmp:
        found |= _wanted_pairs(f"{THREAD_NET}/snmp", wanted)
    if snmp6 is not None:
        with contextlib.suppress(OSError):  # no IPv6: no file
            found |= {name: int(value)
                      for name, value in snmp6.findall(_text(f"{THREAD_NET}/snmp6"))}
    return found


@_read_once
def softnet_columns() -> dict[int, tuple[int, int, int]]:
    """Per CPU: (packets processed, dropped for a full backlog, NAPI cycles that ended with
    work left), the first three hex columns; CPUs are numbered in the 13th column."""
    per_cpu = {}
    with open(SOFTNET_STAT) as f:
        for number, line in enumerate(f):
            fields = line.split()
            cpu = int(fields[12], 16) if len(fields) > 12 else number
            per_cpu[cpu] = (int(fields[0], 16), int(fields[1], 16), int(fields[2], 16))
    return per_cpu


def packets_received() -> int:
    """Packets the host received, in every namespace (softnet_stat's processed column)."""
    return sum(processed for processed, _, _ in softnet_columns().values())


def softnet_totals() -> dict[str, int]:
    columns = list(zip(*softnet_columns().values(), strict=True)) or [(), (), ()]
    return {f"softnet:{name}": sum(values)
            for name, values in zip(("processed", "dropped", "squeezed"), columns, strict=True)}


@_read_once
def schedstat_wait(path: str = SCHEDSTAT) -> tuple[int, int]:
    """(ns tasks waited for a CPU, ns they ran or waited), summed over CPUs: fields 7 and 8
    after ``cpuN``. Only kernels with CONFIG_SCHEDSTATS have the file."""
    run = wait = 0
    with open(path) as f:
        for line in f:
            fields = line.split()
            if fields[0].startswith("cpu") and len(fields) > 8:
                run, wait = run + int(fields[7]), wait + int(fields[8])
    return wait, run + wait


@_read_once
def psi_cpu_wait(path: str = CPU_PRESSURE) -> tuple[int, int]:
    """(us some task waited for a CPU, us elapsed): PSI, where schedstat is missing (as on
    kernels built without CONFIG_SCHEDSTATS)."""
    with open(path) as f:
        some = f.readline().split()
    total = int(next(w for w in some if w.startswith("total=")).split("=")[1])
    return total, time.monotonic_ns() // 1000


# Where CPU wait is read from, first choice first: a kernel without a file has none at all
# (not a moment's failure), so it is not tried again.
_cpu_wait_sources = [(SCHEDSTAT, schedstat_wait), (CPU_PRESSURE, psi_cpu_wait)]


def cpu_wait() -> tuple[int, int] | None:
    """(tasks' CPU wait, elapsed run + wait), cumulative, from schedstat or else PSI."""
    for source in list(_cpu_wait_sources):
        path, read = source
        try:
            return read(path)
        except FileNotFoundError:
            _cpu_wait_sources.remove(source)
        except (OSError, ValueError, StopIteration):
            continue
    return None


def cpu_wait_source() -> str:
    """The file cpu_wait reads, or "none"."""
    cpu_wait()  # drops the files this kernel lacks
    return _cpu_wait_sources[0][0] if _cpu_wait_sources else "none"


def cpu_wait_totals() -> dict[str, int]:
    found = cpu_wait()
    return {} if found is None else {"sched:wait": found[0], "sched:total": found[1]}


@_read_once
def neigh_cache_totals() -> dict[str, int]:
    """allocs and table_fulls of the ARP and NDISC caches (/proc/net/stat, hex, a row per
    CPU), summed: e.g. ``arp_cache:table_fulls``."""
    found: dict[str, int] = {}
    for cache in ("arp_cache", "ndisc_cache"):
        with contextlib.suppress(OSError), open(f"/proc/net/stat/{cache}") as f:
            header = f.readline().split()
            for line in f:
                for name, value in zip(header, line.split(), strict=False):
                    if name in ("allocs", "table_fulls"):
                        key = f"{cache}:{name}"
                        found[key] = found.get(key, 0) + int(value, 16)
    return found


def memory_pages(protocol: str) -> int:
    """Pages of memory ``protocol`` ("TCP", "UDP") uses now: the ``mem`` field of its line
    in sockstat (global, whatever the netns)."""
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith(f"{protocol}:"):
                words = line.split()
                return int(words[words.index("mem") + 1])
    return 0


def tcp_under_memory_pressure() -> bool:
    """Whether the kernel has TCP in memory-pressure mode (the ``press`` column of
    /proc/net/protocols): entered above tcp_mem's pressure value, left only once use is
    back below its min, so it does not clear because the limits were raised."""
    with open("/proc/net/protocols") as f:
        header = f.readline().split()
        for line in f:
            words = line.split()
            if words and words[0] == "TCP":
                return words[header.index("press")] == "yes"
    return False
