/* SPDX-License-Identifier: GPL-2.0-or-later
 *
 * xvs.lb data plane: an IPv4 and IPv6 direct-server-return load balancer
 * as one XDP program, compiled and loaded by bcc.  Destinations are reached on
 * the balancer's own segment (layer 2: the frame's MACs rewritten) or
 * through a tunnel (layer 3: IPIP or GUE, routed to them).
 *
 * The contract this program keeps is docs/design.md section 2; every
 * branch below names the contract line it implements.  The program knows nothing
 * of Ansible: its whole interface is the pinned maps declared here and the
 * -D macros the loader passes (plugins/module_utils/_loader.py).  The
 * struct layouts, counter names and shared constants are mirrored, once, in
 * plugins/module_utils/_layout.py; the loader checks the pinned maps'
 * key and value sizes against that mirror, and unit tests check the
 * counter list and every shared #define against it.
 *
 * The entry point, xdp_lb() at the end, reads as the contract: a frame of
 * either family goes through five stages, each a function below that
 * returns CONTINUE or the frame's verdict, counted:
 *
 *   1. parse     Ethernet, one 802.1Q tag, the IP header        parse, parse6
 *   2. classify  the VIP filter, ICMP, fragments, ports         classify, classify6
 *   3. select    the service, the flow record or a Maglev pick  select_dest
 *   4. account   whether the destination can take the frame     fits
 *                (VLAN, tunnel MTU), then the counters          account
 *   5. forward   the encapsulation, the Ethernet header         forward
 *
 * IPv4 and IPv6 share each stage's body where only the maps, the record
 * and the address compare differ: a function takes `v6` (always a
 * constant, so the compiler keeps one family's branch in each copy) and
 * the family's key; where the headers differ, the pair stands side by side
 * (parse and parse6).  A packet of an established TCP or UDP flow reads
 * one per-CPU counters record, one word of the VIP filter, its service,
 * its flow record, its destination's slot and the stats
 * (docs/performance.md measures each step).
 *
 * Contents: sizes and constants; map layouts and maps; the parsed frame;
 * helpers (hashes, checksums, the VIP filter, Maglev, flow records);
 * ICMP replies; the five stages; the program.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/icmpv6.h>

/* ---- sizes and options, set by the loader with -D ------------------- */
#ifndef XVS_PIN_ROOT
#error "XVS_PIN_ROOT (the bpffs directory holding the pinned maps) must be defined"
#endif
/* The sizes: plugins/module_utils/_layout.py SIZE_LIMITS names each, its
 * default and limits; the loader always passes all of them. */
#if !defined(MAX_SERVICES) || !defined(MAX_DESTINATIONS) || !defined(MAGLEV_TABLE_SIZE) || \
    !defined(FLOW_TABLE_SIZE) || !defined(FLOW_TABLE_SIZE_V6) || !defined(TCP_TIMEOUT) || \
    !defined(UDP_TIMEOUT) || !defined(MAX_INTERFACES)
#error "the sizes are -D macros from the loader (_layout.SIZE_LIMITS): build with _loader.load()"
#endif

#define ABI_VERSION 3

/* ---- named constants ------------------------------------------------- */
#define CONTINUE (-1)           /* a stage's "go on"; verdicts are >= 0 */
#define NSEC 1000000000ULL
#define FLOW_REFRESH_NS NSEC    /* a flow's last_seen is rewritten at most once a second */
/* Flow ages come from the coarse clock (the last tick, no clock-source
 * read): timeouts are whole seconds, so a few milliseconds of resolution
 * cost nothing.  Ages are compared signed: a record stamped by the fine
 * clock (the control plane's CLOCK_MONOTONIC) may be a tick ahead. */
#define flow_clock() bpf_ktime_get_coarse_ns()

#define MAGLEV_CHUNK 16         /* table slots per array element */
#define MAGLEV_CHUNKS ((MAGLEV_TABLE_SIZE + MAGLEV_CHUNK - 1) / MAGLEV_CHUNK)
#define MAGLEV_HALVES 2         /* live and idle table of each service (contract 10) */

#define VLAN_IDS 4096           /* 802.1Q ids: the vlans map's index */
#define SRC_PREFIX_LEN 20       /* source prefix counters count per /20 */
#define PREFIX_SLOTS (1 << SRC_PREFIX_LEN)
/* IPv6 clients count per /48 (a site's usual allocation), too many to
 * index as the /20s are: each /48 hashes (Fibonacci, as the VIP filter)
 * to one of 2^PREFIX6_ORDER slots per CPU, which holds one /48 and its
 * count (contract 9).  A per-CPU LRU hash would name every /48 exactly,
 * but cost 45-50 ns a packet in bench levers, against 8-15 for the array,
 * whose lookup the verifier inlines. */
#define SRC_PREFIX6_LEN 48
#define PREFIX6_ORDER 16
#define PREFIX6_SLOTS (1 << PREFIX6_ORDER)
#define PREFIX6_MULT 0x9e3779b97f4a7c15ULL

/* The VIP filter: a bitmap of 2^VIP_FILTER_ORDER bits in u64 words, bit
 * h(daddr) set for every VIP, h being Fibonacci hashing (multiply by
 * 2^32 / golden ratio, keep the top bits).  A clear bit proves "not a
 * VIP" with one inlined array read; a set one may be a collision, which
 * the services or vips lookup then settles. */
#define VIP_FILTER_ORDER 16
#define VIP_FILTER_WORD_BITS 64
#define VIP_FILTER_WORDS ((1 << VIP_FILTER_ORDER) / VIP_FILTER_WORD_BITS)
#define VIP_FILTER_MULT 0x9e3779b1U

#define VLAN_VID_MASK 0x0fff    /* 802.1Q TCI: the VLAN id ... */
#define VLAN_PRIO_MASK 0xf000   /* ... and priority + DEI, kept on rewrite */
#define IP_MF 0x2000            /* frag_off: more fragments */
#define IP_OFFSET 0x1fff        /* frag_off: fragment offset */
#define IPV4_VERSION 4
#define IPV4_MIN_IHL 5          /* in 32-bit words ... */
#define IPV4_IHL_UNIT 4         /* ... of 4 bytes */
#define ECHO_REPLY_TTL 64
#define IP_DF 0x4000            /* frag_off: don't fragment */
#define TCP_FLAGS_OFFSET 13     /* the flags byte of a TCP header */
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_ACK 0x10

/* Forwarding methods (contract 13), per service, copied into its dests;
 * _layout.METHODS lists them with the bytes each adds (tunnel_overhead()). */
#define FWD_L2 0                /* rewrite the MACs: the destination is on-link */
#define FWD_IPIP 1              /* IPv4-in-IPv4 (protocol 4), IPv6-in-IPv6 (41) */
#define FWD_GUE 2               /* GUE variant 1: the IP packet directly in UDP */
#define TUNNEL_TTL 64
/* A GUE packet's UDP source port comes from the flow hash, in the dynamic
 * range (RFC 6335), so ECMP and RSS on the way spread the flows. */
#define GUE_SPORT_BASE 0xc000
#define GUE_SPORT_MASK 0x3fff
/* A frame too big to encapsulate is answered with an ICMP
 * fragmentation-needed quoting this many bytes of it (RFC 792 asks for the
 * header and 8 bytes; more lets the client match the quoted segment).  A
 * multiple of 4 for bpf_csum_diff, and below every MTU that can trigger it. */
#define ICMP_QUOTE_LEN 128
#define ICMP_TOO_BIG_TTL 64

/* IPv6 (contracts 1-12 for IPv6 services, docs/design.md section 2.15). */
#define IPV6_VERSION 6
#define IPV6_EXT_MAX 4          /* extension headers followed before the transport header */
#define IPV6_EXT_UNIT 8         /* hdrlen counts 8-byte units beyond the first */
#define IPV6_FRAG_OFFSET 0xfff8 /* fragment header frag_off: offset ... */
#define IPV6_FRAG_MORE 0x0001   /* ... and more fragments */
#define IPV6_AH 51              /* authentication header: a chain we do not follow */
#define ND_FIRST 133            /* neighbour discovery: router solicitation ... */
#define ND_LAST 137             /* ... to redirect; the kernel's to answer */
#define ECHO_REPLY_HOP_LIMIT 64
/* GUE over IPv6 carries a real UDP checksum: IPv6 has no header checksum,
 * and a zero one (RFC 6935) is refused by receivers not configured for it,
 * the kernel's fou among them.  It is summed over the whole datagram in
 * bpf_csum_diff's largest piece (512 bytes); CSUM_CHUNKS of them (and a
 * shorter rest) bound the loop and so the datagram: a larger egress MTU is
 * used as GUE6_MTU_MAX (above a 9,000-byte jumbo frame). */
