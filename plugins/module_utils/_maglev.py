# -*- coding: utf-8 -*-
# Copyright (c) xvs.lb contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Weighted Maglev lookup table (Eisenbud et al., NSDI 2016, section 3.4).

Each destination walks its own permutation of the table (offset and skip
from a hash of its address) and claims the next free slot in turn.  Weights
enter as credit: each round a destination earns its weight and claims one
slot per max-weight of credit, so shares are proportional to weight while
the permutations keep the paper's minimal disruption.

The table depends only on (address, weight) pairs and the size, never on
their order or on the host: a fleet behind ECMP builds identical tables.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import array
import functools
import hashlib
import ipaddress
import itertools
import sys


@functools.lru_cache(maxsize=8192)
def sort_key(address):
    """Addresses (checked already) sorted as numbers, IPv4 before IPv6
    (the two do not compare), each parsed once."""
    a = ipaddress.ip_address(address)
    return a.version, a


def _permutation(name, size):
    digest = hashlib.sha256(name.encode()).digest()
    offset = int.from_bytes(digest[0:8], "little") % size
    skip = int.from_bytes(digest[8:16], "little") % (size - 1) + 1
    return offset, skip


def build_indexes(destinations, size):
    """(names, table): the eligible destinations' addresses, sorted, and a
    list of `size` indexes into names, the owner of each slot; (None, None)
    when no destination has a weight above 0.

    destinations: iterable of (address string, weight int).  size must be a
    prime (so every skip generates a full permutation).
    """
    eligible = sorted((a, w) for a, w in destinations if w > 0)
    if not eligible:
        return None, None
    names = [e[0] for e in eligible]
    if len(set(names)) != len(names):
        raise ValueError("duplicate destination in Maglev input")
    weights = [e[1] for e in eligible]
    perms = [_permutation(a, size) for a in names]
    pos = [p[0] for p in perms]      # each destination's next candidate
    skips = [p[1] for p in perms]
    taken = bytearray(size)
    table = [0] * size
    left = size
    for i in _claims(weights):
        c = pos[i]
        s = skips[i]
        while taken[c]:
            c += s
            if c >= size:
                c -= size
        taken[c] = 1
        table[c] = i
        c += s
        pos[i] = c - size if c >= size else c
        left -= 1
        if not left:
            return names, table


def _claims(weights):
    """Which destination claims the next slot, forever: each round every
    destination earns its weight and claims one slot per max-weight of
    credit.  With equal weights that is every destination in turn, without
    the credit arithmetic."""
    n, top = len(weights), max(weights)
    if min(weights) == top:
        return itertools.cycle(range(n))
    return _weighted_claims(weights, top)


def _weighted_claims(weights, top):
    credit = [0] * len(weights)
    while True:
        for i, w in enumerate(weights):
            credit[i] += w
            if credit[i] >= top:
                credit[i] -= top
                yield i


def build(destinations, size):
    """Return a list of `size` entries, each the address of the destination
    owning that slot, or None when no destination has a weight above 0
    (see build_indexes)."""
    names, table = build_indexes(destinations, size)
    return None if names is None else [names[i] for i in table]


def digest(positions):
    """A digest of a table given as positions (build()'s list, or None
    for a service with no eligible destination): the destinations'
    addresses and, per position, the rank of its owner among them (16
    bits, little-endian).  It names addresses, not the slots a balancer
    happened to write them in, so balancers behind ECMP with the same
    destinations and weights show the same digest, whatever order they
    were given in.  digest_slots() computes the same from the maps."""
    if positions is None:
        return _NO_TABLE
    names = sorted(set(positions), key=sort_key)
    rank = dict((n, i) for i, n in enumerate(names))
    return _digest(names, _le16(array.array("H", (rank[p] for p in positions))))


def digest_slots(raw, owner):
    """digest() of a live table given as the maps hold it: raw, one
    native 16-bit slot number per position; owner, {slot: address}.  A
    scrape digests every service (1,000 x 65,537 positions), so where
    every slot is below 256, the common case, the ranks are made by
    bytes.translate in C rather than position by position in Python."""
    lo, hi = (raw[0::2], raw[1::2]) if sys.byteorder == "little" else (raw[1::2], raw[0::2])
    if max(owner, default=0) > 255 or hi.count(0) != len(hi):
        slots = array.array("H")
        slots.frombytes(raw)
        return digest([owner[s] for s in slots])
    present = [s for s in owner if lo.find(bytes((s,))) >= 0]
    names = sorted((owner[s] for s in present), key=sort_key)
    rank = dict((n, i) for i, n in enumerate(names))
    table = bytearray(range(256))
    for s in present:
        table[s] = rank[owner[s]]
    ranks = bytearray(len(raw))          # little-endian 16-bit ranks, all below 256
    ranks[0::2] = lo.translate(table)
    return _digest(names, bytes(ranks))


_NO_TABLE = hashlib.sha256(b"no eligible destination").hexdigest()


def _le16(values):
    if sys.byteorder == "big":
        values.byteswap()
    return values.tobytes()


def _digest(names, ranks):
    return hashlib.sha256((",".join(names) + ";").encode() + ranks).hexdigest()


def moved(old, new):
    """The share of positions whose destination differs between two
    tables (positions as build() gives them; None: no table)."""
    if old is None and new is None:
        return 0.0
    if old is None or new is None:
        return 1.0
    return sum(1 for a, b in zip(old, new) if a != b) / float(len(new))
