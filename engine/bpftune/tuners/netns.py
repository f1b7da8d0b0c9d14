"""netns: count network namespaces created and destroyed while bpftune runs.

bpf/netns.bpf.c reports clone() with CLONE_NEWNET (a process that exits at once is found by
one coalesced rescan a second later); names under /run/netns and destruction come from
``bpftune.netns_watch``. The engine tells every tuner, so each can act in a new namespace
and forget a gone one."""

from __future__ import annotations

from typing import ClassVar

from bpftune.btf import Field
from bpftune.events import Event
from bpftune.hooks import Watch, fexit, raw_tp
from bpftune.tuner import Scenario, Tunable, Tuner


class NetnsTuner(Tuner):
    name = "netns"
    pmda_cluster = 14
    bpf_source = "netns.bpf.c"
    acts_in_netns = False
    features = frozenset({"btf", "ringbuf", "netns_cookie"})
    watches = (
        # copy_net_ns makes every new namespace, by clone() or unshare(); fork is the
        # hook every kernel has, and sees only clone() (see bpf/netns.bpf.c).
        Watch("namespace creation", (fexit("copy_net_ns"), raw_tp("sched_process_fork"))),
    )
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
    CREATED, DESTROYED = 0, 1

    def handle(self, event: Event) -> None:
        self.engine.namespaces.add(event.netns_cookie, event.pid)
        self.engine.announce_new_namespaces()

    def init(self) -> None:
        self.missed = 0

    def tick(self, now: float) -> None:
        # Past its budget the BPF program only counts the namespaces it did not report.
        missed = self.bpf["missed"][0].value
        if missed != self.missed:
            self.missed = missed
            self.engine.namespaces.rescan_wanted = True  # done by the engine's tick

    def netns_created(self, cookie: int) -> None:
        self.engine.changes.count(self, self.tunables[0], self.CREATED, cookie)

    def netns_destroyed(self, cookie: int) -> None:
        self.engine.changes.count(self, self.tunables[0], self.DESTROYED, cookie)
