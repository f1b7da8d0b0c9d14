"""The audit trail: changes, rollbacks and hand-overs of a real daemon in an append-only JSON
lines file (and journald, where it can run), ``-q history``, rotation, and a trail that
cannot be written."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from bpftune.audit import JOURNAL_SOCKET, AuditTrail
from bpftune.log import log
from helpers import (
    BPFTUNE,
    daemon,
    netns_cookie,
    read_sysctl,
    transfer_both_ways,
    values,
    wait_until,
)
from test_tcp_buffer import RMEM, WMEM, squeeze_buffers

SCENARIO = "need to increase TCP buffer size(s)"
JOURNALD = "/lib/systemd/systemd-journald"


def records(trail: Path) -> list[dict]:
    """Every record in the file, in order (each line must be one JSON object)."""
    if not trail.exists():
        return []
    return [json.loads(line) for line in trail.read_text().splitlines()]


def wait_for_record(trail: Path, timeout: float = 30, **fields) -> dict:
    found: list[dict] = []

    def matching() -> bool:
        found[:] = [r for r in records(trail) if fields.items() <= r.items()]
        return bool(found)

    assert wait_until(matching, timeout=timeout), (fields, records(trail))
    return found[0]


def history(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([BPFTUNE, "-q", "history", *args], capture_output=True, text=True,
                          timeout=30)


def text(value: list[int]) -> str:
    return " ".join(map(str, value))


def grow_buffers(hosts, squeezed: dict) -> None:
    """iperf3 both ways until tcp_rmem max grew in both namespaces."""
    transfer_both_ways(hosts)
    for ns in (None, hosts.ns):
        assert wait_until(lambda s=ns: values(read_sysctl(RMEM, s))[2] > squeezed[s][RMEM][2])


def check_change(record: dict, squeezed: list[int], pid: int) -> None:
    assert datetime.fromisoformat(record["time"]).timestamp() == pytest.approx(
        record["epoch"], abs=1e-3)
    assert record["time"].endswith("Z") and abs(record["epoch"] - time.time()) < 120
    assert record["tuner"] == "tcp_buffer" and record["scenario"] == SCENARIO
    assert record["old"] == squeezed and record["new"][:2] == squeezed[:2]
    assert record["new"][2] > squeezed[2]
    assert record["reason"] == (f"Due to need to increase max buffer size to maximize "
                                f"throughput change {RMEM}(min default max) from "
                                f"({text(record['old'])}) -> ({text(record['new'])})")
    assert record["pid"] == pid and record["verdict"] is None


def test_changes_a_restart_and_rollbacks_are_in_the_trail_and_history(tmp_path, sysctls,
                                                                      hosts):
    trail = tmp_path / "log" / "audit.jsonl"
    state = tmp_path / "state"
    squeezed = {ns: squeeze_buffers(sysctls, ns) for ns in (None, hosts.ns)}
    with daemon(tmp_path / "first", "--audit-file", str(trail), state=state,
                restore=False) as first:  # no -R: the next run adopts the changes
        grow_buffers(hosts, squeezed)
        here = wait_for_record(trail, kind="change", tunable=RMEM, netns="global")
        check_change(here, squeezed[None][RMEM], first.proc.pid)
        assert here["cookie"] == 0
        there = wait_for_record(trail, kind="change", tunable=RMEM, netns=hosts.ns)
        check_change(there, squeezed[hosts.ns][RMEM], first.proc.pid)
        assert there["cookie"] == netns_cookie(hosts.ns)

        shown = history("1000")
        assert shown.returncode == 0, shown.stderr
        lines = shown.stdout.splitlines()
        assert lines[0].split()[:4] == ["TIME", "(UTC)", "KIND", "TUNER"]
        assert any(line.split()[1:5] == ["change", "tcp_buffer", RMEM, hosts.ns]
                   and f"({text(squeezed[hosts.ns][RMEM])}) -> (" in line for line in lines)
        kept = records(trail)
        assert len(kept) > 20  # every step of the growth is a record
        newest = history().stdout.splitlines()[1:]
        assert [line[:19] for line in newest] == [r["time"][:19] for r in kept[-20:]]
        last = history("1").stdout.splitlines()
        assert len(last) == 2 and last[1].startswith(kept[-1]["time"][:19])
        bad = history("many")
        assert bad.returncode == 1 and bad.stdout.startswith("error: history takes")
        assert first.stop() == 0
    grown = {ns: values(read_sysctl(RMEM, ns)) for ns in (None, hosts.ns)}
    before = trail.read_bytes()
    assert [r["new"] for r in records(trail) if r["tunable"] == RMEM][-1] in grown.values()

    with daemon(tmp_path / "second", "-R", "--audit-file", str(trail), state=state,
                restore=False) as second:
        second.wait_for(r"left sysctl 'net.ipv4.tcp_rmem' changed in global ns")
        # Read from the file: what the first run recorded shows after the restart.
        rows = [line.split() for line in history("10000").stdout.splitlines()[1:]]
        assert [r[1] for r in rows] == [r["kind"] for r in records(trail)]
        # a verdict per verified change (bpftune.verify); nothing reverted
        assert {r["kind"] for r in records(trail)} <= {"change", "verdict"}
        assert second.stop() == 0
    assert trail.read_bytes().startswith(before), "the daemon never rewrites a record"
    added = records(trail)[len(before.splitlines()):]
    # Adopted changes are not recorded again; their rollback is.
    assert {r["kind"] for r in added} == {"rollback"}
    assert {r["pid"] for r in added} == {second.proc.pid}
    for ns, name in ((None, "global"), (hosts.ns, hosts.ns)):
        (back,) = [r for r in added if r["tunable"] == RMEM and r["netns"] == name]
        assert back["old"] == grown[ns] and back["new"] == squeezed[ns][RMEM]
        assert back["tuner"] == "tcp_buffer"
        assert values(read_sysctl(RMEM, ns)) == squeezed[ns][RMEM]


def test_administrator_hand_overs_are_recorded(tmp_path, sysctls, hosts):
    trail = tmp_path / "audit.jsonl"
    sysctls.remember(RMEM, hosts.ns)
    sysctls.remember(WMEM)
    with daemon(tmp_path, "-d", "--audit-file", str(trail)) as d:
        subprocess.run(["ip", "netns", "exec", hosts.ns, "sysctl", "-qw",
                        f"{RMEM}=4096 131072 131073"], check=True)
        there = wait_for_record(trail, kind="hand_over", tuner="tcp_buffer", netns=hosts.ns)
        assert there["tunable"] == RMEM and there["cookie"] == netns_cookie(hosts.ns)
        assert there["new"] == [4096, 131072, 131073] and there["old"] is None
        assert f"modified sysctl '{RMEM}' that tuner 'tcp_buffer' uses" in there["reason"]
        assert there["pid"] == d.proc.pid
        subprocess.run(["sysctl", "-qw", f"{WMEM}=4096 16384 16385"], check=True)
        here = wait_for_record(trail, kind="hand_over", tuner="tcp_buffer", netns="global")
        assert here["tunable"] == WMEM and here["cookie"] == 0
        assert here["new"] == [4096, 16384, 16385]
        rows = [line.split() for line in history().stdout.splitlines()]
        assert ["hand_over", "tcp_buffer", RMEM, hosts.ns] in [r[1:5] for r in rows]
        assert ["hand_over", "tcp_buffer", WMEM, "global"] in [r[1:5] for r in rows]
    if not os.path.exists(JOURNAL_SOCKET):
        assert d.log.count("audit trail: journald is not running") == 1


def test_an_unwritable_trail_is_one_error_line_and_tuning_goes_on(tmp_path, sysctls, hosts):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    trail = not_a_dir / "audit.jsonl"
    squeezed = {ns: squeeze_buffers(sysctls, ns) for ns in (None, hosts.ns)}
    with daemon(tmp_path, "--audit-file", str(trail)) as d:
        grow_buffers(hosts, squeezed)
        assert wait_until(lambda: values(read_sysctl(WMEM))[2] > squeezed[None][WMEM][2])
        assert d.log.count("Scenario 'need to increase TCP buffer size(s)'") >= 2
        (error,) = [line for line in d.log.splitlines() if "audit trail" in line]
        assert error.startswith(f"bpftune: cannot write audit trail '{trail}': [Errno ")
        assert error.endswith("; bpftune keeps tuning, without it")
        shown = history()
        assert shown.returncode == 1
        assert shown.stdout.startswith(f"error: cannot read audit trail '{trail}'")
        assert d.proc.poll() is None
    assert "Traceback" not in d.log
    assert not_a_dir.read_text() == ""


# AuditTrail on its own.
def test_rotation_keeps_whole_records_up_to_the_backups(tmp_path):
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(str(path), max_bytes=2000, backups=3)
    for n in range(200):
        trail.record("change", tuner="t", tunable="net.x", old=(1, n), new=(2, n), n=n)
    files = [path, *(Path(f"{path}.{i}") for i in (1, 2, 3))]
    assert all(f.exists() for f in files) and not Path(f"{path}.4").exists()
    kept: list[int] = []
    for f in reversed(files):  # oldest first
        data = f.read_bytes()
        assert len(data) <= 2000 and data.endswith(b"\n")
        kept += [json.loads(line)["n"] for line in data.splitlines()]
    # Nothing lost or repeated between the files kept: the newest records, in order.
    assert kept == list(range(200 - len(kept), 200)) and len(kept) > 30
    assert [r["n"] for r in trail.history(1000)] == kept
    assert [r["n"] for r in trail.history(5)] == [195, 196, 197, 198, 199]
    assert trail.history(0) == []
    assert oct(path.stat().st_mode & 0o777) == "0o640"


def test_a_torn_line_is_skipped_and_the_next_record_starts_a_line(tmp_path):
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(str(path))
    trail.record("change", tuner="t", new="bbr")
    trail.close()
    with open(path, "a") as f:
        f.write('{"kind":"change","tuner":"torn by a cra')  # a write cut short
    trail = AuditTrail(str(path))
    trail.record("rollback", tuner="t", new="cubic")
    assert [(r["kind"], r["new"]) for r in trail.history(10)] == [("change", "bbr"),
                                                                  ("rollback", "cubic")]
    assert len(path.read_text().splitlines()) == 3


def test_a_file_rotated_by_someone_else_is_started_anew(tmp_path):
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(str(path), backups=1)
    trail.record("change", tuner="t", n=1)
    path.rename(f"{path}.1")  # logrotate
    trail.record("change", tuner="t", n=2)
    assert [r["n"] for r in records(path)] == [2]
    assert [r["n"] for r in trail.history(5)] == [1, 2]


def test_write_errors_are_logged_once_and_recovery_with_the_records_lost(tmp_path,
                                                                         monkeypatch):
    blocker = tmp_path / "dir"
    blocker.write_text("")  # a file where the trail's directory should be
    path = blocker / "audit.jsonl"
    trail = AuditTrail(str(path))
    out = io.StringIO()
    monkeypatch.setattr(log, "stream", out)
    monkeypatch.setattr(log, "use_syslog", False)
    for n in range(3):
        trail.record("change", tuner="t", n=n)
    blocker.unlink()
    blocker.mkdir()
    trail.record("change", tuner="t", n=3)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"bpftune: cannot write audit trail '{path}'")
    assert lines[1] == f"bpftune: audit trail '{path}' is written again; 3 records were lost"
    assert [r["n"] for r in trail.history(10)] == [3]


# journald, where this machine can run it.
@contextlib.contextmanager
def private_journald(tmp_path: Path) -> Iterator[int]:
    """systemd-journald as a process of the test's own, in a mount namespace of its own
    (tmpfs on /run/systemd, /run/log and /var/log/journal, so nothing it writes reaches the
    host): its socket is /run/systemd/journal/socket there. Yields its pid; stopped after
    (by pid), and the namespace goes with the last process in it."""
    script = ("mount -t tmpfs tmpfs /run/systemd && mount -t tmpfs tmpfs /run/log && "
              "mount -t tmpfs tmpfs /var/log/journal && exec " + JOURNALD)
    log = open(tmp_path / "journald.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "slave", "sh", "-c",
                             script], stdout=log, stderr=log)
    try:
        socket = Path(f"/proc/{proc.pid}/root{JOURNAL_SOCKET}")
        if not wait_until(lambda: socket.exists() or proc.poll() is not None, timeout=10) \
                or proc.poll() is not None:
            pytest.skip(f"systemd-journald cannot run here: "
                        f"{(tmp_path / 'journald.log').read_text()}")
        yield proc.pid
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=10)
        log.close()


def journal(pid: int) -> list[dict]:
    out = subprocess.run(["nsenter", f"--mount=/proc/{pid}/ns/mnt", "journalctl", "-o",
                          "json", "--no-pager", "SYSLOG_IDENTIFIER=bpftune"],
                         capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines()]


@pytest.mark.skipif(not os.path.exists(JOURNALD) or not shutil.which("journalctl"),
                    reason="systemd-journald is not installed")
def test_records_go_to_journald_as_structured_fields(tmp_path, sysctls, hosts):
    pytest.importorskip("systemd.journal", reason="python3-systemd is not installed")
    trail = tmp_path / "audit.jsonl"
    sysctls.remember(RMEM, hosts.ns)
    with private_journald(tmp_path) as journald, \
            daemon(tmp_path, "--audit-file", str(trail),
                   prefix=["nsenter", f"--mount=/proc/{journald}/ns/mnt"]) as d:
        subprocess.run(["ip", "netns", "exec", hosts.ns, "sysctl", "-qw",
                        f"{RMEM}=4096 131072 131073"], check=True)
        record = wait_for_record(trail, kind="hand_over", netns=hosts.ns)
        entries: list[dict] = []

        def sent() -> bool:
            entries[:] = [e for e in journal(journald) if e.get("BPFTUNE_KIND") == "hand_over"]
            return bool(entries)

        assert wait_until(sent, timeout=10)
        (entry,) = entries
        assert entry["_PID"] == str(d.proc.pid) and entry["PRIORITY"] == "5"
        assert entry["BPFTUNE_TUNER"] == record["tuner"] == "tcp_buffer"
        assert entry["BPFTUNE_TUNABLE"] == RMEM and entry["BPFTUNE_NETNS"] == hosts.ns
        assert entry["BPFTUNE_COOKIE"] == str(netns_cookie(hosts.ns))
        assert entry["BPFTUNE_NEW"] == "4096 131072 131073" and "BPFTUNE_OLD" not in entry
        assert entry["BPFTUNE_REASON"] == record["reason"]
        assert entry["BPFTUNE_TIME"] == record["time"]
        assert entry["MESSAGE"] == (f"hand_over by 'tcp_buffer': '{RMEM}' in netns {hosts.ns} "
                                    f"(-) -> (4096 131072 131073): {record['reason']}")
        assert "\n" not in entry["MESSAGE"]
        assert "journald is not running" not in d.log
