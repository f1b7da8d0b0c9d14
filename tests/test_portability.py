"""bpftune on the kernels users run, checked without booting them.

Users run distro kernels, not the one on the machine the tests run on: Debian 12's 6.1,
Debian 13's 6.12, and newer ones like this machine's 6.18. Struct layouts differ between
them (``sock.sk_userlocks`` is a 4-bit bitfield before 6.9 and a byte since), and so do the
hooks each tuner can use (tracepoints come and go; some kernels refuse fentry, as ours does).
A kernel's BTF says both, so for each kernel we check here, from its BTF alone, that every
built-in tuner has a plan (with and without fentry) or says why the kernel does not need
it, that every struct field it reads resolves, that its BPF program compiles with that
kernel's offsets and hooks (compiled only: nothing is attached to the running kernel), and
what ``bpftune -S --btf`` reports for it.

The BTF of 6.1 and 6.12 comes from ``scripts/kernel-btf.sh`` (Debian's kernel packages,
fetched once); "6.18" is the running kernel's /sys/kernel/btf/vmlinux.
"""

from __future__ import annotations

import ctypes as ct
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from bpftune import libbpf, plugins, support
from bpftune.bpf import COMMON_FIELDS, Programs, bpf_dir, ensure_tracefs
from bpftune.btf import Btf, BtfError, offset_defines
from bpftune.hooks import AVOID_ENV, Hook, NotNeeded, Plan, PlanError
from bpftune.learning import LearningRate
from bpftune.tuner import Tuner
from bpftune.tuners.tcp_buffer import TcpBufferTuner
from helpers import BPFTUNE, REPO

RUNNING = "6.18"
RUNNING_BTF = "/sys/kernel/btf/vmlinux"
KERNELS = ["6.1", "6.12", RUNNING]
DISTRO_KERNELS = ["6.1", "6.12"]
TUNERS = plugins.builtin_tuners()
BPF_TUNERS = [t for t in TUNERS if t.bpf_source]  # the others only report (route_table)
FENTRY = [True, False]
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

# The hooks tcp_buffer and netns choose on each kernel, with fentry allowed (True) or not.
TCP_BUFFER_TRACEPOINTS = ["tp/sock/sock_exceed_buf_limit", "tp/tcp/tcp_retransmit_synack"]
TCP_BUFFER_SETUP = ["sock_ops/connection_setup"]  # every kernel: RTT callbacks since 5.3
TCP_BUFFER_GROWTH = {
    (k, fentry): ["raw_tp/tcp_probe", "fentry/tcp_sndbuf_expand" if fentry else "raw_tp/tcp_probe"]
    for k in ("6.1", "6.12", "6.18") for fentry in (True, False)
}
EXPECTED_HOOKS = {
    "tcp_buffer": {key: growth + TCP_BUFFER_TRACEPOINTS + TCP_BUFFER_SETUP
                   for key, growth in TCP_BUFFER_GROWTH.items()},
    "netns": {(k, fentry): ["fexit/copy_net_ns" if fentry else "raw_tp/sched_process_fork"]
              for k in KERNELS for fentry in FENTRY},
}
# Tuners a kernel does not need (their plan raises NotNeeded; -S says "not needed: ..."):
# every kernel here has the CVE-2023-52340 fix, which stopped enforcing route max_size.
NOT_NEEDED = {("route_table", k): "dst_ops.gc returns void" for k in KERNELS}
# sock.sk_userlocks: (bits, shift, mask). 6.1's BTF has it at bits_offset 4100, bitfield_size 4.
USERLOCKS = {"6.1": (4, 4, 0xF), "6.12": (0, 0, 0xFF), "6.18": (0, 0, 0xFF)}
USERLOCKS_OFFSET_6_1 = 4100 // 8


@dataclass
class Kernel:
    name: str
    path: str
    support: support.Support

    @property
    def btf(self) -> Btf:
        assert self.support.btf is not None
        return self.support.btf

    def features(self, fentry: bool) -> set[str]:
        """What from_btf_file found; without fentry, a kernel that refuses trampolines."""
        return set(self.support.present) if fentry else self.support.present - {"fentry"}


