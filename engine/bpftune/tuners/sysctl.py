"""sysctl: step aside when an administrator changes a tunable a tuner manages.

bpf/sysctl.bpf.c reports every sysctl write by another process (with the writer's netns);
a write to any tuner's tunable hands that tuner over to the administrator in that netns, or
everywhere when the write was in the global netns.
"""

from __future__ import annotations

import contextlib
from typing import ClassVar

from bpftune import sysctl
from bpftune.bpf import BPF_CGROUP_SYSCTL, BPF_PROG_TYPE_CGROUP_SYSCTL
from bpftune.btf import Field
from bpftune.events import Event
from bpftune.log import log
from bpftune.tuner import Tuner

PROGRAM = "bpftune_sysctl_write"


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
    features = frozenset({"btf", "ringbuf", "cgroup_sysctl"})
    fields: ClassVar[dict[str, Field]] = {
        "OFF_TASK_NSPROXY": Field("task_struct.nsproxy", 8),
        "OFF_NSPROXY_NET_NS": Field("nsproxy.net_ns", 8),
    }

    def init(self) -> None:
        cgroup = self.engine.cgroup
        cgroup.detach_stale([PROGRAM])
        cgroup.attach(self.bpf, PROGRAM, BPF_PROG_TYPE_CGROUP_SYSCTL, BPF_CGROUP_SYSCTL)

    def fini(self) -> None:
        self.engine.cgroup.detach(self.bpf, PROGRAM, BPF_CGROUP_SYSCTL)

    def handle(self, event: Event) -> None:
        name = sysctl.name_of(event.text)
        cookie = event.netns_cookie
        for tuner in self.engine.active_tuners():
            if tuner is self or not any(t.name == name for t in tuner.tunables):
                continue
            if self.engine.changes.is_manual(tuner, cookie):
                continue
            log.notice(f"pid {event.pid}, cmd '{command_of(event)}' modified sysctl "
                       f"'{name}' that tuner '{tuner.name}' uses; disabling '{tuner.name}' "
                       f"for namespace cookie {cookie}")
            self.engine.disable(tuner, cookie)
