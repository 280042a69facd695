"""The qcow2 bitmaps extension: pure codec and constraints, no I/O.

Facts of the format (``docs/interop/qcow2.txt``, "Bitmaps extension"), as QEMU 7.2 applies
them:

* header extension ``0x23852875``: ``u32 nb_bitmaps, u32 reserved (0), u64 directory_size,
  u64 directory_offset``; valid only while autoclear bit 0 is set, so a writer that does not
  know bitmaps invalidates them just by clearing the bits it does not understand;
* the directory: one entry per bitmap, each ``u64 table_offset, u32 table_size, u32 flags,
  u8 type (1), u8 granularity_bits, u16 name_size, u32 extra_data_size``, then extra data and
  the name (no NUL), padded to 8 bytes;
* a bitmap table: one big-endian u64 per cluster of bitmap data; bits 9-55 are the data
  cluster's offset; offset 0 means "all zeroes", or "all ones" when bit 0 is set;
* bitmap data: bit ``k`` of a data cluster's byte ``j`` is granule ``8 * j + k`` of the
  cluster's range (least significant bit first). That is also the byte order of
  :meth:`bitback.bitmaps.bits.GranuleBits.to_bytes`, so data moves without conversion.

Everything here works on bytes and numbers; the driver does the reading and writing.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from bitback.errors import ImageFormatError
from bitback.formats.qcow2.entries import U64Array

__all__ = [
    "FLAG_AUTO",
    "FLAG_IN_USE",
    "MAX_BITMAPS",
    "MAX_DIRECTORY_SIZE",
    "MAX_GRANULARITY_BITS",
    "MAX_NAME_SIZE",
    "MAX_PHYS_SIZE",
    "MAX_TABLE_SIZE",
    "MIN_GRANULARITY_BITS",
    "TABLE_ALL_ONES",
    "TABLE_OFFSET_MASK",
    "BitmapEntry",
    "BitmapsExtension",
    "bitmap_bytes",
    "check_new_bitmap",
    "decode_directory",
    "decode_extension",
    "decode_table",
    "encode_directory",
    "encode_extension",
    "encode_table",
    "entry_size",
    "invalid_table_entries",
    "table_clusters",
]

MAX_BITMAPS = 65535
MAX_DIRECTORY_SIZE = 1024 * MAX_BITMAPS
MAX_TABLE_SIZE = 0x8000000  # entries of one bitmap table
MAX_PHYS_SIZE = 0x20000000  # bytes of one bitmap's data
MIN_GRANULARITY_BITS = 9
MAX_GRANULARITY_BITS = 31
MAX_NAME_SIZE = 1023

FLAG_IN_USE = 1 << 0
FLAG_AUTO = 1 << 1
RESERVED_FLAGS = 0xFFFFFFFC
TYPE_DIRTY_TRACKING = 1

TABLE_RESERVED_MASK = 0xFF000000000001FE
TABLE_OFFSET_MASK = 0x00FFFFFFFFFFFE00
TABLE_ALL_ONES = 1

_EXT = struct.Struct(">IIQQ")
_ENTRY = struct.Struct(">QIIBBHI")


@dataclass(frozen=True, slots=True)
class BitmapsExtension:
    """Where the bitmap directory is, as the header extension says."""

    nb_bitmaps: int
    directory_size: int
    directory_offset: int


@dataclass(frozen=True, slots=True)
class BitmapEntry:
    """One bitmap directory entry."""

    name: str
    table_offset: int
    table_size: int
    flags: int
    granularity_bits: int
    type: int = TYPE_DIRTY_TRACKING
    extra_data: bytes = b""

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    @property
    def in_use(self) -> bool:
        return bool(self.flags & FLAG_IN_USE)

    @property
    def auto(self) -> bool:
        return bool(self.flags & FLAG_AUTO)

    def info_flags(self) -> list[str]:
        """The flags as ``qemu-img info`` names them, in its order."""
        return [name for bit, name in ((FLAG_IN_USE, "in-use"), (FLAG_AUTO, "auto"))
                if self.flags & bit]


def decode_extension(data: bytes, cluster_size: int, path: str = "") -> BitmapsExtension:
    """Decode and check the extension payload (QEMU's texts; ``path`` names the file)."""
    if len(data) != _EXT.size:
        raise ImageFormatError("bitmaps_ext: Invalid extension length")
    nb, reserved, dir_size, dir_offset = _EXT.unpack(data)
    if reserved:
        raise ImageFormatError("bitmaps_ext: Reserved field is not zero")
    if nb > MAX_BITMAPS:
        raise ImageFormatError(
            f"bitmaps_ext: File {path} has {nb} bitmaps, exceeding the QEMU supported "
            f"maximum of {MAX_BITMAPS}"
        )
    if nb == 0:
        raise ImageFormatError("found bitmaps extension with zero bitmaps")
    if dir_offset % cluster_size:
        raise ImageFormatError("bitmaps_ext: invalid bitmap directory offset")
    if dir_size > MAX_DIRECTORY_SIZE:
        raise ImageFormatError(
            f"bitmaps_ext: bitmap directory size ({dir_size}) exceeds the maximum supported "
            f"size ({MAX_DIRECTORY_SIZE})"
        )
    return BitmapsExtension(nb, dir_size, dir_offset)


def encode_extension(ext: BitmapsExtension) -> bytes:
    return _EXT.pack(ext.nb_bitmaps, 0, ext.directory_size, ext.directory_offset)


def entry_size(name: str, extra_data_size: int = 0) -> int:
    """Bytes one directory entry takes, padding included."""
    return (_ENTRY.size + len(name.encode("utf-8")) + extra_data_size + 7) & ~7


def bitmap_bytes(disk_size: int, granularity: int) -> int:
    """Bytes of bitmap data for a disk: one bit per granule, rounded up to a byte."""
    granules = -(-disk_size // granularity)
    return -(-granules // 8)


def table_clusters(disk_size: int, granularity: int, cluster_size: int) -> int:
    """Entries of the bitmap table (data clusters) for a disk of that size."""
    return -(-bitmap_bytes(disk_size, granularity) // cluster_size)


def _entry_problem(e: BitmapEntry, cluster_size: int, disk_size: int) -> bool:
    """QEMU's check_dir_entry: True when the entry breaks a constraint."""
    if (
        e.table_size == 0
        or e.table_offset == 0
        or e.table_offset % cluster_size
        or e.table_size > MAX_TABLE_SIZE
        or not MIN_GRANULARITY_BITS <= e.granularity_bits <= MAX_GRANULARITY_BITS
        or e.flags & RESERVED_FLAGS
        or len(e.name.encode("utf-8", "surrogateescape")) > MAX_NAME_SIZE
        or e.type != TYPE_DIRTY_TRACKING
    ):
        return True
    phys = e.table_size * cluster_size
    if phys > MAX_PHYS_SIZE:
        return True
    # A consistent bitmap must cover the whole disk; an in-use one may be stale after a
    # resize that was never saved.
    return not e.in_use and disk_size > (phys * 8) << e.granularity_bits


def decode_directory(
    raw: bytes, ext: BitmapsExtension, *, cluster_size: int, disk_size: int
) -> list[BitmapEntry]:
    """Decode and check the whole directory (QEMU's bitmap_list_load, same texts)."""
    if ext.directory_size == 0:
        raise ImageFormatError("Requested bitmap directory size is zero")
    if ext.directory_size > MAX_DIRECTORY_SIZE:
        raise ImageFormatError("Requested bitmap directory size is too big")
    if len(raw) != ext.directory_size:
        raise ImageFormatError("Failed to read bitmap directory")
    out: list[BitmapEntry] = []
    pos, end = 0, len(raw)
    while pos < end:
        if pos + _ENTRY.size > end:
            raise ImageFormatError("Broken bitmap directory")
        if len(out) + 1 > ext.nb_bitmaps:
            raise ImageFormatError("More bitmaps found than specified in header extension")
        t_off, t_size, flags, typ, gbits, name_size, extra = _ENTRY.unpack_from(raw, pos)
        size = (_ENTRY.size + extra + name_size + 7) & ~7
        if pos + size > end:
            raise ImageFormatError("Broken bitmap directory")
        if extra:
            raise ImageFormatError("Bitmap extra data is not supported")
        start = pos + _ENTRY.size
        name = raw[start : start + name_size].decode("utf-8", "surrogateescape")
        entry = BitmapEntry(name, t_off, t_size, flags, gbits, typ)
        if _entry_problem(entry, cluster_size, disk_size):
            raise ImageFormatError(f"Bitmap '{name}' doesn't satisfy the constraints")
        out.append(entry)
        pos += size
    if len(out) != ext.nb_bitmaps:
        raise ImageFormatError("Less bitmaps found than specified in header extension")
    return out


def encode_directory(
    entries: list[BitmapEntry], *, cluster_size: int, disk_size: int
) -> bytes:
    """Directory bytes for ``entries``; refuses what QEMU would refuse to store."""
    if not entries or len(entries) > MAX_BITMAPS:
        raise ImageFormatError("Bitmap directory must hold 1 to 65535 bitmaps")
    out = bytearray()
    for e in entries:
        if e.extra_data:
            raise ImageFormatError("Bitmap extra data is not supported")
        if _entry_problem(e, cluster_size, disk_size):
            raise ImageFormatError(f"Bitmap '{e.name}' doesn't satisfy the constraints")
        name = e.name.encode("utf-8", "surrogateescape")
        out += _ENTRY.pack(e.table_offset, e.table_size, e.flags, e.type,
                           e.granularity_bits, len(name), 0)
        out += name + bytes(-(_ENTRY.size + len(name)) % 8)
    if len(out) > MAX_DIRECTORY_SIZE:
        raise ImageFormatError("Bitmap directory is too large")
    return bytes(out)


def decode_table(raw: bytes) -> U64Array:
    """Bitmap table bytes -> entries (native order)."""
    return np.frombuffer(raw, dtype=">u8").astype(np.uint64)


def encode_table(entries: U64Array) -> bytes:
    return entries.astype(">u8").tobytes()


def invalid_table_entries(table: U64Array, cluster_size: int) -> int:
    """How many entries break QEMU's check_table_entry (reserved bits, alignment, bit 0)."""
    offsets = table & np.uint64(TABLE_OFFSET_MASK)
    bad = ((table & np.uint64(TABLE_RESERVED_MASK)) != 0) | (
        (offsets != 0)
        & (((table & np.uint64(TABLE_ALL_ONES)) != 0)
           | (offsets % np.uint64(cluster_size) != 0))
    )
    return int(np.count_nonzero(bad))


def check_new_bitmap(name: str, granularity: int, *, disk_size: int, cluster_size: int) -> None:
    """QEMU's check_constraints_on_bitmap: may a bitmap like this be stored in the image?

    ``granularity`` must already be a power of two. Raises :class:`ImageFormatError` with
    QEMU's text.
    """
    bits = granularity.bit_length() - 1
    if bits > MAX_GRANULARITY_BITS:
        raise ImageFormatError(
            f"Granularity exceeds maximum ({1 << MAX_GRANULARITY_BITS} bytes)"
        )
    if bits < MIN_GRANULARITY_BITS:
        raise ImageFormatError(
            f"Granularity is under minimum ({1 << MIN_GRANULARITY_BITS} bytes)"
        )
    need = bitmap_bytes(disk_size, granularity)
    if need > MAX_PHYS_SIZE or need > MAX_TABLE_SIZE * cluster_size:
        raise ImageFormatError(
            "Too much space will be occupied by the bitmap. Use larger granularity"
        )
    if len(name.encode("utf-8")) > MAX_NAME_SIZE:
        raise ImageFormatError(f"Name length exceeds maximum ({MAX_NAME_SIZE} characters)")
