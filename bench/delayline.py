"""A user-space delay line between two network namespaces (our kernels have no netem).

Two TUN devices, one in each namespace, joined by a forked process that holds every packet
for a fixed delay before passing it to the other side; TBF on each TUN device limits the
bandwidth. Together they make a path whose bandwidth-delay product can exceed a TCP buffer
limit, so buffer tuning matters as it does on a long, fast link.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import struct
import time
from collections import deque

from pyroute2 import IPRoute, NetNS
from pyroute2 import netns as pyroute2_netns

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
MTU = 9000  # fewer, larger packets: the Python loop keeps up with tens of Mbit/s


def _open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def _forward(fd_a: int, fd_b: int, delay: float) -> None:
    """Forever: read packets from either device, write each to the other after ``delay``."""
    pending = {fd_a: deque(), fd_b: deque()}  # packets read from fd, due for the other
    other = {fd_a: fd_b, fd_b: fd_a}
    while True:
        now = time.monotonic()
        next_due = None
        for src, queue in pending.items():
            while queue and queue[0][0] <= now:
                with contextlib.suppress(OSError):  # a full device drops, like a wire
                    os.write(other[src], queue.popleft()[1])
            if queue:
                next_due = min(next_due or queue[0][0], queue[0][0])
        timeout = None if next_due is None else max(next_due - time.monotonic(), 0)
        ready, _, _ = select.select([fd_a, fd_b], [], [], timeout)
        for fd in ready:
            arrived = time.monotonic()
            with contextlib.suppress(BlockingIOError):
                while True:
                    pending[fd].append((arrived + delay, os.read(fd, 65536)))


class DelayLine:
    """Namespaces ``a`` and ``b`` (10.232.0.1 and .2) over a delayed, rate-limited path."""

    def __init__(self, delay_ms: float = 20, rate: str = "50mbit", prefix: str = "bpftune-dl"):
        self.a, self.b = f"{prefix}-a", f"{prefix}-b"
        self.addr_a, self.addr_b = "10.232.0.1", "10.232.0.2"
        self.delay, self.rate = delay_ms / 1000, rate
        self.pid = 0

    def __enter__(self) -> DelayLine:
        for ns in (self.a, self.b):
            pyroute2_netns.create(ns)
        fds = {ns: _open_tun(f"tun-{ns[-1]}") for ns in (self.a, self.b)}
        with IPRoute() as ipr:
            for ns in (self.a, self.b):
                (idx,) = ipr.link_lookup(ifname=f"tun-{ns[-1]}")
                ipr.link("set", index=idx, net_ns_fd=ns)
        for ns, local, peer in ((self.a, self.addr_a, self.addr_b),
                                (self.b, self.addr_b, self.addr_a)):
            with NetNS(ns) as nsr:
                (idx,) = nsr.link_lookup(ifname=f"tun-{ns[-1]}")
                nsr.link("set", index=idx, mtu=MTU, state="up")
                nsr.addr("add", index=idx, address=local, prefixlen=32)
                nsr.route("add", dst=f"{peer}/32", oif=idx)
                nsr.tc("add", "tbf", idx, 0x10000, rate=self.rate, burst=64 * 1024,
                       latency="100ms")
                (lo,) = nsr.link_lookup(ifname="lo")
                nsr.link("set", index=lo, state="up")
        self.pid = os.fork()
        if self.pid == 0:  # the delay line itself
            try:
                _forward(fds[self.a], fds[self.b], self.delay)
            finally:
                os._exit(0)
        for fd in fds.values():
            os.close(fd)
        return self

    def __exit__(self, *exc) -> None:
        if self.pid:
            os.kill(self.pid, signal.SIGTERM)
            os.waitpid(self.pid, 0)
        for ns in (self.a, self.b):
            with contextlib.suppress(Exception):
                pyroute2_netns.remove(ns)
