"""Builders of hostile qcow2 images: valid images damaged with struct-level writes.

Every builder takes the path of a fresh, valid qcow2 image (made by :func:`fresh_qcow2`, i.e.
bitback's ``create_qcow2``, or by real ``qemu-img create``) and damages it in place with
``pwrite``; builders that need more files (backing chains) create them next to it. The
damage is done here, with ``struct``, from the layout in ``docs/interop/qcow2.txt`` (spec
section 9), never through bitback's codecs, so a bug in those cannot hide one in the reader.

Header fields (big-endian, offsets in bytes)::

    0 magic  4 version  8 backing_file_offset  16 backing_file_size  20 cluster_bits
    24 size  32 crypt_method  36 l1_size  40 l1_table_offset  48 refcount_table_offset
    56 refcount_table_clusters  60 nb_snapshots  64 snapshots_offset
    72 incompatible_features  80 compatible_features  88 autoclear_features
    96 refcount_order  100 header_length  104 compression_type (v3, header_length >= 105)

A fresh 64 MiB image with 64 KiB clusters (as qemu-img 7.2 and bitback lay it out)::

    0x00000 header   0x10000 refcount table   0x20000 refcount block   0x30000 L1 (8 bytes)

:func:`add_data_cluster` appends a correctly refcounted L2 table and data cluster, so that
entry-level damage (L2 entries) starts from an image ``qemu-img check`` finds clean.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "COMPRESSED",
    "COPIED",
    "FIELDS",
    "INCOMPAT_COMPRESSION",
    "INCOMPAT_CORRUPT",
    "INCOMPAT_DATA_FILE",
    "INCOMPAT_DIRTY",
    "INCOMPAT_EXTL2",
    "Builder",
    "Layout",
    "add_data_cluster",
    "backing_loop",
    "backing_name_too_long",
    "backing_offset_past_cluster",
    "chain",
    "compressed_garbage",
    "data_entry_to",
    "extension_past_cluster",
    "fresh_qcow2",
    "get_field",
    "l1_entry",
    "l2_entry",
    "overwrite",
    "read_layout",
    "refcount_table_entry",
    "self_loop",
    "set_bits",
    "set_field",
    "truncate_to",
]

# name -> (byte offset, struct format); all big-endian.
FIELDS: dict[str, tuple[int, str]] = {
    "magic": (0, ">4s"),
    "version": (4, ">I"),
    "backing_file_offset": (8, ">Q"),
    "backing_file_size": (16, ">I"),
    "cluster_bits": (20, ">I"),
    "size": (24, ">Q"),
    "crypt_method": (32, ">I"),
    "l1_size": (36, ">I"),
    "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"),
    "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"),
    "snapshots_offset": (64, ">Q"),
    "incompatible_features": (72, ">Q"),
    "compatible_features": (80, ">Q"),
    "autoclear_features": (88, ">Q"),
    "refcount_order": (96, ">I"),
    "header_length": (100, ">I"),
    "compression_type": (104, ">B"),
}

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4

COPIED = 1 << 63
COMPRESSED = 1 << 62
_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00

Builder = Callable[[Path], None]
"""Damages the fresh image at the given path in place (and may create files beside it)."""


@dataclass(frozen=True, slots=True)
class Layout:
    """Where the main structures of an image are, read from its header."""

    cluster_bits: int
    size: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    refcount_order: int
    header_length: int
    file_size: int

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits


def fresh_qcow2(
    path: Path,
    size: int = 64 << 20,
    *,
    cluster_size: int = 65536,
    backing_file: str | None = None,
) -> Path:
    """A new, valid, empty qcow2 v3 image made by bitback's ``create_qcow2``."""
    from bitback.block.drivers.qcow2.create import create_qcow2

    create_qcow2(
        os.fspath(path),
        size,
        cluster_size=cluster_size,
        backing_file=backing_file,
        backing_fmt="qcow2" if backing_file is not None else None,
    )
    return path


