"""Helpers for tests that talk to PCP: a fake daemon serving a canned state, dbpmda, pmcd."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from bpftune.metrics import scenario_metric, tunable_metrics

REPO = Path(__file__).resolve().parents[1]
PMDA = REPO / "pmda" / "pmdabpftune.python"
PYTHON = "/usr/bin/python3"  # the interpreter with the pcp module
PMDAS_DIR = Path("/var/lib/pcp/pmdas/bpftune")
PMDA_CONFIG_DIR = Path("/var/lib/pcp/config/pmda")
PCP_BINADM = "/usr/lib/pcp/bin"  # pmsignal, pmcd_wait (PCP_BINADM_DIR in /etc/pcp.conf)


TOO_MANY = b"error: too many connections\0"  # what a busy daemon answers (bpftune.query)


class FakeDaemon:
    """Answers the 'state' query like bpftune does, from a dict the test controls."""

    def __init__(self, state: dict | None, path: str | None = None, mode: int = 0o666) -> None:
        """path: where to listen (default: a private directory in /run); the caller owns
        its directory."""
        self.state = state
        self.dir = None
        if path is None:
            self.dir = tempfile.mkdtemp(prefix="bpftune-fake-", dir="/run")
            os.chmod(self.dir, 0o755)  # the PMDA drops to user pcp
            path = os.path.join(self.dir, "query.sock")
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        os.chmod(self.path, mode)
        self.sock.listen(8)
        self.requests = 0  # states served
        self.refused = 0  # connections answered as busy
        self.busy = 0  # the next connections to answer as busy (-1: all of them)
        self.busy_reply: bytes | None = TOO_MANY  # None: closed without a reply
        threading.Thread(target=self._serve, daemon=True).start()

    def refuse(self, connections: int, reply: bytes | None = TOO_MANY) -> None:
        """Answer the next connections (-1: all, 0: none) as a daemon with every connection
        slot taken: the error reply, or (reply None) closing without one."""
        self.busy_reply, self.busy = reply, connections

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                if self.busy:
                    self.busy -= self.busy > 0
                    self.refused += 1
                    if self.busy_reply is not None:
                        with contextlib.suppress(OSError):
                            conn.sendall(self.busy_reply)
                    continue
                conn.recv(256)
                self.requests += 1
                if self.state is not None:
                    with contextlib.suppress(OSError):  # the PMDA may have been stopped
                        conn.sendall(json.dumps(self.state).encode() + b"\0")

    def close(self) -> None:
        self.sock.close()
        if self.dir is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        else:
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


def _dbpmda_setup(socket_path: str, var_dir: Path,
                  poll: float = 0.2) -> tuple[dict[str, str], Path]:
    """The PMDA's environment under dbpmda, and the PMNS file dbpmda needs."""
    env = dict(os.environ, BPFTUNE_QUERY_SOCKET=socket_path, PCP_VAR_DIR=str(var_dir),
               BPFTUNE_PMDA_POLL=str(poll))
    pmns = var_dir / "root.pmns"
    pmns.write_text(subprocess.run([PYTHON, str(PMDA)], env=dict(env, PCP_PYTHON_PMNS="root"),
                                   check=True, capture_output=True, text=True).stdout)
    return env, pmns


def dbpmda(commands: list[str], socket_path: str, var_dir: Path) -> str:
    """Run the PMDA from the checkout under dbpmda and return what dbpmda printed."""
    env, pmns = _dbpmda_setup(socket_path, var_dir)
    script = "\n".join([f"open pipe {PYTHON} {PMDA}", "getdesc on", "getiname on", *commands])
    r = subprocess.run(["dbpmda", "-n", str(pmns), "-e"], input=script + "\n", env=env,
                       capture_output=True, text=True, timeout=60, cwd=var_dir)
    return r.stdout + r.stderr


