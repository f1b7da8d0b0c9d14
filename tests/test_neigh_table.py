"""neigh_table: real neighbour entries in a test namespace fill the host's ARP table, whose
thresholds the test squeezes to 16/32/64 (restored afterwards).

Entries are added as ``nud reachable`` over netlink, from inside the namespace, a few
hundred a second: the kernel's forced garbage collection may only evict entries not updated
for 5 s, so with the table at gc_thresh3 each new one is refused with ENOBUFS ("No buffer
space available"), as ARP replies for new neighbours are on a busy L2 segment. Permanent
entries would be exempt from the thresholds.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections import namedtuple
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
from pyroute2 import NetNS
from pyroute2 import netns as pyroute2_netns
from pyroute2.netlink.exceptions import NetlinkError

from bpftune.learning import LearningRate
from bpftune.neigh import device_prefixes, reasonable_max
from bpftune.sysctl import INT_MAX
from bpftune.tuners.neigh_table import FORGET_BATCH, NeighTableTuner, grown, shrunk
from helpers import (
    BPFTUNE,
    VERIFY_WINDOWS,
    daemon,
    netns_cookie,
    ns_prefix,
    read_sysctl,
    recorded,
    verdict,
    wait_until,
)
from pcp_helpers import pmda_installed, pminfo

THRESH = tuple(f"net.ipv4.neigh.default.gc_thresh{i}" for i in (1, 2, 3))
TUNABLE = "net.ipv4.neigh.default.gc_thresh"
SQUEEZED = (16, 32, 64)
NUD_REACHABLE = 0x02
NEARLY_FULL = ("Scenario 'neighbour table nearly full' occurred for tunable "
               f"'{TUNABLE}' in global ns. neighbour table is nearly full, preventing new "
               "entries from being added.")


def thresholds() -> tuple[int, ...]:
    return tuple(int(read_sysctl(n)) for n in THRESH)


@pytest.fixture
def squeezed(sysctls):
    """The host's ARP thresholds at 16/32/64 for the test, put back afterwards."""
    for name, value in zip(THRESH, SQUEEZED, strict=True):
        sysctls.set(name, str(value))
    return sysctls


class Neighbours:
    """Reachable ARP entries on the test namespace's end of the veth, each new."""

    def __init__(self, ns: str, ifname: str) -> None:
        self.ns, self.ifname = ns, ifname
        self.added = 0

    def add(self, count: int, pause: float = 0.003) -> int:
        """Add ``count`` entries; how many the kernel refused (table full)."""
        refused = 0
        with NetNS(self.ns) as nsr:
            (index,) = nsr.link_lookup(ifname=self.ifname)
            for _ in range(count):
                n = self.added
                self.added += 1
                try:
                    nsr.neigh("add", dst=f"10.232.{n // 250}.{n % 250 + 1}", ifindex=index,
                              lladdr=f"02:00:00:00:{n // 250:02x}:{n % 250:02x}",
                              state=NUD_REACHABLE)
                except NetlinkError as e:
                    if e.code != errno.ENOBUFS:
                        raise
                    refused += 1
                time.sleep(pause)
        return refused

    def flush(self) -> None:
        subprocess.run([*ns_prefix(self.ns), "ip", "neigh", "flush", "dev", self.ifname],
                       check=True)


@pytest.fixture
def neighbours(hosts):
    # IPv4 only: the tuner needs nothing from IPv6 in the namespace.
    subprocess.run([*ns_prefix(hosts.ns), "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"],
                   check=True)
    return Neighbours(hosts.ns, hosts.ns_if)


