"""Test helpers: sysctls restored after use, namespaces with veths, the daemon, iperf3."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import IPRoute, NetNS
from pyroute2 import netns as pyroute2_netns

from bpftune.metrics import tunable_metrics
from bpftune.plugins import builtin_tuners

REPO = Path(__file__).resolve().parents[1]
#: The built-in tuners that load on this kernel, as the daemon's start line lists them
#: (route_table is not needed on it: see tests/test_route_table.py).
ACTIVE_HERE = ("ip_frag, neigh_table, net_buffer, netns, sysctl, tcp_buffer, tcp_conn, "
               "udp_buffer")
BPFTUNE = str(Path(sys.executable).parent / "bpftune")
#: Short verification windows (design: notes/verified-changes-design.md §6), passed in the
#: daemon's environment: 4 ticks before a change, a grace tick, 4 after.
VERIFY_WINDOWS = {"BPFTUNE_TEST_VERIFY": "before=4,after=4,grace=1,hold=30,min_active=2"}
# Traffic before a change, for its window before: the sampler reads a namespace only once
# the host is busy (a tick over 100 packets/s, then a first sample), so a namespace's first
# active tick comes about 3 s after traffic starts; then the 4 ticks of the window, and a
# margin for slow ticks on a loaded machine (5 s left 1 active tick of the 2 needed once).
BEFORE_WINDOW_SECONDS = 9


def ns_prefix(ns: str | None) -> list[str]:
    return ["ip", "netns", "exec", ns] if ns else []


def metrics_this_kernel_lacks() -> set[str]:
    """The metrics of the optional tunables this kernel does not have, such as
    net.core.flow_limit_cpu_bitmap on a kernel built without CONFIG_NET_FLOW_LIMIT: the
    PMDA serves them with no values."""
    return {metric for cls in builtin_tuners() for t in cls.tunables
            if t.optional and t.sysctl and not t.here()
            for metric in tunable_metrics(cls.name, t.name).values()}


def read_sysctl(name: str, ns: str | None = None) -> str:
    path = "/proc/sys/" + name.replace(".", "/")
    if ns is None:
        with open(path) as f:
            return " ".join(f.read().split())
    out = subprocess.run([*ns_prefix(ns), "cat", path], check=True, capture_output=True,
                         text=True).stdout
    return " ".join(out.split())


def write_sysctl(name: str, value: str, ns: str | None = None) -> None:
    path = "/proc/sys/" + name.replace(".", "/")
    subprocess.run([*ns_prefix(ns), "sh", "-c", f'echo "{value}" > {path}'], check=True)


def values(text: str) -> list[int]:
    return [int(v) for v in text.split()]


@dataclass
class Sysctls:
    """Sets sysctls for a test and puts every one back afterwards."""

    saved: dict[tuple[str, str | None], str] = field(default_factory=dict)

    def set(self, name: str, value: str, ns: str | None = None) -> None:
        self.saved.setdefault((name, ns), read_sysctl(name, ns))
        write_sysctl(name, value, ns)

    def remember(self, name: str, ns: str | None = None) -> None:
        self.saved.setdefault((name, ns), read_sysctl(name, ns))

    def remember_managed(self) -> None:
        """Every sysctl a built-in tuner may change, in the global netns (those this kernel
        has)."""
        for name in managed_sysctls():
            with contextlib.suppress(subprocess.CalledProcessError, OSError):
                self.remember(name)

    def restore(self) -> None:
        for (name, ns), value in self.saved.items():
            with contextlib.suppress(subprocess.CalledProcessError):
                if read_sysctl(name, ns) != value:
                    write_sysctl(name, value, ns)


@dataclass
class Hosts:
    """The global netns and a test netns joined by a veth pair."""

    ns: str
    global_addr: str = "10.231.0.1"
    ns_addr: str = "10.231.0.2"
    global_if: str = "btv0"
    ns_if: str = "btv1"

    def create(self) -> None:
        pyroute2_netns.create(self.ns)
        with IPRoute() as ipr:
            ipr.link("add", ifname=self.global_if, kind="veth", peer=self.ns_if)
            (idx,) = ipr.link_lookup(ifname=self.global_if)
            (peer,) = ipr.link_lookup(ifname=self.ns_if)
            ipr.link("set", index=peer, net_ns_fd=self.ns)
            ipr.addr("add", index=idx, address=self.global_addr, prefixlen=30)
            ipr.link("set", index=idx, state="up")
        with NetNS(self.ns) as nsr:
            (peer,) = nsr.link_lookup(ifname=self.ns_if)
            nsr.addr("add", index=peer, address=self.ns_addr, prefixlen=30)
            nsr.link("set", index=peer, state="up")
            (lo,) = nsr.link_lookup(ifname="lo")
            nsr.link("set", index=lo, state="up")

    def destroy(self) -> None:
        with IPRoute() as ipr, contextlib.suppress(Exception):
            for idx in ipr.link_lookup(ifname=self.global_if):
                ipr.link("del", index=idx)
        with contextlib.suppress(Exception):
            pyroute2_netns.remove(self.ns)


def netns_cookie(ns: str | None) -> int:
    code = ("import socket;s=socket.socket();"
            "print(int.from_bytes(s.getsockopt(socket.SOL_SOCKET,71,8),'little'))")
    out = subprocess.run([*ns_prefix(ns), sys.executable, "-c", code], check=True,
                         capture_output=True, text=True).stdout
    return int(out)


class Iperf:
    """An iperf3 server in one namespace, clients from another; processes ended by PID."""

    def __init__(self, server_ns: str | None, server_addr: str, port: int = 5299) -> None:
        self.server_addr = server_addr
        self.port = port
        self.server = subprocess.Popen(
            [*ns_prefix(server_ns), "iperf3", "-s", "-p", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)

    def run(self, client_ns: str | None, seconds: int = 3, *, reverse: bool = False,
            streams: int = 1) -> None:
        cmd = [*ns_prefix(client_ns), "iperf3", "-c", self.server_addr, "-p", str(self.port),
               "-t", str(seconds), "-P", str(streams)]
        if reverse:
            cmd.append("-R")
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       timeout=seconds + 30)

    def stop(self) -> None:
        self.server.terminate()
        self.server.wait(timeout=10)


def transfer_both_ways(hosts: Hosts, seconds: int = 2, port: int = 5299) -> None:
    """One iperf3 transfer each way between the global netns and the test netns."""
    iperf = Iperf(hosts.ns, hosts.ns_addr, port=port)
    try:
        iperf.run(None, seconds=seconds)
        iperf.run(None, seconds=seconds, reverse=True)
    finally:
        iperf.stop()


class Daemon:
    """bpftune started in the foreground (-s) with its log captured."""

    def __init__(self, state_dir: Path, *args: str, log_path: Path,
                 prefix: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        env = dict(os.environ, BPFTUNE_STATE_DIR=str(state_dir), **(env or {}))
        self.log_file = open(log_path, "a")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([*(prefix or []), BPFTUNE, *args], stderr=self.log_file,
                                     stdout=self.log_file, env=env)
        self.wait_for("started; active tuners", timeout=60)

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def wait_for(self, pattern: str, timeout: float = 30) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if m := re.search(pattern, self.log):
                return m
            if self.proc.poll() is not None:
                raise AssertionError(f"bpftune exited {self.proc.returncode}:\n{self.log}")
            time.sleep(0.1)
        raise AssertionError(f"no '{pattern}' in bpftune's log:\n{self.log}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=60)
        self.log_file.close()
        return rc


def recorded(state_dir: Path) -> list[dict]:
    """The records of a daemon's ledger, as its journal says."""
    from bpftune.changes import StateFile

    return [vars(r) for r in StateFile(str(state_dir)).load().records]


