"""neigh_table: keep the neighbour tables (ARP, NDISC) from refusing new neighbours.

Each family has one table for the whole host, shared by every network namespace. Past
``gc_thresh3`` entries the kernel refuses new neighbours ("neighbor table overflow!", and
``ip neigh add`` fails with "No buffer space available"), so traffic to them is dropped:
Kubernetes nodes, routers and hosts on big L2 segments run into it. bpf/neigh_table.bpf.c
reports a table nearing gc_thresh3, with the device (and its namespace) that is filling it;
this module grows gc_thresh1-3 together over netlink, up to upstream's bound from the
device's address prefixes, and shrinks them back toward their values before bpftune once
the table has stayed nearly empty. Thresholds are host-wide; the namespace and device are
attribution, and say where to read the device's addresses (an ifindex is only unique
within its namespace).

Upstream behaviour: reference section 5.3. We differ where marked "Upstream".
"""

from __future__ import annotations

import ctypes as ct
import socket
from typing import TYPE_CHECKING, ClassVar

from bpftune import neigh
from bpftune.access import NeighTable
from bpftune.btf import Field
from bpftune.changes import GLOBAL, within_ceiling
from bpftune.events import Event
from bpftune.hooks import Watch, raw_tp
from bpftune.learning import LearningRate
from bpftune.log import log
from bpftune.memory import total_ram_bytes
from bpftune.sysctl import INT_MAX, SysctlError
from bpftune.tuner import NO_IPV6, Published, Scenario, Tunable, Tuner
from bpftune.verify import ARP_REFUSALS, NDISC_REFUSALS

if TYPE_CHECKING:
    from bpftune.engine import Engine

#: A neighbour entry with its hardware header cache, rounded up (struct neighbour is 376
#: bytes on 6.1-6.18, plus the key): what a full table costs per entry.
ENTRY_BYTES = 512
#: A grown table shrinks one step after it has been nearly empty this long, and again after
#: each further such period (the kernel itself drops unused entries after gc_stale_time,
#: 60 s).
QUIET_SECONDS = 30
#: Destroyed namespaces whose device counts are forgotten in one walk of neigh_devices (at
#: the next tick, or once this many are waiting): a walk at each destruction cost as much
#: as every namespace's devices (up to the map's 4096).
FORGET_BATCH = 256
POSITIONS = ("thresh1", "thresh2", "thresh3")


