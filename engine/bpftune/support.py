"""What a kernel supports, and what each tuner would do on it: ``bpftune -S`` (probing the
running kernel) and ``bpftune -S --btf FILE`` (another kernel, from its BTF alone)."""

from __future__ import annotations

import ctypes as ct
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from bpftune import libbpf, netns
from bpftune.bpf import ensure_tracefs
from bpftune.btf import Btf, BtfError
from bpftune.hooks import NotNeeded, Plan, PlanError
from bpftune.tuner import Tuner

FEATURES = {
    "btf": "BPF Type Format (BTF) information for kernel struct offsets",
    "ringbuf": "BPF ring buffer",
    "tracepoints": "tracepoints (tracefs)",
    "raw_tracepoints": "raw tracepoints",
    "fentry": "fentry programs (BPF trampolines)",
    "cgroup_sysctl": "cgroup/sysctl programs",
    "sockops": "sockops programs",
    "netns_cookie": "network namespace cookies (SO_NETNS_COOKIE)",
}
# Program types (enum bpf_prog_type) by feature, with a helper (enum bpf_func_id) the
# tuners' programs of that type call, if the kernel must offer it there: libbpf loads a
# minimal program of the type (and one calling the helper) to see whether the kernel takes
# it. No compiler involved.
_PROGRAM_TYPES = {
    "tracepoints": (5, (130, "bpf_ringbuf_output")),
    "raw_tracepoints": (17, None),
    "cgroup_sysctl": (23, None),
    "sockops": (13, (122, "bpf_get_netns_cookie")),  # the helper tcp_conn needs
}
BPF_MAP_TYPE_RINGBUF = 27
BPF_PROG_TYPE_TRACING, BPF_TRACE_FENTRY = 26, 24
ENOTSUPP = 524  # the kernel's own "not supported", which the C library has no text for
# For another kernel's BTF: the enum value whose presence means the feature exists.
_BTF_MARKERS = {
    "ringbuf": ("bpf_map_type", "BPF_MAP_TYPE_RINGBUF"),
    "tracepoints": ("bpf_prog_type", "BPF_PROG_TYPE_TRACEPOINT"),
    "raw_tracepoints": ("bpf_prog_type", "BPF_PROG_TYPE_RAW_TRACEPOINT"),
    "fentry": ("bpf_attach_type", "BPF_TRACE_FENTRY"),
    "cgroup_sysctl": ("bpf_prog_type", "BPF_PROG_TYPE_CGROUP_SYSCTL"),
    "sockops": ("bpf_prog_type", "BPF_PROG_TYPE_SOCK_OPS"),
}
FENTRY_PROBE = "tcp_sendmsg"  # any function every kernel has
# r0 = 0 (BPF_ALU64 | BPF_MOV | BPF_K); exit (BPF_JMP | BPF_EXIT): struct bpf_insn x 2.
_RETURN_0 = bytes([0xB7, 0, 0, 0, 0, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0])


class _ProgLoadOpts(ct.Structure):
    """libbpf's struct bpf_prog_load_opts up to the fields set here: ``sz`` tells libbpf
    that the later ones are absent (as they are to a program built on an older libbpf)."""
    _fields_ = [("sz", ct.c_size_t), ("attempts", ct.c_int)] + [
        (name, ct.c_uint32) for name in ("expected_attach_type", "prog_btf_fd", "prog_flags",
                                         "prog_ifindex", "kern_version", "attach_btf_id")]


_lib = libbpf.Functions({
    "libbpf_probe_bpf_prog_type": (ct.c_int, [ct.c_int, ct.c_void_p]),
    "libbpf_probe_bpf_map_type": (ct.c_int, [ct.c_int, ct.c_void_p]),
    "libbpf_probe_bpf_helper": (ct.c_int, [ct.c_int, ct.c_int, ct.c_void_p]),
    "bpf_prog_load": (ct.c_int, [ct.c_int, ct.c_char_p, ct.c_char_p, ct.c_char_p,
                                 ct.c_size_t, ct.POINTER(_ProgLoadOpts)]),
    "bpf_link_create": (ct.c_int, [ct.c_int, ct.c_int, ct.c_int, ct.c_void_p]),
})


