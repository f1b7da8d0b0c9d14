"""Handing a tuner back: ``bpftune -E TUNER [--netns NAME|COOKIE]`` re-enables a tuner an
administrator took over, with the values live then as its new baseline; only root may."""

from __future__ import annotations

import grp
import json
import os
import re
import subprocess
import uuid
from pathlib import Path

import pytest
from test_audit import records

from helpers import (
    BPFTUNE,
    Hosts,
    Iperf,
    daemon,
    loopback_namespace,
    netns_cookie,
    ns_prefix,
    read_sysctl,
    recorded,
    values,
    wait_until,
)
from test_tcp_buffer import RMEM, WMEM, squeeze_buffers

UDP_MEM = "net.ipv4.udp_mem"
HIGH_ORDER = "net.core.high_order_alloc_disable"
QUERY_PORT = 5341
IPERF_PORT = 5343


def bpftune(*args: str, prefix: list[str] | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*(prefix or []), BPFTUNE, *args], capture_output=True, text=True,
                          timeout=150, env=dict(os.environ, **(env or {})))


def tuner_state(name: str) -> dict:
    state = json.loads(bpftune("-q", "state").stdout)
    (tuner,) = (t for t in state["tuners"] if t["name"] == name)
    return tuner | {"bpf_programs": state["daemon"]["bpf_programs"]}


def admin_write(name: str, value: str, ns: str | None = None) -> None:
    """What an administrator does: sysctl -w, in the namespace ``ns``."""
    subprocess.run([*ns_prefix(ns), "sysctl", "-qw", f"{name}={value}"], check=True)


def handed_over(d, tuner: str, ns: str | None) -> None:
    d.wait_for(rf"modified sysctl '\S+' that tuner '{tuner}' uses; disabling '{tuner}' for "
               rf"namespace cookie {netns_cookie(ns)}")


def assert_refused(r: subprocess.CompletedProcess, message: str) -> None:
    assert (r.returncode, r.stdout) == (1, ""), r
    assert r.stderr == f"bpftune: {message}\n", r.stderr


def test_global_hand_back_reloads_the_tuner_with_the_administrators_values_as_baseline(
        tmp_path, sysctls, hosts):
    squeezed = {ns: squeeze_buffers(sysctls, ns) for ns in (None, hosts.ns)}
    lo, default, _ = squeezed[None][WMEM]
    admin = f"{lo} {default} 32768"
    iperf = Iperf(hosts.ns, hosts.ns_addr, port=IPERF_PORT)
    try:
        with daemon(tmp_path, "-R", restore=False) as d:  # the sysctls fixture restores
            iperf.run(None, seconds=2)  # global sends: its tcp_wmem grows
            assert wait_until(lambda: values(read_sysctl(WMEM))[2] > squeezed[None][WMEM][2])
            loaded = tuner_state("tcp_buffer")["bpf_programs"]
            admin_write(WMEM, admin)
            handed_over(d, "tcp_buffer", None)
            assert wait_until(lambda: tuner_state("tcp_buffer")["state"] == "manual")
            assert tuner_state("tcp_buffer")["bpf_programs"] < loaded

            r = bpftune("-E", "tcp_buffer")
            assert (r.returncode, r.stderr) == (0, ""), r
            line = ("tuner 'tcp_buffer' re-enabled in global ns by uid 0; current values are "
                    "its new baseline: ")
            assert r.stdout.startswith(line) and f"{WMEM} ({admin})" in r.stdout, r.stdout
            d.wait_for(re.escape(r.stdout.strip()))
            (audited,) = [a for a in records(Path(os.environ["BPFTUNE_AUDIT_FILE"]))
                          if a["kind"] == "hand_back" and a["pid"] == d.proc.pid]
            assert (audited["tuner"], audited["netns"], audited["uid"]) == (
                "tcp_buffer", "global", 0)
            assert audited["reason"] == r.stdout.strip()
            after = tuner_state("tcp_buffer")
            assert (after["state"], after["bpf_programs"]) == ("active", loaded)
            assert after["manual_netns"] == []

            iperf.run(None, seconds=2)  # the same stimulus: it acts again
            assert wait_until(lambda: values(read_sysctl(WMEM))[2] > 32768), d.log
            d.wait_for(rf"change {WMEM}\(min default max\) from \({admin}\) -> ")
            assert d.stop() == 0
    finally:
        iperf.stop()
    # -R restores what the administrator set, not what was there before.
    assert read_sysctl(WMEM) == admin
    assert re.search(rf"Rolling back sysctl values for '{WMEM}' from \(.*\) to original "
                     rf"values \({admin}\)", d.log)
    assert values(read_sysctl(RMEM, hosts.ns)) == squeezed[hosts.ns][RMEM]


