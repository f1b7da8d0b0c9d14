"""The query interface: a server inside the daemon and the ``bpftune -q`` client.

Upstream's queries (reference section 2) keep upstream's output formats; ``state`` is ours:
the complete state as JSON, which the PCP PMDA polls. The server listens on a Unix socket
(mode 0660, group pcp where it exists, so the PMDA can read it without root) and, with -p,
on 127.0.0.1 only (upstream binds every interface).

Protocol (as upstream): the client sends the query name (a NUL or newline ends it), the
server sends the reply followed by a NUL and closes the connection.
"""

from __future__ import annotations

import contextlib
import grp
import os
import socket
import socketserver
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bpftune.log import log
from bpftune.paths import QUERY_SOCKET

if TYPE_CHECKING:
    from bpftune.engine import Engine

MAX_REQUEST = 256
MAX_REPLY = 16 << 20
TIMEOUT = 5.0


@dataclass(frozen=True)
class Query:
    name: str
    description: str
    handler: Callable[[Engine], str]


def _reply_for(engine: Engine, request: str) -> str:
    from bpftune import report

    for q in report.QUERIES:
        if request.startswith(q.name):  # upstream matches by prefix, in table order
            return q.handler(engine)
    return f"unknown request '{request}'; supported requests are:\n" + report.help_text(engine)


def _read_request(sock: socket.socket) -> str:
    data = b""
    while len(data) <= MAX_REQUEST:
        chunk = sock.recv(MAX_REQUEST + 1 - len(data))
        if not chunk:
            break
        data += chunk
        if b"\0" in data or b"\n" in data:
            break
    if len(data) > MAX_REQUEST:
        raise ValueError(f"request longer than {MAX_REQUEST} bytes")
    request = data.split(b"\0")[0].split(b"\n")[0].strip()
    if not request:
        raise ValueError("empty request")
    return request.decode()  # UnicodeDecodeError is a ValueError


def _close_gently(sock: socket.socket) -> None:
    """Closing with unread input sends a reset, which can destroy the reply before the
    client reads it: finish sending, then drain a bounded amount of what is left."""
    sock.shutdown(socket.SHUT_WR)
    sock.settimeout(0.5)
    drained = 0
    while drained < 1 << 16 and (chunk := sock.recv(4096)):
        drained += len(chunk)


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        sock = self.request
        sock.settimeout(TIMEOUT)
        try:
            request = _read_request(sock)
        except (ValueError, OSError) as e:
            reply = f"error: {e}"
        else:
            try:
                with self.server.engine.lock:
                    reply = _reply_for(self.server.engine, request)
            except Exception as e:  # a query must never take the daemon down
                log.err(f"query '{request}' failed: {e!r}")
                reply = f"error: query '{request}' failed: {e}"
        with contextlib.suppress(OSError):
            sock.sendall(reply.encode() + b"\0")
            _close_gently(sock)


class _Server(socketserver.ThreadingMixIn, socketserver.BaseServer):
    daemon_threads = True
    engine: Engine


class _UnixServer(_Server, socketserver.UnixStreamServer):
    pass


class _TcpServer(_Server, socketserver.TCPServer):
    allow_reuse_address = True


class QueryServer:
    """Serves queries from background threads until closed."""

    def __init__(self, engine: Engine, port: int = 0, path: str = QUERY_SOCKET) -> None:
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self.servers: list[_Server] = [_UnixServer(path, _Handler)]
        self._share_with_pcp(path)
        if port:
            self.servers.append(_TcpServer(("127.0.0.1", port), _Handler))
        for s in self.servers:
            s.engine = engine
            threading.Thread(target=s.serve_forever, name="bpftune-query", daemon=True).start()
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
        for s in self.servers:
            s.shutdown()
            s.server_close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def request(query: str, port: int = 0, path: str = QUERY_SOCKET) -> str:
    """Send one query to the daemon; raises OSError if it cannot be reached."""
    if port:
        s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    else:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(TIMEOUT)
        try:
            s.connect(path)
        except OSError:
            s.close()
            raise
    with s:
        s.sendall(query.encode() + b"\0")
        chunks, size = [], 0
        while chunk := s.recv(65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_REPLY:
                raise OSError("reply too large")
    return b"".join(chunks).rstrip(b"\0").decode(errors="replace")


def client(query: str, port: int = 0) -> int:
    where = f"127.0.0.1:{port}" if port else QUERY_SOCKET
    try:
        reply = request(query, port)
    except OSError as e:
        reason = e.strerror or str(e)
        sys.stderr.write(f"bpftune: could not connect to bpftune ({where}): {reason}; "
                         f"is the daemon running?\n")
        return 1
    sys.stdout.write(reply + "\n")
    return 1 if reply.startswith(("error: ", "unknown request")) else 0
