/* strategy: the BPF side of the example tuner with strategies (strategy_tuner.py). Each
 * strategy has a program of its own; the engine compiles this file once per strategy, with
 * STRATEGY_ID the strategy's index (STRATEGY_A and STRATEGY_B name the indices) and the
 * HOOK_* defines of that strategy's watches, and loads only the current strategy's.
 *
 * Both programs react only to a task named TRIGGER_COMM, so nothing else sets them off:
 * - strategy_A: the task renames itself to it (tracepoint task:task_rename), e.g.
 *   `printf bpftune-strat > /proc/thread-self/comm`;
 * - strategy_B: a task of that name reads kernel.core_pattern (cgroup/sysctl program).
 * Each event says which strategy's program sent it (metric[0] = STRATEGY_ID).
 */
#include "bpftune.bpf.h"

#define TRIGGER_COMM "bpftune-strat"
#define CORE_PATTERN "kernel/core_pattern"

/* A name (a comm, a sysctl's) as 8-byte words: compared byte by byte, clang turns the tests
 * into branch-free arithmetic that the verifier walks path by path, past its limit. */
#define NAME_WORDS 3
union name {
	char c[8 * NAME_WORDS];
	u64 w[NAME_WORDS];
};

/* Whether the first n bytes (a constant) of two names are the same. */
static __always_inline bool same_start(const union name *a, const union name *b, int n)
{
#pragma unroll
	for (int i = 0; i < NAME_WORDS; i++) {
		int left = n - 8 * i;
		u64 mask = left >= 8 ? ~0ULL : (1ULL << (8 * left)) - 1;

		if (left > 0 && ((a->w[i] ^ b->w[i]) & mask))
			return false;
	}
	return true;
}

/* Whether `got` is the string `literal` (its NUL included). */
#define IS(got, literal) ({					\
	union name want = { .c = literal };			\
	same_start(&(got), &want, sizeof(literal));		\
})

/* Send this strategy's event, from a task named `comm`. */
static __always_inline void report(const union name *comm)
{
	struct bpftune_event ev = {};

	if (rate_limited(0, STRATEGY_ID))
		return;
	ev.tuner_id = TUNER_ID;
	ev.scenario_id = SCENARIO_EVENT;
	ev.pid = CURRENT_PID;
	ev.metric[0] = STRATEGY_ID;
	__builtin_memcpy(ev.comm, comm->c, sizeof(ev.comm));
	submit_event(&ev);
}

#ifdef HOOK_TP_task_rename
TRACEPOINT_PROBE(task, task_rename)
{
	union name comm = {};

	bpf_probe_read_kernel(comm.c, sizeof(args->newcomm), args->newcomm);
	if (IS(comm, TRIGGER_COMM))
		report(&comm);
	return 0;
}
#endif

#if STRATEGY_ID == STRATEGY_B
int strategy_b_sysctl(struct bpf_sysctl *ctx)
{
	union name name = {}, comm = {};

	if (ctx->write || bpf_sysctl_get_name(ctx, name.c, sizeof(name.c), 0) < 0)
		return 1;	/* a write, or a longer name than any we look for */
	bpf_get_current_comm(comm.c, sizeof(comm.c));
	if (IS(name, CORE_PATTERN) && IS(comm, TRIGGER_COMM))
		report(&comm);
	return 1;	/* allow the read */
}
#endif
