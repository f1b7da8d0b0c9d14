"""The PMDA installed into a real pmcd, with the real daemon tuning real traffic."""

from __future__ import annotations

import re
import subprocess

import pytest

from helpers import Iperf, daemon, read_sysctl, values, wait_until
from pcp_helpers import pmda_installed, pminfo
from test_tcp_buffer import RMEM, squeeze_buffers

SCENARIO = "bpftune.tcp_buffer.scenarios.need_to_increase_tcp_buffer_size_s"
CURRENT = f"bpftune.tcp_buffer.{RMEM}"


@pytest.fixture(scope="module")
def installed():
    with pmda_installed():
        yield


def metric_values(metric: str) -> dict[str | None, str]:
    out = pminfo("-f", metric)
    found = {m.group(1): m.group(2) for m in
             re.finditer(r'inst \[\d+ or "(.*?)"\] value (.*)', out)}
    if m := re.search(r"^\s+value (.*)$", out, re.M):
        found[None] = m.group(1)
    return found


def instance_ids(metric: str) -> dict[str, int]:
    return {m.group(2): int(m.group(1)) for m in
            re.finditer(r'inst \[(\d+) or "(.*?)"\]', pminfo("-f", metric))}


def daemon_up() -> bool:
    return metric_values("bpftune.daemon.up").get(None) == "1"


def test_pmns_is_never_empty_and_says_when_the_daemon_is_down(installed):
    assert "bpftune.daemon.up" in pminfo("bpftune").split()
    assert metric_values("bpftune.daemon.up") == {None: "0"}
    assert "No value(s) available!" in pminfo("-f", "bpftune.daemon.pid")


def test_tuning_seen_through_pcp_and_ids_survive_restarts(installed, tmp_path, sysctls, hosts):
    sysctls.remember_managed()  # what other tuners change (e.g. netdev_budget) outlives it too
    for ns in (None, hosts.ns):
        squeeze_buffers(sysctls, ns)
    iperf = Iperf(hosts.ns, hosts.ns_addr)
    try:
        # restore=False: the grown values must outlive this daemon for the second part
        # (the sysctls fixture restores them, and every other managed sysctl, at the end).
        with daemon(tmp_path / "first", restore=False) as d:
            assert wait_until(daemon_up)
            assert metric_values("bpftune.daemon.pid") == {None: str(d.proc.pid)}
            tree = pminfo("-fT", "bpftune")
            assert f"{CURRENT}\nHelp:\nRead from the kernel by the bpftune daemon" in tree
            assert '    inst [' in tree and 'or "global/max"] value' in tree

            iperf.run(None, seconds=2)
            iperf.run(None, seconds=2, reverse=True)
            assert wait_until(lambda: int(metric_values(SCENARIO).get("global", 0)) >= 1
                              and int(metric_values(SCENARIO).get(hosts.ns, 0)) >= 1)
            live = values(read_sysctl(RMEM))[2]
            assert wait_until(lambda: metric_values(CURRENT).get("global/max") == str(live))
            assert metric_values(f"bpftune.tcp_buffer.original.{RMEM}")["global/max"] == "131072"
            assert int(metric_values(CURRENT)[f"{hosts.ns}/max"]) > 131072
            pmval = subprocess.run(["pmval", "-s", "2", "-t", "0.5", "-i", "global/max",
                                    CURRENT], capture_output=True, text=True, timeout=30).stdout
            assert pmval.split()[-1] == str(live)

            pmids = pminfo("-m", "bpftune")
            ids = instance_ids(CURRENT) | instance_ids(SCENARIO)

        # The daemon is gone: the PMDA keeps answering and says so.
        assert wait_until(lambda: not daemon_up())
        assert metric_values(CURRENT) == {}
        assert re.search(r'inst \[\d+ or "bpftune"\] value 0',
                         pminfo("-f", "pmcd.agent.status"))

        # A new daemon and a reinstalled (restarted) PMDA: same PMIDs, same instance ids.
        subprocess.run(["/var/lib/pcp/pmdas/bpftune/Install"], stdin=subprocess.DEVNULL,
                       check=True, capture_output=True, timeout=120)
        with daemon(tmp_path / "second"):
            assert wait_until(daemon_up)
            assert wait_until(lambda: metric_values(CURRENT).get("global/max") == str(live))
            assert pminfo("-m", "bpftune") == pmids
            now = instance_ids(CURRENT)
            assert {k: now[k] for k in ("global/min", "global/default", "global/max")} == {
                k: ids[k] for k in ("global/min", "global/default", "global/max")}
    finally:
        iperf.stop()
