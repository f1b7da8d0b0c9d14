"""Handing a tuner back (``bpftune -E TUNER [--netns NAME|COOKIE]``): the query socket's
``enable TUNER [NETNS]`` request.

Only root may ask. Group membership says nothing here (the socket is group pcp's, so that
the PMDA can read the state): the uid the kernel gives for the peer does (SO_PEERCRED, its
credentials when it connected). Over the TCP port there is no such uid, so the request is
refused there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bpftune.log import log

if TYPE_CHECKING:
    from bpftune.engine import Engine
    from bpftune.query import Peer

REQUEST = "enable"
USAGE = "enable TUNER [NETNS]"
DESCRIPTION = "re-enable a tuner handed over (root)"
NEEDS_ROOT = "re-enabling a tuner needs root"


class HandBackError(Exception):
    """The request is refused; the message is the one line the client shows."""


def is_request(request: str) -> bool:
    return request.split(maxsplit=1)[0] == REQUEST


def answer(engine: Engine, request: str, peer: Peer | None) -> str:
    """The reply to an ``enable`` request: what was done, or ``error: <why not>``."""
    try:
        return _enable(engine, request.split()[1:], peer)
    except HandBackError as e:
        # Anyone in group pcp can ask as often as they like: a refusal is logged, limited.
        who = "a TCP client" if peer is None else f"uid {peer.uid} (pid {peer.pid})"
        log.limited("hand back refused", f"refused '{request}' from {who}: {e}")
        return f"error: {e}"


def _enable(engine: Engine, args: list[str], peer: Peer | None) -> str:
    if peer is None:
        raise HandBackError(f"{NEEDS_ROOT}, which only the Unix socket can tell: refused "
                            f"over the TCP port")
    if peer.uid != 0:
        raise HandBackError(NEEDS_ROOT)
    if not 1 <= len(args) <= 2:
        raise HandBackError(f"usage: {USAGE}")
    return engine.enable(args[0], args[1] if len(args) == 2 else None, peer.uid)
