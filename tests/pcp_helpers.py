"""Helpers for tests that talk to PCP: a fake daemon serving a canned state, dbpmda, pmcd."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from bpftune.metrics import scenario_metric, tunable_metrics

REPO = Path(__file__).resolve().parents[1]
PMDA = REPO / "pmda" / "pmdabpftune.python"
PYTHON = "/usr/bin/python3"  # the interpreter with the pcp module
PMDAS_DIR = Path("/var/lib/pcp/pmdas/bpftune")
PMDA_CONFIG_DIR = Path("/var/lib/pcp/config/pmda")


class FakeDaemon:
    """Answers the 'state' query like bpftune does, from a dict the test controls."""

    def __init__(self, state: dict | None) -> None:
        self.state = state
        self.dir = tempfile.mkdtemp(prefix="bpftune-fake-", dir="/run")
        os.chmod(self.dir, 0o755)  # the PMDA drops to user pcp
        self.path = os.path.join(self.dir, "query.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        os.chmod(self.path, 0o666)
        self.sock.listen(8)
        self.requests = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(256)
                self.requests += 1
                if self.state is not None:
                    conn.sendall(json.dumps(self.state).encode() + b"\0")

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def tuner(name: str, cluster: int, tunables: list[dict], scenarios: list[dict],
          state: str = "active") -> dict:
    return {"name": name, "id": 0, "cluster": cluster, "state": state, "manual_netns": [],
            "strategy": None, "strategies": [], "tunables": tunables, "scenarios": scenarios}


def tunable(name: str, netns: dict, positions=("min", "default", "max"), unit="bytes") -> dict:
    return {"name": name, "type": "integer", "values": len(positions),
            "metrics": tunable_metrics("tcp_buffer", name),
            "positions": list(positions), "unit": unit, "namespaced": True, "sysctl": True,
            "netns": netns}


def canned_state() -> dict:
    """A daemon that grew tcp_rmem in the global netns and in namespace 'web'."""
    rmem = tunable("net.ipv4.tcp_rmem", {
        "0": {"current": [4096, 131072, 204800], "original": [4096, 131072, 131072],
              "changes": 2, "last_change": 1795600000.5},
        "77": {"current": [4096, 131072, 163840], "original": [4096, 131072, 131072],
               "changes": 1, "last_change": 1795600001.0}})
    moderate = tunable("net.ipv4.tcp_moderate_rcvbuf",
                       {"0": {"current": [1], "original": [0], "changes": 1,
                              "last_change": 1795600000.5}}, positions=("0",), unit="")
    scenarios = [{"id": 0, "name": "need to increase TCP buffer size(s)",
                  "description": "Need to increase buffer size(s) to maximize throughput",
                  "counts": {"0": 2, "77": 1}},
                 {"id": 1, "name": "need to decrease TCP buffer size(s)",
                  "description": "Need to decrease buffer size(s)", "counts": {}}]
    for s in scenarios:
        s["metric"] = scenario_metric("tcp_buffer", s["name"])
    return {
        "version": 1,
        "daemon": {"pid": 4242, "version": "0.1.0", "started": 1795600000.0, "uptime": 61.7,
                   "learning_rate": 4, "rollback": True, "events_received": 12,
                   "events_dropped": 0, "bpf_programs": 8, "cpu_seconds": 1.25,
                   "rss_bytes": 150 << 20},
        "netns": {"0": {"name": "global", "global": True}, "77": {"name": "web", "global": False}},
        "tuners": [tuner("tcp_buffer", 10, [rmem, moderate], scenarios),
                   tuner("sysctl", 13, [], [])],
    }


def dbpmda(commands: list[str], socket_path: str, var_dir: Path) -> str:
    """Run the PMDA from the checkout under dbpmda and return what dbpmda printed."""
    env = dict(os.environ, BPFTUNE_QUERY_SOCKET=socket_path, PCP_VAR_DIR=str(var_dir),
               BPFTUNE_PMDA_POLL="0.2")
    pmns = var_dir / "root.pmns"
    pmns.write_text(subprocess.run([PYTHON, str(PMDA)], env=dict(env, PCP_PYTHON_PMNS="root"),
                                   check=True, capture_output=True, text=True).stdout)
    script = "\n".join([f"open pipe {PYTHON} {PMDA}", "getdesc on", "getiname on", *commands])
    r = subprocess.run(["dbpmda", "-n", str(pmns), "-e"], input=script + "\n", env=env,
                       capture_output=True, text=True, timeout=60, cwd=var_dir)
    return r.stdout + r.stderr


def fetched(output: str, pmid: str) -> dict[str | None, str]:
    """Values of one PMID in dbpmda fetch output: {instance name or None: value}."""
    if re.search(rf"  {re.escape(pmid)} \(.*?\): No values returned!", output):
        return {}
    block = re.search(rf"  {re.escape(pmid)} \(.*?\): numval: (\d+).*?\n((?:    ?.*\n)*)",
                      output)
    assert block, f"{pmid} not in:\n{output}"
    values = {}
    for line in block.group(2).splitlines():
        if m := re.match(r'\s+inst \[\d+ or "(.*)"\] value (.*)', line):
            values[m.group(1)] = m.group(2)
        elif m := re.match(r"\s+value (.*)", line):
            values[None] = m.group(1)
    return values


def pminfo(*args: str) -> str:
    return subprocess.run(["pminfo", *args], capture_output=True, text=True, timeout=60).stdout


@contextlib.contextmanager
def pmda_installed() -> Iterator[None]:
    """Install the PMDA from the checkout into the running pmcd; Remove it afterwards and
    leave pmcd's configuration and the PCP directories as they were."""
    conf, root = Path("/etc/pcp/pmcd/pmcd.conf"), Path("/var/lib/pcp/pmns/root")
    before = (conf.read_text(), root.read_text())
    had_dir = PMDAS_DIR.exists()
    caches_before = set(PMDA_CONFIG_DIR.glob("486.*"))
    r = subprocess.run([str(REPO / "pmda" / "Install")], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        yield
    finally:
        r = subprocess.run([str(PMDAS_DIR / "Remove")], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert (conf.read_text(), root.read_text()) == before, "Remove left pmcd changed"
        if not had_dir:
            shutil.rmtree(PMDAS_DIR)
        for f in set(PMDA_CONFIG_DIR.glob("486.*")) - caches_before:
            f.unlink()