@dataclass
class Support:
    present: set[str] = field(default_factory=set)
    reasons: dict[str, str] = field(default_factory=dict)  # missing feature -> why
    btf: Btf | None = None
    #: Set for a report from another kernel's BTF file: nothing was loaded.
    btf_file: str | None = None

    def missing(self, features: frozenset[str]) -> list[str]:
        return sorted(f for f in features if f not in self.present)


def _probe_btf(s: Support) -> Btf | None:
    try:
        btf = Btf.load()
        btf.locate("net.net_cookie")
    except BtfError as e:
        s.reasons["btf"] = str(e)
        return None
    s.present.add("btf")
    return btf


def _strerror(err: int) -> str:
    return "not supported (ENOTSUPP)" if err == ENOTSUPP else os.strerror(err)


def _refusal(answer: int) -> str | None:
    """Why a libbpf_probe_* answer (1: yes, 0: no, -errno: could not tell) is not yes."""
    if answer == 1:
        return None
    return "not supported by the kernel" if answer == 0 else _strerror(-answer)


def _probe_programs(s: Support) -> None:
    """Program types, their helpers, and ring buffers."""
    why = _refusal(_lib.libbpf_probe_bpf_map_type(BPF_MAP_TYPE_RINGBUF, None))
    if why:
        s.reasons["ringbuf"] = why
    else:
        s.present.add("ringbuf")
    for feature, (prog_type, helper) in _PROGRAM_TYPES.items():
        if feature in s.reasons:  # no tracefs
            continue
        why = _refusal(_lib.libbpf_probe_bpf_prog_type(prog_type, None))
        if not why and helper:
            helper_id, helper_name = helper
            if _refusal(_lib.libbpf_probe_bpf_helper(prog_type, helper_id, None)):
                why = f"its programs cannot call {helper_name}"
        if why:
            s.reasons[feature] = why
        else:
            s.present.add(feature)


