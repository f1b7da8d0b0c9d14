"""Client side of the query interface (``bpftune -q``)."""

from __future__ import annotations

import socket
import sys

from bpftune.engine import RUN_DIR

SOCKET_PATH = f"{RUN_DIR}/query.sock"
MAX_REPLY = 1 << 20


def client(request: str, port: int = 0) -> int:
    try:
        if port:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
        else:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            s.connect(SOCKET_PATH)
    except OSError as e:
        where = f"port {port}" if port else SOCKET_PATH
        sys.stderr.write(f"bpftune: could not connect to bpftune ({where}): {e.strerror}; "
                         f"is the daemon running?\n")
        return 1
    with s:
        s.sendall(request.encode() + b"\0")
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
            if sum(map(len, chunks)) > MAX_REPLY:
                break
    sys.stdout.write(b"".join(chunks).rstrip(b"\0").decode(errors="replace") + "\n")
    return 0
