"""Local users cannot blind the daemon: while an unprivileged user makes user and network
namespaces (and writes tcp_rmem in each) as fast as it can, an administrator's write is
still seen and honoured, and the daemon's tables stay bounded."""

from __future__ import annotations

import subprocess
import sys
import time

from helpers import BPFTUNE, daemon, netns_cookie, read_sysctl, values
from test_tcp_buffer import RMEM

FLOOD_SECONDS = 20
WRITES_PER_NETNS = 1000
# As user nobody: a user namespace, then new network namespaces in a loop, each with
# writes to a sysctl bpftune manages (root in a user namespace may write its own).
FLOOD = r"""
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
if libc.unshare(CLONE_NEWUSER) != 0:
    sys.exit("unshare(CLONE_NEWUSER) failed")
deadline, made, WRITES = time.monotonic() + float(sys.argv[1]), 0, int(sys.argv[2])
while time.monotonic() < deadline:
    if libc.unshare(CLONE_NEWNET) != 0:
        sys.exit("unshare(CLONE_NEWNET) failed")
    fd = os.open("/proc/sys/net/ipv4/tcp_rmem", os.O_WRONLY)
    for _ in range(WRITES):
        os.pwrite(fd, b"4096 131072 262144", 0)
    os.close(fd)
    made += 1
print(made)
"""
AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def start_floods() -> list[subprocess.Popen]:
    writers = [subprocess.Popen([*AS_NOBODY, sys.executable, "-c", FLOOD, str(FLOOD_SECONDS),
                                 str(WRITES_PER_NETNS)], stdout=subprocess.PIPE, text=True)
               for _ in range(3)]
    return writers


def test_an_administrator_write_is_honoured_during_a_namespace_flood(tmp_path, sysctls):
    sysctls.remember(RMEM)
    lo, default, high = values(read_sysctl(RMEM))
    admin = f"{lo} {default} {high + 4096}"
    with daemon(tmp_path) as d:
        floods = start_floods()
        try:
            time.sleep(3)
            subprocess.run(["sysctl", "-q", "-w", f"{RMEM}={admin}"], check=True)
            d.wait_for(rf"modified sysctl '{RMEM}' that tuner 'tcp_buffer' uses; disabling "
                       rf"'tcp_buffer' for namespace cookie {netns_cookie(None)}\n", timeout=10)
        finally:
            made = [p.communicate(timeout=FLOOD_SECONDS + 30)[0] for p in floods]
        assert sum(int(m) for m in made) > 200, made  # the flood was real
        tuners = subprocess.run([BPFTUNE, "-q", "tuners"],
                                capture_output=True, text=True, timeout=10).stdout
        assert "tcp_buffer" in tuners and "manual" in tuners.split("tcp_buffer")[1].split()[0]
        assert d.proc.poll() is None
        assert read_sysctl(RMEM) == admin
