"""tcp_buffer and SYN floods, with real SYNs into a test namespace's listeners.

A flood comes from hping3 in the global netns, with a source address nobody has: in the
test namespace that address is reached on the veth through a permanent neighbour entry with
a MAC nobody has, so the listener's SYN-ACKs (and their retransmissions, which the tuner's
hook sees) go out on the veth and the global end drops them as not its own. Nothing answers
them and nothing leaves the veth pair. A storm is many real clients in the global netns,
each connecting and being accepted.

The daemons share one state directory (``carried_state``), as runs on a host do.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from helpers import Hosts, daemon, ns_prefix, read_sysctl, wait_until

BACKLOG, SYNCOOKIES = "net.ipv4.tcp_max_syn_backlog", "net.ipv4.tcp_syncookies"
NO_METRICS_SAVE = "net.ipv4.tcp_no_metrics_save"
PORT = 8631
SPOOFED, NOBODYS_MAC = "10.231.9.9", "02:00:00:00:09:09"
DECREASE = ("Scenario 'decrease maximum syn backlog due to large numbers of uncompleted "
            "connections' occurred for tunable 'net.ipv4.tcp_max_syn_backlog' in non-global ns")
INCREASE = ("Scenario 'increase maximum syn backlog under load since syncookies are disabled' "
            "occurred for tunable 'net.ipv4.tcp_max_syn_backlog' in non-global ns")
REDUCE_LINE = ("Due to SYN flood not correlated with TCP connection acceptance - suggesting an "
               "attack - reduce 'net.ipv4.tcp_max_syn_backlog' from {} -> {}")
INCREASE_LINE = ("Due to SYN flood events on a system with TCP syncookies disabled and no low "
                 "memory issues, increase 'net.ipv4.tcp_max_syn_backlog'")

# A listener that accepts and answers every connection; with TCP_DEFER_ACCEPT it keeps
# each in the SYN queue until the client's second ACK (see the storm test).
SERVER = textwrap.dedent("""\
    import socket, sys
    port, backlog, defer = (int(a) for a in sys.argv[1:])
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if defer:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, defer)
    s.bind(("0.0.0.0", port))
    s.listen(backlog)
    while True:
        c, _ = s.accept()
        try:
            c.sendall(b"x")
        except OSError:
            pass
        c.close()
    """)

# ``rate`` new clients a second for ``seconds``, all at once in flight: each connects, reads
# the server's byte and closes. Prints how many got it and how many failed.
CLIENTS = textwrap.dedent("""\
    import asyncio, resource, sys, time
    addr, port, rate, seconds = sys.argv[1], *(int(a) for a in sys.argv[2:])
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    done = {"ok": 0, "failed": 0}

    async def client():
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(addr, port), 60)
            got = await asyncio.wait_for(reader.read(1), 60)
            writer.close()
            done["ok" if got == b"x" else "failed"] += 1
        except (OSError, asyncio.TimeoutError):
            done["failed"] += 1

    async def main():
        tasks, start = [], time.monotonic()
        while len(tasks) < rate * seconds:
            due = min(int((time.monotonic() - start) * rate), rate * seconds)
            tasks += [asyncio.ensure_future(client()) for _ in range(due - len(tasks))]
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)

    asyncio.run(main())
    print(done["ok"], done["failed"])
    """)


def counters(ns: str) -> dict[str, int]:
    """The namespace's TcpExt and Tcp counters, e.g. ``TcpExt:ListenDrops``."""
    found = {}
    for path in ("/proc/net/netstat", "/proc/net/snmp"):
        lines = subprocess.run([*ns_prefix(ns), "cat", path], check=True, capture_output=True,
                               text=True).stdout.splitlines()
        for header, numbers in zip(lines[::2], lines[1::2], strict=True):
            prefix, *names = header.split()
            found.update({f"{prefix}{n}": int(v)
                          for n, v in zip(names, numbers.split()[1:], strict=True)})
    return found


def grew(before: dict[str, int], after: dict[str, int], name: str) -> int:
    return after[name] - before[name]


