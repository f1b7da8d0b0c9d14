"""The bpftune command line: upstream-compatible options, one-line errors, exit codes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from helpers import BPFTUNE, REPO, daemon, wait_until

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def bpftune(*args: str, env: dict | None = None, prefix: list[str] | None = None):
    return subprocess.run([*(prefix or []), BPFTUNE, *args], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, **(env or {})))


def assert_one_line_error(r, text: str) -> None:
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("bpftune: ") and text in r.stderr
    assert "Traceback" not in r.stderr


# Kernels built without CONFIG_NET_FLOW_LIMIT (this machine's 6.18 since 2026-12-03) say
# what net_buffer then leaves undone.
NET_BUFFER_LINE = "bpftune: net_buffer: raw_tp/kfree_skb" + (
    "" if os.path.exists("/proc/sys/net/core/flow_limit_cpu_bitmap") else
    "; this kernel has no net.core.flow_limit_cpu_bitmap (built without "
    "CONFIG_NET_FLOW_LIMIT): backlog drops grow the backlog, and no CPU is given flow limits")


def test_support_reports_full_support_netns_cookies_and_each_tuners_hooks():
    r = bpftune("-S")
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == [
        "bpftune: bpftune works fully",
        "bpftune: bpftune supports per-netns policy (via netns cookie)",
        # fentry is refused here: each tuner says which hooks it takes instead.
        "bpftune: ip_frag: raw_tp/kfree_skb",
        "bpftune: neigh_table: raw_tp/neigh_create",
        NET_BUFFER_LINE,
        "bpftune: netns: raw_tp/sched_process_fork",
        "bpftune: route_table: not needed: this kernel does not enforce "
        "net.ipv6.route.max_size (dst_ops.gc returns void since Linux commit af6d10345ca7, "
        "the CVE-2023-52340 fix)",
        "bpftune: sysctl: cgroup/sysctl",
        "bpftune: tcp_buffer: raw_tp/tcp_probe, "
        "tp/sock/sock_exceed_buf_limit, tp/tcp/tcp_retransmit_synack, "
        "sock_ops/connection_setup",
        "bpftune: tcp_conn: sock_ops/conn_tuner",
        "bpftune: udp_buffer: raw_tp/udp_fail_queue_rcv_skb, raw_tp/kfree_skb",
    ]


def test_support_without_btf_names_the_feature_and_the_tuners_it_disables():
    r = bpftune("-S", env={"BPFTUNE_VMLINUX_BTF": "/nonexistent/vmlinux"})
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert lines[0] == "bpftune: bpftune is not supported"
    assert ("bpftune: missing BPF Type Format (BTF) information for kernel struct offsets "
            "(cannot read kernel BTF from /nonexistent/vmlinux): disables ip_frag, neigh_table, "
            "net_buffer, netns, sysctl, tcp_buffer, tcp_conn, udp_buffer") in lines


def test_start_without_btf_is_one_clear_line(tmp_path):
    r = bpftune("-s", env={"BPFTUNE_VMLINUX_BTF": "/nonexistent/vmlinux",
                           "BPFTUNE_STATE_DIR": str(tmp_path)})
    assert_one_line_error(r, "cannot read kernel BTF from /nonexistent/vmlinux")


@pytest.mark.parametrize(("args", "message"), [
    (["--frobnicate"], "unrecognized option '--frobnicate'"),
    (["-x"], "unrecognized option '-x'"),
    (["-r", "9"], "values 0-4 are supported for the learning rate"),
    (["-r", "fast"], "values 0-4 are supported for the learning rate"),
    (["-r"], "argument -r/--learning_rate: expected one argument"),
    (["--audit-file", ""], "--audit-file needs a file name"),
])
def test_bad_options_are_one_line_and_exit_1(args, message):
    assert_one_line_error(bpftune(*args), message)


def test_not_root_is_one_line_and_exit_1():
    assert_one_line_error(bpftune("-s", prefix=NOBODY), "must be run as root")
    assert_one_line_error(bpftune("-S", prefix=NOBODY), "must be run as root")


def test_query_without_daemon_is_one_line_and_exit_1():
    assert_one_line_error(bpftune("-q", "status"), "could not connect to bpftune")


def test_help_version_and_libdir():
    r = bpftune("-h")
    assert r.returncode == 0 and r.stderr.startswith("Usage: bpftune [OPTIONS]")
    for option in ("--allow", "--cgroup", "--learning_rate", "--query", "--rollback",
                   "--support", "--stderr", "--port", "--libdir", "--audit-file"):
        assert option in r.stderr
    r = bpftune("-V")
    assert r.returncode == 0 and r.stdout.startswith("bpftune v")
    r = bpftune("--print-libdir")
    assert r.returncode == 0 and os.path.isfile(os.path.join(r.stdout.strip(),
                                                             "tcp_buffer.py"))


def test_daemon_process_is_named_bpftune_and_allow_list_takes_upstream_names(tmp_path):
    with daemon(tmp_path, "-a", "tcp_buffer_tuner.so", "-a", "sysctl") as d:
        with open(f"/proc/{d.proc.pid}/comm") as f:
            assert f.read().strip() == "bpftune"
        d.wait_for("active tuners: sysctl, tcp_buffer$|active tuners: sysctl, tcp_buffer\n")


def test_daemon_logs_its_support_level_before_the_tuners_lines(tmp_path):
    with daemon(tmp_path, "-d") as d:
        lines = d.log.splitlines()
    first = next(i for i, line in enumerate(lines) if "tcp_buffer" in line)
    assert lines.index("bpftune: bpftune works fully") < first
    assert lines.index("bpftune: bpftune supports per-netns policy (via netns cookie)") < first


def test_second_daemon_refuses_to_start(tmp_path):
    with daemon(tmp_path):
        r = bpftune("-s", env={"BPFTUNE_STATE_DIR": str(tmp_path / "other")})
        assert_one_line_error(r, "bpftune is already running (pid ")


def test_without_syslog_socket_says_so_once_and_logs_to_stderr(tmp_path):
    # Hide a syslog socket, if this machine has one, in a private mount namespace.
    prefix = (["unshare", "--mount", "--propagation", "private", "sh", "-c",
               'mount --bind /dev/null /dev/log && exec "$0" "$@"']
              if os.path.exists("/dev/log") else None)
    with daemon(tmp_path, stderr=False, prefix=prefix) as d:
        pass
    lines = d.log.splitlines()
    assert lines[0] == "bpftune: no syslog socket at /dev/log; logging to stderr"
    assert sum("no syslog socket" in line for line in lines) == 1


def test_daemon_option_detaches_and_keeps_running(tmp_path):
    log = tmp_path / "bpftune.log"
    with open(log, "w") as out:
        r = subprocess.run([BPFTUNE, "-D", "-s"], stdout=out, stderr=out, timeout=30,
                           env=dict(os.environ, BPFTUNE_STATE_DIR=str(tmp_path)))
    assert r.returncode == 0
    assert wait_until(lambda: "started; active tuners" in log.read_text(), timeout=60)
    with open("/run/bpftune/bpftune.pid") as f:
        pid = int(f.read())
    try:
        with open(f"/proc/{pid}/comm") as f:
            assert f.read().strip() == "bpftune"
        assert os.getsid(pid) == pid  # its own session, detached from ours
    finally:
        os.kill(pid, signal.SIGTERM)
    assert wait_until(lambda: not os.path.exists(f"/proc/{pid}"), timeout=60)


def test_installed_wheel_finds_its_bpf_programs(tmp_path):
    """From a wheel install (as from an RPM), away from the checkout, -S still loads them."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path / "dist"), str(REPO)],
                   check=True, capture_output=True)
    venv = tmp_path / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)],
                   check=True)
    (wheel,) = (tmp_path / "dist").glob("bpftune-*.whl")
    subprocess.run([venv / "bin/pip", "install", "-q", "--no-deps", wheel], check=True,
                   capture_output=True)
    r = subprocess.run([venv / "bin/bpftune", "-S"], cwd="/", capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != "BPFTUNE_BPF_DIR"})
    assert r.returncode == 0, r.stderr
    assert "bpftune: bpftune works fully" in r.stderr
    assert (venv / "share/bpftune/bpf/tcp_buffer.bpf.c").is_file()
