/* ip_frag: notice when a network namespace's IP reassembly memory (fqdir->mem) nears its
 * limit (fqdir->high_thresh, the ipfrag_high_thresh / ip6frag_high_thresh sysctls) and
 * propose a higher limit, in that namespace. Userspace decides (reassembly failure rates).
 *
 * Hooks (IpFragTuner.watches), best first:
 * - fentry ip_defrag / ipv6_frag_rcv: every fragment received, before it is queued, so the
 *   limit is raised before reassembly fails (as upstream).
 * - raw tracepoint kfree_skb: a fragment refused because reassembly memory is over the
 *   limit is freed by ip_defrag / ipv6_frag_rcv itself (inet_frag_find returns NULL, the
 *   caller calls kfree_skb), so the drop's code address (`location`) lies inside that
 *   function. Userspace passes each function's address range from /proc/kallsyms as
 *   IP_DEFRAG_START/END and IPV6_FRAG_RCV_START/END; a drop anywhere else costs two
 *   compares. The drop happens once the limit is exceeded: this reacts to the first
 *   reassembly failure, not before it. With no range (kallsyms hidden), any dropped packet
 *   of the family leads to the memory check.
 * The memory check itself (NEARLY_FULL) is the same for all hooks, so a drop in those
 * functions for another reason (bad fragment) sends nothing unless memory is nearly full.
 */
#include "bpftune.bpf.h"

#ifndef IP_DEFRAG_START		/* not known: compiled for another kernel, or kallsyms hidden */
#define IP_DEFRAG_START 0ULL
#define IP_DEFRAG_END 0ULL
#endif
#ifndef IPV6_FRAG_RCV_START
#define IPV6_FRAG_RCV_START 0ULL
#define IPV6_FRAG_RCV_END 0ULL
#endif

/* skb->protocol is big-endian (ETH_P_IP, ETH_P_IPV6) */
#define BE16(x) (__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ ? __builtin_bswap16(x) : (x))
#define PROTO_IP BE16(0x0800)
#define PROTO_IPV6 BE16(0x86DD)

/* Propose a larger high_thresh if this namespace's reassembly memory for one family is
 * nearly at it. */
static __always_inline void check_fqdir(void *net, u32 fqdir_offset, u32 tunable)
{
	void *fqdir = NULL;
	s64 mem = 0, high = 0, new;

	if (!net)
		return;
	READ_AT(fqdir, net, fqdir_offset);
	if (!fqdir)
		return;
	READ_AT(high, fqdir, OFF_FQDIR_HIGH_THRESH);
	READ_AT(mem, fqdir, OFF_FQDIR_MEM);
	/* high_thresh is 0 while the namespace is being dismantled (fqdir_pre_exit) */
	if (high <= 0 || !NEARLY_FULL(mem, high))
		return;
	new = GROW(high);
	send_sysctl_event(net_cookie(net), SCENARIO_NEED_INCREASE, tunable, &high, &new, 1, mem);
}

/* The namespace of a received packet: its device's. */
static __always_inline void *skb_net(void *skb)
{
	void *dev = NULL, *net = NULL;

	READ_AT(dev, skb, OFF_SKB_DEV);
	if (dev)
		READ_AT(net, dev, OFF_DEV_NET);
	return net;
}

#ifdef HOOK_FENTRY_ip_defrag
KFUNC_PROBE(ip_defrag, void *net, void *skb, u32 user)
{
	check_fqdir(net, OFF_NET_IPV4_FQDIR, TUNABLE_HIGH_THRESH);
	return 0;
}
#endif

#ifdef HOOK_FENTRY_ipv6_frag_rcv
KFUNC_PROBE(ipv6_frag_rcv, void *skb)
{
	check_fqdir(skb_net(skb), OFF_NET_IPV6_FQDIR, TUNABLE_HIGH_THRESH6);
	return 0;
}
#endif

#ifdef HOOK_RAW_TP_kfree_skb
/* Was the packet freed inside [start, end), or, with no range known, is it of `protocol`? */
static __always_inline bool dropped_in(u64 at, u64 start, u64 end, void *skb, u16 protocol)
{
	u16 skb_protocol = 0;

	if (end)
		return at >= start && at < end;
	READ_AT(skb_protocol, skb, OFF_SKB_PROTOCOL);
	return skb_protocol == protocol;
}

RAW_TRACEPOINT_PROBE(kfree_skb)	/* (skb, location, reason[, sk]): every dropped packet */
{
	void *skb = (void *)ctx->args[0];
	u64 at = ctx->args[1];

#ifndef HOOK_FENTRY_ip_defrag
	if (dropped_in(at, IP_DEFRAG_START, IP_DEFRAG_END, skb, PROTO_IP)) {
		check_fqdir(skb_net(skb), OFF_NET_IPV4_FQDIR, TUNABLE_HIGH_THRESH);
		return 0;
	}
#endif
#ifndef HOOK_FENTRY_ipv6_frag_rcv
	if (dropped_in(at, IPV6_FRAG_RCV_START, IPV6_FRAG_RCV_END, skb, PROTO_IPV6))
		check_fqdir(skb_net(skb), OFF_NET_IPV6_FQDIR, TUNABLE_HIGH_THRESH6);
#endif
	return 0;
}
#endif
