"""tcp_buffer with real traffic between the global netns and a test netns."""

from __future__ import annotations

import subprocess

from helpers import Iperf, daemon, netns_cookie, read_sysctl, values, wait_until

RMEM, WMEM, MODERATE = "net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem", "net.ipv4.tcp_moderate_rcvbuf"


def squeeze_buffers(sysctls, ns: str | None) -> dict[str, list[int]]:
    """Set max = default for rmem and wmem, and turn receive auto-tuning off."""
    before = {}
    for name in (RMEM, WMEM):
        lo, default, _ = values(read_sysctl(name, ns))
        sysctls.set(name, f"{lo} {default} {default}", ns)
        before[name] = [lo, default, default]
    sysctls.set(MODERATE, "0", ns)
    return before


def test_rmem_and_wmem_max_grow_in_both_namespaces(tmp_path, sysctls, hosts):
    squeezed = {ns: squeeze_buffers(sysctls, ns) for ns in (None, hosts.ns)}
    iperf = Iperf(hosts.ns, hosts.ns_addr)
    try:
        with daemon(tmp_path) as d:
            iperf.run(None, seconds=3)  # global sends, netns receives
            iperf.run(None, seconds=3, reverse=True)  # netns sends, global receives

            for ns in (None, hosts.ns):
                for name in (RMEM, WMEM):
                    assert wait_until(lambda n=name, s=ns: values(read_sysctl(n, s))[2]
                                      > squeezed[s][n][2]), f"{name} max did not grow in {ns}"
                assert read_sysctl(MODERATE, ns) == "1"
            d.stop()
    finally:
        iperf.stop()
    log = d.log
    assert ("Scenario 'need to increase TCP buffer size(s)' occurred for tunable "
            "'net.ipv4.tcp_rmem' in global ns.") in log
    assert ("Scenario 'need to increase TCP buffer size(s)' occurred for tunable "
            "'net.ipv4.tcp_rmem' in non-global ns.") in log
    assert ("Due to need to increase max buffer size to maximize throughput change "
            "net.ipv4.tcp_wmem(min default max) from (") in log
    assert "set 'net.ipv4.tcp_moderate_rcvbuf' to auto-tune receive buffer size" in log
    # The summary printed on exit lists the changes, global and in the test netns.
    assert "# Summary: scenario 'need to increase TCP buffer size(s)' occurred" in log
    assert "# sysctl 'net.ipv4.tcp_rmem' changed from (" in log
    assert f"in netns cookie {netns_cookie(hosts.ns)}" in log
    assert 'sysctl -w net.ipv4.tcp_rmem="' in log


LOW_MEMORY_FLAGS = ("net.ipv4.tcp_no_metrics_save", "net.ipv4.tcp_no_ssthresh_metrics_save",
                    "net.core.high_order_alloc_disable")


def test_tcp_mem_grows_within_ceiling_under_memory_pressure(tmp_path, sysctls, hosts):
    import os

    ram_pages = os.sysconf("SC_PHYS_PAGES")
    for name in (*LOW_MEMORY_FLAGS, "net.ipv4.tcp_max_syn_backlog"):
        sysctls.remember(name)
    sysctls.set("net.ipv4.tcp_mem", "64 128 192")
    iperf = Iperf(hosts.ns, hosts.ns_addr)
    try:
        with daemon(tmp_path) as d:
            iperf.run(None, seconds=4, streams=8)
            mem = values(read_sysctl("net.ipv4.tcp_mem"))
            assert mem[2] > 192
            assert mem == sorted(mem), "tcp_mem must stay min <= pressure <= max"
            assert mem[0] <= ram_pages // 16 and mem[1] <= ram_pages // 8
            assert mem[2] <= ram_pages // 4
            d.wait_for(r"Scenario 'approaching TCP memory (pressure|exhaustion)' occurred for "
                       r"tunable 'net.ipv4.tcp_mem' in global ns")
            d.wait_for(r"Due to near memory (pressure|exhaustion) change "
                       r"net.ipv4.tcp_mem\(min pressure max\) from \(64 128 192\) -> ")
            # Near exhaustion, the low-memory settings are made, and undone once TCP memory
            # use is back to normal after the transfer.
            d.wait_for("Due to low memory conditions, set 'net.ipv4.tcp_no_metrics_save'")
            d.wait_for("Due to leaving low memory conditions, set "
                       "'net.ipv4.tcp_no_metrics_save'", timeout=30)
            assert read_sysctl("net.ipv4.tcp_no_metrics_save") == "0"
    finally:
        iperf.stop()


def test_admin_change_in_netns_disables_tuner_there_only(tmp_path, sysctls, hosts):
    squeezed = {ns: squeeze_buffers(sysctls, ns) for ns in (None, hosts.ns)}
    admin_rmem = "4096 131072 131073"
    iperf = Iperf(None, hosts.global_addr)  # netns sends, global receives
    try:
        with daemon(tmp_path) as d:
            subprocess.run(["ip", "netns", "exec", hosts.ns, "sysctl", "-qw",
                            f"net.ipv4.tcp_rmem={admin_rmem}"], check=True)
            d.wait_for(rf"pid \d+, cmd '\S*sysctl' modified sysctl 'net.ipv4.tcp_rmem' that "
                       rf"tuner 'tcp_buffer' uses; disabling 'tcp_buffer' for namespace cookie "
                       rf"{netns_cookie(hosts.ns)}")
            iperf.run(hosts.ns, seconds=3)  # netns sends (wmem there), global receives
            iperf.run(hosts.ns, seconds=2, reverse=True)  # global sends, netns receives
            assert wait_until(lambda: values(read_sysctl(RMEM))[2] > squeezed[None][RMEM][2])
            assert read_sysctl(RMEM, hosts.ns) == admin_rmem
            assert values(read_sysctl(WMEM, hosts.ns)) == squeezed[hosts.ns][WMEM]
            assert read_sysctl(MODERATE, hosts.ns) == "0"
    finally:
        iperf.stop()


def test_admin_change_in_global_ns_disables_tuner_everywhere(tmp_path, sysctls, hosts):
    squeezed = {ns: squeeze_buffers(sysctls, ns) for ns in (None, hosts.ns)}
    iperf = Iperf(hosts.ns, hosts.ns_addr)
    try:
        with daemon(tmp_path) as d:
            subprocess.run(["sysctl", "-qw", "net.ipv4.tcp_wmem=4096 16384 16385"], check=True)
            d.wait_for(rf"modified sysctl 'net.ipv4.tcp_wmem' that tuner 'tcp_buffer' uses; "
                       rf"disabling 'tcp_buffer' for namespace cookie {netns_cookie(None)}")
            iperf.run(None, seconds=2)
            iperf.run(None, seconds=2, reverse=True)
            for ns in (None, hosts.ns):
                assert values(read_sysctl(RMEM, ns)) == squeezed[ns][RMEM]
            assert values(read_sysctl(WMEM, hosts.ns)) == squeezed[hosts.ns][WMEM]
            assert read_sysctl(WMEM) == "4096 16384 16385"
    finally:
        iperf.stop()
    assert "Scenario 'need to increase" not in d.log
