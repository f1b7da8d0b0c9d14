"""Namespaces as they come and go, from events rather than polls.

- Created with a name (``ip netns add``, CNI plugins, podman): inotify on /run/netns. The
  name appears before ``ip`` bind-mounts the namespace on it, so a new name is probed for a
  short while until it is one.
- Destroyed, whatever made it: the kernel's RTM_DELNSID for the nsid ``Namespaces`` gave
  the namespace when it found it (group RTNLGRP_NSID).

Namespaces created by clone() are reported by bpf/netns.bpf.c; others made by unshare() are
found when one of their sockets first reaches a tuner.

inotify is used through libc with ctypes, as bpf.py does for mount(2): the packaged
bindings (pyinotify) need asyncore, which Python 3.12 removed.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import errno
import os
import selectors
import struct
import threading
import time
from collections.abc import Callable

from bpftune import rtnl
from bpftune.log import log
from bpftune.netns import NETNS_RUN_DIR, Namespaces

IN_CREATE, IN_MOVED_TO = 0x100, 0x80
INOTIFY_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then the name
MOUNT_WAIT_SECONDS = 0.5  # how long a new name may take to become a namespace
FAST_PROBE_SECONDS = 0.1


class NetnsWatch:
    def __init__(self, namespaces: Namespaces, on_created: Callable[[], None],
                 on_destroyed: Callable[[int], None]) -> None:
        self.namespaces = namespaces
        self.on_created = on_created
        self.on_destroyed = on_destroyed
        self._inotify = self._watch_run_netns()
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._open_error: Exception | None = None
        bound = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(bound,), name="bpftune-netns",
                                        daemon=True)
        self._thread.start()
        bound.wait()  # from now on no RTM_DELNSID is missed
        if (error := self._open_error) is not None:
            self._thread.join()
            self._close_fds()
            raise error if isinstance(error, OSError) else OSError(errno.EIO, str(error))

    @staticmethod
    def _watch_run_netns() -> int:
        libc = ct.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
        if fd < 0:
            raise OSError(ct.get_errno(), "inotify_init1 failed")
        # ip netns creates the directory on first use; creating it first changes nothing.
        os.makedirs(NETNS_RUN_DIR, mode=0o755, exist_ok=True)
        if libc.inotify_add_watch(fd, NETNS_RUN_DIR.encode(), IN_CREATE | IN_MOVED_TO) < 0:
            err = ct.get_errno()
            os.close(fd)
            raise OSError(err, f"cannot watch {NETNS_RUN_DIR}: {os.strerror(err)}")
        return fd

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(timeout=5)
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in (self._stop_r, self._stop_w, self._inotify):
            os.close(fd)

    @staticmethod
    def _nsid_socket() -> rtnl.NetlinkSocket:
        """A socket on RTNLGRP_NSID, for the thread that reads it: pyroute2 0.9 gives each
        thread that uses a socket object an underlying socket of its own."""
        sock = rtnl.open_socket()
        try:  # 0.9's socket has no add_membership; group 28 fits the bind-time mask of 1-32
            sock.bind(groups=1 << (rtnl.RTNLGRP_NSID - 1))
        except Exception:
            sock.close()
            raise
        return sock

    def _run(self, bound: threading.Event) -> None:
        try:
            sock = self._nsid_socket()
        except Exception as e:  # OSError, NetlinkError, or 0.7's KeyError: no port left
            self._open_error = e
            return
        finally:
            bound.set()
        with contextlib.closing(sock), selectors.DefaultSelector() as selector:
            for fd in (self._stop_r, self._inotify, sock.fileno()):
                selector.register(fd, selectors.EVENT_READ)
            while True:
                try:
                    ready = {key.fd for key, _ in selector.select()}
                    if self._stop_r in ready:
                        return
                    if self._inotify in ready:
                        self._names_created()
                    if sock.fileno() in ready:
                        self._nsids_deleted(sock)
                except Exception as e:  # the watch must outlive any one bad event
                    log.err(f"error watching network namespaces: {e!r}")
                    time.sleep(0.1)

    def _names_created(self) -> None:
        data = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self._inotify, 65536):
                data += chunk
        offset = 0
        while offset < len(data):
            _, _, _, size = INOTIFY_EVENT.unpack_from(data, offset)
            start = offset + INOTIFY_EVENT.size
            name = data[start:start + size].split(b"\0")[0].decode(errors="replace")
            offset = start + size
            self._probe_new_name(os.path.join(NETNS_RUN_DIR, name))

    def _probe_new_name(self, path: str) -> None:
        start = time.monotonic()
        while os.path.exists(path):
            found = self.namespaces.found_at(path)
            if found:
                self.on_created()
            waited = time.monotonic() - start
            if found is not None or waited > MOUNT_WAIT_SECONDS:
                return
            # The mount follows the name within milliseconds, and "ip netns del" may undo
            # it as soon: look every millisecond at first (backing off, a 2 ms step missed
            # one in 8 such namespaces), then less often.
            time.sleep(0.001 if waited < FAST_PROBE_SECONDS else 0.02)

    def _nsids_deleted(self, sock: rtnl.NetlinkSocket) -> None:
        try:
            messages = sock.get()
        except (OSError, rtnl.NetlinkError) as e:  # a full buffer, as either
            if errno.ENOBUFS not in (getattr(e, "errno", None), getattr(e, "code", None)):
                raise
            # Messages were lost to a full socket buffer: look at every nsid instead.
            for cookie in self.namespaces.recheck():
                self.on_destroyed(cookie)
            return
        for msg in messages:
            if msg["header"]["type"] != rtnl.RTM_DELNSID:
                continue
            nsid = msg.get_attr("NETNSA_NSID")
            for cookie in self.namespaces.destroyed(nsid):
                self.on_destroyed(cookie)
