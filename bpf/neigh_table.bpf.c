/* neigh_table: notice when a neighbour table (ARP, NDISC) nears its gc_thresh3, the number
 * of entries past which the kernel refuses new neighbours ("neighbor table overflow!"),
 * and say which device, in which namespace, is filling it. Userspace decides how far the
 * thresholds may grow (bpftune/tuners/neigh_table.py).
 *
 * Hook: the neigh_create tracepoint, as a raw tracepoint (tbl, dev, pkey, n,
 * exempt_from_gc), on 6.1, 6.12 and 6.18. The plain tracepoint has no ifindex and no
 * namespace; the raw one has the device. It fires after the kernel decided, also when it
 * refused the entry (n is NULL), so refusals are seen and counted here. tbl->gc_entries is
 * what gc_thresh3 limits: permanent and externally learned entries are exempt (upstream
 * compares tbl->entries, which counts them too).
 */
#include "bpftune.bpf.h"

#define AF_INET 2
#define AF_INET6 10
#define IFNAMSIZ 16

/* The event payload (NeighTableTuner.payload): the device that is filling the table. */
struct neigh_device {
	s32 ifindex;
	u16 family;
	u8 refused;		/* the kernel refused this entry: the table was full */
	u8 pad;
	char dev[IFNAMSIZ];
};

/* Per namespace and device: entries created and refused since bpftune started, for the
 * PMDA (which container fills the table). */
struct device_key {
	u64 netns_cookie;
	s32 ifindex;
	u32 family;
};

struct device_counts {
	u64 created;
	u64 refused;
	char dev[IFNAMSIZ];
};

BPF_TABLE("lru_hash", struct device_key, struct device_counts, neigh_devices, 4096);

static __always_inline void count_on(struct device_key *key, struct neigh_device *d)
{
	struct device_counts zero = {}, *counts;

	counts = neigh_devices.lookup_or_try_init(key, &zero);
	if (!counts)
		return;
	if (d->refused)
		__sync_fetch_and_add(&counts->refused, 1);
	else
		__sync_fetch_and_add(&counts->created, 1);
	__builtin_memcpy(counts->dev, d->dev, IFNAMSIZ);
}

RAW_TRACEPOINT_PROBE(neigh_create)
{
	void *tbl = (void *)ctx->args[0], *dev = (void *)ctx->args[1], *net = NULL;
	struct neigh_device d = {};
	struct device_key key = {};
	s64 thresh[3] = {}, entries = 0;
	s32 family = 0, gc_entries = 0, t1 = 0, t2 = 0, t3 = 0;
	u32 tunable;

	if (ctx->args[4] || !dev)	/* exempt from the thresholds */
		return 0;
	READ_AT(family, tbl, OFF_TBL_FAMILY);
	if (family == AF_INET)
		tunable = TUNABLE_ARP;
	else if (family == AF_INET6)
		tunable = TUNABLE_NDISC;
	else
		return 0;
	READ_AT(d.ifindex, dev, OFF_DEV_IFINDEX);
	READ_AT(d.dev, dev, OFF_DEV_NAME);
	READ_AT(net, dev, OFF_DEV_NET);
	d.family = family;
	d.refused = ctx->args[3] == 0;
	key.netns_cookie = net ? net_cookie(net) : 0;
	key.ifindex = d.ifindex;
	key.family = family;
	count_on(&key, &d);

	READ_AT(gc_entries, tbl, OFF_TBL_GC_ENTRIES);
	READ_AT(t1, tbl, OFF_TBL_THRESH1);
	READ_AT(t2, tbl, OFF_TBL_THRESH2);
	READ_AT(t3, tbl, OFF_TBL_THRESH3);
	entries = gc_entries;
	if (!d.refused && !NEARLY_FULL(entries, (s64)t3))
		return 0;
	thresh[0] = t1;
	thresh[1] = t2;
	thresh[2] = t3;
	/* The thresholds as they are, twice: userspace computes the new ones (it knows the
	 * device's addresses, which bound them). Events for a table carry its family's
	 * tunable, rate limited per namespace. */
	send_event_with(CURRENT_PID, key.netns_cookie, SCENARIO_NEARLY_FULL, tunable, thresh, thresh,
			3, entries, &d, sizeof(d));
	return 0;
}
