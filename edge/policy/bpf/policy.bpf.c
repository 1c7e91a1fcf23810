// The network policy datapath: cgroup_skb programs for egress and ingress.
//
// Attached once at the cgroup v2 root; every packet of a socket in a cgroup that a
// policy selects (or one below it) is judged against the rule tables that
// edge/policy/tables.py compiles from the policy, the same rule list as the reference
// evaluator (edge/policy/evaluator.py), first match wins:
//
//   W = OR of the workload bitmaps of the socket's ancestor cgroups (levels in
//       gens[gen].levels); nothing found: not policed, the packet passes
//   A = longest-prefix match of the remote address (addr4 / addr6)
//   P = longest-prefix match of (IP protocol, port) (ports)
//   C = A & P & W[direction]; rule n is bit n-1
//   e = lowest bit of C & enforce: a deny drops the packet
//   f = lowest bit of C: a deny is an audit would-drop (reported, passes)
//
// Verdicts are per connection in the direction it was opened: a TCP socket that sent a
// SYN without ACK opened it outwards (egress: the remote port counts); any other TCP
// socket was opened by the remote end (ingress: the local port counts). UDP and other
// sockets were opened by their first packet's direction. That is noted for every socket
// below the attachment, policed or not (yet), so a connection opened before a policy
// selected its workload keeps its direction. ICMP goes by the message: a request (or
// any message but a reply or an error) opens an exchange in its own direction, a reply
// or an error belongs to one opened the other way. Replies are judged as part of their
// connection, by the rules of its direction, so a policy update applies to open
// connections at once.
//
// Updates are atomic: the tables hold two generations (the gen in every key); user
// space fills the inactive one and then flips `active`. A packet reads `active` once.
//
// A socket remembers the rule that let its last packet pass (an allow, or an audit
// would-drop) in sk storage, with the epoch of the tables (one more at every update)
// and the packet's addresses and ports: a packet of the same flow under the same epoch
// is counted against that rule without the lookups (and an audit would-drop is
// reported once per flow, for its first packet, which is what enforce would drop). A
// TCP SYN (a new connection) is always judged in full, and so is every dropped packet.
//
// Built by edge/policy/bpf/build.sh with clang -target bpfel and loaded through libbpf
// (edge/policy/libbpf.py); or compiled at run time by bcc (edge/policy/bpf/bcc_load.py,
// which defines BCC_SEC through bcc's own helpers and map macros). UAPI only (no kernel
// structs), so no CO-RE is needed.
#ifdef BCC_SEC
#define SEC(name)         // bcc gives each function its own section
#define ARRAY(name, V, n) BPF_ARRAY(name, V, n)
#define PERCPU_ARRAY(name, V, n) BPF_PERCPU_ARRAY(name, V, n)
#define HASH(name, K, V, n) BPF_HASH(name, K, V, n)
#define LPM_TRIE(name, K, V, n) BPF_LPM_TRIE(name, K, V, n)
#define SK_STORAGE(name, V) \
        BPF_F_TABLE("sk_storage", int, V, name, 0, BPF_F_NO_PREALLOC | BPF_F_CLONE)
#define RINGBUF(name, pages) BPF_RINGBUF_OUTPUT(name, pages)
// (bcc_load.py writes LOOKUP(m, k) as m.lookup(k) and so on before bcc sees the text:
// bcc rewrites map calls of that form only, and not from macros)
#else
#include <linux/bpf.h>

#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int (*name)[val]
#define __type(name, val) __typeof__(val) *name
#define MAP(kind, name, K, V, n, flags) struct { \
        __uint(type, kind); __uint(max_entries, n); __uint(map_flags, flags); \
        __type(key, K); __type(value, V); } name SEC(".maps")
