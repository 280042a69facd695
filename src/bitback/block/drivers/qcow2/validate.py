"""Checks of a qcow2 header before an image is opened: pure functions, no I/O.

They refuse what bitback cannot handle safely, naming the feature (encryption, external data
files, extended L2 entries, unknown incompatible bits), and geometry that a hostile or broken
image could use to make a reader allocate or seek absurdly (huge or overlapping tables).
"""

from __future__ import annotations

from bitback.block.drivers.qcow2 import compress
from bitback.block.drivers.qcow2.create import MAX_L1_BYTES, MAX_REFTABLE_BYTES, l1_entries_for
from bitback.errors import ImageCorruptError, ImageFormatError, UnsupportedFeatureError
from bitback.formats.qcow2.header import (
    EXT_CRYPTO,
    EXT_DATA_FILE,
    INCOMPAT_COMPRESSION,
    INCOMPAT_CORRUPT,
    INCOMPAT_DATA_FILE,
    INCOMPAT_DIRTY,
    INCOMPAT_EXTL2,
    Header,
)

__all__ = [
    "MAX_SNAPSHOTS",
    "check_features",
    "check_geometry",
]

MAX_SNAPSHOTS = 65536  # QEMU's QCOW_MAX_SNAPSHOTS

_KNOWN_INCOMPAT = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)


def check_features(h: Header, *, writable: bool) -> None:
    """Refuse feature bits and extensions bitback does not implement."""
    unknown = h.incompatible_features & ~_KNOWN_INCOMPAT
    if unknown:
        bits = ", ".join(str(b) for b in range(64) if unknown >> b & 1)
        raise UnsupportedFeatureError(
            f"Unsupported qcow2 feature(s): Unknown incompatible feature bit(s): {bits}"
        )
    if h.crypt_method or h.extension(EXT_CRYPTO) is not None:
        raise UnsupportedFeatureError("Unsupported qcow2 feature(s): encryption")
    if h.incompatible_features & INCOMPAT_DATA_FILE or h.extension(EXT_DATA_FILE):
        raise UnsupportedFeatureError("Unsupported qcow2 feature(s): external data file")
    if h.incompatible_features & INCOMPAT_EXTL2:
        raise UnsupportedFeatureError("Unsupported qcow2 feature(s): extended L2 entries")
    if h.compression_type not in (compress.ZLIB, compress.ZSTD) or (
        bool(h.incompatible_features & INCOMPAT_COMPRESSION) != (h.compression_type != 0)
    ):
        raise ImageFormatError(f"Invalid compression type {h.compression_type}")
    if h.incompatible_features & INCOMPAT_DIRTY and writable:
        # open_image repairs such images first; a caller bypassing it gets this.
        raise UnsupportedFeatureError(
            "Image is marked dirty (lazy refcounts were in use when its writer stopped); "
            "repair it first with 'bitback-img check -r all'"
        )


def check_geometry(h: Header) -> None:
    """Refuse sizes and table placements that cannot be right."""
    cs = h.cluster_size
    if h.refcount_table_clusters * cs > MAX_REFTABLE_BYTES:
        raise ImageFormatError("Reference count table too large")
    if h.l1_size * 8 > MAX_L1_BYTES:
        raise ImageFormatError("Active L1 table too large")
    if h.size >> 62:
        raise ImageFormatError("Image is too big")
    if h.l1_size < l1_entries_for(h.size, h.cluster_bits):
        raise ImageFormatError("L1 table is too small for the image size")
    if h.nb_snapshots > MAX_SNAPSHOTS:
        raise ImageFormatError("Too many snapshots")
    if h.snapshots_offset % cs:
        raise ImageFormatError("Invalid snapshot table offset")
    if h.l1_size and h.l1_table_offset < cs:
        raise ImageCorruptError("L1 table overlaps the image header")
    rt_start = h.refcount_table_offset
    if rt_start < cs:
        raise ImageCorruptError("Refcount table overlaps the image header")
    rt_end = rt_start + h.refcount_table_clusters * cs
    l1_start, l1_end = h.l1_table_offset, h.l1_table_offset + h.l1_size * 8
    if h.l1_size and rt_start < l1_end and l1_start < rt_end:
        raise ImageCorruptError("L1 table overlaps the refcount table")
