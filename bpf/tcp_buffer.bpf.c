/* tcp_buffer: notice when TCP connections' buffers approach the tcp_rmem/tcp_wmem maximum,
 * when TCP memory approaches tcp_mem pressure/exhaustion, and when a listener's SYN queue
 * is at a limit at which the kernel refuses SYNs. Buffer and memory decisions are made
 * here; events are sent only when a limit is nearly reached, at most one per (netns,
 * tunable) per 25 ms.
 *
 * Each watch has several hooks (TcpBufferTuner.watches); the engine compiles this file with
 * HOOK_<KIND>_<target> defined for the one chosen on this kernel. TUNABLE_* and SCENARIO_*
 * ids and SAMPLE_* slots come from the Python declarations. Kernel struct fields are read
 * at BTF-resolved offsets. `pid` is the process events are sent from (NO_PID in sockops).
 */
#include "bpftune.bpf.h"

enum { MEM_NORMAL, MEM_NEAR_PRESSURE, MEM_NEAR_EXHAUSTION };

#define SOCK_SNDBUF_LOCK 1
#define SOCK_RCVBUF_LOCK 2
#define TCP_INT_MAX 2147483647

/* Compare TCP memory in use with tcp_mem (global, so reported for the global netns);
 * propose growing it when nearly at a limit. Userspace applies the RAM-based ceilings. */
static __always_inline u32 check_memory(s32 pid, s64 allocated, s64 *mem)
{
	s64 new[3];

	if (NEARLY_FULL(allocated, mem[2])) {
		/* Use above pressure keeps the kernel in memory-pressure mode until it falls
		 * below min, so min and pressure grow with max. Upstream grows only max: at
		 * tcp_mem 20 50 50, use chased max and pressure mode never ended. */
		new[0] = allocated >= mem[1] ? GROW(mem[0]) : mem[0];
		new[1] = allocated >= mem[1] ? GROW(mem[1]) : mem[1];
		new[2] = GROW(mem[2]);
		send_sysctl_event_from(pid, 0, SCENARIO_MEM_EXHAUSTION, TUNABLE_MEM, mem, new, 3,
				       allocated);
		return MEM_NEAR_EXHAUSTION;
	}
	if (NEARLY_FULL(allocated, mem[1])) {
		new[0] = GROW(mem[0]);
		new[1] = GROW(mem[1]);
		new[2] = GROW(mem[2]);
		send_sysctl_event_from(pid, 0, SCENARIO_MEM_PRESSURE, TUNABLE_MEM, mem, new, 3,
				       allocated);
		return MEM_NEAR_PRESSURE;
	}
	return MEM_NORMAL;
}

static __always_inline u32 check_socket_memory(s32 pid, void *sk)
{
	s64 allocated = 0, mem[3] = {};

	if (!proto_memory(sk, &allocated, mem))
		return MEM_NORMAL;
	return check_memory(pid, allocated, mem);
}

/* Propose a bigger max for tcp_rmem/tcp_wmem if this socket's buffer is nearly at it. */
static __always_inline void check_buffer(s32 pid, void *sk, int buf, u32 tunable,
					 u32 net_offset)
{
	void *net = sk_net(sk);
	int limits[3] = {};
	s64 old[3], new[3];
	u32 srtt_us = 0;

	READ_AT(limits, net, net_offset);
	if (!NEARLY_FULL(buf, limits[2]) || limits[2] >= TCP_INT_MAX)
		return;
	READ_AT(srtt_us, sk, OFF_TCP_SRTT_US);
	old[0] = new[0] = limits[0];
	old[1] = new[1] = limits[1];
	old[2] = limits[2];
	new[2] = GROW((s64)limits[2]);
	send_sysctl_event_from(pid, net_cookie(net), SCENARIO_NEED_INCREASE, tunable, old, new,
			       3, srtt_us >> 3);
}

/* A TCP socket's buffer may grow, unless the application set its size (SO_RCVBUF,
 * SO_SNDBUF lock it). */
static __always_inline void check_growth(s32 pid, void *sk, u8 lock, int buf_offset,
					 u32 tunable, u32 net_offset)
{
	u8 userlocks = 0;
	int buf = 0;

	if (check_socket_memory(pid, sk) != MEM_NORMAL)
		return;
	READ_FIELD(userlocks, sk, SK_USERLOCKS);
	if (userlocks & lock)
		return;
	bpf_probe_read_kernel(&buf, sizeof(buf), sk + buf_offset);
	check_buffer(pid, sk, buf, tunable, net_offset);
}

static __always_inline void receive_buffer_growth(s32 pid, void *sk)
{
	check_growth(pid, sk, SOCK_RCVBUF_LOCK, OFF_SK_RCVBUF, TUNABLE_RMEM, OFF_NET_TCP_RMEM);
}