def fentry_id(fentry: bool) -> str:
    return "fentry" if fentry else "no-fentry"


def tuner_id(tuner: type[Tuner]) -> str:
    return tuner.name


@pytest.fixture(scope="module")
def btf_dir() -> Path:
    """The directory with 6.1.btf and 6.12.btf (fetched on the first run, then cached)."""
    r = subprocess.run([str(REPO / "scripts" / "kernel-btf.sh")], capture_output=True,
                       text=True, timeout=1800, check=False)
    assert r.returncode == 0, r.stderr
    directory = Path(r.stdout.splitlines()[-1])
    for name in DISTRO_KERNELS:
        assert (directory / f"{name}.btf").is_file()
    return directory


def btf_path(btf_dir: Path, name: str) -> str:
    return RUNNING_BTF if name == RUNNING else str(btf_dir / f"{name}.btf")


@pytest.fixture(scope="module", params=KERNELS)
def kernel(request, btf_dir: Path) -> Kernel:
    """One kernel's BTF, loaded once (pytest groups the tests by kernel, so one at a time)."""
    path = btf_path(btf_dir, request.param)
    return Kernel(request.param, path, support.from_btf_file(path))


@pytest.fixture(autouse=True)
def _no_avoided_hooks(monkeypatch) -> None:
    """Plans as the kernel offers them, not as a caller's environment forces them."""
    monkeypatch.delenv(AVOID_ENV, raising=False)


def plan_of(tuner: type[Tuner], kernel: Kernel, fentry: bool) -> Plan:
    try:
        return tuner.plan(kernel.btf, kernel.features(fentry))
    except (PlanError, NotNeeded) as e:
        pytest.fail(f"{tuner.name} has no plan on {kernel.name} "
                    f"({fentry_id(fentry)}): {type(e).__name__}: {e}")


# a. Plans.
def test_btf_says_every_feature_the_tuners_use(kernel):
    used = set().union(*(t.features for t in TUNERS))
    assert used | {"fentry", "raw_tracepoints", "tracepoints"} <= kernel.support.present, \
        kernel.support.reasons


@pytest.mark.parametrize("fentry", FENTRY, ids=fentry_id)
@pytest.mark.parametrize("tuner", TUNERS, ids=tuner_id)
def test_every_tuner_has_a_hook_for_every_watch(kernel, tuner, fentry):
    why = NOT_NEEDED.get((tuner.name, kernel.name))
    if why:  # a kernel that does not need the tuner says so, and why
        with pytest.raises(NotNeeded, match=why):
            tuner.plan(kernel.btf, kernel.features(fentry))
        return
    plan = plan_of(tuner, kernel, fentry)
    watches = {w.what: w for w in tuner.watches}
    assert set(plan.hooks) | set(plan.unwatched) == set(watches)
    assert not set(plan.hooks) & set(plan.unwatched)
    assert all(watches[what].optional for what in plan.unwatched), plan.unwatched
    for what, hook in plan.hooks.items():
        assert hook in watches[what].hooks
        assert hook.offered_by(kernel.btf), f"{hook} is not in {kernel.name}'s BTF"
    if not fentry:
        assert not plan.uses_trampolines(), plan.describe()
    assert plan.cgroup == [p.kind for p in tuner.cgroup_programs]


@pytest.mark.parametrize("fentry", FENTRY, ids=fentry_id)
@pytest.mark.parametrize("name", sorted(EXPECTED_HOOKS))
def test_hooks_chosen_on_each_kernel(kernel, name, fentry):
    (tuner,) = [t for t in TUNERS if t.name == name]
    plan = plan_of(tuner, kernel, fentry)
    assert [str(h) for h in plan.hooks.values()] == EXPECTED_HOOKS[name][kernel.name, fentry], \
        f"{kernel.name} ({kernel.path}, running {os.uname().release})"


