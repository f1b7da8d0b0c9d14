"""Advice mode (``bpftune --advise``): every decision a tuner makes becomes a recommendation
instead of a write.

A recommendation names what would change and why, the value now and the one proposed, and
the exact commands that apply it (in the namespace it is for). Its id is stable: a hash of
the tuner, tunable, namespace name and scenario, so the same advice has the same id on
every run and every host ("global" and ``ip netns`` names are the same everywhere; a
namespace without a name is known by its cookie, which is not). A later proposal for the
same id replaces the earlier one (a tuner proposes again as long as the condition lasts).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from bpftune.sysctl import Value, format_value


def advice_id(tuner: str, tunable: str, netns: str, scenario: str, subject: str = "") -> str:
    import hashlib  # only in advice mode: its import (OpenSSL) costs the daemon 3.7 MiB

    key = "\0".join((tuner, tunable, netns, scenario, *([subject] if subject else []))).encode()
    return hashlib.sha256(key).hexdigest()[:12]


@dataclass
class Recommendation:
    id: str
    tuner: str
    tunable: str
    netns: str  # "global", the ip netns name, or cookie-N
    cookie: int
    scenario: str
    reason: str  # the "Due to ..." line, values filled in
    current: list[int] | str
    proposed: list[int] | str
    commands: list[str]
    first: float = field(default_factory=time.time)
    last: float = field(default_factory=time.time)
    proposals: int = 1  # times proposed, this one included
    #: What a per-socket tunable is advised for (tcp_conn: the remote host); part of the id.
    subject: str = ""

    @property
    def text_values(self) -> tuple[str, str]:
        return _text(self.current), _text(self.proposed)

    def as_dict(self) -> dict:
        return asdict(self)


def _text(v: list[int] | str) -> str:
    return v if isinstance(v, str) else format_value(tuple(v))


def _stored(v: Value) -> list[int] | str:
    return v if isinstance(v, str) else list(v)


class Advice:
    """The recommendations of a daemon in advice mode, by id."""

    def __init__(self, restored: list[dict] | None = None) -> None:
        self.items: dict[str, Recommendation] = {}
        for raw in restored or ():
            try:
                r = Recommendation(**raw)
            except TypeError:
                continue  # a record from another version: its advice comes again
            self.items[r.id] = r

    def propose(self, *, tuner: str, tunable: str, netns: str, cookie: int, scenario: str,
                reason: str, current: Value, proposed: Value, commands: list[str],
                subject: str = "") -> tuple[Recommendation, bool, bool]:
        """Record a proposal; the recommendation, whether it is new, and whether it differs
        from what that id recommended before (a new one does)."""
        rid = advice_id(tuner, tunable, netns, scenario, subject)
        now = time.time()
        fresh = Recommendation(rid, tuner, tunable, netns, cookie, scenario, reason,
                               _stored(current), _stored(proposed), commands, now, now,
                               subject=subject)
        old = self.items.get(rid)
        if old is None:
            self.items[rid] = fresh
            return fresh, True, True
        changed = (old.proposed, old.current, old.commands) != (fresh.proposed, fresh.current,
                                                                 fresh.commands)
        fresh.first, fresh.proposals = old.first, old.proposals + 1
        self.items[rid] = fresh
        return fresh, False, changed

    def forget_netns(self, cookie: int) -> None:
        self.items = {k: r for k, r in self.items.items() if r.cookie != cookie or
                      r.netns == "global"}

    def count(self, tuner: str) -> int:
        return sum(r.tuner == tuner for r in self.items.values())

    def ordered(self) -> list[Recommendation]:
        return sorted(self.items.values(), key=lambda r: (r.tuner, r.tunable, r.netns, r.id))
