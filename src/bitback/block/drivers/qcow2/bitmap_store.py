"""Persistent dirty bitmaps of one qcow2 image: loaded at open, stored at close.

The life cycle is QEMU 7.2's (``block/qcow2-bitmap.c``), because another program must be able
to pick the image up at any moment:

* **open**: the bitmaps extension is read when autoclear bit 0 is set (otherwise a program
  without bitmap support wrote the image, and the extension is stale: ignored, later dropped).
  Every bitmap becomes a :class:`~bitback.bitmaps.DirtyBitmap` with ``persistent`` set; one
  whose entry says IN_USE was not saved by its last writer and is *inconsistent* (its data is
  not read). Read-write opens then set IN_USE on every other entry, in place, before anything
  else changes, so a crash from here on leaves them inconsistent, never silently stale.
* **while open**: writes mark the bitmaps. Bitmap data on disk stays as it was (IN_USE makes it
  moot): that is why nothing is written on an ordinary flush.
* **store** (close, ``quit``, ``blockdev-del``): each consistent, writable bitmap goes to newly
  allocated clusters, then a new directory, then the refcounts are made durable, then the
  header points at the new directory with the autoclear bit set, and only then are the old
  tables and data freed. A crash at any point leaves either the old state (bitmaps in use) or
  the new one, plus at worst leaked clusters.
* **remove**: a new directory without the entry, the header, then the entry's clusters freed.

The IN_USE rewrite follows QEMU's in-place protocol: clear the autoclear bit (so readers ignore
the directory while it changes), rewrite the directory where it is, set the bit again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from bitback.bitmaps import DirtyBitmap, GranuleBits
from bitback.errors import ImageFormatError, InvalidArgumentError, UnsupportedFeatureError
from bitback.formats.qcow2.bitmaps import (
    FLAG_AUTO,
    FLAG_IN_USE,
    MAX_BITMAPS,
    MAX_DIRECTORY_SIZE,
    TABLE_ALL_ONES,
    TABLE_OFFSET_MASK,
    BitmapEntry,
    BitmapsExtension,
    check_new_bitmap,
    decode_directory,
    decode_extension,
    decode_table,
    encode_directory,
    encode_extension,
    encode_table,
    entry_size,
    invalid_table_entries,
    table_clusters,
)
from bitback.formats.qcow2.header import AUTOCLEAR_BITMAPS, EXT_BITMAPS

if TYPE_CHECKING:
    from bitback.block.drivers.qcow2.driver import Qcow2Driver

__all__ = ["PersistentBitmaps"]


class PersistentBitmaps:
    """The bitmaps stored in one qcow2 image, and the rules for changing them.

    ``bitmaps`` (newest first, as QEMU lists a node's bitmaps) are the in-memory bitmaps the
    image holds. An owner that tracks writes itself (the daemon's block node) sets
    ``source`` to hand back its current list of bitmaps at store time and clears
    ``track_writes``; otherwise the driver marks ``bitmaps`` on every write (the tools).
    """

    def __init__(self, drv: Qcow2Driver) -> None:
        self.drv = drv
        self.entries: list[BitmapEntry] = []
        self.ext: BitmapsExtension | None = None
        self.stale_extension = False  # an extension present without the autoclear bit
        self.track_writes = True
        self.source: Callable[[], Sequence[DirtyBitmap]] | None = None
        self._loaded: list[DirtyBitmap] | None = None
        self._read_directory()

    # -- opening --------------------------------------------------------------------------
    def _read_directory(self) -> None:
        h = self.drv.header
        raw_ext = h.extension(EXT_BITMAPS)
        if raw_ext is None:
            return
        if not h.autoclear_features & AUTOCLEAR_BITMAPS:
            self.stale_extension = True
            return
        ext = decode_extension(raw_ext.data, self.drv.cs, self.drv.filename)
        # Loading reads past the end of the file as zeros and judges what it decoded, as
        # QEMU does (its block layer zero-fills such reads): a directory past EOF is then
        # "Bitmap '' doesn't satisfy the constraints", a table past EOF an all-zero bitmap.
        # Sizes are bounded by the codec's limits before anything is read.
        raw = self.drv.file.pread(ext.directory_offset, ext.directory_size)
        self.entries = decode_directory(
            raw, ext, cluster_size=self.drv.cs, disk_size=h.size
        )
        self.ext = ext

    def _check_range(self, offset: int, size: int, what: str) -> None:
        if offset + size > self.drv.file.length():
            raise ImageFormatError(f"The {what} is past the end of the image file")

    @property
    def bitmaps(self) -> list[DirtyBitmap]:
        """The image's bitmaps, newest first; data is read on first use."""
        if self._loaded is None:
            self._loaded = [self._load(e) for e in reversed(self.entries)]
        return self._loaded

    def _load(self, entry: BitmapEntry) -> DirtyBitmap:
        size = self.drv.header.size
        bitmap = DirtyBitmap(size, entry.granularity, entry.name,
                             enabled=entry.auto, persistent=True)
        bitmap.readonly = self.drv.read_only
        if entry.in_use:
            bitmap.mark_inconsistent()  # its writer never saved it: the data means nothing
            return bitmap
        table = self._read_table(entry)
        if len(table) != table_clusters(size, entry.granularity, self.drv.cs):
            raise ImageFormatError(
                f"Could not read bitmap '{entry.name}' from image: Invalid argument"
            )
        bitmap.bits = self._read_data(table, size, entry.granularity)
        return bitmap

    def _read_table(self, entry: BitmapEntry) -> np.ndarray:
        table = decode_table(self.drv.file.pread(entry.table_offset, entry.table_size * 8))
        if invalid_table_entries(table, self.drv.cs):
            raise ImageFormatError(
                f"Could not read bitmap_table table from image for bitmap '{entry.name}': "
                "Invalid argument"
            )
        return table

    def _read_data(self, table: np.ndarray, size: int, granularity: int) -> GranuleBits:
        cs = self.drv.cs
        buf = bytearray(len(table) * cs)
        for i, raw in enumerate(table.tolist()):
            offset = raw & TABLE_OFFSET_MASK
            if offset:
                buf[i * cs : (i + 1) * cs] = self.drv.file.pread(offset, cs)
            elif raw & TABLE_ALL_ONES:
                buf[i * cs : (i + 1) * cs] = b"\xff" * cs
        return GranuleBits.from_bytes(bytes(buf), size, granularity)

    def mark_in_use(self) -> None:
        """Set IN_USE on every consistent entry (read-write open), QEMU's in-place way."""
        if self.ext is None or all(e.in_use for e in self.entries):
            return
        self.bitmaps  # noqa: B018 - the data must be in memory before the image says in use
        entries = [replace(e, flags=e.flags | FLAG_IN_USE) for e in self.entries]
        raw = encode_directory(entries, cluster_size=self.drv.cs,
                               disk_size=self.drv.header.size)
        assert len(raw) == self.ext.directory_size
        drv = self.drv
        drv._write_header(replace(drv.header, autoclear_features=drv.header.autoclear_features
                                 & ~AUTOCLEAR_BITMAPS))
        drv._barrier()
        drv.file.pwrite(self.ext.directory_offset, raw)
        drv._barrier()
        drv._write_header(replace(drv.header, autoclear_features=drv.header.autoclear_features
                                 | AUTOCLEAR_BITMAPS))
        drv._barrier()
        self.entries = entries

    # -- while open -------------------------------------------------------------------------
    def current(self) -> list[DirtyBitmap]:
        """The bitmaps that belong in the image now (owner's view when there is an owner)."""
        if self.source is not None:
            return [b for b in self.source() if b.persistent and b.name is not None]
        return self.bitmaps

    def mark(self, offset: int, length: int) -> None:
        if self.track_writes and self._loaded:
            for bitmap in self._loaded:
                bitmap.mark(offset, length)

    def check_resize(self) -> None:
        """QEMU's qcow2_truncate_bitmaps_check: inconsistent bitmaps cannot follow a resize.

        QEMU walks the directory (so the first bad bitmap named is the first on disk, not the
        newest in memory) and needs every stored bitmap in memory.
        """
        current = {b.name: b for b in self.current()}
        for entry in self.entries:
            bitmap = current.get(entry.name)
            if bitmap is None:
                raise UnsupportedFeatureError(
                    "Cannot resize qcow2 with persistent bitmaps that were not loaded into "
                    "memory"
                )
            bitmap.check_usable()

    def resized(self, size: int) -> None:
        if self.track_writes and self._loaded:
            for bitmap in self._loaded:
                bitmap.resize(size)

    def check_new(self, name: str, granularity: int, label: str) -> None:
        """QEMU's qcow2_co_can_store_new_dirty_bitmap, with its texts."""
        prefix = f"Can't make bitmap '{name}' persistent in '{label}': "
        current = self.current()
        try:
            # A duplicate name is refused later, without this prefix (QEMU 7.2's order).
            if self.drv.header.version < 3:
                raise UnsupportedFeatureError("Cannot store dirty bitmaps in qcow2 v2 files")
            check_new_bitmap(name, granularity, disk_size=self.drv.header.size,
                             cluster_size=self.drv.cs)
            if len(current) + 1 > MAX_BITMAPS:
                raise InvalidArgumentError(
                    "Maximum number of persistent bitmaps is already reached")
            dir_size = sum(entry_size(b.name or "") for b in current) + entry_size(name)
            if dir_size > MAX_DIRECTORY_SIZE:
                raise InvalidArgumentError("Not enough space in the bitmap directory")
        except (ImageFormatError, InvalidArgumentError, UnsupportedFeatureError) as exc:
            raise InvalidArgumentError(prefix + str(exc)) from None

    def add(self, bitmap: DirtyBitmap) -> None:
        """Adopt a new persistent bitmap (tools; the daemon's node keeps its own list)."""
        self.bitmaps.insert(0, bitmap)

    # -- storing --------------------------------------------------------------------------
    def store(self) -> None:
        """Write every consistent, writable bitmap and a new directory (close-time)."""
        if self.drv.read_only:
            return
        current = self.current()
        writable = [b for b in current if not b.inconsistent and not b.readonly]
        if not writable:
            return
        entries: list[BitmapEntry] = []
        drop: list[BitmapEntry] = []
        # Existing entries keep their place; an entry whose bitmap went away unsaved (it was
        # removed from memory only) stays as it is, as QEMU leaves it.
        written = {b.name: b for b in writable}
        for e in self.entries:
            bitmap = written.pop(e.name, None)
            if bitmap is None:
                entries.append(e)
                continue
            if not e.in_use:
                raise ImageFormatError(f"Bitmap '{e.name}' already exists in the image")
            drop.append(e)
            entries.append(self._write_bitmap(bitmap))
        for bitmap in writable:  # newcomers, newest first as QEMU walks the node's list
            if bitmap.name in written:
                entries.append(self._write_bitmap(bitmap))
        self._replace_directory(entries)
        for e in drop:
            self._free_bitmap(e)
        self.drv.flush_metadata()

    def _write_bitmap(self, bitmap: DirtyBitmap) -> BitmapEntry:
        assert bitmap.name is not None
        drv = self.drv
        cs, cb = drv.cs, drv.cb
        check_new_bitmap(bitmap.name, bitmap.granularity, disk_size=drv.header.size,
                         cluster_size=cs)
        n = table_clusters(drv.header.size, bitmap.granularity, cs)
        data = bitmap.bits.to_bytes()
        data = data[: n * cs] + bytes(max(0, n * cs - len(data)))
        table = np.zeros(n, dtype=np.uint64)
        for i in range(n):
            chunk = data[i * cs : (i + 1) * cs]
            if chunk.count(0) == len(chunk):
                continue  # all zeroes: entry 0
            if _all_set(bitmap.bits, i, cs):
                table[i] = np.uint64(TABLE_ALL_ONES)  # no data cluster needed
                continue
            host = drv.refcounts.allocate_contiguous(1) << cb
            drv.file.pwrite(host, chunk)
            table[i] = np.uint64(host)
        table_bytes = n * 8
        start = drv.refcounts.allocate_contiguous(-(-table_bytes // cs)) << cb
        raw = encode_table(table)
        drv.file.pwrite(start, raw + bytes(-len(raw) % cs))
        flags = FLAG_AUTO if bitmap.enabled else 0
        return BitmapEntry(bitmap.name, start, n, flags, bitmap.granularity.bit_length() - 1)

    def remove(self, name: str) -> None:
        """Take ``name`` out of the image now (block-dirty-bitmap-remove, bitmap --remove).

        Absent names are not an error: the bitmap may never have been stored.
        """
        entry = next((e for e in self.entries if e.name == name), None)
        if entry is None:
            return
        self._replace_directory([e for e in self.entries if e is not entry])
        self._free_bitmap(entry)
        self.drv.flush_metadata()

    def forget(self, bitmap: DirtyBitmap) -> None:
        """Drop an in-memory bitmap (tools), after :meth:`remove` took it off the disk."""
        if self._loaded is not None and bitmap in self._loaded:
            self._loaded.remove(bitmap)

    def _replace_directory(self, entries: list[BitmapEntry]) -> None:
        drv = self.drv
        old = self.ext
        header = drv.header
        if entries:
            raw = encode_directory(entries, cluster_size=drv.cs, disk_size=header.size)
            start = drv.refcounts.allocate_contiguous(-(-len(raw) // drv.cs)) << drv.cb
            drv.file.pwrite(start, raw + bytes(-len(raw) % drv.cs))
            ext: BitmapsExtension | None = BitmapsExtension(len(entries), len(raw), start)
            assert ext is not None
            header = header.with_extension(EXT_BITMAPS, encode_extension(ext))
            header = replace(header, autoclear_features=header.autoclear_features
                             | AUTOCLEAR_BITMAPS)
        else:
            ext = None
            header = header.with_extension(EXT_BITMAPS, None)
            header = replace(header, autoclear_features=header.autoclear_features
                             & ~AUTOCLEAR_BITMAPS)
        # New clusters and their refcounts are durable before the header points at them.
        drv.flush_metadata()
        drv._barrier()
        drv._write_header(header)
        drv._barrier()
        if old is not None:
            drv.refcounts.free_later(old.directory_offset >> drv.cb,
                                     -(-old.directory_size // drv.cs))
        self.ext = ext
        self.entries = entries
        self.stale_extension = False

    def _free_bitmap(self, entry: BitmapEntry) -> None:
        """Release a bitmap's data clusters and table (its entry is gone from the header's
        directory already)."""
        drv = self.drv
        try:
            self._check_range(entry.table_offset, entry.table_size * 8, "bitmap table")
            table = self._read_table(entry)
        except ImageFormatError:
            return  # a damaged table: its clusters leak, which check -r repairs
        end = drv.file.length()
        for raw in table.tolist():
            offset = raw & TABLE_OFFSET_MASK
            # Clusters past the end of the file (a damaged image; they loaded as zeros) have
            # no refcount to drop: freeing them would grow the refcount table instead.
            if offset and offset + drv.cs <= end:
                drv.refcounts.free_later(offset >> drv.cb, 1)
        drv.refcounts.free_later(entry.table_offset >> drv.cb,
                                 -(-entry.table_size * 8 // drv.cs))


def _all_set(bits: GranuleBits, index: int, cluster_size: int) -> bool:
    """Whether data cluster ``index`` may be stored as an all-ones table entry: every granule
    it describes is set, and they fill whole 64-bit words.

    QEMU 7.2 loads an all-ones entry in whole 64-bit words (``hbitmap_deserialize_ones``), so
    for a last cluster of, say, 1 granule it also sets the 63 granules past the end of the
    disk: they change its ``x-debug-block-dirty-bitmap-sha256``, and become dirty for real
    once the disk grows. Such a cluster is written as data, whose padding bits are zero
    (``test_persistent_bitmaps.py::test_no_dirty_granules_past_the_end_for_qemu``).
    """
    per = cluster_size * 8
    first = index * per
    last = min(len(bits), first + per)
    if (last - first) % 64:
        return False
    lo = first * bits.granularity
    hi = min(bits.size, last * bits.granularity)
    return bits.next_clean(lo, hi) is None