#define CSUM_CHUNK 512
#define CSUM_CHUNKS 18
#define GUE6_MTU_MAX (sizeof(struct ipv6hdr) + CSUM_CHUNKS * CSUM_CHUNK)
#define UDP_CSUM_ZERO 0xffff    /* a sum of 0 is sent as this: 0 means none (RFC 768) */
#define IPV6_MIN_MTU 1280       /* a Packet Too Big never asks for less */
#define IPV6_TC_MASK 0x0ff00000 /* the first word: version, traffic class, flow label */
#define IPV6_FLOW_MASK 0x000fffff

#define PIN(name) XVS_PIN_ROOT "/" name

/* ---- map layouts (mirrored in _layout.py) ---------------------------- */
struct svc_key {
    __be32 vip;
    __be16 port;
    u8 proto;
    u8 pad;
};

#define SVC_STICKY 1

struct svc_val {
    u32 index;      /* service slot: selects its maglev halves and dests */
    u32 flags;      /* SVC_STICKY */
    u32 gen;        /* which maglev half (0/1) is live */
    u32 ndest;      /* eligible destinations (weight > 0); 0: drop */
    u8 forwarding;  /* FWD_*, and ... */
    u8 pad;
    __be16 gue_port;/* ... GUE's port: kept for the control plane, the
                     * program reads the copies in each dest */
};

/* Per VIP: which port a non-first fragment belongs to (sticky services
 * only, contract 8); 0 means fragments of that protocol are dropped.  Read
 * only off the common path: for ICMP, fragments and a services miss. */
struct vip_val {
    __be16 frag_port_tcp;
    __be16 frag_port_udp;
    u32 pad;
};

#define DEST_VALID 1
#define DEST_V6 2               /* addr6 holds the address (for the control plane) */
/* Masked by health (xvs-agent found it failing; its weight is then 0 as
 * well): told apart from an operator's drain (weight 0 alone), because a
 * failing destination cannot answer, so no packet follows a flow record to
 * it (contract 5). */
#define DEST_FAILING 4

struct addr6 {
    __be32 w[4];
};

struct dest {
    __be32 addr;
    u32 flags;       /* DEST_VALID */
    u8 mac[6];       /* the destination's MAC */
    u8 src_mac[6];   /* the balancer's MAC on the egress interface */
    u16 vlan;        /* 802.1Q id on the egress interface, 0 untagged */
    u16 tx_port;     /* slot in tx_ports when ifindex is not the ingress */
    u32 ifindex;
    u32 weight;      /* for the control plane; selection uses the maglev map */
    u8 forwarding;   /* FWD_*: the service's method; for a tunnel, mac is the */
    u8 pad;          /* next hop's and ... */
    __be16 gue_port; /* ... the outer UDP destination port (FWD_GUE) */
    __be32 tun_src;  /* the outer source address */
    u16 mtu;         /* the egress MTU: a tunnelled frame must fit */
    u16 pad2;
    struct addr6 addr6;  /* an IPv6 destination's address (DEST_V6) */
    struct addr6 tun_src6;  /* an IPv6 tunnel's outer source */
};

struct maglev_chunk {
    u16 slot[MAGLEV_CHUNK];   /* destination slot within the service */
};

struct flow_key {
    __be32 saddr;
    __be32 daddr;
    __be16 sport;    /* 0: a sticky service's address pair (its fragments') */
    __be16 dport;
    u8 proto;
    u8 pad[3];
};

/* Both families' flow records begin with these fields (struct flow_head). */
struct flow_val {
    u64 last_seen;   /* flow_clock() (CLOCK_MONOTONIC), refreshed at most once a second */
    u16 svc_index;   /* < MAX_SERVICES <= 65536 */
    u16 dest_slot;   /* < MAX_DESTINATIONS <= 65535 */
    __be32 dest_addr;/* the slot must still hold this address */
};

/* IPv6 services and flows: the same records with 16-byte addresses, in
 * maps of their own, so the IPv4 path keeps its 16-byte flow key. */
struct svc_key6 {
    struct addr6 vip;
    __be16 port;
    u8 proto;
    u8 pad;
};

struct flow_key6 {
    struct addr6 saddr;
    struct addr6 daddr;
    __be16 sport;
    __be16 dport;
    u8 proto;
    u8 pad[3];
};

struct flow_val6 {
    u64 last_seen;
    u16 svc_index;
    u16 dest_slot;
    u32 pad;
    struct addr6 dest_addr;
};

struct stats {
    u64 packets;
    u64 bytes;
    u64 new_flows;
};

struct meta {
    u32 abi_version;
    u32 max_services;
    u32 max_destinations;
    u32 maglev_table_size;
    u32 flow_table_size;
    u32 tcp_timeout;
    u32 udp_timeout;
    u32 max_interfaces;
    u32 build_id[4];   /* the loader's hash of source and options */
    u32 flow_table_size_v6;   /* appended: abi_version stays the first word */
};

/* The balancer's prefix on each VLAN of an 802.1Q trunk, by VLAN id.  The
 * program does not read it: it is kept here, pinned with the rest, so the
 * control plane finds the whole configuration in one place. */
struct vlan_net {
    __be32 net;
    u32 prefixlen;   /* 0: VLAN not configured */
};

/* Global counters, one per-CPU record read once per packet; the names are
 * listed in _layout.py in this order. */
enum counter {
    C_RX_PACKETS,
    C_RX_BYTES,
    C_PASS,
    C_TX,
    C_REDIRECT,
    C_DROP_NO_SERVICE,
    C_DROP_NO_DEST,
    C_DROP_FRAGMENT,
    C_DROP_ICMP,
    C_DROP_VLAN,
    C_ICMP_ECHO_REPLY,
    C_ICMP_PTB_FORWARDED,
    C_NEW_FLOWS,
    C_FLOW_RESELECT,
    C_ENCAP_IPIP,
    C_ENCAP_GUE,
    C_ICMP_TOO_BIG,
    C_DROP_ENCAP,
    C_DROP_IPV6_EXT,
    C_MAX,
};

struct counters {
    u64 n[C_MAX];
};

/* The outer source of tunnels per family (xvs_attach's tunnel_source),
 * zero where the route's source address is used.  Like vlans, not read by
 * the program (each dest holds its own tun_src): pinned so the control
 * plane finds the whole configuration in one place. */
struct tunnel_src {
    __be32 ipv4;
    u8 ipv6[16];
};

BPF_TABLE_PINNED("array", u32, struct meta, meta, 1, PIN("meta"));
BPF_TABLE_PINNED("array", u32, u64, vip_filter, VIP_FILTER_WORDS, PIN("vip_filter"));
BPF_TABLE_PINNED("hash", __be32, struct vip_val, vips, MAX_SERVICES, PIN("vips"));
BPF_TABLE_PINNED("hash", struct svc_key, struct svc_val, services, MAX_SERVICES, PIN("services"));
BPF_TABLE_PINNED("array", u32, struct dest, dests, MAX_SERVICES * MAX_DESTINATIONS, PIN("dests"));
BPF_TABLE_PINNED("array", u32, struct maglev_chunk, maglev, MAX_SERVICES * MAGLEV_HALVES * MAGLEV_CHUNKS, PIN("maglev"));
BPF_TABLE_PINNED("lru_hash", struct flow_key, struct flow_val, flows, FLOW_TABLE_SIZE, PIN("flows"));
BPF_TABLE_PINNED("percpu_array", u32, struct counters, counters, 1, PIN("counters"));
BPF_TABLE_PINNED("percpu_array", u32, struct stats, svc_stats, MAX_SERVICES, PIN("svc_stats"));
BPF_TABLE_PINNED("percpu_array", u32, struct stats, dest_stats, MAX_SERVICES * MAX_DESTINATIONS, PIN("dest_stats"));
BPF_TABLE_PINNED("percpu_array", u32, u64, prefix_stats, PREFIX_SLOTS, PIN("prefix_stats"));
struct prefix6_count {
    u64 prefix;     /* the /48's six bytes in memory order, zero-padded */
    u64 packets;
};

