"""-R rolls back every change on exit; after kill -9 the next run reports and rolls back."""

from __future__ import annotations

import json
import signal
import subprocess

from helpers import Iperf, daemon, read_sysctl, values, wait_until
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
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert state["records"] == []


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
    recorded = json.loads((tmp_path / "state" / "state.json").read_text())["records"]
    assert {(r["tunable"], r["cookie"] != 0) for r in recorded} >= {(RMEM, False), (RMEM, True)}

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