def test_netns_hand_back_reenables_there_only_and_forgets_the_old_originals(tmp_path, sysctls,
                                                                            hosts):
    squeezed = squeeze_buffers(sysctls, hosts.ns)[RMEM]
    cookie = netns_cookie(hosts.ns)
    admin = f"{squeezed[0]} {squeezed[1]} {squeezed[1] + 1}"
    iperf = Iperf(hosts.ns, hosts.ns_addr, port=IPERF_PORT)
    try:
        name = f"bpftune-hb-{uuid.uuid4().hex[:6]}"
        with loopback_namespace(name) as other, daemon(tmp_path) as d:
            iperf.run(None, seconds=2)  # the netns receives: its tcp_rmem grows
            assert wait_until(lambda: values(read_sysctl(RMEM, hosts.ns))[2] > squeezed[2])
            assert (RMEM, cookie) in {(r["tunable"], r["cookie"])
                                      for r in recorded(tmp_path / "state")}
            for ns in (hosts.ns, other):
                admin_write(RMEM, admin, ns)
                handed_over(d, "tcp_buffer", ns)
            other_cookie = netns_cookie(other)
            assert sorted(tuner_state("tcp_buffer")["manual_netns"]) == sorted(
                [cookie, other_cookie])

            r = bpftune("-E", "tcp_buffer", "--netns", hosts.ns)
            assert (r.returncode, r.stderr) == (0, ""), r
            line = (f"tuner 'tcp_buffer' re-enabled in netns '{hosts.ns}' (cookie {cookie}) "
                    f"by uid 0; current values are its new baseline: ")
            assert r.stdout.startswith(line) and f"{RMEM} ({admin})" in r.stdout, r.stdout
            d.wait_for(re.escape(r.stdout.strip()))
            tuner = tuner_state("tcp_buffer")
            assert (tuner["state"], tuner["manual_netns"]) == ("active", [other_cookie])
            # Its records there are gone, in the journal too: -R would not bring back the
            # values from before the administrator's write.
            assert all(r["cookie"] != cookie for r in recorded(tmp_path / "state")
                       if r["tuner"] == "tcp_buffer")
            (rmem,) = (t for t in tuner["tunables"] if t["name"] == RMEM)
            assert rmem["netns"][str(cookie)]["original"] == values(admin)

            iperf.run(None, seconds=2)  # it tunes that namespace again
            assert wait_until(lambda: values(read_sysctl(RMEM, hosts.ns))[2] > values(admin)[2])
            ledger = {(r["tunable"], r["cookie"]): r for r in recorded(tmp_path / "state")}
            assert ledger[(RMEM, cookie)]["original"] == values(admin)
            assert read_sysctl(RMEM, other) == admin
    finally:
        iperf.stop()
    handed_back_at = d.log.index("re-enabled in netns")
    assert ("Scenario 'need to increase TCP buffer size(s)' occurred for tunable "
            f"'{RMEM}' in non-global ns.") in d.log[handed_back_at:]


def test_tcp_conn_chooses_again_in_a_namespace_handed_back(tmp_path, hosts):
    from test_tcp_conn import DEFAULT, Sink, in_netns, send

    sink = Sink(hosts.global_addr)
    try:
        with daemon(tmp_path) as d:
            admin_write(DEFAULT, "reno", hosts.ns)
            handed_over(d, "tcp_conn", hosts.ns)
            seen: list[str] = []
            in_netns(hosts.ns, lambda: [send(hosts.global_addr, 0.2, seen) for _ in range(6)])
            assert set(seen) == {"reno"}, seen  # left alone
            r = bpftune("-E", "tcp_conn", "--netns", str(netns_cookie(hosts.ns)))
            assert r.returncode == 0, r
            assert f"{DEFAULT} (reno)" in r.stdout
            seen.clear()
            in_netns(hosts.ns, lambda: [send(hosts.global_addr, 0.2, seen) for _ in range(20)])
            assert set(seen) - {"reno"}, seen  # its program chooses there again
    finally:
        sink.close()


# Refusals: one line on stderr, exit 1, and the daemon goes on as before.
@pytest.fixture
def handed_over_in_netns(tmp_path_factory):
    """A daemon (also on a TCP port) whose tcp_buffer is handed over in a test netns, and
    udp_buffer everywhere. Yields (daemon, hosts)."""
    tmp = tmp_path_factory.mktemp("refusals")
    hosts = Hosts(ns=f"bpftune-hb-{uuid.uuid4().hex[:6]}")
    hosts.create()
    try:  # the values written are those there: nothing to restore
        with daemon(tmp, "-p", str(QUERY_PORT)) as d:
            admin_write(RMEM, read_sysctl(RMEM, hosts.ns), hosts.ns)  # the value it has
            handed_over(d, "tcp_buffer", hosts.ns)
            admin_write(UDP_MEM, read_sysctl(UDP_MEM))
            handed_over(d, "udp_buffer", None)
            yield d, hosts
    finally:
        hosts.destroy()