def wait_until(predicate, timeout: float = 20, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def managed_sysctls() -> list[str]:
    """Every sysctl a built-in tuner may change."""
    from bpftune.plugins import builtin_tuners

    return [name for cls in builtin_tuners() for t in cls.tunables if t.sysctl
            for name in t.access.names(t.name)]


@contextlib.contextmanager
def daemon(tmp_path: Path, *args: str, stderr: bool = True, prefix: list[str] | None = None,
           restore: bool = True, env: dict[str, str] | None = None,
           state: Path | None = None) -> Iterator[Daemon]:
    """bpftune in the foreground, logging to stderr (-s) unless ``stderr`` is False.

    Its state directory is ``tmp_path/state`` unless ``state`` names one (the
    ``carried_state`` fixture: what earlier tests' daemons left, as on a real host).
    Whatever the daemon changes in the global netns is put back afterwards, so that a test
    that runs it without -R (or kills it) leaves the machine as it found it; ``restore=False``
    for a test that checks what is left behind (and puts it back itself)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    saved = Sysctls()
    saved.remember_managed()
    d = Daemon(state or tmp_path / "state", *(["-s"] if stderr else []), *args,
               log_path=tmp_path / "bpftune.log", prefix=prefix, env=env)
    try:
        yield d
    finally:
        if d.proc.poll() is None:
            d.stop()
        if restore:
            saved.restore()


def _loopback_transfer_until_tuned(timeout: float) -> float | None:
    """In the calling thread's netns: send over loopback until tcp_rmem changes; seconds
    from the first byte to the change (None if it did not change)."""
    def rmem() -> str:
        with open("/proc/sys/net/ipv4/tcp_rmem") as f:
            return f.read()

    before = rmem()
    with socket.create_server(("127.0.0.1", 0)) as server:
        reader = threading.Thread(target=_drain, args=(server,), daemon=True)
        reader.start()
        start = time.monotonic()
        with socket.create_connection(server.getsockname()) as client:
            chunk = b"x" * (1 << 16)
            while rmem() == before and time.monotonic() - start < timeout:
                for _ in range(32):
                    client.sendall(chunk)
        reader.join(timeout=10)
    return time.monotonic() - start if rmem() != before else None


def _drain(server: socket.socket) -> None:
    conn, _ = server.accept()
    with conn:
        while conn.recv(1 << 16):
            pass


def churn_namespace(name: str, timeout: float = 10) -> float | None:
    """Create a namespace, move loopback traffic in it until bpftune grows its tcp_rmem
    (it starts with the global namespace's values: squeeze them first), delete it. Returns
    the seconds bpftune took to react (None if it did not). Runs in a thread of its own,
    since entering a namespace is per thread."""
    result: list[float | None] = []

    def work() -> None:
        pyroute2_netns.create(name)
        try:
            pyroute2_netns.setns(name)
            with IPRoute() as ipr:
                (lo,) = ipr.link_lookup(ifname="lo")
                ipr.link("set", index=lo, state="up")
            result.append(_loopback_transfer_until_tuned(timeout))
        finally:
            pyroute2_netns.remove(name)

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    if not result:
        raise AssertionError(f"namespace {name}: churn failed")
    return result[0]


def bpftune_state() -> dict:
    """The running daemon's ``bpftune -q state`` (JSON)."""
    out = subprocess.run([BPFTUNE, "-q", "state"], capture_output=True, text=True, check=True,
                         timeout=30).stdout
    return json.loads(out)


def tuner_state(name: str) -> dict:
    """One tuner's part of ``bpftune -q state``."""
    return next(t for t in bpftune_state()["tuners"] if t["name"] == name)


def verdict(d: Daemon, tuner: str, tunable: str, figure: str, expected: str = "kept",
            timeout: float = 30) -> tuple[float, float, float]:
    """Wait for the first verdict on ``tunable``'s change by ``tuner`` (a series of steps
    is one verification), check that it is ``expected`` in the log line and in the state
    query, with evidence for ``figure``; returns that figure's (before mean, its per-tick
    sd, after mean)."""
    m = d.wait_for(rf"Verdict (\w+) for '{re.escape(tunable)}' in .* \({tuner}\): (.*)",
                   timeout=timeout)
    assert m[1] == expected, m[0]
    evidence = re.search(rf"{re.escape(figure)} ([\d.]+)±([\d.]+) -> ([\d.]+)", m[2])
    assert evidence, m[0]
    assert f"Reverting '{tunable}'" not in d.log
    snap = tuner_state(tuner)
    assert snap["verdicts"][expected] >= 1, snap["verdicts"]
    (found,) = (t for t in snap["tunables"] if t["name"] == tunable)
    last = [ns["verdict"] for ns in found["netns"].values() if "verdict" in ns]
    assert last and last[-1]["verdict"] == expected, found
    assert figure in last[-1]["evidence"], last
    before, sd, after = map(float, evidence.groups())
    return before, sd, after


@contextlib.contextmanager
def paced_udp(address: tuple[str, int], per_second: int, size: int = 1400) -> Iterator[None]:
    """Datagrams sent to ``address`` from this netns at a steady pace, in a thread, for the
    body: real traffic that makes the windows of verified changes active. A sender held up
    (a busy host) skips what it missed rather than catching up in a burst, which a small
    receive buffer would drop."""
    stop = threading.Event()

    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            start, sent = time.monotonic(), 0
            while not stop.is_set():
                due = per_second * (time.monotonic() - start)
                if sent < due:
                    with contextlib.suppress(OSError):  # ICMP errors from no listener
                        s.sendto(b"x" * size, address)
                    sent = max(sent + 1, int(due))
                else:
                    time.sleep(0.002)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        yield
    finally:
        stop.set()
        sender.join(timeout=10)


def daemon_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@contextlib.contextmanager
def loopback_namespace(name: str) -> Iterator[str]:
    """A namespace with only loopback, for traffic inside it; deleted on exit if the test
    has not deleted it already."""
    pyroute2_netns.create(name)
    try:
        with NetNS(name) as nsr:
            (lo,) = nsr.link_lookup(ifname="lo")
            nsr.link("set", index=lo, state="up")
        yield name
    finally:
        with contextlib.suppress(OSError):
            pyroute2_netns.remove(name)