def backlog(ns: str) -> int:
    return int(read_sysctl(BACKLOG, ns))


def listening(ns: str, port: int) -> bool:
    out = subprocess.run([*ns_prefix(ns), "ss", "-Hltn", f"sport = :{port}"], check=True,
                         capture_output=True, text=True).stdout
    return bool(out.strip())


@contextmanager
def started(cmd: list[str], ns: str | None = None) -> Iterator[subprocess.Popen]:
    """A process (in ``ns``), ended by its PID afterwards."""
    proc = subprocess.Popen([*ns_prefix(ns), *cmd], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def listener(ns: str, backlog: int, defer_accept: int = 0) -> Iterator[None]:
    cmd = [sys.executable, "-c", SERVER, str(PORT), str(backlog), str(defer_accept)]
    with started(cmd, ns):
        assert wait_until(lambda: listening(ns, PORT)), "the listener did not start"
        yield


@contextmanager
def http_server(ns: str, directory: Path) -> Iterator[None]:
    """python's http.server: its listen() backlog is 5 (socketserver's request_queue_size)."""
    with started([sys.executable, "-m", "http.server", "-d", str(directory), str(PORT)], ns):
        assert wait_until(lambda: listening(ns, PORT)), "http.server did not start"
        yield


@contextmanager
def spoofed_flood(hosts: Hosts, pps: int = 1000) -> Iterator[None]:
    """hping3 SYNs from the global netns to the namespace's listener, from SPOOFED."""
    for cmd in (["ip", "route", "add", f"{SPOOFED}/32", "dev", hosts.ns_if],
                ["ip", "neigh", "add", SPOOFED, "lladdr", NOBODYS_MAC, "dev", hosts.ns_if,
                 "nud", "permanent"]):
        subprocess.run([*ns_prefix(hosts.ns), *cmd], check=True)
    with started(["/usr/sbin/hping3", "-q", "-S", "-p", str(PORT), "-a", SPOOFED,
                  "-i", f"u{1000000 // pps}", hosts.ns_addr]):
        yield


def syn_backlog_drops(before: dict[str, int], after: dict[str, int]) -> int:
    """SYNs dropped at tcp_max_syn_backlog: the listen drops that were neither at a listen
    backlog (TCPReqQFullDrop) nor for a full accept queue (ListenOverflows)."""
    return (grew(before, after, "TcpExt:ListenDrops")
            - grew(before, after, "TcpExt:TCPReqQFullDrop")
            - grew(before, after, "TcpExt:ListenOverflows"))


def test_syn_flood_shrinks_the_syn_backlog(tmp_path, sysctls, hosts, carried_state):
    """hping3 floods a listener (listen backlog 1024) with syncookies off: the kernel keeps
    193 of tcp_max_syn_backlog 256 half-open and drops the rest, and no connection is ever
    accepted. bpftune must shrink the backlog step by step down to 128, and never grow it."""
    sysctls.set(SYNCOOKIES, "0", hosts.ns)
    sysctls.set(BACKLOG, "256", hosts.ns)
    before = counters(hosts.ns)
    with listener(hosts.ns, backlog=1024), daemon(tmp_path, state=carried_state) as d:
        with spoofed_flood(hosts):
            assert wait_until(lambda: backlog(hosts.ns) == 128, timeout=60), d.log
        d.stop()
    after = counters(hosts.ns)
    assert syn_backlog_drops(before, after) > 0
    assert grew(before, after, "Tcp:PassiveOpens") == 0
    log = d.log
    assert DECREASE in log
    assert REDUCE_LINE.format(256, 192) in log
    assert re.search(rf"SYN flood in netns {hosts.ns}: \d+ SYNs refused \(\d+ at "
                     rf"tcp_max_syn_backlog, 0 at listen backlogs\), 0 connections accepted",
                     log), log
    assert INCREASE not in log, "the backlog grew under an attack"


def test_connection_storm_grows_the_syn_backlog(tmp_path, sysctls, hosts, carried_state):
    """Real clients, 400 new ones a second for 12 s, each accepted: a storm, not an attack.

    Over a veth a handshake takes some 50 us, so no client rate fills a SYN queue; on real
    networks round trips of hundreds of ms do. The listener gets the same from
    TCP_DEFER_ACCEPT (as nginx's "deferred"): it keeps each connection in the SYN queue
    until the client's ACK of a SYN-ACK retransmitted after 1 s. 400 a second then need
    400 places, and the kernel drops SYNs beyond 193 (3/4 of 256); a client whose SYN was
    dropped retries. All the clients have one address, and the kernel never drops a SYN
    from a peer it has TCP metrics for (tcp_peer_is_proven): without tcp_no_metrics_save,
    the first connection closed would exempt every later one, which a storm from many
    clients does not enjoy. bpftune must grow tcp_max_syn_backlog, never shrink it.

    The daemon runs at learning rate 2 (steps of 1/16): the kernel never lets the queue get
    fuller than 3/4, so a "within 1/16 of the limit" test would never see it full."""
    sysctls.set(SYNCOOKIES, "0", hosts.ns)
    sysctls.set(BACKLOG, "256", hosts.ns)
    sysctls.set(NO_METRICS_SAVE, "1", hosts.ns)
    before = counters(hosts.ns)
    with listener(hosts.ns, backlog=4096, defer_accept=1), \
            daemon(tmp_path, "-r", "2", state=carried_state) as d:
        storm = subprocess.run([sys.executable, "-c", CLIENTS, hosts.ns_addr, str(PORT),
                                "400", "12"], check=True, capture_output=True, text=True,
                               timeout=300)
        grown = backlog(hosts.ns)
        d.stop()
    after = counters(hosts.ns)
    ok, failed = (int(n) for n in storm.stdout.split())
    assert (ok, failed) == (4800, 0)
    # The queue was really at tcp_max_syn_backlog: SYNs were dropped there.
    assert syn_backlog_drops(before, after) > 0
    assert grew(before, after, "Tcp:PassiveOpens") == ok
    log = d.log
    assert INCREASE in log and INCREASE_LINE in log
    assert DECREASE not in log, "the backlog shrank under legitimate load"
    assert grown > 256


@pytest.mark.parametrize("syncookies", [0, 1])
def test_flood_against_a_small_listen_backlog_is_seen(tmp_path, sysctls, hosts, carried_state,
                                                      syncookies):
    """http.server listens with a backlog of 5: a flood fills its SYN queue at 5, far below
    tcp_max_syn_backlog, and the kernel refuses every further SYN at that limit (with
    syncookies on it answers them with cookies). bpftune must see the flood; with syncookies
    off it shrinks tcp_max_syn_backlog (the limit for every other listener in the namespace),
    with them on it has nothing to change."""
    sysctls.set(SYNCOOKIES, str(syncookies), hosts.ns)
    sysctls.set(BACKLOG, "256", hosts.ns)
    before = counters(hosts.ns)
    with http_server(hosts.ns, tmp_path), daemon(tmp_path, state=carried_state) as d:
        with spoofed_flood(hosts):
            d.wait_for(rf"SYN flood in netns {hosts.ns}: \d+ SYNs refused \(0 at "
                       rf"tcp_max_syn_backlog, \d+ at listen backlogs\), 0 connections "
                       rf"accepted in 3 s, [5-9] half-open", timeout=60)
            if not syncookies:
                assert wait_until(lambda: backlog(hosts.ns) == 128, timeout=60), d.log
        d.stop()
    after = counters(hosts.ns)
    refused = "TcpExt:TCPReqQFullDoCookies" if syncookies else "TcpExt:TCPReqQFullDrop"
    assert grew(before, after, refused) > 0
    if syncookies:
        assert backlog(hosts.ns) == 256
        assert read_sysctl(SYNCOOKIES, hosts.ns) == "1"
    else:
        assert REDUCE_LINE.format(256, 192) in d.log
    assert INCREASE not in d.log
