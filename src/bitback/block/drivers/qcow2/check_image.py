"""Raw access to a qcow2 image for the checker: header validation, zero-filled reads, refcounts.

The checker reads and repairs the image file directly (``os.pread`` / ``os.pwrite``), never
through the qcow2 driver, so that it can look at images the driver would refuse and so that
its view of the metadata is exactly what is on disk.

:class:`CheckImage` opens the file and validates the header the way QEMU 7.2 validates it on
open (same limits, same one-line messages), raising :class:`ImageFormatError` or
:class:`UnsupportedFeatureError`; everything past the header is left to the checker, which
reports it instead of refusing it. Reads past the end of the file return zeros, as QEMU's
block layer does, so a table that points past EOF reads as an empty table.

:class:`StoredRefcounts` reads the refcounts the image *stores* (refcount table -> refcount
blocks) and writes corrected ones back::

    cluster c  ->  reftable[c >> rb_bits] & REFT_OFFSET_MASK  ->  refblock entry c & (2^rb_bits-1)
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from bitback.block.drivers.qcow2.create import MAX_L1_BYTES, MAX_REFTABLE_BYTES
from bitback.errors import ImageFormatError, IOFailedError, UnsupportedFeatureError
from bitback.formats.qcow2.bitmaps import BitmapsExtension, decode_extension
from bitback.formats.qcow2.entries import decode_refblock, decode_table, encode_refblock
from bitback.formats.qcow2.header import (
    AUTOCLEAR_BITMAPS,
    EXT_BITMAPS,
    INCOMPAT_DATA_FILE,
    INCOMPAT_EXTL2,
    MAX_CLUSTER_BITS,
    MIN_CLUSTER_BITS,
    Header,
    decode_header,
    unknown_incompatible,
)

__all__ = [
    "INCOMPAT_FIELD_OFFSET",
    "MAX_SNAPSHOTS",
    "REFTABLE_FIELDS_OFFSET",
    "REFT_OFFSET_MASK",
    "REFT_RESERVED",
    "CheckImage",
    "Snapshot",
    "StoredRefcounts",
    "read_snapshots",
    "stale_bitmaps_warning",
]

U64Array = npt.NDArray[np.uint64]
BoolArray = npt.NDArray[np.bool_]

REFT_OFFSET_MASK = 0xFFFF_FFFF_FFFF_FE00
REFT_RESERVED = 0x1FF
MAX_SNAPSHOTS = 65536
SNAPSHOT_HEADER_SIZE = 40
_INT64_MAX = (1 << 63) - 1
# The header field offsets a repair rewrites in place.
REFTABLE_FIELDS_OFFSET = 48  # u64 refcount_table_offset, u32 refcount_table_clusters
INCOMPAT_FIELD_OFFSET = 72


class CheckImage:
    """An image file opened for checking: validated header, geometry, raw reads and writes.

    Use as a context manager; the file descriptor is closed on exit. ``warnings`` holds the
    lines QEMU prints while opening (e.g. about ignored bitmaps) for the check's messages.
    """

    def __init__(self, path: str, *, writable: bool = False) -> None:
        self.path = path
        self.writable = writable
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        try:
            self.fd = os.open(path, flags)
        except OSError as exc:
            err = exc.errno or errno.EIO
            raise IOFailedError(os.strerror(err), errno=err, path=path) from exc
        self.warnings: list[str] = []
        try:
            self.file_len = os.fstat(self.fd).st_size
            self.header = self._load_header()
            self._validate()
        except BaseException:
            os.close(self.fd)
            raise

    def __enter__(self) -> CheckImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- geometry -------------------------------------------------------------------------

    @property
    def cluster_bits(self) -> int:
        return self.header.cluster_bits

    @property
    def cluster_size(self) -> int:
        return self.header.cluster_size

    @property
    def nb_clusters(self) -> int:
        """Host clusters the file covers (the last one may be partial)."""
        return -(-self.file_len // self.cluster_size)

    @property
    def refcount_max(self) -> int:
        return (1 << self.header.refcount_bits) - 1

    @property
    def rb_bits(self) -> int:
        """log2 of the clusters one refcount block describes."""
        return self.cluster_bits + 3 - self.header.refcount_order

    @property
    def reftable_entries(self) -> int:
        return self.header.refcount_table_clusters << (self.cluster_bits - 3)

    # -- I/O ------------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``; whatever lies past the end of the file reads as zeros."""
        if length <= 0:
            return b""
        data = b""
        if offset < self.file_len:
            data = os.pread(self.fd, min(length, self.file_len - offset), offset)
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def read_table(self, offset: int, entries: int) -> U64Array:
        """A table of big-endian u64 entries as a native array (zeros past EOF)."""
        if entries <= 0:
            return np.zeros(0, dtype=np.uint64)
        if offset >= self.file_len:  # nothing to read: spare the allocation of the bytes
            return np.zeros(entries, dtype=np.uint64)
        return decode_table(self.read(offset, entries * 8))

    def read_tables(self, offsets: U64Array) -> U64Array:
        """One cluster-sized table at each offset, as rows of native u64 (zeros past EOF).

        Reads straight into one buffer; a table listed twice is read twice (callers pass
        batches of a few MiB).
        """
        cs = self.cluster_size
        buf = bytearray(offsets.size * cs)  # zero-filled: short reads at EOF leave zeros
        view = memoryview(buf)
        for k, offset in enumerate(offsets.tolist()):
            if offset < self.file_len:
                os.preadv(self.fd, [view[k * cs : (k + 1) * cs]], offset)
        return decode_table(buf).reshape(offsets.size, cs // 8)

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` (the image must have been opened writable)."""
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], offset + done)
        self.file_len = max(self.file_len, offset + len(data))

    def grow(self, length: int) -> None:
        """Extend the file with zeros to ``length`` bytes (never shrinks)."""
        if length > self.file_len:
            os.ftruncate(self.fd, length)
            self.file_len = length

    def sync(self) -> None:
        """Make every write so far durable before the next step of a repair depends on it."""
        os.fsync(self.fd)

    # -- open-time validation (QEMU's qcow2_do_open limits and messages) ---------------------

    def _load_header(self) -> Header:
        first = self.read(0, 104)
        if first[:4] != b"QFI\xfb" or self.file_len < 72:
            raise ImageFormatError("Image is not in qcow2 format", path=self.path)
        version, _, _, cluster_bits = struct.unpack_from(">IQII", first, 4)
        if version in (2, 3) and not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
            raise ImageFormatError(f"Unsupported cluster size: 2^{cluster_bits}")
        return decode_header(self.read(0, 1 << min(max(cluster_bits, 9), 21)))

    def _validate(self) -> None:
        h = self.header
        unknown = unknown_incompatible(h)
        if unknown:
            raise UnsupportedFeatureError(
                f"Unsupported qcow2 feature(s): Unknown incompatible feature: {unknown:x}"
            )
        if h.incompatible_features & (INCOMPAT_DATA_FILE | INCOMPAT_EXTL2):
            raise UnsupportedFeatureError(
                "bitback check does not support external data files or extended L2 entries"
            )
        if h.crypt_method:
            raise UnsupportedFeatureError("bitback check does not support encrypted images")
        _validate_table(self, h.refcount_table_offset, h.refcount_table_clusters,
                        h.cluster_size, MAX_REFTABLE_BYTES, "Reference count table")
        _validate_table(self, h.snapshots_offset, h.nb_snapshots, SNAPSHOT_HEADER_SIZE,
                        SNAPSHOT_HEADER_SIZE * MAX_SNAPSHOTS, "Snapshot table")
        _validate_table(self, h.l1_table_offset, h.l1_size, 8, MAX_L1_BYTES, "Active L1 table")
        per_l1 = 1 << (2 * h.cluster_bits - 3)  # guest bytes one L1 entry maps
        needed = -(-h.size // per_l1)
        if needed > 0x7FFF_FFFF:
            raise ImageFormatError("Image is too big")
        if h.l1_size < needed:
            raise ImageFormatError("L1 table is too small")
        self.bitmaps = self._bitmaps_extension()

    def _bitmaps_extension(self) -> BitmapsExtension | None:
        ext = self.header.extension(EXT_BITMAPS)
        if ext is None:
            return None
        if len(ext.data) != 24:
            raise ImageFormatError("bitmaps_ext: Invalid extension length")
        if not self.header.autoclear_features & AUTOCLEAR_BITMAPS:
            # A program that does not know bitmaps wrote the image: QEMU ignores the extension
            # (its clusters then show up as leaks) and says so.
            self.warnings.extend(stale_bitmaps_warning(self.header.version, "bitback-img"))
            return None
        return decode_extension(ext.data, self.cluster_size, self.path)


def stale_bitmaps_warning(version: int, prog: str) -> list[str]:
    """The two lines QEMU prints when it opens an image whose bitmaps extension lost its
    autoclear bit (``prog`` names the tool; the advice always names ``bitback-img``).

    QEMU ends the second line without a newline; callers printing to a terminal do the same.
    """
    if version < 3:
        what = ("This qcow2 v2 image contains bitmaps, but they may have been modified by a "
                "program without persistent bitmap support; so now they must all be considered "
                "inconsistent")
    else:
        what = ("a program lacking bitmap support modified this file, so all bitmaps are now "
                "considered inconsistent")
    return [f"{prog}: warning: {what}",
            "Some clusters may be leaked, run 'bitback-img check -r' on the image file to fix."]


def _validate_table(
    img: CheckImage, offset: int, entries: int, entry_len: int, max_bytes: int, name: str
) -> None:
    """QEMU's qcow2_validate_table: a size cap, then alignment and int64 overflow."""
    if entries > max_bytes // entry_len:
        raise ImageFormatError(f"{name} too large")
    if _INT64_MAX - entries * entry_len < offset or offset % img.cluster_size:
        raise ImageFormatError(f"{name} offset invalid")


class StoredRefcounts:
    """The refcounts the image stores, read through its refcount table; writable for repairs.

    A refcount block whose reftable entry is not cluster aligned cannot be read: QEMU reports
    every cluster it covers as "Can't get refcount" and marks the image corrupt; ``bad`` masks
    carry that. Clusters past the refcount table, or under a zero entry, have refcount 0.
    """

    def __init__(self, img: CheckImage) -> None:
        self.img = img
        self.block_entries = 1 << img.rb_bits
        self._cache: dict[int, U64Array] = {}
        self.reftable = self._load_reftable()

    def _load_reftable(self) -> U64Array:
        h = self.img.header
        return self.img.read_table(h.refcount_table_offset, self.img.reftable_entries)

    def block_offset(self, index: int) -> int:
        """Masked offset of refcount block ``index`` (0: none)."""
        if index >= len(self.reftable):
            return 0
        return int(self.reftable[index]) & REFT_OFFSET_MASK

    def block(self, index: int) -> U64Array | None:
        """Refcounts of block ``index``; ``None`` when its offset is unaligned (unreadable)."""
        offset = self.block_offset(index)
        if offset % self.img.cluster_size:
            return None
        if offset == 0:
            return np.zeros(self.block_entries, dtype=np.uint64)
        cached = self._cache.get(offset)
        if cached is None:
            raw = self.img.read(offset, self.img.cluster_size)
            cached = decode_refblock(raw, self.img.header.refcount_order)
            if len(self._cache) >= 256:  # bounded: lookups may touch blocks all over the file
                self._cache.clear()
            self._cache[offset] = cached
        return cached

    @property
    def dtype(self) -> type[np.unsignedinteger[Any]]:
        """The narrowest unsigned type holding every refcount of this width."""
        order = self.img.header.refcount_order
        return (np.uint8, np.uint8, np.uint8, np.uint8, np.uint16, np.uint32, np.uint64)[order]

    def any_block(self, lo: int, hi: int) -> bool:
        """Whether any refcount block describes a cluster of ``[lo, hi)``."""
        per = self.block_entries
        return bool(self.reftable[lo // per : -(-hi // per)].any())

    def range(
        self, lo: int, hi: int
    ) -> tuple[npt.NDArray[np.unsignedinteger[Any]], BoolArray]:
        """Stored refcounts of clusters ``[lo, hi)`` and the mask of those that cannot be read.

        The values come in :attr:`dtype` (a 1 TiB image at 64 KiB clusters: 32 MiB).
        """
        values = np.zeros(hi - lo, dtype=self.dtype)
        bad = np.zeros(hi - lo, dtype=bool)
        per = self.block_entries
        for index in range(lo // per, -(-hi // per)):
            start = max(lo, index * per)
            stop = min(hi, (index + 1) * per)
            block = self.block(index)
            if block is None:
                bad[start - lo : stop - lo] = True
            else:
                values[start - lo : stop - lo] = block[start - index * per : stop - index * per]
        return values, bad

    def lookup(self, clusters: U64Array) -> tuple[U64Array, BoolArray]:
        """Stored refcounts of arbitrary clusters (any order, any size) and a readable mask."""
        values = np.zeros(clusters.shape, dtype=np.uint64)
        ok = np.ones(clusters.shape, dtype=bool)
        if clusters.size == 0:
            return values, ok
        blocks = clusters >> np.uint64(self.img.rb_bits)
        within = (clusters & np.uint64(self.block_entries - 1)).astype(np.int64)
        present = np.flatnonzero(blocks < np.uint64(len(self.reftable)))
        uniq, inverse = np.unique(blocks[present], return_inverse=True)
        order = np.argsort(inverse, kind="stable")  # group the clusters by refcount block
        bounds = np.searchsorted(inverse[order], np.arange(uniq.size + 1))
        for k, index in enumerate(uniq.tolist()):
            sel = present[order[bounds[k] : bounds[k + 1]]]
            block = self.block(index)
            if block is None:
                ok[sel] = False
            else:
                values[sel] = block[within[sel]]
        return values, ok

    def write_block(self, index: int, values: U64Array) -> None:
        """Write refcount block ``index`` (which must exist and be aligned) with ``values``."""
        offset = self.block_offset(index)
        if offset == 0 or offset % self.img.cluster_size:
            raise ImageFormatError(f"refcount block {index} cannot be written")
        self.img.write(offset, encode_refblock(values, self.img.header.refcount_order))
        self._cache[offset] = values.copy()

    def reload(self) -> None:
        """Forget cached blocks and reread the table (after the header moved it)."""
        self._cache.clear()
        self.reftable = self._load_reftable()


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the checker needs of one snapshot table entry."""

    id_str: str
    name: str
    l1_table_offset: int
    l1_size: int


_SNAPSHOT_HEADER = struct.Struct(">QIHHIIQII")  # l1 offset, l1 size, id/name sizes, ..., extra
MAX_SNAPSHOT_EXTRA_DATA = 1024
MAX_SNAPSHOTS_SIZE = 1024 * MAX_SNAPSHOTS


def read_snapshots(img: CheckImage) -> tuple[list[Snapshot], int]:
    """The snapshot table's entries and its length in bytes (unpadded, as QEMU counts it).

    Each entry is a 40-byte header, extra data, the id string and the name, and starts on an
    8-byte boundary. Raises :class:`ImageFormatError` for a table QEMU would refuse to load.
    """
    h = img.header
    snapshots: list[Snapshot] = []
    offset = h.snapshots_offset
    for i in range(h.nb_snapshots):
        offset = (offset + 7) & ~7
        (l1_offset, l1_size, id_size, name_size, _s, _ns, _vm, _vms, extra) = (
            _SNAPSHOT_HEADER.unpack(img.read(offset, SNAPSHOT_HEADER_SIZE))
        )
        offset += SNAPSHOT_HEADER_SIZE
        if extra > MAX_SNAPSHOT_EXTRA_DATA:
            raise ImageFormatError(f"Too much extra metadata in snapshot table entry {i}")
        offset += extra
        id_str = img.read(offset, id_size).decode("utf-8", "replace")
        offset += id_size
        name = img.read(offset, name_size).decode("utf-8", "replace")
        offset += name_size
        if offset - h.snapshots_offset > MAX_SNAPSHOTS_SIZE:
            raise ImageFormatError("Snapshot table is too big")
        snapshots.append(Snapshot(id_str, name, l1_offset, l1_size))
    return snapshots, offset - h.snapshots_offset if h.nb_snapshots else 0
