"""GranuleBits.sha256 against the digests QEMU 7.2 gave for the same bitmaps (no processes).

``x-debug-block-dirty-bitmap-sha256`` hashes QEMU's HBitmap last level; the vectors in
:data:`helpers.seedsetup.QEMU72_VECTORS` were measured on QEMU 7.2.22 for six bitmaps
(granularity 512 B to 2 GiB) through writes, growth, a merge into a finer and into a coarser
bitmap, a shrink and an unaligned growth. Here the same steps are replayed on
:class:`bitback.bitmaps.GranuleBits` and, separately, on a set-of-granules model
(:func:`helpers.seedsetup.granule_sha256`), and both must give QEMU's count and digest after
every step.
"""

from __future__ import annotations

import hashlib

import pytest

from bitback.bitmaps import DEFAULT_GRANULARITY, GranuleBits
from helpers.seedsetup import QEMU72_VECTORS, VECTOR_BITMAPS, VECTOR_STEPS, granule_sha256

GRANULARITIES = {name: g or DEFAULT_GRANULARITY for name, g in VECTOR_BITMAPS.items()}


def _replay_bits() -> list[tuple[int, dict[str, GranuleBits]]]:
    """The bitmaps after each step, as GranuleBits (copies)."""
    size = QEMU72_VECTORS[0][0]
    bits = {name: GranuleBits(size, g) for name, g in GRANULARITIES.items()}
    states = []
    for actions in VECTOR_STEPS:
        for action in actions:
            if action[0] == "write":
                for b in bits.values():
                    b.set_range(action[1], action[2])
            elif action[0] == "resize":
                size = action[1]
                for b in bits.values():
                    b.resize(size)
            elif action[0] == "clear":
                bits[action[1]].clear()
            else:
                bits[action[1]].merge(bits[action[2]])
        states.append((size, {name: b.copy() for name, b in bits.items()}))
    return states


def _replay_model() -> list[tuple[int, dict[str, set[int]]]]:
    """The same steps on sets of dirty granule indices."""
    size = QEMU72_VECTORS[0][0]
    dirty: dict[str, set[int]] = {name: set() for name in GRANULARITIES}
    states = []
    for actions in VECTOR_STEPS:
        for action in actions:
            if action[0] == "write":
                offset, length = action[1], action[2]
                for name, g in GRANULARITIES.items():
                    end = min(offset + length, size)
                    dirty[name] |= set(range(offset // g, (end - 1) // g + 1))
            elif action[0] == "resize":
                size = action[1]
                for name, g in GRANULARITIES.items():
                    limit = -(-size // g)
                    dirty[name] = {i for i in dirty[name] if i < limit}
            elif action[0] == "clear":
                dirty[action[1]] = set()
            else:
                target, source = action[1], action[2]
                tg, sg = GRANULARITIES[target], GRANULARITIES[source]
                for i in dirty[source]:
                    end = min((i + 1) * sg, size)  # a source granule, clipped to the disk
                    dirty[target] |= set(range(i * sg // tg, (end - 1) // tg + 1))
        states.append((size, {name: set(d) for name, d in dirty.items()}))
    return states


@pytest.mark.parametrize("step", range(len(QEMU72_VECTORS)))
def test_granule_bits_match_qemu_vectors(step: int) -> None:
    size, bits = _replay_bits()[step]
    want_size, want = QEMU72_VECTORS[step]
    assert size == want_size
    got = {name: (b.count(), b.sha256()) for name, b in bits.items()}
    assert got == want


@pytest.mark.parametrize("step", range(len(QEMU72_VECTORS)))
def test_granule_model_matches_qemu_vectors(step: int) -> None:
    """The oracle of the differential tests is itself held to QEMU's numbers."""
    size, dirty = _replay_model()[step]
    want = QEMU72_VECTORS[step][1]
    got = {
        name: (len(d) * GRANULARITIES[name], granule_sha256(size, GRANULARITIES[name], d))
        for name, d in dirty.items()
    }
    assert got == want


def test_digest_of_empty_and_tiny_bitmaps() -> None:
    """At least one 64-bit word is hashed: a zero-size disk (QEMU 7.2 after ``block_resize``
    to 0) and a one-granule disk hash eight zero bytes when clean."""
    eight_zeros = hashlib.sha256(bytes(8)).hexdigest()
    assert GranuleBits(0, 512).sha256() == eight_zeros
    assert GranuleBits(512, 1 << 31).sha256() == eight_zeros
    one = GranuleBits(64 << 20, 1 << 20)
    one.set_range(0, 1)
    assert one.sha256() == QEMU72_VECTORS[1][1]["g1m"][1]
    # 65 granules need two words: the 65th bit lands in the second word.
    two = GranuleBits(65 * 512, 512)
    two.set_range(64 * 512, 1)
    assert two.sha256() == granule_sha256(65 * 512, 512, {64})
    assert two.to_bytes() == bytes(8) + b"\x01" + bytes(7)
