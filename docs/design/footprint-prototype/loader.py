"""The short-lived loader child: the only process that imports bcc (and so maps LLVM).

Run by the daemon as ``python3 loader.py JSON`` with a SOCK_SEQPACKET socket and the fds of
already-existing shared maps inherited (``pass_fds``). It compiles each module with BCC,
lets BCC attach tracepoints and raw tracepoints (autoload), loads cgroup programs without
attaching them, and sends per module one message: a JSON description (map names, types,
key/leaf layouts as BCC's type descriptions, program names) plus every fd (SCM_RIGHTS).
Then it leaves with os._exit(), so BCC's atexit cleanup never runs: that cleanup would
PERF_EVENT_IOC_DISABLE the tracepoints' perf events, which the daemon's fds share.

JSON: {"sock": fd, "pin_dir": path, "shared": {name: fd}, "modules": [{"name", "source",
"cflags": [...], "paste": [header paths],
"cgroup": {function: prog_type}}]}
"""

import ctypes as ct
import json
import os
import resource
import socket
import sys
import time

T0 = time.monotonic()

CLONE_NEWNS = 0x00020000
MS_REC, MS_PRIVATE = 0x4000, 0x40000
SCM_MAX_FD = 253  # the kernel's limit of fds in one message


def private_bpffs(path: str) -> None:
    """A bpffs only this process sees: pins vanish with the child, nothing is left in the
    host's /sys/fs/bpf even after a kill -9."""
    libc = ct.CDLL(None, use_errno=True)
    for ret, what in ((lambda: libc.unshare(CLONE_NEWNS), "unshare"),
                      (lambda: libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None),
                       "make / private"),
                      (lambda: libc.mount(b"bpf", path.encode(), b"bpf", 0, None),
                       f"mount bpffs at {path}")):
        if ret() != 0:
            err = ct.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")


def describe(b, lib) -> tuple[dict, list[int]]:
    """Maps and programs of a compiled module: their JSON description and fds."""
    fds: list[int] = []
    # BCC's Python binding leaves these two undeclared (the int default truncates pointers).
    lib.bpf_num_tables.restype, lib.bpf_num_tables.argtypes = ct.c_size_t, [ct.c_void_p]
    lib.bpf_table_name.restype = ct.c_char_p
    lib.bpf_table_name.argtypes = [ct.c_void_p, ct.c_ulonglong]

    def fd_index(fd: int) -> int:
        fds.append(fd)
        return len(fds) - 1

    maps = {}
    for i in range(lib.bpf_num_tables(b.module)):
        name = lib.bpf_table_name(b.module, i)
        maps[name.decode()] = {
            "fd": fd_index(lib.bpf_table_fd(b.module, name)),
            "type": lib.bpf_table_type_id(b.module, i),
            "key": json.loads(lib.bpf_table_key_desc(b.module, name) or b'"int"'),
            "leaf": json.loads(lib.bpf_table_leaf_desc(b.module, name) or b'"int"'),
        }
    progs = {name.decode(): fd_index(fn.fd) for name, fn in b.funcs.items()}
    # What keeps an autoloaded program attached: the raw tracepoint's fd (a bpf_link on
    # current kernels) and the tracepoint's perf event fd.
    attachments = {f"raw_tp:{tp.decode()}": fd_index(fd) for tp, fd in b.raw_tracepoint_fds.items()}
    attachments |= {f"tp:{tp.decode()}": fd_index(fd) for tp, fd in b.tracepoint_fds.items()}
    # fentry/fexit (KFUNC_PROBE/KRETFUNC_PROBE): tracing link fds; refused on this kernel.
    attachments |= {f"fentry:{fn.decode()}": fd_index(fd)
                    for fn, fd in {**b.kfunc_entry_fds, **b.kfunc_exit_fds}.items()}
    return {"maps": maps, "progs": progs, "attachments": attachments}, fds


def main() -> None:
    args = json.loads(sys.argv[1])
    sock = socket.socket(fileno=args["sock"])
    os.makedirs(args["pin_dir"], exist_ok=True)
    private_bpffs(args["pin_dir"])
    import libbpf
    for name, fd in args["shared"].items():
        libbpf.pin(fd, f"{args['pin_dir']}/{name}")
    t_import = time.monotonic()
    import bcc
    from bcc.libbcc import lib
    timings = {"python_and_setup_s": t_import - T0, "import_bcc_s": time.monotonic() - t_import}
    compiled = []  # kept alive until exit: nothing of BCC's is freed or detached
    for module in args["modules"]:
        t = time.monotonic()
        try:
            with open(module["source"]) as f:
                text = f.read()
            # As bpftune's Programs._text: BCC rewrites map method calls
            # (events.ringbuf_output(...)) only in the main file, so headers are pasted in.
            for header in module.get("paste", []):
                with open(header) as f:
                    text = text.replace(f'#include "{os.path.basename(header)}"', f.read())
            b = bcc.BPF(text=text.encode(), cflags=module["cflags"])
            compiled.append(b)
            for function, prog_type in module.get("cgroup", {}).items():
                b.load_func(function.encode(), prog_type)  # attached by the daemon
            desc, fds = describe(b, lib)
        except Exception as e:
            socket.send_fds(sock, [json.dumps({"name": module["name"],
                                               "error": str(e).splitlines()[0]}).encode()], [])
            continue
        timings[f"compile_{module['name']}_s"] = time.monotonic() - t
        desc |= {"name": module["name"], "timings": timings,
                 "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
        if len(fds) > SCM_MAX_FD:
            raise SystemExit(f"{module['name']}: {len(fds)} fds, more than one message holds")
        socket.send_fds(sock, [json.dumps(desc).encode()], fds)
    sock.close()
    if os.environ.get("LOADER_RUN_BCC_CLEANUP"):  # the hazard, shown by hazard.sh
        for b in compiled:
            b.cleanup()
    sys.stdout.flush()
    os._exit(0)  # no atexit: BCC's cleanup would disable the shared perf events


if __name__ == "__main__":
    main()