BPF_TABLE_PINNED("percpu_array", u32, struct prefix6_count, prefix_stats6, PREFIX6_SLOTS, PIN("prefix_stats6"));
BPF_TABLE_PINNED("array", u32, struct vlan_net, vlans, VLAN_IDS, PIN("vlans"));
BPF_TABLE_PINNED("array", u32, struct tunnel_src, tunnel_src, 1, PIN("tunnel_src"));
BPF_TABLE_PINNED("hash", struct addr6, struct vip_val, vips6, MAX_SERVICES, PIN("vips6"));
BPF_TABLE_PINNED("hash", struct svc_key6, struct svc_val, services6, MAX_SERVICES, PIN("services6"));
BPF_TABLE_PINNED("lru_hash", struct flow_key6, struct flow_val6, flows6, FLOW_TABLE_SIZE_V6, PIN("flows6"));
BPF_XDP_REDIRECT_MAP("devmap:" PIN("tx_ports"), int, tx_ports, MAX_INTERFACES);


/* ---- headers and the parsed frame ---------------------------------------- */
struct vlan_hdr {
    __be16 tci;
    __be16 proto;
};

struct ports {
    __be16 source;
    __be16 dest;
};

struct ipv6_frag {
    u8 nexthdr;
    u8 reserved;
    __be16 frag_off;
    __be32 identification;
};

/* What the stages learn about a frame, whatever its family. */
struct frame {
    struct ethhdr *eth;
    struct vlan_hdr *vh;     /* 0: untagged */
    void *l3;                /* the IPv4 or IPv6 header */
    void *l4;
    u64 len;
    u16 frag;                /* IPv4 frag_off, or the IPv6 fragment header's (0: none); host order */
    u8 ptb;                  /* an ICMP fragmentation-needed / Packet Too Big for a VIP flow */
    u8 syn;                  /* a TCP SYN without ACK: a new connection */
    u8 sticky;               /* of a sticky service: the hash leaves out the ports */
};

/* An IPv4 frame: the flow as the client sent it, and its service. */
struct packet {
    struct frame f;
    struct flow_key key;
    struct svc_key sk;
};

/* An IPv6 frame, and where its extension headers ended. */
struct packet6 {
    struct frame f;
    u8 l4proto;              /* the header after the extension headers */
    u8 unparsed;             /* the chain ended in one we do not follow */
    struct flow_key6 key;
    struct svc_key6 sk;
};

#define PARSED_IPV6 (-2)        /* parse's "go on, as IPv6" */

/* Where select sends a frame. */
struct choice {
    struct dest *d;
    u32 index;               /* service slot */
    u32 slot;                /* destination slot within it */
    int new_flow;
};

/* The fields flow_val and flow_val6 begin with. */
struct flow_head {
    u64 last_seen;
    u16 svc_index;
    u16 dest_slot;
};

/* ---- helpers ---------------------------------------------------------- */
static __always_inline int verdict(struct counters *c, u32 counter, int action)
{
    if (counter < C_MAX)
        c->n[counter]++;
    return action;
}

/* murmur3's finaliser: cheap, and every input bit reaches every output
 * bit, which the Maglev index needs.  tests/xvstest/packets.py mirrors
 * this to predict the selected destination. */
static __always_inline u32 mix32(u32 h)
{
    h ^= h >> 16;
    h *= 0x85ebca6b;
    h ^= h >> 13;
    h *= 0xc2b2ae35;
    h ^= h >> 16;
    return h;
}

/* Contract 3: the hash a new flow selects by, of the 5-tuple or, for a
 * sticky service, of the addresses only (sport left out).  A tunnel's GUE
 * source port and IPv6 flow label come from it as well.  IPv4 and IPv6
 * keys differ in their addresses' words; tests/xvstest/packets.py mirrors
 * both. */
static __always_inline u32 flow_hash(void *key, int v6, u8 sticky)
{
    struct flow_key *k4 = key;
    struct flow_key6 *k6 = key;
    u8 proto = v6 ? k6->proto : k4->proto;
    u32 ports = ((u32)(sticky ? 0 : (v6 ? k6->sport : k4->sport)) << 16) | (v6 ? k6->dport : k4->dport);
    u32 h = mix32(0x9e3779b9 ^ proto);
    h = mix32(h ^ ports);
    if (!v6)
        return mix32(mix32(h ^ k4->saddr) ^ k4->daddr);
#pragma unroll
    for (int i = 0; i < 4; i++)
        h = mix32(h ^ k6->saddr.w[i]);
#pragma unroll
    for (int i = 0; i < 4; i++)
        h = mix32(h ^ k6->daddr.w[i]);
    return h;
}

/* RFC 1624 incremental checksum update for one 16-bit word. */
static __always_inline __sum16 csum_replace(__sum16 check, __be16 old, __be16 new)
{
    u32 sum = (u16)~check + (u16)~old + (u16)new;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return ~sum;
}

static __always_inline __sum16 csum_fold(u32 sum)
{
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return ~sum;
}

/* The checksum of an option-less IPv4 header (its check field zero),
 * summed in memory order like every checksum here. */
static __always_inline __sum16 ipv4_csum(struct iphdr *ip)
{
    u16 *w = (u16 *)ip;
    u32 sum = 0;
#pragma unroll
    for (int i = 0; i < sizeof(*ip) / 2; i++)
        sum += w[i];
    return csum_fold(sum);
}

static __always_inline u32 addr6_fold(struct addr6 *a)
{
    return a->w[0] ^ a->w[1] ^ a->w[2] ^ a->w[3];
}

static __always_inline int addr6_eq(struct addr6 *a, struct addr6 *b)
{
    return a->w[0] == b->w[0] && a->w[1] == b->w[1] && a->w[2] == b->w[2] && a->w[3] == b->w[3];
}

/* The VIP filter's bit for an address (an IPv6 one folded to a word). */
static __always_inline int vip_filter_hit(__be32 vip)
{
    u32 bit = ((u32)vip * VIP_FILTER_MULT) >> (32 - VIP_FILTER_ORDER);
    u32 word = bit / VIP_FILTER_WORD_BITS;
    u64 *w = vip_filter.lookup(&word);
    return w && ((*w >> (bit % VIP_FILTER_WORD_BITS)) & 1);
}

/* The vips map's entry of the service key's VIP, of either family. */
static __always_inline struct vip_val *vip_of(void *sk, int v6)
{
    return v6 ? vips6.lookup(&((struct svc_key6 *)sk)->vip) : vips.lookup(&((struct svc_key *)sk)->vip);
}

static __always_inline void stats_add(struct stats *s, u64 bytes, int new_flow)
{
    if (!s)
        return;
    s->packets++;
    s->bytes += bytes;
    s->new_flows += new_flow;
}

/* Contract 3: the Maglev slot for a hash, read from the service's live half. */
static __always_inline int maglev_pick(struct svc_val *svc, u32 hash, u32 *slot)
{
    u32 pos = hash % MAGLEV_TABLE_SIZE;
    u32 idx = (svc->index * MAGLEV_HALVES + (svc->gen & 1)) * MAGLEV_CHUNKS + pos / MAGLEV_CHUNK;
    struct maglev_chunk *c = maglev.lookup(&idx);
    if (!c)
        return -1;
    u32 s = c->slot[pos % MAGLEV_CHUNK];
    if (s >= MAX_DESTINATIONS)
        return -1;
    *slot = s;
    return 0;
}

static __always_inline struct dest *dest_at(u32 index, u32 slot)
{
    if (index >= MAX_SERVICES || slot >= MAX_DESTINATIONS)
        return 0;
    u32 idx = index * MAX_DESTINATIONS + slot;
    struct dest *d = dests.lookup(&idx);
    if (!d || !(d->flags & DEST_VALID))
        return 0;
    return d;
}

/* Contract 13: the bytes a destination's forwarding puts in front of a
 * packet of the family (_layout.METHODS lists the same).  Both MTU checks
 * and both encapsulations take it from here. */
static __always_inline u32 tunnel_overhead(struct dest *d, int v6)
{
    u32 ip = v6 ? sizeof(struct ipv6hdr) : sizeof(struct iphdr);
    switch (d->forwarding) {
    case FWD_IPIP:
        return ip;
    case FWD_GUE:
        return ip + sizeof(struct udphdr);
    default:
        return 0;
    }
}

