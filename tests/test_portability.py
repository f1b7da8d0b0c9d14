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

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import bcc
import pytest

from bpftune import plugins, support
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
    ("6.1", True): ["fentry/tcp_rcv_space_adjust", "fentry/tcp_sndbuf_expand"],
    ("6.1", False): ["raw_tp/tcp_rcv_space_adjust", "raw_tp/tcp_probe"],
    ("6.12", True): ["fentry/tcp_rcv_space_adjust", "fentry/tcp_sndbuf_expand"],
    ("6.12", False): ["raw_tp/tcp_rcv_space_adjust", "raw_tp/sock_send_length"],
    ("6.18", True): ["raw_tp/tcp_rcvbuf_grow", "fentry/tcp_sndbuf_expand"],
    ("6.18", False): ["raw_tp/tcp_rcvbuf_grow", "raw_tp/sock_send_length"],
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
    """What the plans above follow from: tcp_rcvbuf_grow is new in 6.18, sock_send_length
    in 6.2; every kernel has tcp_rcv_space_adjust and tcp_probe."""
    btf = kernel.btf
    assert btf.has_tracepoint("tcp_rcvbuf_grow") == (kernel.name == RUNNING)
    assert btf.has_tracepoint("sock_send_length") == (kernel.name != "6.1")
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


# c. The BPF programs compile for each kernel and plan.
@pytest.fixture
def compile_only(monkeypatch) -> None:
    """BCC attaches tracepoints, raw tracepoints and kfuncs in BPF(): not in these tests."""
    ensure_tracefs()  # BCC reads tracepoint formats when compiling TRACEPOINT_PROBE
    monkeypatch.setattr(bcc.BPF, "_trace_autoload", lambda self: None)


def bcc_function(hook: Hook) -> str:
    """The name BCC's *_PROBE macros give the program of ``hook`` (a sock_ops hook names
    its function)."""
    if hook.kind == "sock_ops":
        return hook.target
    prefix = {"fentry": "kfunc", "fexit": "kretfunc", "raw_tp": "raw_tracepoint",
              "tp": "tracepoint"}[hook.kind]
    return f"{prefix}__{hook.target.replace('/', '__')}"


ATTACHED = ("kprobe_fds", "uprobe_fds", "tracepoint_fds", "raw_tracepoint_fds",
            "kfunc_entry_fds", "kfunc_exit_fds", "lsm_fds")


@pytest.mark.parametrize("fentry", FENTRY, ids=fentry_id)
@pytest.mark.parametrize("tuner", BPF_TUNERS, ids=tuner_id)
def test_bpf_program_compiles(kernel, tuner, fentry, compile_only):
    plan = plan_of(tuner, kernel, fentry)
    programs = Programs(kernel.btf, LearningRate(), lambda _event: None)
    try:
        module = programs.compile(bpf_dir() / tuner.bpf_source, TUNERS.index(tuner),
                                  tuner.fields, defines=tuner.id_defines() + plan.cflags())
        try:
            compiled = {bcc.lib.bpf_function_name(module.module, i).decode()
                        for i in range(bcc.lib.bpf_num_functions(module.module))}
            # Nothing loaded into the running kernel, nothing attached.
            assert not module.funcs
            assert not [a for a in ATTACHED if getattr(module, a)]
        finally:
            module.cleanup()
    finally:
        programs.close()
    # The C file's #ifdef HOOK_* guards match the plan: a program for each chosen hook only.
    assert compiled == ({bcc_function(h) for h in plan.hooks.values()}
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


WITHOUT_FENTRY = {"6.1": "raw_tp/tcp_rcv_space_adjust, raw_tp/tcp_probe",
                  "6.12": "raw_tp/tcp_rcv_space_adjust, raw_tp/sock_send_length"}


@pytest.mark.parametrize("name", DISTRO_KERNELS)
def test_support_report_for_a_distro_kernel(btf_dir, name):
    # Nothing is loaded for another kernel's BTF, so no root is needed.
    r = bpftune("-S", "--btf", btf_path(btf_dir, name), prefix=NOBODY)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    assert "Traceback" not in r.stderr
    assert r.stderr.splitlines()[0] == "bpftune: bpftune works fully"
    line = tuner_lines(r.stderr, name)["tcp_buffer"]
    assert line.startswith("bpftune: tcp_buffer: fentry/tcp_rcv_space_adjust, "
                           "fentry/tcp_sndbuf_expand, "), line
    assert f"; without fentry: {WITHOUT_FENTRY[name]}, " in line, line
    if name == "6.1":  # no sock_send_length tracepoint before 6.2
        assert "sock_send_length" not in line


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
def test_support_on_the_running_kernel_and_its_fallbacks(btf_dir):
    r = bpftune("-S")
    assert r.returncode == 0, r.stderr
    line = tuner_lines(r.stderr, RUNNING)["tcp_buffer"]
    assert line.startswith("bpftune: tcp_buffer: raw_tp/tcp_rcvbuf_grow, "
                           "raw_tp/sock_send_length"), line

    r = bpftune("-S", env={AVOID_ENV: "tcp_rcvbuf_grow,sock_send_length"})
    assert r.returncode == 0, r.stderr
    line = tuner_lines(r.stderr, RUNNING)["tcp_buffer"]
    assert line.startswith("bpftune: tcp_buffer: raw_tp/tcp_rcv_space_adjust, "
                           "raw_tp/tcp_probe"), line
    # Exactly the plan 6.1 gets without fentry.
    r = bpftune("-S", "--btf", btf_path(btf_dir, "6.1"))
    assert r.returncode == 0, r.stderr
    on_6_1 = tuner_lines(r.stderr, "6.1")["tcp_buffer"].split("; without fentry: ")[1]
    assert line == f"bpftune: tcp_buffer: {on_6_1}"
