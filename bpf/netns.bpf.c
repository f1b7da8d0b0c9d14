/* netns: report network namespaces as they are created by clone()/clone3() with
 * CLONE_NEWNET (a child whose netns differs from its parent's). Each namespace is reported
 * once; the engine then tunes it like any other.
 *
 * Where the kernel allows fexit, copy_net_ns sees every new namespace. Otherwise the fork
 * tracepoint sees clone(), and unshare(CLONE_NEWNET) has no cheap hook: enabling any
 * syscalls:* tracepoint sends every system call of every process through the tracing slow
 * path (measured: 4.5% fewer stress-ng socket ops). Namespaces made that way are found by
 * the engine instead: new names under /run/netns through inotify, and any other namespace
 * the first time one of its sockets reaches a tuner.
 */
#include "bpftune.bpf.h"

#define NETNS_EVENTS_PER_SEC 64

BPF_TABLE("lru_hash", u64, u8, reported_netns, 4096);
/* Anyone may create namespaces as fast as they can (unshare -rn): past the budget the
 * engine is told only that it missed some (`missed`), and finds them with one rescan. */
BPF_ARRAY(budget, struct rate_window, 1);
BPF_ARRAY(missed, u64, 1);

static __always_inline void report_netns(void *net, u32 pid)
{
	struct bpftune_event ev = {};
	u64 cookie = net_cookie(net);
	u8 one = 1;
	int zero = 0;
	u64 *count;

	if (!cookie || reported_netns.lookup(&cookie))
		return;
	reported_netns.update(&cookie, &one);
	if (over_budget(budget.lookup(&zero), NETNS_EVENTS_PER_SEC)) {
		count = missed.lookup(&zero);
		if (count)
			__sync_fetch_and_add(count, 1);
		return;
	}
	ev.tuner_id = TUNER_ID;
	ev.netns_cookie = cookie;
	ev.pid = pid;
	submit_event(&ev);
}

#ifdef HOOK_FEXIT_copy_net_ns
/* Every new namespace, made by clone() or unshare(): copy_net_ns returns it (or old_net
 * when CLONE_NEWNET is not asked for, or an error pointer). */
KRETFUNC_PROBE(copy_net_ns, unsigned long flags, void *user_ns, void *old_net, void *net)
{
	if (net == old_net || (unsigned long)net >= (unsigned long)-4095)
		return 0;
	report_netns(net, bpf_get_current_pid_tgid() >> 32);
	return 0;
}
#endif

#ifdef HOOK_RAW_TP_sched_process_fork
RAW_TRACEPOINT_PROBE(sched_process_fork)
{
	void *parent = (void *)ctx->args[0], *child = (void *)ctx->args[1];
	void *child_net = task_net(child);
	u32 child_pid = 0;

	if (!child_net || child_net == task_net(parent))
		return 0;
	READ_AT(child_pid, child, OFF_TASK_TGID);
	report_netns(child_net, child_pid);
	return 0;
}
#endif