#define ARRAY(name, V, n) MAP(BPF_MAP_TYPE_ARRAY, name, __u32, V, n, 0)
#define PERCPU_ARRAY(name, V, n) MAP(BPF_MAP_TYPE_PERCPU_ARRAY, name, __u32, V, n, 0)
#define HASH(name, K, V, n) MAP(BPF_MAP_TYPE_HASH, name, K, V, n, 0)
#define LPM_TRIE(name, K, V, n) MAP(BPF_MAP_TYPE_LPM_TRIE, name, K, V, n, BPF_F_NO_PREALLOC)
#define SK_STORAGE(name, V) \
        MAP(BPF_MAP_TYPE_SK_STORAGE, name, int, V, 0, BPF_F_NO_PREALLOC | BPF_F_CLONE)
#define RINGBUF(name, pages) struct { \
        __uint(type, BPF_MAP_TYPE_RINGBUF); __uint(max_entries, (pages) * 4096); } name \
        SEC(".maps")

static void *(*bpf_map_lookup_elem)(void *map, const void *key) =
    (void *)BPF_FUNC_map_lookup_elem;
static long (*bpf_skb_load_bytes)(const void *skb, __u32 offset, void *to, __u32 len) =
    (void *)BPF_FUNC_skb_load_bytes;
static __u64 (*bpf_skb_ancestor_cgroup_id)(void *skb, int level) =
    (void *)BPF_FUNC_skb_ancestor_cgroup_id;
static __u64 (*bpf_skb_cgroup_id)(void *skb) = (void *)BPF_FUNC_skb_cgroup_id;
static struct bpf_sock *(*bpf_sk_fullsock)(struct bpf_sock *sk) =
    (void *)BPF_FUNC_sk_fullsock;
static void *(*bpf_sk_storage_get)(void *map, void *sk, void *value, __u64 flags) =
    (void *)BPF_FUNC_sk_storage_get;
static long (*bpf_ringbuf_output)(void *ringbuf, void *data, __u64 size, __u64 flags) =
    (void *)BPF_FUNC_ringbuf_output;
static __u64 (*bpf_ktime_get_ns)(void) = (void *)BPF_FUNC_ktime_get_ns;
#define LOOKUP(map, key) bpf_map_lookup_elem(&map, key)
#define SK_STORAGE_GET(map, sk, flags) bpf_sk_storage_get(&map, sk, 0, flags)
#define RINGBUF_OUTPUT(map, data, size) bpf_ringbuf_output(&map, data, size, 0)
#endif

#define INLINE static inline __attribute__((always_inline))
#ifdef BCC_SEC  // bcc loads one function per program: no calls between them
#define GLOBAL INLINE
#else           // verified once, on its own, not once per path into it
#define GLOBAL __attribute__((noinline))
#endif

#define MAX_RULES 256
#define MAX_LEVEL 32
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define IPPROTO_ICMP 1
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define IPPROTO_ICMPV6 58
#define SOCK_STREAM 1
#define TCP_SYN_SENT 2        // enum tcp_state (BPF_TCP_SYN_SENT)
#define TCP_SYN 0x02
#define TCP_ACK 0x10

enum { OPENED_UNKNOWN = 0, OPENED_EGRESS = 1, OPENED_INGRESS = 2 };
enum { VERDICT_DROP = 1, VERDICT_WOULD_DROP = 2 };
enum { STAT_EVENTS_LOST = 0, STAT_UNMATCHED = 1, STAT_UNPARSED = 2, STAT_COUNT = 4 };

struct bits {
    __u64 w[MAX_RULES / 64];
};

struct gen_info {             // gens[gen]: the rules' actions and modes
    struct bits deny;         // rules that deny
    struct bits enforce;      // rules in force (failsafe, enforce-mode policies)
    __u32 levels;             // bit L: some selected workload is at cgroup level L
    __u32 rules;              // how many rules (ids 1..rules)
    __u32 epoch;              // one more at every update (never 0)
};

struct addr4_key {            // LPM: prefixlen = 32 (gen) + address prefix
    __u32 prefixlen;
    __u32 gen;
    __u8 addr[4];
};

struct addr6_key {
    __u32 prefixlen;
    __u32 gen;
    __u8 addr[16];
};

