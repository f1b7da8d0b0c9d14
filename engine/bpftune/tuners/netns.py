"""netns: notice network namespaces created while bpftune runs, so every tuner can act in
them (bpf/netns.bpf.c reports unshare() and clone() with CLONE_NEWNET)."""

from __future__ import annotations

from typing import ClassVar

from bpftune.btf import Field
from bpftune.events import Event
from bpftune.log import log
from bpftune.tuner import Scenario, Tunable, Tuner


class NetnsTuner(Tuner):
    name = "netns"
    pmda_cluster = 14
    bpf_source = "netns.bpf.c"
    tracepoints = ("syscalls/sys_enter_unshare", "syscalls/sys_exit_unshare")
    features = frozenset({"btf", "ringbuf", "tracepoints", "raw_tracepoints", "netns_cookie"})
    fields: ClassVar[dict[str, Field]] = {
        "OFF_TASK_NSPROXY": Field("task_struct.nsproxy", 8),
        "OFF_TASK_TGID": Field("task_struct.tgid", 4),
        "OFF_NSPROXY_NET_NS": Field("nsproxy.net_ns", 8),
    }
    tunables = (Tunable("network_namespace", 0, namespaced=True, sysctl=False),)
    scenarios = (
        Scenario("netns created", "network namespace creation"),
        Scenario("netns destroyed", "network namespace destruction"),
    )
    CREATED = 0

    def handle(self, event: Event) -> None:
        ref = self.engine.namespaces.add(event.netns_cookie, event.pid)
        where = ref.path if ref else "path not found yet"
        log.debug(f"netns created (cookie {event.netns_cookie}, {where})")
        self.engine.changes.count(self, self.tunables[0], self.CREATED, event.netns_cookie)
