"""L1 / L2 table entries and refcount blocks: pure codecs over numpy arrays.

Tables are kept as numpy arrays of native ``uint64`` (converted from the big-endian bytes on
disk once, when a table is loaded), so that a whole table, or a run of entries, is classified
and mapped by vector operations instead of one Python step per cluster.

L1 entry::  bit 63 COPIED | bits 9-55 L2 table offset
L2 entry (standard)::  bit 63 COPIED | bit 62 COMPRESSED=0 | bits 9-55 host offset | bit 0 ZERO
L2 entry (compressed)::  bit 62 COMPRESSED=1 | bits 0..x-1 host byte offset |
                         bits x..61 additional 512-byte sectors, x = 62 - (cluster_bits - 8)
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import numpy.typing as npt

__all__ = [
    "COMPRESSED",
    "COPIED",
    "L1_OFFSET_MASK",
    "L2_OFFSET_MASK",
    "ZERO",
    "ClusterKind",
    "classify",
    "compressed_extent",
    "decode_refblock",
    "decode_table",
    "encode_refblock",
    "encode_table",
    "refcount_max",
]

COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO = 1
L1_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
L2_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
# Bits that must be zero in a standard L1 / L2 entry (reserved).
L1_RESERVED = 0x7F00_0000_0000_01FF
L2_RESERVED = 0x3F00_0000_0000_01FE

U64Array = npt.NDArray[np.uint64]


class ClusterKind(IntEnum):
    """What an L2 entry says about its guest cluster."""

    UNALLOCATED = 0  # falls through to the backing file (or reads zeros)
    ZERO_PLAIN = 1  # zero flag, no host cluster
    ZERO_ALLOC = 2  # zero flag, host cluster kept preallocated
    NORMAL = 3  # data in a host cluster
    COMPRESSED = 4  # compressed data somewhere in the file


def decode_table(raw: bytes | bytearray | memoryview) -> U64Array:
    """Big-endian table bytes -> a writable native uint64 array."""
    return np.frombuffer(raw, dtype=">u8").astype(np.uint64)


def encode_table(table: U64Array) -> bytes:
    """A native uint64 array -> big-endian bytes for the disk."""
    return table.astype(">u8").tobytes()


def classify(entries: U64Array, *, zero_flag: bool = True) -> npt.NDArray[np.uint8]:
    """Classify L2 entries into :class:`ClusterKind` values, vectorised.

    ``zero_flag`` is false for version 2 images, where bit 0 has no meaning.
    """
    kinds = np.full(entries.shape, ClusterKind.UNALLOCATED, dtype=np.uint8)
    offsets = entries & np.uint64(L2_OFFSET_MASK)
    compressed = (entries & np.uint64(COMPRESSED)) != 0
    if zero_flag:
        zero = ((entries & np.uint64(ZERO)) != 0) & ~compressed
    else:
        zero = np.zeros(entries.shape, dtype=bool)
    normal = (offsets != 0) & ~compressed & ~zero
    kinds[normal] = ClusterKind.NORMAL
    kinds[zero & (offsets == 0)] = ClusterKind.ZERO_PLAIN
    kinds[zero & (offsets != 0)] = ClusterKind.ZERO_ALLOC
    kinds[compressed] = ClusterKind.COMPRESSED
    return kinds


def compressed_extent(entry: int, cluster_bits: int) -> tuple[int, int]:
    """Host byte offset and maximum byte length of a compressed cluster's data.

    The stored sector count is one less than the 512-byte sectors the data touches, counted
    from the sector holding the first byte; the compressed stream may end anywhere inside them.
    """
    x = 62 - (cluster_bits - 8)
    offset = entry & ((1 << x) - 1)
    nb_sectors = ((entry >> x) & ((1 << (cluster_bits - 8)) - 1)) + 1
    length = nb_sectors * 512 - (offset & 511)
    return offset, length


def refcount_max(refcount_order: int) -> int:
    return (1 << (1 << refcount_order)) - 1


def decode_refblock(raw: bytes | bytearray, refcount_order: int) -> U64Array:
    """A refcount block's bytes -> one uint64 refcount per cluster.

    Widths of 8 bits and more are big-endian integers; widths below 8 pack several entries
    per byte, the first entry in the least significant bits.
    """
    bits = 1 << refcount_order
    if bits >= 8:
        return np.frombuffer(raw, dtype=f">u{bits // 8}").astype(np.uint64)
    per_byte = 8 // bits
    data = np.frombuffer(raw, dtype=np.uint8)
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    mask = (1 << bits) - 1
    values = (data[:, None] >> shifts[None, :]) & mask
    return values.reshape(-1).astype(np.uint64)


def encode_refblock(values: U64Array, refcount_order: int) -> bytes:
    """Inverse of :func:`decode_refblock`."""
    bits = 1 << refcount_order
    if bits >= 8:
        return values.astype(f">u{bits // 8}").tobytes()
    per_byte = 8 // bits
    v = values.astype(np.uint8).reshape(-1, per_byte)
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    packed = np.bitwise_or.reduce(v << shifts[None, :], axis=1).astype(np.uint8)
    return bytes(packed.tobytes())
