/* SPDX-License-Identifier: GPL-2.0-or-later
 *
 * xvs.lb data plane: an IPv4 layer-2 direct-server-return load balancer
 * as one XDP program, compiled and loaded by bcc.
 *
 * The contract this program keeps is docs/design.md section 2; every
 * branch below names the contract line it implements.  The program knows nothing
 * of Ansible: its whole interface is the pinned maps declared here and the
 * -D macros the loader passes (plugins/module_utils/_loader.py).  The
 * struct layouts and counter names are mirrored, once, in
 * plugins/module_utils/_layout.py; the loader checks the pinned maps'
 * key and value sizes against that mirror, and a unit test checks the
 * counter list against the enum below.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>
#include <uapi/linux/icmp.h>

/* ---- sizes and options, set by the loader with -D ------------------- */
#ifndef XVS_PIN_ROOT
#error "XVS_PIN_ROOT (the bpffs directory holding the pinned maps) must be defined"
#endif
#ifndef MAX_SERVICES
#define MAX_SERVICES 64
#endif
#ifndef MAX_DESTS
#define MAX_DESTS 256           /* per service; a u16 slot number, so < 65536 */
#endif
#ifndef MAGLEV_SIZE
#define MAGLEV_SIZE 65537       /* a prime */
#endif
#ifndef FLOW_TABLE_SIZE
#define FLOW_TABLE_SIZE 1048576
#endif
#ifndef TCP_TIMEOUT
#define TCP_TIMEOUT 300         /* seconds idle */
#endif
#ifndef UDP_TIMEOUT
#define UDP_TIMEOUT 60
#endif
#ifndef MAX_IFACES
#define MAX_IFACES 64           /* devmap slots for XDP_REDIRECT */
#endif

#define ABI_VERSION 1
#define MAGLEV_CHUNK 16         /* table slots per array element */
#define MAGLEV_CHUNKS ((MAGLEV_SIZE + MAGLEV_CHUNK - 1) / MAGLEV_CHUNK)
#define PREFIX_SLOTS (1 << 20)  /* one per source /20 */
#define NSEC 1000000000ULL

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
};

/* Per VIP: which port a non-first fragment belongs to (sticky services
 * only, contract 8); 0 means fragments of that protocol are dropped. */
struct vip_val {
    __be16 frag_port_tcp;
    __be16 frag_port_udp;
    u32 pad;
};

#define DEST_VALID 1

struct dest {
    __be32 addr;
    u32 flags;       /* DEST_VALID */
    u8 mac[6];       /* the destination's MAC */
    u8 src_mac[6];   /* the balancer's MAC on the egress interface */
    u16 vlan;        /* 802.1Q id on the egress interface, 0 untagged */
    u16 tx_port;     /* slot in tx_ports when ifindex is not the ingress */
    u32 ifindex;
    u32 weight;      /* for the control plane; selection uses the maglev map */
};

struct maglev_chunk {
    u16 slot[MAGLEV_CHUNK];   /* destination slot within the service */
};

struct flow_key {
    __be32 saddr;
    __be32 daddr;
    __be16 sport;    /* 0 for sticky services: one entry per address pair */
    __be16 dport;
    u8 proto;
    u8 pad[3];
};

struct flow_val {
    u64 last_seen;   /* bpf_ktime_get_ns(), refreshed at most once a second */
    u32 svc_index;
    u32 dest_slot;
    __be32 dest_addr;/* the slot must still hold this address */
    u32 pad;
};

struct stats {
    u64 packets;
    u64 bytes;
    u64 new_flows;
};

struct meta {
    u32 abi_version;
    u32 max_services;
    u32 max_dests;
    u32 maglev_size;
    u32 flow_table_size;
    u32 tcp_timeout;
    u32 udp_timeout;
    u32 max_ifaces;
    u32 build_id[4];   /* the loader's hash of source and options */
};

/* The balancer's prefix on each VLAN of an 802.1Q trunk, by VLAN id.  The
 * program does not read it: it is kept here, pinned with the rest, so the
 * control plane finds the whole configuration in one place. */
struct vlan_net {
    __be32 net;
    u32 prefixlen;   /* 0: VLAN not configured */
};

/* Global counters; the names are listed in _layout.py in this order. */
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
    C_MAX,
};

