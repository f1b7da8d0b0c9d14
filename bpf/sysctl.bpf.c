/* sysctl: report every sysctl write made by anyone but bpftune, so the engine can step
 * aside for an administrator. A cgroup/sysctl program attached at the cgroup2 root sees the
 * writes of every process, in every netns; it always allows the write.
 */
#include "bpftune.bpf.h"

static __always_inline u64 current_netns_cookie(void)
{
	void *task = (void *)bpf_get_current_task();
	void *nsproxy = NULL, *net = NULL;

	READ_AT(nsproxy, task, OFF_TASK_NSPROXY);
	if (!nsproxy)
		return 0;
	READ_AT(net, nsproxy, OFF_NSPROXY_NET_NS);
	return net ? net_cookie(net) : 0;
}

int bpftune_sysctl_write(struct bpf_sysctl *ctx)
{
	struct bpftune_event ev = {};
	u32 pid = bpf_get_current_pid_tgid() >> 32;

	if (!ctx->write || pid == BPFTUNE_PID)
		return 1;
	ev.tuner_id = TUNER_ID;
	ev.pid = pid;
	ev.netns_cookie = current_netns_cookie();
	bpf_get_current_comm(ev.comm, sizeof(ev.comm));
	bpf_sysctl_get_name(ctx, ev.str, sizeof(ev.str), 0);	/* e.g. "net/ipv4/tcp_rmem" */
	submit_event(&ev);
	return 1;
}
