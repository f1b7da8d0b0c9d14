/* net_buffer: notice packets dropped because a CPU's input backlog queue
 * (net.core.netdev_max_backlog) is full, and propose a longer queue, plus flow limiting on
 * the dropping CPU so that small flows get through while the queue fills.
 *
 * Only the backlog needs BPF: NAPI budget squeezes are read from /proc/net/softnet_stat by
 * the Python side once a second. TUNABLE_* and SCENARIO_* ids come from the Python
 * declarations; DROP_CPU_BACKLOG is SKB_DROP_REASON_CPU_BACKLOG from this kernel's BTF (its
 * value differs per kernel).
 */
#include "bpftune.bpf.h"

#define MINUTE_NS (60 * 1000000000ULL)
#define MAX_BITMAP_CPU 64	/* the bitmap the engine publishes is one s64 */

/* Drops seen in the current one-minute window, over all CPUs. */
struct drop_window {
	u64 start;
	u64 count;
};
BPF_ARRAY(backlog_drops, struct drop_window, 1);

/* Count one drop; true once the window holds netdev_max_backlog / 32 drops. Upstream counts
 * each drop twice (its caller and helper both increment), halving the threshold. */
static __always_inline bool enough_drops(struct drop_window *w, s64 backlog)
{
	u64 now = bpf_ktime_get_ns();

	if (now - w->start > MINUTE_NS) {	/* unlocked reset: a lost count or two is fine */
		w->start = now;
		w->count = 0;
	}
	return __sync_fetch_and_add(&w->count, 1) + 1 >= (u64)(backlog >> 5);
}

/* Ask for flow limiting on this CPU unless its bit is already in flow_limit_cpu_bitmap
 * (published to us as a number by the engine). */
static __always_inline void limit_flows(u32 cpu)
{
	s64 bitmap = tunable_value(TUNABLE_FLOW_LIMIT_CPU_BITMAP, 0), new;

	if (cpu >= MAX_BITMAP_CPU || ((u64)bitmap & (1ULL << cpu)))
		return;
	new = (s64)((u64)bitmap | (1ULL << cpu));
	send_sysctl_event(0, SCENARIO_SET_FLOW_LIMIT, TUNABLE_FLOW_LIMIT_CPU_BITMAP, &bitmap,
			  &new, 1, cpu);
}

/* The backlog is per CPU and the sysctl global, so events are for the global netns. */
static __always_inline void backlog_drop(void)
{
	s64 backlog = tunable_value(TUNABLE_MAX_BACKLOG, 0), new;
	struct drop_window *w;
	int zero = 0;

	w = backlog_drops.lookup(&zero);
	if (!w || !enough_drops(w, backlog))
		return;
	new = GROW(backlog);
	/* Upstream never resets the count, so after one growth every further drop proposes
	 * another (25 ms apart); here a grown queue needs its own 1/32 of drops. */
	if (send_sysctl_event(0, SCENARIO_NEED_BACKLOG, TUNABLE_MAX_BACKLOG, &backlog, &new, 1,
			      w->count))
		w->count = 0;
	limit_flows(bpf_get_smp_processor_id());
}

#ifdef HOOK_RAW_TP_kfree_skb
RAW_TRACEPOINT_PROBE(kfree_skb)	/* (skb, location, reason[, sk]): drops only, not hot */
{
	if ((u32)ctx->args[2] == DROP_CPU_BACKLOG)
		backlog_drop();
	return 0;
}
#endif
