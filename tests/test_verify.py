"""Verified changes on a real kernel with real traffic: a change of tcp_rmem that hurts
(packets dropped in proportion by nftables right after it) is reverted with the evidence and
held; one that does no harm is kept; one with no traffic after it is inconclusive."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import (
    BEFORE_WINDOW_SECONDS,
    VERIFY_WINDOWS,
    daemon,
    read_sysctl,
    tuner_state,
    values,
    wait_until,
    write_sysctl,
)

NS = "bt-verify"
RMEM = "net.ipv4.tcp_rmem"
SMALL = "4096 32768 262144"
FLOW = Path(__file__).with_name("verify_flow.py")
GROWN = rf"Due to need to increase max buffer size .*{re.escape(RMEM)}"


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


@pytest.fixture
def verify_ns():
    """bt-verify, made before the daemon starts (a later write would hand tcp_buffer
    over): lo up with a 1500 byte MTU (many segments), a small tcp_rmem max."""
    subprocess.run(["ip", "netns", "del", NS], capture_output=True)
    sh("ip", "netns", "add", NS)
    try:
        sh("ip", "-n", NS, "link", "set", "lo", "mtu", "1500", "up")
        write_sysctl(RMEM, SMALL, NS)
        write_sysctl("net.ipv4.tcp_wmem", "4096 262144 4194304", NS)
        yield NS
    finally:
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)


class Flow:
    def __init__(self, tmp: Path, port: int, *, lock_rcvbuf: bool, mode: str) -> None:
        self.mode = tmp / f"flow-{port}"
        self.mode.write_text(mode)
        self.port = port
        self.proc = subprocess.Popen(["ip", "netns", "exec", NS, sys.executable, str(FLOW),
                                      str(port), str(self.mode),
                                      "locked" if lock_rcvbuf else "open"])

    def set(self, mode: str) -> None:
        self.mode.write_text(mode)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def flows(tmp_path, verify_ns):
    made: list[Flow] = []

    def start(port: int, *, lock_rcvbuf: bool) -> Flow:
        # A flow that may grow tcp_rmem starts idle: paced at once, it grows it within a
        # second, before there is a window to compare with.
        made.append(Flow(tmp_path, port, lock_rcvbuf=lock_rcvbuf,
                         mode="pace" if lock_rcvbuf else "stop"))
        return made[-1]

    yield start
    for f in made:
        f.close()


def harm() -> None:
    """5 % of the flows' packets dropped in the namespace, from now on (the table goes
    with the namespace)."""
    nft = ["ip", "netns", "exec", NS, "nft"]
    sh(*nft, "add", "table", "inet", "bt_harm")
    sh(*nft, "add", "chain", "inet", "bt_harm", "in", "{ type filter hook input priority 0 ; }")
    sh(*nft, "add", "rule", "inet", "bt_harm", "in", "iif", "lo", "tcp", "dport",
       "{ 5301, 5302 }", "numgen", "random", "mod", "100", "<", "5", "drop")


def tcp_buffer() -> dict:
    return tuner_state("tcp_buffer")


def audit(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_change_that_hurts_is_reverted_with_evidence_and_held(tmp_path, flows):
    audit_file = tmp_path / "audit.jsonl"
    with daemon(tmp_path, "--audit-file", str(audit_file), env=VERIFY_WINDOWS) as d:
        flows(5301, lock_rcvbuf=True)  # activity only
        b = flows(5302, lock_rcvbuf=False)
        time.sleep(BEFORE_WINDOW_SECONDS)
        b.set("burst")
        d.wait_for(rf"{GROWN}", timeout=20)
        b.set("pace")
        harm()
        m = d.wait_for(rf"Reverting '{re.escape(RMEM)}' in netns '{NS}' from \(.*\) to "
                       rf"\(4096 32768 262144\) \(tcp_buffer\): retransmits/segment "
                       rf"([\d.]+)±[\d.]+ -> ([\d.]+) \(limit [\d.]+\).*"
                       rf"sRTT us ([\d.]+)±[\d.]+ -> ([\d.]+).*held for 30 s", timeout=30)
        assert float(m[2]) >= float(m[1]) + 0.01
        # senders' sRTT (tcp_buffer's BPF map) over loopback: measured, tens of us
        assert 0 < float(m[3]) < 1000 and float(m[4]) > 0
        assert values(read_sysctl(RMEM, NS)) == [4096, 32768, 262144]
        d.wait_for(rf"Verdict reverted for '{re.escape(RMEM)}' in netns '{NS}'", timeout=5)
        snap = tcp_buffer()
        assert snap["verdicts"]["reverted"] >= 1
        assert any(h["tunable"] == RMEM and h["netns"] == NS for h in snap["held"])
        rmem = next(t for t in snap["tunables"] if t["name"] == RMEM)
        assert any(ns.get("verdict", {}).get("verdict") == "reverted"
                   for ns in rmem["netns"].values())
        kinds = [(r["kind"], r.get("verdict")) for r in audit(audit_file)
                 if r.get("tunable") == RMEM]
        assert kinds.index(("revert", "reverted")) < kinds.index(("verdict", "reverted"))
        # held: another burst does not grow it
        b.set("burst")
        time.sleep(3)
        assert values(read_sysctl(RMEM, NS)) == [4096, 32768, 262144]


def test_a_change_that_does_no_harm_is_kept(tmp_path, flows):
    with daemon(tmp_path, env=VERIFY_WINDOWS) as d:
        flows(5303, lock_rcvbuf=True)
        b = flows(5304, lock_rcvbuf=False)
        time.sleep(5)
        b.set("burst")
        d.wait_for(GROWN, timeout=20)
        b.set("pace")
        d.wait_for(rf"Verdict kept for '{re.escape(RMEM)}' in netns '{NS}' .*"
                   rf"sRTT us [\d.]+±[\d.]+ -> [\d.]+", timeout=30)
        assert values(read_sysctl(RMEM, NS))[2] > 262144
        assert "Reverting" not in d.log
        assert tcp_buffer()["verdicts"]["kept"] >= 1


def test_a_change_with_no_traffic_after_it_is_inconclusive(tmp_path, flows):
    with daemon(tmp_path, env=VERIFY_WINDOWS) as d:
        a = flows(5305, lock_rcvbuf=True)
        b = flows(5306, lock_rcvbuf=False)
        time.sleep(5)
        b.set("burst")
        d.wait_for(GROWN, timeout=20)
        a.set("stop")
        b.set("stop")
        d.wait_for(rf"Verdict inconclusive for '{re.escape(RMEM)}' in netns '{NS}' .*"
                   rf"no traffic after the change", timeout=30)
        assert wait_until(lambda: tcp_buffer()["verdicts"]["inconclusive"] >= 1, 5)
