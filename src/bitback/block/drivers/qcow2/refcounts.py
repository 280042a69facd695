"""qcow2 reference counts: the refcount table, refcount blocks, and cluster allocation.

Two levels (qcow2.txt, "Host cluster management")::

    refcount table (contiguous clusters)      refcount blocks (one cluster each)
    [ b0 | b1 | 0 | ... ]  ---------------->  [ rc(0) rc(1) ... rc(N-1) ]   N = cs * 8 / bits

Refcount blocks are cached as numpy arrays of uint64, whatever the on-disk width.

Crash safety. Every change stays in memory until :meth:`RefcountTable.write_dirty` and
:meth:`RefcountTable.apply_frees` put it on disk, which the driver calls in a fixed order:

1. ``write_dirty``: refcount blocks (new allocations counted), then the table entries that
   point at new blocks (or a relocated table, then the header that points at it);
2. the driver writes its L2 tables and L1 entries, which may now point at the new clusters;
3. ``apply_frees``: only now are references dropped by step 2 subtracted and written.

Freed clusters keep their count in memory until step 3, so they cannot be handed out again
while an on-disk table may still point at them. A crash between any two writes leaves, at
worst, clusters whose count is too high (leaks), never a referenced cluster with count 0.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from bitback.block.driver import BlockDriver
from bitback.block.drivers.qcow2.create import MAX_REFTABLE_BYTES
from bitback.errors import ImageCorruptError, ImageFormatError, NoSpaceError
from bitback.formats.qcow2.entries import (
    L1_OFFSET_MASK,
    U64Array,
    decode_refblock,
    decode_table,
    encode_refblock,
    encode_table,
    refcount_max,
)

__all__ = ["RefcountTable"]

_MAX_HOST_OFFSET = 1 << 56  # host offsets are 56-bit in table entries


class RefcountTable:
    """The refcounts of one image, cached, with ordered write-back.

    ``on_table_moved(offset, clusters)`` is called by :meth:`write_dirty` after a relocated
    refcount table has been written, to point the header at it (and make that durable).
    """

    def __init__(
        self,
        file: BlockDriver,
        *,
        cluster_bits: int,
        refcount_order: int,
        table_offset: int,
        table_clusters: int,
        on_table_moved: Callable[[int, int], None],
        barrier: Callable[[], None],
    ) -> None:
        self.file = file
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.refcount_order = refcount_order
        self.max_refcount = refcount_max(refcount_order)
        self.block_entries = self.cluster_size * 8 >> refcount_order
        self._on_table_moved = on_table_moved
        self._barrier = barrier
        if table_offset % self.cluster_size or table_offset == 0:
            raise ImageFormatError("Invalid reference count table offset")
        if table_clusters * self.cluster_size > MAX_REFTABLE_BYTES:
            raise ImageFormatError("Reference count table too large")
        if table_offset + table_clusters * self.cluster_size > file.length():
            raise ImageCorruptError("Reference count table extends past the end of the file")
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        file.debug_event("reftable_load")
        self.table: U64Array = decode_table(
            file.pread(table_offset, table_clusters * self.cluster_size)
        )
        self._blocks: dict[int, U64Array] = {}
        self._dirty_blocks: set[int] = set()
        self._dirty_entries: set[int] = set()
        self._moved_from: tuple[int, int] | None = None  # old (offset, clusters) to free
        self._pending_frees: list[tuple[int, int]] = []
        # Search hint: allocation looks for free clusters from here. Like QEMU, the search
        # starts at the beginning of the file, so clusters freed by an earlier open (old
        # bitmap data, dropped tables) are used again instead of growing the file on every
        # open; the first allocation pays one pass over the refcount blocks up to the first
        # free cluster, and clusters freed later move the hint back down.
        self._hint = 0

    # -- reading ----------------------------------------------------------------------------
    def _block(self, index: int, *, create: bool) -> U64Array | None:
        block = self._blocks.get(index)
        if block is not None:
            return block
        if index < len(self.table):
            entry = int(self.table[index])
            offset = entry & L1_OFFSET_MASK
            if entry & ~L1_OFFSET_MASK or offset % self.cluster_size:
                raise ImageCorruptError(
                    f"Refcount block {index} has an invalid offset 0x{entry:x}"
                )
            if offset:
                if offset + self.cluster_size > self.file.length():
                    raise ImageCorruptError(
                        f"Refcount block {index} at 0x{offset:x} is past the end of the file"
                    )
                self.file.debug_event("refblock_load")
                block = decode_refblock(
                    self.file.pread(offset, self.cluster_size), self.refcount_order
                )
                self._blocks[index] = block
                return block
        if not create:
            return None
        return self._create_block(index)

    def get(self, cluster: int) -> int:
        """Refcount of one host cluster (0 past the described range)."""
        block = self._block(cluster // self.block_entries, create=False)
        return 0 if block is None else int(block[cluster % self.block_entries])

    def get_range(self, start: int, count: int) -> U64Array:
        """Refcounts of ``count`` clusters from ``start`` as one array."""
        out = np.zeros(count, dtype=np.uint64)
        pos = start
        while pos < start + count:
            index, first = divmod(pos, self.block_entries)
            n = min(self.block_entries - first, start + count - pos)
            block = self._block(index, create=False)
            if block is not None:
                out[pos - start : pos - start + n] = block[first : first + n]
            pos += n
        return out

    # -- changing ---------------------------------------------------------------------------
    def update(self, start: int, count: int, delta: int) -> None:
        """Add ``delta`` to the refcounts of ``count`` clusters from ``start`` (in memory)."""
        pos = start
        end = start + count
        while pos < end:
            index, first = divmod(pos, self.block_entries)
            n = min(self.block_entries - first, end - pos)
            block = self._block(index, create=True)
            assert block is not None
            view = block[first : first + n]
            if delta < 0 and int(view.min()) < -delta:
                raise ImageCorruptError(
                    f"Refcount of cluster {pos + int(np.argmin(view))} would drop below zero"
                )
            if delta > 0 and int(view.max()) + delta > self.max_refcount:
                raise ImageCorruptError(
                    f"Refcount of cluster {pos + int(np.argmax(view))} would overflow"
                )
            if delta >= 0:
                view += np.uint64(delta)
            else:
                view -= np.uint64(-delta)
            self._dirty_blocks.add(index)
            pos += n

    def free_later(self, start: int, count: int) -> None:
        """Drop one reference from ``count`` clusters once the tables no longer use them."""
        if count > 0:
            self._pending_frees.append((start, count))

    def allocate(self, count: int, *, start: int | None = None) -> tuple[int, int]:
        """Allocate up to ``count`` contiguous clusters; returns (first cluster, how many).

        The clusters get refcount 1 in memory. Fewer than ``count`` are returned when the
        free run found is shorter; callers loop. ``start`` searches from there instead of
        the hint (and leaves the hint alone).
        """
        pos = self._hint if start is None else start
        while True:
            index, first = divmod(pos, self.block_entries)
            block = self._block(index, create=True)
            assert block is not None
            # Search a small window first: the hint usually points at free space, and
            # scanning a whole block per allocation costs more than the write it serves.
            window = max(count, 256)
            free = np.flatnonzero(block[first : first + window] == 0)
            if free.size == 0:
                free = np.flatnonzero(block[first + window :] == 0) + window
            if free.size == 0:
                pos = (index + 1) * self.block_entries
                continue
            run_start = first + int(free[0])
            # Length of the run of zeros starting at run_start, capped at count.
            rest = block[run_start : run_start + count]
            used = np.flatnonzero(rest != 0)
            n = int(used[0]) if used.size else len(rest)
            found = index * self.block_entries + run_start
            if (found + n) << self.cluster_bits > _MAX_HOST_OFFSET:
                raise NoSpaceError("qcow2 image file has reached its maximum size")
            block[run_start : run_start + n] = 1
            self._dirty_blocks.add(index)
            if start is None:
                self._hint = found + n
            return found, n

    def allocate_contiguous(self, count: int) -> int:
        """Allocate exactly ``count`` contiguous clusters (for tables); returns the first.

        A run longer than one refcount block's reach would always hit the self-describing
        first cluster of a block created for it; such blocks are moved past the run (they
        are not on disk yet, so moving them costs nothing).
        """
        # Every cluster before the first free one is in use: the hint may skip them all.
        pos = self._hint = self._next_free(self._hint)
        while True:
            end = pos + count
            span = range(pos // self.block_entries, (end - 1) // self.block_entries + 1)
            created = [i for i in span if self._block(i, create=False) is None]
            for index in created:  # all first, so moving one never creates another here
                self._create_block(index)
            for index in created:
                home = index * self.block_entries
                if pos <= home < end:
                    moved, _ = self.allocate(1, start=end)
                    self.update(home, 1, -1)
                    self.table[index] = np.uint64(moved * self.cluster_size)
                    self._dirty_entries.add(index)
            counts = self.get_range(pos, count)
            used = np.flatnonzero(counts != 0)
            if used.size == 0:
                self.update(pos, count, 1)
                if self._hint == pos:
                    self._hint = end
                return pos
            pos = self._next_free(pos + int(used[-1]) + 1)

    def _next_free(self, pos: int) -> int:
        """The first cluster at or after ``pos`` whose refcount is 0, found one refcount
        block at a time (a block that does not exist yet describes only free clusters)."""
        while True:
            index, first = divmod(pos, self.block_entries)
            block = self._block(index, create=False)
            if block is None:
                return pos
            free = np.flatnonzero(block[first:] == 0)
            if free.size:
                return pos + int(free[0])
            pos = (index + 1) * self.block_entries

    def _create_block(self, index: int) -> U64Array:
        """Create refcount block ``index``, stored in the first cluster it describes.

        Every cluster of a block that did not exist has refcount 0, so its first cluster is
        free, and the block counts itself: no allocation from elsewhere is needed.
        """
        existing = self._blocks.get(index)
        if existing is not None:
            return existing
        if index >= len(self.table):
            self._grow_table(index + 1)
            # Placing the grown table may itself have needed (and created) this block.
            existing = self._blocks.get(index)
            if existing is not None:
                return existing
        block = np.zeros(self.block_entries, dtype=np.uint64)
        block[0] = 1
        self._blocks[index] = block
        self._dirty_blocks.add(index)
        offset = index * self.block_entries * self.cluster_size
        if offset >= _MAX_HOST_OFFSET:
            raise NoSpaceError("qcow2 image file has reached its maximum size")
        self.table[index] = offset
        self._dirty_entries.add(index)
        return block

    def _grow_table(self, min_entries: int) -> None:
        """Move the refcount table to a new, larger place (in memory until written)."""
        entries_per_cluster = self.cluster_size // 8
        want = max(min_entries, len(self.table) * 2)
        clusters = -(-want // entries_per_cluster)
        if clusters * self.cluster_size > MAX_REFTABLE_BYTES:
            raise NoSpaceError("Reference count table would exceed its maximum size")
        current = (self.table_offset, self.table_clusters)
        grown = np.zeros(clusters * entries_per_cluster, dtype=np.uint64)
        grown[: len(self.table)] = self.table
        self.table = grown
        # The allocation below may create blocks recorded in the grown in-memory table.
        self.table_offset = self.allocate_contiguous(clusters) * self.cluster_size
        self.table_clusters = clusters
        if self._moved_from is None:
            self._moved_from = current  # the on-disk table, freed once the header moves
        else:
            # Moved twice before a write-back: the intermediate place was never written nor
            # referenced on disk, so it can be released at once.
            self.update(current[0] // self.cluster_size, current[1], -1)
        self._dirty_entries.update(range(len(self.table)))

    # -- writing back -----------------------------------------------------------------------
    @property
    def dirty(self) -> bool:
        return bool(self._dirty_blocks or self._dirty_entries or self._pending_frees)

    @property
    def frees_pending(self) -> bool:
        return bool(self._pending_frees)

    def write_dirty(self) -> None:
        """Step 1 of the write order: blocks, then the table (or the moved table + header)."""
        for index in sorted(self._dirty_blocks):
            block = self._blocks[index]
            offset = int(self.table[index]) & L1_OFFSET_MASK
            self.file.debug_event("refblock_update")
            self.file.pwrite(offset, encode_refblock(block, self.refcount_order))
        self._dirty_blocks.clear()
        if self._moved_from is not None:
            self.file.pwrite(self.table_offset, encode_table(self.table))
            self._barrier()
            self._on_table_moved(self.table_offset, self.table_clusters)
            old_offset, old_clusters = self._moved_from
            self._moved_from = None
            self.free_later(old_offset // self.cluster_size, old_clusters)
        elif self._dirty_entries:
            per_cluster = self.cluster_size // 8
            for c in sorted({i // per_cluster for i in self._dirty_entries}):
                chunk = self.table[c * per_cluster : (c + 1) * per_cluster]
                self.file.pwrite(self.table_offset + c * self.cluster_size, encode_table(chunk))
        self._dirty_entries.clear()

    def apply_frees(self) -> None:
        """Step 3: subtract the references the written tables no longer hold, and write."""
        frees, self._pending_frees = self._pending_frees, []
        for start, count in frees:
            self.update(start, count, -1)
            self._hint = min(self._hint, start)
        if frees:
            self.write_dirty()

    def metadata_clusters(self) -> U64Array:
        """Host cluster indexes of the table and of every refcount block (overlap checks)."""
        first = self.table_offset // self.cluster_size
        table = np.arange(first, first + self.table_clusters, dtype=np.uint64)
        blocks = (self.table[self.table != 0] & np.uint64(L1_OFFSET_MASK)) >> np.uint64(
            self.cluster_bits
        )
        return np.concatenate([table, blocks])
