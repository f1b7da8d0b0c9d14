"""udp_buffer: UDP receive buffer limits (rmem_default, rmem_max) and UDP memory (udp_mem).

UDP has no receive-buffer auto-tuning: a socket's buffer is rmem_default when it is created,
or what it asks for with SO_RCVBUF capped by rmem_max, and a burst bigger than that is
dropped. bpf/udp_buffer.bpf.c sees such drops and proposes growing the limit that capped
the socket; this module checks that drops are frequent enough to be worth more memory and
that UDP memory as a whole is not the problem, then applies the change through the engine.
When UDP memory (udp_mem) refuses datagrams it grows udp_mem, and once udp_mem is at its
ceiling it makes new sockets' buffers smaller instead. Upstream behaviour: reference section
5.8; deliberate differences are marked "Upstream".
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, ClassVar

from bpftune import procnet
from bpftune.bpf import PROTO_MEMORY_FIELDS
from bpftune.btf import Field
from bpftune.changes import due_to, within_ceiling
from bpftune.events import Event
from bpftune.hooks import Watch, raw_tp
from bpftune.log import log
from bpftune.memory import total_ram_bytes, total_ram_pages
from bpftune.tuner import Scenario, Tunable, Tuner
from bpftune.verify import UDP_MEM as UDP_MEM_DROPS
from bpftune.verify import UDP_RCVBUF

if TYPE_CHECKING:
    from bpftune.engine import Engine

UDP_BUFFER_MIN = 8192  # upstream's lower bound: never shrink a buffer limit below it
UDP_BUFFER_MAX = 256 << 20  # upstream's upper bound (256 MiB)
#: Grow a buffer limit only if receive-buffer drops are at least this many per 1000
#: datagrams delivered, since the last look at that netns: rarer drops are not worth the
#: memory (and the queueing delay) of bigger buffers for every socket.
MIN_DROP_RATE = 1


def _buffer_ceiling() -> tuple[int, ...]:
    # One socket's buffer: upstream's 256 MiB, and at most 1/32 of RAM (as tcp_buffer's).
    return (min(UDP_BUFFER_MAX, total_ram_bytes() // 32),)


def _udp_mem_ceiling() -> tuple[int, ...]:
    # UDP as a whole, in pages: as tcp_mem's, 1/16, 1/8 and 1/4 of RAM.
    ram = total_ram_pages()
    return (ram // 16, ram // 8, ram // 4)


def udp_counters() -> tuple[int, int]:
    """Datagrams delivered and datagrams dropped for a full receive buffer, IPv4 and IPv6,
    in the calling thread's netns."""
    counters = procnet.counters()
    delivered, drops = counters.get("Udp:InDatagrams", 0), counters.get("Udp:RcvbufErrors", 0)
    with contextlib.suppress(OSError), open("/proc/net/snmp6") as f:  # no IPv6: no file
        udp6 = dict(line.split()[:2] for line in f if line.startswith("Udp6"))
        delivered += int(udp6.get("Udp6InDatagrams", 0))
        drops += int(udp6.get("Udp6RcvbufErrors", 0))
    return delivered, drops


def change_line(why: str, tunable: Tunable) -> str:
    """Upstream's reason line for rmem_*: no parentheses around the values."""
    return f"Due to {why} change {tunable.name} from {{old}} -> {{new}}"


