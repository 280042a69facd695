"""Expected refcounts: walk every qcow2 structure and count the references to each host cluster.

This is the first half of a check (QEMU's ``calculate_refcounts``): the result is an array
``counts`` indexed by host cluster, holding how many times the metadata references each
cluster, to be compared with the refcounts the image stores. The walk visits, in QEMU's order
(which fixes the order of the messages)::

    header cluster
    active L1 table -> each L2 table -> each data / preallocated / compressed cluster
    each snapshot's L1 table -> its L2 tables -> their clusters
    snapshot table, refcount table
    bitmap directory -> each bitmap table -> each bitmap data cluster
    each refcount block

Counting is vectorised: L2 tables are read in batches of up to 4 MiB, every reference of a
batch becomes a row of (offset, length, sequence number), and the clusters they touch are
added to ``counts`` with one sort per batch. A region is one or more clusters: a
compressed cluster's bytes may straddle two host clusters (each counted once for it), and
several compressed clusters may share a host cluster (counted once per entry)::

    host clusters   |   c7    |   c8    |
    compressed A        [=====]           -> c7 += 1
    compressed B              [====]      -> c7 += 1, c8 += 1

``counts`` never covers more than the file's clusters + 1: a reference reaching a cluster or
more past the end of the file is reported (QEMU's "counting reference for region exceeding
the end of the file") and not counted, so a hostile image cannot make it grow; and it is
allocated in chunks where references land, so a huge sparse file costs nothing either.

Each counted cluster saturates at the image's refcount maximum; the references past it are
reported as overflows in traversal order. The sequence numbers order the messages: every
reference and every message carries the traversal position of the entry it comes from.
"""

from __future__ import annotations

import errno
import itertools
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from bitback.block.drivers.qcow2.check_image import (
    REFT_OFFSET_MASK,
    REFT_RESERVED,
    CheckImage,
    Snapshot,
    StoredRefcounts,
)
from bitback.block.drivers.qcow2.create import MAX_L1_BYTES
from bitback.errors import ImageFormatError
from bitback.formats.qcow2.bitmaps import (
    TABLE_OFFSET_MASK,
    decode_directory,
    invalid_table_entries,
)
from bitback.formats.qcow2.entries import (
    COPIED,
    L1_OFFSET_MASK,
    L1_RESERVED,
    L2_OFFSET_MASK,
    L2_RESERVED,
    ZERO,
    ClusterKind,
    classify,
)

__all__ = ["CheckFailed", "ClusterCounts", "Counters", "Messages", "ReferenceScan", "c_hex"]

I64Array = npt.NDArray[np.int64]
U64Array = npt.NDArray[np.uint64]

_BATCH_BYTES = 4 << 20  # L2 tables read and classified together
_OVERFLOW_HINT = (
    "Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a "
    "clean copy if the image cannot be opened for writing"
)


# (offset, length, metadata kinds the write may touch) -> (allowed, line to print)
WriteCheck = Callable[[int, int, frozenset[str]], tuple[bool, str | None]]


class CheckFailed(Exception):
    """The check cannot complete (QEMU's ``Check failed: <strerror>``, exit 1)."""

    def __init__(self, err: int) -> None:
        super().__init__(err)
        self.errno = err


def c_hex(value: int) -> str:
    """C's ``%#x``: ``0`` stays ``0``, anything else gets the ``0x`` prefix."""
    return f"{value:#x}" if value else "0"


@dataclass
class Counters:
    """The counters of QEMU's BdrvCheckResult (plus fragmentation info)."""

    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0


@dataclass
class Messages:
    """Diagnostic lines keyed by traversal position; ``lines()`` gives them in QEMU's order.

    Keys are ``(sequence, phase, sub)`` tuples: phase 0 is what QEMU prints about an entry
    before counting its reference, 1 the counting itself, 2 what comes after. Lines with equal
    keys keep the order in which they were added.
    """

    items: list[tuple[tuple[int, int, int], str]] = field(default_factory=list)

    def add(self, key: tuple[int, int, int], text: str) -> None:
        self.items.append((key, text))

    def lines(self) -> list[str]:
        return [text for _, text in sorted(self.items, key=lambda item: item[0])]


