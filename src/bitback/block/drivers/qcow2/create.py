"""Creating new qcow2 images, laid out as qemu-img 7.2 lays them out.

A fresh image is::

    cluster 0            header (+ extensions, backing name)
    clusters 1..T        refcount table
    clusters T+1..T+B    refcount blocks covering every cluster below
    next L clusters      L1 table (the file ends after the last L1 entry, unpadded)

For the usual sizes T = B = L = 1. Larger L1 tables (big disks, small clusters) need more
refcount blocks and table clusters; the layout is computed to a fixed point.
"""

from __future__ import annotations

import os

import numpy as np

from bitback.errors import InvalidArgumentError
from bitback.formats.qcow2.entries import encode_refblock, encode_table
from bitback.formats.qcow2.header import (
    COMPAT_LAZY_REFCOUNTS,
    EXT_BACKING_FORMAT,
    EXT_FEATURE_TABLE,
    Extension,
    Header,
    encode_header,
    feature_table,
)

__all__ = [
    "MAX_L1_BYTES",
    "MAX_REFTABLE_BYTES",
    "create_qcow2",
    "l1_entries_for",
    "layout_qcow2",
    "validate_cluster_size",
]

# QEMU's limits (QCOW_MAX_L1_SIZE, QCOW_MAX_REFTABLE_SIZE): tables larger than these are refused.
MAX_L1_BYTES = 32 << 20
MAX_REFTABLE_BYTES = 8 << 20

_MIN_CLUSTER = 512
_MAX_CLUSTER = 2 << 20


def l1_entries_for(size: int, cluster_bits: int) -> int:
    """L1 entries needed to map ``size`` guest bytes."""
    per_l2 = 1 << (cluster_bits * 2 - 3)  # cluster_size * (cluster_size / 8)
    return (size + per_l2 - 1) // per_l2


def validate_cluster_size(cluster_size: int) -> int:
    """Return cluster_bits, or raise with qemu-img's message."""
    if (
        cluster_size < _MIN_CLUSTER
        or cluster_size > _MAX_CLUSTER
        or cluster_size & (cluster_size - 1)
    ):
        raise InvalidArgumentError("Cluster size must be a power of two between 512 and 2048k")
    return cluster_size.bit_length() - 1