# -- raw access --------------------------------------------------------------------------------
def overwrite(path: Path, offset: int, data: bytes) -> None:
    """``pwrite`` ``data`` at ``offset`` (the file grows if the write reaches past its end)."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def _pread(path: Path, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def get_field(path: Path, name: str) -> int | bytes:
    offset, fmt = FIELDS[name]
    value: int | bytes = struct.unpack(fmt, _pread(path, offset, struct.calcsize(fmt)))[0]
    return value


def set_field(path: Path, name: str, value: int | bytes) -> None:
    """Store ``value`` in header field ``name``, with the field's width and byte order."""
    offset, fmt = FIELDS[name]
    overwrite(path, offset, struct.pack(fmt, value))


def set_bits(path: Path, name: str, bits: int) -> None:
    """OR ``bits`` into a feature field (``incompatible_features`` ...)."""
    value = get_field(path, name)
    assert isinstance(value, int)
    set_field(path, name, value | bits)


def truncate_to(path: Path, length: int) -> None:
    os.truncate(path, length)


def read_layout(path: Path) -> Layout:
    head = _pread(path, 0, 104)
    assert head[:4] == b"QFI\xfb", f"{path} is not a qcow2 image"

    def field(name: str) -> int:
        offset, fmt = FIELDS[name]
        value = struct.unpack_from(fmt, head, offset)[0]
        assert isinstance(value, int)
        return value

    return Layout(
        cluster_bits=field("cluster_bits"),
        size=field("size"),
        l1_size=field("l1_size"),
        l1_table_offset=field("l1_table_offset"),
        refcount_table_offset=field("refcount_table_offset"),
        refcount_table_clusters=field("refcount_table_clusters"),
        refcount_order=field("refcount_order"),
        header_length=field("header_length"),
        file_size=os.path.getsize(path),
    )


# -- tables ------------------------------------------------------------------------------------
def l1_entry(path: Path, index: int, value: int | None = None) -> int:
    """Read L1 entry ``index``, or write ``value`` there; returns the old value."""
    lay = read_layout(path)
    assert index < lay.l1_size
    where = lay.l1_table_offset + 8 * index
    old: int = struct.unpack(">Q", _pread(path, where, 8).ljust(8, b"\0"))[0]
    if value is not None:
        overwrite(path, where, struct.pack(">Q", value))
    return old


def l2_entry(path: Path, l1_index: int, index: int, value: int | None = None) -> int:
    """Read entry ``index`` of the L2 table under L1 entry ``l1_index``, or write ``value``."""
    table = l1_entry(path, l1_index) & _OFFSET_MASK
    assert table, f"L1 entry {l1_index} of {path} has no L2 table"
    where = table + 8 * index
    old: int = struct.unpack(">Q", _pread(path, where, 8))[0]
    if value is not None:
        overwrite(path, where, struct.pack(">Q", value))
    return old


