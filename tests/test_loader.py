"""The loader child (issue 13): BCC compiles in a short-lived process, so the running daemon
never maps LLVM; what a child that hangs or dies costs is the one module it was compiling."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from bpftune import bpf
from bpftune.bpf import BpfError, CompileRequest, Module, Programs
from bpftune.btf import Btf
from bpftune.learning import LearningRate
from bpftune.mounts import mounted_fstype
from helpers import daemon

COMPILERS = ("libbcc", "LLVM", "libclang", "libclang-cpp")
FINE = "BPF_ARRAY(counts, u64, 1);\nint unused(void *ctx) { return 0; }\n"
BPF_PROG_TYPE_RAW_TRACEPOINT = 17


def mapped_libraries(pid: int) -> set[str]:
    with open(f"/proc/{pid}/maps") as f:
        return {Path(line.split()[5]).name for line in f if len(line.split()) > 5}


def children(pid: int) -> list[str]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return f.read().split()


def test_the_ready_daemon_maps_no_compiler_and_its_loaders_are_gone(tmp_path):
    with daemon(tmp_path) as d:
        libraries = mapped_libraries(d.proc.pid)
        assert not [lib for lib in libraries if lib.startswith(COMPILERS)], libraries
        assert any(lib.startswith("libbpf.so") for lib in libraries), libraries
        assert children(d.proc.pid) == []
        # The shared maps were pinned only in the loaders' own bpffs.
        if mounted_fstype("/sys/fs/bpf") == "bpf":
            assert not [p for p in os.listdir("/sys/fs/bpf") if p.startswith("bpftune")]


@pytest.fixture
def programs():
    p = Programs(Btf.load(), LearningRate(), lambda _event: None)
    yield p
    p.close()


def test_a_hung_compile_is_killed_and_only_its_module_fails(tmp_path, monkeypatch, programs):
    never_written = tmp_path / "fifo"
    os.mkfifo(never_written)  # the compiler blocks opening it, as a hung LLVM would
    monkeypatch.setattr(bpf, "LOADER_TIMEOUT_S", 5)
    requests = [programs.request("hung", tmp_path / "hung.bpf.c", 0, {},
                                 text=f'#include "{never_written}"\n'),
                programs.request("fine", tmp_path / "fine.bpf.c", 0, {}, text=FINE)]
    results = programs.loader.load(requests)  # one child for both
    assert str(results["hung"]) == "BPF loader died compiling it (killed by signal 9)"
    fine = results["fine"]
    assert isinstance(fine, Module), fine  # compiled by a second child
    try:
        assert fine["counts"][0].value == 0  # its map, read through libbpf
    finally:
        fine.close()


def test_a_module_that_does_not_compile_fails_with_the_compilers_reason(tmp_path, programs):
    with pytest.raises(BpfError, match=r"cannot load BPF program broken\.bpf\.c: .*Failed to "
                                       r"compile BPF module"):
        programs.compile(tmp_path / "broken.bpf.c", 0, {}, text="int broken( {\n")


def test_bcc_finds_the_probe_read_helper_in_the_loaders_small_kallsyms(programs):
    """The loader child shows BCC a /proc/kallsyms of just the symbols its compile looks up
    (bpftune.loader.small_kallsyms): every READ_AT's bpf_probe_read_kernel is still that
    helper, as with the whole file. BCC turns it into bpf_probe_read (shown as
    bpf_probe_read_compat) where it cannot find the symbol."""
    text = ("int deref(struct bpf_raw_tracepoint_args *ctx)\n"
            "{ u64 v = 0; bpf_probe_read_kernel(&v, sizeof(v), (void *)ctx->args[0]);\n"
            "  return v; }\n")
    request = CompileRequest("deref", text, [], {"deref": BPF_PROG_TYPE_RAW_TRACEPOINT})
    module = programs.loader.load([request])["deref"]
    assert isinstance(module, Module), module
    try:
        fdinfo = Path(f"/proc/self/fdinfo/{module.programs['deref']}").read_text()
        prog_id = re.search(r"prog_id:\s+(\d+)", fdinfo)[1]
        xlated = subprocess.run(["bpftool", "prog", "dump", "xlated", "id", prog_id],
                                capture_output=True, text=True, check=True).stdout
        calls = re.findall(r"call (\w+)#", xlated)
        assert calls == ["bpf_probe_read_kernel"], xlated
    finally:
        module.close()