def _ceiling() -> tuple[int, ...]:
    # The kernel bounds the thresholds only by INT_MAX. A table of gc_thresh3 entries may
    # hold that many entries' memory, so no threshold goes past what 1/64 of RAM holds.
    most = min(INT_MAX, total_ram_bytes() // 64 // ENTRY_BYTES)
    return (most,) * 3


class NeighDevice(ct.Structure):
    """The event payload (struct neigh_device): the device filling the table."""

    _fields_ = [("ifindex", ct.c_int32), ("family", ct.c_uint16), ("refused", ct.c_uint8),
                ("pad", ct.c_uint8), ("dev", ct.c_char * 16)]


def grown(thresholds: tuple[int, ...], bound: int, rate: LearningRate) -> tuple[int, ...]:
    """Each threshold one learning-rate step up, thresh3 at most ``bound``, kept in order
    (the kernel does not keep them ordered; an unordered table comes out ordered)."""
    t3 = min(rate.grow(thresholds[2]), bound)
    t2 = min(rate.grow(thresholds[1]), t3)
    return (min(rate.grow(thresholds[0]), t2), t2, t3)


def shrunk(thresholds: tuple[int, ...], floor: tuple[int, ...],
           rate: LearningRate) -> tuple[int, ...]:
    """Each threshold one learning-rate step down, not below ``floor`` (the values before
    bpftune changed them), kept in order."""
    t3, t2, t1 = (max(rate.shrink(v), f) for v, f in zip(thresholds[::-1], floor[::-1],
                                                          strict=True))
    t2 = min(t2, t3)
    return (min(t1, t2), t2, t3)


def transitions(old: tuple[int, ...], new: tuple[int, ...]) -> str:
    return ", ".join(f"{p}: {a} to {b}" for p, a, b in zip(POSITIONS, old, new, strict=True))


def literal(text: str) -> str:
    """``text`` (which holds a device name: any character but '/') as a reason line, which
    the change path formats."""
    return text.replace("{", "{{").replace("}", "}}")


class NeighTableTuner(Tuner):
    name = "neigh_table"
    pmda_cluster = 12
    bpf_source = "neigh_table.bpf.c"
    features = frozenset({"btf", "ringbuf"})
    watches = (Watch("neighbour creation", (raw_tp("neigh_create"),)),)
    fields: ClassVar[dict[str, Field]] = {
        "OFF_TBL_FAMILY": Field("neigh_table.family", 4),
        "OFF_TBL_GC_ENTRIES": Field("neigh_table.gc_entries.counter", 4),
        "OFF_TBL_THRESH1": Field("neigh_table.gc_thresh1", 4),
        "OFF_TBL_THRESH2": Field("neigh_table.gc_thresh2", 4),
        "OFF_TBL_THRESH3": Field("neigh_table.gc_thresh3", 4),
        "OFF_DEV_IFINDEX": Field("net_device.ifindex", 4),
        "OFF_DEV_NAME": Field("net_device.name", 16),
        "OFF_DEV_NET": Field("net_device.nd_net.net", 8),
    }
    payload = NeighDevice
    payload_struct = "neigh_device"
    published = (
        Published("entries", "entries in the neighbour table, permanent ones included",
                  instances="table"),
        Published("table_fulls", "new neighbours the kernel refused since boot because the "
                  "table was full", unit="count", counter=True, instances="table"),
        Published("device_created", "neighbour entries created per namespace and device "
                  "since bpftune started (instances: netns/device/table)", unit="count",
                  counter=True, instances="device"),
        Published("device_refused", "new neighbours refused because the table was full, per "
                  "namespace and device since bpftune started (instances: "
                  "netns/device/table)", unit="count", counter=True, instances="device"),
    )
    # Upstream declares each gc_thresh (and gc_interval, gc_stale_time) as a sysctl and
    # changes them over netlink. Here each table's three thresholds are one tunable, read
    # and written over netlink (bpftune.access.NeighTable): one decision, one ledger
    # entry, one rollback. A write to any of the gc_thresh sysctls hands the tuner over.
    ARP = Tunable("net.ipv4.neigh.default.gc_thresh", values=3, positions=POSITIONS,
                  ceiling=_ceiling, access=NeighTable(socket.AF_INET),
                  figures=(ARP_REFUSALS,))
    NDISC = Tunable("net.ipv6.neigh.default.gc_thresh", values=3, positions=POSITIONS,
                    optional=True, ceiling=_ceiling, access=NeighTable(socket.AF_INET6),
                    absent_when=NO_IPV6, absent_means="only the ARP table is tuned",
                    figures=(NDISC_REFUSALS,))
    NEARLY_FULL = Scenario("neighbour table nearly full",
                           "neighbour table is nearly full, preventing new entries from being "
                           "added.")
    GROWN_EXCESSIVELY = Scenario("neighbour table grown excessively",
                                 "neighbour table increases are beyond what would be expected "
                                 "for the device given the number of IP addresses/prefixlens "
                                 "associated with it.")
    NEARLY_EMPTY = Scenario("neighbour table nearly empty",
                            "neighbour table is nearly empty, consuming unnecessary memory.")

    def __init__(self, engine: Engine, tuner_id: int) -> None:
        super().__init__(engine, tuner_id)
        #: (tunable, netns, ifindex) -> the thresholds at which its bound was last reported
        self.bounded: dict[tuple[str, int, int], tuple[int, ...]] = {}
        self.quiet_since: dict[str, float] = {}  # tunable -> when its table went quiet
        self.present: list[Tunable] = []
        self.departed: set[int] = set()  # namespaces destroyed, their devices still counted

    def init(self) -> None:
        if not neigh.settable_here():
            raise RuntimeError("neighbour table thresholds can only be changed from the "
                               "initial network namespace")
        for tunable in self.tunables:
            try:
                self.value(tunable)
            except SysctlError:
                continue  # no IPv6 on this host
            self.present.append(tunable)

    def table_sizes(self) -> dict[str, int]:
        return {"bounded": len(self.bounded)}

    def netns_destroyed(self, cookie: int) -> None:
        self.bounded = {k: v for k, v in self.bounded.items() if k[1] != cookie}
        self.departed.add(cookie)
        if len(self.departed) >= FORGET_BATCH:  # also when not ticked (handed over)
            self._forget_departed_devices()

    def _forget_departed_devices(self) -> None:
        if self.departed and self.bpf is not None:
            devices = self.bpf["neigh_devices"]
            for key in [k for k in devices if k.netns_cookie in self.departed]:
                del devices[key]
        self.departed.clear()

    # Growth (events from BPF).
    def handle(self, event: Event) -> None:
        tunable = self.tunables[event.tunable_id]
        device = event.payload(NeighDevice)
        seen = event.old_values(3)
        if self.bounded.get((tunable.name, event.netns_cookie, device.ifindex)) == seen:
            return  # its bound is reached, and said so for these thresholds
        try:
            live = self.value(tunable)
        except SysctlError as e:
            log.debug(f"{self.name}: {e}")
            return
        entries = event.metric[0]
        if live != seen and not self.learning_rate.nearly_full(entries, live[2]):
            return  # stale: an earlier event grew the table enough for this one too
        # Events of a burst are rate limited and arrive after earlier ones grew the table:
        # one that is still nearly full for the live thresholds grows them once more.
        self._grow(tunable, event.netns_cookie, device, live, entries)

    def _grow(self, tunable: Tunable, cookie: int, device: NeighDevice,
              live: tuple[int, ...], entries: int) -> None:
        table = neigh.TABLES[tunable.access.family]
        dev = device.dev.decode(errors="replace")
        who = (f"dev '{dev}' (ifindex {device.ifindex}) in netns "
               f"'{self.engine.namespaces.name(cookie)}'")
        with self.entered(cookie):
            prefixes = neigh.device_prefixes(device.ifindex, dev, tunable.access.family)
        if prefixes is None:  # the device went away: its entries go with it
            log.debug(f"{self.name}: {who} is gone; {table} left as it is")
            return
        bound = neigh.reasonable_max(tunable.access.family, prefixes)
        if live[2] >= bound:
            if self.bounded.get((tunable.name, cookie, device.ifindex)) == live:
                return
            self.bounded[(tunable.name, cookie, device.ifindex)] = live
            self.count(tunable, self.GROWN_EXCESSIVELY, GLOBAL, literal(
                f"can no longer update thresholds for gc_thresh[1-3] for table '{table}' for "
                f"device '{dev}' (ifindex {device.ifindex}) in netns "
                f"'{self.engine.namespaces.name(cookie)}' due to excessive size of table (we "
                f"computed a reasonable max of {bound} based on the prefixlens of the "
                f"{len(prefixes)} configured addresses). Current thresh1: {live[0]} , "
                f"thresh2: {live[1]} , thresh3: {live[2]}."))
            return
        new = within_ceiling(grown(live, bound, self.learning_rate), tunable.limits())
        # Upstream: "updated thresholds for %s table, dev '%s' (ifindex %d) thresh1: ...";
        # we add the namespace and the table's entries.
        self.change(tunable, self.NEARLY_FULL, GLOBAL, new, literal(
            f"updated thresholds for {table} table, {who} thresh1: {live[0]} to {new[0]}, "
            f"thresh2: {live[1]} to {new[1]}, thresh3: {live[2]} to {new[2]} ({entries} "
            f"entries in use)"), expect=live)

    # Shrinking, and changes by others (every second).
    def tick(self, now: float) -> None:
        self._forget_departed_devices()
        for tunable in self.present:
            record = self.engine.changes.records.get((tunable.name, GLOBAL))
            if record is None:  # only what bpftune grew is shrunk
                self.quiet_since.pop(tunable.name, None)
                continue
            state = neigh.table_state(tunable.access.family)
            if state.thresholds != tuple(record.current):
                self._taken_over(tunable, tuple(record.current), state.thresholds)
                return
            self._maybe_shrink(tunable, state, tuple(record.original), now)

    def _taken_over(self, tunable: Tunable, ours: tuple[int, ...],
                    live: tuple[int, ...]) -> None:
        """Someone changed the thresholds without a sysctl write (``ip ntable change``,
        which the sysctl tuner cannot see): the administrator's rule applies all the same."""
        message = (f"thresholds of neighbour table {neigh.TABLES[tunable.access.family]} were "
                   f"changed from ({' '.join(map(str, ours))}) to "
                   f"({' '.join(map(str, live))}) by someone else; disabling '{self.name}' "
                   f"for namespace cookie {self.engine.namespaces.global_cookie}")
        log.notice(message)
        self.engine.disable(self, GLOBAL, tunable.name, live, message)

    def _maybe_shrink(self, tunable: Tunable, state: neigh.TableState,
                      original: tuple[int, ...], now: float) -> None:
        thresholds = state.thresholds
        smaller = shrunk(thresholds, original, self.learning_rate)
        if smaller == thresholds or not self.learning_rate.nearly_empty(state.entries,
                                                                         thresholds[2]):
            self.quiet_since.pop(tunable.name, None)
            return
        since = self.quiet_since.setdefault(tunable.name, now)
        if now - since < QUIET_SECONDS:
            return
        self.quiet_since[tunable.name] = now
        # Upstream shrinks on every removal from a nearly empty table, to its defaults
        # (128 512 1024) at most; we wait for the table to stay nearly empty and never go
        # below the values it had before bpftune grew it.
        self.change(tunable, self.NEARLY_EMPTY, GLOBAL, smaller,
                    f"reduced thresholds for {state.name} table, "
                    f"{transitions(thresholds, smaller)} (at most {state.entries} entries "
                    f"in use for {QUIET_SECONDS} s)", expect=thresholds)

    # Metrics.
    def published_values(self) -> dict[str, int | dict[str, int]]:
        tables = {}
        for tunable in self.present:
            try:
                tables[neigh.TABLES[tunable.access.family]] = neigh.table_state(
                    tunable.access.family)
            except SysctlError:
                continue
        values: dict[str, int | dict[str, int]] = {
            "entries": {name: t.entries for name, t in tables.items()},
            "table_fulls": {name: t.table_fulls for name, t in tables.items()},
            "device_created": {}, "device_refused": {}}
        if self.bpf is not None:
            for key, counts in self.bpf["neigh_devices"].items():
                if key.netns_cookie in self.departed:
                    continue
                instance = (f"{self.engine.namespaces.name(key.netns_cookie)}/"
                            f"{counts.dev.decode(errors='replace')}/"
                            f"{neigh.TABLES.get(key.family, key.family)}")
                values["device_created"][instance] = counts.created
                values["device_refused"][instance] = counts.refused
        return values