@contextmanager
def entered(ns: str):
    """Run the body in the namespace ``ns`` (this thread), then come back."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        pyroute2_netns.setns(ns)
        yield
    finally:
        pyroute2_netns.setns(own)
        os.close(own)


def published(name: str) -> dict[str, int]:
    state = json.loads(subprocess.run([BPFTUNE, "-q", "state"], capture_output=True,
                                      text=True, check=True, timeout=30).stdout)
    (tuner,) = (t for t in state["tuners"] if t["name"] == "neigh_table")
    (value,) = (p["value"] for p in tuner["published"] if p["name"] == name)
    return value


def test_growth_for_a_full_table_is_kept(tmp_path, squeezed, hosts, neighbours):
    """Verified changes: new neighbours at 3 a second make the window before the change
    active (allocations) with no refusals; 120 at once fill the table, which grows (a
    series of steps); after a flush, new neighbours at 3 a second again over the window
    after the change, none refused: kept, with the host's ARP refusals as evidence. The
    host is otherwise quiet (neighbours added over netlink are no packets): the verifier
    samples neighbour tables then too."""
    with daemon(tmp_path, env=VERIFY_WINDOWS) as d:
        assert neighbours.add(15, pause=0.33) == 0  # the before window, 5 s
        neighbours.add(120)
        d.wait_for(re.escape(NEARLY_FULL), timeout=5)
        neighbours.flush()
        assert neighbours.add(15, pause=0.33) == 0  # the after window
        before, _, after = verdict(d, "neigh_table", TUNABLE, "neigh refusals/1000 allocs")
        assert after <= max(before, 1)  # at most the floor of a clear rise
        assert thresholds()[2] > SQUEEZED[2]


def test_a_full_table_grows_and_stops_refusing_neighbours(tmp_path, squeezed, hosts,
                                                          neighbours):
    refused_before = neighbours.add(120)
    neighbours.flush()
    assert refused_before >= 40, refused_before  # 64 fit, less what gc could evict
    with pmda_installed(), daemon(tmp_path) as d:
        refused_with = neighbours.add(120)
        where = rf"dev '{hosts.ns_if}' \(ifindex \d+\) in netns '{hosts.ns}'"
        d.wait_for(re.escape(NEARLY_FULL) + r"\nbpftune: updated thresholds for arp_cache "
                   rf"table, {where} thresh1: 16 to 20, thresh2: 32 to 40, thresh3: 64 to 80 "
                   r"\(\d+ entries in use\)")
        now = thresholds()
        assert now[0] <= now[1] <= now[2] and now[2] > 120
        instance = f"{hosts.ns}/{hosts.ns_if}/arp_cache"
        assert published("device_created")[instance] >= 120
        assert published("table_fulls")["arp_cache"] >= refused_before
        time.sleep(2)  # the PMDA polls the daemon once a second
        out = pminfo("-f", "bpftune.neigh_table.device_created", f"bpftune.neigh_table.{TUNABLE}",
                     "bpftune.neigh_table.scenarios.neighbour_table_nearly_full")
        assert re.search(rf'inst \[\d+ or "{re.escape(instance)}"\] value (\d+)', out), out
        assert re.search(rf'inst \[\d+ or "global/thresh3"\] value {now[2]}\b', out), out
        assert re.search(r'nearly_full\n\s+inst \[\d+ or "global"\] value [1-9]', out), out
    assert refused_with <= refused_before // 10, (refused_before, refused_with)
    assert re.search(r"# Summary: scenario 'neighbour table nearly full' occurred \d+ times "
                     rf"for tunable '{TUNABLE}' in global ns", d.log)


def test_growth_stops_at_the_bound_of_the_devices_prefix(tmp_path, squeezed, hosts,
                                                          neighbours):
    """The namespace's end has one /30 address: at most 1024 neighbours are reasonable
    (upstream: 4 x max(2^2, 256)). Past it the tuner says so once, not for every event."""
    with daemon(tmp_path) as d:
        neighbours.add(1100, pause=0.001)
        assert wait_until(lambda: thresholds()[2] == 1024, timeout=10), thresholds()
        d.wait_for("can no longer update thresholds")
        neighbours.add(100, pause=0.001)  # refused, and reported, but said no more
        time.sleep(1)
        assert thresholds()[2] == 1024
    said = re.findall(
        r"can no longer update thresholds for gc_thresh\[1-3\] for table 'arp_cache' for "
        rf"device '{hosts.ns_if}' \(ifindex \d+\) in netns '{hosts.ns}' due to excessive "
        r"size of table \(we computed a reasonable max of 1024 based on the prefixlens of "
        r"the 1 configured addresses\)\. Current thresh1: \d+ , thresh2: \d+ , "
        r"thresh3: 1024\.", d.log)
    assert len(said) == 1, d.log
    assert "Scenario 'neighbour table grown excessively' occurred" in d.log


def test_a_grown_table_shrinks_back_once_it_stays_nearly_empty(tmp_path, squeezed, neighbours):
    with daemon(tmp_path) as d:
        neighbours.add(120)
        d.wait_for("updated thresholds")
        grown_to = thresholds()
        neighbours.flush()
        d.wait_for(r"reduced thresholds for arp_cache table, thresh1: \d+ to \d+", timeout=60)
        smaller = thresholds()
        assert smaller[2] < grown_to[2] and smaller[0] <= smaller[1] <= smaller[2]
        assert all(s >= o for s, o in zip(smaller, SQUEEZED, strict=True))
    assert "Scenario 'neighbour table nearly empty' occurred" in d.log


def test_rollback_restores_the_thresholds(tmp_path, squeezed, neighbours):
    with daemon(tmp_path, "-R") as d:
        neighbours.add(120)
        d.wait_for("updated thresholds")
        assert thresholds() != SQUEEZED
    assert d.proc.returncode == 0
    assert thresholds() == SQUEEZED
    assert re.search(rf"Rolling back sysctl values for '{TUNABLE}' from \(\d+ \d+ \d+\) to "
                     r"original values \(16 32 64\)", d.log)


def test_kill_9_then_restart_with_rollback_restores_the_thresholds(tmp_path, squeezed,
                                                                    neighbours):
    with daemon(tmp_path / "first", restore=False, state=tmp_path / "state") as first:
        neighbours.add(120)
        first.wait_for("updated thresholds")
        first.stop(signal.SIGKILL)
    left = thresholds()
    assert left != SQUEEZED
    (record,) = [r for r in recorded(tmp_path / "state") if r["tunable"] == TUNABLE]
    assert record["original"] == list(SQUEEZED) and record["access"]["kind"] == "neigh_table"
    with daemon(tmp_path / "second", "-R", restore=False, state=tmp_path / "state") as second:
        second.wait_for(rf"left sysctl '{TUNABLE}' changed in global ns from \(16 32 64\)")
    assert thresholds() == SQUEEZED


def test_an_administrators_sysctl_write_hands_the_tuner_over(tmp_path, squeezed, neighbours):
    with daemon(tmp_path) as d:
        subprocess.run(["sysctl", "-qw", f"{THRESH[0]}=17"], check=True)
        d.wait_for(rf"modified sysctl '{THRESH[0]}' that tuner 'neigh_table' uses; "
                   rf"disabling 'neigh_table' for namespace cookie {netns_cookie(None)}")
        assert neighbours.add(120) >= 40  # nobody helps
        time.sleep(1)
        assert thresholds() == (17, 32, 64)
    assert "updated thresholds" not in d.log


def test_a_netlink_change_by_someone_else_hands_the_tuner_over(tmp_path, squeezed,
                                                              neighbours):
    """``ip ntable change`` is no sysctl write: the tuner notices its values were changed."""
    with daemon(tmp_path, "-R", restore=False) as d:
        neighbours.add(120)
        d.wait_for("updated thresholds")
        subprocess.run(["ip", "ntable", "change", "name", "arp_cache", "thresh1", "7"],
                       check=True)
        d.wait_for(r"thresholds of neighbour table arp_cache were changed from \(\d+ \d+ \d+\) "
                   r"to \(7 \d+ \d+\) by someone else; disabling 'neigh_table'")
        changed = thresholds()
    assert thresholds() == changed  # -R leaves what the administrator set
    assert changed[0] == 7


def test_a_device_that_went_away_is_gone_not_an_error(hosts):
    """Its ifindex no longer exists, or names another device, in its namespace."""
    with NetNS(hosts.ns) as nsr:
        (index,) = nsr.link_lookup(ifname=hosts.ns_if)
    args = (socket.AF_INET,)
    with entered(hosts.ns):
        assert device_prefixes(index, hosts.ns_if, *args) == [30]
        assert device_prefixes(index, "eth-other", *args) is None
        assert device_prefixes(index + 1000, hosts.ns_if, *args) is None


# The decisions, as pure functions.
@pytest.mark.parametrize(("family", "prefixes", "bound"), [
    (socket.AF_INET, [30], 1024),  # a /30 holds 4 hosts: at least 256, times 4
    (socket.AF_INET, [24], 1024),
    (socket.AF_INET, [16], 262144),
    (socket.AF_INET, [30, 16], 1024 + 262144),
    (socket.AF_INET, [], 0),  # upstream: a device without addresses gets no more
    (socket.AF_INET6, [64], INT_MAX),  # 64 host bits: unbounded
    (socket.AF_INET, [0], INT_MAX),
])
def test_reasonable_max_follows_upstream(family, prefixes, bound):
    assert reasonable_max(family, prefixes) == bound


def test_growth_keeps_the_thresholds_ordered_and_within_the_bound():
    rate = LearningRate()
    assert grown((16, 32, 64), 1024, rate) == (20, 40, 80)
    assert grown((900, 950, 1000), 1024, rate) == (1024, 1024, 1024)
    assert grown((200, 100, 300), 10_000, rate) == (125, 125, 375)  # unordered comes out ordered


def test_shrinking_stops_at_the_values_before_bpftune():
    rate = LearningRate()
    assert shrunk((100, 200, 400), (16, 32, 64), rate) == (75, 150, 300)
    assert shrunk((20, 40, 80), (16, 32, 64), rate) == (16, 32, 64)


DeviceKey = namedtuple("DeviceKey", "netns_cookie ifindex family")


def test_device_counts_of_destroyed_namespaces_go_in_one_walk_a_tick():
    """A destruction only notes the namespace: each tick forgets the device counts of all
    those destroyed since in one walk of neigh_devices (a walk at each destruction cost as
    much as every namespace's devices), and they are not published meanwhile."""
    walks = []

    class Devices(dict):
        def __iter__(self):
            walks.append(len(self))
            return super().__iter__()

    counts = SimpleNamespace(created=3, refused=0, dev=b"eth0")
    devices = Devices({DeviceKey(c, 2, socket.AF_INET): counts for c in range(1, 1001)})
    engine = SimpleNamespace(namespaces=SimpleNamespace(name=lambda c: f"ns{c}"))
    t = NeighTableTuner(engine, 0)  # type: ignore[arg-type]
    t.bpf = {"neigh_devices": devices}
    for cookie in (5, 6, 7):
        t.netns_destroyed(cookie)
    assert walks == [] and len(devices) == 1000 and t.departed == {5, 6, 7}
    published = t.published_values()["device_created"]
    assert len(published) == 997 and "ns5/eth0/arp_cache" not in published
    walks.clear()
    t.tick(0.0)
    assert walks == [1000] and len(devices) == 997 and not t.departed
    assert DeviceKey(5, 2, socket.AF_INET) not in devices
    for cookie in range(100, 100 + FORGET_BATCH):  # without ticks (handed over): bounded
        t.netns_destroyed(cookie)
    assert walks == [1000, 997] and len(devices) == 997 - FORGET_BATCH