static __always_inline void send_buffer_growth(s32 pid, void *sk)
{
	check_growth(pid, sk, SOCK_SNDBUF_LOCK, OFF_SK_SNDBUF, TUNABLE_WMEM, OFF_NET_TCP_WMEM);
}

/* Send buffer growth. */
#ifdef HOOK_FENTRY_tcp_sndbuf_expand
KFUNC_PROBE(tcp_sndbuf_expand, void *sk)	/* only when the kernel grows sk_sndbuf */
{
	send_buffer_growth(CURRENT_PID, sk);
	return 0;
}
#endif
#ifdef HOOK_RAW_TP_tcp_probe
/* The smoothed RTT of sampled senders per netns, for verified changes (the "sRTT us"
 * figure, read by TcpBufferTuner.figure_counters): userspace takes per-second differences
 * of the sums. Entries of namespaces that are gone are deleted by userspace. */
struct rtt_sum {
	u64 sum_us;
	u64 samples;
};
BPF_TABLE("lru_hash", u64, struct rtt_sum, netns_rtt, 1024);

/* Only a socket with data queued: a pure receiver's srtt is stale (it is updated by ACKs of
 * its own data). tcp_sock.srtt_us holds 8 times the smoothed RTT. */
static __always_inline void add_rtt(void *sk)
{
	struct rtt_sum fresh = {}, *sum;
	u64 cookie = net_cookie(sk_net(sk));
	u32 srtt_us = 0;

	READ_AT(srtt_us, sk, OFF_TCP_SRTT_US);
	sum = netns_rtt.lookup(&cookie);
	if (!sum) {	/* the first sample in this netns: a race may lose one, no matter */
		fresh.sum_us = srtt_us >> 3;
		fresh.samples = 1;
		netns_rtt.update(&cookie, &fresh);
		return;
	}
	__sync_fetch_and_add(&sum->sum_us, srtt_us >> 3);
	__sync_fetch_and_add(&sum->samples, 1);
}

/* Every segment received, so on a receiver the data and on a sender the ACKs that free send
 * space: receive buffers, and send buffers where fentry is refused, are looked at here,
 * sampled; so is senders' sRTT. Only a socket receiving data (the segment has some:
 * TCP_SKB_CB's end_seq is past its seq) is a receiver, only one with data queued is a
 * sender: the other buffer of each stays at its default and must not look full. */
RAW_TRACEPOINT_PROBE(tcp_probe)	/* (sk, skb) */
{
	void *sk = (void *)ctx->args[0], *skb = (void *)ctx->args[1];
	u32 seq = 0, end_seq = 0;
	int queued = 0;

	/* One count and one decision per call, in the first sharing watch's slot (the exit
	 * summary reports it for each): 1 in 16 calls goes on to read anything. */
#ifdef SAMPLE_RCV_SPACE_BY_RAW_TP_tcp_probe
	if (!sampled_in(SAMPLE_RCV_SPACE))
		return 0;
	READ_AT(seq, skb, OFF_SKB_CB + OFF_TCP_SKB_CB_SEQ);
	READ_AT(end_seq, skb, OFF_SKB_CB + OFF_TCP_SKB_CB_END_SEQ);
	if (end_seq != seq)
		receive_buffer_growth(CURRENT_PID, sk);
#elif defined(SAMPLE_SNDBUF_BY_RAW_TP_tcp_probe)
	if (!sampled_in(SAMPLE_SNDBUF))
		return 0;
#endif
	/* Senders: their RTT always (also where the send watch uses fentry), their send
	 * buffer here unless fentry watches it. */
	READ_AT(queued, sk, OFF_SK_WMEM_QUEUED);
	if (queued <= 0)
		return 0;
	add_rtt(sk);
#ifdef SAMPLE_SNDBUF_BY_RAW_TP_tcp_probe
	send_buffer_growth(CURRENT_PID, sk);
#endif
	return 0;
}
#endif

/* Send buffers at connection setup: a connection that sends a few messages (a control
 * connection) is rarely among the sampled segments above, so every connection is also
 * looked at once, after the kernel sized its send buffer (tcp_init_buffer_space grows it to
 * what the congestion window needs, at most tcp_wmem[2]). The ESTABLISHED callbacks run in
 * tcp_init_transfer just before that sizing, on both sides, so they ask for RTT callbacks
 * instead; the first one (the connection's first data acknowledged) checks the buffer and
 * stops them. Upstream hooks tcp_sndbuf_expand (fentry), whose entry sees the buffer before
 * it is sized. Callback flags are one set per socket, shared with other sockops programs:
 * a pending check remembers whether RTT callbacks were off before, so that only then they
 * are turned off again.
 * Pending checks are kept by socket cookie in an LRU hash, not in socket storage, whose
 * first allocation on a socket is costly: under stress-ng --sock this program's run time
 * (bpf_stats) fell from 6.3 to 4.0 us per connection. A check pending for a connection
 * that never got an ACK is evicted in time. */