struct port_key {             // LPM: prefixlen = 32 (gen) + 8 (protocol) + port prefix
    __u32 prefixlen;
    __u32 gen;
    __u8 proto;
    __u8 port[2];             // big endian
    __u8 pad;
};

struct workload_key {
    __u64 cgroup;             // cgroup v2 id (the inode number of its directory)
    __u32 gen;
    __u32 pad;
};

struct workload_val {
    struct bits egress;
    struct bits ingress;
};

struct counter {              // per rule, per CPU
    __u64 packets;
    __u64 bytes;              // at the IP layer (skb->len)
};

struct event {                // one drop or would-drop, for the ring
    __u64 ts_ns;              // CLOCK_MONOTONIC
    __u64 cgroup;             // the socket's cgroup id
    __u32 gen;
    __u16 rule;               // rule id (1-based) in generation gen
    __u8 verdict;             // VERDICT_DROP or VERDICT_WOULD_DROP
    __u8 direction;           // the connection's: OPENED_EGRESS or OPENED_INGRESS
    __u8 packet_ingress;      // 1: the packet was coming in
    __u8 family;              // 4 or 6
    __u8 proto;               // IP protocol number
    __u8 pad;
    __u16 port;               // the rule's port: remote for egress, local for ingress
    __u16 pad2;
    __u8 addr[16];            // the remote address (IPv4 in the first 4 bytes)
};

ARRAY(active, __u32, 1);

ARRAY(gens, struct gen_info, 2);

LPM_TRIE(addr4, struct addr4_key, struct bits, 2 * 4096);

LPM_TRIE(addr6, struct addr6_key, struct bits, 2 * 4096);

LPM_TRIE(ports, struct port_key, struct bits, 2 * 8192);

HASH(workloads, struct workload_key, struct workload_val, 2 * 1024);

PERCPU_ARRAY(counters, struct counter, 2 * MAX_RULES);

PERCPU_ARRAY(stats, __u64, STAT_COUNT);

union addr {
    __u8 b[16];
    __u64 q[2];
};

struct sk_state {             // per socket
    __u32 opened;             // who opened the connection: OPENED_*
    __u32 epoch;              // the cached verdict holds for this epoch (0: none)
    __u16 rule;               // the bit of the allow that decided
    __u16 local_port;         // of the packet that decided it
    __u16 remote_port;
    __u8 proto;
    __u8 pad;
    union addr remote;
};

SK_STORAGE(sockets, struct sk_state);  // an accepted socket starts as its listener is

RINGBUF(events, 16);             // 64 KiB: 1365 events

struct packet {
    __u8 family;
    __u8 proto;
    __u8 tcp_flags;
    __u8 icmp_type;           // 0xff: not ICMP, or no ICMP header (a later fragment)
    __u16 sport;              // host order; 0 without ports
    __u16 dport;
    union addr saddr;
    union addr daddr;
};

INLINE void stat(__u32 which) {
    __u64 *n = LOOKUP(stats, &which);
    if (n)
        *n += 1;
}

INLINE int ctz64(__u64 x) {   // the index of the lowest set bit of x (x != 0)
    // branchless (a popcount of the bits below it), so that the verifier does not
    // follow a path per possible answer
    x = (x & -x) - 1;
    x = x - ((x >> 1) & 0x5555555555555555ULL);
    x = (x & 0x3333333333333333ULL) + ((x >> 2) & 0x3333333333333333ULL);
    x = (x + (x >> 4)) & 0x0f0f0f0f0f0f0f0fULL;
    return (x * 0x0101010101010101ULL) >> 56;
}

INLINE int lowest(const struct bits *c, const struct bits *mask) {  // bit or -1
#pragma unroll
    for (int i = 0; i < MAX_RULES / 64; i++) {
        __u64 w = mask ? c->w[i] & mask->w[i] : c->w[i];
        if (w)
            return i * 64 + ctz64(w);
    }
    return -1;
}

INLINE int has(const struct bits *b, int bit) {
    return (b->w[(bit >> 6) & 3] >> (bit & 63)) & 1;
}

