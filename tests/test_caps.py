"""Once started, the daemon keeps only the capabilities running needs (bpftune.caps.KEPT),
in every thread, and still tunes, notices administrators and rolls back with them."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

from bpftune import caps
from bpftune.paths import DEFAULT_CGROUP
from helpers import BPFTUNE, Iperf, daemon, netns_cookie, read_sysctl, values, wait_until
from test_tcp_buffer import RMEM, WMEM, squeeze_buffers


def getpcaps(pid: int) -> str:
    """``cap_chown,cap_net_admin,cap_sys_ptrace,cap_sys_admin,cap_syslog=ep`` (libcap's text
    form)."""
    out = subprocess.run(["getpcaps", str(pid)], check=True, capture_output=True,
                         text=True).stdout.strip()
    assert out.startswith(f"{pid}: "), out
    return out.removeprefix(f"{pid}: ")


def thread_caps(pid: int) -> dict[str, dict[str, int]]:
    """Per thread: CapInh, CapPrm, CapEff, CapBnd, CapAmb."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        status = (task / "status").read_text()
        found[task.name] = {k: int(v, 16) for k, v in (
            line.split(":\t") for line in status.splitlines() if line.startswith("Cap"))}
    return found


def assert_only_kept(pid: int) -> None:
    text = getpcaps(pid)
    assert text != "=ep"
    names, _, flags = text.partition("=")
    assert flags == "ep", text
    assert set(names.split(",")) == set(caps.KEPT), text
    threads = thread_caps(pid)
    assert len(threads) > 1  # the query server's threads too
    for tid, sets in threads.items():
        assert sets["CapPrm"] == sets["CapEff"] == sets["CapBnd"] == caps.kept_mask(), (tid, sets)
        assert sets["CapInh"] == sets["CapAmb"] == 0, (tid, sets)


def test_only_the_documented_capabilities_are_kept_in_every_thread(tmp_path):
    with daemon(tmp_path, "-d") as d:
        assert_only_kept(d.proc.pid)
    assert ("dropped capabilities; kept cap_chown, cap_net_admin, cap_sys_admin, cap_sys_ptrace, "
            "cap_syslog (permitted, effective, bounding)") in d.log


def mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def test_tuning_admin_detection_and_rollback_work_with_the_kept_set(tmp_path, sysctls, hosts):
    squeezed = {ns: squeeze_buffers(sysctls, ns) for ns in (None, hosts.ns)}
    cookie = netns_cookie(hosts.ns)
    iperf = Iperf(hosts.ns, hosts.ns_addr)
    try:
        with daemon(tmp_path, "-R", restore=False) as d:
            assert_only_kept(d.proc.pid)
            # Tuning in the test namespace: setns() and a sysctl write there.
            iperf.run(None, seconds=2)  # global sends, netns receives
            iperf.run(None, seconds=2, reverse=True)
            for ns in (None, hosts.ns):
                assert wait_until(lambda s=ns: values(read_sysctl(RMEM, s))[2]
                                  > squeezed[s][RMEM][2]), f"tcp_rmem did not grow in {ns}"
            d.wait_for(re.escape("Scenario 'need to increase TCP buffer size(s)' occurred for "
                                 "tunable 'net.ipv4.tcp_rmem' in non-global ns."))
            # An administrator's write in the namespace is still noticed.
            lo, default, _ = squeezed[hosts.ns][WMEM]
            admin = f"{lo} {default} {default + 1}"
            subprocess.run(["ip", "netns", "exec", hosts.ns, "sysctl", "-qw",
                            f"{WMEM}={admin}"], check=True)
            d.wait_for(rf"modified sysctl 'net.ipv4.tcp_wmem' that tuner 'tcp_buffer' uses; "
                       rf"disabling 'tcp_buffer' for namespace cookie {cookie}")
            assert_only_kept(d.proc.pid)
            assert d.stop(signal.SIGTERM) == 0
    finally:
        iperf.stop()
    log = d.log
    # Rolled back, in the global namespace and in the test namespace (setns at exit).
    assert "Rolling back sysctl values for 'net.ipv4.tcp_rmem' from (" in log
    for ns in (None, hosts.ns):
        assert values(read_sysctl(RMEM, ns)) == squeezed[ns][RMEM], ns
    assert read_sysctl(WMEM, hosts.ns) == admin
    assert "# Summary: scenario 'need to increase TCP buffer size(s)' occurred" in log
    for failure in ("Operation not permitted", "Permission denied", "error", "Traceback"):
        assert failure not in log
    # Detached and unmounted at exit without the capabilities that attached and mounted.
    progs = json.loads(subprocess.run(["bpftool", "-j", "prog", "show"], check=True,
                                      capture_output=True, text=True).stdout)
    assert not [p for p in progs if p.get("name", "").startswith("bpftune_")]
    assert not mounted(DEFAULT_CGROUP)


def test_without_the_libcap_ng_binding_the_daemon_refuses_to_start(tmp_path):
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "capng.py").write_text("raise ImportError(\"No module named 'capng'\")\n")
    env = dict(os.environ, BPFTUNE_STATE_DIR=str(tmp_path / "state"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(shadow),
                                                        os.environ.get("PYTHONPATH")])))
    done = subprocess.run([BPFTUNE, "-s"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if "capabilit" in line]
    assert errors == ["bpftune: cannot drop capabilities: the libcap-ng Python binding is not "
                      "installed (python3-cap-ng or python3-libcap-ng)"], done.stderr
    assert "Traceback" not in done.stderr
    assert "started" not in done.stderr
    assert not mounted(DEFAULT_CGROUP)  # cleaned up as on any failed start
    # -S and -q never drop capabilities, so they work without it.
    support = subprocess.run([BPFTUNE, "-S"], env=env, capture_output=True, text=True,
                             timeout=120)
    assert support.returncode == 0, support.stderr
    assert "bpftune works fully" in support.stderr
    query = subprocess.run([BPFTUNE, "-q", "tuners"], env=env, capture_output=True, text=True,
                           timeout=30)
    assert "Traceback" not in query.stderr and "capng" not in query.stderr + query.stdout
