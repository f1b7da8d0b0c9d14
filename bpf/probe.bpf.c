/* Feature probe for `bpftune -S`: one tiny program per kind of hook the tuners use.
 * Each is loaded (and so checked by the verifier) on its own. */
#include "bpftune.bpf.h"

int probe_cgroup_sysctl(struct bpf_sysctl *ctx)
{
	return 1;
}

int probe_sockops(struct bpf_sock_ops *ops)
{
	bpf_get_netns_cookie(ops);	/* the helper tcp_conn needs */
	return 1;
}

int probe_raw_tracepoint(struct bpf_raw_tracepoint_args *ctx)
{
	return 0;
}

int probe_tracepoint(void *ctx)
{
	struct bpftune_event ev = {};

	bpftune_events.ringbuf_output(&ev, sizeof(ev), 0);
	return 0;
}
