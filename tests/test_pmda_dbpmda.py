"""The PMDA against a canned daemon state, driven by dbpmda (no pmcd, no daemon)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from pcp_helpers import FakeDaemon, canned_state, dbpmda, fetched


@pytest.fixture
def var_dir():
    """A private PCP_VAR_DIR the PMDA can write to after dropping to user pcp."""
    d = Path(tempfile.mkdtemp(prefix="bpftune-pcpvar-", dir="/run"))
    (d / "config" / "pmda").mkdir(parents=True)
    for path in (d, d / "config"):
        os.chmod(path, 0o755)
    shutil.chown(d / "config" / "pmda", "pcp", "pcp")
    yield d
    shutil.rmtree(d)


@pytest.fixture
def fake():
    f = FakeDaemon(canned_state())
    yield f
    f.close()


def test_daemon_metrics_from_state(fake, var_dir):
    out = dbpmda(["wait 1", "fetch bpftune.daemon.up bpftune.daemon.pid bpftune.daemon.cpu "
                  "bpftune.daemon.uptime bpftune.daemon.version bpftune.daemon.rss"],
                 fake.path, var_dir)
    assert fetched(out, "486.0.0") == {None: "1"}
    assert fetched(out, "486.0.2") == {None: "4242"}
    assert fetched(out, "486.0.9") == {None: "1250"}  # msec
    assert fetched(out, "486.0.3") == {None: "61"}
    assert fetched(out, "486.0.1") == {None: '"0.1.0"'}
    assert fetched(out, "486.0.10") == {None: str(150 << 20)}


def test_tunable_values_per_namespace_and_position(fake, var_dir):
    out = dbpmda(["wait 1", "fetch bpftune.tcp_buffer.net.ipv4.tcp_rmem",
                  "fetch bpftune.tcp_buffer.original.net.ipv4.tcp_rmem",
                  "fetch bpftune.tcp_buffer.changes.net.ipv4.tcp_rmem",
                  "fetch bpftune.tcp_buffer.net.ipv4.tcp_moderate_rcvbuf",
                  "desc bpftune.tcp_buffer.net.ipv4.tcp_rmem"], fake.path, var_dir)
    # tcp_rmem is tunable 0 of cluster 10 in the canned registry: items 0..3
    assert fetched(out, "486.10.0") == {"global/min": "4096", "global/default": "131072",
                                        "global/max": "204800", "web/min": "4096",
                                        "web/default": "131072", "web/max": "163840"}
    assert fetched(out, "486.10.1")["global/max"] == "131072"
    assert fetched(out, "486.10.2") == {"global": "2", "web": "1"}
    assert fetched(out, "486.10.4") == {"global": "1"}  # one value: named by netns alone
    assert "Semantics: instant  Units: byte" in out


def test_scenario_counters_tuner_state_and_help(fake, var_dir):
    out = dbpmda(["wait 1",
                  "fetch bpftune.tcp_buffer.scenarios.need_to_increase_tcp_buffer_size_s",
                  "fetch bpftune.tcp_buffer.scenarios.need_to_decrease_tcp_buffer_size_s",
                  "fetch bpftune.tuner.state bpftune.tuner.changes",
                  "desc bpftune.tcp_buffer.scenarios.need_to_increase_tcp_buffer_size_s",
                  "text bpftune.tcp_buffer.scenarios.need_to_increase_tcp_buffer_size_s",
                  "text indom 486.1", "label item 486.10.512"], fake.path, var_dir)
    assert fetched(out, "486.10.512") == {"global": "2", "web": "1"}
    assert fetched(out, "486.10.513") == {"global": "0"}
    assert fetched(out, "486.1.0") == {"tcp_buffer": '"active"', "sysctl": '"active"'}
    assert fetched(out, "486.1.3") == {"tcp_buffer": "4", "sysctl": "0"}
    assert "Semantics: counter  Units: count" in out
    assert "Need to increase buffer size(s) to maximize throughput." in out
    assert "network namespaces bpftune acted in" in out
    assert 'scenario="need to increase TCP buffer size(s)"' in out


def test_daemon_down_means_up_0_and_no_values(var_dir):
    down = FakeDaemon(None)  # accepts and closes without a reply, like a dying daemon
    try:
        out = dbpmda(["wait 1", "fetch bpftune.daemon.up bpftune.daemon.pid"], down.path,
                     var_dir)
    finally:
        down.close()
    assert fetched(out, "486.0.0") == {None: "0"}
    assert fetched(out, "486.0.2") == {}


def test_registry_survives_a_restart_without_daemon(fake, var_dir):
    dbpmda(["wait 1", "fetch bpftune.tcp_buffer.net.ipv4.tcp_rmem"], fake.path, var_dir)
    assert (var_dir / "config" / "pmda" / "486.registry.json").is_file()
    fake.close()
    out = dbpmda(["traverse bpftune.tcp_buffer", "desc bpftune.tcp_buffer.net.ipv4.tcp_rmem"],
                 fake.path, var_dir)
    assert "bpftune.tcp_buffer.changes.net.ipv4.tcp_rmem" in out
    assert "PMID: 486.10.0" in out


def test_reordered_tunables_keep_their_metric_numbers(fake, var_dir):
    dbpmda(["wait 1", "fetch bpftune.tcp_buffer.net.ipv4.tcp_rmem"], fake.path, var_dir)
    fake.state["tuners"][0]["tunables"].reverse()  # a newer daemon, another order
    out = dbpmda(["wait 1", "fetch bpftune.tcp_buffer.net.ipv4.tcp_rmem",
                  "fetch bpftune.tcp_buffer.net.ipv4.tcp_moderate_rcvbuf"], fake.path, var_dir)
    assert fetched(out, "486.10.0")["global/max"] == "204800"
    assert fetched(out, "486.10.4") == {"global": "1"}
