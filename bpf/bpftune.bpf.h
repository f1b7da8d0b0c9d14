/* Shared by every tuner's BPF program: the event record, the one ring buffer all tuners
 * write to, rate limiting, sampling, the learning-rate arithmetic, field reads and the
 * task's netns.
 *
 * Compiled by BCC in the loader child (engine/bpftune/loader.py) with -D constants from the
 * engine: TUNER_ID, LEARNING_SHIFT, BPFTUNE_PID, PIN_DIR, and OFF_* byte offsets of kernel struct fields
 *   resolved from the running kernel's BTF (never from header layouts, which are from
 *   another kernel on our machines).
 */
#pragma once

#define BPFTUNE_MAX_VALUES 3
#define BPFTUNE_STR_LEN 128
#define RATE_LIMIT_NS (25 * 1000000ULL)	/* one event per (netns, tuner, tunable) per 25 ms */

struct bpftune_event {
	u32 tuner_id;
	u32 scenario_id;
	u64 netns_cookie;
	s32 pid;
	u32 tunable_id;
	s64 old[BPFTUNE_MAX_VALUES];
	s64 new[BPFTUNE_MAX_VALUES];
	s64 metric[2];		/* e.g. smoothed RTT, for correlation with changes */
	char comm[16];		/* command of the task that caused the event */
	char str[BPFTUNE_STR_LEN];
};

/* Maps every tuner's module shares: the ring buffers the daemon polls, the rate-limit map
 * and the count of events lost. The daemon creates them (libbpf) and hands their fds to the
 * loader child, which pins them in a bpffs at PIN_DIR that only it sees (its own mount
 * namespace): BCC then opens the pinned maps instead of creating new ones. Nothing is left
 * pinned on the host, even after a kill -9. */
struct bpftune_events_table_t {
	int key;
	u32 leaf;
	int (*ringbuf_output)(void *, u64, u64);
	void *(*ringbuf_reserve)(u64);
	void (*ringbuf_discard)(void *, u64);
	void (*ringbuf_submit)(void *, u64);
	u32 max_entries;
};

struct rate_key {
	u64 netns_cookie;
	u32 tuner_id;
	u32 tunable_id;
};

__attribute__((section("maps/ringbuf:" PIN_DIR "/bpftune_events")))
struct bpftune_events_table_t bpftune_events = { .max_entries = 64 * PAGE_SIZE };
/* A second ring buffer carries only administrators' sysctl writes (bpf/sysctl.bpf.c), so a
 * flood of tuning or namespace events can never crowd one out. */
__attribute__((section("maps/ringbuf:" PIN_DIR "/bpftune_admin_events")))
struct bpftune_events_table_t bpftune_admin_events = { .max_entries = 64 * PAGE_SIZE };
BPF_TABLE_PINNED("lru_hash", struct rate_key, u64, bpftune_last_event, 16384,
		 PIN_DIR "/bpftune_last_event");
/* events lost because a ring buffer was full: [0] tuning events, [1] administrators' */
BPF_TABLE_PINNED("percpu_array", int, u64, bpftune_dropped, 2, PIN_DIR "/bpftune_dropped");

#define GROW(v)	((v) + max_t(s64, (v) >> LEARNING_SHIFT, 1))
#define SHRINK(v) ((v) - max_t(s64, (v) >> LEARNING_SHIFT, 1))
#define NEARLY_FULL(v, lim) ((v) >= (lim) || (v) + ((lim) >> LEARNING_SHIFT) >= (lim))

#ifndef max_t
#define max_t(type, a, b) ((type)(a) > (type)(b) ? (type)(a) : (type)(b))
#endif

/* Read a kernel field at a BTF-resolved offset. */
#define READ_AT(dst, base, off) bpf_probe_read_kernel(&(dst), sizeof(dst), (void *)(base) + (off))

/* Read field X (OFF_X, SHIFT_X, MASK_X from BTF) whether this kernel makes it a bitfield
 * or a whole field: sock.sk_userlocks is 4 bits before Linux 6.9 and a byte since. */
