"""pmlogger, pmie and pmseries with the rendered configuration, against live pmcd while the
daemon tunes: the archive shows the change, the shipped pmie rules fire on it, and the
fleet (Valkey-flavour) dashboard queries return series once it is loaded into pmseries."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from bpftune.render import render_grafana, render_pcp
from helpers import (
    Hosts,
    Sysctls,
    daemon,
    metrics_this_kernel_lacks,
    read_sysctl,
    transfer_both_ways,
    values,
)
from pcp_helpers import pmda_installed
from test_tcp_buffer import RMEM, WMEM, squeeze_buffers

PMIECONF_GLOBAL = "/var/lib/pcp/config/pmieconf/global"
REDIS_PORT = 6399


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pcp")
    render_pcp(out, interval="1 sec")
    return out


@pytest.fixture(scope="module")
def archive(rendered, tmp_path_factory):
    """Log bpftune's metrics while a daemon starts, raises tcp_rmem, and is then overridden
    by an administrator in the test namespace. Yields (archive, hosts, final rmem max)."""
    tmp = tmp_path_factory.mktemp("archive")
    sysctls, hosts = Sysctls(), Hosts(ns="bpftune-logged", global_addr="10.231.2.1",
                                       ns_addr="10.231.2.2", global_if="btg0", ns_if="btg1")
    hosts.create()
    try:
        for ns in (None, hosts.ns):
            squeeze_buffers(sysctls, ns)
        with pmda_installed():
            logger = subprocess.Popen(
                ["pmlogger", "-c", str(rendered / "pmlogger/bpftune.config"), "-l",
                 str(tmp / "pmlogger.log"), str(tmp / "bpftune")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                time.sleep(3)  # samples with the daemon down
                with daemon(tmp / "daemon") as d:
                    transfer_both_ways(hosts, port=5296)
                    time.sleep(3)
                    grown = values(read_sysctl(RMEM))[2]
                    subprocess.run(["ip", "netns", "exec", hosts.ns, "sysctl", "-qw",
                                    f"{WMEM}=4096 16384 16385"], check=True)
                    d.wait_for("disabling 'tcp_buffer' for namespace cookie")
                    time.sleep(3)
            finally:
                logger.send_signal(signal.SIGINT)
                logger.wait(timeout=30)
        yield tmp / "bpftune", hosts, grown
    finally:
        hosts.destroy()
        sysctls.restore()


def pmval(archive: Path, metric: str, instance: str | None = None, *,
          raw: bool = False) -> list[str]:
    """The metric's values in the archive, each second; a counter as a rate unless
    ``raw``."""
    args = ["pmval", "-a", str(archive), "-t", "1sec", "-f", "0", *(["-r"] if raw else [])]
    args += ["-i", instance] if instance else []
    out = subprocess.run([*args, metric], check=True, capture_output=True, text=True).stdout
    return [m.group(1) for line in out.splitlines()
            if (m := re.match(r"\d\d:\d\d:\d\d\.\d+\s+(-?[\d.]+)\s*$", line))]


def test_pmlogconf_group_includes_bpftune_where_the_pmda_is_installed(rendered):
    group = rendered / "pmlogconf/bpftune/summary"
    with pmda_installed():
        out = subprocess.run(["pmlogconf", "-s", str(group)], capture_output=True,
                             text=True, check=True).stdout
    assert f"#+ {group}:y:30 seconds:" in out
    out = subprocess.run(["pmlogconf", "-s", str(group)], capture_output=True, text=True,
                         check=True).stdout
    assert f"#+ {group}:x::" in out  # excluded without the PMDA


def test_archive_shows_the_daemon_start_and_the_change(archive):
    path, _, grown = archive
    up = pmval(path, "bpftune.daemon.up")
    assert up[0] == "0" and up[-1] == "1"
    rmem_max = [int(v) for v in pmval(path, f"bpftune.tcp_buffer.{RMEM}", "global/max")]
    assert 131072 <= rmem_max[0] < rmem_max[-1] == grown
    original = pmval(path, f"bpftune.tcp_buffer.original.{RMEM}", "global/max")
    assert set(original) == {"131072"}
    # Raw counts: a rate needs two samples of the instance, and all the growth may come
    # within the second before the instance's first sample.
    scenario = pmval(path, "bpftune.tcp_buffer.scenarios.need_to_increase_tcp_buffer_size_s",
                     "global", raw=True)
    assert scenario and float(scenario[-1]) > 0
    meta = subprocess.run(["pmdumplog", "-l", str(path)], capture_output=True, text=True,
                          check=True).stdout
    assert "commencing" in meta


def pmie_config(rendered: Path, tmp: Path) -> Path:
    config = tmp / "pmie.config"
    rules = f"{rendered / 'pmieconf'}:{PMIECONF_GLOBAL}"
    base = ["pmieconf", "-r", rules, "-f", str(config)]
    subprocess.run([*base, "-F"], check=True, capture_output=True)
    rule_files = (rendered / "pmieconf" / "bpftune").iterdir()
    for rule in sorted(f"bpftune.{f.name}" for f in rule_files):
        subprocess.run([*base, "modify", rule, "delta", "1 sec"], check=True,
                       capture_output=True)
    return config


def test_shipped_pmie_rules_fire_on_the_archive(rendered, archive, tmp_path):
    path, _, _ = archive
    config = pmie_config(rendered, tmp_path)
    text = config.read_text()
    assert "bpftune.tcp_buffer.scenarios.need_to_increase_tcp_buffer_size_s" in text
    out = subprocess.run(["pmie", "-a", str(path), "-c", str(config), "-v"],
                         capture_output=True, text=True, timeout=120)
    fired = set(re.findall(r"^(bpftune\.\w+) \(.*\): true$", out.stdout, re.M))
    # One scenario_repeated rule per tuner: the archive's tuning was tcp_buffer's.
    assert fired == {"bpftune.scenario_repeated_tcp_buffer", "bpftune.tuner_disabled"}, \
        out.stdout[-3000:]


@pytest.fixture
def redis(tmp_path):
    proc = subprocess.Popen(["redis-server", "--port", str(REDIS_PORT), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", REDIS_PORT), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    yield
    proc.terminate()
    proc.wait(timeout=20)


def test_fleet_dashboard_queries_return_series_from_pmseries(archive, redis, tmp_path):
    path, _, _ = archive
    pmseries = ["pmseries", "-p", str(REDIS_PORT)]
    subprocess.run([*pmseries, "--load", str(path)], check=True, capture_output=True,
                   timeout=120)
    host = re.search(r"Performance metrics from host (\S+)",
                     subprocess.run(["pmdumplog", "-l", str(path)], capture_output=True,
                                    text=True, check=True).stdout).group(1)
    render_grafana(tmp_path / "grafana")
    exprs = {t["expr"] for f in (tmp_path / "grafana/valkey").glob("*.json")
             for p in json.loads(f.read_text())["panels"] for t in p["targets"]}
    empty = []
    lacking = metrics_this_kernel_lacks()
    for expr in sorted(e for e in exprs if e.split("{")[0] not in lacking):
        out = subprocess.run([*pmseries, expr.replace("$host", host)], capture_output=True,
                             text=True, timeout=30).stdout
        if not re.search(r"[0-9a-f]{40}", out):
            empty.append(expr)
    assert not empty, f"no series for {empty}"