def test_which_kernels_have_which_tracepoints(kernel):
    """What the plans above follow from: every kernel has tcp_probe (tcp_rcvbuf_grow, new
    in 6.18, is not used: see TcpBufferTuner.watches)."""
    btf = kernel.btf
    assert btf.has_tracepoint("tcp_rcvbuf_grow") == (kernel.name == RUNNING)
    for always in ("tcp_rcv_space_adjust", "tcp_probe", "sched_process_fork",
                   "sock_exceed_buf_limit", "tcp_retransmit_synack"):
        assert btf.has_tracepoint(always), always
    # What tcp_buffer's connection_setup (sockops) relies on.
    for callback in ("BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB", "BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB",
                     "BPF_SOCK_OPS_RTT_CB", "BPF_SOCK_OPS_RTT_CB_FLAG"):
        assert btf.has_enumerator(callback), callback
    assert not btf.has_enumerator("BPF_SOCK_OPS_NO_SUCH_CB")


# b. Struct fields.
@pytest.mark.parametrize("tuner", TUNERS, ids=tuner_id)
def test_every_field_resolves(kernel, tuner):
    fields = COMMON_FIELDS | tuner.fields
    unresolved = {}
    for name, field in fields.items():
        try:
            kernel.btf.field(field)
        except BtfError as e:
            unresolved[name] = str(e)
    assert not unresolved, f"on {kernel.name}: {unresolved}"
    assert len(offset_defines(kernel.btf, fields)) == 3 * len(fields)


def test_sk_userlocks_is_a_bitfield_before_6_9_and_a_byte_since(kernel):
    bits, shift, mask = USERLOCKS[kernel.name]
    where = kernel.btf.field(TcpBufferTuner.fields["OFF_SK_USERLOCKS"])
    assert (where.size, where.bits, where.shift, where.mask) == (1, bits, shift, mask)
    if kernel.name == "6.1":
        assert where.offset == USERLOCKS_OFFSET_6_1 == 512
    flags = offset_defines(kernel.btf, TcpBufferTuner.fields)
    for flag in (f"-DOFF_SK_USERLOCKS={where.offset}", f"-DSHIFT_SK_USERLOCKS={shift}",
                 f"-DMASK_SK_USERLOCKS={mask:#x}ULL"):
        assert flag in flags


# Fields bpftune.btf must find as bpftool's JSON describes them, besides the tuners':
# bitfields (kflag member offsets), and fields inside anonymous structs and unions.
BTF_FIELDS = ["sock.sk_no_check_tx", "perf_event_attr.precise_ip", "sk_buff.pkt_type",
              "sock.__sk_common.skc_dport", "sock.__sk_common.skc_num", "sk_buff.dev"]
ENUMERATORS = ["BPF_SOCK_OPS_RTT_CB", "BPF_SOCK_OPS_RETRANS_CB", "BPF_MAP_TYPE_RINGBUF",
               "BPF_TRACE_FENTRY", "SKB_DROP_REASON_CPU_BACKLOG",
               "tcp_sendmsg", "sk_userlocks", "BPF_SOCK_OPS_NO_SUCH_CB"]  # no enumerators


def located(btf: Btf, path: str) -> tuple:
    try:
        where = btf.locate(path)
    except BtfError as e:
        return ("error", str(e))
    return (where.offset, where.size, where.shift, where.bits)


def test_libbpf_reads_btf_as_bpftool_does(kernel):
    """bpftune.btf reads BTF with libbpf, decoding types only as lookups reach them, and
    finds enumerators by searching the raw BTF; bpftool's JSON of the whole file (how it
    was read before) must give the same answers."""
    dump = subprocess.run(["bpftool", "-j", "btf", "dump", "file", kernel.path],
                          capture_output=True, check=True, timeout=120).stdout
    bpftool = Btf(json.loads(dump)["types"])
    paths = BTF_FIELDS + sorted({f.path for t in TUNERS for f in (COMMON_FIELDS | t.fields)
                                 .values()})
    assert [located(kernel.btf, p) for p in paths] == [located(bpftool, p) for p in paths]
    assert located(kernel.btf, "perf_event_attr.precise_ip") == (41, 0, 7, 2)
    hooks = {h for t in TUNERS for w in t.all_watches() for h in w.hooks}
    for hook in hooks:
        assert hook.offered_by(kernel.btf) == hook.offered_by(bpftool), hook
    for name in ENUMERATORS:
        assert kernel.btf.has_enumerator(name) == bpftool.has_enumerator(name), name
    assert kernel.btf.has_enumerator("BPF_SOCK_OPS_RTT_CB")
    assert not kernel.btf.has_enumerator("tcp_sendmsg")
    for enum, name in {c for t in TUNERS for c in t.constants.values()}:
        assert kernel.btf.enum_value(enum, name) == bpftool.enum_value(enum, name) is not None
    assert kernel.btf.returns_void("dst_ops.gc") == bpftool.returns_void("dst_ops.gc")


