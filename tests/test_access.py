"""Tunables read and written other than as one sysctl (bpftune.access), through the one
change path, on real sysctls in a test namespace. An ordered group is one decision: the
kernel refuses ipfrag_low_thresh above ipfrag_high_thresh, so the members must be written in
the right order both when growing and when rolling back."""

from __future__ import annotations

import subprocess
from types import SimpleNamespace

import pytest

from bpftune.access import SysctlGroup, from_spec
from bpftune.changes import Changes, StateFile
from bpftune.netns import Namespaces
from bpftune.tuner import Scenario, Tunable
from helpers import netns_cookie, read_sysctl, recorded, write_sysctl

LOW, HIGH = "net.ipv4.ipfrag_low_thresh", "net.ipv4.ipfrag_high_thresh"
THRESH = Tunable("net.ipv4.ipfrag_thresh", 2, namespaced=True, ceiling=lambda: (1 << 30,) * 2,
                 positions=("low", "high"), access=SysctlGroup((LOW, HIGH)))
GROWN = Scenario("grown", "both thresholds grown")


@pytest.fixture
def group(tmp_path, hosts):
    # Shrinking: low first, or high may not go below it. (The namespace goes at teardown.)
    write_sysctl(LOW, "32768", hosts.ns)
    write_sysctl(HIGH, "65536", hosts.ns)
    namespaces = Namespaces()
    namespaces.scan()
    changes = Changes(namespaces, StateFile(str(tmp_path)))
    tuner = SimpleNamespace(name="demo", scenarios=(GROWN,))
    yield changes, tuner, netns_cookie(hosts.ns), hosts.ns, tmp_path
    namespaces.close()


def test_the_kernel_refuses_members_out_of_order(hosts, group):
    with pytest.raises(subprocess.CalledProcessError):
        write_sysctl(LOW, "131072", hosts.ns)  # above high: EINVAL
    assert read_sysctl(LOW, hosts.ns) == "32768"


def test_an_ordered_group_changes_as_one_decision_and_rolls_back(group):
    changes, tuner, cookie, ns, tmp = group
    # Both past the old high: only high-then-low gets there.
    assert changes.apply(tuner, THRESH, 0, cookie, (131072, 262144), "{old} -> {new}")
    assert (read_sysctl(LOW, ns), read_sysctl(HIGH, ns)) == ("131072", "262144")
    (record,) = recorded(tmp)  # one ledger entry, one scenario count
    assert record["original"] == [32768, 65536] and record["current"] == [131072, 262144]
    assert from_spec(record["access"]) == THRESH.access
    assert changes.scenario_counts[("demo", THRESH.name, 0, cookie)] == 1
    assert changes.summary(SimpleNamespace(name="demo", scenarios=(GROWN,)))[-2:] == [
        f'sysctl -w {LOW}="131072"', f'sysctl -w {HIGH}="262144"']
    # Rolling back shrinks both below the current low: only low-then-high gets there.
    changes.rollback("demo")
    assert (read_sysctl(LOW, ns), read_sysctl(HIGH, ns)) == ("32768", "65536")


def test_an_administrator_write_to_any_member_is_seen(group):
    assert THRESH.access.names(THRESH.name) == (LOW, HIGH)
