"""tcp_buffer and lightly used connections: every connection's send buffer is looked at once,
at connection setup, after the kernel sized it.

The hot send hooks (sendmsg, or every incoming segment) look at one call in 16, per CPU, and
calls from every process on the host count: a namespace whose only traffic is a control
connection (a few small messages) was tuned only if one of its calls happened to be the one
looked at. Upstream sees every connection at setup (it hooks tcp_sndbuf_expand, which
tcp_init_buffer_space calls); so do we, with a sockops program.

Several namespaces, each with one control connection only: the sampled hooks alone see at
most the first call on each CPU after they load, and fewer than 16 calls per namespace,
so at least some of these namespaces would stay untuned.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from helpers import Hosts, daemon, ns_prefix, read_sysctl, values, wait_until

WMEM = "net.ipv4.tcp_wmem"
# A connection starts with tcp_wmem[1], 4 KiB; sizing at setup wants ten segments' worth
# (over 100 KiB on the veths), more than the max allows: so its buffer is at the max only
# once sized, which a look before sizing (at the ESTABLISHED callbacks, or at
# tcp_sndbuf_expand's entry, as upstream does) would miss.
SMALL_WMEM = "4096 4096 16384"
NAMESPACES = 4
MESSAGES = 3  # each way: fewer than 16 sendmsg calls per connection and side
PORT = 5301

SERVER = textwrap.dedent("""\
    import socket, sys
    with socket.create_server((sys.argv[1], int(sys.argv[2]))) as server:
        print("ready", flush=True)
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(64):
                conn.sendall(b"ok " + data)
    """)
CLIENT = textwrap.dedent("""\
    import socket, sys
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as s:
        for i in range(int(sys.argv[3])):
            s.sendall(b"status %d" % i)
            assert s.recv(64).startswith(b"ok")
    """)


@pytest.fixture
def lightly_used(hosts: Hosts) -> Iterator[list[Hosts]]:
    """The ``hosts`` namespace and more like it, each joined to the global one by its own
    veth pair; all deleted afterwards."""
    created = [hosts]
    try:
        for i in range(1, NAMESPACES):
            more = Hosts(ns=f"{hosts.ns}-{i}", global_addr=f"10.231.{20 + i}.1",
                         ns_addr=f"10.231.{20 + i}.2", global_if=f"btsu{i}a",
                         ns_if=f"btsu{i}b")
            more.create()
            created.append(more)
        yield created
    finally:
        for more in created[1:]:
            more.destroy()


def control_connection(hosts: Hosts, side: str) -> None:
    """One TCP connection between the global namespace and ``hosts.ns`` exchanging
    MESSAGES small messages each way; the namespace connects ("active") or accepts
    ("passive")."""
    server_ns, addr = (None, hosts.global_addr) if side == "active" else (hosts.ns, hosts.ns_addr)
    client_ns = hosts.ns if side == "active" else None
    server = subprocess.Popen([*ns_prefix(server_ns), sys.executable, "-c", SERVER, addr,
                               str(PORT)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        subprocess.run([*ns_prefix(client_ns), sys.executable, "-c", CLIENT, addr, str(PORT),
                        str(MESSAGES)], check=True, timeout=30)
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        server.stdout.close()


def wmem_max(ns: str) -> int:
    return values(read_sysctl(WMEM, ns))[2]


@pytest.mark.parametrize("side", ["active", "passive"])
def test_a_namespace_with_only_a_control_connection_gets_its_wmem_max_grown(
        tmp_path, sysctls, lightly_used, carried_state, side):
    for h in lightly_used:
        sysctls.set(WMEM, SMALL_WMEM, h.ns)
    small = values(SMALL_WMEM)[2]
    with daemon(tmp_path, state=carried_state) as d:
        untuned = []
        for h in lightly_used:
            control_connection(h, side)
            if not wait_until(lambda ns=h.ns: wmem_max(ns) > small, timeout=10):
                untuned.append(h.ns)
        assert not untuned, f"tcp_wmem max did not grow in {untuned} ({side} side)"
        d.stop()
    assert "sock_ops/connection_setup" in d.log
    grown = re.findall(r"Scenario 'need to increase TCP buffer size\(s\)' occurred for tunable "
                       r"'net\.ipv4\.tcp_wmem' in non-global ns\.", d.log)
    assert len(grown) >= NAMESPACES


# The hooks chosen here and on every kernel that refuses fentry.
PLANS = {"without-fentry": ({}, ["rcv_space_sample", "sndbuf_sample"])}


@pytest.mark.parametrize("plan", PLANS)
def test_exit_summary_reports_each_sampled_hook(tmp_path, hosts, carried_state, plan):
    env, samples = PLANS[plan]
    with daemon(tmp_path, env=env, state=carried_state) as d:
        control_connection(hosts, "active")
        assert d.stop() == 0
    for sample in samples:
        found = re.findall(rf"Sample '{sample}': associated program was called (\d+) times, "
                           rf"collected data every 16 of these\.", d.log)
        assert len(found) == 1, d.log
        assert int(found[0]) > 0
    unsampled = {"rcv_space_sample", "sndbuf_sample"} - set(samples)  # e.g. tcp_rcvbuf_grow
    assert not [s for s in unsampled if f"Sample '{s}'" in d.log]
