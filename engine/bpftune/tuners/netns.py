"""netns: notice network namespaces created while bpftune runs, so every tuner can act in
them: bpf/netns.bpf.c reports clone() with CLONE_NEWNET; namespaces bind-mounted under
/run/netns (ip netns add, CNI plugins, podman) are looked for each second."""

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
    features = frozenset({"btf", "ringbuf", "raw_tracepoints", "netns_cookie"})
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
        self._created(event.netns_cookie, ref.path if ref else "path not found yet")

    def tick(self, now: float) -> None:
        for ref in self.engine.namespaces.scan_mounted():
            self._created(ref.cookie, ref.path)

    def _created(self, cookie: int, where: str) -> None:
        log.debug(f"netns created (cookie {cookie}, {where})")
        self.engine.changes.count(self, self.tunables[0], self.CREATED, cookie)
