"""The daemon stand-in: never imports bcc; BPF through libbpf (ctypes) on handed-over fds.

1. Creates the shared maps itself with libbpf (two ring buffers, a per-CPU drop counter)
   and starts polling the rings.
2. Start-up: two loader children (loader.py) in parallel, one per module, each given the
   shared maps' fds: module 1 (prog1.bpf.c: raw tracepoint + tracepoint, lru_hash, percpu
   array, hash, array) and module 2 (prog2.bpf.c: cgroup/sysctl and sockops programs, socket
   storage). Each sends its fds over a unix socket (SCM_RIGHTS) and exits. The daemon
   attaches module 2's programs to a test cgroup: cgroup/sysctl with bpf_prog_attach
   (BPF_F_ALLOW_MULTI, as bpftune today), sockops with bpf_link_create.
3. Triggers: forks, and a process in the test cgroup reading a sysctl and connecting over
   loopback; events arrive through libbpf's ring_buffer__poll. Map reads/updates/deletes,
   per-CPU values.
4. A strategy switch: module 2 reloaded by a new loader child (-DVARIANT=2), the old
   programs detached, the new attached; the new programs' events arrive on the same rings.
5. Checks /proc/self/maps (no bcc, LLVM, clang), measures, cleans up.

``--hold``: stop after step 4 with everything attached, print the ids and sleep
(lifetime.py kills it with SIGKILL and looks at what the kernel kept).
``--bcc-creates-shared``: no step 1; module 1's child (run alone first) has BCC create and
pin the shared maps, and the daemon takes them from its fds.
"""

import time

T0 = time.monotonic()

import ctypes as ct
import json
import os
import signal
import socket
import sys

import libbpf

HERE = os.path.dirname(os.path.abspath(__file__))
PIN_DIR = "/sys/fs/bpf"  # only ever mounted (bpffs) in the loader children's mount namespaces
CGROUP2 = "/sys/fs/cgroup/unified"
BPF_PROG_TYPE_SOCK_OPS, BPF_PROG_TYPE_CGROUP_SYSCTL = 13, 23
SHARED_MAPS = ("events", "admin_events", "dropped")  # bpf/shared.h
KINDS = {1: "raw_tp fork", 2: "tracepoint fork", 3: "sockops established", 4: "cgroup/sysctl"}


class Event(ct.Structure):
    """struct proto_event (bpf/shared.h)."""
    _fields_ = [("kind", ct.c_uint32), ("pid", ct.c_uint32), ("value", ct.c_uint64),
                ("comm", ct.c_char * 16), ("text", ct.c_char * 32)]


def status(*fields: str) -> dict[str, int]:
    """Fields of /proc/self/status, in KiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in fields:
                out[key] = int(value.split()[0])
    return out


def seconds_since_exec() -> float:
    """How long ago this process started (exec), from /proc (10 ms resolution)."""
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def compiler_mappings() -> list[str]:
    with open("/proc/self/maps") as f:
        return sorted({line.split()[-1] for line in f
                       if any(s in line for s in ("libbcc", "LLVM", "clang"))})


def create_shared_maps() -> dict[str, int]:
    """What bpftune's core BCC module makes today, made with libbpf: no compile."""
    page = os.sysconf("SC_PAGE_SIZE")
    return {"events": libbpf.map_create(libbpf.MAP_RINGBUF, "events", 0, 0, 16 * page),
            "admin_events": libbpf.map_create(libbpf.MAP_RINGBUF, "admin_events", 0, 0,
                                              16 * page),
            "dropped": libbpf.map_create(libbpf.MAP_PERCPU_ARRAY, "dropped", 4, 8, 2)}


class Module:
    """One loaded module as the daemon holds it: fds and BCC-style tables (``m["name"]``)."""

    def __init__(self, desc: dict, fds: list[int]) -> None:
        self.name, self.fds = desc["name"], fds
        self.progs = {n: fds[i] for n, i in desc["progs"].items()}
        self.attachments = {n: fds[i] for n, i in desc["attachments"].items()}
        self.map_fds = {n: fds[m["fd"]] for n, m in desc["maps"].items()}
        # Ring buffers and socket storage are only the kernel's business (no userspace
        # lookups); every other map gets a Table.
        self.tables = {n: libbpf.Table(n, fds[m["fd"]], m["key"], m["leaf"])
                       for n, m in desc["maps"].items()
                       if m["type"] not in (libbpf.MAP_RINGBUF, libbpf.MAP_SK_STORAGE)}

    def __getitem__(self, name: str) -> libbpf.Table:
        return self.tables[name]

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


