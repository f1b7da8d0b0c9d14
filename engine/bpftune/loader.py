"""The short-lived loader child: the only process of bpftune that imports bcc.

BCC maps LLVM and clang (over 100 MiB) for as long as a process lives, so the daemon never
compiles: it runs ``python3 -m bpftune.loader`` (see bpftune.bpf.Loader), writes the modules
to compile on its stdin, and receives per module one message on an inherited SOCK_SEQPACKET
socket: a JSON description (maps with BCC's layout descriptions, programs, attachments) and
their file descriptors (SCM_RIGHTS). Tracepoints, raw tracepoints and fentry attach here
(BCC's autoload), and their fds keep them attached in the daemon; cgroup programs are only
loaded here and attached by the daemon.

On stdin, one JSON object a line: first {"sock": fd, "pin_dir": path, "shared": {map name:
fd}}, then one module at a time, {"name", "text", "cflags": [...], "cgroup": {function:
program type}, "attach": bool}, the next one written when this child has answered (children
side by side each take the next module left); the end of stdin ends the child. A module with
"attach" false is only compiled: its answer has the function names and no fds.
"""

from __future__ import annotations

import ctypes as ct
import json
import os
import socket
import sys

from bpftune.mounts import MS_BIND, mount, umount, unshare_mounts

SCM_MAX_FD = 253  # the kernel's limit of fds in one message
KALLSYMS = "/proc/kallsyms"
#: The kernel symbols BCC's compile looks up (b_frontend_action.cc: whether the kernel has
#: bpf_probe_read_kernel and _user; where not, BCC turns calls to them into bpf_probe_read).
BCC_LOOKS_UP = b"bpf_probe_read"


def private_mounts(pin_dir: str) -> None:
    """This process's own mount namespace: a bpffs at ``pin_dir`` only it sees (pins vanish
    with the child, and nothing is ever left in the host's /sys/fs/bpf, even after a kill
    -9), and a small /proc/kallsyms (small_kallsyms)."""
    unshare_mounts()
    try:
        small_kallsyms(pin_dir)
    except OSError as e:  # a speed-up only: BCC reads the whole file then
        print(f"/proc/kallsyms left whole: {e}", file=sys.stderr)
    mount("bpf", pin_dir, "bpf")


def small_kallsyms(scratch: str) -> None:
    """BCC reads all of /proc/kallsyms into a table at every compile, to look up a few
    symbols (BCC_LOOKS_UP): 120,000 symbols here, 0.2 s of each module's 0.5 s. In this
    mount namespace, /proc/kallsyms becomes the kernel's own lines for those symbols, read
    once: BCC finds what it would have found (nothing where kptr_restrict hides addresses).
    The file is written on a tmpfs mounted at ``scratch`` for the moment it takes, so
    nothing outside this namespace ever sees it."""
    with open(KALLSYMS, "rb") as f:
        lines = [line for line in f if BCC_LOOKS_UP in line
                 and line.split()[2].startswith(BCC_LOOKS_UP)]
    mount("tmpfs", scratch, "tmpfs", options="size=64k,mode=0700")
    try:
        path = os.path.join(scratch, "kallsyms")
        with open(path, "wb") as f:
            f.writelines(lines)
        mount(path, KALLSYMS, None, MS_BIND)
    finally:
        umount(scratch)


