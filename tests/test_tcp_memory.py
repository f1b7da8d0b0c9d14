"""tcp_buffer on upstream's own TCP memory scenarios, with real traffic on this machine's
real RAM: iperf3 streams from the global netns into a test netns, the whole TCP memory
being limited by the global tcp_mem.

Each daemon starts from the state directory the previous test's daemon left
(``carried_state``), as /var/lib/bpftune/ carries over between runs on a real host."""

from __future__ import annotations

import re
import threading
import time

from bpftune.memory import total_ram_pages
from helpers import Iperf, daemon, read_sysctl, values

TCP_MEM = "net.ipv4.tcp_mem"
LOW_MEMORY_FLAGS = ("net.ipv4.tcp_no_metrics_save", "net.ipv4.tcp_no_ssthresh_metrics_save",
                    "net.core.high_order_alloc_disable")
ENTERED = "Due to low memory conditions, set 'net.ipv4.tcp_no_metrics_save'"
LEFT = "Due to leaving low memory conditions, set 'net.ipv4.tcp_no_metrics_save'"


def remember_low_memory_settings(sysctls) -> None:
    for name in (*LOW_MEMORY_FLAGS, "net.ipv4.tcp_max_syn_backlog"):
        sysctls.remember(name)


def test_tcp_mem_max_far_above_its_ceiling_comes_down(tmp_path, sysctls, hosts, carried_state):
    """tcp_mem 50 100 2000000000, then 50 streams: pressure and min grow, and the max,
    2e9 pages (8 TB) on a machine of a few GiB, is written as RAM/4 with them: every value
    bpftune writes is within its ceiling."""
    remember_low_memory_settings(sysctls)
    sysctls.set(TCP_MEM, "50 100 2000000000")
    ceiling = total_ram_pages() // 4
    iperf = Iperf(hosts.ns, hosts.ns_addr)
    try:
        with daemon(tmp_path, state=carried_state) as d:
            iperf.run(None, seconds=3, streams=50)
            d.wait_for(rf"Due to near memory pressure change {TCP_MEM}\(min pressure max\) "
                       rf"from \(50 100 2000000000\) -> \(\d+ \d+ {ceiling}\)")
            d.wait_for(rf"'{TCP_MEM}' \(50 100 2000000000\) is above its ceiling "
                       rf"\(\d+ \d+ {ceiling}\): writing at most the ceiling")
            low, pressure, high = values(read_sysctl(TCP_MEM))
            assert low > 50 and pressure > 100, (low, pressure)
            assert high <= ceiling
    finally:
        iperf.stop()


class TcpMemoryLog:
    """When each line of interest appeared in the daemon's log, relative to the start."""

    def __init__(self, daemon_log) -> None:
        self.daemon_log = daemon_log
        self.start = time.monotonic()
        self.seen: dict[str, float] = {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch)
        self.thread.start()

    def _watch(self) -> None:
        while not self.done.wait(0.2):
            self._look()

    def _look(self) -> None:
        text = self.daemon_log()
        for line in (ENTERED, LEFT):
            if line in text and line not in self.seen:
                self.seen[line] = time.monotonic() - self.start

    def stop(self) -> None:
        self.done.set()
        self.thread.join()
        self._look()


def test_low_memory_settings_last_as_long_as_the_load(tmp_path, sysctls, hosts, carried_state):
    """tcp_mem 20 50 50, then 100 streams for 25 s: near exhaustion the low-memory settings
    are made, tcp_mem grows, and TCP memory use stays as high as before under the grown
    limits. The settings must stay while the load runs, and be undone once it has ended
    and TCP memory use has come down. (Undone after 5 s without an event, they were undone
    around 15 s into the load, to be made again when use next rose.)"""
    remember_low_memory_settings(sysctls)
    sysctls.set(TCP_MEM, "20 50 50")
    load_seconds = 25
    iperf = Iperf(hosts.ns, hosts.ns_addr)
    try:
        with daemon(tmp_path, state=carried_state) as d:
            times = TcpMemoryLog(lambda: d.log)
            try:
                iperf.run(None, seconds=load_seconds, streams=100)
                load_ended = time.monotonic() - times.start
                d.wait_for(re.escape(LEFT), timeout=30)
                assert read_sysctl("net.ipv4.tcp_no_metrics_save") == "0"
            finally:
                times.stop()
    finally:
        iperf.stop()
    assert times.seen[ENTERED] < 5, times.seen
    assert times.seen[LEFT] > load_ended, (times.seen, load_ended)
    assert d.log.count(ENTERED) == 1, "low-memory settings were made more than once"
