"""The query interface: a server inside the daemon and the ``bpftune -q`` client.

Upstream's queries (reference section 2) keep upstream's output formats; ``state`` is ours:
the complete state as JSON, which the PCP PMDA polls. The server listens on a Unix socket
(mode 0660, group pcp where it exists, so the PMDA can read it without root) and, with -p,
on 127.0.0.1 only (upstream binds every interface).

Protocol (as upstream): the client sends the query name (a NUL or newline ends it), the
server sends the reply followed by a NUL and closes the connection. Every query reads; the
one request that changes the daemon, ``enable TUNER [NETNS]`` (``bpftune -E``, see
bpftune.handback), is root's, told by the peer's credentials on the Unix socket.

One thread does all the socket work, non-blocking (upstream and our first version gave every
connection a thread): at most ``MAX_CONNECTIONS`` are open at once, each has one deadline for
its whole request and one for its whole reply, and a few worker threads compute replies, so
slow or idle clients cost an fd for at most ``REQUEST_TIMEOUT`` seconds and never a thread.
When every slot is taken, a new connection takes the slot of the client that has been sending
its request the longest (it gets ``error: too many connections``); if every slot is busy
answering, the new connection gets that error itself.
"""

from __future__ import annotations

import contextlib
import grp
import os
import queue
import selectors
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bpftune.log import log
from bpftune.paths import QUERY_SOCKET

if TYPE_CHECKING:
    from bpftune.engine import Engine
    from bpftune.report import Snapshot

MAX_REQUEST = 256
MAX_REPLY = 16 << 20
TIMEOUT = 5.0  # the client's, per receive, and for retrying a busy daemon
COMMAND_TIMEOUT = 120.0  # per receive, for ``enable``: it compiles a tuner's BPF programs
RETRY_SECONDS = 0.05
MAX_CONNECTIONS = 32
REQUEST_TIMEOUT = 2.0  # from accepting a connection to its complete request
REPLY_TIMEOUT = 5.0  # from the reply being ready to all of it sent
DRAIN_TIMEOUT = 0.5  # then, for the client to close its end
DRAIN_MAX = 1 << 16
WORKERS = 2
ACCEPT_BATCH = 16  # per listener and loop pass, well under MAX_CONNECTIONS (see _accept)
BACKLOG = socket.SOMAXCONN  # the kernel caps it at net.core.somaxconn
TOO_MANY = b"error: too many connections\0"
TIMED_OUT = b"error: request not complete in time\0"


@dataclass(frozen=True)
class Query:
    name: str
    description: str
    handler: Callable[[Snapshot], str] | Callable[[Snapshot, str], str]
    #: The handler needs each tuner's summary lines in the snapshot.
    summaries: bool = False
    #: The handler also gets the rest of the request (``history 50``: "50").
    argument: bool = False


@dataclass(frozen=True)
class Peer:
    """Who is at the other end of a Unix socket connection: its credentials when it
    connected, as the kernel reports them (SO_PEERCRED), which it cannot fake."""

    pid: int
    uid: int
    gid: int


_UCRED = struct.Struct("iII")  # struct ucred: pid_t pid, uid_t uid, gid_t gid


def peer_of(sock: socket.socket) -> Peer | None:
    """The peer's credentials on a Unix socket; None on TCP, which has none."""
    if sock.family != socket.AF_UNIX:
        return None
    return Peer(*_UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                               _UCRED.size)))


def _reply_for(engine: Engine, request: str, peer: Peer | None) -> str:
    from bpftune import handback, report

    if handback.is_request(request):  # the one request that changes the daemon
        return handback.answer(engine, request, peer)
    for q in report.QUERIES:
        if request.startswith(q.name):  # upstream matches by prefix, in table order
            # Only the copy is made under the engine's lock; the handler (namespace switches,
            # sysctl reads, formatting) runs without it, so queries never stall events.
            snap = report.snapshot(engine, summaries=q.summaries)
            if q.argument:
                return q.handler(snap, request[len(q.name):].strip())
            return q.handler(snap)
    return f"unknown request '{request}'; supported requests are:\n" + report.help_text()


