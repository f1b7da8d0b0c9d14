/* sysctl: report writes by anyone but bpftune to the sysctls tuners manage, so the engine
 * can step aside for an administrator. A cgroup/sysctl program attached at the cgroup2 root
 * sees the writes of every process, in every netns; it always allows the write.
 *
 * Unprivileged users can write net sysctls in namespaces of their own, as fast as they can
 * make them, so an administrator's write must never be lost among theirs:
 * - only sysctls in `managed` (filled by the engine) are reported, on a ring buffer of
 *   their own (bpftune_admin_events);
 * - a write in the initial namespace (root only) is also counted in `global_writes`, and
 *   in all in its last slot, which the engine reads each second (the others only when that
 *   grew): it sees such a write even if its event was lost;
 * - writes in other namespaces are limited to one per namespace and sysctl per 25 ms and
 *   OTHER_NETNS_PER_SEC in all; beyond that they are dropped and counted.
 */
#include "bpftune.bpf.h"

#define SYSCTL_NAME_LEN 64
#define MAX_MANAGED 64
#define OTHER_NETNS_PER_SEC 512

struct sysctl_name {
	char name[SYSCTL_NAME_LEN];	/* e.g. "net/ipv4/tcp_rmem", zero-padded */
};

BPF_HASH(managed, struct sysctl_name, u32, MAX_MANAGED);	/* name -> slot */
BPF_ARRAY(global_writes, u64, MAX_MANAGED + 1);		/* slot -> writes; then all */
BPF_ARRAY(other_netns_budget, struct rate_window, 1);
BPF_ARRAY(other_netns_dropped, u64, 1);

int bpftune_sysctl_write(struct bpf_sysctl *ctx)
{
	struct bpftune_event ev = {};
	struct sysctl_name key = {};
	u32 pid = bpf_get_current_pid_tgid() >> 32;
	int zero = 0, all = MAX_MANAGED;
	u32 *slot;
	u64 *writes;

	if (!ctx->write || pid == BPFTUNE_PID)
		return 1;
	if (bpf_sysctl_get_name(ctx, key.name, sizeof(key.name), 0) < 0)
		return 1;	/* longer than any managed name */
	slot = managed.lookup(&key);
	if (!slot)
		return 1;
	ev.netns_cookie = current_netns_cookie();
	if (ev.netns_cookie == GLOBAL_NETNS_COOKIE) {
		writes = global_writes.lookup(slot);
		if (writes)
			ev.metric[0] = __sync_fetch_and_add(writes, 1) + 1;
		writes = global_writes.lookup(&all);
		if (writes)
			__sync_fetch_and_add(writes, 1);
	} else if (rate_limited(ev.netns_cookie, *slot)) {
		return 1;	/* reported less than 25 ms ago */
	} else if (over_budget(other_netns_budget.lookup(&zero), OTHER_NETNS_PER_SEC)) {
		writes = other_netns_dropped.lookup(&zero);
		if (writes)
			__sync_fetch_and_add(writes, 1);
		return 1;
	}
	ev.tuner_id = TUNER_ID;
	ev.tunable_id = *slot;
	ev.pid = pid;
	bpf_get_current_comm(ev.comm, sizeof(ev.comm));
	__builtin_memcpy(ev.str, key.name, sizeof(key.name));
	if (bpftune_admin_events.ringbuf_output(&ev, sizeof(ev), 0) != 0)
		count_dropped(1);
	return 1;
}