INLINE void ports_of(struct __sk_buff *skb, struct packet *p, __u32 l4) {
    __u8 h[14];
    if (p->proto == IPPROTO_TCP) {
        if (bpf_skb_load_bytes(skb, l4, h, 14))
            return;
        p->tcp_flags = h[13];
    } else if (p->proto == IPPROTO_UDP) {
        if (bpf_skb_load_bytes(skb, l4, h, 4))
            return;
    } else {
        if ((p->proto == IPPROTO_ICMP || p->proto == IPPROTO_ICMPV6) &&
            bpf_skb_load_bytes(skb, l4, h, 1) == 0)
            p->icmp_type = h[0];
        return;
    }
    p->sport = ((__u16)h[0] << 8) | h[1];
    p->dport = ((__u16)h[2] << 8) | h[3];
}

// Global (not inlined) functions are verified once, on their own, instead of once per
// path into them: the loops in them would multiply the paths through the rest.
GLOBAL int parse(struct __sk_buff *skb, struct packet *p) {
    // 0, or -1: not IP (p == NULL cannot be, but the verifier asks)
    if (!p)
        return -1;
    p->icmp_type = 0xff;
    if (skb->protocol == __builtin_bswap16(ETH_P_IP)) {
        __u8 h[20];
        if (bpf_skb_load_bytes(skb, 0, h, 20))
            return -1;
        p->family = 4;
        p->proto = h[9];
        __builtin_memcpy(p->saddr.b, h + 12, 4);
        __builtin_memcpy(p->daddr.b, h + 16, 4);
        if (((h[6] & 0x1f) | h[7]) == 0)  // a first (or the only) fragment
            ports_of(skb, p, (h[0] & 0xf) * 4);
        return 0;
    }
    if (skb->protocol == __builtin_bswap16(ETH_P_IPV6)) {
        __u8 h[40];
        if (bpf_skb_load_bytes(skb, 0, h, 40))
            return -1;
        p->family = 6;
        __builtin_memcpy(p->saddr.b, h + 8, 16);
        __builtin_memcpy(p->daddr.b, h + 24, 16);
        __u8 next = h[6];
        __u32 off = 40;
#pragma unroll
        for (int i = 0; i < 4; i++) {  // hop-by-hop, routing, fragment, destination
            __u8 x[4];
            if (next != 0 && next != 43 && next != 44 && next != 60)
                break;
            if (bpf_skb_load_bytes(skb, off, x, 4))
                return -1;
            if (next == 44) {          // fragment header: ports only in the first
                next = x[0];
                off += 8;
                if ((x[2] << 8 | x[3]) & 0xfff8) {
                    p->proto = next;
                    return 0;
                }
            } else {
                next = x[0];
                off += (x[1] + 1) * 8;
            }
        }
        p->proto = next;
        ports_of(skb, p, off);
        return 0;
    }
    return -1;
}

// The OR of the workload bitmaps of the socket's ancestors at ``levels``; 0 when none
// is a selected workload (the packet is not policed).
GLOBAL int workload_bits(struct __sk_buff *skb, __u32 gen, __u32 levels,
                                            struct workload_val *w) {
    int policed = 0;
    if (!w)
        return 0;
    for (int level = 1; level < MAX_LEVEL; level++) {
        if (!(levels >> level))
            break;
        if (!((levels >> level) & 1))
            continue;
        struct workload_key k = {.cgroup = bpf_skb_ancestor_cgroup_id(skb, level),
                                 .gen = gen};
        if (!k.cgroup)
            break;              // the socket's cgroup is above this level
        struct workload_val *v = LOOKUP(workloads, &k);
        if (!v)
            continue;
        policed = 1;
#pragma unroll
        for (int i = 0; i < MAX_RULES / 64; i++) {
            w->egress.w[i] |= v->egress.w[i];
            w->ingress.w[i] |= v->ingress.w[i];
        }
    }
    return policed;
}

