"""Hooks with alternatives: how a tuner watches the kernel, chosen per kernel from its BTF.

A tuner declares, for each thing it watches, the hooks that can see it, best first: the
cheapest, most targeted one (a hook that fires only when a limit matters, or fentry, which
costs less than a tracepoint) before the ones every kernel has. At load the engine takes the
first hook of each watch that the kernel offers (from BTF) and the BPF features allow (from
probing, or for another kernel's BTF file from its enums), and compiles the tuner's BPF
source with ``-DHOOK_<KIND>_<target>`` for each; the C file guards each hook's program with
``#ifdef``. A tuner without a hook for a required watch does not load, and says why.

A hook that fires on every packet or system call is sampled: its program looks at one call
in SAMPLE_EVERY (``sampled_in()`` in bpf/bpftune.bpf.h), counting the calls in its watch's
slot (``SAMPLE_<NAME>``); the exit summary reports the counts, as upstream does. Several
sampled watches can share a hook (one program): ``-DSAMPLE_<NAME>_BY_<KIND>_<target>`` says
which watches the chosen hook serves.

A ``sock_ops`` hook is a sockops program of the tuner's source, attached to the cgroup by
the engine; it needs the BPF_SOCK_OPS_* callback named in ``needs``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

#: Hook kinds, the BPF feature each needs (bpftune.support.FEATURES) and how -S names them.
KINDS = {"fentry": "fentry", "fexit": "fentry", "raw_tp": "raw_tracepoints",
         "tp": "tracepoints", "sock_ops": "sockops"}
#: Tests force the fallbacks of a kernel that lacks some hooks: comma-separated targets.
AVOID_ENV = "BPFTUNE_AVOID_HOOKS"
#: A sampled hook looks at one call in this many (a power of two), per CPU.
SAMPLE_EVERY = 16
#: Sample slots in each tuner's program (its bpftune_samples map).
SAMPLE_SLOTS = 4


class PlanError(Exception):
    """The tuner cannot load on this kernel; the message says why."""


class NotNeeded(Exception):
    """The kernel does not need this tuner; the message says why."""


@dataclass(frozen=True)
class Hook:
    kind: str  # a key of KINDS
    #: A function (fentry), a tracepoint ("tcp_probe", "sock/sock_exceed_buf_limit"), or the
    #: program's function in the tuner's source (sock_ops).
    target: str
    #: A struct field whose presence in BTF means the kernel changed so that this hook no
    #: longer sees what the watch needs (e.g. "udp_sock.udp_prod_queue", Linux 6.18).
    unless: str = ""
    #: Whether its program looks at only one call in SAMPLE_EVERY.
    sampled: bool = False
    #: An enumerator the kernel's BTF must have (sock_ops: the callback it relies on).
    needs: str = ""

    @property
    def name(self) -> str:
        """The function or tracepoint name, as in BTF."""
        return self.target.rsplit("/", 1)[-1]

    @property
    def define(self) -> str:
        return f"-DHOOK_{self.kind.upper()}_{self.name}"

    def __str__(self) -> str:
        return f"{self.kind}/{self.target}"

    def offered_by(self, btf) -> bool:
        if self.unless and btf.has_field(self.unless):
            return False
        if self.needs and not btf.has_enumerator(self.needs):
            return False
        if self.kind == "sock_ops":
            return True  # the feature (sockops programs) is checked by make_plan
        if self.kind in ("fentry", "fexit"):
            return btf.has_function(self.name)
        return btf.has_tracepoint(self.name)


def fentry(function: str, *, sampled: bool = False) -> Hook:
    return Hook("fentry", function, sampled=sampled)


def fexit(function: str) -> Hook:
    return Hook("fexit", function)


def raw_tp(tracepoint: str, unless: str = "", *, sampled: bool = False) -> Hook:
    return Hook("raw_tp", tracepoint, unless, sampled=sampled)


def tp(tracepoint: str) -> Hook:
    return Hook("tp", tracepoint)


def sock_ops(function: str, needs: str) -> Hook:
    """The sockops program ``function``, which relies on the callback ``needs``
    (e.g. "BPF_SOCK_OPS_RTT_CB", new in Linux 5.3)."""
    return Hook("sock_ops", function, needs=needs)


@dataclass(frozen=True)
class Watch:
    """Something a tuner watches, e.g. "receive buffer growth", and its hooks, best first."""

    what: str
    hooks: tuple[Hook, ...]
    #: A tuner loads without an optional watch (and -S says what it then misses).
    optional: bool = False
    #: The name of the sample its sampled hooks count calls in (upstream's style, as the
    #: exit summary reports it, e.g. "rcv_space_sample"); the C source's slot is
    #: SAMPLE_<NAME without "_sample">, e.g. SAMPLE_RCV_SPACE.
    sample: str = ""

    @property
    def sample_define(self) -> str:
        return "SAMPLE_" + self.sample.removesuffix("_sample").upper()


@dataclass
class Plan:
    hooks: dict[str, Hook] = field(default_factory=dict)  # watch -> chosen hook
    unwatched: list[str] = field(default_factory=list)  # optional watches with no hook
    cgroup: list[str] = field(default_factory=list)  # cgroup program kinds, e.g. "sysctl"
    defines: list[str] = field(default_factory=list)  # the tuner's constants from BTF
    sampled_by: list[str] = field(default_factory=list)  # -DSAMPLE_<NAME>_BY_<hook>

    def cflags(self) -> list[str]:
        hooks = dict.fromkeys(h.define for h in self.hooks.values())  # once if shared
        return [*hooks, *self.sampled_by, *self.defines]

    def uses_trampolines(self) -> bool:
        return any(KINDS[h.kind] == "fentry" for h in self.hooks.values())

    def sock_ops_programs(self) -> list[str]:
        """The functions of the chosen sock_ops hooks, for the engine to attach."""
        return [h.target for h in self.hooks.values() if h.kind == "sock_ops"]

    def describe(self) -> str:
        names = [str(h) for h in self.hooks.values()] + [f"cgroup/{k}" for k in self.cgroup]
        text = ", ".join(dict.fromkeys(names))
        if self.unwatched:
            text += f" (no hook for {', '.join(self.unwatched)})"
        return text


def avoided() -> set[str]:
    return {t.strip() for t in os.environ.get(AVOID_ENV, "").split(",") if t.strip()}


def make_plan(watches: Iterable[Watch], btf, features: set[str],
              avoid: Iterable[str] = ()) -> Plan:
    """The best hook of every watch on this kernel; PlanError naming what is missing."""
    avoid = set(avoid) | avoided()
    plan = Plan()
    for watch in watches:
        usable = [h for h in watch.hooks if h.name not in avoid and h.target not in avoid]
        chosen = next((h for h in usable if KINDS[h.kind] in features and h.offered_by(btf)),
                      None)
        if chosen:
            plan.hooks[watch.what] = chosen
            if chosen.sampled:
                plan.sampled_by.append(f"-D{watch.sample_define}_BY_"
                                       f"{chosen.define.removeprefix('-DHOOK_')}")
        elif watch.optional:
            plan.unwatched.append(watch.what)
        else:
            tried = ", ".join(str(h) for h in watch.hooks)
            raise PlanError(f"no hook for {watch.what} (tried {tried})")
    return plan
