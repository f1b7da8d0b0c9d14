"""A TCP flow over 127.0.0.1 for tests/test_verify.py, run in a namespace with
``ip netns exec``: sender and receiver in one process, its pace read from a file:
"pace" (10 MB/s), "burst" (as fast as it goes) or "stop" (nothing sent)."""

from __future__ import annotations

import socket
import sys
import threading
import time

PACE_BYTES = 10_000_000
CHUNK = 16384


def main(port: int, mode_file: str, lock_rcvbuf: bool) -> None:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if lock_rcvbuf:  # tcp_buffer leaves sockets with a locked buffer alone
        server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    server.bind(("127.0.0.1", port))
    server.listen(1)
    client = socket.create_connection(("127.0.0.1", port))
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 262144)  # locked: send side
    conn, _ = server.accept()
    threading.Thread(target=drain, args=(conn,), daemon=True).start()
    data = b"x" * CHUNK
    sent, started, mode = 0, time.monotonic(), ""
    while True:
        with open(mode_file) as f:
            new = f.read().strip() or mode
        if new != mode:
            sent, started, mode = 0, time.monotonic(), new
        if mode == "stop":
            time.sleep(0.05)
            continue
        if mode == "pace" and sent > PACE_BYTES * (time.monotonic() - started):
            time.sleep(0.002)
            continue
        client.sendall(data)
        sent += len(data)


def drain(conn: socket.socket) -> None:
    while conn.recv(1 << 16):
        pass


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3] == "locked")
