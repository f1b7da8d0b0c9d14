/* Maps every module shares (bpftune: its ring buffers, rate-limit and drop-count maps).
 *
 * Not BCC's "export"/"extern" (that registry lives in one process's libbcc): each module
 * declares them pinned at PIN_DIR, a bpffs mounted in the loader child's own mount
 * namespace. The first child finds nothing there, so BCC creates and pins the maps; a later
 * child (a strategy switch) first pins the fds the daemon passes it, so BCC opens those:
 * one set of maps for every module, and no pin ever outlives a child.
 */
#pragma once

struct proto_event {
	u32 kind;		/* 1 raw tp fork, 2 tracepoint fork, 3 sockops, 4 cgroup/sysctl */
	u32 pid;
	u64 value;
	char comm[16];
	char text[32];
};

/* BPF_RINGBUF_OUTPUT's table type, declared by hand to give it a pinned section. */
struct ring_table_t {
	int key;
	u32 leaf;
	int (*ringbuf_output)(void *, u64, u64);
	void *(*ringbuf_reserve)(u64);
	void (*ringbuf_discard)(void *, u64);
	void (*ringbuf_submit)(void *, u64);
	u32 max_entries;
};

__attribute__((section("maps/ringbuf:" PIN_DIR "/events")))
struct ring_table_t events = { .max_entries = 16 * PAGE_SIZE };
__attribute__((section("maps/ringbuf:" PIN_DIR "/admin_events")))
struct ring_table_t admin_events = { .max_entries = 16 * PAGE_SIZE };
/* events lost because a ring buffer was full: [0] events, [1] admin_events */
BPF_TABLE_PINNED("percpu_array", int, u64, dropped, 2, PIN_DIR "/dropped");

static __always_inline void submit(struct proto_event *ev, int admin)
{
	int ret = admin ? admin_events.ringbuf_output(ev, sizeof(*ev), 0)
			: events.ringbuf_output(ev, sizeof(*ev), 0);
	if (ret) {
		u64 *n = dropped.lookup(&admin);
		if (n)
			(*n)++;
	}
}