def _answer(engine: Engine, request: str, peer: Peer | None = None) -> str:
    try:
        return _reply_for(engine, request, peer)
    except Exception as e:  # a query must never take the daemon down
        log.err(f"query '{request}' failed: {e!r}")
        return f"error: query '{request}' failed: {e}"


def parse_request(data: bytes, ended: bool) -> str | None:
    """The request in what a client sent so far; None while more may come (``ended``: the
    client closed its end). Raises ValueError for a bad request."""
    end = min((i for i in (data.find(b"\0"), data.find(b"\n")) if i >= 0), default=-1)
    if end < 0 and len(data) > MAX_REQUEST:
        raise ValueError(f"request longer than {MAX_REQUEST} bytes")
    if end < 0 and not ended:
        return None
    request = (data[:end] if end >= 0 else data).strip()
    if not request:
        raise ValueError("empty request")
    return request.decode()  # UnicodeDecodeError is a ValueError


READING, ANSWERING, WRITING, DRAINING = range(4)


class _Conn:
    __slots__ = ("data", "deadline", "drained", "peer", "phase", "reply", "sent", "sock",
                 "started")

    def __init__(self, sock: socket.socket, now: float, peer: Peer | None) -> None:
        self.sock = sock
        self.peer = peer
        self.phase = READING
        self.started = now
        self.deadline = now + REQUEST_TIMEOUT
        self.data = b""
        self.reply = memoryview(b"")
        self.sent = self.drained = 0


