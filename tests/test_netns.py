"""Namespaces created while bpftune runs are noticed and tuned."""

from __future__ import annotations

import uuid

from helpers import Hosts, Iperf, daemon, netns_cookie, read_sysctl, values, wait_until
from test_tcp_buffer import WMEM


def test_netns_created_at_run_time_is_noticed_and_tuned(tmp_path, sysctls):
    late = Hosts(ns=f"bpftune-late-{uuid.uuid4().hex[:8]}", global_if="btl0", ns_if="btl1",
                 global_addr="10.231.1.1", ns_addr="10.231.1.2")
    with daemon(tmp_path, "-d") as d:
        try:
            late.create()
            cookie = netns_cookie(late.ns)
            d.wait_for(rf"netns created \(cookie {cookie}, /\S+\)")
            # The new namespace starts with the global namespace's settings; a transfer
            # sending from it fills its send buffers and bpftune raises tcp_wmem there.
            before = values(read_sysctl(WMEM, late.ns))
            iperf = Iperf(None, late.global_addr, port=5298)
            try:
                iperf.run(late.ns, seconds=3)
            finally:
                iperf.stop()
            assert wait_until(lambda: values(read_sysctl(WMEM, late.ns))[2] > before[2])
            d.wait_for(r"Scenario 'need to increase TCP buffer size\(s\)' occurred for "
                       r"tunable 'net.ipv4.tcp_wmem' in non-global ns")
        finally:
            late.destroy()
