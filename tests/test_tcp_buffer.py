"""tcp_buffer with real traffic between the global netns and a test netns."""

from __future__ import annotations

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
