"""ip_frag: the memory a network namespace may use to reassemble IP fragments.

Fragments wait in per-namespace queues until their datagram is complete; the memory they
hold is capped by ``net.ipv4.ipfrag_high_thresh`` (``net.ipv6.ip6frag_high_thresh`` for
IPv6). Over the cap every new fragment is dropped, so every fragmented datagram fails until
queued fragments time out (``ipfrag_time``, 30 s). bpf/ip_frag.bpf.c proposes a larger cap
when the memory in use nears it; this module checks the proposal against the namespace's
reassembly failure rate (growth that only brings more failures means the fragments are
invalid, e.g. a flood: then the cap is lowered and growth held off) and applies it in the
namespace the fragments arrived in. Upstream behaviour: reference section 5.7; deliberate
differences are marked "Upstream".
"""

from __future__ import annotations

import bisect
import contextlib
import time
from typing import TYPE_CHECKING, ClassVar

from bpftune import procnet, sysctl
from bpftune.btf import Field
from bpftune.changes import due_to
from bpftune.events import Event
from bpftune.hooks import Watch, fentry, raw_tp
from bpftune.log import log
from bpftune.memory import total_ram_bytes
from bpftune.procnet import snmp6_counters
from bpftune.sysctl import SysctlError
from bpftune.tuner import NO_IPV6, Scenario, Tunable, Tuner
from bpftune.verify import REASM6_FAILS, REASM_FAILS

if TYPE_CHECKING:
    from bpftune.engine import Engine

HOLD_SECONDS = 60  # after lowering a threshold, do not raise it again this long
KALLSYMS = "/proc/kallsyms"
#: The functions whose kfree_skb calls drop a fragment refused for lack of reassembly
#: memory, and the -D names of their address ranges in bpf/ip_frag.bpf.c.
DROPPING_FUNCTIONS = {"ip_defrag": "IP_DEFRAG", "ipv6_frag_rcv": "IPV6_FRAG_RCV"}


