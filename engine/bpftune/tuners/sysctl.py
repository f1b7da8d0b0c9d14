"""sysctl: step aside when an administrator changes a tunable a tuner manages.

bpf/sysctl.bpf.c reports writes by other processes to the sysctls tuners manage (with the
writer's netns), on a ring buffer of their own; a write hands the tuner over to the
administrator in that netns, or everywhere when the write was in the global netns. Writes in
the global netns are also counted in a map read each second, so none is missed even when
its event is lost.
"""

from __future__ import annotations

import contextlib
from typing import ClassVar

from bpftune import sysctl
from bpftune.btf import Field
from bpftune.events import Event
from bpftune.log import log
from bpftune.tuner import CgroupProgram, Tuner

PROGRAM = "bpftune_sysctl_write"
MAX_MANAGED = 64  # as bpf/sysctl.bpf.c


def command_of(event: Event) -> str:
    """The writer's command line's first word, as upstream logs it; the writer may be gone
    already (``sysctl -w`` exits at once), so fall back to the comm BPF recorded."""
    with contextlib.suppress(OSError), open(f"/proc/{event.pid}/cmdline", "rb") as f:
        if cmd := f.read().split(b"\0")[0].decode(errors="replace"):
            return cmd
    return event.command or "?"


class SysctlTuner(Tuner):
    name = "sysctl"
    pmda_cluster = 13
    bpf_source = "sysctl.bpf.c"
    acts_in_netns = False
    features = frozenset({"btf", "ringbuf", "cgroup_sysctl"})
    cgroup_programs = (CgroupProgram(PROGRAM, "sysctl"),)
    fields: ClassVar[dict[str, Field]] = {
        "OFF_TASK_NSPROXY": Field("task_struct.nsproxy", 8),
        "OFF_NSPROXY_NET_NS": Field("nsproxy.net_ns", 8),
    }

    def init(self) -> None:
        self.slots: list[str] = []  # names the BPF program reports, by slot
        self.global_writes_seen: list[int] = []

    def started(self) -> None:
        """Tell the BPF program which sysctls to report: every other tuner's."""
        names = {name for tuner in self.engine.active_tuners() if tuner is not self
                 for t in tuner.tunables if t.sysctl for name in t.access.names(t.name)}
        self.slots = sorted(names)[:MAX_MANAGED]
        managed = self.bpf["managed"]
        for slot, name in enumerate(self.slots):
            managed[managed.Key(name.replace(".", "/").encode())] = managed.Leaf(slot)
        self.global_writes_seen = [0] * len(self.slots)
        self.all_global_writes_seen = 0

    def handle(self, event: Event) -> None:
        cookie = event.netns_cookie
        if self.engine.namespaces.is_global(cookie):
            slot = event.tunable_id
            self.global_writes_seen[slot] = max(self.global_writes_seen[slot], event.metric[0])
        else:  # known namespaces are forgotten when destroyed; see Changes.hand_over
            self.engine.namespaces.add(cookie, event.pid)
        self._hand_over(sysctl.name_of(event.text), cookie,
                        f"pid {event.pid}, cmd '{command_of(event)}'")

    def tick(self, now: float) -> None:
        """Global writes whose events were lost (a full ring buffer) are still counted."""
        counts = self.bpf["global_writes"]
        total = counts[counts.Key(MAX_MANAGED)].value
        if total == self.all_global_writes_seen:  # one lookup a second, not one per slot
            return
        self.all_global_writes_seen = total
        for slot, name in enumerate(self.slots):
            count = counts[counts.Key(slot)].value
            if count > self.global_writes_seen[slot]:
                self.global_writes_seen[slot] = count
                self._hand_over(name, self.engine.namespaces.global_cookie,
                                "a process whose write event was lost")

    def _hand_over(self, name: str, cookie: int, who: str) -> None:
        for tuner in self.engine.active_tuners():
            if tuner is self or not any(name in t.access.names(t.name) for t in tuner.tunables):
                continue
            if self.engine.changes.is_manual(tuner, cookie):
                continue
            if self.engine.changes.advice is not None:  # nothing of bpftune's to protect
                log.limited("sysctl hand-over", f"{who} modified sysctl '{name}' that tuner "
                            f"'{tuner.name}' uses; advice mode: it goes on advising")
                continue
            message = (f"{who} modified sysctl '{name}' that tuner '{tuner.name}' uses; "
                       f"disabling '{tuner.name}' for namespace cookie {cookie}")
            if self.engine.namespaces.is_global(cookie):
                log.notice(message)
            else:  # anyone can write in namespaces of their own, as often as they like
                log.limited("sysctl hand-over", message)
            self.engine.disable(tuner, cookie, name, self._written(name, cookie), message)

    def _written(self, name: str, cookie: int) -> sysctl.Value | None:
        """What the administrator wrote (as it is now), for the audit trail."""
        try:
            with self.engine.namespaces.entered(cookie):
                text = sysctl.read(name, string=True)
        except OSError:  # the namespace (or the writer's netns) may be gone already
            return None
        try:
            return tuple(int(v) for v in text.split())
        except ValueError:
            return text
