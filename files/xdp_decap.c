/* SPDX-License-Identifier: GPL-2.0-or-later
 *
 * xvs.lb realserver decapsulation: the other end of the balancer's IPIP
 * and GUE tunnels (files/xdp_lb.c, docs/design.md section 2.13), as one XDP
 * program for hosts whose kernel has no ipip or fou module, or that should
 * not grow tunnel devices.  Compiled and loaded by bcc
 * (plugins/module_utils/_decap.py, the xvs_decap module).
 *
 * The contract (docs/design.md section 2.14): a packet is decapsulated only
 * when all hold, else it passes untouched (XDP_PASS, byte-identical):
 *   - it is an unfragmented IPv4 packet (one 802.1Q tag allowed) carrying
 *     IPIP (protocol 4) with ipip enabled, or UDP to the configured GUE port
 *     whose payload starts with an IPv4 header (GUE variant 1); or an IPv6
 *     packet whose next header is IPv6 (41, IPv6-in-IPv6) with ipip enabled,
 *     or UDP to the GUE port whose payload starts with an IPv6 header;
 *   - the inner packet, of the outer's family, is addressed to one of the
 *     host's configured VIPs;
 *   - when balancer sources are configured, the outer source is one.
 * The outer headers are removed, the Ethernet header (and tag) moved up,
 * and the inner packet passed to the kernel as if it had arrived plain.
 * GUE's UDP checksum (there over IPv6) is not verified: the inner packet's
 * own transport checksum, which covers its addresses, still is, by the
 * kernel, and summing the datagram here would cost what the balancer pays.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/ipv6.h>

#ifndef XVS_PIN_ROOT
#error "XVS_PIN_ROOT (the bpffs directory holding the pinned maps) must be defined"
#endif
#ifndef MAX_VIPS
#define MAX_VIPS 1024
#endif
#ifndef MAX_SOURCES
#define MAX_SOURCES 256
#endif

#define PIN(name) XVS_PIN_ROOT "/" name
#define IP_MF 0x2000
#define IP_OFFSET 0x1fff
#define IPV4_VERSION 4
#define IPV4_MIN_IHL 5
#define IPV4_IHL_UNIT 4
#define IPV6_VERSION 6

/* Mirrored in _decap.py. */
struct config {
    u8 ipip;            /* decapsulate IPIP */
    u8 check_sources;   /* only from the sources map's addresses */
    __be16 gue_port;    /* decapsulate GUE on this UDP port; 0: not */
};

enum counter {
    C_DECAP_IPIP,
    C_DECAP_GUE,
    C_NOT_VIP,          /* a tunnel packet for no configured VIP: passed */
    C_NOT_SOURCE,       /* a tunnel packet from no configured source: passed */
    C_MAX,
};

BPF_TABLE_PINNED("array", u32, struct config, config, 1, PIN("config"));
BPF_TABLE_PINNED("hash", __be32, u8, vips, MAX_VIPS, PIN("vips"));
BPF_TABLE_PINNED("hash", __be32, u8, sources, MAX_SOURCES, PIN("sources"));
BPF_TABLE_PINNED("percpu_array", u32, u64, counters, C_MAX, PIN("counters"));

struct addr6 {
    __be32 w[4];
};

BPF_TABLE_PINNED("hash", struct addr6, u8, vips6, MAX_VIPS, PIN("vips6"));
BPF_TABLE_PINNED("hash", struct addr6, u8, sources6, MAX_SOURCES, PIN("sources6"));

struct vlan_hdr {
    __be16 tci;
    __be16 proto;
};

static __always_inline int count(u32 counter, int action)
{
    u64 *n = counters.lookup(&counter);
    if (n)
        *n += 1;
    return action;
}

/* Move the Ethernet header (and tag) up to just before the inner packet,
 * then drop the outer headers (outer bytes) from the front. */
static __always_inline int strip(struct xdp_md *ctx, u32 l2, u32 outer, u32 counter)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    struct ethhdr *moved = data + outer;
    if ((void *)(eth + 1) + sizeof(struct vlan_hdr) > data_end ||
        (void *)(moved + 1) + sizeof(struct vlan_hdr) > data_end)
        return XDP_PASS;
    if (l2 > sizeof(*eth))
        *(struct vlan_hdr *)(moved + 1) = *(struct vlan_hdr *)(eth + 1);
    __builtin_memmove(moved, eth, sizeof(*eth));
    if (bpf_xdp_adjust_head(ctx, outer))
        return XDP_PASS;      /* cannot happen: shrinking by what is there */
    return count(counter, XDP_PASS);
}