#ifdef HOOK_SOCK_OPS_connection_setup
BPF_TABLE("lru_hash", u64, u32, setup_pending, 4096);	/* cookie -> RTT flag to clear, or 0 */

int connection_setup(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	u32 flags = skops->bpf_sock_ops_cb_flags, clear;
	u64 cookie;
	u32 *pending;
	void *tp;

	if (!sk)
		return 1;
	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		cookie = bpf_get_socket_cookie(skops);
		clear = flags & BPF_SOCK_OPS_RTT_CB_FLAG ? 0 : BPF_SOCK_OPS_RTT_CB_FLAG;
		if (setup_pending.update(&cookie, &clear) == 0)
			bpf_sock_ops_cb_flags_set(skops, flags | BPF_SOCK_OPS_RTT_CB_FLAG);
		break;
	case BPF_SOCK_OPS_RTT_CB:
		cookie = bpf_get_socket_cookie(skops);
		pending = setup_pending.lookup(&cookie);
		if (!pending)
			return 1;	/* checked already; another program wants RTTs */
		if (*pending)
			bpf_sock_ops_cb_flags_set(skops, flags & ~*pending);
		setup_pending.delete(&cookie);
		/* a kernel pointer, unlike skops->sk, allows reads at field offsets */
		tp = bpf_skc_to_tcp_sock(sk);
		if (tp)
			send_buffer_growth(NO_PID, tp);
		break;
	}
	return 1;
}
#endif

/* The kernel refused socket memory: TCP is at pressure or at the tcp_mem hard limit. */
#ifdef HOOK_TP_sock_exceed_buf_limit
TRACEPOINT_PROBE(sock, sock_exceed_buf_limit)
{
	s64 mem[3];

	if (args->name[0] != 'T' || args->name[1] != 'C' || args->name[2] != 'P')
		return 0;
	mem[0] = args->sysctl_mem[0];
	mem[1] = args->sysctl_mem[1];
	mem[2] = args->sysctl_mem[2];
	check_memory(CURRENT_PID, args->allocated, mem);
	return 0;
}
#endif

/* A listener retransmits a SYN-ACK: a half-open connection went a second unanswered (a lost
 * ACK, a slow client, or a flood from addresses that never answer). It fires from a timer,
 * never per packet, and on every kernel we support (6.1 on). Userspace is told only when the
 * SYN queue is at one of the limits at which tcp_conn_request refuses SYNs, with the
 * kernel's own tests (not the learning rate's NEARLY_FULL, which at -r 0..3 wants a queue
 * fuller than the kernel ever lets it get):
 *  - qlen >= sk_max_ack_backlog (the listen() backlog, capped by somaxconn): the kernel
 *    calls tcp_syn_flood_action, which sends syncookies or, with them off, drops the SYN.
 *    6.1 tests qlen >= max; 6.18 lets the queue hold max + 1 (6 half-open for a
 *    backlog of 5, seen here): ">=" covers both, at most one request early;
 *  - syncookies off and max_syn_backlog - qlen < max_syn_backlog >> 2: the kernel keeps
 *    the last quarter for peers it has metrics for and drops other SYNs.
 * The event only names the namespace: userspace judges, from its TcpExt counters over a
 * window, how many SYNs were refused and how many connections accepted. */
#ifdef HOOK_TP_tcp_retransmit_synack
TRACEPOINT_PROBE(tcp, tcp_retransmit_synack)
{
	void *sk = (void *)args->skaddr;
	void *net = sk_net(sk);
	u32 qlen = 0, max_ack_backlog = 0;
	int max_syn_backlog = 0;
	u8 syncookies = 0;
	bool listen_limit, syn_backlog_limit;
	s64 old;

	READ_AT(qlen, sk, OFF_ICSK_ACCEPT_QUEUE_QLEN);
	READ_AT(max_ack_backlog, sk, OFF_SK_MAX_ACK_BACKLOG);
	READ_AT(max_syn_backlog, net, OFF_NET_MAX_SYN_BACKLOG);
	READ_AT(syncookies, net, OFF_NET_TCP_SYNCOOKIES);
	listen_limit = qlen >= max_ack_backlog;
	syn_backlog_limit = !syncookies &&
			    (s64)max_syn_backlog - qlen < (s64)(max_syn_backlog >> 2);
	if (!listen_limit && !syn_backlog_limit)
		return 0;
	old = max_syn_backlog;
	send_sysctl_event(net_cookie(net), SCENARIO_SYN_BACKLOG_INCREASE,
			  TUNABLE_MAX_SYN_BACKLOG, &old, &old, 1, qlen);
	return 0;
}
#endif
