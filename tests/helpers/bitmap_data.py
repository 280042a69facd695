"""Bitmap contents for tests of bitmap storage, shaped by the clusters that will hold them.

In a qcow2 image a bitmap's data is cut into clusters, and a cluster that is all zeroes or all
ones is stored as a bare table entry instead of data. :func:`random_bits` builds bits cluster
by cluster from a list of *kinds* (``zero``, ``ones``, ``random``, ``sparse``, and ``almost``:
all ones but one, so nearly a shortcut), so a test chooses which of those paths the store
takes::

    one data cluster of 512 bytes = 4096 granules
    kinds ["ones", "zero", "random"] -> clusters 0, 3, 6.. all ones; 1, 4, .. zero; 2, 5, .. random

:func:`seeded_bitmaps` gives the same bitmaps for the same seed in any process (the crash test
rebuilds, in the test, what a killed child was storing). Only the standard library and
:mod:`bitback.bitmaps` are used, so a child process may import this module cheaply.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

from bitback.bitmaps import GranuleBits

__all__ = ["KINDS", "random_bits", "seeded_bitmaps"]

KINDS = ("zero", "ones", "random", "sparse", "almost")


def _cluster(rnd: random.Random, kind: str, n: int) -> bytes:
    if kind == "zero":
        return bytes(n)
    if kind == "ones":
        return b"\xff" * n
    if kind == "random":
        return rnd.randbytes(n)
    if kind == "sparse":  # a few scattered bits, the first and last granule among them
        out = bytearray(n)
        for bit in {0, 8 * n - 1, *(rnd.randrange(8 * n) for _ in range(3))}:
            out[bit // 8] |= 1 << (bit % 8)
        return bytes(out)
    if kind == "almost":  # all ones but the first, the last or any one bit
        out = bytearray(b"\xff" * n)
        bit = rnd.choice([0, 8 * n - 1, rnd.randrange(8 * n)])
        out[bit // 8] &= ~(1 << (bit % 8)) & 0xFF
        return bytes(out)
    raise ValueError(kind)


def random_bits(rnd: random.Random, size: int, granularity: int, cluster_size: int,
                kinds: Sequence[str]) -> GranuleBits:
    """Bits for a disk of ``size`` bytes whose data clusters (``cluster_size`` bytes of
    bitmap each) are of ``kinds`` in turn, repeated to the end. The last cluster is usually
    partly used: a ``ones`` one then has every granule that exists set."""
    granules = -(-size // granularity)
    total = -(-granules // 8)
    data = bytearray()
    index = 0
    while len(data) < total:
        n = min(cluster_size, total - len(data))
        data += _cluster(rnd, kinds[index % len(kinds)], n)
        index += 1
    return GranuleBits.from_bytes(bytes(data), size, granularity)


def seeded_bitmaps(seed: int, count: int, size: int,
                   cluster_size: int) -> Iterator[tuple[str, int, GranuleBits]]:
    """``count`` bitmaps (name, granularity, bits) determined by ``seed``."""
    rnd = random.Random(seed)
    for i in range(count):
        granularity = rnd.choice([512, 1024, 4096])
        kinds = rnd.choice([["random"], ["zero", "ones", "random"], ["ones"], ["sparse"]])
        yield f"s{i}", granularity, random_bits(rnd, size, granularity, cluster_size, kinds)
