/* udp_buffer: notice UDP datagrams dropped because a socket's receive buffer was full (the
 * socket's buffer came from net.core.rmem_default, or from SO_RCVBUF capped by
 * net.core.rmem_max) or because UDP as a whole reached net.ipv4.udp_mem. Decisions are made
 * here; an event is sent only for a drop that a bigger limit would have avoided, at most one
 * per (netns, tunable) per 25 ms.
 *
 * UdpBufferTuner.watches says which hook serves each watch on this kernel (HOOK_* defines);
 * TUNABLE_* and SCENARIO_* ids and SAMPLE_* slots come from the Python declarations,
 * DROP_PROTO_MEM from this kernel's BTF. Kernel struct fields are read at BTF-resolved
 * offsets.
 */
#include "bpftune.bpf.h"

#define UDP_ENOMEM (-12)	/* the socket's receive buffer is full */
#define UDP_ENOBUFS (-105)	/* UDP memory (udp_mem) refused the datagram */
#define SOCK_RCVBUF_LOCK 2
#define PROTO_UDP 17
#define PROTO_UDPLITE 136

/* buf was capped by limit, and growing limit by the learning-rate step would have given it
 * more room. Once limit has grown, the same socket no longer qualifies (its buffer stays
 * what it was at creation or setsockopt), so one stuck socket cannot drive the limit up
 * step after step; a buffer above the limit (SO_RCVBUFFORCE) was not capped by it. */
#define LIMITED_BY(buf, limit) ((buf) <= (limit) && (buf) + ((buf) >> LEARNING_SHIFT) > (limit))

/* A datagram did not fit in the socket's receive buffer. A socket that set SO_RCVBUF has
 * twice min(asked, rmem_max) as its buffer; any other socket got rmem_default when it was
 * created. Propose growing the limit that capped this socket. rmem_* are global and not
 * struct fields: the engine publishes their values (tunable_value). */
static __always_inline void receive_buffer_full(void *sk)
{
	u8 userlocks = 0;
	int rcvbuf = 0;
	u32 tunable = TUNABLE_RMEM_DEFAULT;
	s64 old, new;

	READ_AT(rcvbuf, sk, OFF_SK_RCVBUF);
	READ_FIELD(userlocks, sk, SK_USERLOCKS);
	if (userlocks & SOCK_RCVBUF_LOCK) {
		tunable = TUNABLE_RMEM_MAX;
		rcvbuf >>= 1;
	}
	old = tunable_value(tunable, 0);
	if (!LIMITED_BY((s64)rcvbuf, old))
		return;
	new = GROW(old);
	send_sysctl_event(net_cookie(sk_net(sk)), SCENARIO_NEED_INCREASE, tunable, &old, &new, 1,
			  rcvbuf);
}

/* UDP memory refused a datagram. UDP has no memory-pressure state: above udp_mem[0] the
 * kernel refuses memory to every socket holding udp_rmem_min or more, so [0] is the limit
 * that drops. Below it, a memory cgroup's limit refused it: nothing udp_mem can do.
 * udp_mem is global, so the event is for the global netns. All three values are proposed
 * grown; userspace keeps each one that is at its ceiling as it is. */
static __always_inline void udp_memory_full(void *sk)
{
	s64 allocated = 0, mem[3] = {}, new[3];
	u32 scenario;

	if (!proto_memory(sk, &allocated, mem))
		return;
	if (NEARLY_FULL(allocated, mem[2]))
		scenario = SCENARIO_MEM_EXHAUSTION;
	else if (NEARLY_FULL(allocated, mem[0]))
		scenario = SCENARIO_MEM_PRESSURE;
	else
		return;
	new[0] = GROW(mem[0]);
	new[1] = GROW(mem[1]);
	new[2] = GROW(mem[2]);
	send_sysctl_event(0, scenario, TUNABLE_UDP_MEM, mem, new, 3, allocated);
}

/* Every datagram a UDP socket fails to queue (IPv4 and IPv6). Both failures come once per
 * datagram under load, so one call in 16 per CPU is looked at. */
#ifdef HOOK_RAW_TP_udp_fail_queue_rcv_skb
RAW_TRACEPOINT_PROBE(udp_fail_queue_rcv_skb)	/* (rc, sk[, skb]) */
{
	int rc = (int)ctx->args[0];
	void *sk = (void *)ctx->args[1];

	if (!sk)
		return 0;
	if (rc == UDP_ENOMEM && sampled_in(SAMPLE_UDP_RCVBUF))
		receive_buffer_full(sk);
	else if (rc == UDP_ENOBUFS && sampled_in(SAMPLE_UDP_MEM))
		udp_memory_full(sk);	/* before Linux 6.18 only: see below */
	return 0;
}
#endif

/* Linux 6.18 queues datagrams through per-NUMA lists and drops those udp_mem refuses inside
 * the enqueue: no udp_fail_queue_rcv_skb, no SNMP counter, only kfree_skb with
 * SKB_DROP_REASON_PROTO_MEM and the socket. kfree_skb fires for every dropped skb, so the
 * reason is checked first. */
#ifdef HOOK_RAW_TP_kfree_skb
RAW_TRACEPOINT_PROBE(kfree_skb)	/* (skb, location, reason, sk) */
{
	void *sk = (void *)ctx->args[3];
	u16 protocol = 0;

	if ((int)ctx->args[2] != DROP_PROTO_MEM || !sk)
		return 0;
	READ_AT(protocol, sk, OFF_SK_PROTOCOL);
	/* sampled after the protocol check, so TCP's drops do not use up UDP's samples */
	if ((protocol == PROTO_UDP || protocol == PROTO_UDPLITE) && sampled_in(SAMPLE_UDP_MEM))
		udp_memory_full(sk);
	return 0;
}
#endif
