/* tcp_buffer: notice when TCP connections' buffers approach the tcp_rmem/tcp_wmem maximum,
 * when TCP memory approaches tcp_mem pressure/exhaustion, and when a listener's SYN queue
 * approaches tcp_max_syn_backlog. Decisions are made here; events are sent only when a
 * limit is nearly reached, at most one per (netns, tunable) per 25 ms.
 *
 * Hooks are tracepoints only (no fentry/kprobes on our kernels); kernel struct fields are
 * read at BTF-resolved OFF_* offsets.
 */
#include "bpftune.bpf.h"

/* Tunable ids: positions in TcpBufferTuner.tunables. */
enum { TCP_WMEM, TCP_RMEM, TCP_MEM, TCP_MAX_SYN_BACKLOG = 8 };
/* Scenario ids: positions in TcpBufferTuner.scenarios. */
enum { NEED_INCREASE = 0, MEM_PRESSURE = 3, MEM_EXHAUSTION = 4, SYN_BACKLOG_INCREASE = 8 };
enum { MEM_NORMAL, MEM_NEAR_PRESSURE, MEM_NEAR_EXHAUSTION };

#define SOCK_SNDBUF_LOCK 1
/* sendmsg and receive-space adjustments are hot paths: look at one call in SAMPLE_EVERY
 * (per CPU). A connection that fills its buffer keeps doing so, so little is missed. */
#define SAMPLE_EVERY 16
#define SOCK_RCVBUF_LOCK 2
#define TCP_INT_MAX 2147483647
#define SOCK_STREAM_TYPE 1
#define PROTO_TCP 6	/* IPPROTO_TCP; BCC tracepoint programs do not see the uapi enum */

BPF_PERCPU_ARRAY(hot_path_calls, u64, 1);

static __always_inline bool sampled(void)
{
	int zero = 0;
	u64 *calls = hot_path_calls.lookup(&zero);

	return calls && ((*calls)++ & (SAMPLE_EVERY - 1)) == 0;
}

/* Compare TCP memory in use with tcp_mem (global, so reported for the global netns);
 * propose growing it when nearly at a limit. Userspace applies the RAM-based ceilings. */
static __always_inline u32 check_memory(s64 allocated, s64 *mem)
{
	s64 new[3];

	if (NEARLY_FULL(allocated, mem[2])) {
		new[0] = mem[0];
		new[1] = mem[1];
		new[2] = GROW(mem[2]);
		send_sysctl_event(0, MEM_EXHAUSTION, TCP_MEM, mem, new, 3, allocated);
		return MEM_NEAR_EXHAUSTION;
	}
	if (NEARLY_FULL(allocated, mem[1])) {
		new[0] = GROW(mem[0]);
		new[1] = GROW(mem[1]);
		new[2] = GROW(mem[2]);
		send_sysctl_event(0, MEM_PRESSURE, TCP_MEM, mem, new, 3, allocated);
		return MEM_NEAR_PRESSURE;
	}
	return MEM_NORMAL;
}

static __always_inline u32 check_socket_memory(void *sk)
{
	void *prot = NULL, *allocated_ptr = NULL, *mem_ptr = NULL;
	s64 allocated = 0, mem[3] = {};

	READ_AT(prot, sk, OFF_SK_PROT);
	READ_AT(allocated_ptr, prot, OFF_PROTO_MEMORY_ALLOCATED);
	READ_AT(mem_ptr, prot, OFF_PROTO_SYSCTL_MEM);
	if (!allocated_ptr || !mem_ptr)
		return MEM_NORMAL;
	bpf_probe_read_kernel(&allocated, sizeof(allocated), allocated_ptr);
	bpf_probe_read_kernel(mem, sizeof(mem), mem_ptr);
	return check_memory(allocated, mem);
}

/* Propose a bigger max for tcp_rmem/tcp_wmem if this socket's buffer is nearly at it. */
static __always_inline void check_buffer(void *sk, int buf, u32 tunable, u32 net_offset)
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
	send_sysctl_event(net_cookie(net), NEED_INCREASE, tunable, old, new, 3, srtt_us >> 3);
}