class Loader:
    """A loader child at work: started by start(), its modules collected by finish()."""

    def __init__(self, modules: list[dict], shared: dict[str, int]) -> None:
        self.started = time.monotonic()
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        inherited = [theirs.fileno(), *shared.values()]
        for fd in inherited:  # posix_spawn passes on exactly the inheritable fds
            os.set_inheritable(fd, True)
        args = {"sock": theirs.fileno(), "pin_dir": PIN_DIR, "shared": shared,
                "modules": modules}
        self.pid = os.posix_spawn(sys.executable, [
            sys.executable, os.path.join(HERE, "loader.py"), json.dumps(args)], os.environ)
        for fd in inherited[1:]:
            os.set_inheritable(fd, False)
        theirs.close()

    def finish(self) -> tuple[list[Module], dict]:
        loaded, figures = [], {}
        while True:
            msg, fds, flags, _ = socket.recv_fds(self.sock, 1 << 20, 253)
            if not msg:  # the child closed its end (or died: then its fds are gone too)
                break
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise RuntimeError("loader message truncated")
            desc = json.loads(msg)
            if "error" in desc:
                print(f"cannot load {desc['name']}: {desc['error']}")
                continue
            loaded.append(Module(desc, fds))
            figures = desc["timings"]
        self.sock.close()
        _, wstatus, rusage = os.wait4(self.pid, 0)
        figures |= {"exit_status": os.waitstatus_to_exitcode(wstatus),
                    "child_peak_rss_kib": rusage.ru_maxrss,
                    "child_wall_s": round(time.monotonic() - self.started, 3)}
        return loaded, figures