def _set_refcount(path: Path, lay: Layout, cluster: int, value: int) -> None:
    """Set the refcount of ``cluster``; its refcount block must exist (true for small files)."""
    assert lay.refcount_order == 4, "only 16-bit refcounts are supported here"
    per_block = lay.cluster_size * 8 // 16
    entry = struct.unpack(
        ">Q", _pread(path, lay.refcount_table_offset + 8 * (cluster // per_block), 8)
    )[0]
    block = entry & _OFFSET_MASK
    assert block, f"no refcount block for cluster {cluster}"
    overwrite(path, block + 2 * (cluster % per_block), struct.pack(">H", value))


def add_data_cluster(path: Path, fill: bytes = b"\xaa") -> tuple[int, int]:
    """Map guest cluster 0 to a new data cluster full of ``fill``, as a writer would.

    Appends an L2 table and a data cluster at the next cluster boundaries after the end of the
    file, points L1 entry 0 and L2 entry 0 at them (with COPIED) and sets both refcounts to 1,
    so the image stays consistent (``qemu-img check`` clean). Returns (L2 offset, data offset).
    """
    lay = read_layout(path)
    cs = lay.cluster_size
    l2 = -(-lay.file_size // cs) * cs
    data = l2 + cs
    table = bytearray(cs)
    table[:8] = struct.pack(">Q", data | COPIED)
    overwrite(path, l2, bytes(table))
    overwrite(path, data, (fill * cs)[:cs])
    _set_refcount(path, lay, l2 // cs, 1)
    _set_refcount(path, lay, data // cs, 1)
    l1_entry(path, 0, l2 | COPIED)
    return l2, data


def data_entry_to(host: Callable[[Layout, int, int], int]) -> Builder:
    """Guest cluster 0 maps (with COPIED) to ``host(layout, l2_offset, data_offset)``.

    The old data cluster is left with refcount 1 and no reference (a leak), as a real
    corruption would leave it.
    """

    def build(path: Path) -> None:
        l2, data = add_data_cluster(path)
        l2_entry(path, 0, 0, host(read_layout(path), l2, data) | COPIED)

    return build


def refcount_table_entry(path: Path, index: int, value: int | None = None) -> int:
    """Read refcount table entry ``index``, or write ``value`` there; returns the old value."""
    lay = read_layout(path)
    where = lay.refcount_table_offset + 8 * index
    old: int = struct.unpack(">Q", _pread(path, where, 8))[0]
    if value is not None:
        overwrite(path, where, struct.pack(">Q", value))
    return old


def compressed_garbage(path: Path) -> None:
    """Guest cluster 0 becomes a compressed cluster whose stream is not valid deflate.

    The data cluster is filled with 0xff: a deflate block header with BTYPE=3 (reserved).
    """
    _, data = add_data_cluster(path, fill=b"\xff")
    lay = read_layout(path)
    x = 62 - (lay.cluster_bits - 8)
    sectors = lay.cluster_size // 512 - 1  # additional sectors: the whole cluster
    l2_entry(path, 0, 0, COMPRESSED | (sectors << x) | data)


# -- header cluster ----------------------------------------------------------------------------
def extension_past_cluster(path: Path) -> None:
    """The first header extension claims more bytes than the header cluster holds."""
    lay = read_layout(path)
    where = lay.header_length
    ext_type = struct.unpack(">I", _pread(path, where, 4))[0]
    assert ext_type != 0, "the fresh image has no header extension to stretch"
    overwrite(path, where + 4, struct.pack(">I", lay.cluster_size))


def backing_name_too_long(path: Path) -> None:
    """A backing file name of 2000 bytes (QEMU's limit is 1023), inside cluster 0."""
    offset = 1024
    overwrite(path, offset, b"b" * 2000)
    set_field(path, "backing_file_offset", offset)
    set_field(path, "backing_file_size", 2000)


def backing_offset_past_cluster(path: Path) -> None:
    """The backing file name is said to start past the end of the header cluster."""
    lay = read_layout(path)
    set_field(path, "backing_file_offset", lay.cluster_size + 16)
    set_field(path, "backing_file_size", 8)


# -- backing chains ----------------------------------------------------------------------------
def self_loop(path: Path) -> None:
    """The image names itself as its backing file."""
    fresh_qcow2(path, backing_file=path.name)


def backing_loop(path: Path) -> None:
    """A -> B -> A: ``path`` is backed by a sibling ``loop-b.qcow2``, which is backed by it."""
    other = path.with_name("loop-b.qcow2")
    fresh_qcow2(path, backing_file=other.name)
    fresh_qcow2(other, backing_file=path.name)


def chain(depth: int) -> Builder:
    """A chain of ``depth`` images below ``path`` (``depth + 1`` images in all).

    Small images (64 KiB, 4 KiB clusters) keep the 300-image case at a few MiB.
    """

    def build(path: Path) -> None:
        below: str | None = None
        for i in range(depth):
            name = path.with_name(f"chain-{i:04d}.qcow2")
            fresh_qcow2(name, 64 << 10, cluster_size=4096, backing_file=below)
            below = name.name
        fresh_qcow2(path, 64 << 10, cluster_size=4096, backing_file=below)

    build.__doc__ = f"A backing chain {depth} images deep below the image."
    return build
