/* tcp_conn: choose each TCP connection's congestion control algorithm per remote host by
 * reinforcement learning, and switch a lossy connection to BBR.
 *
 * One sockops program (attached to bpftune's cgroup by the engine), nothing per packet:
 *  - ESTABLISHED: ask for STATE and RETRANS callbacks. For a host seen at least KNOWN_AFTER
 *    times, pick the algorithm with the lowest learned cost, or with probability 1/EPSILON
 *    one at random (epsilon-greedy), and set it with bpf_setsockopt(TCP_CONGESTION).
 *    Loopback connections are left alone: there is no path to learn (no queue, no loss),
 *    and they are many on some hosts (sidecars, local databases). Upstream learns them
 *    as one more host.
 *  - RETRANS: once retransmissions exceed 1/64 of the segments sent, by a connection that
 *    has sent data, switch to BBR (and, for a connection the learner did not choose for,
 *    thin linear timeouts where the sysctl has them off) and stop listening for
 *    retransmissions; tell userspace, at most once a second per host and
 *    LOSS_REPORTS_PER_SEC in all.
 *  - STATE to FIN_WAIT1 or CLOSE_WAIT, for a known host: score the connection's algorithm
 *    (read back from the socket): the cost is how far its min RTT is above the host's best
 *    and its delivery rate below the host's best (parts per million each), folded into the
 *    algorithm's learned cost. Its delivery rate and min RTT are also summed per host and
 *    algorithm, for userspace to verify a host's switch to BBR (verified changes).
 *  - A host whose switch to BBR made it worse is held (`bbr_hold`, set by userspace): its
 *    lossy connections are not switched until then.
 * Nothing is kept per connection: socket storage's first allocation on a socket is costly,
 * and without it this program's run time (bpf_stats, stress-ng --sock) fell from 6.0 to
 * 4.6 us per connection.
 * The host is the route's gateway for routed peers, else the peer itself (upstream keys
 * every on-link peer as ::ffff:0.0.0.0), within the connection's network namespace.
 * Callback flags are shared by every sockops program on a socket: only our bits change.
 *
 * Compiled with N_ALGS (algorithms, named in the `algorithms` map by userspace), ALG_BBR
 * (the index of bbr, or -1) and the tunable ids; with ADVISE (bpftune --advise) it changes
 * no socket: it learns from the connections as they are and reports the loss switches it
 * would make, for userspace to recommend.
 */
#include "bpftune.bpf.h"

#ifndef N_ALGS			/* compiled for another kernel: no algorithms known */
#define N_ALGS 1
#define ALG_BBR -1
#endif

#define MAX_ALGS 6
#define CA_NAME_LEN 16		/* TCP_CA_NAME_MAX */
#define KNOWN_AFTER 4		/* connections before a host's choices are learned ones */
#define EPSILON 20		/* explore one connection in 20 */
#define RL_SHIFT 2		/* learned cost moves 1/4 of the way to each new cost */
#define MILLION 1000000ULL
#define LOSS_REPORTS_PER_SEC 100
#define SOL_TCP 6
#define TCP_CONGESTION 13
#define TCP_THIN_LINEAR_TIMEOUTS 16
#define AF_INET 2
#define AF_INET6 10
#define RTF_GATEWAY 0x0002
#ifdef ADVISE
#define ADVISING 1
#else
#define ADVISING 0
#endif

struct host_key {
	u64 netns_cookie;
	u32 addr[4];		/* IPv6, or IPv4-mapped */
};

struct alg_state {
	u64 min_rtt;		/* µs, the least any of its connections saw */
	u64 max_rate;		/* bytes/s, the most any of its connections delivered */
	s64 metric;		/* learned cost, lower is better; 0 until measured */
	u64 count;		/* connections measured */
	u64 greedy;		/* of them, with no other algorithm's cost lower */
	u64 sum_rate;		/* their delivery rates (bytes/s), summed */
	u64 sum_rtt;		/* their min RTTs (µs), summed */
};

struct host_state {
	u64 min_rtt;
	u64 max_rate;
	u64 instances;		/* connections established */
	u64 bbr_switches;	/* connections switched to BBR for loss */
	u64 last_loss_report;	/* ns */
	struct alg_state algs[MAX_ALGS];
};

struct alg_name {
	char name[CA_NAME_LEN];
};

/* The event payload (TcpConnTuner.payload): a connection switched to BBR for loss. */
struct loss_report {
	u32 addr[4];		/* the peer */
	u32 host[4];		/* the host its learning belongs to (host_key.addr) */
	u32 family;
	s32 from_alg;		/* the algorithm it had (index in `algorithms`), or -1 */
	u64 switches;		/* the host's switches so far */
	u64 retrans;
	u64 segs_out;
};