class Collector:
    """The daemon's event callback (Programs._on_ring_buffer)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Event]] = []

    def on(self, ring: str):
        def handle(data: int, size: int) -> None:
            if size != ct.sizeof(Event):
                print(f"unexpected size event {size}")
                return
            # Copy: the record is only valid during the callback.
            self.events.append((ring, Event.from_buffer_copy(ct.string_at(data, size))))
        return handle

    def wait(self, rings: libbpf.RingBuffers, done, timeout: float = 3.0) -> bool:
        end = time.monotonic() + timeout
        while not done(self.events):
            if time.monotonic() > end:
                return False
            rings.poll(100)
        return True


def show(event: Event) -> str:
    return (f"{KINDS.get(event.kind, event.kind)}: pid {event.pid} value {event.value} "
            f"comm {event.comm.decode(errors='replace')!r} text {event.text.decode()!r}")


def module_source(name: str, cflags: list[str] = (), cgroup: dict | None = None) -> dict:
    return {"name": name, "source": os.path.join(HERE, "bpf", f"{name}.bpf.c"),
            "cflags": [f"-I{HERE}/bpf", f'-DPIN_DIR="{PIN_DIR}"', *cflags],
            "cgroup": cgroup or {}, "paste": [os.path.join(HERE, "bpf", "shared.h")]}


def module2(variant: int) -> dict:
    return module_source("prog2", [f"-DVARIANT={variant}"], {
        "proto13_sysctl": BPF_PROG_TYPE_CGROUP_SYSCTL,
        "proto13_sockops": BPF_PROG_TYPE_SOCK_OPS})


def fork_children(n: int) -> list[int]:
    pids = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    return pids


def map_demo(m1: Module, shared: dict[str, libbpf.Table], summary: dict) -> None:
    """Everything tuners do with tables, through libbpf."""
    calls = m1["fork_calls"]
    per_cpu = list(calls[0])
    summary["percpu_fork_calls"] = {"per_cpu": per_cpu, "sum": sum(per_cpu)}
    calls[0] = [100 + i for i in range(calls.ncpus)]  # write every CPU's value
    summary["percpu_after_write"] = list(calls[0])
    forks = m1["forks"]  # lru_hash, struct key {tgid, comm[16]}, nested struct value
    summary["lru_items"] = [{"tgid": k.tgid, "comm": k.comm.decode(), "count": v.count,
                             "last_cpu": v.last.cpu, "last_calls": v.last.calls}
                            for k, v in forks.items()]
    key = forks.keys()[0]
    del forks[key]
    try:
        del forks[key]
        summary["delete_twice"] = "no KeyError (wrong)"
    except KeyError:
        summary["delete_twice"] = "KeyError, as BCC"
    children = m1["children"]
    summary["children_hash"] = {k.value: v.value for k, v in children.items()}
    for k in [k for k in children if k.value % 2 == 0]:  # delete while holding a key list
        del children[k]
    children[ct.c_uint32(1)] = ct.c_uint64(42)  # BCC-style ctypes key/value
    summary["children_after_edit"] = {k.value: v.value for k, v in children.items()}
    summary["dropped"] = [sum(shared["dropped"][i]) for i in range(2)]


class TestCgroup:
    """A cgroup of its own for module 2's programs, so nothing else on the machine runs
    them (bpftune attaches at the root of its cgroup2 mount)."""

    def __init__(self) -> None:
        self.path = f"{CGROUP2}/proto13-{os.getpid()}"
        os.mkdir(self.path)
        self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)

    def attach(self, m2: Module) -> None:
        libbpf.cgroup_attach(m2.progs["proto13_sysctl"], self.fd, libbpf.BPF_CGROUP_SYSCTL)
        link = libbpf.cgroup_link(m2.progs["proto13_sockops"], self.fd,
                                  libbpf.BPF_CGROUP_SOCK_OPS)
        m2.fds.append(link)  # closing it (Module.close, or the daemon dying) detaches
        m2.attachments["cgroup_link:sockops"] = link

    def detach(self, m2: Module) -> None:
        libbpf.cgroup_detach(m2.progs["proto13_sysctl"], self.fd, libbpf.BPF_CGROUP_SYSCTL)

    def attached(self) -> dict[str, list[int]]:
        return {"sysctl (bpf_prog_attach)":
                libbpf.cgroup_programs(self.fd, libbpf.BPF_CGROUP_SYSCTL),
                "sock_ops (bpf_link)": libbpf.cgroup_programs(self.fd,
                                                              libbpf.BPF_CGROUP_SOCK_OPS)}

    def trigger(self) -> int:
        """A process in the cgroup reads a sysctl and connects over loopback."""
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        script = (f"echo $$ > {self.path}/cgroup.procs && read v < /proc/sys/kernel/ostype"
                  f" && exec 3<>/dev/tcp/127.0.0.1/{port}")
        pid = os.posix_spawn("/bin/bash", ["bash", "-c", script], os.environ)
        conn, _ = listener.accept()
        os.waitpid(pid, 0)
        conn.close()
        listener.close()
        return port

    def close(self) -> None:
        os.close(self.fd)
        os.rmdir(self.path)


def start(summary: dict, bcc_creates_shared: bool):
    """Shared maps, then both modules loaded by loader children (in parallel when the
    daemon made the shared maps)."""
    if bcc_creates_shared:
        (m1,), summary["loader1"] = Loader([module_source("prog1")], {}).finish()
        shared = {n: os.dup(m1.map_fds[n]) for n in SHARED_MAPS}  # the daemon's own
        (m2,), summary["loader2"] = Loader([module2(1)], shared).finish()
    else:
        shared = create_shared_maps()
        first = Loader([module_source("prog1")], shared)
        second = Loader([module2(1)], shared)
        (m1,), summary["loader1"] = first.finish()
        (m2,), summary["loader2"] = second.finish()
    summary["shared_map_ids_same_in_both_modules"] = {
        n: libbpf.map_info(m1.map_fds[n]).id == libbpf.map_info(m2.map_fds[n]).id
        == libbpf.map_info(shared[n]).id for n in SHARED_MAPS}
    return shared, m1, m2


def main() -> None:
    hold = "--hold" in sys.argv
    summary: dict = {"startup_before_main_s": round(seconds_since_exec(), 3),
                     "rss_after_imports_kib": status("VmRSS")["VmRSS"]}
    collector = Collector()

    # 1-2. Start-up.
    shared, m1, m2 = start(summary, "--bcc-creates-shared" in sys.argv)
    shared_tables = {"dropped": libbpf.Table("dropped", shared["dropped"], "int",
                                             "unsigned long long")}
    rings = libbpf.RingBuffers()
    rings.add(shared["events"], collector.on("events"))
    rings.add(shared["admin_events"], collector.on("admin_events"))
    m1["config"][0] = os.getpid()  # module 1 reports this process's forks only
    cgroup = TestCgroup()
    cgroup.attach(m2)
    summary["ready_s"] = round(time.monotonic() - T0, 3)

    # 3. Events after the loaders exited; maps.
    summary["forked"] = fork_children(3)
    summary["listener_port"] = cgroup.trigger()
    summary["all_kinds_seen"] = collector.wait(
        rings, lambda evs: {1, 2, 3, 4} <= {e.kind for _, e in evs})
    summary["cgroup_attached"] = cgroup.attached()
    map_demo(m1, shared_tables, summary)

    # 4. Strategy switch: module 2 again, from a new loader child.
    t = time.monotonic()
    new = Loader([module2(2)], shared)
    (m2_new,), summary["loader_switch"] = new.finish()
    cgroup.detach(m2)
    m2.close()  # its sockops link goes with it
    m2 = m2_new
    cgroup.attach(m2)
    summary["switch_s"] = round(time.monotonic() - t, 3)
    cgroup.trigger()
    summary["new_variant_seen"] = collector.wait(
        rings, lambda evs: any(e.kind == 4 and e.value >= 2000 for _, e in evs))
    summary["cgroup_attached_after_switch"] = cgroup.attached()
    summary["events"] = [f"[{ring}] {show(e)}" for ring, e in collector.events]

    # 5. What the daemon has mapped and uses.
    for _ in range(20):  # steady state: keep polling a little, as the main loop does
        rings.poll(10)
    summary["compiler_mappings"] = compiler_mappings()
    summary["steady"] = status("VmRSS", "VmHWM", "RssAnon", "RssFile")
    with open("/proc/self/maps") as f:
        summary["libbpf_mapped"] = any("libbpf.so" in line for line in f)
    if hold:
        summary["prog_ids"] = {f"{m.name}.{n}": libbpf.prog_info(fd).id
                               for m in (m1, m2) for n, fd in m.progs.items()}
        summary["map_ids"] = {f"{m.name}.{n}": libbpf.map_info(fd).id
                              for m in (m1, m2) for n, fd in m.map_fds.items()}
        summary["cgroup"] = cgroup.path
        print(json.dumps(summary), flush=True)
        signal.pause()
    rings.close()
    cgroup.detach(m2)
    for m in (m1, m2):
        m.close()
    cgroup.close()
    for fd in shared.values():
        os.close(fd)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
