"""Kernel counters from /proc/net (read in whatever netns the calling thread is in)."""

from __future__ import annotations


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