#define READ_FIELD(dst, base, X)						\
	do {									\
		READ_AT(dst, base, OFF_##X);					\
		dst = ((u64)(dst) >> SHIFT_##X) & MASK_##X;			\
	} while (0)

/* Hot hooks look at one call in SAMPLE_EVERY (per CPU, per slot: each watch of a program
 * has its own slot, SAMPLE_<NAME> from the tuner's declarations, so one busy hook does not
 * decide which calls of another are seen). A connection that fills its buffer keeps doing
 * so, so little is missed. The engine reports the counts at exit, and passes SAMPLE_EVERY
 * and SAMPLE_SLOTS (bpftune.hooks). */
BPF_PERCPU_ARRAY(bpftune_samples, u64, SAMPLE_SLOTS);

static __always_inline bool sampled_in(int slot)
{
	u64 *calls = bpftune_samples.lookup(&slot);

	return calls && ((*calls)++ & (SAMPLE_EVERY - 1)) == 0;
}

/* The global values of the program's tunables (not all are struct fields): the engine
 * writes them at load and after every change, at [id * BPFTUNE_MAX_VALUES + position]. */
#define MAX_TUNABLES 32
BPF_ARRAY(tunable_values, s64, MAX_TUNABLES * BPFTUNE_MAX_VALUES);

static __always_inline s64 tunable_value(int tunable, int position)
{
	int key = tunable * BPFTUNE_MAX_VALUES + position;
	s64 *value = tunable_values.lookup(&key);

	return value ? *value : 0;
}

static __always_inline void *sk_net(void *sk)
{
	void *net = NULL;

	READ_AT(net, sk, OFF_SK_NET);
	return net;
}

static __always_inline u64 net_cookie(void *net)
{
	u64 cookie = 0;

	READ_AT(cookie, net, OFF_NET_COOKIE);
	return cookie;
}

#ifdef OFF_TASK_NSPROXY
/* The netns of a task (fields "task_struct.nsproxy", "nsproxy.net_ns"); NULL while it
 * exits. */
static __always_inline void *task_net(void *task)
{
	void *nsproxy = NULL, *net = NULL;

	READ_AT(nsproxy, task, OFF_TASK_NSPROXY);
	if (nsproxy)
		READ_AT(net, nsproxy, OFF_NSPROXY_NET_NS);
	return net;
}

/* The netns cookie of the current task (0 if it has none). */
static __always_inline u64 current_netns_cookie(void)
{
	void *net = task_net((void *)bpf_get_current_task());

	return net ? net_cookie(net) : 0;
}
#endif

#ifdef OFF_PROTO_MEMORY_ALLOCATED
/* A socket's protocol's memory in use and its sysctl_mem limits (tcp_mem, udp_mem: min
 * pressure max, in pages); fields "sock.__sk_common.skc_prot", "proto.memory_allocated",
 * "proto.sysctl_mem". False if the protocol does not account its memory. */
static __always_inline bool proto_memory(void *sk, s64 *allocated, s64 *mem)
{
	void *prot = NULL, *allocated_ptr = NULL, *mem_ptr = NULL;

	READ_AT(prot, sk, OFF_SK_PROT);
	READ_AT(allocated_ptr, prot, OFF_PROTO_MEMORY_ALLOCATED);
	READ_AT(mem_ptr, prot, OFF_PROTO_SYSCTL_MEM);
	if (!allocated_ptr || !mem_ptr)
		return false;
	bpf_probe_read_kernel(allocated, sizeof(*allocated), allocated_ptr);
	bpf_probe_read_kernel(mem, 3 * sizeof(*mem), mem_ptr);
	return true;
}
#endif

/* True if an event for this (netns, tunable) was sent less than RATE_LIMIT_NS ago;
 * otherwise records now as the last event time. */
static __always_inline bool rate_limited(u64 cookie, u32 tunable_id)
{
	struct rate_key key = { .netns_cookie = cookie, .tuner_id = TUNER_ID,
				.tunable_id = tunable_id };
	u64 now = bpf_ktime_get_ns();
	u64 *last = bpftune_last_event.lookup(&key);

	if (last && now - *last < RATE_LIMIT_NS)
		return true;
	bpftune_last_event.update(&key, &now);
	return false;
}

static __always_inline void count_dropped(int which)
{
	u64 *dropped = bpftune_dropped.lookup(&which);

	if (dropped)
		(*dropped)++;
}

/* Send an event to userspace, counting it as dropped if the ring buffer is full. */
static __always_inline void submit_event(struct bpftune_event *ev)
{
	if (bpftune_events.ringbuf_output(ev, sizeof(*ev), 0) != 0)
		count_dropped(0);
}

/* At most `limit` calls per second pass, over all CPUs (approximately: the window is reset
 * without a lock); a bucket is one slot of an array map the program owns. */
struct rate_window {
	u64 start;
	u64 count;
};

static __always_inline bool over_budget(struct rate_window *w, u64 limit)
{
	u64 now = bpf_ktime_get_ns();

	if (!w)
		return true;
	if (now - w->start >= 1000000000ULL) {
		w->start = now;
		w->count = 0;
	}
	return __sync_fetch_and_add(&w->count, 1) >= limit;
}

/* The process an event comes from, for the engine to find a new namespace at. Programs with
 * no current task (sockops) pass NO_PID. */
#define CURRENT_PID ((s32)(bpf_get_current_pid_tgid() >> 32))
#define NO_PID 0

/* Propose changing a tunable from old to new values in a netns, with the tuner's own
 * record (`payload`, its Tuner.payload layout) in the event's str area; rate limited. */
static __always_inline int send_event_with(s32 pid, u64 cookie, u32 scenario, u32 tunable_id,
					   s64 *old, s64 *new, int nvalues, s64 metric,
					   const void *payload, u32 payload_size)
{
	struct bpftune_event ev = {};

	if (rate_limited(cookie, tunable_id))
		return 0;
	if (payload)
		__builtin_memcpy(ev.str, payload, payload_size);
	ev.tuner_id = TUNER_ID;
	ev.scenario_id = scenario;
	ev.netns_cookie = cookie;
	ev.pid = pid;
	ev.tunable_id = tunable_id;
#pragma unroll
	for (int i = 0; i < BPFTUNE_MAX_VALUES; i++) {
		if (i < nvalues) {
			ev.old[i] = old[i];
			ev.new[i] = new[i];
		}
	}
	ev.metric[0] = metric;
	submit_event(&ev);
	return 1;
}

/* Propose changing a tunable from old to new values in a netns; rate limited. */
static __always_inline int send_sysctl_event_from(s32 pid, u64 cookie, u32 scenario,
						  u32 tunable_id, s64 *old, s64 *new,
						  int nvalues, s64 metric)
{
	return send_event_with(pid, cookie, scenario, tunable_id, old, new, nvalues, metric,
			       NULL, 0);
}

static __always_inline int send_sysctl_event(u64 cookie, u32 scenario, u32 tunable_id,
					     s64 *old, s64 *new, int nvalues, s64 metric)
{
	return send_sysctl_event_from(CURRENT_PID, cookie, scenario, tunable_id, old, new,
				      nvalues, metric);
}