static __always_inline int flow_expired(u8 proto, u64 last_seen, u64 now)
{
    u64 timeout = (proto == IPPROTO_TCP ? TCP_TIMEOUT : UDP_TIMEOUT) * NSEC;
    return (s64)(now - last_seen) > (s64)timeout;
}

/* A TCP SYN without ACK: the first packet of a new connection. */
static __always_inline u8 tcp_syn(void *l4, void *data_end)
{
    u8 *flags = l4 + TCP_FLAGS_OFFSET;
    if ((void *)(flags + 1) > data_end)
        return 0;
    return (*flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
}

/* Contract 5: whether a packet follows its flow's record to d.  A
 * destination in service (weight above 0) keeps its flows.  A drained one
 * keeps its established connections but never a SYN: that is a new
 * connection, whichever client port it reuses.  A failing one keeps
 * nothing: it cannot answer, so every packet selects again and the client
 * hears from a live destination at once.  The common case costs one test
 * of a word forward() reads anyway. */
static __always_inline int dest_keeps(struct dest *d, u8 syn)
{
    return d->weight || !(syn || (d->flags & DEST_FAILING));
}

/* Contract 4: an unexpired flow record of this service whose destination
 * slot still holds the same address keeps its destination (contract 5
 * permitting). */
static __always_inline struct dest *flow_dest(struct frame *fr, void *key, int v6, struct svc_val *svc,
                                              struct flow_head *f, u64 now)
{
    u8 proto = v6 ? ((struct flow_key6 *)key)->proto : ((struct flow_key *)key)->proto;
    if (!f || f->svc_index != svc->index || flow_expired(proto, f->last_seen, now))
        return 0;
    struct dest *d = dest_at(svc->index, f->dest_slot);
    if (!d || (v6 ? !addr6_eq(&d->addr6, &((struct flow_val6 *)f)->dest_addr)
                  : d->addr != ((struct flow_val *)f)->dest_addr) || !dest_keeps(d, fr->syn))
        return 0;
    return d;
}

/* A flow's record: the choice, at now, in the family's table. */
static __always_inline void record_flow(void *key, int v6, struct choice *ch, u64 now)
{
    if (v6) {
        struct flow_val6 v = {};
        v.last_seen = now;
        v.svc_index = ch->index;
        v.dest_slot = ch->slot;
        v.dest_addr = ch->d->addr6;
        flows6.update(key, &v);
    } else {
        struct flow_val v = {};
        v.last_seen = now;
        v.svc_index = ch->index;
        v.dest_slot = ch->slot;
        v.dest_addr = ch->d->addr;
        flows.update(key, &v);
    }
}

/* Contract 8: the record of a sticky flow's address pair (source port 0),
 * which later fragments, carrying no ports, look up. */
static __always_inline void record_pair(void *key, int v6, struct choice *ch, u64 now)
{
    if (v6) {
        struct flow_key6 pair = *(struct flow_key6 *)key;
        pair.sport = 0;
        record_flow(&pair, 1, ch, now);
    } else {
        struct flow_key pair = *(struct flow_key *)key;
        pair.sport = 0;
        record_flow(&pair, 0, ch, now);
    }
}

/* Contract 8: a fragment after the first (it has no ports), and the first
 * of a fragmented datagram, by the family's fragment fields. */
static __always_inline int later_fragment(struct frame *fr, int v6)
{
    return fr->frag & (v6 ? IPV6_FRAG_OFFSET : IP_OFFSET);
}

static __always_inline int first_fragment(struct frame *fr, int v6)
{
    u16 more = v6 ? IPV6_FRAG_MORE : IP_MF;
    return (fr->frag & (more | (v6 ? IPV6_FRAG_OFFSET : IP_OFFSET))) == more;
}

/* Room for `room` bytes of new headers between the Ethernet header (and
 * its 802.1Q tag) and the L3 header: the frame grows at the front and the
 * L2 header moves up to the new front.  Returns the new L3 start, 0 when
 * the kernel refused (the frame is then dropped, counted drop_encap);
 * fr->eth and fr->vh point at the moved header.  room > 18 bytes: the old
 * and the new L2 header do not overlap. */
static __always_inline void *push_front(struct xdp_md *ctx, int room, struct frame *fr)
{
    int tagged = fr->vh != 0;
    if (bpf_xdp_adjust_head(ctx, -room))
        return 0;
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *new = data;
    struct ethhdr *old = data + room;
    if ((void *)(old + 1) + sizeof(struct vlan_hdr) > data_end)
        return 0;
    __builtin_memcpy(new, old, sizeof(*new));
    fr->eth = new;
    fr->vh = 0;
    if (!tagged)
        return new + 1;
    struct vlan_hdr *tag = (void *)(new + 1);
    *tag = *(struct vlan_hdr *)(old + 1);
    fr->vh = tag;
    return tag + 1;
}

/* A reply goes back where the frame came from: the Ethernet addresses
 * swapped (the 802.1Q tag kept). */
static __always_inline void reverse_l2(struct ethhdr *eth)
{
    u8 mac[ETH_ALEN];
    __builtin_memcpy(mac, eth->h_dest, ETH_ALEN);
    __builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
    __builtin_memcpy(eth->h_source, mac, ETH_ALEN);
}

/* ---- ICMP replies from the balancer (contracts 7 and 13) ---------------- */
/* Contract 7: an echo request to a VIP is answered by the balancer. */
static __always_inline int icmp_echo(struct counters *c, struct frame *fr, struct icmphdr *icmp)
{
    struct iphdr *ip = fr->l3;
    reverse_l2(fr->eth);
    __be32 a = ip->saddr;
    ip->saddr = ip->daddr;
    ip->daddr = a;
    __be16 old = *(__be16 *)&ip->ttl;        /* ttl and protocol share a word */
    ip->ttl = ECHO_REPLY_TTL;
    ip->check = csum_replace(ip->check, old, *(__be16 *)&ip->ttl);
    icmp->type = ICMP_ECHOREPLY;
    icmp->checksum = csum_replace(icmp->checksum, bpf_htons(ICMP_ECHO << 8),
                                  bpf_htons(ICMP_ECHOREPLY << 8));
    return verdict(c, C_ICMP_ECHO_REPLY, XDP_TX);
}

static __always_inline int icmp6_echo(struct counters *c, struct frame *fr, struct icmp6hdr *icmp)
{
    struct ipv6hdr *ip6 = fr->l3;
    reverse_l2(fr->eth);
    struct in6_addr a = ip6->saddr;
    ip6->saddr = ip6->daddr;     /* the pseudo-header's sum is the same */
    ip6->daddr = a;
    ip6->hop_limit = ECHO_REPLY_HOP_LIMIT;
    icmp->icmp6_type = ICMPV6_ECHO_REPLY;
    icmp->icmp6_cksum = csum_replace(icmp->icmp6_cksum, bpf_htons(ICMPV6_ECHO_REQUEST << 8),
                                     bpf_htons(ICMPV6_ECHO_REPLY << 8));
    return verdict(c, C_ICMP_ECHO_REPLY, XDP_TX);
}

/* Contract 13: a frame that would not fit the egress MTU once
 * encapsulated is answered, from the VIP, with an ICMP
 * fragmentation-needed (IPv6: Packet Too Big) carrying the MTU the client
 * may use: never a silent drop, and checked before account() so it is not
 * counted as forwarded.  The frame is cut to the quote and the new
 * headers go in front of it. */
static __always_inline int icmp_too_big(struct xdp_md *ctx, struct counters *c, struct frame *fr, u32 mtu)
{
    struct iphdr *ip = fr->l3;
    __be32 client = ip->saddr, vip = ip->daddr;
    u32 l2 = fr->l3 - (void *)fr->eth;
    if (bpf_xdp_adjust_tail(ctx, (int)(l2 + ICMP_QUOTE_LEN) - (int)fr->len))
        return verdict(c, C_DROP_ENCAP, XDP_DROP);
    struct iphdr *nip = push_front(ctx, sizeof(struct iphdr) + sizeof(struct icmphdr), fr);
    void *data_end = (void *)(long)ctx->data_end;
    if (!nip)
        return verdict(c, C_DROP_ENCAP, XDP_DROP);
    struct icmphdr *icmp = (void *)(nip + 1);
    if ((void *)(icmp + 1) + ICMP_QUOTE_LEN > data_end)
        return verdict(c, C_DROP_ENCAP, XDP_DROP);
    reverse_l2(fr->eth);

    struct iphdr h = {};
    h.version = IPV4_VERSION;
    h.ihl = IPV4_MIN_IHL;
    h.tot_len = bpf_htons(sizeof(h) + sizeof(*icmp) + ICMP_QUOTE_LEN);
    h.ttl = ICMP_TOO_BIG_TTL;
    h.protocol = IPPROTO_ICMP;
    h.saddr = vip;
    h.daddr = client;
    h.check = ipv4_csum(&h);
    *nip = h;

    icmp->type = ICMP_DEST_UNREACH;
    icmp->code = ICMP_FRAG_NEEDED;
    icmp->checksum = 0;
    icmp->un.frag.__unused = 0;
    icmp->un.frag.mtu = bpf_htons(mtu);
    icmp->checksum = csum_fold(bpf_csum_diff(0, 0, (void *)icmp, sizeof(*icmp) + ICMP_QUOTE_LEN, 0));
    return verdict(c, C_ICMP_TOO_BIG, XDP_TX);
}

/* IPv6's pseudo-header, for the ICMPv6 and the GUE UDP checksums. */
struct pseudo6 {
    struct addr6 saddr;
    struct addr6 daddr;
    __be32 len;
    __be32 nexthdr;
};

static __always_inline int icmp6_too_big(struct xdp_md *ctx, struct counters *c, struct frame *fr, u32 mtu)
{
    struct ipv6hdr *in = fr->l3;
    struct pseudo6 ph = {};
    __builtin_memcpy(&ph.saddr, &in->daddr, sizeof(ph.saddr));   /* from the VIP ... */
    __builtin_memcpy(&ph.daddr, &in->saddr, sizeof(ph.daddr));   /* ... to the client */
    ph.len = bpf_htonl(sizeof(struct icmp6hdr) + ICMP_QUOTE_LEN);
    ph.nexthdr = bpf_htonl(IPPROTO_ICMPV6);
    u32 l2 = fr->l3 - (void *)fr->eth;
    if (bpf_xdp_adjust_tail(ctx, (int)(l2 + ICMP_QUOTE_LEN) - (int)fr->len))
        return verdict(c, C_DROP_ENCAP, XDP_DROP);
    struct ipv6hdr *ip6 = push_front(ctx, sizeof(struct ipv6hdr) + sizeof(struct icmp6hdr), fr);
    void *data_end = (void *)(long)ctx->data_end;
    if (!ip6)
        return verdict(c, C_DROP_ENCAP, XDP_DROP);
    struct icmp6hdr *icmp = (void *)(ip6 + 1);
    if ((void *)(icmp + 1) + ICMP_QUOTE_LEN > data_end)
        return verdict(c, C_DROP_ENCAP, XDP_DROP);
    reverse_l2(fr->eth);
    *(__be32 *)ip6 = bpf_htonl(IPV6_VERSION << 28);
    ip6->payload_len = bpf_htons(sizeof(*icmp) + ICMP_QUOTE_LEN);
    ip6->nexthdr = IPPROTO_ICMPV6;
    ip6->hop_limit = ICMP_TOO_BIG_TTL;
    __builtin_memcpy(&ip6->saddr, &ph.saddr, sizeof(ph.saddr));
    __builtin_memcpy(&ip6->daddr, &ph.daddr, sizeof(ph.daddr));
    icmp->icmp6_type = ICMPV6_PKT_TOOBIG;
    icmp->icmp6_code = 0;
    icmp->icmp6_cksum = 0;
    icmp->icmp6_mtu = bpf_htonl(mtu);
    u32 sum = bpf_csum_diff(0, 0, (void *)&ph, sizeof(ph), 0);
    icmp->icmp6_cksum = csum_fold(bpf_csum_diff(0, 0, (void *)icmp, sizeof(*icmp) + ICMP_QUOTE_LEN, sum));
    return verdict(c, C_ICMP_TOO_BIG, XDP_TX);
}

/* csum_bytes()' buffer: one chunk. */
struct csum_buf {
    u8 b[CSUM_CHUNK];
};

BPF_PERCPU_ARRAY(csum_scratch, struct csum_buf, 1);

/* The ones'-complement sum (memory order) of len bytes of the frame from
 * off (an even offset into what is summed), added to sum; -1 if the frame
 * is shorter.  Each chunk is copied out first, the last one zero-padded to
 * a word (bpf_csum_diff sums whole words): summing the frame in place
 * would need a bounds check per piece size, and the verifier would walk
 * every combination of them. */
static __always_inline s64 csum_bytes(struct xdp_md *ctx, u32 off, u64 len, u32 sum)
{
    u32 zero = 0;
    struct csum_buf *buf = csum_scratch.lookup(&zero);
    if (!buf)
        return -1;     /* cannot happen: a one-entry array */
    for (u32 i = 0; i < CSUM_CHUNKS; i++) {
        asm volatile("" : "+r"(i));     /* the verifier's bound on the loop, whatever len is */
        if (len < CSUM_CHUNK)
            break;
        if (bpf_xdp_load_bytes(ctx, off, buf->b, CSUM_CHUNK))
            return -1;
        sum = bpf_csum_diff(0, 0, (void *)buf->b, CSUM_CHUNK, sum);
        off += CSUM_CHUNK;
        len -= CSUM_CHUNK;
    }
    if (len == 0)
        return sum;
    if (len >= CSUM_CHUNK)
        return -1;                      /* past CSUM_CHUNKS: the MTU check keeps it from here */
    /* zero the last word, which the copy fills only in part */
    *(u32 *)&buf->b[len & (CSUM_CHUNK - sizeof(u32))] = 0;
    if (bpf_xdp_load_bytes(ctx, off, buf->b, len))
        return -1;
    return bpf_csum_diff(0, 0, (void *)buf->b, (len + 3) & (CSUM_CHUNK - sizeof(u32)), sum);
}

/* ---- stage 1: parse ---------------------------------------------------- */
/* Contract 1: Ethernet, at most one 802.1Q tag, then the IP header with
 * sane lengths and a TTL (hop limit); anything we do not fully understand
 * passes untouched.  An IPv6 frame goes on to parse6. */
static __always_inline int parse(struct xdp_md *ctx, struct counters *c, struct frame *fr)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;

    fr->len = data_end - data;
    c->n[C_RX_PACKETS]++;
    c->n[C_RX_BYTES] += fr->len;

    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return verdict(c, C_PASS, XDP_PASS);
    fr->eth = eth;
    void *l3 = eth + 1;
    __be16 proto = eth->h_proto;
    if (proto == bpf_htons(ETH_P_8021Q)) {
        struct vlan_hdr *vh = l3;
        if ((void *)(vh + 1) > data_end)
            return verdict(c, C_PASS, XDP_PASS);
        proto = vh->proto;
        l3 = vh + 1;
        fr->vh = vh;
    }
    fr->l3 = l3;
    if (proto == bpf_htons(ETH_P_IPV6))
        return PARSED_IPV6;
    if (proto != bpf_htons(ETH_P_IP))
        return verdict(c, C_PASS, XDP_PASS);

    struct iphdr *ip = l3;
    if ((void *)(ip + 1) > data_end || ip->version != IPV4_VERSION || ip->ihl < IPV4_MIN_IHL)
        return verdict(c, C_PASS, XDP_PASS);
    u32 ihl = ip->ihl * IPV4_IHL_UNIT;
    u16 tot_len = bpf_ntohs(ip->tot_len);
    if (tot_len < ihl || l3 + tot_len > data_end || ip->ttl == 0)
        return verdict(c, C_PASS, XDP_PASS);
    fr->l4 = l3 + ihl;       /* contract 8: options are parsed past, never refused */
    fr->frag = bpf_ntohs(ip->frag_off);
    return CONTINUE;
}

