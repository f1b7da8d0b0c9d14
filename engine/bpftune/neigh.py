"""Neighbour tables (ARP and NDISC) over rtnetlink (``bpftune.rtnl``): a table's thresholds, size
and counters; setting its thresholds; and the addresses of a device, which bound how many
neighbours it can reasonably have.

The kernel keeps one table per family for every network namespace, so its thresholds are
host-wide: they can be read from any namespace but only changed from the initial one
(``neightbl_set`` refuses NDTA_THRESH* elsewhere), and ``net.ipv4.neigh.default.gc_thresh*``
exists only there.
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass

from bpftune import rtnl
from bpftune.rtnl import NetlinkError, ndtmsg, nla
from bpftune.sysctl import INT_MAX, PROC_SYS, SysctlError

TABLES = {socket.AF_INET: "arp_cache", socket.AF_INET6: "ndisc_cache"}
IP_VERSION = {socket.AF_INET: 4, socket.AF_INET6: 6}
ADDRESS_BITS = {socket.AF_INET: 32, socket.AF_INET6: 128}
#: Upstream's smallest share of a device's prefix, and its headroom (reference 5.3).
MIN_PREFIX_NEIGHBOURS, HEADROOM = 256, 4


class _ndtmsg(ndtmsg):
    """pyroute2's table message, with the kernel's last statistic (``ndts_table_fulls``:
    entries refused because the table was full), which pyroute2 0.7 leaves out."""

    __slots__ = ()

    class stats(nla):
        __slots__ = ()
        fields = (*ndtmsg.stats.fields, ("table_fulls", "Q"))


@dataclass(frozen=True)
class TableState:
    name: str
    thresholds: tuple[int, int, int]  # gc_thresh1, gc_thresh2, gc_thresh3
    entries: int  # every entry, including the permanent ones the thresholds exempt
    table_fulls: int  # entries refused since boot because the table was full
    forced_gc_runs: int


def sysctl_names(family: int) -> tuple[str, str, str]:
    """The sysctls an administrator writes to set the thresholds of the family's table."""
    v = IP_VERSION[family]
    return tuple(f"net.ipv{v}.neigh.default.gc_thresh{i}" for i in (1, 2, 3))


def settable_here() -> bool:
    """Whether this process can change the thresholds: only from the initial namespace,
    the only one with ``neigh/default`` sysctls."""
    return os.path.exists(PROC_SYS + "net/ipv4/neigh/default/gc_thresh3")


def _error(action: str, family: int, e: Exception) -> SysctlError:
    code = e.code if isinstance(e, NetlinkError) else getattr(e, "errno", None) or errno.EIO
    return SysctlError(code, f"cannot {action} neighbour table {TABLES[family]}: "
                             f"{os.strerror(abs(code))}")


def table_state(family: int) -> TableState:
    """The family's table, as the kernel reports it (SysctlError if it cannot)."""
    msg = _ndtmsg()
    msg["family"] = family
    try:
        replies = rtnl.request(msg, rtnl.RTM_GETNEIGHTBL, rtnl.NLM_F_REQUEST | rtnl.NLM_F_DUMP,
                               policy={rtnl.RTM_NEWNEIGHTBL: _ndtmsg})
    except (NetlinkError, OSError) as e:
        raise _error("read", family, e) from None
    for m in replies:  # one reply for the table, then one per device's parameters
        if m.get_attr("NDTA_NAME") == TABLES[family] and m.get_attr("NDTA_THRESH3") is not None:
            stats = m.get_attr("NDTA_STATS") or {}
            return TableState(TABLES[family],
                              tuple(m.get_attr(f"NDTA_THRESH{i}") for i in (1, 2, 3)),
                              m.get_attr("NDTA_CONFIG")["entries"],
                              stats.get("table_fulls", 0), stats.get("forced_gc_runs", 0))
    raise SysctlError(errno.ENOENT, f"this kernel has no neighbour table {TABLES[family]}")


def set_thresholds(family: int, thresholds: tuple[int, ...]) -> None:
    """Set the table's gc_thresh1-3 (RTM_SETNEIGHTBL). Upstream also nests NDTA_PARMS with
    the device's ifindex, which the kernel looks up in the sender's namespace: for a device
    of another namespace that fails (ENOENT) or names another device, and thresholds are
    per table anyway. So no device goes in the message."""
    msg = ndtmsg()
    msg["family"] = family
    msg["attrs"] = [("NDTA_NAME", TABLES[family]),
                    *((f"NDTA_THRESH{i}", v) for i, v in enumerate(thresholds, 1))]
    try:
        rtnl.request(msg, rtnl.RTM_SETNEIGHTBL, rtnl.NLM_F_REQUEST | rtnl.NLM_F_ACK)
    except (NetlinkError, OSError) as e:
        raise _error("change", family, e) from None


def device_prefixes(ifindex: int, name: str, family: int) -> list[int] | None:
    """Prefix lengths of the family's addresses on device ``ifindex`` of the calling
    thread's namespace; None if the device is gone (or the index now names another)."""
    try:  # libc asks through a socket it opens now, so in the calling thread's namespace
        if socket.if_indextoname(ifindex) != name:
            return None
    except OSError as e:
        if e.errno in (errno.ENXIO, errno.ENODEV):
            return None
        raise
    msg = rtnl.ifaddrmsg()
    msg["family"] = family
    # The kernel dumps every device's addresses of the family; no filter without strict checks.
    dump = rtnl.request(msg, rtnl.RTM_GETADDR, rtnl.NLM_F_REQUEST | rtnl.NLM_F_DUMP)
    return [a["prefixlen"] for a in dump if a["index"] == ifindex and a["family"] == family]


def reasonable_max(family: int, prefixes: list[int]) -> int:
    """Upstream's bound on a device's neighbours: for each address, 4 times the number of
    hosts its prefix holds (at least 256); unbounded (INT_MAX) for 64 host bits or more."""
    total = 0
    for prefixlen in prefixes:
        host_bits = ADDRESS_BITS[family] - prefixlen
        if host_bits >= 64:
            return INT_MAX
        total += max(1 << host_bits, MIN_PREFIX_NEIGHBOURS) * HEADROOM
    return min(total, INT_MAX)
