"""The PMDA runs as user pcp under pmcd, whatever the daemon's socket allows (issue 8)."""

from __future__ import annotations

import pwd
import re
from pathlib import Path

import pytest

from pcp_helpers import FakeDaemon, canned_state, pmda_installed, pmda_processes, pminfo

PMDA_LOG = Path("/var/log/pcp/pmcd/bpftune.log")


def uids(pid: int) -> list[int]:
    status = Path(f"/proc/{pid}/status").read_text()
    return [int(u) for u in re.search(r"^Uid:\s+(.*)$", status, re.M).group(1).split()]


@pytest.fixture
def root_only_daemon():
    """A daemon answering on a private socket, mode 0600 root:root: only root could use
    it. Private, so that a bpftune daemon running on /run/bpftune/query.sock does not
    matter (pmcd runs the PMDA pointed at this one)."""
    fake = FakeDaemon(canned_state(), mode=0o600)
    try:
        yield fake
    finally:
        fake.close()


def test_pmda_runs_as_pcp_even_when_the_socket_is_root_only(root_only_daemon):
    pcp = pwd.getpwnam("pcp").pw_uid
    with pmda_installed(query_socket=root_only_daemon.path):
        pids = pmda_processes()
        assert len(pids) == 1, pids
        assert uids(pids[0]) == [pcp] * 4  # real, effective, saved, filesystem
        # it cannot read the daemon's state, and says why
        assert "inst" not in pminfo("-f", "bpftune.tuner.state")
        assert re.search(r"^\s+value 0$", pminfo("-f", "bpftune.daemon.up"), re.M)
        assert (f"user pcp cannot use {root_only_daemon.path} (mode 0600"
                in PMDA_LOG.read_text())
        assert root_only_daemon.requests == 0 and root_only_daemon.refused == 0