/* Contracts 1 and 8 for IPv6 (design.md 2.15): a sane header with a hop
 * limit, then at most IPV6_EXT_MAX extension headers (hop-by-hop, routing,
 * destination options, fragment) followed to the transport header.  A
 * chain that ends in one we do not follow (longer, or AH) is marked: it
 * passes unless it is for a VIP (classify6). */
static __always_inline int parse6(struct xdp_md *ctx, struct counters *c, struct packet6 *q)
{
    void *data_end = (void *)(long)ctx->data_end;
    struct ipv6hdr *ip6 = q->f.l3;
    if ((void *)(ip6 + 1) > data_end || ip6->version != IPV6_VERSION || ip6->hop_limit == 0 ||
        (void *)(ip6 + 1) + bpf_ntohs(ip6->payload_len) > data_end)
        return verdict(c, C_PASS, XDP_PASS);
    u8 next = ip6->nexthdr;
    void *cur = ip6 + 1;
#pragma unroll
    for (int i = 0; i < IPV6_EXT_MAX; i++) {
        if (next == IPPROTO_HOPOPTS || next == IPPROTO_ROUTING || next == IPPROTO_DSTOPTS) {
            struct ipv6_opt_hdr *h = cur;
            if ((void *)(h + 1) > data_end)
                return verdict(c, C_PASS, XDP_PASS);
            next = h->nexthdr;
            cur += (h->hdrlen + 1) * IPV6_EXT_UNIT;
        } else if (next == IPPROTO_FRAGMENT) {
            struct ipv6_frag *f = cur;
            if ((void *)(f + 1) > data_end)
                return verdict(c, C_PASS, XDP_PASS);
            next = f->nexthdr;
            q->f.frag = bpf_ntohs(f->frag_off);
            cur = f + 1;
        }
    }
    q->unparsed = next == IPPROTO_HOPOPTS || next == IPPROTO_ROUTING || next == IPPROTO_DSTOPTS ||
                  next == IPPROTO_FRAGMENT || next == IPV6_AH;
    q->l4proto = next;
    q->f.l4 = cur;
    return CONTINUE;
}