class ClusterCounts:
    """Reference counts per host cluster, in chunks of 2^20 clusters allocated on first use.

    Memory follows the clusters actually referenced, not the file's apparent size: a sparse
    16 TiB file with a few references costs a few MiB, not a 256M-entry array.
    """

    CHUNK_BITS = 20
    CHUNK = 1 << CHUNK_BITS

    def __init__(self, dtype: type[np.signedinteger[Any]]) -> None:
        self.dtype = dtype
        self.chunks: dict[int, npt.NDArray[np.signedinteger[Any]]] = {}

    def _segments(self, idx: I64Array) -> list[tuple[int, slice]]:
        """(chunk, slice of ``idx``) pairs for a *sorted* ``idx``."""
        first, last = int(idx[0]) >> self.CHUNK_BITS, int(idx[-1]) >> self.CHUNK_BITS
        if first == last:
            return [(first, slice(None))]
        starts = np.arange(first + 1, last + 1, dtype=np.int64) << self.CHUNK_BITS
        bounds = [0, *np.searchsorted(idx, starts).tolist(), idx.size]
        pairs = enumerate(itertools.pairwise(bounds))
        return [(first + k, slice(a, b)) for k, (a, b) in pairs if b > a]

    def get(self, idx: I64Array) -> I64Array:
        """Counts of the clusters ``idx`` (sorted)."""
        out = np.zeros(idx.size, np.int64)
        if idx.size:
            for cid, sel in self._segments(idx):
                chunk = self.chunks.get(cid)
                if chunk is not None:
                    out[sel] = chunk[idx[sel] & (self.CHUNK - 1)]
        return out

    def put(self, idx: I64Array, values: I64Array) -> None:
        """Set the counts of the clusters ``idx`` (sorted, distinct)."""
        if idx.size:
            for cid, sel in self._segments(idx):
                chunk = self.chunks.get(cid)
                if chunk is None:
                    chunk = self.chunks[cid] = np.zeros(self.CHUNK, self.dtype)
                chunk[idx[sel] & (self.CHUNK - 1)] = values[sel]

    def at(self, cluster: int) -> int:
        chunk = self.chunks.get(cluster >> self.CHUNK_BITS)
        return 0 if chunk is None else int(chunk[cluster & (self.CHUNK - 1)])

    def dense(self, n: int) -> npt.NDArray[np.signedinteger[Any]]:
        """Counts of clusters ``[0, n)`` as one array."""
        out = np.zeros(n, self.dtype)
        for cid, chunk in self.chunks.items():
            lo = cid << self.CHUNK_BITS
            if lo < n:
                out[lo : min(n, lo + self.CHUNK)] = chunk[: n - lo]
        return out