def _fentry_refusal(btf: Btf) -> str | None:
    """Why the kernel does not load and attach an fentry program (``r0 = 0; exit``) on
    FENTRY_PROBE (ours: EPERM on loading), or None if it does; nothing stays attached."""
    opts = _ProgLoadOpts(sz=ct.sizeof(_ProgLoadOpts), expected_attach_type=BPF_TRACE_FENTRY,
                         attach_btf_id=btf.function_id(FENTRY_PROBE))
    prog = _lib.bpf_prog_load(BPF_PROG_TYPE_TRACING, b"bpftune_probe", b"GPL", _RETURN_0,
                              len(_RETURN_0) // 8, ct.byref(opts))
    if prog < 0:
        return f"loading a program for {FENTRY_PROBE}: {_strerror(-prog)}"
    try:
        # libbpf falls back to BPF_RAW_TRACEPOINT_OPEN on kernels whose BPF_LINK_CREATE
        # does not take tracing programs yet.
        link = _lib.bpf_link_create(prog, 0, BPF_TRACE_FENTRY, None)
        if link < 0:
            return f"attaching to {FENTRY_PROBE}: {_strerror(-link)}"
        os.close(link)
        return None
    finally:
        os.close(prog)


def _probe_fentry(s: Support) -> None:
    if s.btf is None:
        s.reasons["fentry"] = "no BTF to find a function in"
        return
    try:
        refused = _fentry_refusal(s.btf)
    except BtfError as e:
        s.reasons["fentry"] = str(e)
        return
    if refused:
        s.reasons["fentry"] = f"refused by the kernel: {refused}"
    else:
        s.present.add("fentry")


def probe(btf: Btf | None = None) -> Support:
    """Probe every feature of the running kernel with libbpf (nothing compiled; each
    probe loads a tiny program and unloads it); a daemon that is starting passes the BTF
    it already has."""
    s = Support()
    if btf is None:
        btf = _probe_btf(s)
    else:
        s.present.add("btf")
    s.btf = btf
    if netns.cookies_supported():
        s.present.add("netns_cookie")
    try:
        ensure_tracefs()
    except OSError as e:
        s.reasons["tracepoints"] = str(e)
    try:
        _probe_programs(s)
        _probe_fentry(s)
    except libbpf.BpfError as e:  # no libbpf.so.1
        for feature in FEATURES.keys() - s.present - s.reasons.keys():
            s.reasons[feature] = str(e)
    return s


def from_btf_file(path: str) -> Support:
    """What a kernel supports, judged from its BTF (a vmlinux ELF or raw BTF file) without
    loading anything. fentry is assumed to load wherever BTF describes the function:
    whether a kernel permits trampolines is only known by trying."""
    btf = Btf.load(path)
    s = Support(present={"btf"}, btf=btf, btf_file=path)
    for feature, (enum, name) in _BTF_MARKERS.items():
        if btf.enum_value(enum, name) is not None:
            s.present.add(feature)
        else:
            s.reasons[feature] = f"no {name} in its BTF"
    try:
        btf.locate("net.net_cookie")
        s.present.add("netns_cookie")
    except BtfError as e:
        s.reasons["netns_cookie"] = str(e)
    return s


Assessment = dict[str, Plan | PlanError | NotNeeded]


def assess(s: Support, tuners: list[type[Tuner]]) -> Assessment:
    """Each tuner's plan on this kernel, or why it has none."""
    result: Assessment = {}
    for tuner in tuners:
        if s.btf is None:
            result[tuner.name] = PlanError(s.reasons.get("btf", "no BTF"))
            continue
        try:
            result[tuner.name] = tuner.plan(s.btf, s.present)
        except (PlanError, NotNeeded) as e:
            result[tuner.name] = e
    return result


def tuner_line(name: str, outcome: Plan | PlanError | NotNeeded,
               without_fentry: Plan | PlanError | None = None,
               absences: Sequence[str] = ()) -> str:
    if isinstance(outcome, Plan):
        line = f"{name}: {outcome.describe()}"
        if without_fentry is not None:  # another kernel's: it may refuse trampolines
            other = (without_fentry.describe() if isinstance(without_fentry, Plan)
                     else f"cannot load: {without_fentry}")
            line += f"; without fentry: {other}"
        return "; ".join([line, *absences])
    if isinstance(outcome, NotNeeded):
        return f"{name}: not needed: {outcome}"
    return f"{name}: cannot load: {outcome}"


def report(s: Support, tuners: list[type[Tuner]]) -> tuple[list[str], bool]:
    """Upstream's support lines, one line per missing feature, one line per tuner; and
    whether bpftune is usable at all. "works fully" only when every tuner that is needed
    has a plan."""
    outcomes = assess(s, tuners)
    planned = [n for n, o in outcomes.items() if isinstance(o, Plan)]
    failed = [n for n, o in outcomes.items() if isinstance(o, PlanError)]
    usable = "ringbuf" in s.present and bool(planned)
    if not usable:
        lines = ["bpftune is not supported"]
    elif "btf" not in s.present:
        lines = ["bpftune works, but no BPF Type Format information (BTF) is available."]
    elif failed:
        lines = ["bpftune works in legacy mode"]
    else:
        lines = ["bpftune works fully"]
    if usable:
        cookie = "supports" if "netns_cookie" in s.present else "does not support"
        lines.append(f"bpftune {cookie} per-netns policy (via netns cookie)")
    used = set().union(*(t.features for t in tuners)) if tuners else set()
    for feature in sorted(used - s.present):
        disabled = ", ".join(t.name for t in tuners if feature in t.features)
        why = s.reasons.get(feature, "not available")
        lines.append(f"missing {FEATURES[feature]} ({why}): disables {disabled}")
    fallbacks: Assessment = {}
    if s.btf_file and "fentry" in s.present:
        fallbacks = assess(replace(s, present=s.present - {"fentry"}),
                           [t for t in tuners if isinstance(outcomes[t.name], Plan)
                            and outcomes[t.name].uses_trampolines()])
    # Sysctls are read on this kernel only, not for another's BTF.
    absences = {} if s.btf_file else {t.name: t.absences() for t in tuners
                                      if isinstance(outcomes[t.name], Plan)}
    lines += [tuner_line(name, outcome, fallbacks.get(name), absences.get(name, ()))
              for name, outcome in outcomes.items()]
    if s.btf_file:
        lines.append(f"(from the BTF in {s.btf_file}, nothing loaded; fentry hooks are "
                     f"assumed to load where BTF describes the function)")
    return lines, usable
