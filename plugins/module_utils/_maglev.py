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

import hashlib


def _permutation(name, size):
    digest = hashlib.sha256(name.encode()).digest()
    offset = int.from_bytes(digest[0:8], "little") % size
    skip = int.from_bytes(digest[8:16], "little") % (size - 1) + 1
    return offset, skip


def build(destinations, size):
    """Return a list of `size` entries, each the address of the destination
    owning that slot, or None when no destination has a weight above 0.

    destinations: iterable of (address string, weight int).  size must be a
    prime (so every skip generates a full permutation).
    """
    eligible = sorted((a, w) for a, w in destinations if w > 0)
    if not eligible:
        return None
    names = [e[0] for e in eligible]
    if len(set(names)) != len(names):
        raise ValueError("duplicate destination in Maglev input")
    weights = [e[1] for e in eligible]
    top = max(weights)
    perms = [_permutation(a, size) for a in names]
    pos = [p[0] for p in perms]      # each destination's next candidate
    skips = [p[1] for p in perms]
    credit = [0] * len(names)
    table = [-1] * size
    filled = 0
    while True:
        for i in range(len(names)):
            credit[i] += weights[i]
            if credit[i] < top:
                continue
            credit[i] -= top
            c = pos[i]
            while table[c] >= 0:
                c += skips[i]
                if c >= size:
                    c -= size
            table[c] = i
            c += skips[i]
            pos[i] = c - size if c >= size else c
            filled += 1
            if filled == size:
                return [names[i] for i in table]
