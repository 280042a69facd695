"""The L1 table and the L2 table cache of an open qcow2 image.

Guest offset -> host offset goes through two levels::

    guest offset = | l1_index | l2_index | offset in cluster |
                               \\ cluster_bits - 3 bits / \\ cluster_bits /

One L2 table maps ``cluster_size / 8`` clusters (512 MiB of guest data with 64 KiB
clusters). L2 tables are cached as native uint64 numpy arrays; changed ones stay in memory
(write-back) until the driver writes metadata in its crash-safe order (see
:mod:`bitback.block.drivers.qcow2.refcounts`).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from bitback.block.driver import BlockDriver
from bitback.block.drivers.qcow2.create import MAX_L1_BYTES
from bitback.errors import ImageCorruptError, ImageFormatError
from bitback.formats.qcow2.entries import (
    COPIED,
    L1_OFFSET_MASK,
    L1_RESERVED,
    U64Array,
    decode_table,
    encode_table,
)

__all__ = ["L2Cache"]

_CACHE_BYTES = 32 << 20  # how much L2 data to keep cached


class L2Cache:
    """The in-memory L1 table plus an LRU cache of L2 tables, with dirty tracking."""

    def __init__(
        self, file: BlockDriver, *, cluster_bits: int, l1_offset: int, l1_size: int
    ) -> None:
        self.file = file
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.l2_entries = self.cluster_size // 8
        if l1_size * 8 > MAX_L1_BYTES:
            raise ImageFormatError("Active L1 table too large")
        if l1_size and (l1_offset % self.cluster_size or l1_offset == 0):
            raise ImageFormatError("Invalid L1 table offset")
        if l1_size and l1_offset + l1_size * 8 > file.length():
            raise ImageCorruptError("L1 table extends past the end of the file")
        self.l1_offset = l1_offset
        self.l1: U64Array = (
            decode_table(file.pread(l1_offset, l1_size * 8))
            if l1_size
            else np.zeros(0, dtype=np.uint64)
        )
        self._tables: OrderedDict[int, U64Array] = OrderedDict()
        # Changes to each cached table, so derived data (the driver's run index) can tell
        # when it is stale.
        self.generation: dict[int, int] = {}
        self.dirty_l2: set[int] = set()
        self.dirty_l1: set[int] = set()
        self.max_tables = max(16, _CACHE_BYTES // self.cluster_size)

    @property
    def l1_clusters(self) -> int:
        return -(-len(self.l1) * 8 // self.cluster_size)

    def l2_offset(self, index: int) -> int:
        """Host offset of L2 table ``index`` (0 when not allocated); validated."""
        if index >= len(self.l1):
            return 0
        entry = int(self.l1[index])
        offset = entry & L1_OFFSET_MASK
        if entry & L1_RESERVED or offset % self.cluster_size:
            raise ImageCorruptError(f"L1 entry {index} is invalid (0x{entry:x})")
        return offset

    def get(self, index: int) -> U64Array | None:
        """L2 table ``index`` from the cache or the disk; ``None`` if not allocated."""
        table = self._tables.get(index)
        if table is not None:
            self._tables.move_to_end(index)
            return table
        offset = self.l2_offset(index)
        if offset == 0:
            return None
        if offset < self.cluster_size or offset + self.cluster_size > self.file.length():
            raise ImageCorruptError(
                f"L2 table {index} at offset 0x{offset:x} is outside the image file"
            )
        self.file.debug_event("l2_load")
        table = decode_table(self.file.pread(offset, self.cluster_size))
        self._tables[index] = table
        return table

    def install(self, index: int, table: U64Array, host_offset: int) -> None:
        """Put a new (or copied) L2 table at ``host_offset`` and point L1 at it."""
        self._tables[index] = table
        self._tables.move_to_end(index)
        self.mark_dirty(index)
        self.l1[index] = np.uint64(host_offset | COPIED)
        self.dirty_l1.add(index)

    def mark_dirty(self, index: int) -> None:
        self.dirty_l2.add(index)
        self.generation[index] = self.generation.get(index, 0) + 1

    def over_budget(self) -> bool:
        return len(self._tables) > self.max_tables

    def evict_clean(self) -> None:
        """Drop least recently used clean tables down to the budget."""
        for index in list(self._tables):
            if len(self._tables) <= self.max_tables:
                break
            if index not in self.dirty_l2:
                del self._tables[index]

    @property
    def dirty(self) -> bool:
        return bool(self.dirty_l2 or self.dirty_l1)

    def write_dirty(self) -> None:
        """Step 2 of the write order: dirty L2 tables, then the L1 entries pointing at them."""
        for index in sorted(self.dirty_l2):
            table = self._tables[index]
            self.file.debug_event("l2_update")
            self.file.pwrite(self.l2_offset(index), encode_table(table))
        self.dirty_l2.clear()
        if self.dirty_l1:
            self.file.debug_event("l1_update")
            lo, hi = min(self.dirty_l1), max(self.dirty_l1) + 1
            self.file.pwrite(self.l1_offset + lo * 8, encode_table(self.l1[lo:hi]))
            self.dirty_l1.clear()

    def forget(self, index: int) -> None:
        """Drop a table from the cache (its L1 entry was cleared)."""
        self._tables.pop(index, None)
        self.dirty_l2.discard(index)
        self.generation[index] = self.generation.get(index, 0) + 1

    def metadata_clusters(self) -> U64Array:
        """Host cluster indexes of the L1 table and every L2 table (overlap checks)."""
        first = self.l1_offset // self.cluster_size
        l1 = np.arange(first, first + self.l1_clusters, dtype=np.uint64)
        l2 = (self.l1[self.l1 != 0] & np.uint64(L1_OFFSET_MASK)) >> np.uint64(self.cluster_bits)
        return np.concatenate([l1, l2])
