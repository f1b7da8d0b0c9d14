"""-R rolls back every change on exit; after kill -9 the next run reports and rolls back."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
import uuid

import pytest
from pyroute2 import netns as pyroute2_netns

from helpers import (
    Iperf,
    daemon,
    loopback_namespace,
    netns_cookie,
    read_sysctl,
    recorded,
    values,
    wait_until,
    write_sysctl,
)
from test_tcp_buffer import RMEM, WMEM, squeeze_buffers


def grow_buffers(hosts, iperf: Iperf, squeezed) -> None:
    iperf.run(None, seconds=2)
    iperf.run(None, seconds=2, reverse=True)
    for ns in (None, hosts.ns):
        assert wait_until(lambda s=ns: values(read_sysctl(RMEM, s))[2] > squeezed[s][RMEM][2])


def assert_restored(hosts, squeezed) -> None:
    for ns in (None, hosts.ns):
        for name in (RMEM, WMEM):
            assert values(read_sysctl(name, ns)) == squeezed[ns][name], (name, ns)
        assert read_sysctl("net.ipv4.tcp_moderate_rcvbuf", ns) == "0"


def test_rollback_on_sigterm_restores_global_and_netns_values(tmp_path, sysctls, hosts):
    squeezed = {ns: squeeze_buffers(sysctls, ns) for ns in (None, hosts.ns)}
    iperf = Iperf(hosts.ns, hosts.ns_addr)
    try:
        with daemon(tmp_path, "-R", restore=False) as d:
            grow_buffers(hosts, iperf, squeezed)
            assert d.stop(signal.SIGTERM) == 0
    finally:
        iperf.stop()
    assert "Rolling back sysctl values for 'net.ipv4.tcp_rmem' from (" in d.log
    assert_restored(hosts, squeezed)
    assert recorded(tmp_path / "state") == []


def test_changes_left_by_kill_9_are_reported_and_rolled_back_next_run(tmp_path, sysctls,
                                                                     hosts):
    squeezed = {ns: squeeze_buffers(sysctls, ns) for ns in (None, hosts.ns)}
    iperf = Iperf(hosts.ns, hosts.ns_addr)
    try:
        with daemon(tmp_path, "-R", restore=False) as first:
            grow_buffers(hosts, iperf, squeezed)
            first.stop(signal.SIGKILL)
    finally:
        iperf.stop()
    grown = values(read_sysctl(RMEM))
    assert grown[2] > squeezed[None][RMEM][2], "kill -9 must not roll anything back"
    left = recorded(tmp_path / "state")
    assert {(r["tunable"], r["cookie"] != 0) for r in left} >= {(RMEM, False), (RMEM, True)}

    (tmp_path / "bpftune.log").write_text("")
    with daemon(tmp_path, "-R", restore=False) as second:
        second.wait_for(rf"bpftune \(pid {first.proc.pid}\) left sysctl 'net.ipv4.tcp_rmem' "
                        rf"changed in global ns from \({' '.join(map(str, squeezed[None][RMEM]))}"
                        rf"\) -> \({' '.join(map(str, grown))}\)")
        second.wait_for(r"left sysctl 'net.ipv4.tcp_rmem' changed in netns cookie \d+")
        assert second.stop() == 0
    assert_restored(hosts, squeezed)
    # The killed daemon's cgroup/sysctl program was detached by the second one.
    progs = json.loads(subprocess.run(["bpftool", "-j", "prog", "show"], check=True,
                                      capture_output=True, text=True).stdout)
    assert not [p for p in progs if p.get("name") == "bpftune_sysctl_write"]


def run_until_killed(d, iperf: Iperf) -> None:
    """Move traffic until the daemon kills itself at its crash point."""
    deadline = time.monotonic() + 60
    while d.proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(subprocess.CalledProcessError):
            iperf.run(None, seconds=1)
    assert d.proc.wait(timeout=10) == -signal.SIGKILL, d.log


@pytest.mark.parametrize("point", ["intent", "written", "recorded", "written:3"])
def test_a_crash_at_any_step_of_the_change_path_loses_no_original(tmp_path, sysctls, hosts,
                                                                  point):
    squeezed = {ns: squeeze_buffers(sysctls, ns) for ns in (None, hosts.ns)}
    iperf = Iperf(hosts.ns, hosts.ns_addr)
    try:
        with daemon(tmp_path, "-R", restore=False,
                    env={"BPFTUNE_TEST_CRASH_AT": point}) as first:
            run_until_killed(first, iperf)
    finally:
        iperf.stop()
    if point.startswith("written"):  # killed after writing, before recording the write
        assert any(r["intended"] for r in recorded(tmp_path / "state"))
    (tmp_path / "bpftune.log").write_text("")
    with daemon(tmp_path, "-R", restore=False) as second:
        assert second.stop() == 0
    assert_restored(hosts, squeezed)
    assert recorded(tmp_path / "state") == []


def test_a_kept_change_an_administrator_overrode_is_not_restored_later(tmp_path, sysctls,
                                                                        hosts):
    squeezed = {ns: squeeze_buffers(sysctls, ns) for ns in (None, hosts.ns)}
    iperf = Iperf(hosts.ns, hosts.ns_addr)
    try:
        with daemon(tmp_path, restore=False) as first:  # no -R: changes are kept
            grow_buffers(hosts, iperf, squeezed)
            assert first.stop() == 0
    finally:
        iperf.stop()
    lo, default, _ = squeezed[None][RMEM]
    admin = f"{lo} {default} 16384"
    write_sysctl(RMEM, admin)  # while bpftune is not running
    (tmp_path / "bpftune.log").write_text("")
    with daemon(tmp_path, "-R", restore=False) as second:
        second.wait_for(r"sysctl 'net.ipv4.tcp_rmem' in global ns is \(" + admin
                        + r"\), not the \(.*\) bpftune \(pid \d+\) set: an administrator "
                        r"changed it since")
        assert second.stop() == 0
    assert read_sysctl(RMEM) == admin
    assert values(read_sysctl(RMEM, hosts.ns)) == squeezed[hosts.ns][RMEM]


def test_an_administrator_taking_one_tunable_leaves_the_others_to_roll_back(tmp_path,
                                                                            sysctls, hosts):
    squeezed = {ns: squeeze_buffers(sysctls, ns) for ns in (None, hosts.ns)}
    iperf = Iperf(hosts.ns, hosts.ns_addr)
    try:
        with daemon(tmp_path, "-R", restore=False) as d:
            grow_buffers(hosts, iperf, squeezed)
            assert wait_until(lambda: values(read_sysctl(WMEM))[2] > squeezed[None][WMEM][2])
            lo, default, _ = squeezed[None][WMEM]
            admin = f"{lo} {default} 32768"
            subprocess.run(["sysctl", "-q", "-w", f"{WMEM}={admin}"], check=True)
            d.wait_for("disabling 'tcp_buffer'")
            d.wait_for(r"Rolling back sysctl values for 'net.ipv4.tcp_rmem' from \(")
            assert d.stop() == 0
    finally:
        iperf.stop()
    assert read_sysctl(WMEM) == admin
    assert values(read_sysctl(RMEM)) == squeezed[None][RMEM]
    assert values(read_sysctl(RMEM, hosts.ns)) == squeezed[hosts.ns][RMEM]
    assert read_sysctl("net.ipv4.tcp_moderate_rcvbuf") == "0"


def grow_rmem_in(ns: str | None, port: int, squeezed: list[int]) -> None:
    iperf = Iperf(ns, "127.0.0.1", port=port)
    try:
        iperf.run(ns, seconds=2)
    finally:
        iperf.stop()
    assert wait_until(lambda: values(read_sysctl(RMEM, ns))[2] > squeezed[2]), ns


def test_summary_tells_this_runs_changes_from_what_earlier_runs_left(tmp_path, sysctls, hosts,
                                                                     carried_state):
    """A first run tunes three namespaces and exits without -R, so its changes stay. One
    namespace is deleted before the second run, one while it runs. The second run tunes
    the global netns: its summary names that as its change, what the first run left in the
    namespace still there as a leftover, and nothing about the namespaces that are gone."""
    tag = uuid.uuid4().hex[:6]
    with loopback_namespace(f"bpftune-before-{tag}") as gone_before, \
            loopback_namespace(f"bpftune-during-{tag}") as gone_during:
        spaces = (hosts.ns, gone_before, gone_during)
        squeezed = {ns: squeeze_buffers(sysctls, ns)[RMEM] for ns in (None, *spaces)}
        cookies = {ns: netns_cookie(ns) for ns in spaces}
        with daemon(tmp_path / "first", state=carried_state) as first:
            for port, ns in enumerate(spaces, start=5301):
                grow_rmem_in(ns, port, squeezed[ns])
            first.stop()
        left = read_sysctl(RMEM, hosts.ns)
        pyroute2_netns.remove(gone_before)
        with daemon(tmp_path / "second", state=carried_state) as second:
            second.wait_for(rf"left sysctl '{RMEM}' changed in netns cookie "
                            rf"{cookies[gone_during]}")
            pyroute2_netns.remove(gone_during)
            grow_rmem_in(None, 5300, squeezed[None])
            time.sleep(2)  # the daemon sees the namespace go
            second.stop()
    summary = second.log[second.log.index("# Summary"):]
    assert (f"# sysctl '{RMEM}' changed from ({' '.join(map(str, squeezed[None]))}) -> ("
            in summary), summary
    assert (f"# sysctl '{RMEM}' was left changed by an earlier run (pid {first.proc.pid}) "
            f"from ({' '.join(map(str, squeezed[hosts.ns]))}) -> ({left}) in netns cookie "
            f"{cookies[hosts.ns]}\n" in summary), summary
    this_run = [line for line in summary.splitlines() if "' changed from (" in line]
    assert not [line for line in this_run if line.endswith(f"cookie {cookies[hosts.ns]}")]
    for ns in (gone_before, gone_during):
        assert f"netns cookie {cookies[ns]}" not in summary, (ns, summary)
