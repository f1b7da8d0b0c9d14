"""Advice mode (bpftune --advise): real tuners see real traffic, nothing is written, and each
recommendation names the command that applies it, which the tests run."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
from test_audit import records
from test_pmlogger import pmie_config
from test_tcp_conn import DEFAULT, Sink, cubic_ns, in_netns, lossy, send  # noqa: F401 (fixtures)

from bpftune import neigh
from bpftune.access import NeighTable, SysctlGroup
from bpftune.advice import Advice, advice_id
from bpftune.changes import StateFile
from bpftune.render import render_pcp
from helpers import BPFTUNE, Iperf, daemon, read_sysctl, values, wait_until
from pcp_helpers import pmda_installed, pminfo
from test_tcp_buffer import RMEM, WMEM, squeeze_buffers


def query(name: str) -> subprocess.CompletedProcess:
    return subprocess.run([BPFTUNE, "-q", name], capture_output=True, text=True, timeout=30)


def jadvice() -> list[dict]:
    out = query("jadvice")
    assert out.returncode == 0, out
    return json.loads(out.stdout)["advice"]


def run_shell(command: str) -> None:
    subprocess.run(command, shell=True, check=True, timeout=30)


def check_pcp(tmp_path, rec: dict) -> None:
    """The PMDA serves the mode, the count per tuner and the recommendation; the shipped
    pmie rule fires."""
    time.sleep(2)  # the PMDA polls the daemon once a second
    out = pminfo("-f", "bpftune.daemon.advise", "bpftune.tuner.advice",
                 "bpftune.advice.command", "bpftune.advice.proposed")
    assert re.search(r"bpftune\.daemon\.advise\n +value 1\n", out), out
    assert re.search(r'inst \[\d+ or "tcp_buffer"\] value [1-9]', out), out
    inst = f"{rec['id']} {rec['netns']}/{rec['tunable']}"
    assert f'or "{inst}"] value "{rec["commands"][0]}"' in out.replace('\\"', '"'), out
    assert f'or "{inst}"] value "{" ".join(map(str, rec["proposed"]))}"' in out, out
    render_pcp(tmp_path / "pcp", interval="1 sec")
    config = pmie_config(tmp_path / "pcp", tmp_path)
    fired = subprocess.run(["pmie", "-c", str(config), "-v", "-T", "4sec"], capture_output=True,
                           text=True, timeout=60).stdout
    assert re.search(r"^bpftune\.advice(?: \(.*\))?: true$", fired, re.M), fired


def test_an_advice_id_depends_only_on_tuner_tunable_namespace_and_scenario():
    a = advice_id("tcp_buffer", RMEM, "ns1", "need to increase TCP buffer size(s)")
    assert a == advice_id("tcp_buffer", RMEM, "ns1", "need to increase TCP buffer size(s)")
    assert a == "29ee932d5ec8"  # the same on every host and every run
    assert len({a, advice_id("tcp_buffer", WMEM, "ns1", "need to increase TCP buffer size(s)"),
                advice_id("tcp_buffer", RMEM, "global", "need to increase TCP buffer size(s)"),
                advice_id("tcp_buffer", RMEM, "ns1", "need to increase TCP buffer size(s)",
                          "10.0.0.1")}) == 4


def test_squeezed_buffers_are_advised_not_changed_and_the_advice_applies(
        tmp_path, sysctls, hosts):
    squeezed = squeeze_buffers(sysctls, hosts.ns)
    iperf = Iperf(hosts.ns, hosts.ns_addr)
    state = tmp_path / "state"
    try:
        started = time.time()
        with pmda_installed(), daemon(tmp_path / "first", "--advise", state=state) as d:
            d.wait_for(r"advice mode: no tunable will be changed")
            for _ in range(2):  # the condition lasts: proposed again, logged once
                iperf.run(None, seconds=2, reverse=True)  # netns sends (wmem there)
                iperf.run(None, seconds=2)  # netns receives (rmem there)
            assert wait_until(lambda: {RMEM, WMEM} <= {r["tunable"] for r in jadvice()})
            for name in (RMEM, WMEM):  # nothing written
                assert values(read_sysctl(name, hosts.ns)) == squeezed[name]
            advice = {r["tunable"]: r for r in jadvice() if r["netns"] == hosts.ns}
            rmem = advice[RMEM]
            assert rmem["id"] == advice_id("tcp_buffer", RMEM, hosts.ns, rmem["scenario"])
            assert rmem["current"] == squeezed[RMEM]
            assert rmem["proposed"][2] > squeezed[RMEM][2]
            assert rmem["reason"].startswith("Due to ")
            assert rmem["commands"] == [
                f'ip netns exec {hosts.ns} sysctl -w {RMEM}="'
                f'{" ".join(map(str, rmem["proposed"]))}"']
            text = query("advice")
            assert text.returncode == 0
            assert f"[{rmem['id']}] tcp_buffer: {RMEM} in netns '{hosts.ns}'" in text.stdout
            assert f"    apply: {rmem['commands'][0]}" in text.stdout
            for r in advice.values():
                assert d.log.count(f"advice {r['id']}: ") == 1, d.log
            # The administrator applies it: the value is the one proposed, and the tuner
            # (nothing of bpftune's to protect) goes on advising.
            run_shell(rmem["commands"][0])
            assert values(read_sysctl(RMEM, hosts.ns)) == rmem["proposed"]
            d.wait_for(rf"modified sysctl '{re.escape(RMEM)}' that tuner 'tcp_buffer' uses; "
                       r"advice mode: it goes on advising")
            assert "tcp_buffer               active" in query("tuners").stdout
            assert json.loads(query("state").stdout)["daemon"]["mode"] == "advise"
            check_pcp(tmp_path, rmem)
            audited = [r for r in records(Path(os.environ["BPFTUNE_AUDIT_FILE"]))
                       if r["kind"] == "recommendation" and r.get("advice_id") == rmem["id"]]
            assert audited and audited[-1]["commands"] == rmem["commands"], audited
            assert audited[-1]["new"] == rmem["proposed"] and audited[-1]["netns"] == hosts.ns
            assert not [r for r in records(Path(os.environ["BPFTUNE_AUDIT_FILE"]))
                        if r["kind"] == "change" and r["tuner"] == "tcp_buffer"
                        and r["epoch"] >= started]
            d.stop()
        header = json.loads((state / "state.jsonl").read_text().splitlines()[0])
        assert header["mode"] == "advise"
        # A restart keeps the recommendations and their ids, and does not log them again.
        with daemon(tmp_path / "second", "--advise", state=state) as d2:
            d2.wait_for(r"advice mode: no tunable will be changed")
            assert {r["id"] for r in jadvice()} >= {r["id"] for r in advice.values()}
            d2.stop()
        assert "advice " + rmem["id"] not in d2.log
    finally:
        iperf.stop()


@pytest.mark.usefixtures("lossy")
def test_lossy_connections_are_advised_bbr_on_their_route_which_applies(tmp_path, hosts):
    sink = Sink(hosts.global_addr)
    defaults = (read_sysctl(DEFAULT), read_sysctl(DEFAULT, hosts.ns))
    try:
        with daemon(tmp_path, "--advise") as d:
            d.wait_for(r"advice mode: no tunable will be changed")
            seen: list[str] = []
            in_netns(hosts.ns, lambda: [send(hosts.global_addr, 8, seen) for _ in range(3)])
            assert set(seen) == {"cubic"}, seen  # no socket changed
            assert wait_until(lambda: any(r["tuner"] == "tcp_conn" for r in jadvice()))
            (rec,) = (r for r in jadvice() if r["tuner"] == "tcp_conn")
            assert rec["netns"] == hosts.ns and rec["subject"] == hosts.global_addr
            assert (rec["current"], rec["proposed"]) == ("cubic", "bbr")
            assert rec["commands"] == [f"ip netns exec {hosts.ns} ip route replace "
                                       f"{hosts.global_addr}/32 dev {hosts.ns_if} congctl bbr"]
            d.stop()
        assert re.search(r"^bpftune: # Summary: tcp_conn_tuner: +bbr +0$", d.log, re.M), d.log
        run_shell(rec["commands"][0])
        seen = []
        in_netns(hosts.ns, lambda: send(hosts.global_addr, 1, seen))
        assert seen == ["bbr"]  # the route's congctl gives new connections BBR
    finally:
        sink.close()
    assert (read_sysctl(DEFAULT), read_sysctl(DEFAULT, hosts.ns)) == defaults
    assert "specify 'bbr' congestion control algorithm" not in d.log


def test_the_neighbour_table_advice_is_an_ip_ntable_command_that_applies(sysctls):
    names = neigh.sysctl_names(socket.AF_INET)
    for name in names:
        sysctls.remember(name)
    before = neigh.table_state(socket.AF_INET).thresholds
    proposed = tuple(v + 8 for v in before)
    (command,) = NeighTable(socket.AF_INET).commands(names[0], proposed, before)
    assert command == ("ip ntable change name arp_cache thresh1 {} thresh2 {} thresh3 {}"
                       .format(*proposed))
    run_shell(command)
    assert neigh.table_state(socket.AF_INET).thresholds == proposed


def test_advice_queries_of_a_daemon_that_tunes_are_refused(tmp_path):
    with daemon(tmp_path) as d:
        d.wait_for(r"started; active tuners")
        for name in ("advice", "jadvice"):
            out = query(name)
            assert out.returncode == 1
            assert out.stdout.strip() == ("error: bpftune is not in advice mode (start it "
                                          "with --advise)")
        assert json.loads(query("state").stdout)["daemon"]["mode"] == "tune"


def test_advise_is_refused_with_queries():
    out = subprocess.run([BPFTUNE, "--advise", "-q", "status"], capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr == "bpftune: --advise is an option of the daemon, not of -S, -q or -E\n"


def test_a_repeated_proposal_updates_its_recommendation_and_a_new_value_replaces_it():
    advice = Advice()
    args = dict(tuner="tcp_buffer", tunable=RMEM, netns="global", cookie=0,
                scenario="need to increase TCP buffer size(s)", reason="Due to ...",
                current=(4096, 131072, 131072), commands=["sysctl -w ..."])
    first, new, changed = advice.propose(proposed=(4096, 131072, 163840), **args)
    assert (new, changed) == (True, True)
    again, new, changed = advice.propose(proposed=(4096, 131072, 163840), **args)
    assert (new, changed, again.id, again.proposals) == (False, False, first.id, 2)
    bigger, new, changed = advice.propose(proposed=(4096, 131072, 204800), **args)
    assert (new, changed, bigger.id, bigger.proposals) == (False, True, first.id, 3)
    assert list(advice.items) == [first.id] and advice.count("tcp_buffer") == 1
    assert bigger.first == first.first and bigger.proposed == [4096, 131072, 204800]


def test_the_state_file_of_an_advising_daemon_keeps_its_mode_and_recommendations(tmp_path):
    rec, _, _ = Advice().propose(tuner="tcp_buffer", tunable=RMEM, netns="ns1", cookie=7,
                                 scenario="s", reason="r", current=(1, 2, 3),
                                 proposed=(1, 2, 4), commands=["c"])
    state = StateFile(str(tmp_path), "advise")
    state.rewrite([], [rec.as_dict()])
    left = StateFile(str(tmp_path)).load()
    assert (left.mode, left.records) == ("advise", [])
    assert Advice(left.advice).items == {rec.id: rec}
    StateFile(str(tmp_path)).rewrite([])  # a daemon that tunes: no mode, no advice
    assert (StateFile(str(tmp_path)).load().mode, StateFile(str(tmp_path)).load().advice) == (
        "tune", [])


def test_grouped_thresholds_are_advised_in_an_order_the_kernel_accepts(sysctls):
    """ip_frag's thresholds: the high one first when growing, the low one first when
    shrinking (the kernel refuses a low threshold above the high one)."""
    low, high = "net.ipv4.ipfrag_low_thresh", "net.ipv4.ipfrag_high_thresh"
    group = SysctlGroup((low, high))
    for name in (low, high):
        sysctls.remember(name)
    before = group.read(high)
    bigger = (before[1] + 4096, before[1] + 8192)  # the new low is above the old high
    for command in group.commands(high, bigger, before):
        run_shell(command)
    assert group.read(high) == bigger
    for command in group.commands(high, before, bigger):
        run_shell(command)
    assert group.read(high) == before