BPF_TABLE_PINNED("array", u32, struct meta, meta, 1, PIN("meta"));
BPF_TABLE_PINNED("hash", __be32, struct vip_val, vips, MAX_SERVICES, PIN("vips"));
BPF_TABLE_PINNED("hash", struct svc_key, struct svc_val, services, MAX_SERVICES, PIN("services"));
BPF_TABLE_PINNED("array", u32, struct dest, dests, MAX_SERVICES * MAX_DESTS, PIN("dests"));
BPF_TABLE_PINNED("array", u32, struct maglev_chunk, maglev, MAX_SERVICES * 2 * MAGLEV_CHUNKS, PIN("maglev"));
BPF_TABLE_PINNED("lru_hash", struct flow_key, struct flow_val, flows, FLOW_TABLE_SIZE, PIN("flows"));
BPF_TABLE_PINNED("percpu_array", u32, u64, counters, C_MAX, PIN("counters"));
BPF_TABLE_PINNED("percpu_array", u32, struct stats, svc_stats, MAX_SERVICES, PIN("svc_stats"));
BPF_TABLE_PINNED("percpu_array", u32, struct stats, dest_stats, MAX_SERVICES * MAX_DESTS, PIN("dest_stats"));
BPF_TABLE_PINNED("percpu_array", u32, u64, prefix_stats, PREFIX_SLOTS, PIN("prefix_stats"));
BPF_TABLE_PINNED("array", u32, struct vlan_net, vlans, 4096, PIN("vlans"));
BPF_XDP_REDIRECT_MAP("devmap:" PIN("tx_ports"), int, tx_ports, MAX_IFACES);

/* ---- helpers ---------------------------------------------------------- */
struct vlan_hdr {
    __be16 tci;
    __be16 proto;
};

struct ports {
    __be16 source;
    __be16 dest;
};

static __always_inline void count(u32 c, u64 n)
{
    u64 *v = counters.lookup(&c);
    if (v)
        *v += n;
}

