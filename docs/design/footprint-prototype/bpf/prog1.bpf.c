/* Module 1, loaded at "start-up": a raw tracepoint and a classic tracepoint (both attached
 * by BCC's autoload), an LRU hash with a struct key and value, a per-CPU array, a hash, and
 * a config array the daemon writes. Only forks by the daemon itself (config[0]) count, so
 * the machine's other processes cause nothing. */
#include "shared.h"

struct fork_key {
	u32 tgid;
	char comm[16];
};
struct fork_last {
	u32 cpu;
	u32 calls;
};
struct fork_val {
	u64 count;
	struct fork_last last;
};

BPF_TABLE("lru_hash", struct fork_key, struct fork_val, forks, 64);
BPF_PERCPU_ARRAY(fork_calls, u64, 1);
BPF_ARRAY(config, u32, 1);		/* [0]: the tgid whose forks are reported */
BPF_HASH(children, u32, u64, 64);	/* child pid -> parent pid */

static __always_inline u32 watched(void)
{
	int zero = 0;
	u32 *tgid = config.lookup(&zero);

	return tgid ? *tgid : 0;
}

RAW_TRACEPOINT_PROBE(sched_process_fork)	/* (parent, child); current is the parent */
{
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct fork_key key = { .tgid = tgid };
	struct fork_val zero = {}, *val;
	struct proto_event ev = { .kind = 1, .pid = tgid };
	int slot = 0;
	u64 *calls;

	if (!tgid || tgid != watched())
		return 0;
	calls = fork_calls.lookup(&slot);
	if (calls)
		(*calls)++;
	bpf_get_current_comm(key.comm, sizeof(key.comm));
	val = forks.lookup_or_try_init(&key, &zero);
	if (val) {
		val->count++;
		val->last.cpu = bpf_get_smp_processor_id();
		val->last.calls = calls ? *calls : 0;
		ev.value = val->count;
	}
	__builtin_memcpy(ev.comm, key.comm, sizeof(ev.comm));
	submit(&ev, 0);
	return 0;
}

TRACEPOINT_PROBE(sched, sched_process_fork)	/* fields from tracefs: safe on any kernel */
{
	u32 parent = args->parent_pid, child = args->child_pid;
	u64 p = parent;
	struct proto_event ev = { .kind = 2, .pid = child, .value = parent };

	if (!parent || parent != watched())
		return 0;
	children.update(&child, &p);
	bpf_get_current_comm(ev.comm, sizeof(ev.comm));
	submit(&ev, 0);
	return 0;
}
