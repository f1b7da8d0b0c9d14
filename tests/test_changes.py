"""The one change path, on real sysctls in a test namespace: ceilings, ordering, read-back,
the ledger and its state file, administrator hand-over, rollback."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

from bpftune import sysctl
from bpftune.changes import Changes, Record, StateFile, boot_id
from bpftune.log import log
from bpftune.tuners.tcp_buffer import TcpBufferTuner, _socket_buffer_ceiling
from helpers import read_sysctl, recorded, values, write_sysctl

RMEM = TcpBufferTuner.RMEM


def test_growth_is_capped_at_the_ceiling_and_recorded_before_writing(ns_changes):
    changes, tuner, cookie, ns, tmp = ns_changes
    ceiling = _socket_buffer_ceiling()[2]
    assert changes.apply(tuner, RMEM, 0, cookie, (4096, 131072, 2**40), "grow {old} {new}")
    assert values(read_sysctl(RMEM.name, ns)) == [4096, 131072, ceiling]
    (record,) = recorded(tmp)
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
    changes.hand_over("tcp_buffer", cookie)
    assert not changes.apply(tuner, RMEM, 0, cookie, (4096, 131072, 163840), "{old} {new}")
    assert read_sysctl(RMEM.name, ns) == "4096 131072 131072"


def test_hand_back_forgets_only_that_tuners_records_there_and_journals_it(ns_changes):
    changes, tuner, cookie, ns, tmp = ns_changes
    assert changes.apply(tuner, RMEM, 0, cookie, (4096, 131072, 163840), "{old} {new}")
    other = Record("udp_buffer", "net.core.rmem_max", cookie, [1], [2])
    elsewhere = Record("tcp_buffer", RMEM.name, 0, [1, 2, 3], [1, 2, 4])
    for r in (other, elsewhere):  # another tuner's there, this tuner's elsewhere
        changes.records[r.key] = r
        changes._journal(r)
    changes.hand_over("tcp_buffer", cookie)
    changes.run_start[(RMEM.name, cookie)] = (4096, 131072, 131072)
    changes.hand_back("tcp_buffer", cookie)
    assert ("tcp_buffer", cookie) not in changes.manual
    assert set(changes.records) == {other.key, elsewhere.key}
    assert (RMEM.name, cookie) not in changes.run_start
    assert {(r["tuner"], r["cookie"]) for r in recorded(tmp)} == {("udp_buffer", cookie),
                                                                  ("tcp_buffer", 0)}
    # Its next change records the value there now as the original.
    write = "4096 131072 140000"
    write_sysctl(RMEM.name, write, ns)  # the administrator's, after the hand-over
    assert changes.apply(tuner, RMEM, 0, cookie, (4096, 131072, 175000), "{old} {new}")
    assert changes.records[(RMEM.name, cookie)].original == values(write)


def test_the_value_is_announced_on_disk_before_it_is_written(ns_changes, monkeypatch):
    changes, tuner, cookie, _, tmp = ns_changes
    seen_at_write = []
    real_write = sysctl.write

    def observing_write(name, value):
        seen_at_write.append(recorded(tmp))
        real_write(name, value)

    monkeypatch.setattr(sysctl, "write", observing_write)
    assert changes.apply(tuner, RMEM, 0, cookie, (4096, 131072, 163840), "{old} {new}")
    assert changes.apply(tuner, RMEM, 0, cookie, (4096, 131072, 196608), "{old} {new}")
    first, second = ([r for r in journal if r["tunable"] == RMEM.name] for journal in seen_at_write)
    assert first == [dict(first[0], original=[4096, 131072, 131072],
                          current=[4096, 131072, 131072], intended=[4096, 131072, 163840])]
    assert second[0]["current"] == [4096, 131072, 163840]
    assert second[0]["intended"] == [4096, 131072, 196608]
    (after,) = recorded(tmp)
    assert after["intended"] is None and after["current"] == [4096, 131072, 196608]


def leftover(changes, tmp, cookie, *, current, intended=None):
    """A journal as a run killed at some point of the change path leaves it."""
    record = Record("tcp_buffer", RMEM.name, cookie, [4096, 131072, 131072], current,
                    changes=1, intended=intended)
    StateFile(str(tmp)).rewrite([record])
    changes.adopt_leftovers()
    return changes.records.get((RMEM.name, cookie))


def test_a_write_that_landed_before_the_crash_is_adopted(ns_changes, sysctls):
    changes, _, cookie, ns, tmp = ns_changes
    sysctls.set(RMEM.name, "4096 131072 163840", ns)  # what the killed run wrote
    record = leftover(changes, tmp, cookie, current=[4096, 131072, 131072],
                      intended=[4096, 131072, 163840])
    assert record is not None and record.current == [4096, 131072, 163840]
    changes.rollback()
    assert read_sysctl(RMEM.name, ns) == "4096 131072 131072"


def test_a_write_that_never_happened_leaves_nothing_to_adopt(ns_changes):
    changes, _, cookie, _, tmp = ns_changes
    assert leftover(changes, tmp, cookie, current=[4096, 131072, 131072],
                    intended=[4096, 131072, 163840]) is None
    assert recorded(tmp) == []


def test_a_leftover_an_administrator_changed_since_is_forgotten(ns_changes, sysctls,
                                                                monkeypatch):
    changes, _, cookie, ns, tmp = ns_changes
    monkeypatch.setattr(log, "stream", io.StringIO())
    sysctls.set(RMEM.name, "4096 131072 16384", ns)  # the administrator's value
    assert leftover(changes, tmp, cookie, current=[4096, 131072, 163840]) is None
    assert "an administrator changed it since" in log.stream.getvalue()
    changes.rollback()
    assert read_sysctl(RMEM.name, ns) == "4096 131072 16384"
    assert recorded(tmp) == []


def test_the_journal_stays_bounded(ns_changes):
    changes, tuner, cookie, _, tmp = ns_changes
    for step in range(2 * StateFile.COMPACT_LINES):
        assert changes.apply(tuner, RMEM, 0, cookie, (4096, 131072, 131073 + step), "{old} {new}")
    lines = (tmp / "state.jsonl").read_text().count("\n")
    assert lines <= StateFile.COMPACT_LINES + 4
    assert recorded(tmp)[0]["current"] == [4096, 131072, 131072 + 2 * StateFile.COMPACT_LINES]


def test_originals_left_in_the_state_file_of_an_older_version_are_adopted(ns_changes,
                                                                         sysctls):
    changes, _, cookie, ns, tmp = ns_changes
    sysctls.set(RMEM.name, "4096 131072 163840", ns)  # what the older version set
    old = {"pid": 1, "boot_id": boot_id(), "records": [
        {"tuner": "tcp_buffer", "tunable": RMEM.name, "cookie": cookie,
         "original": [4096, 131072, 131072], "current": [4096, 131072, 163840],
         "changes": 1, "last_change": 0.0}]}
    (tmp / "state.json").write_text(json.dumps(old))
    changes.adopt_leftovers()
    assert not (tmp / "state.json").exists() and len(recorded(tmp)) == 1
    changes.rollback()
    assert read_sysctl(RMEM.name, ns) == "4096 131072 131072"


def test_a_write_whose_read_back_failed_is_still_bpftunes(ns_changes, monkeypatch):
    changes, tuner, cookie, ns, _ = ns_changes
    real_read, reads = sysctl.read, []

    def failing_second_read(name, *, string=False):
        reads.append(name)
        if len(reads) == 2:  # the read-back of the first change
            raise sysctl.SysctlError(5, "read-back failed")
        return real_read(name, string=string)

    monkeypatch.setattr(sysctl, "read", failing_second_read)
    assert not changes.apply(tuner, RMEM, 0, cookie, (4096, 131072, 163840), "{old} {new}")
    assert read_sysctl(RMEM.name, ns) == "4096 131072 163840"  # it was written
    assert changes.apply(tuner, RMEM, 0, cookie, (4096, 131072, 196608), "{old} {new}")
    (record,) = changes.records.values()
    assert record.original == [4096, 131072, 131072]  # not bpftune's first value
    changes.rollback()
    assert read_sysctl(RMEM.name, ns) == "4096 131072 131072"


def test_a_namespace_gone_is_forgotten_by_its_own_keys_and_its_counts_folded(tmp_path):
    """Each destruction looks up the namespace's own records and counts (with 1000
    namespaces, each counted once as created, walking all of them at each destruction
    was 40 % of the extra CPU a namespace churned cost)."""
    namespaces = SimpleNamespace(is_global=lambda cookie: cookie == 0)
    changes = Changes(namespaces, StateFile(str(tmp_path)))  # type: ignore[arg-type]
    created = ("netns", "network_namespace", 0)
    for cookie in range(1, 1001):
        changes.scenario_counts[(*created, cookie)] += 1
    changes.scenario_counts[("tcp_buffer", RMEM.name, 0, 5)] += 2
    record = Record("tcp_buffer", RMEM.name, 5, [1, 2, 3], [1, 2, 4])
    changes.records[record.key] = record
    changes._journal(record)
    assert len(recorded(tmp_path)) == 1
    changes.forget_netns(5)
    assert (RMEM.name, 5) not in changes.records and len(changes.scenario_counts) == 999
    assert changes.departed_counts == {created: 1, ("tcp_buffer", RMEM.name, 0): 2}
    assert 5 not in changes.records.keys_by_cookie
    assert 5 not in changes.scenario_counts.keys_by_cookie
    assert changes.scenario_counts.keys_of(6) == [(*created, 6)]
    assert recorded(tmp_path) == []  # in the journal too