def test_btf_of_the_other_byte_order_reads_the_same(btf_dir, tmp_path):
    """A big-endian kernel's BTF file (-S --btf on this machine): libbpf swaps its types
    on reading; the raw data it keeps is not searched, the enums are walked instead."""
    little = btf_path(btf_dir, "6.1")
    declare = libbpf.function
    handle = declare("btf__parse", ct.c_void_p, [ct.c_char_p, ct.c_void_p])(little.encode(),
                                                                            None)
    assert handle
    try:
        assert declare("btf__set_endianness", ct.c_int, [ct.c_void_p, ct.c_int])(handle, 1) == 0
        size = ct.c_uint32()
        raw = declare("btf__raw_data", ct.c_void_p, [ct.c_void_p, ct.POINTER(ct.c_uint32)])(
            handle, ct.byref(size))
        (tmp_path / "big.btf").write_bytes(ct.string_at(raw, size.value))
    finally:
        declare("btf__free", None, [ct.c_void_p])(handle)
    big, little_btf = Btf.load(str(tmp_path / "big.btf")), Btf.load(little)
    assert [located(big, p) for p in BTF_FIELDS] == [located(little_btf, p) for p in BTF_FIELDS]
    assert [big.has_enumerator(n) for n in ENUMERATORS] == \
        [little_btf.has_enumerator(n) for n in ENUMERATORS]
    assert big.enum_value("bpf_map_type", "BPF_MAP_TYPE_RINGBUF") == 27


# c. The BPF programs compile for each kernel and plan.
def bcc_function(hook: Hook) -> str:
    """The name BCC's *_PROBE macros give the program of ``hook`` (a sock_ops hook names
    its function)."""
    if hook.kind == "sock_ops":
        return hook.target
    prefix = {"fentry": "kfunc", "fexit": "kretfunc", "raw_tp": "raw_tracepoint",
              "tp": "tracepoint"}[hook.kind]
    return f"{prefix}__{hook.target.replace('/', '__')}"


@pytest.mark.parametrize("fentry", FENTRY, ids=fentry_id)
@pytest.mark.parametrize("tuner", BPF_TUNERS, ids=tuner_id)
def test_bpf_program_compiles(kernel, tuner, fentry):
    ensure_tracefs()  # BCC reads tracepoint formats when compiling TRACEPOINT_PROBE
    plan = plan_of(tuner, kernel, fentry)
    programs = Programs(kernel.btf, LearningRate(), lambda _event: None)
    try:
        module = programs.compile(bpf_dir() / tuner.bpf_source, TUNERS.index(tuner),
                                  tuner.fields, defines=tuner.id_defines() + plan.cflags(),
                                  attach=False)
    finally:
        programs.close()
    # Nothing loaded into the running kernel, nothing attached.
    assert not module.programs and not module.attachments and not module.maps
    # The C file's #ifdef HOOK_* guards match the plan: a program for each chosen hook only.
    assert set(module.functions) == ({bcc_function(h) for h in plan.hooks.values()}
                                     | {p.function for p in tuner.cgroup_programs})


# d. bpftune -S --btf FILE.
def bpftune(*args: str, env: dict | None = None, prefix: list[str] | None = None):
    return subprocess.run([*(prefix or []), BPFTUNE, *args], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, **(env or {})), check=False)


