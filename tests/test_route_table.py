"""route_table: every kernel we can check (6.1, 6.12, 6.18) no longer enforces
net.ipv6.route.max_size (Linux commit af6d10345ca7, the CVE-2023-52340 fix), so the tuner
stays inactive and says why, in ``bpftune -S`` and ``-q tuners``, rather than tune a sysctl
that has no effect. The detection comes from BTF (``dst_ops.gc`` returns void since that
commit), checked here both ways; tests/test_portability.py runs it on the three kernels."""

from __future__ import annotations

import json
import subprocess

import pytest

from bpftune.btf import Btf
from bpftune.hooks import NotNeeded, PlanError
from bpftune.tuners.route_table import ENFORCEMENT_REMOVED, RouteTableTuner
from helpers import BPFTUNE, daemon

LINE = f"route_table: not needed: {ENFORCEMENT_REMOVED}"


def test_support_and_the_tuners_query_say_why_it_is_inactive(tmp_path):
    support = subprocess.run([BPFTUNE, "-S"], capture_output=True, text=True, timeout=60)
    assert f"bpftune: {LINE}" in support.stderr.splitlines()
    with daemon(tmp_path) as d:
        d.wait_for("started; active tuners")
        assert "route_table" not in d.wait_for("active tuners: (.*)").group(1)
        tuners = subprocess.run([BPFTUNE, "-q", "tuners"], capture_output=True, text=True,
                                timeout=30).stdout.splitlines()
        state = json.loads(subprocess.run([BPFTUNE, "-q", "state"], capture_output=True,
                                          text=True, timeout=30).stdout)
    assert f"{'route_table':>20} {'inactive':>20} not needed: {ENFORCEMENT_REMOVED}" in tuners
    assert state["unloaded"]["route_table"] == f"not needed: {ENFORCEMENT_REMOVED}"
    assert "route_table" not in [t["name"] for t in state["tuners"]]


def _btf_with_gc_returning(ret_type_id: int) -> Btf:
    return Btf([
        {"id": 1, "kind": "INT", "name": "int", "size": 4},
        {"id": 2, "kind": "FUNC_PROTO", "ret_type_id": ret_type_id, "params": []},
        {"id": 3, "kind": "PTR", "type_id": 2},
        {"id": 4, "kind": "STRUCT", "name": "dst_ops", "size": 16, "members": [
            {"name": "family", "type_id": 1, "bits_offset": 0},
            {"name": "gc", "type_id": 3, "bits_offset": 64}]},
    ])


def test_a_kernel_that_still_enforces_the_limit_is_told_apart():
    with pytest.raises(NotNeeded, match="does not enforce"):
        RouteTableTuner.plan(_btf_with_gc_returning(0), set())
    with pytest.raises(PlanError, match=r"enforces net\.ipv6\.route\.max_size, and tuning it"):
        RouteTableTuner.plan(_btf_with_gc_returning(1), set())
