"""Network namespaces: identify them by cookie, find them, and run code inside them.

A netns cookie (SO_NETNS_COOKIE) is what BPF programs report. To act in that namespace we
need a path to it: a bind mount (``ip netns add``, container runtimes) or a process's
``/proc/PID/ns/net``. We never keep a namespace open between uses: holding an fd would keep a
container's netns alive after the container is gone.

To learn when a namespace is destroyed, each one found is given an nsid in ours
(RTM_NEWNSID, as ``ip netns set`` does): an nsid holds no reference, and the kernel
announces RTM_DELNSID for it when the namespace is freed (see ``netns_watch``).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from bpftune import rtnl
from bpftune.rtnl import NetlinkError, nsidmsg, setns

SO_NETNS_COOKIE = 71
NETNS_RUN_DIR = "/run/netns"
RESCAN_SECONDS = 5  # how often to look again for a namespace that could not be found
FULL_SCAN_SECONDS = 1  # walking /proc is costly: at most one full scan a second
# Namespaces destroyed lately, known as gone without a look (cookies are never reused): the
# engine forgets one after the netns watch does, and a look meanwhile walked them all.
DESTROYED_REMEMBERED = 1024
# An event names its process, not the thread that sent it: a thread that entered another
# namespace (setns) is looked for among the first of these.
MAX_THREADS_LOOKED_AT = 64
NETNSA_NSID_NOT_ASSIGNED = 0xFFFFFFFF  # -1 as the u32 pyroute2 encodes: "allocate one"


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


def _is_named(path: str) -> bool:
    return os.path.dirname(path) == NETNS_RUN_DIR


def _mounted_paths() -> Iterator[str]:
    with contextlib.suppress(OSError):
        for name in rtnl.listnetns(NETNS_RUN_DIR):
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


def _process_paths(pid: int) -> Iterator[str]:
    """The netns of process ``pid``, then of its threads (a bounded number)."""
    yield f"/proc/{pid}/ns/net"
    with contextlib.suppress(OSError), os.scandir(f"/proc/{pid}/task") as threads:
        for thread in itertools.islice(threads, MAX_THREADS_LOOKED_AT):
            if thread.name != str(pid):
                yield f"/proc/{pid}/task/{thread.name}/ns/net"


def assign_nsid(sock: rtnl.NetlinkSocket, fd: int) -> int | None:
    """The nsid of the namespace ``fd`` in ours, allocating one if it has none."""
    msg = nsidmsg()
    msg["attrs"] = [("NETNSA_NSID", NETNSA_NSID_NOT_ASSIGNED), ("NETNSA_FD", fd)]
    with contextlib.suppress(NetlinkError):  # EEXIST: it has one already
        rtnl.replies(sock, msg, rtnl.RTM_NEWNSID, rtnl.NLM_F_REQUEST | rtnl.NLM_F_ACK)
    nsid = get_nsid(sock, ("NETNSA_FD", fd))
    return None if nsid in (None, NETNSA_NSID_NOT_ASSIGNED) else nsid


def get_nsid(sock: rtnl.NetlinkSocket, key: tuple[str, int]) -> int | None:
    """The nsid (RTM_GETNSID) of the namespace given by ``key``: ("NETNSA_FD", fd) or
    ("NETNSA_NSID", nsid); NetlinkError (ENOENT) if there is none such."""
    msg = nsidmsg()
    msg["attrs"] = [key]
    for reply in rtnl.replies(sock, msg, rtnl.RTM_GETNSID):
        return reply.get_attr("NETNSA_NSID")
    return None


class Namespaces:
    """Registry of known namespaces, keyed by cookie. Switching is per thread."""

    def __init__(self) -> None:
        self._own_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self.global_cookie = current_cookie()
        self._by_cookie: dict[int, NetnsRef] = {}
        self._cookie_by_inode: dict[tuple[int, int], int] = {}
        self._inode_by_cookie: dict[int, tuple[int, int]] = {}  # to forget one in O(1)
        self._missing_since: dict[int, float] = {}  # cookie -> when a scan last missed it
        self.last_full_scan = -float("inf")
        self.rescan_wanted = False  # a namespace was reported whose path was not found
        # nsid -> cookies: nsids are reused, so one may briefly name a gone namespace and
        # its successor.
        self._cookies_by_nsid: dict[int, set[int]] = {}
        self._nsid_by_cookie: dict[int, int] = {}
        # Tracked namespaces whose name (bind mount) was removed: see _valid_ref.
        self._unnamed: set[int] = set()
        self._rtnl = rtnl.open_socket()
        self._new: list[NetnsRef] = []
        # Cookies registered and not destroyed: a namespace whose path went stale (the
        # process it was found through exited) and is found again is not new.
        self._tracked: set[int] = set()
        self._destroyed: OrderedDict[int, None] = OrderedDict()  # DESTROYED_REMEMBERED
        self._lock = threading.RLock()

    def close(self) -> None:
        self._rtnl.close()
        os.close(self._own_fd)

    def tables(self) -> dict[str, int]:
        """Sizes of the per-namespace tables, to check they shrink as namespaces go."""
        with self._lock:
            return {"namespaces": len(self._tracked), "inodes": len(self._cookie_by_inode),
                    "missing": len(self._missing_since), "unnamed": len(self._unnamed),
                    "nsids": sum(len(c) for c in self._cookies_by_nsid.values())}

    def is_global(self, cookie: int) -> bool:
        return cookie in (0, self.global_cookie)

    def name(self, cookie: int) -> str:
        """How people see a namespace: "global", its ``ip netns`` name, or its cookie."""
        if self.is_global(cookie):
            return "global"
        ref = self._by_cookie.get(cookie)
        if ref is not None and _is_named(ref.path):
            return os.path.basename(ref.path)
        return f"cookie-{cookie}"

    def command_prefix(self, cookie: int) -> str:
        """A shell prefix that runs a command in the namespace ``cookie``."""
        ref = self._by_cookie.get(cookie)
        if ref is None:
            return f"# network namespace (cookie {cookie}) is gone;"
        if _is_named(ref.path):
            return f"ip netns exec {os.path.basename(ref.path)}"
        return f"nsenter --net={ref.path}"

    def _cookie_of(self, fd: int) -> int:
        setns(fd, flags=0)
        try:
            return current_cookie()
        finally:
            setns(self._own_fd, flags=0)

    def _probe(self, path: str, *, fresh: bool = False) -> NetnsRef | None:
        """The namespace at ``path``; ``fresh`` skips the inode cache, whose entry may name
        a namespace freed a moment ago whose inode number was reused."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        inode = (st.st_dev, st.st_ino)
        cookie = None if fresh else self._cookie_by_inode.get(inode)
        if cookie is not None and not self.tracked(cookie):
            cookie = None  # only a namespace still tracked keeps its inode number
        if cookie is None:
            opened = self._opened(path)
            if opened is None:
                return None
            ref, fd = opened
            os.close(fd)
            return ref
        return NetnsRef(cookie, path, inode)

    def _opened(self, path: str) -> tuple[NetnsRef, int] | None:
        """The namespace at ``path`` and an fd holding it (the caller closes it): while it
        is open, a namespace deleted at once (ip netns add; ip netns del) still exists."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            cookie = self._cookie_of(fd)
        except OSError:
            os.close(fd)
            return None
        inode = (st.st_dev, st.st_ino)
        self._cookie_by_inode[inode] = cookie
        self._inode_by_cookie[cookie] = inode
        return NetnsRef(cookie, path, inode), fd

    def scan(self) -> list[NetnsRef]:
        """Find every namespace on the system; return the ones not seen before."""
        with self._lock:
            now = self.last_full_scan = time.monotonic()
            self.rescan_wanted = False
            self._missing_since = {c: t for c, t in self._missing_since.items()
                                   if now - t < RESCAN_SECONDS}
            return self._scan(_candidate_paths())

    def rescan_if_wanted(self) -> None:
        """The full scan that namespaces reported without a path asked for, at most one a
        second however many asked (a flood of short-lived namespaces costs one walk); what
        it finds is in ``take_new``."""
        if self.rescan_wanted and self._full_scan_allowed():
            self.scan()

    def _full_scan_allowed(self) -> bool:
        return time.monotonic() - self.last_full_scan >= FULL_SCAN_SECONDS

    def found_at(self, path: str) -> bool | None:
        """Register the namespace at ``path`` (e.g. a new name under /run/netns): True if
        it was not known before, False if it was (it is known by this path from now on: a
        namespace renamed, or given a name again, is not looked for under the old one).
        None if ``path`` is no namespace (yet). One open serves the look and the
        registration, so a namespace deleted meanwhile is still registered, and its
        destruction reported."""
        with self._lock:
            opened = self._opened(path)
            if opened is None:
                return None
            ref, fd = opened
            try:
                known = self.tracked(ref.cookie)
                self._register(ref, fd)
                return not known
            finally:
                os.close(fd)

    def named(self, name: str) -> int | None:
        """The cookie of the namespace ``ip netns`` calls ``name`` (None if there is none),
        registered if it was not, and known by that name from now on."""
        if not name or "/" in name or "\0" in name or name in (".", ".."):
            return None
        path = os.path.join(NETNS_RUN_DIR, name)
        with self._lock:
            self._scan([path])
            ref = self._probe(path)
            return ref.cookie if ref is not None else None

    def ensure(self, cookie: int, pid: int = 0) -> None:
        """Make sure the namespace ``cookie`` is registered (and so forgotten when it is
        destroyed); NetnsError if it cannot be found. ``pid``, the process an event came
        from, is looked at first: a namespace just created is found there at once, while a
        full scan may have run less than a second ago (and an event from a hook that fires
        only once, such as tcp_rcvbuf_grow, would then be lost for good)."""
        if self.is_global(cookie):
            return
        with self._lock:
            self._valid_ref(cookie, pid)

    def _scan(self, paths: Iterable[str], *, fresh: bool = False) -> list[NetnsRef]:
        with self._lock:
            new = []
            for path in paths:
                ref = self._probe(path, fresh=fresh)
                if ref is None:
                    continue
                known = self._by_cookie.get(ref.cookie)
                if known is None:
                    self._register(ref)
                    new.append(ref)
                elif _is_named(ref.path) and not _is_named(known.path):
                    self._register(ref)  # its name is how people know it
            return new

    def take_new(self) -> list[NetnsRef]:
        """Namespaces registered since the last call, however they were found."""
        with self._lock:
            new, self._new = self._new, []
            return new

    def newest(self, count: int) -> list[int]:
        """Up to ``count`` namespaces other than the global one, the last found first: a
        look at a few, whatever the number known."""
        with self._lock:
            return list(itertools.islice((c for c in reversed(self._by_cookie)
                                          if not self.is_global(c)), count))

    def tracked(self, cookie: int) -> bool:
        """Whether the namespace was found and has not been destroyed since (its path may
        be stale for a moment)."""
        return self.is_global(cookie) or cookie in self._tracked

    def _register(self, ref: NetnsRef, fd: int | None = None) -> None:
        """``fd``: the namespace, when the caller holds it open."""
        self._by_cookie[ref.cookie] = ref
        if _is_named(ref.path):
            self._unnamed.discard(ref.cookie)
        if ref.cookie in self._tracked:
            return
        self._tracked.add(ref.cookie)
        self._new.append(ref)
        self._missing_since.pop(ref.cookie, None)
        if fd is None:
            try:
                fd = held = os.open(ref.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return
        else:
            held = None
        try:
            nsid = assign_nsid(self._rtnl, fd)
        except OSError:
            nsid = None
        finally:
            if held is not None:
                os.close(held)
        if nsid is not None:
            self._cookies_by_nsid.setdefault(nsid, set()).add(ref.cookie)
            self._nsid_by_cookie[ref.cookie] = nsid

    def destroyed(self, nsid: int) -> list[int]:
        """The kernel freed the namespace with this nsid: forget it, and return its cookie
        (a successor that reused the nsid and is still there is kept)."""
        with self._lock:
            gone = []
            for cookie in self._cookies_by_nsid.pop(nsid, set()):
                ref = self._by_cookie.get(cookie)
                if ref is not None and self._probe(ref.path, fresh=True) == ref:
                    self._cookies_by_nsid.setdefault(nsid, set()).add(cookie)
                    continue
                self.forget(cookie)
                gone.append(cookie)
            return gone

    def recheck(self) -> list[int]:
        """After RTM_DELNSID messages were lost (a full netlink buffer): forget, and return,
        the namespaces whose nsid no longer exists."""
        with self._lock:
            gone = []
            for nsid in list(self._cookies_by_nsid):
                if not self._nsid_exists(nsid):
                    gone += self.destroyed(nsid)
            return gone

    def _gone(self, cookie: int) -> bool:
        """Whether the kernel freed the namespace: its nsid is no more (one request, where
        a walk of every namespace would find nothing)."""
        nsid = self._nsid_by_cookie.get(cookie)
        return nsid is not None and not self._nsid_exists(nsid)

    def _nsid_exists(self, nsid: int) -> bool:
        try:
            return get_nsid(self._rtnl, ("NETNSA_NSID", nsid)) == nsid
        except NetlinkError:  # ENOENT: no namespace has it
            return False

    def forget(self, cookie: int) -> None:
        """Drop all that is known of the namespace: in O(1), since with many namespaces
        each destruction does it."""
        with self._lock:
            self._destroyed[cookie] = None
            if len(self._destroyed) > DESTROYED_REMEMBERED:
                self._destroyed.popitem(last=False)
            self._by_cookie.pop(cookie, None)
            self._tracked.discard(cookie)
            self._unnamed.discard(cookie)
            self._missing_since.pop(cookie, None)
            inode = self._inode_by_cookie.pop(cookie, None)
            if inode is not None and self._cookie_by_inode.get(inode) == cookie:
                del self._cookie_by_inode[inode]
            nsid = self._nsid_by_cookie.pop(cookie, None)
            cookies = self._cookies_by_nsid.get(nsid, set())
            cookies.discard(cookie)
            if nsid is not None and not cookies:
                self._cookies_by_nsid.pop(nsid, None)

    def has(self, cookie: int) -> bool:
        return self.is_global(cookie) or cookie in self._by_cookie

    def _forget_inodes(self) -> None:
        """nsfs inode numbers are reused once a namespace is freed, so a cached inode can
        name a new namespace: recompute every cookie on the next scan."""
        self._cookie_by_inode.clear()
        self._inode_by_cookie.clear()

    def add(self, cookie: int, pid: int) -> NetnsRef | None:
        """Register a namespace reported by BPF (creator ``pid``). If that process is gone
        already, ask for a rescan (``rescan_if_wanted``) instead of walking /proc now."""
        with self._lock:
            ref = self._by_cookie.get(cookie) or self._from_process(cookie, pid)
            if ref is None:
                self.rescan_wanted = True
            return ref

    def _from_process(self, cookie: int, pid: int) -> NetnsRef | None:
        """The namespace ``cookie`` registered from the process ``pid`` or one of its
        threads (one may have entered it with setns), if it is there."""
        for path in _process_paths(pid):
            ref = self._probe(path)
            if ref is not None and ref.cookie == cookie:
                self._register(ref)
                return ref
        return None

    def _valid_ref(self, cookie: int, pid: int = 0) -> NetnsRef:
        """A path that holds the namespace ``cookie`` now. ``pid``: the process an event
        came from, looked at (with its threads) before anything costlier; events from
        softirq context carry whichever process was interrupted, so it may not be there."""
        ref = self._by_cookie.get(cookie)
        if ref is not None and self._probe(ref.path) == ref:
            return ref
        self._by_cookie.pop(cookie, None)
        if ref is not None and _is_named(ref.path):
            self._unnamed.add(cookie)
        if pid > 0 and (found := self._from_process(cookie, pid)) is not None:
            return found
        if cookie in self._destroyed or (cookie in self._tracked and self._gone(cookie)):
            # Freed, and reported so (destroyed) or soon to be: it is forgotten then, with
            # the tuners' state for it.
            raise NetnsError(f"network namespace with cookie {cookie} is gone")
        if cookie in self._unnamed:
            # Its name was removed (ip netns del, a CNI plugin's teardown): its owner is
            # done with it, and it lives on only until its last sockets close or its last
            # thread leaves. A walk of the system would cost as much as there are
            # namespaces (1000 names under /run/netns: 50 ms, in an event) and find
            # nothing; a process still in it is found from its own events (``pid``).
            raise NetnsError(f"network namespace with cookie {cookie} has lost its name")
        # A namespace kept alive only by sockets has no path: do not walk /proc for it on
        # every event, nor for each of many such namespaces.
        missed_before = cookie in self._missing_since
        missing_since = self._missing_since.get(cookie, -RESCAN_SECONDS)
        if time.monotonic() - missing_since >= RESCAN_SECONDS and self._full_scan_allowed():
            # The first look trusts the inode numbers of namespaces tracked (with 1000
            # namespaces, entering each to recompute its cookie took 84 ms, in an event's
            # handling); a namespace still missing at the next look may hide behind a
            # reused number (a destruction not seen), so that one recomputes them all.
            if missed_before:
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
                setns(fd, flags=0)
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
                setns(self._own_fd, flags=0)
