/* netns: report network namespaces as they are created, by unshare(CLONE_NEWNET) or by
 * clone()/clone3() with CLONE_NEWNET (a child whose netns differs from its parent's).
 * Each namespace is reported once; the engine then tunes it like any other.
 */
#include "bpftune.bpf.h"

#define CLONE_NEWNET 0x40000000

BPF_HASH(unsharing_netns, u32, u8, 1024);	/* threads inside unshare(CLONE_NEWNET) */
BPF_TABLE("lru_hash", u64, u8, reported_netns, 4096);

static __always_inline void *task_net(void *task)
{
	void *nsproxy = NULL, *net = NULL;

	READ_AT(nsproxy, task, OFF_TASK_NSPROXY);
	if (nsproxy)
		READ_AT(net, nsproxy, OFF_NSPROXY_NET_NS);
	return net;
}

static __always_inline void report_netns(void *net, u32 pid)
{
	struct bpftune_event ev = {};
	u64 cookie = net_cookie(net);
	u8 one = 1;

	if (!cookie || reported_netns.lookup(&cookie))
		return;
	reported_netns.update(&cookie, &one);
	ev.tuner_id = TUNER_ID;
	ev.netns_cookie = cookie;
	ev.pid = pid;
	submit_event(&ev);
}

TRACEPOINT_PROBE(syscalls, sys_enter_unshare)
{
	u32 tid = bpf_get_current_pid_tgid();
	u8 one = 1;

	if (args->unshare_flags & CLONE_NEWNET)
		unsharing_netns.update(&tid, &one);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_unshare)
{
	u32 tid = bpf_get_current_pid_tgid();

	if (!unsharing_netns.lookup(&tid))
		return 0;
	unsharing_netns.delete(&tid);
	if (args->ret == 0)
		report_netns(task_net((void *)bpf_get_current_task()),
			     bpf_get_current_pid_tgid() >> 32);
	return 0;
}

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