/* ---- stage 2: classify ------------------------------------------------- */
/* Contract 7: ICMP to a VIP.  An echo request is answered here; a
 * fragmentation-needed message continues as the flow it quotes (our VIP's
 * reply to the client, so the flow is its reverse); the rest is dropped. */
static __always_inline int classify_icmp(struct xdp_md *ctx, struct counters *c, struct packet *p)
{
    void *data_end = (void *)(long)ctx->data_end;
    struct icmphdr *icmp = p->f.l4;
    if (p->f.frag & (IP_MF | IP_OFFSET))
        return verdict(c, C_DROP_FRAGMENT, XDP_DROP);
    if ((void *)(icmp + 1) > data_end)
        return verdict(c, C_PASS, XDP_PASS);
    if (icmp->type == ICMP_ECHO && icmp->code == 0)
        return icmp_echo(c, &p->f, icmp);
    if (icmp->type != ICMP_DEST_UNREACH || icmp->code != ICMP_FRAG_NEEDED)
        return verdict(c, C_DROP_ICMP, XDP_DROP);
    struct iphdr *in = (void *)(icmp + 1);
    if ((void *)(in + 1) > data_end || in->ihl != IPV4_MIN_IHL || in->saddr != p->key.daddr ||
        (in->protocol != IPPROTO_TCP && in->protocol != IPPROTO_UDP))
        return verdict(c, C_DROP_ICMP, XDP_DROP);
    struct ports *quoted = (void *)(in + 1);
    if ((void *)(quoted + 1) > data_end)
        return verdict(c, C_DROP_ICMP, XDP_DROP);
    p->key.saddr = in->daddr;
    p->key.daddr = in->saddr;
    p->key.proto = in->protocol;
    p->key.sport = quoted->dest;
    p->key.dport = quoted->source;
    p->sk.proto = in->protocol;
    p->sk.port = quoted->source;
    p->f.ptb = 1;
    return CONTINUE;
}

/* Which VIP traffic a frame is.  The VIP filter lets the host's own
 * traffic pass after one inlined array read (contract 1).  The vips map is
 * read only off the common path: for ICMP, non-first fragments and (in
 * select) a services miss. */
static __always_inline int classify(struct xdp_md *ctx, struct counters *c, struct packet *p)
{
    void *data_end = (void *)(long)ctx->data_end;
    struct iphdr *ip = p->f.l3;
    if (!vip_filter_hit(ip->daddr))
        return verdict(c, C_PASS, XDP_PASS);

    u8 proto = ip->protocol;
    p->key.saddr = ip->saddr;
    p->key.daddr = ip->daddr;
    p->key.proto = proto;
    p->sk.vip = ip->daddr;
    p->sk.proto = proto;
    if (proto == IPPROTO_ICMP) {
        if (!vips.lookup(&p->sk.vip))
            return verdict(c, C_PASS, XDP_PASS);
        return classify_icmp(ctx, c, p);
    }
    if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
        return verdict(c, C_PASS, XDP_PASS);
    if (later_fragment(&p->f, 0)) {
        /* Contract 8: a non-first fragment carries no ports; only a sticky
         * service (address-only hash) can place it consistently. */
        struct vip_val *vip = vips.lookup(&p->sk.vip);
        if (!vip)
            return verdict(c, C_PASS, XDP_PASS);
        __be16 port = proto == IPPROTO_TCP ? vip->frag_port_tcp : vip->frag_port_udp;
        if (!port)
            return verdict(c, C_DROP_FRAGMENT, XDP_DROP);
        p->sk.port = port;
        p->key.dport = port;
        return CONTINUE;
    }
    struct ports *ports = p->f.l4;
    if ((void *)(ports + 1) > data_end)
        return verdict(c, C_PASS, XDP_PASS);
    p->key.sport = ports->source;
    p->key.dport = ports->dest;
    p->sk.port = ports->dest;
    if (proto == IPPROTO_TCP)
        p->f.syn = tcp_syn(p->f.l4, data_end);
    return CONTINUE;
}

/* Contract 7 for IPv6: an echo request to a VIP is answered; a Packet Too
 * Big quoting a VIP flow continues as that flow; neighbour discovery passes
 * to the kernel; other ICMPv6 to a VIP is dropped. */
static __always_inline int classify_icmp6(struct xdp_md *ctx, struct counters *c, struct packet6 *q)
{
    void *data_end = (void *)(long)ctx->data_end;
    struct icmp6hdr *icmp = q->f.l4;
    if (q->f.frag & (IPV6_FRAG_OFFSET | IPV6_FRAG_MORE))
        return verdict(c, C_DROP_FRAGMENT, XDP_DROP);
    if ((void *)(icmp + 1) > data_end)
        return verdict(c, C_PASS, XDP_PASS);
    u8 type = icmp->icmp6_type;
    if (type >= ND_FIRST && type <= ND_LAST)
        return verdict(c, C_PASS, XDP_PASS);
    if (type == ICMPV6_ECHO_REQUEST && icmp->icmp6_code == 0)
        return icmp6_echo(c, &q->f, icmp);
    if (type != ICMPV6_PKT_TOOBIG)
        return verdict(c, C_DROP_ICMP, XDP_DROP);
    struct ipv6hdr *in = (void *)(icmp + 1);
    if ((void *)(in + 1) > data_end ||
        (in->nexthdr != IPPROTO_TCP && in->nexthdr != IPPROTO_UDP))
        return verdict(c, C_DROP_ICMP, XDP_DROP);
    struct ports *quoted = (void *)(in + 1);
    if ((void *)(quoted + 1) > data_end)
        return verdict(c, C_DROP_ICMP, XDP_DROP);
    __builtin_memcpy(&q->key.saddr, &in->daddr, sizeof(struct addr6));
    __builtin_memcpy(&q->key.daddr, &in->saddr, sizeof(struct addr6));
    if (!addr6_eq(&q->key.daddr, &q->sk.vip))
        return verdict(c, C_DROP_ICMP, XDP_DROP);
    q->key.proto = in->nexthdr;
    q->key.sport = quoted->dest;
    q->key.dport = quoted->source;
    q->sk.proto = in->nexthdr;
    q->sk.port = quoted->source;
    q->f.ptb = 1;
    return CONTINUE;
}

/* Stage 2 for IPv6: the VIP filter (on the folded address), then as
 * classify(); a chain of extension headers we do not follow is dropped
 * for a VIP (drop_ipv6_ext). */
