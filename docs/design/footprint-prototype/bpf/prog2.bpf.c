/* Module 2, loaded later by a second loader child (as a strategy switch would): a
 * cgroup/sysctl program writing to the admin ring buffer and a sockops program with
 * socket-local storage writing to the events ring buffer, both maps created by module 1's
 * child and passed on by the daemon. The daemon attaches both to a test cgroup. */
#include "shared.h"

struct conn_state {
	u32 callbacks;
	u32 established;
};
BPF_SK_STORAGE(conns, struct conn_state);

int proto13_sysctl(struct bpf_sysctl *ctx)
{
	struct proto_event ev = { .kind = 4 };

	ev.pid = bpf_get_current_pid_tgid() >> 32;
	ev.value = VARIANT * 1000 + ctx->write;	/* which load sent it */
	bpf_get_current_comm(ev.comm, sizeof(ev.comm));
	bpf_sysctl_get_name(ctx, ev.text, sizeof(ev.text), 0);
	submit(&ev, 1);
	return 1;	/* allow: this program only watches */
}

int proto13_sockops(struct bpf_sock_ops *ops)
{
	struct bpf_sock *sk = ops->sk;
	struct conn_state *conn;
	struct proto_event ev = { .kind = 3 };

	if (!sk)
		return 1;
	conn = conns.sk_storage_get(sk, NULL, BPF_SK_STORAGE_GET_F_CREATE);
	if (!conn)
		return 1;
	conn->callbacks++;
	if (ops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
		conn->established = 1;
		ev.value = __builtin_bswap16(ops->remote_port >> 16);	/* be16 in the high half */
		submit(&ev, 0);
	}
	return 1;
}