class _Described:
    """A compiled module's maps, programs and attachments: a JSON description and fds."""

    def __init__(self, lib) -> None:
        self.lib = lib
        self.fds: list[int] = []

    def _fd(self, fd: int) -> int:
        self.fds.append(fd)
        return len(self.fds) - 1

    def module(self, b, shared: set[str]) -> dict:
        lib = self.lib
        maps = {}
        for i in range(lib.bpf_num_tables(b.module)):
            name = lib.bpf_table_name(b.module, i)
            if name.decode() in shared:  # the daemon has those already
                continue
            maps[name.decode()] = {
                "fd": self._fd(lib.bpf_table_fd(b.module, name)),
                "key": json.loads(lib.bpf_table_key_desc(b.module, name) or b'"int"'),
                "leaf": json.loads(lib.bpf_table_leaf_desc(b.module, name) or b'"int"'),
            }
        programs = {name.decode(): self._fd(fn.fd) for name, fn in b.funcs.items()}
        # What keeps an autoloaded program attached: a raw tracepoint's fd (a link), a
        # tracepoint's perf event fd, fentry/fexit tracing link fds.
        attachments = [self._fd(fd) for fd in (*b.raw_tracepoint_fds.values(),
                                               *b.tracepoint_fds.values(),
                                               *b.kfunc_entry_fds.values(),
                                               *b.kfunc_exit_fds.values())]
        return {"maps": maps, "programs": programs, "attachments": attachments}


def _declare(lib) -> None:
    # BCC's binding leaves these two undeclared (the int default truncates pointers).
    lib.bpf_num_tables.restype, lib.bpf_num_tables.argtypes = ct.c_size_t, [ct.c_void_p]
    lib.bpf_table_name.restype = ct.c_char_p
    lib.bpf_table_name.argtypes = [ct.c_void_p, ct.c_ulonglong]


def _functions(b, lib) -> list[str]:
    return [lib.bpf_function_name(b.module, i).decode()
            for i in range(lib.bpf_num_functions(b.module))]


def _load(bcc, lib, module: dict, shared: set[str]) -> tuple[dict, list[int], object]:
    text, cflags = module["text"].encode(), module["cflags"]
    if not module.get("attach", True):
        class CompiledOnly(bcc.BPF):
            def _trace_autoload(self) -> None:  # compile and create maps, attach nothing
                pass

        b = CompiledOnly(text=text, cflags=cflags)
        answer = {"functions": _functions(b, lib)}
        b.cleanup()
        return answer, [], None
    b = bcc.BPF(text=text, cflags=cflags)
    for function, prog_type in module.get("cgroup", {}).items():
        b.load_func(function.encode(), prog_type)  # attached by the daemon
    described = _Described(lib)
    answer = described.module(b, shared) | {"functions": _functions(b, lib)}
    return answer, described.fds, b


def main() -> None:
    request = json.loads(sys.stdin.readline())
    sock = socket.socket(fileno=request["sock"])
    os.makedirs(request["pin_dir"], exist_ok=True)
    private_mounts(request["pin_dir"])
    import bcc
    from bcc.libbcc import lib

    _declare(lib)
    lib.bpf_obj_pin.argtypes = [ct.c_int, ct.c_char_p]
    for name, fd in request["shared"].items():
        if lib.bpf_obj_pin(fd, f"{request['pin_dir']}/{name}".encode()) != 0:
            raise OSError(ct.get_errno(), f"cannot pin {name}")
    compiled = []  # kept until exit: nothing of BCC's is detached or freed here
    while line := sys.stdin.readline():
        module = json.loads(line)
        try:
            answer, fds, b = _load(bcc, lib, module, set(request["shared"]))
        except Exception as e:  # BCC raises plain Exceptions for compile and load errors
            reason = str(e).strip().splitlines()
            answer, fds, b = {"error": reason[0] if reason else repr(e)}, [], None
        compiled.append(b)
        if len(fds) > SCM_MAX_FD:
            answer, fds = {"error": f"{len(fds)} fds, more than one message holds"}, []
        socket.send_fds(sock, [json.dumps(answer | {"name": module["name"]}).encode()], fds)
    sock.close()
    sys.stderr.flush()
    # No atexit: BCC's cleanup would disable the tracepoints' perf events the daemon holds.
    os._exit(0)


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError, KeyError) as e:  # its last line is the daemon's reason
        print(getattr(e, "strerror", None) or repr(e), file=sys.stderr)
        sys.exit(1)