def _ceiling() -> tuple[int, ...]:
    # The kernel sets no upper bound (proc_doulongvec_minmax, minimum low_thresh) and each
    # namespace has its own cap. Reassembly memory is held by incomplete datagrams for up
    # to ipfrag_time (30 s), so a flood of fragments that never complete can pin all of it:
    # 1/64 of RAM per namespace bounds that, while leaving far more than any real traffic
    # needs (the kernel's 4 MiB default is 1/6000 of a 24 GiB machine).
    return (total_ram_bytes() // 64,)


def kallsyms_ranges(path: str = KALLSYMS) -> dict[str, tuple[int, int]]:
    """The address range [start, end) of each of DROPPING_FUNCTIONS: from its address to
    the next symbol's. Empty when addresses are hidden (kptr_restrict shows zeros)."""
    addresses: list[int] = []
    found: dict[str, int] = {}
    with open(path) as f:
        for line in f:
            address, _, name = line.split()[:3]
            value = int(address, 16)
            addresses.append(value)
            if name in DROPPING_FUNCTIONS:
                found[name] = value
    addresses.sort()
    ranges = {}
    for name, start in found.items():
        after = bisect.bisect_right(addresses, start)
        if start and after < len(addresses):
            ranges[name] = (start, addresses[after])
    return ranges


class IpFragTuner(Tuner):
    name = "ip_frag"
    pmda_cluster = 16
    bpf_source = "ip_frag.bpf.c"
    features = frozenset({"btf", "ringbuf"})
    watches = (
        # fentry sees each fragment before it is queued; kfree_skb only the refused ones.
        Watch("IPv4 reassembly memory", (fentry("ip_defrag"), raw_tp("kfree_skb"))),
        Watch("IPv6 reassembly memory", (fentry("ipv6_frag_rcv"), raw_tp("kfree_skb")),
              optional=True),
    )
    fields: ClassVar[dict[str, Field]] = {
        "OFF_SKB_DEV": Field("sk_buff.dev", 8),
        "OFF_SKB_PROTOCOL": Field("sk_buff.protocol", 2),
        "OFF_DEV_NET": Field("net_device.nd_net.net", 8),
        "OFF_NET_IPV4_FQDIR": Field("net.ipv4.fqdir", 8),
        "OFF_NET_IPV6_FQDIR": Field("net.ipv6.fqdir", 8),
        "OFF_FQDIR_HIGH_THRESH": Field("fqdir.high_thresh", 8),
        "OFF_FQDIR_MEM": Field("fqdir.mem", 8),
    }
    # Upstream writes these in the global netns whatever namespace the fragments arrived in
    # (reference section 9, item 1), so a container's reassembly failures changed the
    # host's limit and never its own. Each namespace has its own limit: we write there.
    HIGH_THRESH = Tunable("net.ipv4.ipfrag_high_thresh", namespaced=True, ceiling=_ceiling,
                          unit="bytes",
                          figures=(REASM_FAILS,))
    HIGH_THRESH6 = Tunable("net.ipv6.ip6frag_high_thresh", namespaced=True, optional=True,
                           ceiling=_ceiling, unit="bytes", absent_when=NO_IPV6,
                           absent_means="only IPv4 reassembly memory is tuned",
                           figures=(REASM6_FAILS,))
    NEED_INCREASE = Scenario("need to increase IP fragmentation high threshold",
                             "this allows additional memory to be used to accommodate more "
                             "defragmentation.")
    NEED_DECREASE = Scenario("need to decrease IP fragmentation high threshold",
                             "as we increased fragmentation high threshold we saw a "
                             "correlation in reassembly failures; this indicates that we "
                             "received more invalid fragments as we added memory to process "
                             "them.  As such, further increases are likely to be ineffective "
                             "so reduce high threshold.",
        verify=False)
    #: The low threshold of each: the kernel refuses a high threshold below it.
    LOW_THRESH: ClassVar[dict[str, str]] = {
        "net.ipv4.ipfrag_high_thresh": "net.ipv4.ipfrag_low_thresh",
        "net.ipv6.ip6frag_high_thresh": "net.ipv6.ip6frag_low_thresh",
    }

    def __init__(self, engine: Engine, tuner_id: int) -> None:
        super().__init__(engine, tuner_id)
        self.clock = time.monotonic
        self.held_until: dict[tuple[str, int], float] = {}
        # (tunable, netns) -> (ReasmFails, ReasmReqds) when last seen
        self.last_counters: dict[tuple[str, int], tuple[int, int]] = {}

    def compile_defines(self) -> list[str]:
        """Address ranges of the functions that drop refused fragments, for the kfree_skb
        hook (none needed with fentry, none known if kallsyms hides addresses)."""
        if not any(h.name == "kfree_skb" for h in self.hooks.hooks.values()):
            return []
        try:
            ranges = kallsyms_ranges()
        except OSError:
            return []
        return [f"-D{DROPPING_FUNCTIONS[name]}_{edge}={address:#x}ULL"
                for name, (start, end) in ranges.items()
                for edge, address in (("START", start), ("END", end))]

    def table_sizes(self) -> dict[str, int]:
        return {"held": len(self.held_until), "counters": len(self.last_counters)}

    def netns_destroyed(self, cookie: int) -> None:
        for table in (self.held_until, self.last_counters):
            for key in [k for k in table if k[1] == cookie]:
                del table[key]

    def handle(self, event: Event) -> None:
        tunable = self.tunables[event.tunable_id]
        cookie = event.netns_cookie
        (old,) = event.old_values(1)
        (proposed,) = event.new_values(1)
        if self.value(tunable, cookie) != (old,):
            return  # stale: an earlier event changed it already (one sample per value)
        failures = self.correlation(tunable.name, cookie)
        rate = self.fail_rate(tunable, cookie)
        if rate is not None:
            failures.add(proposed, rate)
        if failures.correlated():
            self._shrink(tunable, cookie, old)
            return
        if self.clock() < self.held_until.get((tunable.name, cookie), 0):
            return
        self.change(tunable, self.NEED_INCREASE, cookie, (proposed,),
                    due_to("approaching fragmentation maximum threshold", tunable),
                    expect=(old,))

    def _shrink(self, tunable: Tunable, cookie: int, old: int) -> None:
        smaller = max(self.learning_rate.shrink(old), self._low_thresh(tunable, cookie))
        # Upstream logs the growth line ("approaching ...") for this decrease too.
        why = "correlation between fragmentation threshold increases and reassembly failures"
        if smaller < old and self.change(tunable, self.NEED_DECREASE, cookie, (smaller,),
                                         due_to(why, tunable), expect=(old,)):
            # Upstream shrinks and grows in turn, one event each; we hold growth off for a
            # while and start the correlation afresh.
            self.correlation(tunable.name, cookie).reset()
            self.held_until[(tunable.name, cookie)] = self.clock() + HOLD_SECONDS

    def _low_thresh(self, tunable: Tunable, cookie: int) -> int:
        with contextlib.suppress(SysctlError), self.entered(cookie):
            return sysctl.read(self.LOW_THRESH[tunable.name])[0]
        return 0

    def fail_rate(self, tunable: Tunable, cookie: int) -> int | None:
        """Percentage of fragments that failed reassembly in the namespace since the last
        event for this tunable there; None the first time (no interval yet).

        Upstream divides counters since boot: after a history of good reassemblies the rate
        creeps up while failures come in, as the threshold grows, so growth itself looked
        correlated with failures. It also divides without checking for zero requests."""
        fails, reqds = self.reassembly_counters(tunable, cookie)
        last = self.last_counters.get((tunable.name, cookie))
        self.last_counters[(tunable.name, cookie)] = (fails, reqds)
        if last is None:
            return None
        fails, reqds = fails - last[0], reqds - last[1]
        rate = fails * 100 // reqds if reqds > 0 else 0
        log.debug(f"{self.name}: {tunable.name} in netns {cookie}: {fails} of {reqds} "
                  f"fragments failed reassembly since the last event ({rate}%)")
        return rate

    def reassembly_counters(self, tunable: Tunable, cookie: int) -> tuple[int, int]:
        """(ReasmFails, ReasmReqds) of the tunable's IP version in the namespace."""
        with self.entered(cookie):
            if tunable == self.HIGH_THRESH:
                counters = procnet.counters()
                return counters.get("Ip:ReasmFails", 0), counters.get("Ip:ReasmReqds", 0)
            counters = snmp6_counters()
            return counters.get("Ip6ReasmFails", 0), counters.get("Ip6ReasmReqds", 0)