/* Which tunnel an outer header with this protocol (IPv4's protocol or
 * IPv6's next header; ipip_proto the family's IP-in-IP one) and transport
 * header l4 is: its counter, *outer grown by GUE's UDP header; -1 for a
 * packet that is none we undo. */
static __always_inline int tunnel(struct config *cfg, u8 proto, u8 ipip_proto, void *l4, void *data_end,
                                  u32 *outer)
{
    if (proto == ipip_proto && cfg->ipip)
        return C_DECAP_IPIP;
    if (proto != IPPROTO_UDP || !cfg->gue_port)
        return -1;
    struct udphdr *udp = l4;
    if ((void *)(udp + 1) > data_end || udp->dest != cfg->gue_port)
        return -1;
    *outer += sizeof(*udp);
    return C_DECAP_GUE;
}

/* IPv6-in-IPv6 (next header 41) or GUE over IPv6 (UDP to the GUE port):
 * an outer IPv6 header with no extension header, an IPv6 packet to a VIP
 * inside. */
static __always_inline int decap6(struct xdp_md *ctx, struct config *cfg, u32 l2)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    if (l2 > sizeof(struct ethhdr) + sizeof(struct vlan_hdr))      /* bounds for the verifier */
        return XDP_PASS;
    struct ipv6hdr *ip6 = data + l2;
    if ((void *)(ip6 + 1) > data_end || ip6->version != IPV6_VERSION)
        return XDP_PASS;
    u32 outer = sizeof(*ip6);
    int counter = tunnel(cfg, ip6->nexthdr, IPPROTO_IPV6, ip6 + 1, data_end, &outer);
    if (counter < 0)
        return XDP_PASS;
    struct ipv6hdr *inner = (void *)ip6 + outer;
    if ((void *)(inner + 1) > data_end || inner->version != IPV6_VERSION)
        return XDP_PASS;
    if (!vips6.lookup((struct addr6 *)&inner->daddr))
        return count(C_NOT_VIP, XDP_PASS);
    if (cfg->check_sources && !sources6.lookup((struct addr6 *)&ip6->saddr))
        return count(C_NOT_SOURCE, XDP_PASS);
    return strip(ctx, l2, outer, counter);
}

int xdp_decap(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    u32 zero = 0;
    struct config *cfg = config.lookup(&zero);
    if (!cfg)
        return XDP_PASS;

    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return XDP_PASS;
    u32 l2 = sizeof(*eth);
    __be16 proto = eth->h_proto;
    if (proto == bpf_htons(ETH_P_8021Q)) {
        struct vlan_hdr *vh = (void *)(eth + 1);
        if ((void *)(vh + 1) > data_end)
            return XDP_PASS;
        proto = vh->proto;
        l2 += sizeof(*vh);
    }
    if (proto == bpf_htons(ETH_P_IPV6))
        return decap6(ctx, cfg, l2);
    if (proto != bpf_htons(ETH_P_IP))
        return XDP_PASS;
    struct iphdr *ip = data + l2;
    if ((void *)(ip + 1) > data_end || ip->version != IPV4_VERSION || ip->ihl < IPV4_MIN_IHL ||
        (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET)))
        return XDP_PASS;
    u32 outer = ip->ihl * IPV4_IHL_UNIT;
    int counter = tunnel(cfg, ip->protocol, IPPROTO_IPIP, (void *)ip + outer, data_end, &outer);
    if (counter < 0)
        return XDP_PASS;
    struct iphdr *inner = (void *)ip + outer;
    if ((void *)(inner + 1) > data_end || inner->version != IPV4_VERSION)
        return XDP_PASS;
    if (!vips.lookup(&inner->daddr))
        return count(C_NOT_VIP, XDP_PASS);
    if (cfg->check_sources && !sources.lookup(&ip->saddr))
        return count(C_NOT_SOURCE, XDP_PASS);

    if (outer > 2 * sizeof(struct iphdr) + sizeof(struct udphdr))   /* bounds for the verifier */
        return XDP_PASS;
    return strip(ctx, l2, outer, counter);
}