def as_nobody_in_group_pcp() -> list[str]:
    """An unprivileged user the query socket (root:pcp 0660) lets in: uid and gid 65534,
    member of pcp for this process only."""
    return ["setpriv", "--reuid=65534", "--regid=65534",
            f"--groups={grp.getgrnam('pcp').gr_gid}"]


def refusal_cases(ns: str) -> list[tuple[list[str], list[str], str]]:
    """(prefix, arguments, message) of each refusal."""
    return [
        ([], ["-E", "tcp_buffer"], "tuner 'tcp_buffer' is not disabled in global ns "
                                   "(it is active)"),
        ([], ["-E", "tcp_conn", "--netns", ns], "tuner 'tcp_conn' is not disabled in "
                                                f"netns '{ns}' (cookie {netns_cookie(ns)})"),
        ([], ["-E", "udp_buffer", "--netns", ns], "tuner 'udp_buffer' is disabled everywhere "
                                                  "(handed over in global ns): re-enable it "
                                                  "there first (bpftune -E udp_buffer)"),
        ([], ["-E", "route_table"], "tuner 'route_table' is not disabled in global ns: it is "
                                    "not loaded (not needed: "),
        ([], ["-E", "no_such_tuner"], "no tuner 'no_such_tuner'"),
        ([], ["-E", "tcp_buffer", "--netns", "no-such-netns"],
         "no network namespace 'no-such-netns'"),
        ([], ["-E", "tcp_buffer", "--netns", "12345"], "no network namespace with cookie 12345"),
        # Handed over there, but asked for by someone who is not root, or over TCP.
        (as_nobody_in_group_pcp(), ["-E", "tcp_buffer", "--netns", ns],
         "re-enabling a tuner needs root"),
        ([], ["-p", str(QUERY_PORT), "-E", "tcp_buffer", "--netns", ns],
         "re-enabling a tuner needs root, which only the Unix socket can tell: refused over "
         "the TCP port"),
    ]


def test_refusals_are_one_line_and_leave_the_daemon_as_it_was(handed_over_in_netns):
    d, hosts = handed_over_in_netns
    before = {t: tuner_state(t) for t in ("tcp_buffer", "tcp_conn", "udp_buffer")}
    # The unprivileged user does reach the daemon: it is refused for its uid only.
    r = bpftune("-q", "tuners", prefix=as_nobody_in_group_pcp())
    assert r.returncode == 0 and "tcp_buffer" in r.stdout, r
    for prefix, args, message in refusal_cases(hosts.ns):
        r = bpftune(*args, prefix=prefix)
        assert (r.returncode, r.stdout) == (1, ""), (args, r)
        assert r.stderr.startswith(f"bpftune: {message}") and r.stderr.count("\n") == 1, \
            (args, r.stderr)
    assert d.proc.poll() is None
    for name, state in before.items():
        now = tuner_state(name)
        assert (now["state"], now["manual_netns"]) == (state["state"], state["manual_netns"])
    assert before["tcp_buffer"]["manual_netns"] == [netns_cookie(hosts.ns)]
    assert before["udp_buffer"]["state"] == "manual"
    assert f"refused 'enable tcp_buffer {hosts.ns}' from uid 65534 (pid " in d.log
    assert "re-enabled" not in d.log


def test_netns_without_enable_is_a_usage_error():
    assert_refused(bpftune("--netns", "ns1"), "--netns is only valid with -E")


def test_without_a_daemon_it_says_so_as_queries_do(tmp_path):
    env = {"BPFTUNE_QUERY_SOCKET": str(tmp_path / "query.sock")}  # where no daemon listens
    r = bpftune("-E", "tcp_buffer", env=env)
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == bpftune("-q", "tuners", env=env).stderr
    assert r.stderr.startswith("bpftune: could not connect to bpftune") and \
        r.stderr.count("\n") == 1


def test_a_tuner_given_back_keeps_the_administrators_value_its_start_would_change(
        tmp_path, sysctls):
    """net_buffer sets high_order_alloc_disable to 0 at start (where the kernel no longer
    needs it); given back, the administrator's 1 is its baseline and stays."""
    sysctls.remember(HIGH_ORDER)
    with daemon(tmp_path, "-a", "net_buffer", "-a", "sysctl") as d:
        d.wait_for(r"started; active tuners")
        admin_write(HIGH_ORDER, "1")
        assert wait_until(lambda: tuner_state("net_buffer")["state"] == "manual")
        r = bpftune("-E", "net_buffer")
        assert (r.returncode, r.stderr) == (0, ""), r
        assert f"{HIGH_ORDER} (1)" in r.stdout, r.stdout
        assert tuner_state("net_buffer")["state"] == "active"
        d.stop()
        assert read_sysctl(HIGH_ORDER) == "1"  # before daemon() puts the value back
    assert "set net.core.high_order_alloc_disable=0" not in d.log.split("re-enabled")[1]
