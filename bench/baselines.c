/* Baselines the benchmarks measure xvs.lb against, in the same run
 * (bench/packet.py, bench/forward.py).  Each is the least a program in
 * its place could do, so the difference to it is what xvs.lb costs. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>

/* The per-packet floors: the test-run machinery with an empty program. */
int floor_tx(struct xdp_md *ctx) { return XDP_TX; }
int floor_pass(struct xdp_md *ctx) { return XDP_PASS; }

#ifndef CEILING_DST_MAC
#define CEILING_DST_MAC 0, 0, 0, 0, 0, 0
#endif

/* The forwarding ceiling: the same L2 rewrite as a DSR forward (the
 * destination MAC becomes the backend's, the source MAC the old
 * destination, i.e. our own) and XDP_TX, with no lookup at all. */
int ceiling_tx(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    const unsigned char backend[ETH_ALEN] = { CEILING_DST_MAC };
    if ((void *)(eth + 1) > data_end)
        return XDP_PASS;
    __builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
    __builtin_memcpy(eth->h_dest, backend, ETH_ALEN);
    return XDP_TX;
}

/* The receiving end of the forwarding benchmark: count and drop.  The
 * count of frames addressed to the backend MAC is what was delivered. */
BPF_PERCPU_ARRAY(delivered, u64, 1);

int sink(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    const unsigned char backend[ETH_ALEN] = { CEILING_DST_MAC };
    u32 zero = 0;
    if ((void *)(eth + 1) > data_end)
        return XDP_DROP;
    #pragma unroll
    for (int i = 0; i < ETH_ALEN; i++)
        if (eth->h_dest[i] != backend[i])
            return XDP_DROP;
    u64 *n = delivered.lookup(&zero);
    if (n)
        *n += 1;
    return XDP_DROP;
}