def tuner_lines(stderr: str, kernel: str) -> dict[str, str]:
    """Each built-in tuner's line of -S, checked: one each, a plan unless not needed."""
    lines = stderr.splitlines()
    found = {}
    for tuner in TUNERS:
        prefix = f"bpftune: {tuner.name}: "
        mine = [line for line in lines if line.startswith(prefix)]
        assert len(mine) == 1, (tuner.name, stderr)
        line = found[tuner.name] = mine[0]
        assert "cannot load" not in line, line
        why = NOT_NEEDED.get((tuner.name, kernel))
        if why:
            assert line.startswith(f"{prefix}not needed: ") and why in line, line
        else:
            assert "not needed" not in line, line
    return found


WITHOUT_FENTRY = "raw_tp/tcp_probe, tp/sock/sock_exceed_buf_limit"


@pytest.mark.parametrize("name", DISTRO_KERNELS)
def test_support_report_for_a_distro_kernel(btf_dir, name):
    # Nothing is loaded for another kernel's BTF, so no root is needed.
    r = bpftune("-S", "--btf", btf_path(btf_dir, name), prefix=NOBODY)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    assert "Traceback" not in r.stderr
    assert r.stderr.splitlines()[0] == "bpftune: bpftune works fully"
    line = tuner_lines(r.stderr, name)["tcp_buffer"]
    assert line.startswith("bpftune: tcp_buffer: raw_tp/tcp_probe, "
                           "fentry/tcp_sndbuf_expand, "), line
    assert f"; without fentry: {WITHOUT_FENTRY}, " in line, line


@pytest.mark.parametrize("bad", ["/nonexistent", "not-btf"])
def test_support_with_an_unreadable_btf_file_is_one_line(tmp_path, bad):
    if bad == "not-btf":
        (tmp_path / bad).write_text("not BTF\n")
        bad = str(tmp_path / bad)
    r = bpftune("-S", "--btf", bad)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("bpftune: ") and bad in r.stderr
    assert "Traceback" not in r.stderr


def test_btf_without_support_is_a_usage_error():
    r = bpftune("--btf", "X")
    assert r.returncode == 1
    assert r.stderr == "bpftune: --btf is only valid with -S\n"


# e. bpftune -S on the running kernel, which refuses fentry.
PROBE = """
import json, sys
from bpftune import support
s = support.probe()
maps = open("/proc/self/maps").read()
print(json.dumps({"present": sorted(s.present), "reasons": s.reasons,
                  "bcc": [m for m in ("bcc", "bpftune.loader") if m in sys.modules],
                  "mapped": [lib for lib in ("libbcc", "LLVM", "clang") if lib in maps]}))
"""


def test_probing_the_running_kernel_compiles_nothing():
    """libbpf's probes (a two-instruction program per type), without BCC or LLVM: every
    feature but fentry, which this kernel refuses with a one-line reason."""
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                       timeout=60, check=True)
    found = json.loads(r.stdout)
    assert (found["bcc"], found["mapped"]) == ([], [])
    assert found["present"] == sorted(set(support.FEATURES) - {"fentry"})
    assert list(found["reasons"]) == ["fentry"]
    assert re.fullmatch(r"refused by the kernel: loading a program for tcp_sendmsg: "
                        r"[A-Z][a-z ]+", found["reasons"]["fentry"])

def test_support_on_the_running_kernel_and_its_fallbacks(btf_dir):
    r = bpftune("-S")
    assert r.returncode == 0, r.stderr
    line = tuner_lines(r.stderr, RUNNING)["tcp_buffer"]
    assert line.startswith("bpftune: tcp_buffer: raw_tp/tcp_probe, "
                           "tp/sock/sock_exceed_buf_limit"), line
    # Exactly the plan 6.1 gets without fentry.
    r = bpftune("-S", "--btf", btf_path(btf_dir, "6.1"))
    assert r.returncode == 0, r.stderr
    on_6_1 = tuner_lines(r.stderr, "6.1")["tcp_buffer"].split("; without fentry: ")[1]
    assert line == f"bpftune: tcp_buffer: {on_6_1}"