BPF_TABLE("lru_hash", struct host_key, struct host_state, hosts, 1024);
BPF_ARRAY(algorithms, struct alg_name, MAX_ALGS);
BPF_PERCPU_ARRAY(choices, u64, MAX_ALGS);	/* connections set to each algorithm */
BPF_ARRAY(thin_timeouts, u64, 1);		/* connections given thin linear timeouts */
BPF_ARRAY(loss_budget, struct rate_window, 1);
/* Where a new host's state is made: on the stack, with the event a loss report builds,
 * it passes the 512 bytes BPF programs may use. */
BPF_PERCPU_ARRAY(host_space, struct host_state, 1);
/* namespaces handed over to an administrator (by a write to a tunable there) */
BPF_HASH(manual_netns, u64, u8, 4096);
/* hosts not switched to BBR on loss until then (ns, bpf_ktime_get_ns), set by userspace
 * when a switch made a host's connections clearly worse */
BPF_TABLE("lru_hash", struct host_key, u64, bbr_hold, 1024);

/* A kernel pointer, unlike ops->sk, allows reads at field offsets. */
static __always_inline void *kernel_sock(struct bpf_sock *sk)
{
	return (void *)bpf_skc_to_tcp_sock(sk);
}

static __always_inline bool v4_mapped(const u32 *a)
{
	return a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0xffff);
}

/* The connection's remote or local address (side: remote, local), IPv4 as IPv4-mapped
 * IPv6. Every field is read whatever the family: the verifier refuses a context access
 * the compiler folded into one computed offset, which volatile reads prevent. */
