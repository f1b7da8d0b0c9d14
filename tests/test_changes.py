"""The one change path, on real sysctls in a test namespace: ceilings, ordering, read-back,
the ledger and its state file, administrator hand-over, rollback."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from bpftune.changes import Changes, StateFile
from bpftune.netns import Namespaces
from bpftune.tuners.tcp_buffer import TcpBufferTuner, _socket_buffer_ceiling
from helpers import netns_cookie, read_sysctl, values

RMEM = TcpBufferTuner.tunables[TcpBufferTuner.RMEM]


@pytest.fixture
def ns_changes(tmp_path, hosts, sysctls):
    sysctls.set(RMEM.name, "4096 131072 131072", hosts.ns)
    namespaces = Namespaces()
    namespaces.scan()
    changes = Changes(namespaces, StateFile(str(tmp_path)))
    tuner = SimpleNamespace(name="tcp_buffer", scenarios=TcpBufferTuner.scenarios)
    yield changes, tuner, netns_cookie(hosts.ns), hosts.ns, tmp_path
    namespaces.close()


def test_growth_is_capped_at_the_ceiling_and_recorded_before_writing(ns_changes):
    changes, tuner, cookie, ns, tmp = ns_changes
    ceiling = _socket_buffer_ceiling()[2]
    assert changes.apply(tuner, RMEM, 0, cookie, (4096, 131072, 2**40), "grow {old} {new}")
    assert values(read_sysctl(RMEM.name, ns)) == [4096, 131072, ceiling]
    (record,) = json.loads((tmp / "state.json").read_text())["records"]
    assert record["original"] == [4096, 131072, 131072]
    assert record["current"] == [4096, 131072, ceiling] and record["cookie"] == cookie
    assert changes.scenario_counts[("tcp_buffer", RMEM.name, 0, cookie)] == 1


def test_out_of_order_stale_and_no_op_changes_write_nothing(ns_changes):
    changes, tuner, cookie, ns, _ = ns_changes
    assert not changes.apply(tuner, RMEM, 0, cookie, (4096, 131072, 65536), "{old} {new}")
    assert not changes.apply(tuner, RMEM, 0, cookie, (4096, 131072, 200000), "{old} {new}",
                             expect=(4096, 131072, 150000))
    assert not changes.apply(tuner, RMEM, 0, cookie, (4096, 131072, 131072), "{old} {new}")
    assert read_sysctl(RMEM.name, ns) == "4096 131072 131072"
    assert not changes.scenario_counts


def test_manual_namespace_is_left_alone_and_rollback_restores_the_rest(ns_changes):
    changes, tuner, cookie, ns, _ = ns_changes
    assert changes.apply(tuner, RMEM, 0, cookie, (4096, 131072, 163840), "{old} {new}")
    changes.rollback("tcp_buffer")
    assert read_sysctl(RMEM.name, ns) == "4096 131072 131072"
    changes.manual.add(("tcp_buffer", cookie))
    assert not changes.apply(tuner, RMEM, 0, cookie, (4096, 131072, 163840), "{old} {new}")
    assert read_sysctl(RMEM.name, ns) == "4096 131072 131072"