class Dbpmda:
    """dbpmda driving the PMDA from the checkout one command at a time, so that a test can
    change the fake daemon's state between commands during one life of the PMDA."""

    def __init__(self, socket_path: str, var_dir: Path, poll: float = 0.2) -> None:
        """poll: seconds between the PMDA's polls of the daemon. Its log is
        var_dir/bpftune.log."""
        env, pmns = _dbpmda_setup(socket_path, var_dir, poll)
        self.proc = subprocess.Popen(["dbpmda", "-n", str(pmns), "-e"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                     cwd=var_dir)
        self.commands = 0
        self.pending = b""
        self.run(f"open pipe {PYTHON} {PMDA}", "getdesc on", "getiname on")

    def run(self, *commands: str) -> str:
        """Output of these commands (dbpmda echoes each command line, then its output)."""
        self.commands += 1
        marker = f"# end of commands {self.commands}\n".encode()
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(("\n".join(commands) + "\n").encode() + marker)
        self.proc.stdin.flush()
        deadline = time.monotonic() + 60
        while (end := self.pending.find(marker)) < 0:
            timeout = deadline - time.monotonic()
            assert timeout > 0, f"dbpmda did not answer: {self.pending.decode()}"
            if select.select([self.proc.stdout], [], [], timeout)[0]:
                chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
                assert chunk, f"dbpmda exited: {self.pending.decode()}"
                self.pending += chunk
        out, self.pending = self.pending[:end], self.pending[end + len(marker):]
        return out.decode()

    def polled(self, fake: FakeDaemon) -> None:
        """Wait until the PMDA has built its snapshot from the fake daemon's current state:
        the poll after the next one starts only once that one is done."""
        start = fake.requests
        deadline = time.monotonic() + 30
        while fake.requests < start + 2:
            assert time.monotonic() < deadline, "the PMDA does not poll"
            time.sleep(0.05)

    def _children(self) -> list[int]:
        with contextlib.suppress(FileNotFoundError):
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            return [int(p) for p in children.read_text().split()]
        return []

    def pmda_pid(self) -> int:
        """The PMDA, dbpmda's child."""
        pids = self._children()
        assert len(pids) == 1, f"dbpmda's children: {pids}"
        return pids[0]

    def stop_pmda(self, sig: int) -> None:
        """Send the PMDA a signal and wait until it has exited (dbpmda reaps it later)."""
        pid = self.pmda_pid()
        os.kill(pid, sig)
        _wait_exited(pid, f"the PMDA ignores signal {sig}")

    def close(self) -> None:
        """Quit dbpmda, and wait for the PMDA too: it saves its counters file in var_dir
        as it stops, which a test's teardown then removes."""
        if self.proc.poll() is None:
            pmda = self._children()
            with contextlib.suppress(BrokenPipeError):
                assert self.proc.stdin
                self.proc.stdin.write(b"quit\n")
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            for pid in pmda:
                _wait_exited(pid, "the PMDA does not stop when dbpmda quits")

    def __enter__(self) -> Dbpmda:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _wait_exited(pid: int, failure: str) -> None:
    """Until the process ``pid`` has exited (a zombie, or reaped)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z":
                return
        except FileNotFoundError:
            return
        assert time.monotonic() < deadline, failure
        time.sleep(0.05)


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


PMCD_CONF = Path("/etc/pcp/pmcd/pmcd.conf")
PMNS_ROOT = Path("/var/lib/pcp/pmns/root")


def pmcd_conf_meaning(text: str) -> tuple[list[tuple[str, ...]], list[str]]:
    """What pmcd reads from pmcd.conf: the agents (name, domain, IPC type, arguments; in
    any order, as pmdaproc.sh sorts them) and the [access] rules (in order). Comments,
    blank lines and spacing do not count."""
    agents, access, in_access = [], [], False
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if re.fullmatch(r"\[\s*access\s*\]", line):
            in_access = True
        elif in_access:
            access.append(" ".join(line.split()))
        else:
            agents.append(tuple(line.split()))
    return sorted(agents), access


def pmns_meaning(root: Path) -> list[str]:
    """Every name in a PMNS file with its PMID ('name PMID: d.c.i', dynamic subtrees as
    d.*.*), as Rebuild compares them: the layout of the file does not count."""
    r = subprocess.run(["pminfo", "-m", "-n", str(root)], env=dict(os.environ,
                       PCP_DERIVED_CONFIG=""), check=True, capture_output=True, text=True,
                       timeout=60)
    return sorted(r.stdout.splitlines())


def pcp_configuration() -> tuple:
    """pmcd's agents and access rules, and the PMNS: what Install and Remove change."""
    return pmcd_conf_meaning(PMCD_CONF.read_text()), pmns_meaning(PMNS_ROOT)


def hup_pmcd() -> None:
    """Make pmcd re-read pmcd.conf and the PMNS (as pmdaproc.sh does), and wait for it."""
    def sighups() -> int:
        out = subprocess.run(["pmprobe", "-v", "pmcd.sighups"], capture_output=True,
                             text=True, timeout=30).stdout.split()
        return int(out[2]) if len(out) == 3 else -1
    before = sighups()
    assert before >= 0, "pmcd is not running"
    subprocess.run([f"{PCP_BINADM}/pmsignal", "-a", "-s", "HUP", "pmcd"], check=True,
                   timeout=30)
    deadline = time.monotonic() + 30
    while sighups() <= before:
        assert time.monotonic() < deadline, "pmcd did not take SIGHUP"
        time.sleep(0.1)
    subprocess.run([f"{PCP_BINADM}/pmcd_wait", "-t", "30"], check=True, timeout=60)


def pmda_processes() -> list[int]:
    """The PMDAs pmcd runs from the installed script."""
    script = str(PMDAS_DIR / "pmdabpftune.python").encode()
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and script in (proc / "cmdline").read_bytes().split(b"\0"):
                pids.append(int(proc.name))
        except OSError:
            pass  # gone meanwhile
    return pids


def _pmda_environment(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []  # gone meanwhile


def point_pmda_at(query_socket: str) -> None:
    """Have pmcd run the installed PMDA with BPFTUNE_QUERY_SOCKET=query_socket: Install
    gives it no environment of its own, so its pmcd.conf line runs it through env(1); pmcd
    restarts an agent whose line changed when it is sent SIGHUP. Remove deletes the line
    whatever it says."""
    conf = PMCD_CONF.read_text()
    line = re.search(r"^bpftune[ \t].*$", conf, re.M)
    assert line, f"no bpftune agent in {PMCD_CONF}"
    name, domain, ipc, binary, *command = line.group(0).split()
    setting = f"BPFTUNE_QUERY_SOCKET={query_socket}"
    PMCD_CONF.write_text(conf.replace(line.group(0), "\t".join(
        [name, domain, ipc, binary, "/usr/bin/env", setting, *command])))
    hup_pmcd()
    deadline = time.monotonic() + 30
    while not ((pids := pmda_processes()) and len(pids) == 1
               and setting.encode() in _pmda_environment(pids[0])):
        assert time.monotonic() < deadline, f"pmcd did not restart the PMDA with {setting}"
        time.sleep(0.1)


@contextlib.contextmanager
def pmda_installed(query_socket: str | None = None) -> Iterator[None]:
    """Install the PMDA from the checkout into the running pmcd; Remove it afterwards and
    leave pmcd's configuration and the PCP directories as they were. query_socket: where
    the PMDA asks the daemon, instead of the daemon's own path (point_pmda_at)."""
    before = pcp_configuration()
    had_dir = PMDAS_DIR.exists()
    # instance caches, registry, counters: put back as they were, like pmcd.conf
    caches_before = {f: f.read_bytes() for f in PMDA_CONFIG_DIR.glob("486.*")}
    r = subprocess.run([str(REPO / "pmda" / "Install")], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        if query_socket is not None:
            point_pmda_at(query_socket)
        yield
    finally:
        r = subprocess.run([str(PMDAS_DIR / "Remove")], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        after = pcp_configuration()
        if not had_dir:
            shutil.rmtree(PMDAS_DIR)
        for f in PMDA_CONFIG_DIR.glob("486.*"):
            if f not in caches_before:
                f.unlink()
            elif f.read_bytes() != caches_before[f]:
                f.write_bytes(caches_before[f])
        # pmdaproc.sh may reformat both files (it sorts pmcd.conf): compare what pmcd
        # reads from them, so a leftover bpftune entry or a lost agent still fails
        assert after[0] == before[0], f"Remove left pmcd.conf changed: {after[0]}"
        assert after[1] == before[1], "Remove left the PMNS changed: " + " ".join(
            sorted(set(after[1]) ^ set(before[1])))