class _Loop:
    """The server's one I/O thread, and its workers.

    Like socketserver's servers, it serves in the thread that calls ``serve_forever()``
    until ``shutdown()``. The workers are started by the serving thread and end with it."""

    def __init__(self, engine: Engine, listeners: list[socket.socket]) -> None:
        self.engine = engine
        self.listeners = listeners
        self.selector = selectors.DefaultSelector()
        self.conns: dict[socket.socket, _Conn] = {}
        self._wake_r, self._wake_w = socket.socketpair()
        for s in (self._wake_r, self._wake_w, *listeners):
            s.setblocking(False)
        self.selector.register(self._wake_r, selectors.EVENT_READ)
        for s in listeners:
            self.selector.register(s, selectors.EVENT_READ)
        self._requests: queue.SimpleQueue[tuple[_Conn, str] | None] = queue.SimpleQueue()
        self._replies: queue.SimpleQueue[tuple[_Conn, bytes]] = queue.SimpleQueue()
        self._stop_request = False
        self._closed = False
        self._not_serving = threading.Event()
        self._not_serving.set()
        self._workers: list[threading.Thread] = []

    def serve_forever(self) -> None:
        if self._closed:
            return
        self._not_serving.clear()
        self._workers = [threading.Thread(target=self._work, name="bpftune-query-worker",
                                          daemon=True) for _ in range(WORKERS)]
        for t in self._workers:
            t.start()
        try:
            while not self._stop_request and not self._closed:
                try:
                    self._once()
                except Exception as e:  # keep serving whatever one connection did
                    log.err(f"query server: {e!r}")
                    time.sleep(0.1)
        finally:
            for _ in self._workers:
                self._requests.put(None)
            self._stop_request = False
            self._not_serving.set()

    def shutdown(self) -> None:
        """Stop serve_forever() and its workers (a reply being computed is finished and
        sent by the next serve_forever())."""
        self._stop_request = True
        self._wake()
        self._not_serving.wait()
        for t in self._workers:
            t.join(timeout=5)

    def close(self) -> None:
        self.shutdown()
        self._closed = True
        for conn in list(self.conns.values()):
            self._close(conn)
        self.selector.close()
        self._wake_r.close()
        self._wake_w.close()  # a worker still answering finds it closed: no matter

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed
            self._wake_w.send(b"\0")

    # Workers.
    def _work(self) -> None:
        while (item := self._requests.get()) is not None:
            conn, request = item
            self._replies.put((conn, _answer(self.engine, request, conn.peer).encode()
                               + b"\0"))
            self._wake()

    # The serving thread.
    def _once(self) -> None:
        now = time.monotonic()
        deadline = min((c.deadline for c in self.conns.values() if c.phase != ANSWERING),
                       default=None)
        # With no connection to time out, sleep until a listener or the wake pipe stirs:
        # an idle daemon wakes no thread but the main loop's.
        events = self.selector.select(None if deadline is None else max(0.0, deadline - now))
        # Requests already sent are read before new connections are let in, so a new
        # connection cannot take the slot of a client whose request has just arrived.
        ready = [key for key, _ in events]
        for key in sorted(ready, key=lambda k: k.fileobj in self.listeners):
            if key.fileobj is self._wake_r:
                with contextlib.suppress(OSError):
                    self._wake_r.recv(4096)
            elif key.fileobj in self.listeners:
                self._accept(key.fileobj)
            elif (conn := self.conns.get(key.fileobj)) is not None:
                self._ready(conn)
        while True:
            try:
                conn, reply = self._replies.get_nowait()
            except queue.Empty:
                break
            self._reply(conn, reply)
        now = time.monotonic()
        for conn in [c for c in self.conns.values() if c.phase != ANSWERING
                     and now >= c.deadline]:
            self._forget(conn)
            if conn.phase == READING:  # a client that drips its request is dropped here
                self._refuse(conn.sock, TIMED_OUT)
            else:
                conn.sock.close()

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # e.g. EMFILE: leave it in the backlog for a while
                log.debug(f"query server: cannot accept: {e}")
                time.sleep(0.1)
                return
            try:
                peer = peer_of(sock)
            except OSError:  # the client is gone already
                sock.close()
                continue
            sock.setblocking(False)
            if len(self.conns) >= MAX_CONNECTIONS:
                reading = [c for c in self.conns.values() if c.phase == READING]
                if not reading:
                    self._refuse(sock, TOO_MANY)
                    continue
                oldest = min(reading, key=lambda c: c.started)
                self._forget(oldest)
                self._refuse(oldest.sock, TOO_MANY)
            conn = _Conn(sock, time.monotonic(), peer)
            self.conns[sock] = conn
            self.selector.register(sock, selectors.EVENT_READ)
            self._ready(conn)  # a request already sent is read before the next accept

    @staticmethod
    def _refuse(sock: socket.socket, message: bytes) -> None:
        """A short error, if the socket takes it at once, then close."""
        with contextlib.suppress(OSError):
            sock.send(message)
        sock.close()

    def _forget(self, conn: _Conn) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn.sock)
        self.conns.pop(conn.sock, None)

    def _close(self, conn: _Conn) -> None:
        self._forget(conn)
        conn.sock.close()

    def _ready(self, conn: _Conn) -> None:
        try:
            if conn.phase == READING:
                self._read(conn)
            elif conn.phase == WRITING:
                self._write(conn)
            elif conn.phase == DRAINING:
                self._drain(conn)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._close(conn)

    def _read(self, conn: _Conn) -> None:
        chunk = conn.sock.recv(MAX_REQUEST + 1 - len(conn.data))
        conn.data += chunk
        try:
            request = parse_request(conn.data, ended=not chunk)
        except ValueError as e:
            self._reply(conn, f"error: {e}\0".encode())
            return
        if request is None:
            return
        conn.phase = ANSWERING
        self.selector.unregister(conn.sock)
        self._requests.put((conn, request))

    def _reply(self, conn: _Conn, reply: bytes) -> None:
        if conn.sock not in self.conns:  # closed while the reply was computed (stopping)
            return
        conn.phase = WRITING
        conn.reply = memoryview(reply)
        conn.deadline = time.monotonic() + REPLY_TIMEOUT
        with contextlib.suppress(KeyError):
            self.selector.unregister(conn.sock)
        self.selector.register(conn.sock, selectors.EVENT_WRITE)
        self._ready(conn)

    def _write(self, conn: _Conn) -> None:
        while conn.sent < len(conn.reply):
            conn.sent += conn.sock.send(conn.reply[conn.sent:])
        # Closing with unread input sends a reset, which can destroy the reply before the
        # client reads it: finish sending, then drain a bounded amount of what is left.
        conn.sock.shutdown(socket.SHUT_WR)
        conn.phase = DRAINING
        conn.deadline = time.monotonic() + DRAIN_TIMEOUT
        self.selector.modify(conn.sock, selectors.EVENT_READ)
        self._drain(conn)

    def _drain(self, conn: _Conn) -> None:
        while chunk := conn.sock.recv(4096):
            conn.drained += len(chunk)
            if conn.drained >= DRAIN_MAX:
                break
        self._close(conn)


