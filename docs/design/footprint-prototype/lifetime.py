"""What the kernel keeps when the daemon dies by SIGKILL (its fds closed by the kernel).

Runs ``parent.py --hold`` (everything loaded and attached, then it sleeps), kills it with
SIGKILL, and looks by id at its programs and maps: raw tracepoint links and tracepoint
perf events go with the fds (programs freed), the bpf_link'ed sockops program is detached,
the bpf_prog_attach'ed cgroup/sysctl program stays attached (and keeps its maps) until the
next start detaches it by name with libbpf (what Cgroup.detach_stale does with bpftool).
"""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import libbpf

HERE = os.path.dirname(os.path.abspath(__file__))


def alive(get_fd, obj_id: int) -> bool:
    try:
        os.close(get_fd(obj_id))
        return True
    except libbpf.BpfError as e:
        if e.errno != errno.ENOENT:
            raise
        return False


def wait_gone(get_fd, ids: dict[str, int], timeout: float = 3.0) -> dict[str, bool]:
    """Freeing is deferred (RCU, work queues): wait a little for it."""
    end = time.monotonic() + timeout
    while True:
        state = {name: alive(get_fd, i) for name, i in ids.items()}
        if not any(state.values()) or time.monotonic() > end:
            return state
        time.sleep(0.05)


def main() -> None:
    daemon = subprocess.Popen([sys.executable, os.path.join(HERE, "parent.py"), "--hold"],
                              stdout=subprocess.PIPE, text=True)
    held = json.loads(daemon.stdout.readline())
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.wait()
    out = {"before_kill": {"attached": held["cgroup_attached_after_switch"]}}
    progs = wait_gone(libbpf.prog_fd_by_id, held["prog_ids"])
    maps = wait_gone(libbpf.map_fd_by_id, held["map_ids"], timeout=0.5)
    cg = os.open(held["cgroup"], os.O_RDONLY | os.O_DIRECTORY)
    out["after_kill"] = {
        "programs_alive": progs,
        "maps_alive": maps,
        "cgroup_sysctl_attached": libbpf.cgroup_programs(cg, libbpf.BPF_CGROUP_SYSCTL),
        "cgroup_sockops_attached": libbpf.cgroup_programs(cg, libbpf.BPF_CGROUP_SOCK_OPS),
    }
    out["detach_stale"] = libbpf.detach_stale(cg, libbpf.BPF_CGROUP_SYSCTL, {"proto13_sysctl"})
    out["after_detach"] = {
        "cgroup_sysctl_attached": libbpf.cgroup_programs(cg, libbpf.BPF_CGROUP_SYSCTL),
        "programs_alive": wait_gone(libbpf.prog_fd_by_id, held["prog_ids"]),
        "maps_alive": wait_gone(libbpf.map_fd_by_id, held["map_ids"]),
    }
    os.close(cg)
    os.rmdir(held["cgroup"])
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