INLINE int tcp_syn(const struct packet *p, int ingress) {  // a new outgoing connection
    return !ingress && p->proto == IPPROTO_TCP && (p->tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN;
}

INLINE int icmp(const struct packet *p) {
    return p->proto == IPPROTO_ICMP || p->proto == IPPROTO_ICMPV6;
}

INLINE int icmp_answer(const struct packet *p) {  // a reply or an error
    __u8 t = p->icmp_type;
    if (p->proto == IPPROTO_ICMP)   // echo, timestamp, information, mask replies; errors
        return t == 0 || t == 14 || t == 16 || t == 18 || t == 3 || t == 4 || t == 5 ||
               t == 11 || t == 12;
    return t == 129 || t == 140 || (t >= 1 && t <= 4);  // echo, node information; errors
}

// Who opened the connection, noted for every socket whether it is policed or not (yet),
// from the socket alone (no parse): a TCP socket sending in SYN_SENT (its SYN) opened
// it outwards; any other socket but an ICMP one by its first packet. 0: nothing to note.
INLINE __u32 opener(const struct bpf_sock *sk, int ingress) {
    if (sk->protocol == IPPROTO_TCP && sk->type == SOCK_STREAM)
        return !ingress && sk->state == TCP_SYN_SENT ? OPENED_EGRESS : OPENED_UNKNOWN;
    if (sk->protocol == IPPROTO_ICMP || sk->protocol == IPPROTO_ICMPV6)
        return OPENED_UNKNOWN;  // by the message (direction_of)
    return ingress ? OPENED_INGRESS : OPENED_EGRESS;
}

INLINE __u32 direction_of(struct sk_state *st, const struct packet *p, int ingress) {
    __u32 here = ingress ? OPENED_INGRESS : OPENED_EGRESS;
    if (icmp(p))  // a raw socket takes in every echo reply (and error) until connected
        return icmp_answer(p) ? (ingress ? OPENED_EGRESS : OPENED_INGRESS) : here;
    if (p->proto == IPPROTO_TCP) {
        if (tcp_syn(p, ingress) && st)
            st->opened = OPENED_EGRESS;
        return st && st->opened == OPENED_EGRESS ? OPENED_EGRESS : OPENED_INGRESS;
    }
    if (!st)
        return here;
    if (st->opened == OPENED_UNKNOWN)
        st->opened = here;
    return st->opened;
}

INLINE void count(__u32 gen, int bit, __u32 len) {
    __u32 index = gen * MAX_RULES + (bit & (MAX_RULES - 1));
    struct counter *n = LOOKUP(counters, &index);
    if (n) {
        n->packets += 1;
        n->bytes += len;
    }
}

INLINE int same_flow(const struct sk_state *st, const struct packet *p, int ingress) {
    const union addr *remote = ingress ? &p->saddr : &p->daddr;
    return st->proto == p->proto && st->remote.q[0] == remote->q[0]
        && st->remote.q[1] == remote->q[1]
        && st->local_port == (ingress ? p->dport : p->sport)
        && st->remote_port == (ingress ? p->sport : p->dport) && !tcp_syn(p, ingress)
        && !icmp(p);          // ICMP's direction is by the message, not the flow
}

INLINE int judge(struct __sk_buff *skb, int ingress) {
    struct bpf_sock *sk = skb->sk;
    if (sk)
        sk = bpf_sk_fullsock(sk);
    struct sk_state *st = sk ? SK_STORAGE_GET(sockets, sk, 0) : 0;
    // before anything else: a connection opened while no policy selected its workload
    // (or before its cgroup was in the tables) is judged in its own direction once one
    // does
    __u32 opened = sk ? opener(sk, ingress) : OPENED_UNKNOWN;
    if (opened != OPENED_UNKNOWN) {
        if (!st)
            st = SK_STORAGE_GET(sockets, sk, BPF_SK_STORAGE_GET_F_CREATE);
        if (st && st->opened == OPENED_UNKNOWN)
            st->opened = opened;
    }

    __u32 zero = 0;
    __u32 *gen_p = LOOKUP(active, &zero);
    if (!gen_p)
        return 1;
    __u32 gen = *gen_p & 1;
    struct gen_info *gi = LOOKUP(gens, &gen);
    if (!gi || !gi->levels)
        return 1;

    struct packet p = {};
    int parsed = 1;             // not yet
    if (st && st->epoch == gi->epoch) {
        parsed = parse(skb, &p);
        if (!parsed && same_flow(st, &p, ingress)) {
            count(gen, st->rule, skb->len);
            return 1;
        }
    }

    struct workload_val w = {};
    if (!workload_bits(skb, gen, gi->levels, &w))
        return 1;

    if (parsed > 0)
        parsed = parse(skb, &p);
    if (parsed) {
        stat(STAT_UNPARSED);
        return 1;               // not IP (the cgroup_skb hooks see only IP)
    }
    if (!st && sk)
        st = SK_STORAGE_GET(sockets, sk, BPF_SK_STORAGE_GET_F_CREATE);
    __u32 dir = direction_of(st, &p, ingress);
    const union addr *remote = ingress ? &p.saddr : &p.daddr;
    __u16 port;
    if (dir == OPENED_EGRESS)
        port = ingress ? p.sport : p.dport;
    else
        port = ingress ? p.dport : p.sport;

    struct bits c = dir == OPENED_EGRESS ? w.egress : w.ingress;
    struct bits *a;
    if (p.family == 4) {
        struct addr4_key k = {.prefixlen = 64, .gen = gen};
        __builtin_memcpy(k.addr, remote->b, 4);
        a = LOOKUP(addr4, &k);
    } else {
        struct addr6_key k = {.prefixlen = 160, .gen = gen};
        __builtin_memcpy(k.addr, remote->b, 16);
        a = LOOKUP(addr6, &k);
    }
    struct port_key pk = {.prefixlen = 56, .gen = gen, .proto = p.proto,
                          .port = {port >> 8, port & 0xff}};
    struct bits *pb = LOOKUP(ports, &pk);
    if (!a || !pb) {
        stat(STAT_UNMATCHED);
        return 1;
    }
#pragma unroll
    for (int i = 0; i < MAX_RULES / 64; i++)
        c.w[i] &= a->w[i] & pb->w[i];

    int verdict = 0;
    int bit = lowest(&c, &gi->enforce);
    if (bit >= 0 && has(&gi->deny, bit)) {
        verdict = VERDICT_DROP;
    } else {
        bit = lowest(&c, 0);
        if (bit < 0) {
            stat(STAT_UNMATCHED);
            return 1;
        }
        if (has(&gi->deny, bit))
            verdict = VERDICT_WOULD_DROP;
    }

    count(gen, bit, skb->len);
    if (verdict != VERDICT_DROP && st) {  // the flow's verdict until the next update
        st->epoch = gi->epoch;
        st->rule = bit;
        st->proto = p.proto;
        st->local_port = ingress ? p.dport : p.sport;
        st->remote_port = ingress ? p.sport : p.dport;
        st->remote = *remote;
    }
    if (verdict) {
        struct event e = {.ts_ns = bpf_ktime_get_ns(), .cgroup = bpf_skb_cgroup_id(skb),
                          .gen = gen, .rule = bit + 1, .verdict = verdict,
                          .direction = dir, .packet_ingress = ingress,
                          .family = p.family, .proto = p.proto, .port = port};
        __builtin_memcpy(e.addr, remote->b, 16);
        if (RINGBUF_OUTPUT(events, &e, sizeof(e)))
            stat(STAT_EVENTS_LOST);
    }
    return verdict == VERDICT_DROP ? 0 : 1;
}

SEC("cgroup_skb/egress")
int edge_egress(struct __sk_buff *skb) { return judge(skb, 0); }

SEC("cgroup_skb/ingress")
int edge_ingress(struct __sk_buff *skb) { return judge(skb, 1); }

#ifndef BCC_SEC
char LICENSE[] SEC("license") = "Apache-2.0";
#endif