static __always_inline int classify6(struct xdp_md *ctx, struct counters *c, struct packet6 *q)
{
    void *data_end = (void *)(long)ctx->data_end;
    struct ipv6hdr *ip6 = q->f.l3;
    struct addr6 *daddr = (struct addr6 *)&ip6->daddr;
    if (!vip_filter_hit(addr6_fold(daddr)))
        return verdict(c, C_PASS, XDP_PASS);
    u8 proto = q->l4proto;
    q->sk.vip = *daddr;
    q->sk.proto = proto;
    q->key.daddr = *daddr;
    __builtin_memcpy(&q->key.saddr, &ip6->saddr, sizeof(struct addr6));
    q->key.proto = proto;
    if (q->unparsed || proto == IPPROTO_ICMPV6 || later_fragment(&q->f, 1)) {
        struct vip_val *vip = vips6.lookup(&q->sk.vip);
        if (!vip)
            return verdict(c, C_PASS, XDP_PASS);
        if (q->unparsed)
            return verdict(c, C_DROP_IPV6_EXT, XDP_DROP);
        if (proto == IPPROTO_ICMPV6)
            return classify_icmp6(ctx, c, q);
        if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
            return verdict(c, C_PASS, XDP_PASS);
        /* contract 8: a non-first fragment follows only a sticky service */
        __be16 port = proto == IPPROTO_TCP ? vip->frag_port_tcp : vip->frag_port_udp;
        if (!port)
            return verdict(c, C_DROP_FRAGMENT, XDP_DROP);
        q->sk.port = port;
        q->key.dport = port;
        return CONTINUE;
    }
    if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
        return verdict(c, C_PASS, XDP_PASS);
    struct ports *ports = q->f.l4;
    if ((void *)(ports + 1) > data_end)
        return verdict(c, C_PASS, XDP_PASS);
    q->key.sport = ports->source;
    q->key.dport = ports->dest;
    q->sk.port = ports->dest;
    if (proto == IPPROTO_TCP)
        q->f.syn = tcp_syn(q->f.l4, data_end);
    return CONTINUE;
}

/* ---- stage 3: select --------------------------------------------------- */
/* The service (one hash lookup; contract 6: VIP traffic for no service is
 * dropped, a VIP filter collision passes), then contract 4: a live flow
 * keeps its destination, its record refreshed at most once a second (an
 * ICMP message only follows it); else contracts 3 and 5: a new selection
 * from the eligible destinations, recorded as a flow.  Every connection
 * has its own record, a sticky service's too (contract 5 tells a client's
 * new connection from its open ones); the first fragment of a sticky
 * service's datagram also records its address pair, which the later
 * fragments, carrying no ports, look up (contract 8).  sk and key are the
 * family's service and flow keys. */
static __always_inline int select_dest(struct counters *c, struct frame *fr, void *sk, void *key, int v6,
                                       struct choice *ch)
{
    struct svc_val *svc = v6 ? services6.lookup(sk) : services.lookup(sk);
    if (!svc || svc->index >= MAX_SERVICES) {
        if (!svc && !fr->ptb && !vip_of(sk, v6))
            return verdict(c, C_PASS, XDP_PASS);
        return verdict(c, fr->ptb ? C_DROP_ICMP : C_DROP_NO_SERVICE, XDP_DROP);
    }
    if (svc->flags & SVC_STICKY)
        fr->sticky = 1;
    else if (later_fragment(fr, v6))
        return verdict(c, C_DROP_FRAGMENT, XDP_DROP);
    ch->index = svc->index;

    u64 now = flow_clock();
    struct flow_head *f = v6 ? (void *)flows6.lookup(key) : (void *)flows.lookup(key);
    struct dest *d = flow_dest(fr, key, v6, svc, f, now);
    if (d) {
        if (!fr->ptb && (s64)(now - f->last_seen) > (s64)FLOW_REFRESH_NS)
            f->last_seen = now;
        ch->d = d;
        ch->slot = f->dest_slot;
    } else {
        u32 drop = fr->ptb ? C_DROP_ICMP : C_DROP_NO_DEST;
        u32 slot = 0;
        if (svc->ndest == 0 || maglev_pick(svc, flow_hash(key, v6, fr->sticky), &slot) < 0)
            return verdict(c, drop, XDP_DROP);
        d = dest_at(svc->index, slot);
        if (!d)
            return verdict(c, drop, XDP_DROP);
        ch->d = d;
        ch->slot = slot;
        if (fr->ptb)
            return CONTINUE;
        /* Counted so the control plane can tell evictions apart: records
         * created = new_flows - flow_reselect (f: a record is replaced). */
        c->n[C_FLOW_RESELECT] += f != 0;
        c->n[C_NEW_FLOWS]++;
        record_flow(key, v6, ch, now);
        ch->new_flow = 1;
    }
    if (fr->sticky && first_fragment(fr, v6) && !fr->ptb)
        record_pair(key, v6, ch, now);
    return CONTINUE;
}

/* ---- stage 4: account -------------------------------------------------- */
/* Whether the destination can take the frame: the frame's 802.1Q tagging
 * must match the destination's (contract 2), and a tunnelled frame must
 * fit the egress MTU (contract 13: else an ICMP error, from the VIP, says
 * what fits).  Before account(): a frame not forwarded is not counted as
 * forwarded.  A GUE-over-IPv6 frame is checked against GUE6_MTU_MAX at
 * most, the most its checksum loop sums. */
static __always_inline int fits(struct xdp_md *ctx, struct counters *c, struct frame *fr, int v6,
                                struct dest *d)
{
    if ((fr->vh != 0) != (d->vlan != 0))
        return verdict(c, C_DROP_VLAN, XDP_DROP);
    if (d->forwarding == FWD_L2)
        return CONTINUE;
    u32 overhead = tunnel_overhead(d, v6);
    u32 mtu = v6 && d->forwarding == FWD_GUE && d->mtu > GUE6_MTU_MAX ? GUE6_MTU_MAX : d->mtu;
    u32 len = v6 ? sizeof(struct ipv6hdr) + bpf_ntohs(((struct ipv6hdr *)fr->l3)->payload_len)
                 : bpf_ntohs(((struct iphdr *)fr->l3)->tot_len);
    if (len + overhead <= mtu)
        return CONTINUE;
    /* the control plane prevents both: a quote longer than the frame, an
     * MTU that leaves less than a frame (IPv6: its minimum MTU) inside */
    if (len < ICMP_QUOTE_LEN || mtu < (v6 ? IPV6_MIN_MTU : 1) + overhead)
        return verdict(c, C_DROP_ENCAP, XDP_DROP);
    if (v6)
        return icmp6_too_big(ctx, c, fr, mtu - overhead);
    return icmp_too_big(ctx, c, fr, mtu - overhead);
}

/* Contract 9 for an IPv4 client: its /20 counted. */
static __always_inline void count_prefix(__be32 saddr)
{
    u32 src_prefix = bpf_ntohl(saddr) >> (32 - SRC_PREFIX_LEN);
    u64 *pc = prefix_stats.lookup(&src_prefix);
    if (pc)
        *pc += 1;
}

static __always_inline void count_prefix6(struct addr6 *saddr)
{
    u64 prefix = 0;
    __builtin_memcpy(&prefix, saddr, SRC_PREFIX6_LEN / 8);
    u32 slot = (prefix * PREFIX6_MULT) >> (64 - PREFIX6_ORDER);
    struct prefix6_count *pc = prefix_stats6.lookup(&slot);
    if (!pc)
        return;       /* cannot happen: slot is below PREFIX6_SLOTS */
    if (pc->prefix == prefix) {
        pc->packets++;
    } else if (pc->packets == 0) {
        pc->prefix = prefix;
        pc->packets = 1;
    } else {
        pc->packets--;
    }
}

/* Contract 9: per client source prefix, service and destination. */
static __always_inline void account(struct counters *c, struct frame *fr, void *key, int v6, struct choice *ch)
{
    if (v6)
        count_prefix6(&((struct flow_key6 *)key)->saddr);
    else
        count_prefix(((struct flow_key *)key)->saddr);
    if (fr->ptb)
        c->n[C_ICMP_PTB_FORWARDED]++;
    u32 si = ch->index;
    stats_add(svc_stats.lookup(&si), fr->len, ch->new_flow);
    u32 di = ch->index * MAX_DESTINATIONS + ch->slot;
    stats_add(dest_stats.lookup(&di), fr->len, ch->new_flow);
}