def create_qcow2(
    filename: str,
    size: int,
    *,
    cluster_size: int = 65536,
    backing_file: str | None = None,
    backing_fmt: str | None = None,
    compat: str = "1.1",
    refcount_bits: int = 16,
    lazy_refcounts: bool = False,
) -> Header:
    """Write a new, empty qcow2 image to ``filename`` (truncating any existing file).

    ``size`` must already be rounded as the caller wants (qemu-img rounds up to 512).
    Returns the header written. Raises :class:`InvalidArgumentError` with qemu-img's wording
    for bad parameters, before touching the file.
    """
    header, pieces, file_length = layout_qcow2(
        size,
        cluster_size=cluster_size,
        backing_file=backing_file,
        backing_fmt=backing_fmt,
        compat=compat,
        refcount_bits=refcount_bits,
        lazy_refcounts=lazy_refcounts,
    )
    fd = os.open(filename, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        for offset, data in pieces:
            os.pwrite(fd, data, offset)
        os.ftruncate(fd, file_length)
    finally:
        os.close(fd)
    return header


def layout_qcow2(
    size: int,
    *,
    cluster_size: int = 65536,
    backing_file: str | None = None,
    backing_fmt: str | None = None,
    compat: str = "1.1",
    refcount_bits: int = 16,
    lazy_refcounts: bool = False,
) -> tuple[Header, list[tuple[int, bytes]], int]:
    """The bytes of a new image, without I/O: (header, [(offset, data)], file length).

    The L1 table is all zeros and the file ends right after its last entry, unpadded, as
    qemu-img leaves it; the pieces not listed read as zeros.
    """
    cluster_bits = validate_cluster_size(cluster_size)
    if size < 0:
        raise InvalidArgumentError("Image size must be a non-negative number")
    if refcount_bits < 1 or refcount_bits > 64 or refcount_bits & (refcount_bits - 1):
        raise InvalidArgumentError(
            "Refcount width must be a power of two and may not exceed 64 bits"
        )
    if compat in ("0.10", "v2"):
        version = 2
        if refcount_bits != 16:
            raise InvalidArgumentError(
                "Different refcount widths than 16 bits require compatibility level 1.1 or above "
                "(use version=v3 or greater)"
            )
        if lazy_refcounts:
            raise InvalidArgumentError(
                "Lazy refcounts only supported with compatibility level 1.1 and above "
                "(use version=v3 or greater)"
            )
    elif compat in ("1.1", "v3"):
        version = 3
    else:
        raise InvalidArgumentError(f"Parameter 'version' does not accept value '{compat}'")
    refcount_order = refcount_bits.bit_length() - 1
    l1_size = l1_entries_for(size, cluster_bits)
    if l1_size * 8 > MAX_L1_BYTES:
        raise InvalidArgumentError(
            "The image size is too large for file format 'qcow2' (try using a larger cluster size)"
        )
    if backing_file is not None and len(backing_file.encode()) > 1023:
        raise InvalidArgumentError("Backing file name too long")

    l1_clusters = -(-l1_size * 8 // cluster_size)  # an empty disk has no L1 table at all
    per_refblock = cluster_size * 8 // refcount_bits
    reftable_clusters = blocks = 1
    while True:  # fixed point: table + blocks must describe themselves
        total = 1 + reftable_clusters + blocks + l1_clusters
        need_blocks = -(-total // per_refblock)
        need_table = max(1, -(-need_blocks * 8 // cluster_size))
        if need_blocks == blocks and need_table == reftable_clusters:
            break
        blocks, reftable_clusters = need_blocks, need_table
    if reftable_clusters * cluster_size > MAX_REFTABLE_BYTES:
        raise InvalidArgumentError("Image size too large for this cluster size")

    reftable_offset = cluster_size
    refblocks_offset = reftable_offset + reftable_clusters * cluster_size
    l1_offset = refblocks_offset + blocks * cluster_size
    total_clusters = 1 + reftable_clusters + blocks + l1_clusters

    exts: list[Extension] = []
    if backing_file is not None and backing_fmt is not None:
        exts.append(Extension(EXT_BACKING_FORMAT, backing_fmt.encode()))
    if version == 3 and cluster_size > 4096:  # qemu-img 7.2 leaves it out of small clusters
        exts.append(Extension(EXT_FEATURE_TABLE, feature_table()))
    header = Header(
        version=version,
        backing_file_offset=0,
        backing_file_size=0,
        cluster_bits=cluster_bits,
        size=size,
        crypt_method=0,
        l1_size=l1_size,
        l1_table_offset=l1_offset if l1_size else 0,
        refcount_table_offset=reftable_offset,
        refcount_table_clusters=reftable_clusters,
        nb_snapshots=0,
        snapshots_offset=0,
        compatible_features=COMPAT_LAZY_REFCOUNTS if lazy_refcounts else 0,
        refcount_order=refcount_order if version == 3 else 4,
        header_length=112 if version == 3 else 72,
        extensions=tuple(exts),
        backing_file=backing_file,
    )
    cluster0 = encode_header(header)

    reftable = np.zeros(reftable_clusters * cluster_size // 8, dtype=np.uint64)
    reftable[:blocks] = refblocks_offset + np.arange(blocks, dtype=np.uint64) * cluster_size
    refcounts = np.zeros(blocks * per_refblock, dtype=np.uint64)
    refcounts[:total_clusters] = 1

    pieces = [
        (0, cluster0),
        (reftable_offset, encode_table(reftable)),
        (refblocks_offset, encode_refblock(refcounts, refcount_order)),
    ]
    return header, pieces, l1_offset + l1_size * 8
