"""The query interface: upstream's queries and formats, the JSON state, bad requests."""

from __future__ import annotations

import grp
import json
import os
import re
import socket
import stat
import subprocess
import time

import pytest

from helpers import BPFTUNE, daemon, read_sysctl, transfer_both_ways
from test_tcp_buffer import RMEM, squeeze_buffers

SOCKET = "/run/bpftune/query.sock"


def query(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([BPFTUNE, "-q", *args], capture_output=True, text=True, timeout=30)


def raw(payload: bytes, path: str = SOCKET) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A daemon that has changed tcp_rmem in the global netns and in a test netns."""
    from helpers import Hosts, Sysctls

    tmp = tmp_path_factory.mktemp("query")
    sysctls, hosts = Sysctls(), Hosts(ns="bpftune-query")
    hosts.create()
    try:
        for ns in (None, hosts.ns):
            squeeze_buffers(sysctls, ns)
        with daemon(tmp, "-p", "5301") as d:
            transfer_both_ways(hosts)
            yield d, hosts
    finally:
        hosts.destroy()
        sysctls.restore()


def test_help_lists_every_query_in_upstream_format(tuned):
    r = query("help")
    assert r.returncode == 0
    lines = r.stdout.rstrip("\n").splitlines()
    names = [line.split()[0] for line in lines]
    assert names == ["help", "tuners", "tunables", "jtunables", "summary", "status", "jstatus",
                     "rollback", "state", "jadvice", "advice", "history", "enable"]
    assert lines[0] == f"{'help':>20} {'list supported queries':>40}"
    assert lines[-1] == f"{'enable TUNER [NETNS]':>20} {'re-enable a tuner handed over (root)':>40}"


def test_tuners_and_tunables(tuned):
    assert f"{'tcp_buffer':>20} {'active':>20}" in query("tuners").stdout.splitlines()
    assert (f"{'tcp_buffer':>16} {'net.ipv4.tcp_rmem':>50} {'integer':>8}  3"
            in query("tunables").stdout.splitlines())


def test_jtunables_and_jstatus_are_json_with_live_values(tuned):
    tunables = json.loads(query("jtunables").stdout)
    assert tunables["tcp_buffer"]["net.ipv4.tcp_rmem"] == {"type": "integer", "num_values": 3}
    assert tunables["sysctl"] == {}
    status = json.loads(query("jstatus").stdout)
    assert status["tcp_buffer"]["net.ipv4.tcp_rmem"] == [int(v) for v in
                                                         read_sysctl(RMEM).split()]
    assert status["tcp_buffer"]["net.ipv4.tcp_moderate_rcvbuf"] == 1


def test_status_shows_live_values(tuned):
    line = f"{'tcp_buffer':>16} {RMEM:>50} {read_sysctl(RMEM):>34}"
    assert line in query("status").stdout.splitlines()


def test_summary_and_rollback_name_the_changes_with_commands(tuned):
    _, hosts = tuned
    summary = query("summary").stdout
    assert summary.startswith("# Summary of changes made across all tuners:\n")
    assert "# Summary: scenario 'need to increase TCP buffer size(s)' occurred" in summary
    assert f"# sysctl '{RMEM}' changed from (4096 131072 131072) -> (" in summary
    rollback = query("rollback").stdout.splitlines()
    assert rollback[0] == ("# Summary of rollback operations needed to restore original "
                           "state for all tuners:")
    assert f'sysctl -w {RMEM}="4096 131072 131072"' in rollback
    assert f'ip netns exec {hosts.ns} sysctl -w {RMEM}="4096 131072 131072"' in rollback


def test_state_is_complete_json(tuned):
    d, hosts = tuned
    state = json.loads(query("state").stdout)
    assert state["daemon"]["pid"] == d.proc.pid
    assert state["daemon"]["events_received"] > 0
    assert state["daemon"]["bpf_programs"] >= 6
    assert state["daemon"]["rss_bytes"] > 0 and state["daemon"]["cpu_seconds"] > 0
    names = {v["name"] for v in state["netns"].values()}
    assert {"global", hosts.ns} <= names
    (tcp,) = [t for t in state["tuners"] if t["name"] == "tcp_buffer"]
    assert tcp["state"] == "active" and tcp["cluster"] == 10
    (rmem,) = [t for t in tcp["tunables"] if t["name"] == RMEM]
    assert rmem["positions"] == ["min", "default", "max"] and rmem["unit"] == "bytes"
    assert rmem["netns"]["0"]["original"] == [4096, 131072, 131072]
    assert rmem["netns"]["0"]["current"] == [int(v) for v in read_sysctl(RMEM).split()]
    assert rmem["netns"]["0"]["changes"] >= 1 and rmem["netns"]["0"]["last_change"] > 0
    increase = tcp["scenarios"][0]
    assert increase["name"] == "need to increase TCP buffer size(s)"
    assert increase["counts"]["0"] >= 1 and len(increase["counts"]) == 2


@pytest.mark.parametrize(("payload", "reply"), [
    (b"x" * 300, b"error: request longer than 256 bytes\0"),
    (b"\0", b"error: empty request\0"),
    (b"\xff\xfe\0", b"error: 'utf-8' codec can't decode byte 0xff in position 0: invalid "
                    b"start byte\0"),
    (b"nonsense\0", b"unknown request 'nonsense'; supported requests are:\n"),
])
def test_bad_requests_get_an_error_reply(tuned, payload, reply):
    assert raw(payload).startswith(reply)
    assert query("tuners").returncode == 0  # and the daemon still answers


def test_silent_client_does_not_block_others(tuned):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle:
        idle.connect(SOCKET)
        start = time.monotonic()
        assert query("tuners").returncode == 0
        assert time.monotonic() - start < 3


def test_socket_is_readable_by_pcp_group_only(tuned):
    st = os.stat(SOCKET)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == grp.getgrnam("pcp").gr_gid


def test_port_listens_on_loopback_only(tuned):
    _, hosts = tuned
    r = subprocess.run([BPFTUNE, "-q", "tuners", "-p", "5301"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0 and "tcp_buffer" in r.stdout
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((hosts.global_addr, 5301), timeout=5)


def test_unknown_query_exits_1(tuned):
    r = query("bogus")
    assert r.returncode == 1
    assert re.match(r"unknown request 'bogus'; supported requests are:", r.stdout)