/* ---- stage 5: forward -------------------------------------------------- */
/* Contract 13: an outer IPv4 header (and for GUE a UDP header) goes in
 * front of the client's packet, from the tunnel source to the
 * destination, DF set (a fragmented outer packet could not be
 * decapsulated by XDP) and TOS copied; the Ethernet header and its 802.1Q
 * tag move to the new front for forward() to address to the next hop. */
static __always_inline int encapsulate(struct xdp_md *ctx, struct counters *c, struct frame *fr, void *key,
                                       struct dest *d)
{
    u32 overhead = tunnel_overhead(d, 0);
    if (!overhead)
        return CONTINUE;     /* not a tunnel (the verifier needs the bound too) */
    int gue = d->forwarding == FWD_GUE;
    struct iphdr *in = fr->l3;
    struct iphdr h = {};
    h.version = IPV4_VERSION;
    h.ihl = IPV4_MIN_IHL;
    h.tos = in->tos;
    u16 inner_len = bpf_ntohs(in->tot_len);
    h.tot_len = bpf_htons(inner_len + overhead);
    h.frag_off = bpf_htons(IP_DF);
    h.ttl = TUNNEL_TTL;
    h.protocol = gue ? IPPROTO_UDP : IPPROTO_IPIP;
    h.saddr = d->tun_src;
    h.daddr = d->addr;
    h.check = ipv4_csum(&h);
    struct udphdr u = {};
    if (gue) {
        u.source = bpf_htons(GUE_SPORT_BASE | (flow_hash(key, 0, fr->sticky) & GUE_SPORT_MASK));
        u.dest = d->gue_port;
        u.len = bpf_htons(inner_len + sizeof(u));   /* checksum 0: none, as IPv4 allows */
    }
    struct iphdr *outer = push_front(ctx, overhead, fr);
    void *data_end = (void *)(long)ctx->data_end;
    if (!outer || (void *)outer + overhead > data_end)
        return verdict(c, C_DROP_ENCAP, XDP_DROP);
    *outer = h;
    if (gue) {
        *(struct udphdr *)(outer + 1) = u;
        c->n[C_ENCAP_GUE]++;
    } else {
        c->n[C_ENCAP_IPIP]++;
    }
    return CONTINUE;
}

/* Contract 13 for IPv6: an outer IPv6 header with the inner packet's
 * traffic class, a flow label from the flow hash (so ECMP on the way
 * spreads flows), hop limit 64, from the tunnel source to the destination;
 * next header 41 (IPv6-in-IPv6), or UDP to the GUE port with the source
 * port from the flow hash and the checksum summed over the datagram. */
static __always_inline int encapsulate6(struct xdp_md *ctx, struct counters *c, struct frame *fr, void *key,
                                        struct dest *d)
{
    u32 overhead = tunnel_overhead(d, 1);
    if (!overhead)
        return CONTINUE;     /* not a tunnel (the verifier needs the bound too) */
    int gue = d->forwarding == FWD_GUE;
    struct ipv6hdr *in = fr->l3;
    u32 first = bpf_ntohl(*(__be32 *)in) & IPV6_TC_MASK;
    u16 inner_len = sizeof(*in) + bpf_ntohs(in->payload_len);
    u32 hash = flow_hash(key, 1, fr->sticky);
    struct ipv6hdr *outer = push_front(ctx, overhead, fr);
    void *data_end = (void *)(long)ctx->data_end;
    if (!outer || (void *)outer + sizeof(struct ipv6hdr) + sizeof(struct udphdr) > data_end)
        return verdict(c, C_DROP_ENCAP, XDP_DROP);      /* either: the inner header follows */
    *(__be32 *)outer = bpf_htonl((IPV6_VERSION << 28) | first | (hash & IPV6_FLOW_MASK));
    outer->payload_len = bpf_htons(inner_len + overhead - sizeof(*outer));
    outer->hop_limit = TUNNEL_TTL;
    __builtin_memcpy(&outer->saddr, &d->tun_src6, sizeof(struct addr6));
    __builtin_memcpy(&outer->daddr, &d->addr6, sizeof(struct addr6));
    if (!gue) {
        outer->nexthdr = IPPROTO_IPV6;
        c->n[C_ENCAP_IPIP]++;
        return CONTINUE;
    }
    outer->nexthdr = IPPROTO_UDP;
    struct udphdr *u = (void *)(outer + 1);
    u->source = bpf_htons(GUE_SPORT_BASE | (hash & GUE_SPORT_MASK));
    u->dest = d->gue_port;
    u->len = outer->payload_len;
    u->check = 0;
    struct pseudo6 ph = {};
    __builtin_memcpy(&ph.saddr, &outer->saddr, sizeof(ph.saddr));
    __builtin_memcpy(&ph.daddr, &outer->daddr, sizeof(ph.daddr));
    u32 ulen = inner_len + sizeof(*u);
    ph.len = bpf_htonl(ulen);
    ph.nexthdr = bpf_htonl(IPPROTO_UDP);
    u32 off = (void *)u - (void *)(long)ctx->data;
    s64 sum = csum_bytes(ctx, off, ulen, bpf_csum_diff(0, 0, (void *)&ph, sizeof(ph), 0));
    if (sum < 0)
        return verdict(c, C_DROP_ENCAP, XDP_DROP);     /* cannot happen: parse6 checked the length */
    __sum16 check = csum_fold(sum);
    u->check = check ? check : UDP_CSUM_ZERO;
    c->n[C_ENCAP_GUE]++;
    return CONTINUE;
}

/* Contract 2: the Ethernet header (and 802.1Q id) rewritten for the
 * destination, or a tunnel's next hop, after the family's encapsulation,
 * and the frame handed back out: XDP_TX through the ingress interface,
 * else a redirect through the devmap. */
static __always_inline int forward(struct xdp_md *ctx, struct counters *c, struct frame *fr, void *key, int v6,
                                   struct dest *d)
{
    if (d->forwarding != FWD_L2) {    /* the common case adds nothing: no call, no switch */
        int action = v6 ? encapsulate6(ctx, c, fr, key, d) : encapsulate(ctx, c, fr, key, d);
        if (action != CONTINUE)
            return action;
    }
    if (fr->vh)
        fr->vh->tci = (fr->vh->tci & bpf_htons(VLAN_PRIO_MASK)) | bpf_htons(d->vlan & VLAN_VID_MASK);
    __builtin_memcpy(fr->eth->h_dest, d->mac, ETH_ALEN);
    __builtin_memcpy(fr->eth->h_source, d->src_mac, ETH_ALEN);
    if (d->ifindex == ctx->ingress_ifindex)
        return verdict(c, C_TX, XDP_TX);
    c->n[C_REDIRECT]++;
    return tx_ports.redirect_map(d->tx_port, XDP_DROP);
}

/* ---- the program ------------------------------------------------------- */
/* Stages 3 to 5, the same for both families. */
static __always_inline int send_to_destination(struct xdp_md *ctx, struct counters *c, struct frame *fr,
                                               void *sk, void *key, int v6)
{
    struct choice ch = {};
    int action = select_dest(c, fr, sk, key, v6, &ch);
    if (action != CONTINUE || !ch.d)
        return action;
    action = fits(ctx, c, fr, v6, ch.d);
    if (action != CONTINUE)
        return action;
    account(c, fr, key, v6, &ch);
    return forward(ctx, c, fr, key, v6, ch.d);
}

static __always_inline int xdp_lb6(struct xdp_md *ctx, struct counters *c, struct frame *fr)
{
    struct packet6 q = {};
    q.f = *fr;
    int action = parse6(ctx, c, &q);
    if (action != CONTINUE)
        return action;
    action = classify6(ctx, c, &q);
    if (action != CONTINUE)
        return action;
    return send_to_destination(ctx, c, &q.f, &q.sk, &q.key, 1);
}

int xdp_lb(struct xdp_md *ctx)
{
    u32 zero = 0;
    struct counters *c = counters.lookup(&zero);
    if (!c)
        return XDP_PASS;     /* cannot happen: a one-entry array */

    struct packet p = {};
    int action = parse(ctx, c, &p.f);
    if (action == PARSED_IPV6)
        return xdp_lb6(ctx, c, &p.f);
    if (action != CONTINUE)
        return action;
    action = classify(ctx, c, &p);
    if (action != CONTINUE)
        return action;
    return send_to_destination(ctx, c, &p.f, &p.sk, &p.key, 0);
}