/* Called as the receiver consumes data: the receive buffer is being auto-tuned.
 * The two hot hooks are raw tracepoints: no trace record is built for them, which halves
 * their cost on every recvmsg/sendmsg (measured with stress-ng --sock). */
RAW_TRACEPOINT_PROBE(tcp_rcv_space_adjust)
{
	void *sk = (void *)ctx->args[0];
	u8 userlocks = 0;
	int rcvbuf = 0;

	if (!sampled() || check_socket_memory(sk) != MEM_NORMAL)
		return 0;
	READ_AT(userlocks, sk, OFF_SK_USERLOCKS);
	if (userlocks & SOCK_RCVBUF_LOCK)	/* application chose SO_RCVBUF itself */
		return 0;
	READ_AT(rcvbuf, sk, OFF_SK_RCVBUF);
	check_buffer(sk, rcvbuf, TCP_RMEM, OFF_NET_TCP_RMEM);
	return 0;
}

/* Called for every sendmsg(sk, ret, flags); only TCP sockets that sent data matter. */
RAW_TRACEPOINT_PROBE(sock_send_length)
{
	void *sk = (void *)ctx->args[0];
	int sent = (int)ctx->args[1];
	u16 protocol = 0, type = 0;
	u8 userlocks = 0;
	int sndbuf = 0;

	if (sent <= 0 || !sampled())
		return 0;
	READ_AT(protocol, sk, OFF_SK_PROTOCOL);
	READ_AT(type, sk, OFF_SK_TYPE);
	if (protocol != PROTO_TCP || type != SOCK_STREAM_TYPE)	/* not raw IPPROTO_TCP sockets */
		return 0;
	if (check_socket_memory(sk) != MEM_NORMAL)
		return 0;
	READ_AT(userlocks, sk, OFF_SK_USERLOCKS);
	if (userlocks & SOCK_SNDBUF_LOCK)
		return 0;
	READ_AT(sndbuf, sk, OFF_SK_SNDBUF);
	check_buffer(sk, sndbuf, TCP_WMEM, OFF_NET_TCP_WMEM);
	return 0;
}

/* The kernel refused socket memory: TCP is at pressure or at the tcp_mem hard limit. */
TRACEPOINT_PROBE(sock, sock_exceed_buf_limit)
{
	s64 mem[3];

	if (args->name[0] != 'T' || args->name[1] != 'C' || args->name[2] != 'P')
		return 0;
	mem[0] = args->sysctl_mem[0];
	mem[1] = args->sysctl_mem[1];
	mem[2] = args->sysctl_mem[2];
	check_memory(args->allocated, mem);
	return 0;
}

/* A listener retransmits a SYN-ACK: half-open connections are piling up. If the SYN queue
 * is nearly at tcp_max_syn_backlog (and not limited by the listen backlog instead), the
 * backlog is what drops new connections. */
TRACEPOINT_PROBE(tcp, tcp_retransmit_synack)
{
	void *sk = (void *)args->skaddr;
	void *net = sk_net(sk);
	u32 qlen = 0, max_ack_backlog = 0;
	int max_syn_backlog = 0;
	s64 old, new;

	READ_AT(qlen, sk, OFF_ICSK_ACCEPT_QUEUE_QLEN);
	READ_AT(max_ack_backlog, sk, OFF_SK_MAX_ACK_BACKLOG);
	READ_AT(max_syn_backlog, net, OFF_NET_MAX_SYN_BACKLOG);
	if (!NEARLY_FULL((s64)qlen, (s64)max_syn_backlog) || qlen >= max_ack_backlog)
		return 0;
	old = max_syn_backlog;
	new = GROW(old);
	send_sysctl_event(net_cookie(net), SYN_BACKLOG_INCREASE, TCP_MAX_SYN_BACKLOG,
			  &old, &new, 1, qlen);
	return 0;
}