class ReferenceScan:
    """One walk over the image's metadata, filling ``counts`` and reporting what is malformed.

    ``fix_errors`` enables the repairs QEMU makes during the walk (a preallocated zero
    cluster at an unaligned offset becomes a plain zero cluster; a refcount block outside the
    image requests a rebuild). ``rebuild`` is set when the refcount structures themselves are
    broken.
    """

    def __init__(
        self,
        img: CheckImage,
        res: Counters,
        msgs: Messages,
        *,
        fix_errors: bool = False,
        may_write: WriteCheck | None = None,
    ) -> None:
        self.img = img
        self.may_write = may_write
        self.res = res
        self.msgs = msgs
        self.fix_errors = fix_errors
        self.bits = img.cluster_bits
        self.cs = img.cluster_size
        self.rmax = min(img.refcount_max, 1 << 62)
        # int32 halves the memory (64 MiB per TiB at 64 KiB clusters) when counts fit in it.
        self.counts = ClusterCounts(np.int32 if self.rmax < 1 << 31 else np.int64)
        self.n_mem = img.nb_clusters  # QEMU's nb_clusters: grows if a region ends in EOF+1
        self.rebuild = False
        self._seq = 0
        # Clusters inside the file of regions not counted because they run past EOF: metadata
        # still lives there, so a repair must not free them (QEMU would, and punch them out).
        self.uncounted: list[tuple[int, int]] = []

    def run(self, snapshots: list[Snapshot], snapshots_size: int, stored: StoredRefcounts) -> None:
        """Walk everything, in QEMU's order. Raises :class:`CheckFailed` like QEMU would."""
        h = self.img.header
        self._ref_one(0, self.cs)
        self._check_l1(h.l1_table_offset, h.l1_size, active=True)
        for sn in snapshots:
            key = (self._reserve(1), 0, 0)
            where = f"ERROR snapshot {sn.id_str} ({sn.name})"
            if sn.l1_table_offset % self.cs:
                self._corrupt(key, f"{where} l1_offset={c_hex(sn.l1_table_offset)}: L1 table is "
                              "not cluster aligned; snapshot table entry corrupted")
            elif sn.l1_size > MAX_L1_BYTES // 8:
                self._corrupt(key, f"{where} l1_size={c_hex(sn.l1_size)}: L1 table is too large; "
                              "snapshot table entry corrupted")
            else:
                self._check_l1(sn.l1_table_offset, sn.l1_size, active=False)
        self._ref_one(h.snapshots_offset, snapshots_size)
        self._ref_one(h.refcount_table_offset, self.img.reftable_entries * 8)
        self._check_bitmaps()
        self._check_refblocks(stored.reftable)

    # -- counting -------------------------------------------------------------------------

    def _reserve(self, n: int) -> int:
        base = self._seq
        self._seq += n
        return base

    def _corrupt(self, key: tuple[int, int, int], text: str) -> None:
        self.msgs.add(key, text)
        self.res.corruptions += 1

    def _ref_one(self, offset: int, size: int, seq: int | None = None) -> None:
        if seq is None:
            seq = self._reserve(1)
        if size <= 0:
            return
        if offset >= 1 << 62:  # beyond any file; keep the arithmetic in int64
            self._past_eof(seq, offset, size)
            return
        self._add(np.array([offset], np.int64), np.array([size], np.int64),
                  np.array([seq], np.int64))

    def _past_eof(self, seq: int, offset: int, size: int) -> None:
        self._corrupt((seq, 1, 0), "ERROR: counting reference for region exceeding the end of "
                      f"the file by one cluster or more: offset {offset:#x} size {size:#x}")
        if offset < self.img.file_len:
            self.uncounted.append((offset >> self.bits, (self.img.file_len - 1) >> self.bits))

    def in_use_uncounted(self, cluster: int) -> bool:
        """Whether metadata lies in ``cluster`` although no reference to it was counted."""
        return any(first <= cluster <= last for first, last in self.uncounted)

    def _add(self, offsets: I64Array, sizes: I64Array, seqs: I64Array) -> None:
        """Count regions ``[offset, offset + size)``, each for every host cluster it touches."""
        keep = sizes > 0
        past = keep & (offsets + sizes - self.img.file_len >= self.cs)
        for k in np.flatnonzero(past):
            self._past_eof(int(seqs[k]), int(offsets[k]), int(sizes[k]))
        keep &= ~past
        if not keep.all():
            offsets, sizes, seqs = offsets[keep], sizes[keep], seqs[keep]
        if offsets.size == 0:
            return
        first = offsets >> self.bits
        spans = ((offsets + sizes - 1) >> self.bits) - first + 1
        if bool((spans == 1).all()):
            clusters, cseqs = first, seqs
        else:  # expand each region into its clusters
            clusters = np.repeat(first, spans)
            starts = np.repeat(np.cumsum(spans) - spans, spans)
            clusters += np.arange(clusters.size, dtype=np.int64) - starts
            cseqs = np.repeat(seqs, spans)
        self.n_mem = max(self.n_mem, int(clusters.max()) + 1)
        ordered = np.sort(clusters)  # a plain sort is fast on the sorted runs tables give
        repeated = ordered[1:] == ordered[:-1]
        if bool(repeated.any()):
            first = np.r_[True, ~repeated]
            uniq = ordered[first]
            total = self.counts.get(uniq) + np.diff(np.r_[np.flatnonzero(first), ordered.size])
        else:
            uniq = ordered
            total = self.counts.get(uniq) + 1
        over = total > self.rmax
        if bool(over.any()):
            self._overflow(clusters, cseqs, uniq[over])
            total = np.minimum(total, self.rmax)
        self.counts.put(uniq, total)

    def _overflow(self, clusters: I64Array, seqs: I64Array, over: I64Array) -> None:
        """Report each reference that found its cluster's count already at the maximum."""
        sel = np.isin(clusters, over)
        c, s = clusters[sel], seqs[sel]
        order = np.lexsort((c, s))  # traversal order
        c, s = c[order], s[order]
        by_cluster = np.argsort(c, kind="stable")
        c, s = c[by_cluster], s[by_cluster]
        idx = np.arange(c.size)
        group_start = np.maximum.accumulate(np.where(np.r_[True, c[1:] != c[:-1]], idx, 0))
        rank = idx - group_start
        for k in np.flatnonzero(self.counts.get(c) + rank >= self.rmax):
            key = (int(s[k]), 1, int(c[k]))
            self._corrupt(key, f"ERROR: overflow cluster offset={int(c[k]) << self.bits:#x}")
            self.msgs.add(key, _OVERFLOW_HINT)

    # -- L1 / L2 --------------------------------------------------------------------------

    def _check_l1(self, l1_offset: int, l1_size: int, *, active: bool) -> None:
        """Count an L1 table, its L2 tables and their clusters (QEMU's check_refcounts_l1)."""
        stride = self.cs // 8 + 1  # sequence numbers: the L1 entry, then its L2's entries
        base = self._reserve(1 + l1_size * stride)
        self._ref_one(l1_offset, l1_size * 8, base)
        if l1_size == 0 or l1_offset >= self.img.file_len:
            return  # a table wholly past EOF reads as zeros: no entries to look at
        l1 = self.img.read_table(l1_offset, l1_size)
        for i in np.flatnonzero(l1 & np.uint64(L1_RESERVED)):
            self._corrupt((base + 1 + int(i) * stride, 0, 0),
                          f"ERROR found L1 entry with reserved bits set: {int(l1[i]):x}")
        l2_offsets = l1 & np.uint64(L1_OFFSET_MASK)
        used = np.flatnonzero(l2_offsets)
        batch = max(1, _BATCH_BYTES // self.cs)
        for start in range(0, used.size, batch):
            idx = used[start : start + batch]
            seqs = base + 1 + idx.astype(np.int64) * stride
            self._check_l2_batch(l2_offsets[idx], seqs, active=active)

    def _check_l2_batch(self, l2_offsets: U64Array, seqs: I64Array, *, active: bool) -> None:
        cs = self.cs
        offsets = [l2_offsets.astype(np.int64)]
        sizes = [np.full(l2_offsets.size, cs, np.int64)]
        ref_seqs = [seqs]
        for k in np.flatnonzero(l2_offsets % np.uint64(cs)):
            self._corrupt((int(seqs[k]), 2, 0), f"ERROR l2_offset={int(l2_offsets[k]):x}: "
                          "Table is not cluster aligned; L1 entry corrupted")
        inside = np.flatnonzero(l2_offsets < np.uint64(self.img.file_len))  # others read as 0
        if inside.size:
            tables = self.img.read_tables(l2_offsets[inside])
            self._check_l2_entries(tables, l2_offsets[inside], seqs[inside] + 1,
                                   offsets, sizes, ref_seqs, active=active)
        self._add(np.concatenate(offsets), np.concatenate(sizes), np.concatenate(ref_seqs))

    def _check_l2_entries(
        self,
        tables: U64Array,
        l2_offsets: U64Array,
        first_seqs: I64Array,
        offsets: list[I64Array],
        sizes: list[I64Array],
        ref_seqs: list[I64Array],
        *,
        active: bool,
    ) -> None:
        """Check one batch of L2 tables (rows) and queue the references of their entries."""
        cs, bits = self.cs, self.bits
        kinds = classify(tables)
        compressed = kinds == ClusterKind.COMPRESSED
        reserved = ~compressed & ((tables & np.uint64(L2_RESERVED)) != 0)
        for r, j in np.argwhere(reserved) if reserved.any() else ():
            self._corrupt((int(first_seqs[r]) + int(j), 0, 0),
                          f"ERROR found l2 entry with reserved bits set: {int(tables[r, j]):x}")
        if compressed.any():
            rows, cols = np.nonzero(compressed)
            entries = tables[rows, cols]
            entry_seqs = first_seqs[rows] + cols
            shift = 62 - (bits - 8)
            coffset = entries & np.uint64((1 << shift) - 1)
            for k in np.flatnonzero(entries & np.uint64(COPIED)):
                self._corrupt((int(entry_seqs[k]), 0, 0), f"ERROR: coffset={int(coffset[k]):#x}:"
                              " copied flag must never be set for compressed clusters")
            sectors = ((entries >> np.uint64(shift)) & np.uint64((1 << (bits - 8)) - 1)) + 1
            csize = sectors * np.uint64(512) - (coffset & np.uint64(511))
            offsets.append(coffset.astype(np.int64))
            sizes.append(csize.astype(np.int64))
            ref_seqs.append(entry_seqs)
            if active:  # compressed clusters count as fragmented by nature, as in QEMU
                self.res.allocated_clusters += rows.size
                self.res.compressed_clusters += rows.size
                self.res.fragmented_clusters += rows.size
        allocated = (kinds == ClusterKind.NORMAL) | (kinds == ClusterKind.ZERO_ALLOC)
        host = tables & np.uint64(L2_OFFSET_MASK)
        unaligned = allocated & ((host & np.uint64(cs - 1)) != 0)
        for r, j in np.argwhere(unaligned) if unaligned.any() else ():
            if self._unaligned_entry(tables, host, kinds, l2_offsets, first_seqs, int(r), int(j),
                                     active=active):
                allocated[r, j] = False  # repaired into a plain zero cluster: no reference left
        rows, cols = np.nonzero(allocated)
        if rows.size:
            data = host[rows, cols].astype(np.int64)
            offsets.append(data)
            sizes.append(np.full(rows.size, cs, np.int64))
            ref_seqs.append(first_seqs[rows] + cols)
            if active:
                self.res.allocated_clusters += rows.size
                # Fragmented: not the table's first allocated cluster and not right after the
                # previous one (rows/cols come out of np.nonzero in table order).
                same_table = rows[1:] == rows[:-1]
                self.res.fragmented_clusters += int(
                    np.count_nonzero(same_table & (data[1:] != data[:-1] + cs))
                )

    def _unaligned_entry(
        self,
        tables: U64Array,
        host: U64Array,
        kinds: npt.NDArray[np.uint8],
        l2_offsets: U64Array,
        first_seqs: I64Array,
        r: int,
        j: int,
        *,
        active: bool,
    ) -> bool:
        """Report an allocated L2 entry at an unaligned host offset; True if repaired away."""
        key = (int(first_seqs[r]) + j, 0, 0)
        offset = int(host[r, j])
        if kinds[r, j] == ClusterKind.NORMAL:
            self._corrupt(key, f"ERROR offset={offset:x}: Data cluster is not properly aligned; "
                          "L2 entry corrupted.")
            return False
        verb = "Repairing" if self.fix_errors else "ERROR"
        self._corrupt(key, f"{verb} offset={offset:x}: Preallocated cluster is not properly "
                      "aligned; L2 entry corrupted.")
        if not self.fix_errors:
            return False
        # A zero cluster with no host cluster reads the same and references nothing.
        where = int(l2_offsets[r]) + 8 * j
        if self.may_write is not None:
            own = frozenset({"active L2 table" if active else "inactive L2 table"})
            allowed, line = self.may_write(where, 8, own)
            if line:
                self.msgs.add(key, line)
            if not allowed:  # QEMU gives up on the whole check
                self.msgs.add(key, "ERROR: Overlap check failed")
                self.res.check_errors += 1
                raise CheckFailed(errno.EIO)
        self.img.write(where, struct.pack(">Q", ZERO))
        self.img.sync()  # durable before any refcount it released is lowered
        tables[r, j] = ZERO
        self.res.corruptions -= 1
        self.res.corruptions_fixed += 1
        return True

    # -- bitmaps --------------------------------------------------------------------------

    def _check_bitmaps(self) -> None:
        """Count the bitmap directory, tables and data clusters (autoclear bit 0 set only).

        The directory and the tables go through the one codec
        (:mod:`bitback.formats.qcow2.bitmaps`), so the checker refuses exactly what the
        driver refuses to load; QEMU fails such a check as "Invalid argument".
        """
        ext = self.img.bitmaps
        if ext is None:
            return
        self._ref_one(ext.directory_offset, ext.directory_size)
        raw = self.img.read(ext.directory_offset, ext.directory_size)
        try:
            entries = decode_directory(raw, ext, cluster_size=self.cs,
                                       disk_size=self.img.header.size)
        except ImageFormatError:
            self.res.corruptions += 1
            raise CheckFailed(errno.EINVAL) from None
        for entry in entries:
            seq = self._reserve(1)
            self._ref_one(entry.table_offset, entry.table_size * 8, seq)
            table = self.img.read_table(entry.table_offset, entry.table_size)
            if invalid_table_entries(table, self.cs):  # QEMU fails to load the table
                self.res.corruptions += 1
                raise CheckFailed(errno.EINVAL)
            offsets = table & np.uint64(TABLE_OFFSET_MASK)
            used = offsets[offsets != 0].astype(np.int64)
            self._add(used, np.full(used.size, self.cs, np.int64), np.full(used.size, seq))

    # -- refcount blocks ------------------------------------------------------------------

    def _check_refblocks(self, reftable: U64Array) -> None:
        """Count each refcount block; a broken one (QEMU's check_refblocks) asks for a rebuild.

        One Python step per non-zero reftable entry: there is one per 2 GiB of image at 64 KiB
        clusters, and the refcount each block must have depends on the blocks before it.
        """
        for i in np.flatnonzero(reftable):
            entry = int(reftable[i])
            seq = self._reserve(1)
            key = (seq, 0, 0)
            offset = entry & REFT_OFFSET_MASK
            if entry & REFT_RESERVED:
                self._corrupt(key, f"ERROR refcount table entry {i} has reserved bits set")
                self.rebuild = True
            elif offset % self.cs:
                self._corrupt(key, f"ERROR refcount block {i} is not cluster aligned; "
                              "refcount table entry corrupted")
                self.rebuild = True
            elif offset >> self.bits >= self.n_mem:
                # QEMU -r all grows the file to hold the block; a rebuild gives the same end
                # result without letting a hostile entry make the file (and our arrays) huge.
                self._corrupt(key, f"ERROR refcount block {i} is outside image")
                self.rebuild = self.rebuild or self.fix_errors
            else:
                self._ref_one(offset, self.cs, seq)
                count = self.counts.at(offset >> self.bits)
                if count != 1:
                    self._corrupt((seq, 2, 0), f"ERROR refcount block {i} refcount={count}")
                    self.rebuild = True
