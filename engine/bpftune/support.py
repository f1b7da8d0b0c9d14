"""What this kernel supports, for ``bpftune -S`` and for reporting why a tuner is disabled."""

from __future__ import annotations

from dataclasses import dataclass, field

from bpftune import netns
from bpftune.bpf import (
    BPF_PROG_TYPE_CGROUP_SYSCTL,
    BpfError,
    Programs,
    bpf_dir,
    compiler_output_to_log,
    ensure_tracefs,
)
from bpftune.btf import Btf, BtfError
from bpftune.learning import LearningRate
from bpftune.tuner import Tuner

FEATURES = {
    "btf": "BPF Type Format (BTF) information for kernel struct offsets",
    "ringbuf": "BPF ring buffer",
    "tracepoints": "tracepoints (tracefs)",
    "raw_tracepoints": "raw tracepoints",
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


@dataclass
class Support:
    present: set[str] = field(default_factory=set)
    reasons: dict[str, str] = field(default_factory=dict)  # missing feature -> why

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


def probe(btf: Btf | None = None, programs: Programs | None = None) -> Support:
    """Probe every feature; a daemon that is starting passes the BTF and the core programs
    (ring buffer) it already has."""
    s = Support()
    if btf is None:
        btf = _probe_btf(s)
    else:
        s.present.add("btf")
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
    if own_programs:
        programs.close()
    return s


def report(s: Support, tuners: list[type[Tuner]]) -> tuple[list[str], bool]:
    """Upstream's support lines plus one line per missing feature; and whether usable."""
    used = set().union(*(t.features for t in tuners)) if tuners else set()
    usable = "ringbuf" in s.present and any(not s.missing(t.features) for t in tuners)
    if not usable:
        lines = ["bpftune is not supported"]
    elif "btf" not in s.present:
        lines = ["bpftune works, but no BPF Type Format information (BTF) is available."]
    elif s.missing(frozenset(used)):
        lines = ["bpftune works in legacy mode"]
    else:
        lines = ["bpftune works fully"]
    if usable:
        cookie = "supports" if "netns_cookie" in s.present else "does not support"
        lines.append(f"bpftune {cookie} per-netns policy (via netns cookie)")
    for feature in sorted(used - s.present):
        disabled = ", ".join(t.name for t in tuners if feature in t.features)
        why = s.reasons.get(feature, "not available")
        lines.append(f"missing {FEATURES[feature]} ({why}): disables {disabled}")
    return lines, usable