class QueryServer:
    """Serves queries from a background thread until closed."""

    def __init__(self, engine: Engine, port: int = 0, path: str = QUERY_SOCKET) -> None:
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        listeners = []
        try:
            unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listeners.append(unix)
            unix.bind(path)
            self._share_with_pcp(path)
            unix.listen(BACKLOG)
            if port:
                tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                listeners.append(tcp)
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp.bind(("127.0.0.1", port))
                tcp.listen(BACKLOG)
        except OSError:
            for s in listeners:
                s.close()
            raise
        self.listeners = listeners
        self.loop = _Loop(engine, listeners)
        threading.Thread(target=self.loop.serve_forever, name="bpftune-query",
                         daemon=True).start()
        log.debug(f"query server listening on {path}" + (f" and 127.0.0.1:{port}" if port else ""))

    @staticmethod
    def _share_with_pcp(path: str) -> None:
        try:
            gid = grp.getgrnam("pcp").gr_gid
        except KeyError:
            os.chmod(path, 0o600)
            return
        os.chown(path, 0, gid)
        os.chmod(path, 0o660)

    def close(self) -> None:
        self.loop.close()
        for s in self.listeners:
            s.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _connect(port: int, path: str, timeout: float) -> socket.socket:
    if port:
        return socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except OSError:
        s.close()
        raise
    return s


def _exchange(s: socket.socket, query: str) -> bytes:
    s.sendall(query.encode() + b"\0")
    chunks, size = [], 0
    while chunk := s.recv(65536):
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_REPLY:
            raise OSError("reply too large")
    return b"".join(chunks)


def request(query: str, port: int = 0, path: str = QUERY_SOCKET,
            timeout: float = TIMEOUT) -> str:
    """Send one query to the daemon; raises OSError if it cannot be reached. A busy daemon
    is asked again for up to TIMEOUT seconds: its listen backlog full (EAGAIN, on a Unix
    socket), every connection slot taken, or this connection's slot given to a newer one
    before the request was read (a reset or closed pipe, or the error reply). ``timeout``
    bounds each receive."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        busy: OSError | None = None
        try:
            with _connect(port, path, timeout) as s:
                reply = _exchange(s, query)
        except (BlockingIOError, BrokenPipeError, ConnectionResetError) as e:
            busy = e
        else:
            if reply != TOO_MANY:
                return reply.rstrip(b"\0").decode(errors="replace")
        if time.monotonic() + RETRY_SECONDS >= deadline:
            if busy is not None:
                raise busy
            return TOO_MANY.rstrip(b"\0").decode()
        time.sleep(RETRY_SECONDS)


def _ask(query: str, port: int, timeout: float = TIMEOUT) -> str | None:
    """The daemon's reply; None, said on stderr, if it cannot be reached."""
    where = f"127.0.0.1:{port}" if port else QUERY_SOCKET
    try:
        return request(query, port, timeout=timeout)
    except OSError as e:
        reason = e.strerror or str(e)
        sys.stderr.write(f"bpftune: could not connect to bpftune ({where}): {reason}; "
                         f"is the daemon running?\n")
        return None


def _refused(reply: str) -> bool:
    return reply.startswith(("error: ", "unknown request"))


def client(query: str, port: int = 0) -> int:
    reply = _ask(query, port)
    if reply is None:
        return 1
    sys.stdout.write(reply + "\n")
    return 1 if _refused(reply) else 0


def command(query: str, port: int = 0) -> int:
    """Send a request that changes the daemon: what it did on stdout (exit 0), or why it
    refused as one line on stderr (exit 1)."""
    reply = _ask(query, port, COMMAND_TIMEOUT)
    if reply is None:
        return 1
    if _refused(reply):
        sys.stderr.write(f"bpftune: {reply.removeprefix('error: ').splitlines()[0]}\n")
        return 1
    sys.stdout.write(reply + "\n")
    return 0