#define CTX_READ(field) (*(volatile typeof(field) *)&(field))
#define ADDRESS(ops, side, addr)							\
	do {										\
		u32 family = CTX_READ((ops)->family), ip4 = CTX_READ((ops)->side##_ip4);\
		u32 a0 = CTX_READ((ops)->side##_ip6[0]);				\
		u32 a1 = CTX_READ((ops)->side##_ip6[1]);				\
		u32 a2 = CTX_READ((ops)->side##_ip6[2]);				\
		u32 a3 = CTX_READ((ops)->side##_ip6[3]);				\
											\
		(addr)[0] = family == AF_INET ? 0 : a0;					\
		(addr)[1] = family == AF_INET ? 0 : a1;					\
		(addr)[2] = family == AF_INET ? bpf_htonl(0xffff) : a2;			\
		(addr)[3] = family == AF_INET ? ip4 : a3;				\
	} while (0)

/* Over loopback: to 127/8 or ::1, or to one of the host's own addresses (then the
 * connection's local address too). */
static __always_inline bool over_loopback(struct bpf_sock_ops *ops)
{
	u32 peer[4], local[4];

	ADDRESS(ops, remote, peer);
	if (v4_mapped(peer) && (bpf_ntohl(peer[3]) >> 24) == 127)
		return true;
	if (!peer[0] && !peer[1] && !peer[2] && peer[3] == bpf_htonl(1))
		return true;
	ADDRESS(ops, local, local);
	return peer[0] == local[0] && peer[1] == local[1] && peer[2] == local[2] &&
	       peer[3] == local[3];
}

/* The host a connection's learning belongs to: its route's gateway, or the peer. */
static __always_inline bool host_of(struct bpf_sock_ops *ops, void *sk, struct host_key *key)
{
	void *dst = NULL;
	u8 gw_family = 0;
	u32 flags = 0;

	if (!sk)
		return false;
	key->netns_cookie = net_cookie(sk_net(sk));
	ADDRESS(ops, remote, key->addr);
	READ_AT(dst, sk, OFF_SK_DST_CACHE);
	if (!dst)
		return true;
	if (v4_mapped(key->addr)) {
		READ_AT(gw_family, dst, OFF_RT_GW_FAMILY);
		if (gw_family == AF_INET)
			READ_AT(key->addr[3], dst, OFF_RT_GW4);
	} else {
		READ_AT(flags, dst, OFF_RT6_FLAGS);
		if (flags & RTF_GATEWAY)
			READ_AT(key->addr, dst, OFF_RT6_GATEWAY);
	}
	return true;
}

static __always_inline void set_flags(struct bpf_sock_ops *ops, u32 on, u32 off)
{
	bpf_sock_ops_cb_flags_set(ops, (ops->bpf_sock_ops_cb_flags | on) & ~off);
}

/* The socket's algorithm's index in `algorithms`, or -1: its name, read from the socket's
 * tcp_congestion_ops (cheaper than bpf_getsockopt(TCP_CONGESTION), which locks nothing
 * more but goes through the sockopt dispatch). Names are zero-padded in both. */
static __always_inline s32 current_algorithm(struct bpf_sock *bsk)
{
	struct alg_name now = {};
	u64 *a = (u64 *)now.name, *b;
	void *sk = kernel_sock(bsk), *ca_ops = NULL;

	if (!sk)
		return -1;
	READ_AT(ca_ops, sk, OFF_ICSK_CA_OPS);
	if (!ca_ops || READ_AT(now.name, ca_ops, OFF_CA_NAME))
		return -1;
#pragma unroll
	for (int i = 0; i < MAX_ALGS; i++) {
		u32 index = i;	/* not &i: a loop counter in memory is not unrolled */
		struct alg_name *name = algorithms.lookup(&index);

		if (i >= N_ALGS || !name)
			break;
		b = (u64 *)name->name;
		if (a[0] == b[0] && a[1] == b[1])
			return i;
	}
	return -1;
}

/* Give the connection algorithm `alg`, unless it has it already (most connections keep the
 * default, and two reads cost less than a setsockopt). */
static __always_inline int set_algorithm(struct bpf_sock_ops *ops, struct bpf_sock *bsk,
					 s32 alg)
{
	u32 index = alg;
	struct alg_name *name = algorithms.lookup(&index);
	u64 *chosen;
	int err = 0;

	if (!name || ADVISING)
		return -1;
	if (current_algorithm(bsk) != alg)
		err = bpf_setsockopt(ops, SOL_TCP, TCP_CONGESTION, name->name, CA_NAME_LEN);
	chosen = choices.lookup(&index);
	if (!err && chosen)
		(*chosen)++;
	return err;
}

/* The algorithm with the lowest learned cost (ties broken at random), and with
 * probability 1/EPSILON any one at random. */
static __always_inline s32 choose(struct host_state *host)
{
	s32 best = 0, ties = 0;
	s64 least = 0;

#pragma unroll
	for (int i = 0; i < MAX_ALGS; i++) {
		if (i >= N_ALGS)
			break;
		if (i == 0 || host->algs[i].metric < least) {
			best = i;
			least = host->algs[i].metric;
			ties = 1;
		} else if (host->algs[i].metric == least && bpf_get_prandom_u32() % ++ties == 0) {
			best = i;
		}
	}
	if (bpf_get_prandom_u32() % EPSILON == 0)
		best = bpf_get_prandom_u32() % N_ALGS;
	return best;
}

static __always_inline void established(struct bpf_sock_ops *ops, struct bpf_sock *bsk)
{
	struct host_state *host, *fresh;
	struct host_key key = {};
	void *sk = kernel_sock(bsk);
	int zero = 0;

	if (over_loopback(ops) || !host_of(ops, sk, &key) ||
	    manual_netns.lookup(&key.netns_cookie))
		return;
	set_flags(ops, BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RETRANS_CB_FLAG, 0);
	host = hosts.lookup(&key);
	if (!host) {
		fresh = host_space.lookup(&zero);
		if (fresh) {
			__builtin_memset(fresh, 0, sizeof(*fresh));
			fresh->instances = 1;
			hosts.update(&key, fresh);
		}
		return;
	}
	if (__sync_fetch_and_add(&host->instances, 1) + 1 >= KNOWN_AFTER)
		set_algorithm(ops, bsk, choose(host));
}

/* The learner chooses for a host's connections once it has seen it KNOWN_AFTER times. */
static __always_inline bool known(struct host_state *host)
{
	return host && host->instances >= KNOWN_AFTER;
}

static __always_inline void report_loss(struct bpf_sock_ops *ops, struct host_key *key,
					struct host_state *host, s32 from_alg)
{
	struct loss_report report = {};
	u64 now = bpf_ktime_get_ns();
	int zero = 0;
	s64 none = 0;

	if (now - host->last_loss_report < 1000000000ULL ||
	    over_budget(loss_budget.lookup(&zero), LOSS_REPORTS_PER_SEC))
		return;
	host->last_loss_report = now;
	ADDRESS(ops, remote, report.addr);
	__builtin_memcpy(report.host, key->addr, sizeof(report.host));
	report.family = ops->family;
	report.from_alg = from_alg;
	report.switches = host->bbr_switches;
	report.retrans = ops->total_retrans;
	report.segs_out = ops->segs_out;
	send_event_with(NO_PID, key->netns_cookie, SCENARIO_BBR_ON_LOSS, TUNABLE_PER_SOCKET,
			&none, &none, 0, ALG_BBR, &report, sizeof(report));
}

static __always_inline void retransmitted(struct bpf_sock_ops *ops, struct bpf_sock *bsk)
{
	struct host_key key = {};
	struct host_state *host = NULL;
	int zero = 0, thin = 1;
	u64 *thinned, *until;
	s32 was;

	if (ALG_BBR < 0 || ops->total_retrans <= ops->segs_out >> 6)
		return;
	/* A connection that has sent no data retransmitted its SYN-ACK or FIN: a receiver,
	 * with nothing for congestion control to pace, whose switch would be judged by its
	 * ACKs' delivery rate. Upstream switches it too. Undecided until it sends data. */
	if (ops->data_segs_out == 0)
		return;
	set_flags(ops, 0, BPF_SOCK_OPS_RETRANS_CB_FLAG);	/* decided, once */
	was = current_algorithm(bsk);
	if (was == ALG_BBR)
		return;
	if (host_of(ops, kernel_sock(bsk), &key))
		host = hosts.lookup(&key);
	/* thin timeouts for a connection the learner did not choose for, as upstream */
	if (!ADVISING && !known(host) && tunable_value(TUNABLE_THIN_LINEAR_TIMEOUTS, 0) == 0 &&
	    bpf_setsockopt(ops, SOL_TCP, TCP_THIN_LINEAR_TIMEOUTS, &thin, sizeof(thin)) == 0) {
		thinned = thin_timeouts.lookup(&zero);
		if (thinned)
			__sync_fetch_and_add(thinned, 1);
	}
	until = bbr_hold.lookup(&key);
	if (until && bpf_ktime_get_ns() < *until)
		return;
	if ((set_algorithm(ops, bsk, ALG_BBR) != 0 && !ADVISING) || !host)
		return;
	__sync_fetch_and_add(&host->bbr_switches, 1);
	report_loss(ops, &key, host, was);
}

/* v moves 1/2^RL_SHIFT of the way to gain (upstream's rl_update). */
static __always_inline s64 rl_update(s64 v, s64 gain)
{
	return v == 0 ? gain : v + ((gain - v) >> RL_SHIFT);
}

/* Whether no algorithm has a lower learned cost than `alg` (upstream's "greedy"). */
static __always_inline bool least_cost(struct host_state *host, u32 alg)
{
	s64 cost;

	if (alg >= MAX_ALGS)
		return false;
	cost = host->algs[alg].metric;
#pragma unroll
	for (int i = 0; i < MAX_ALGS; i++)
		if (i < N_ALGS && host->algs[i].metric < cost)
			return false;
	return true;
}

/* A socket reaches FIN_WAIT1 or CLOSE_WAIT once (a simultaneous close goes on to CLOSING,
 * a passive one to LAST_ACK), so each connection is scored once. */
static __always_inline void closing(struct bpf_sock_ops *ops, struct bpf_sock *bsk)
{
	struct host_key key = {};
	struct host_state *host;
	struct alg_state *a;
	u64 rtt = ops->rtt_min, rate = 0;
	s64 cost = 0;
	s32 alg;

	if (!host_of(ops, kernel_sock(bsk), &key))
		return;
	host = hosts.lookup(&key);
	if (!known(host))
		return;
	alg = current_algorithm(bsk);
	if (alg < 0 || alg >= MAX_ALGS)
		return;
	if (ops->rate_interval_us)
		rate = (u64)ops->rate_delivered * ops->mss_cache * MILLION / ops->rate_interval_us;
	if (!host->min_rtt || rtt < host->min_rtt)
		host->min_rtt = rtt;
	if (rate > host->max_rate)
		host->max_rate = rate;
	a = &host->algs[alg];
	if (!a->min_rtt || rtt < a->min_rtt)
		a->min_rtt = rtt;
	if (rate > a->max_rate)
		a->max_rate = rate;
	/* Upstream scores the algorithm's best rate, not this connection's: a bad connection
	 * then never costs the algorithm anything for its rate. */
	if (host->min_rtt)
		cost += (s64)((rtt - host->min_rtt) * MILLION / host->min_rtt);
	if (host->max_rate)
		cost += (s64)((host->max_rate - rate) * MILLION / host->max_rate);
	if (least_cost(host, alg))
		a->greedy++;
	a->metric = rl_update(a->metric, cost);
	a->count++;
	a->sum_rate += rate;
	a->sum_rtt += rtt;
}

int conn_tuner(struct bpf_sock_ops *ops)
{
	struct bpf_sock *sk = ops->sk;

	if (!sk)
		return 1;
	switch (ops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		established(ops, sk);
		break;
	case BPF_SOCK_OPS_RETRANS_CB:
		retransmitted(ops, sk);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (ops->args[1] == BPF_TCP_FIN_WAIT1 || ops->args[1] == BPF_TCP_CLOSE_WAIT)
			closing(ops, sk);
		break;
	}
	return 1;
}
