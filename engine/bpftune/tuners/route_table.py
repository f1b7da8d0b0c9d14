"""route_table: net.ipv6.route.max_size, where the kernel still enforces it.

Upstream grows max_size when the IPv6 destination cache nears it (reference section 5.9).
Linux commit af6d10345ca7 ("ipv6: remove max_size check inline with ipv4"), the fix for
CVE-2023-52340 backported to every maintained kernel, stopped enforcing the limit and made
``dst_ops.gc`` return void. On such a kernel a larger max_size changes nothing, so this
tuner does not load and says why (``bpftune -S``, ``-q tuners``): we do not tune a sysctl
that has no effect. Upstream tunes it regardless.
"""

from __future__ import annotations

from bpftune.btf import Btf, BtfError
from bpftune.hooks import NotNeeded, PlanError
from bpftune.tuner import NO_IPV6, Scenario, Tunable, Tuner

ENFORCEMENT_REMOVED = ("this kernel does not enforce net.ipv6.route.max_size (dst_ops.gc "
                       "returns void since Linux commit af6d10345ca7, the CVE-2023-52340 fix)")


class RouteTableTuner(Tuner):
    name = "route_table"
    pmda_cluster = 18
    reports_only = True
    MAX_SIZE = Tunable("net.ipv6.route.max_size", namespaced=True, optional=True,
                       absent_when=NO_IPV6, absent_means="there is no table to watch")
    TABLE_NEARLY_FULL = Scenario("destination table nearly full",
                                 "destination table is nearly full, preventing new entries "
                                 "from being added.")

    @classmethod
    def check_needed(cls, btf: Btf) -> None:
        try:
            enforced = not btf.returns_void("dst_ops.gc")
        except BtfError as e:
            raise PlanError(f"cannot tell whether the limit is enforced: {e}") from None
        if not enforced:
            raise NotNeeded(ENFORCEMENT_REMOVED)
        # Kernels from before the fix (none of those we can check here) would need the
        # fib6_run_gc hooks upstream uses: say so rather than load without effect.
        raise PlanError("this kernel enforces net.ipv6.route.max_size, and tuning it there "
                        "is not implemented")