class UdpBufferTuner(Tuner):
    name = "udp_buffer"
    pmda_cluster = 17
    bpf_source = "udp_buffer.bpf.c"
    features = frozenset({"btf", "ringbuf"})
    watches = (
        Watch("UDP receive buffer full", (raw_tp("udp_fail_queue_rcv_skb", sampled=True),),
              sample="udp_rcvbuf_sample"),
        # Where both watches take udp_fail_queue_rcv_skb, one program serves both.
        # udp_fail_queue_rcv_skb reports memory drops (-ENOBUFS) only before Linux 6.18,
        # whose per-NUMA receive queues (udp_sock.udp_prod_queue) drop such datagrams
        # inside the enqueue, where only kfree_skb sees them.
        Watch("UDP memory limits",
              (raw_tp("udp_fail_queue_rcv_skb", unless="udp_sock.udp_prod_queue", sampled=True),
               raw_tp("kfree_skb", sampled=True)), optional=True, sample="udp_mem_sample"),
    )
    fields: ClassVar[dict[str, Field]] = {
        **PROTO_MEMORY_FIELDS,
        "OFF_SK_RCVBUF": Field("sock.sk_rcvbuf", 4),
        # A 4-bit bitfield before Linux 6.9, a byte since: READ_FIELD reads both.
        "OFF_SK_USERLOCKS": Field("sock.sk_userlocks", 1),
        "OFF_SK_PROTOCOL": Field("sock.sk_protocol", 2),
    }
    constants: ClassVar[dict[str, tuple[str, str]]] = {
        "DROP_PROTO_MEM": ("skb_drop_reason", "SKB_DROP_REASON_PROTO_MEM"),
    }
    # Tunables; the attribute names are the TUNABLE_* ids in bpf/udp_buffer.bpf.c.
    UDP_MEM = Tunable("net.ipv4.udp_mem", 3, ceiling=_udp_mem_ceiling,
                      positions=("min", "pressure", "max"), unit="pages", figures=(UDP_MEM_DROPS,))
    RMEM_MAX = Tunable("net.core.rmem_max", ceiling=_buffer_ceiling, unit="bytes",
                       figures=(UDP_RCVBUF,))
    RMEM_DEFAULT = Tunable("net.core.rmem_default", ceiling=_buffer_ceiling, unit="bytes",
                           figures=(UDP_RCVBUF,))
    # Scenarios; the attribute names are the SCENARIO_* ids in bpf/udp_buffer.bpf.c.
    NEED_INCREASE = Scenario("need to increase UDP buffer size(s)",
                             "Need to increase buffer size(s) to maximize throughput and "
                             "reduce loss")
    NEED_DECREASE = Scenario("need to decrease UDP buffer size(s)",
                             "Need to decrease buffer size(s) to reduce memory utilization",
        verify=False)
    MEM_PRESSURE = Scenario("approaching UDP memory pressure",
                            "Since memory pressure/exhaustion are unstable system states, "
                            "adjust UDP memory-related tunables")
    MEM_EXHAUSTION = Scenario("approaching UDP memory exhaustion",
                              "Since memory exhaustion is a highly unstable state, adjust UDP "
                              "memory-related tunables to avoid exhaustion")

    def __init__(self, engine: Engine, tuner_id: int) -> None:
        super().__init__(engine, tuner_id)
        #: Per netns: UDP (delivered, receive-buffer drops) at the last look.
        self.udp_seen: dict[int, tuple[int, int]] = {}
        #: Buffer limits were shrunk for the UDP memory shortage going on now.
        self.shrunk_for_memory = False

    def table_sizes(self) -> dict[str, int]:
        return {"udp_seen": len(self.udp_seen)}

    def netns_destroyed(self, cookie: int) -> None:
        self.udp_seen.pop(cookie, None)

    def handle(self, event: Event) -> None:
        tunable = self.tunables[event.tunable_id]
        if tunable == self.UDP_MEM:
            self._udp_memory(event)
        elif self.scenarios[event.scenario_id] == self.NEED_INCREASE:
            self._grow_buffer(tunable, event)

    def tick(self, now: float) -> None:
        if self.shrunk_for_memory and not self._memory_tight():
            self.shrunk_for_memory = False  # the shortage is over: a new one may shrink again

    # Receive buffer limits.
    def _grow_buffer(self, tunable: Tunable, event: Event) -> None:
        cookie = event.netns_cookie
        (old,), (new,) = event.old_values(1), event.new_values(1)
        if self.value(tunable) != (old,):
            return  # stale: an earlier event already changed it
        rate = self._drop_rate(cookie)
        # Upstream grows on every drop (its "XXX add logic to spot unneeded increases").
        if rate < MIN_DROP_RATE:
            log.debug(f"{self.name}: not growing '{tunable.name}': drop rate {rate} per 1000")
            return
        if self._memory_tight():
            # Bigger buffers would only move the drops to UDP memory (udp_mem), which is
            # what is short now.
            log.debug(f"{self.name}: not growing '{tunable.name}': UDP memory nearly full")
            return
        why = "need to increase receive buffer size to maximize throughput"
        self.change(tunable, self.NEED_INCREASE, cookie, (new,), change_line(why, tunable),
                    expect=(old,))

    def _drop_rate(self, cookie: int) -> int:
        """Receive-buffer drops per 1000 datagrams delivered in the event's netns since the
        last look there (since boot the first time), logged as upstream does."""
        with self.entered(cookie):
            now = udp_counters()
        before = self.udp_seen.get(cookie, (0, 0))
        self.udp_seen[cookie] = now
        delivered, drops = now[0] - before[0], now[1] - before[1]
        rate = drops * 1000 // max(delivered, 1)  # upstream divides by zero here
        log.notice(f"netns: {cookie} UDP in {delivered}, drops {drops} drop rate {rate}")
        return rate

    def _memory_tight(self) -> bool:
        """UDP memory is nearly at udp_mem[0], where the kernel starts refusing it."""
        (limit, _, _) = self.value(self.UDP_MEM)
        return self.learning_rate.nearly_full(procnet.memory_pages("UDP"), limit)

    # UDP memory.
    def _udp_memory(self, event: Event) -> None:
        old, proposed = event.old_values(3), event.new_values(3)
        if self.value(self.UDP_MEM) != old:
            return  # stale: an earlier event already changed it
        exhaustion = self.scenarios[event.scenario_id] == self.MEM_EXHAUSTION
        why = "near memory exhaustion" if exhaustion else "near memory pressure"
        # Upstream writes 0 for the values it does not grow; the change path caps each value
        # at its ceiling. Only udp_mem[0] relieves UDP's drops (see the BPF side), so when
        # it cannot grow, growing the others would change nothing.
        if within_ceiling(proposed, self.UDP_MEM.limits())[0] > old[0]:
            self.change(self.UDP_MEM, event.scenario_id, 0, proposed, due_to(why, self.UDP_MEM),
                        expect=old)
        else:
            self._shrink_buffers(why)

    def _shrink_buffers(self, why: str) -> None:
        """udp_mem may grow no more: give new sockets smaller buffers, once per shortage
        (shrinking on every drop would take them to the minimum in a second, and sockets
        that exist keep their buffers anyway). Upstream meant to do this, but its code can
        never get there, and would have changed rmem_max in place of rmem_default."""
        if self.shrunk_for_memory:
            return
        self.shrunk_for_memory = True
        for tunable in (self.RMEM_MAX, self.RMEM_DEFAULT):
            (old,) = self.value(tunable)
            smaller = max(self.learning_rate.shrink(old), UDP_BUFFER_MIN)
            if smaller < old:
                self.change(tunable, self.NEED_DECREASE, 0, (smaller,),
                            change_line(why, tunable), expect=(old,))