static __always_inline u32 verdict(u32 c, u32 action)
{
    count(c, 1);
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

static __always_inline u32 flow_hash(struct flow_key *k)
{
    u32 h = mix32(0x9e3779b9 ^ k->proto);
    h = mix32(h ^ (((u32)k->sport << 16) | k->dport));
    h = mix32(h ^ k->saddr);
    return mix32(h ^ k->daddr);
}

/* RFC 1624 incremental checksum update for one 16-bit word. */
static __always_inline __sum16 csum_replace(__sum16 check, __be16 old, __be16 new)
{
    u32 sum = (u16)~check + (u16)~old + (u16)new;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return ~sum;
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
    u32 pos = hash % MAGLEV_SIZE;
    u32 idx = (svc->index * 2 + (svc->gen & 1)) * MAGLEV_CHUNKS + pos / MAGLEV_CHUNK;
    struct maglev_chunk *c = maglev.lookup(&idx);
    if (!c)
        return -1;
    u32 s = c->slot[pos % MAGLEV_CHUNK];
    if (s >= MAX_DESTS)
        return -1;
    *slot = s;
    return 0;
}

static __always_inline struct dest *dest_at(struct svc_val *svc, u32 slot)
{
    if (svc->index >= MAX_SERVICES || slot >= MAX_DESTS)
        return 0;
    u32 idx = svc->index * MAX_DESTS + slot;
    struct dest *d = dests.lookup(&idx);
    if (!d || !(d->flags & DEST_VALID))
        return 0;
    return d;
}

/* Contract 4: an unexpired flow of this service whose destination slot
 * still holds the same address keeps its destination. */
static __always_inline struct dest *flow_dest(struct svc_val *svc, struct flow_val *f, u32 *slot)
{
    if (!f || f->svc_index != svc->index)
        return 0;
    struct dest *d = dest_at(svc, f->dest_slot);
    if (!d || d->addr != f->dest_addr)
        return 0;
    *slot = f->dest_slot;
    return d;
}

/* Contract 2: rewrite the Ethernet header (and the 802.1Q id) for the
 * destination and hand the frame back out. */
static __always_inline int forward(struct xdp_md *ctx, struct ethhdr *eth,
                                   struct vlan_hdr *vh, struct dest *d)
{
    if ((vh != 0) != (d->vlan != 0))
        return verdict(C_DROP_VLAN, XDP_DROP);
    if (vh)
        vh->tci = (vh->tci & bpf_htons(0xf000)) | bpf_htons(d->vlan & 0x0fff);
    __builtin_memcpy(eth->h_dest, d->mac, ETH_ALEN);
    __builtin_memcpy(eth->h_source, d->src_mac, ETH_ALEN);
    if (d->ifindex == ctx->ingress_ifindex)
        return verdict(C_TX, XDP_TX);
    count(C_REDIRECT, 1);
    return tx_ports.redirect_map(d->tx_port, XDP_DROP);
}

/* Contract 7: answer an echo request to a VIP from the balancer. */
static __always_inline int icmp_echo(struct ethhdr *eth, struct iphdr *ip, struct icmphdr *icmp)
{
    u8 mac[ETH_ALEN];
    __builtin_memcpy(mac, eth->h_dest, ETH_ALEN);
    __builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
    __builtin_memcpy(eth->h_source, mac, ETH_ALEN);

    __be32 a = ip->saddr;
    ip->saddr = ip->daddr;
    ip->daddr = a;
    __be16 old = *(__be16 *)&ip->ttl;        /* ttl and protocol share a word */
    ip->ttl = 64;
    ip->check = csum_replace(ip->check, old, *(__be16 *)&ip->ttl);

    icmp->type = ICMP_ECHOREPLY;
    icmp->checksum = csum_replace(icmp->checksum, bpf_htons(ICMP_ECHO << 8),
                                  bpf_htons(ICMP_ECHOREPLY << 8));
    return verdict(C_ICMP_ECHO_REPLY, XDP_TX);
}

/* ---- the program ------------------------------------------------------- */
int xdp_lb(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    u64 len = data_end - data;

    count(C_RX_PACKETS, 1);
    count(C_RX_BYTES, len);

    /* Contract 1: anything we do not fully understand passes untouched. */
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return verdict(C_PASS, XDP_PASS);
    void *l3 = eth + 1;
    __be16 proto = eth->h_proto;
    struct vlan_hdr *vh = 0;
    if (proto == bpf_htons(ETH_P_8021Q)) {
        vh = l3;
        if ((void *)(vh + 1) > data_end)
            return verdict(C_PASS, XDP_PASS);
        proto = vh->proto;
        l3 = vh + 1;
    }
    if (proto != bpf_htons(ETH_P_IP))
        return verdict(C_PASS, XDP_PASS);

    struct iphdr *ip = l3;
    if ((void *)(ip + 1) > data_end || ip->version != 4 || ip->ihl < 5)
        return verdict(C_PASS, XDP_PASS);
    u32 ihl = ip->ihl * 4;
    u16 tot_len = bpf_ntohs(ip->tot_len);
    if (tot_len < ihl || l3 + tot_len > data_end || ip->ttl == 0)
        return verdict(C_PASS, XDP_PASS);

    __be32 vip_addr = ip->daddr;
    struct vip_val *vip = vips.lookup(&vip_addr);
    if (!vip)
        return verdict(C_PASS, XDP_PASS);
    if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP &&
        ip->protocol != IPPROTO_ICMP)
        return verdict(C_PASS, XDP_PASS);

    /* Contract 8: options are parsed past (ihl), never refused. */
    void *l4 = l3 + ihl;
    u16 frag = bpf_ntohs(ip->frag_off);
    int later_fragment = (frag & 0x1fff) != 0;

    struct flow_key key = {};
    key.saddr = ip->saddr;
    key.daddr = ip->daddr;
    key.proto = ip->protocol;
    struct svc_key sk = {};
    sk.vip = ip->daddr;
    sk.proto = ip->protocol;
    int ptb = 0;

    if (ip->protocol == IPPROTO_ICMP) {
        struct icmphdr *icmp = l4;
        if (later_fragment || (frag & 0x2000))
            return verdict(C_DROP_FRAGMENT, XDP_DROP);
        if ((void *)(icmp + 1) > data_end)
            return verdict(C_PASS, XDP_PASS);
        if (icmp->type == ICMP_ECHO && icmp->code == 0)
            return icmp_echo(eth, ip, icmp);
        if (icmp->type != ICMP_DEST_UNREACH || icmp->code != ICMP_FRAG_NEEDED)
            return verdict(C_DROP_ICMP, XDP_DROP);
        /* Contract 7: the quoted header is our VIP's reply to the client;
         * the flow it belongs to is the reverse of it. */
        struct iphdr *in = (void *)(icmp + 1);
        if ((void *)(in + 1) > data_end || in->ihl != 5 || in->saddr != ip->daddr ||
            (in->protocol != IPPROTO_TCP && in->protocol != IPPROTO_UDP))
            return verdict(C_DROP_ICMP, XDP_DROP);
        struct ports *ip_ports = (void *)(in + 1);
        if ((void *)(ip_ports + 1) > data_end)
            return verdict(C_DROP_ICMP, XDP_DROP);
        key.saddr = in->daddr;
        key.daddr = in->saddr;
        key.proto = in->protocol;
        key.sport = ip_ports->dest;
        key.dport = ip_ports->source;
        sk.proto = in->protocol;
        sk.port = ip_ports->source;
        ptb = 1;
    } else if (later_fragment) {
        /* Contract 8: a non-first fragment carries no ports; only a sticky
         * service (address-only hash) can place it consistently. */
        __be16 port = ip->protocol == IPPROTO_TCP ? vip->frag_port_tcp : vip->frag_port_udp;
        if (!port)
            return verdict(C_DROP_FRAGMENT, XDP_DROP);
        sk.port = port;
        key.dport = port;
    } else {
        struct ports *p = l4;
        if ((void *)(p + 1) > data_end)
            return verdict(C_PASS, XDP_PASS);
        key.sport = p->source;
        key.dport = p->dest;
        sk.port = p->dest;
    }

    /* Contract 6: VIP traffic with no service or no eligible destination. */
    struct svc_val *svc = services.lookup(&sk);
    if (!svc || svc->index >= MAX_SERVICES)
        return verdict(ptb ? C_DROP_ICMP : C_DROP_NO_SERVICE, XDP_DROP);
    if (svc->flags & SVC_STICKY)
        key.sport = 0;
    else if (later_fragment)
        return verdict(C_DROP_FRAGMENT, XDP_DROP);

    u32 src_prefix = bpf_ntohl(key.saddr) >> 12;
    u64 *pc = prefix_stats.lookup(&src_prefix);
    if (pc)
        *pc += 1;

    u64 now = bpf_ktime_get_ns();
    u64 timeout = (key.proto == IPPROTO_TCP ? TCP_TIMEOUT : UDP_TIMEOUT) * NSEC;
    u32 slot = 0;
    struct flow_val *f = flows.lookup(&key);
    int replaces = f != 0;   /* a record exists: a new one would replace it */
    if (f && now - f->last_seen > timeout)
        f = 0;
    struct dest *d = flow_dest(svc, f, &slot);
    int new_flow = 0;
    if (d) {
        if (!ptb && now - f->last_seen > NSEC)
            f->last_seen = now;
    } else {
        /* Contracts 3 and 5: select from the eligible destinations. */
        if (svc->ndest == 0 || maglev_pick(svc, flow_hash(&key), &slot) < 0)
            return verdict(ptb ? C_DROP_ICMP : C_DROP_NO_DEST, XDP_DROP);
        d = dest_at(svc, slot);
        if (!d)
            return verdict(ptb ? C_DROP_ICMP : C_DROP_NO_DEST, XDP_DROP);
        if (!ptb) {
            /* Counted so the control plane can tell evictions apart:
             * records created = new_flows - flow_reselect. */
            if (replaces)
                count(C_FLOW_RESELECT, 1);
            struct flow_val nf = {};
            nf.last_seen = now;
            nf.svc_index = svc->index;
            nf.dest_slot = slot;
            nf.dest_addr = d->addr;
            flows.update(&key, &nf);
            new_flow = 1;
            count(C_NEW_FLOWS, 1);
        }
    }
    if (ptb)
        count(C_ICMP_PTB_FORWARDED, 1);

    u32 si = svc->index;
    stats_add(svc_stats.lookup(&si), len, new_flow);
    u32 di = svc->index * MAX_DESTS + slot;
    stats_add(dest_stats.lookup(&di), len, new_flow);

    return forward(ctx, eth, vh, d);
}
