"""What a kernel supports, and what each tuner would do on it: ``bpftune -S`` (probing the
running kernel) and ``bpftune -S --btf FILE`` (another kernel, from its BTF alone)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from bpftune import netns
from bpftune.bpf import (
    BPF_PROG_TYPE_CGROUP_SYSCTL,
    BpfError,
    Programs,
    bcc_module,
    bpf_dir,
    compiler_output_to_log,
    ensure_tracefs,
)
from bpftune.btf import Btf, BtfError
from bpftune.hooks import NotNeeded, Plan, PlanError
from bpftune.learning import LearningRate
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
# Programs in bpf/probe.bpf.c, by feature, with their BCC program type numbers.
_PROBE_PROGRAMS = {
    "tracepoints": ("probe_tracepoint", 5),
    "raw_tracepoints": ("probe_raw_tracepoint", 17),
    "cgroup_sysctl": ("probe_cgroup_sysctl", BPF_PROG_TYPE_CGROUP_SYSCTL),
    "sockops": ("probe_sockops", 13),
}
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


def _probe_fentry(s: Support) -> None:
    """fentry is not in probe.bpf.c: BCC attaches it on compile, and a kernel that refuses
    it (ours: EPERM) would then refuse the whole object."""
    try:
        with compiler_output_to_log():
            probe = bcc_module().BPF(text=f"KFUNC_PROBE({FENTRY_PROBE}) {{ return 0; }}".encode())
        probe.cleanup()
        s.present.add("fentry")
    except Exception as e:  # BCC says "Need super-user privileges" for any EPERM
        s.reasons["fentry"] = f"refused by the kernel: {str(e).splitlines()[0]}"


def probe(btf: Btf | None = None, programs: Programs | None = None) -> Support:
    """Probe every feature of the running kernel; a daemon that is starting passes the BTF
    and the core programs (ring buffer) it already has."""
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
    if btf is None:
        return s
    own_programs = programs is None
    if own_programs:
        try:
            programs = Programs(btf, LearningRate(), lambda _event: None)
        except BpfError as e:
            s.reasons["ringbuf"] = str(e)
            return s
    s.present.add("ringbuf")
    try:
        probe_bpf = programs.compile(bpf_dir() / "probe.bpf.c", 0, {})
    except BpfError as e:
        s.reasons["tracepoints"] = str(e)
        return s
    for feature, (fn, prog_type) in _PROBE_PROGRAMS.items():
        if feature in s.reasons:
            continue
        try:
            with compiler_output_to_log():
                probe_bpf.load_func(fn.encode(), prog_type)
            s.present.add(feature)
        except Exception as e:
            s.reasons[feature] = str(e).splitlines()[0]
    probe_bpf.cleanup()
    _probe_fentry(s)
    if own_programs:
        programs.close()
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
               without_fentry: Plan | PlanError | None = None) -> str:
    if isinstance(outcome, Plan):
        line = f"{name}: {outcome.describe()}"
        if without_fentry is not None:  # another kernel's: it may refuse trampolines
            other = (without_fentry.describe() if isinstance(without_fentry, Plan)
                     else f"cannot load: {without_fentry}")
            line += f"; without fentry: {other}"
        return line
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
    lines += [tuner_line(name, outcome, fallbacks.get(name))
              for name, outcome in outcomes.items()]
    if s.btf_file:
        lines.append(f"(from the BTF in {s.btf_file}, nothing loaded; fentry hooks are "
                     f"assumed to load where BTF describes the function)")
    return lines, usable
