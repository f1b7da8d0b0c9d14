"""Network namespaces: identify them by cookie, find them, and run code inside them.

A netns cookie (SO_NETNS_COOKIE) is what BPF programs report. To act in that namespace we
need a path to it: a bind mount (``ip netns add``, container runtimes) or a process's
``/proc/PID/ns/net``. We never keep a namespace open between uses: holding an fd would keep a
container's netns alive after the container is gone.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from pyroute2 import netns as pyroute2_netns

SO_NETNS_COOKIE = 71
NETNS_RUN_DIR = "/run/netns"
RESCAN_SECONDS = 5  # how often to look again for a namespace that could not be found


class NetnsError(OSError):
    pass


def current_cookie() -> int:
    """Cookie of the calling thread's netns (raises OSError where unsupported)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")


def cookies_supported() -> bool:
    try:
        current_cookie()
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class NetnsRef:
    cookie: int
    path: str
    inode: tuple[int, int]


def _mounted_paths() -> Iterator[str]:
    with contextlib.suppress(OSError):
        for name in pyroute2_netns.listnetns(NETNS_RUN_DIR):
            yield os.path.join(NETNS_RUN_DIR, name)


def _candidate_paths() -> Iterator[str]:
    """Bind-mounted namespaces first (they outlive processes), then every process's netns."""
    yield from _mounted_paths()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1] == "nsfs" and not fields[4].startswith(NETNS_RUN_DIR):
                yield fields[4]
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            yield f"/proc/{pid}/ns/net"


class Namespaces:
    """Registry of known namespaces, keyed by cookie. Switching is per thread."""

    def __init__(self) -> None:
        self._own_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self.global_cookie = current_cookie()
        self._by_cookie: dict[int, NetnsRef] = {}
        self._cookie_by_inode: dict[tuple[int, int], int] = {}
        self._missing_since: dict[int, float] = {}  # cookie -> when a scan last missed it
        self._lock = threading.RLock()

    def close(self) -> None:
        os.close(self._own_fd)

    def is_global(self, cookie: int) -> bool:
        return cookie in (0, self.global_cookie)

    def name(self, cookie: int) -> str:
        """How people see a namespace: "global", its ``ip netns`` name, or its cookie."""
        if self.is_global(cookie):
            return "global"
        ref = self._by_cookie.get(cookie)
        if ref is not None and os.path.dirname(ref.path) == NETNS_RUN_DIR:
            return os.path.basename(ref.path)
        return f"cookie-{cookie}"

    def command_prefix(self, cookie: int) -> str:
        """A shell prefix that runs a command in the namespace ``cookie``."""
        ref = self._by_cookie.get(cookie)
        if ref is None:
            return f"# network namespace (cookie {cookie}) is gone;"
        if os.path.dirname(ref.path) == NETNS_RUN_DIR:
            return f"ip netns exec {os.path.basename(ref.path)}"
        return f"nsenter --net={ref.path}"

    def _cookie_of(self, fd: int) -> int:
        pyroute2_netns.setns(fd, flags=0)
        try:
            return current_cookie()
        finally:
            pyroute2_netns.setns(self._own_fd, flags=0)

    def _probe(self, path: str) -> NetnsRef | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        inode = (st.st_dev, st.st_ino)
        cookie = self._cookie_by_inode.get(inode)
        if cookie is None:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return None
            try:
                cookie = self._cookie_of(fd)
            except OSError:
                return None
            finally:
                os.close(fd)
            self._cookie_by_inode[inode] = cookie
        return NetnsRef(cookie, path, inode)

    def scan(self) -> list[NetnsRef]:
        """Find every namespace on the system; return the ones not seen before."""
        return self._scan(_candidate_paths())

    def scan_mounted(self) -> list[NetnsRef]:
        """Cheap enough to run every second: only the names under /run/netns."""
        return self._scan(_mounted_paths())

    def _scan(self, paths: Iterable[str]) -> list[NetnsRef]:
        with self._lock:
            new = []
            for path in paths:
                ref = self._probe(path)
                if ref is None or ref.cookie in self._by_cookie:
                    continue
                self._by_cookie[ref.cookie] = ref
                new.append(ref)
            return new

    def has(self, cookie: int) -> bool:
        return self.is_global(cookie) or cookie in self._by_cookie

    def _forget_inodes(self) -> None:
        """nsfs inode numbers are reused once a namespace is freed, so a cached inode can
        name a new namespace: recompute every cookie on the next scan."""
        self._cookie_by_inode.clear()

    def add(self, cookie: int, pid: int) -> NetnsRef | None:
        """Register a namespace reported by BPF (creator ``pid``), falling back to a scan."""
        with self._lock:
            ref = self._probe(f"/proc/{pid}/ns/net")
            if ref is not None and ref.cookie != cookie:
                self._forget_inodes()
                ref = self._probe(f"/proc/{pid}/ns/net")
            if ref is not None and ref.cookie == cookie:
                self._by_cookie[cookie] = ref
                return ref
            self.scan()
            return self._by_cookie.get(cookie)

    def _valid_ref(self, cookie: int) -> NetnsRef:
        ref = self._by_cookie.get(cookie)
        if ref is not None and self._probe(ref.path) == ref:
            return ref
        self._by_cookie.pop(cookie, None)
        # A namespace kept alive only by sockets has no path: do not walk /proc for it on
        # every event.
        if time.monotonic() - self._missing_since.get(cookie, -RESCAN_SECONDS) >= RESCAN_SECONDS:
            self._forget_inodes()
            self.scan()
        ref = self._by_cookie.get(cookie)
        if ref is None:
            self._missing_since[cookie] = time.monotonic()
            raise NetnsError(f"network namespace with cookie {cookie} not found")
        self._missing_since.pop(cookie, None)
        return ref

    @contextlib.contextmanager
    def entered(self, cookie: int) -> Iterator[None]:
        """Run the body in the namespace ``cookie`` (in this thread only), then come back."""
        if self.is_global(cookie):
            yield
            return
        with self._lock:
            ref = self._valid_ref(cookie)
            try:  # the process behind a /proc path may have exited since
                fd = os.open(ref.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                self._by_cookie.pop(cookie, None)
                raise NetnsError(f"cannot open {ref.path}: {e.strerror}") from None
            try:
                pyroute2_netns.setns(fd, flags=0)
            except OSError as e:
                raise NetnsError(f"cannot enter {ref.path}: {e}") from None
            finally:
                os.close(fd)
            try:
                if current_cookie() != cookie:
                    self._by_cookie.pop(cookie, None)
                    self._forget_inodes()
                    raise NetnsError(f"network namespace {ref.path} is no longer cookie {cookie}")
                yield
            finally:
                pyroute2_netns.setns(self._own_fd, flags=0)
