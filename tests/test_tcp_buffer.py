"""tcp_buffer with real traffic between the global netns and a test netns."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from bpftune.tuners import sysctl as sysctl_tuner
from helpers import Iperf, daemon, netns_cookie, read_sysctl, recorded, values, wait_until

RMEM, WMEM, MODERATE = "net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem", "net.ipv4.tcp_moderate_rcvbuf"
KiB, MiB = 1 << 10, 1 << 20
PAGE = 4 * KiB


def fake_ram_daemon(tmp_path: Path, ram_bytes: int, *args: str) -> AbstractContextManager:
    """The real daemon (same program, BPF, change path, ledger), except that it sees
    ``ram_bytes`` of RAM in 4 KiB pages: bpftune.memory is patched before anything imports
    it, by a wrapper that then runs the bpftune script. The RAM-based ceilings are thus
    ones real traffic can reach in a few seconds; on this machine's own RAM they are far
    out of reach (see test_buffer_max_grows_to_the_ram_ceiling_and_no_further)."""
    wrapper = tmp_path / "bpftune_fake_ram.py"
    wrapper.write_text(textwrap.dedent(f"""\
        import runpy
        import sys

        import bpftune.memory as memory

        memory.page_size = lambda: {PAGE}
        memory.total_ram_pages = lambda: {ram_bytes // PAGE}
        sys.argv = sys.argv[1:]
        runpy.run_path(sys.argv[0], run_name="__main__")
        """))
    return daemon(tmp_path, *args, prefix=[sys.executable, str(wrapper)])


def squeeze_buffers(sysctls, ns: str | None) -> dict[str, list[int]]:
    """Set max = default for rmem and wmem, and turn receive auto-tuning off."""
    before = {}
    for name in (RMEM, WMEM):
        lo, default, _ = values(read_sysctl(name, ns))
        sysctls.set(name, f"{lo} {default} {default}", ns)
        before[name] = [lo, default, default]
    sysctls.set(MODERATE, "0", ns)
    return before


# Hooks as chosen here, and on every kernel that refuses fentry (6.1 to 6.18): tcp_probe
# for both buffers.
PLANS = {"without-fentry": ({}, "raw_tp/tcp_probe")}


@pytest.mark.parametrize("plan", PLANS)
def test_rmem_and_wmem_max_grow_in_both_namespaces(tmp_path, sysctls, hosts, plan):
    env, hooks = PLANS[plan]
    squeezed = {ns: squeeze_buffers(sysctls, ns) for ns in (None, hosts.ns)}
    iperf = Iperf(hosts.ns, hosts.ns_addr)
    try:
        with daemon(tmp_path, env=env) as d:
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
    assert f"bpftune: tcp_buffer: {hooks}, tp/sock/sock_exceed_buf_limit" in log
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


# 256 MiB of RAM: one socket buffer may be at most 8 MiB (RAM/32).
BUF_RAM, BUF_CEILING = 256 * MiB, 8 * MiB


def test_buffer_max_grows_to_the_ram_ceiling_and_no_further(tmp_path, sysctls, hosts):
    """tcp_rmem and tcp_wmem max start just under the per-socket ceiling; real traffic
    fills the buffers, the daemon proposes +25 %, and the max must end exactly at the
    ceiling, in one change, and stay there while traffic goes on.

    The ceiling is RAM/32. On the test VM's own RAM (23.5 GiB: a 753 MiB ceiling) a veth
    transfer cannot reach it: with tcp_rmem max at 790 MiB, sk_rcvbuf peaked at 32 MiB in a
    3 s iperf3 run, and the BPF side proposes growth only when a buffer is within the
    learning-rate fraction of the max (25 %, or 1/64 at -r 0). So the daemon runs
    with the RAM figure faked (fake_ram_daemon) at 256 MiB, whose 8 MiB ceiling a veth
    transfer does fill; everything else is the real daemon on real sysctls."""
    start = BUF_CEILING - 256 * KiB
    for name in (RMEM, WMEM):
        sysctls.set(name, f"4096 131072 {start}", hosts.ns)
    sysctls.set(MODERATE, "1", hosts.ns)
    iperf = Iperf(hosts.ns, hosts.ns_addr)
    try:
        with fake_ram_daemon(tmp_path, BUF_RAM) as d:
            # The netns receives (its tcp_rmem), then sends (its tcp_wmem). A transfer
            # now and then brings no event for the sender's buffer, so each is repeated
            # (at most 5 s) until the max moves.
            for name, reverse in ((RMEM, False), (WMEM, True)):
                for _ in range(5):
                    iperf.run(None, seconds=1, reverse=reverse)
                    if wait_until(lambda n=name: values(read_sysctl(n, hosts.ns))[2] > start,
                                  timeout=0.5):
                        break
                else:
                    raise AssertionError(f"{name} max did not grow:\n{d.log}")
            iperf.run(None, seconds=1)  # full buffers again, at the ceiling now
            iperf.run(None, seconds=1, reverse=True)
            for name in (RMEM, WMEM):
                assert values(read_sysctl(name, hosts.ns)) == [4096, 131072, BUF_CEILING]
            d.stop()
    finally:
        iperf.stop()
    cookie = netns_cookie(hosts.ns)
    ledger = {(r["tunable"], r["cookie"]): r for r in recorded(tmp_path / "state")}
    for name in (RMEM, WMEM):
        assert ledger[(name, cookie)]["current"] == [4096, 131072, BUF_CEILING]
        assert ledger[(name, cookie)]["changes"] == 1
    assert (f"change {RMEM}(min default max) from (4096 131072 {start}) -> "
            f"(4096 131072 {BUF_CEILING})") in d.log


LOW_MEMORY_FLAGS = ("net.ipv4.tcp_no_metrics_save", "net.ipv4.tcp_no_ssthresh_metrics_save",
                    "net.core.high_order_alloc_disable")


# 64 MiB of RAM, 16384 pages: tcp_mem may grow to at most 1024 (min), 2048 (pressure) and
# 4096 (max) pages. Unbounded, the transfer below takes it past 30000 pages.
MEM_RAM_PAGES = 16384


def test_tcp_mem_grows_within_ceiling_under_memory_pressure(tmp_path, sysctls, hosts):
    """tcp_mem starts at 64 128 192 pages; on (fake) RAM of 16384 pages, growth under
    pressure must stay within 1024 2048 4096 (1/16, 1/8, 1/4 of RAM), though the transfer
    keeps TCP memory at the limit and every event proposes another 25 %. The pressure
    ceiling is well above what TCP uses at rest (a few hundred pages, per-CPU reserves
    included), so low-memory state can end once the transfer does."""
    for name in (*LOW_MEMORY_FLAGS, "net.ipv4.tcp_max_syn_backlog"):
        sysctls.remember(name)
    sysctls.set("net.ipv4.tcp_mem", "64 128 192")
    iperf = Iperf(hosts.ns, hosts.ns_addr)
    try:
        with fake_ram_daemon(tmp_path, MEM_RAM_PAGES * PAGE) as d:
            iperf.run(None, seconds=4, streams=8)
            mem = values(read_sysctl("net.ipv4.tcp_mem"))
            assert mem[2] > 192
            assert mem == sorted(mem), "tcp_mem must stay min <= pressure <= max"
            assert mem[0] <= 1024 and mem[1] <= 2048 and mem[2] <= 4096, mem
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
            assert values(read_sysctl("net.ipv4.tcp_mem")) == mem  # nothing grew after
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


def global_writes() -> dict[int, int]:
    """The sysctl tuner's counts of writes in the global netns, by slot (bpftool)."""
    dump = subprocess.run(["bpftool", "-j", "map", "dump", "name", "global_writes"],
                          capture_output=True, text=True, check=True, timeout=30).stdout
    return {e["formatted"]["key"]: e["formatted"]["value"] for e in json.loads(dump)}


def test_admin_change_in_global_ns_disables_tuner_everywhere(tmp_path, sysctls, hosts):
    squeezed = {ns: squeeze_buffers(sysctls, ns) for ns in (None, hosts.ns)}
    iperf = Iperf(hosts.ns, hosts.ns_addr)
    try:
        with daemon(tmp_path) as d:
            subprocess.run(["sysctl", "-qw", "net.ipv4.tcp_wmem=4096 16384 16385"], check=True)
            d.wait_for(rf"modified sysctl 'net.ipv4.tcp_wmem' that tuner 'tcp_buffer' uses; "
                       rf"disabling 'tcp_buffer' for namespace cookie {netns_cookie(None)}")
            # Counted for the sysctl tuner's tick too, in the total it reads each second
            # (had the event been lost, the tick would have handed the tuner over).
            assert global_writes()[sysctl_tuner.MAX_MANAGED] == 1
            iperf.run(None, seconds=2)
            iperf.run(None, seconds=2, reverse=True)
            for ns in (None, hosts.ns):
                assert values(read_sysctl(RMEM, ns)) == squeezed[ns][RMEM]
            assert values(read_sysctl(WMEM, hosts.ns)) == squeezed[hosts.ns][WMEM]
            assert read_sysctl(WMEM) == "4096 16384 16385"
    finally:
        iperf.stop()
    assert "Scenario 'need to increase TCP buffer size(s)'" not in d.log, d.log[-2000:]
