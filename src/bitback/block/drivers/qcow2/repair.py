"""Repairs for ``check_qcow2(repair=...)``: refcount fixes, COPIED flags, refcount rebuild.

Every repair keeps the image no worse than before at every instant, so that a crash in the
middle leaves an image QEMU can still use (at worst with leaks):

1. refcounts that are too low are raised (written and synced) before any is lowered: for a
   while a cluster may be counted too often (a leak), never too rarely (which would let an
   allocator hand out a cluster that is still in use);
2. COPIED flags are fixed after the refcounts they describe are right;
3. a rebuild writes new refcount blocks and a new refcount table only into clusters nothing
   references, syncs, and then switches the header to them with one 12-byte write inside the
   first sector; the old structures stay intact until then and are freed afterwards as leaks.
"""

from __future__ import annotations

import ctypes
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from bitback.block.drivers.qcow2.check_image import (
    INCOMPAT_FIELD_OFFSET,
    REFT_OFFSET_MASK,
    REFTABLE_FIELDS_OFFSET,
    CheckImage,
    Snapshot,
    StoredRefcounts,
)
from bitback.formats.qcow2.entries import L1_OFFSET_MASK, encode_refblock, encode_table
from bitback.formats.qcow2.header import (
    EXT_BITMAPS,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    decode_header,
    encode_header,
)

__all__ = [
    "OverlapGuard",
    "apply_refcount_updates",
    "discard_clusters",
    "drop_bitmaps_extension",
    "mark_clean",
    "rebuild_refcount_structure",
    "write_entries",
]


def apply_refcount_updates(stored: StoredRefcounts, updates: dict[int, int]) -> None:
    """Set the stored refcount of each cluster in ``updates``; raises first, then lowers.

    Every cluster must lie in an existing, readable refcount block (the checker only asks for
    fixes where the stored refcount is non-zero, which implies that).
    """
    if not updates:
        return
    per = stored.block_entries
    by_block: dict[int, list[tuple[int, int]]] = {}
    for cluster, value in updates.items():
        by_block.setdefault(cluster // per, []).append((cluster % per, value))
    targets: dict[int, tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]] = {}
    for index, changes in by_block.items():
        current = stored.block(index)
        assert current is not None
        final = current.copy()
        for slot, value in changes:
            final[slot] = value
        targets[index] = (current.copy(), final)
    raised = False
    for index, (current, final) in targets.items():
        if bool((final > current).any()):
            stored.write_block(index, np.maximum(current, final))
            raised = True
    if raised:
        stored.img.sync()
    freed: list[int] = []
    for index, (current, final) in targets.items():
        if bool((final < current).any()):
            stored.write_block(index, final)
            freed.extend((np.flatnonzero((final == 0) & (current != 0)) + index * per).tolist())
    stored.img.sync()
    discard_clusters(stored.img, freed)


def discard_clusters(img: CheckImage, clusters: list[int]) -> None:
    """Punch holes where freed clusters were, as QEMU's check does (best effort).

    Only clusters whose refcount has just dropped to 0 (and been synced) are passed here;
    nothing references them, so their old contents may go. Runs of clusters are merged.
    """
    if not clusters or _fallocate is None:
        return
    cs = img.cluster_size
    runs: list[list[int]] = []
    for c in sorted(clusters):
        if runs and runs[-1][1] == c:
            runs[-1][1] = c + 1
        else:
            runs.append([c, c + 1])
    for start, stop in runs:
        offset = start * cs
        if offset >= img.file_len:
            break
        length = min(stop * cs, img.file_len) - offset
        if _fallocate(img.fd, _PUNCH_HOLE_KEEP_SIZE, offset, length) != 0:
            return  # not supported here: the clusters are free anyway


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.fallocate
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    func.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], func)


_PUNCH_HOLE_KEEP_SIZE = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
_fallocate = _load_fallocate() if sys.platform.startswith("linux") else None


def write_entries(img: CheckImage, writes: list[tuple[int, int]]) -> None:
    """Write 8-byte table entries ``(file offset, value)`` and sync.

    Each entry is written on its own: an aligned 8-byte write never tears, so at every instant
    each entry holds either its old or its new value.
    """
    for offset, value in writes:
        img.write(offset, struct.pack(">Q", value))
    if writes:
        img.sync()


def mark_clean(img: CheckImage) -> None:
    """Clear the dirty and corrupt bits (QEMU does so after a repair leaves no corruption)."""
    h = img.header
    if h.version < 3 or not h.incompatible_features & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT):
        return
    features = h.incompatible_features & ~(INCOMPAT_DIRTY | INCOMPAT_CORRUPT)
    img.sync()  # the repaired metadata must be durable before the header vouches for it
    img.write(INCOMPAT_FIELD_OFFSET, struct.pack(">Q", features))
    img.sync()
    img.header = replace(h, incompatible_features=features)


def drop_bitmaps_extension(img: CheckImage) -> None:
    """Remove an ignored bitmaps extension (autoclear bit clear) before its clusters are freed.

    QEMU drops it too when it opens such an image read-write; without it, nothing can point
    at the freed clusters any more. The header is re-encoded in place inside cluster 0.
    """
    h = img.header
    if h.extension(EXT_BITMAPS) is None:
        return
    old_len = h.header_length + sum(8 + (len(e.data) + 7) // 8 * 8 for e in h.extensions) + 8
    old_len = max(old_len, h.backing_file_offset + h.backing_file_size)
    new = h.with_extension(EXT_BITMAPS, None)
    raw = encode_header(new)
    img.write(0, raw + bytes(max(0, old_len - len(raw))))
    img.sync()
    img.header = decode_header(img.read(0, img.cluster_size))


def rebuild_refcount_structure(
    img: CheckImage,
    stored: StoredRefcounts,
    counts: npt.NDArray[np.signedinteger[Any]],
    *,
    avoid: Sequence[tuple[int, int]] = (),
) -> None:
    """Write fresh refcount blocks and table from ``counts`` and switch the header to them.

    ``counts`` holds the expected refcount of every host cluster (the old refcount structures
    included, so nothing new lands on them); ``avoid`` lists further (first, last) cluster
    ranges in use although not counted. Placement follows QEMU 7.2: each refcount block
    goes to the first unreferenced cluster at or after the start of the range it describes
    (never inside a range already written), the table to the first run of unreferenced
    clusters long enough; if the table itself needs a refcount block the table grows and is
    placed again, until it stops growing.
    """
    plan = _RebuildPlan(img, counts)
    # Never write over anything the current refcount structure points at, even where the
    # checker found it broken: until the header switches, it is the image's refcount truth.
    cs = img.cluster_size
    plan.avoid(img.header.refcount_table_offset, img.reftable_entries * 8)
    for entry in stored.reftable[stored.reftable != 0].tolist():
        plan.avoid(int(entry) & REFT_OFFSET_MASK, cs)
    for first, last in avoid:  # metadata the count missed (tables running past EOF)
        plan.avoid(first * cs, (last - first + 1) * cs)
    grown = plan.write_refblocks(0, plan.n)
    assert grown  # starting from an empty reftable, the first pass always creates it
    while True:
        clusters = len(plan.reftable) * 8 // img.cluster_size
        start, _ = plan.alloc(clusters, 0)
        if not plan.write_refblocks(start, start + clusters):
            break
    table = np.array(plan.reftable, dtype=np.uint64)
    img.write(start << img.cluster_bits, encode_table(table))
    img.sync()  # blocks and table durable before the header points at them
    img.write(REFTABLE_FIELDS_OFFSET, struct.pack(">QI", start << img.cluster_bits, clusters))
    img.sync()
    img.header = replace(
        img.header,
        refcount_table_offset=start << img.cluster_bits,
        refcount_table_clusters=clusters,
    )
    stored.reload()


class _RebuildPlan:
    """The in-memory refcount array a rebuild allocates from and writes out slice by slice."""

    def __init__(self, img: CheckImage, counts: npt.NDArray[np.signedinteger[Any]]) -> None:
        self.img = img
        self.per = 1 << img.rb_bits
        self.table = counts.astype(np.int64)  # a copy: allocations mark it
        self.n = len(self.table)  # clusters in use by the plan; beyond: free
        self.reftable: list[int] = []
        self.blocked = np.zeros(len(self.table), dtype=bool)  # not to be allocated

    def avoid(self, offset: int, length: int) -> None:
        """Keep the clusters of ``[offset, offset + length)`` out of the allocations."""
        if length <= 0:
            return
        first = offset >> self.img.cluster_bits
        last = (offset + length - 1) >> self.img.cluster_bits
        if first < len(self.table):
            self.blocked[first : min(last + 1, len(self.table))] = True

    def _ensure(self, size: int) -> None:
        if size > len(self.table):
            size = -(-size // self.per) * self.per
            grow = size - len(self.table)
            self.table = np.concatenate([self.table, np.zeros(grow, dtype=np.int64)])
            self.blocked = np.concatenate([self.blocked, np.zeros(grow, dtype=bool)])

    def alloc(self, count: int, first_free: int) -> tuple[int, int]:
        """Allocate ``count`` contiguous free clusters at or after ``first_free``.

        Returns the first cluster and the updated ``first_free`` (the first free cluster seen).
        Clusters past ``n`` are free, so a run that reaches ``n`` extends into them.
        """
        window = slice(first_free, self.n)
        zeros = np.flatnonzero((self.table[window] == 0) & ~self.blocked[window]) + first_free
        pos = max(self.n, first_free)
        if zeros.size:
            first_free = int(zeros[0])
            breaks = np.flatnonzero(np.diff(zeros) != 1)
            starts = np.r_[zeros[0], zeros[breaks + 1]]
            ends = np.r_[zeros[breaks], zeros[-1]] + 1
            long_enough = np.flatnonzero(ends - starts >= count)
            if long_enough.size:
                pos = int(starts[long_enough[0]])
            elif int(ends[-1]) == self.n:
                pos = int(starts[-1])
        self._ensure(pos + count)
        self.n = max(self.n, pos + count)
        self.table[pos : pos + count] = 1
        return pos, first_free

    def write_refblocks(self, first: int, end: int) -> bool:
        """Write every refcount block describing a used cluster in ``[first, end)``.

        Allocates the blocks that do not exist yet (extending ``end`` if one lands past it:
        that block must be written too). Returns whether the reftable had to grow.
        """
        grown = False
        first_free = 0
        cluster = first
        while cluster < end:
            block_start = cluster // self.per * self.per
            stop = min(end, block_start + self.per, self.n)
            used = np.flatnonzero(self.table[cluster:stop])
            if not used.size:
                cluster = block_start + self.per
                continue
            index = block_start // self.per
            if index < len(self.reftable) and self.reftable[index]:
                offset = self.reftable[index]
            else:
                first_free = max(first_free, block_start)
                pos, first_free = self.alloc(1, first_free)
                end = max(end, pos + 1)
                if index >= len(self.reftable):
                    per_cluster = self.img.cluster_size // 8
                    entries = -(-(index + 1) // per_cluster) * per_cluster
                    self.reftable.extend([0] * (entries - len(self.reftable)))
                    grown = True
                offset = pos << self.img.cluster_bits
                self.reftable[index] = offset
            self._ensure(block_start + self.per)
            values = self.table[block_start : block_start + self.per].astype(np.uint64)
            self.img.write(offset, encode_refblock(values, self.img.header.refcount_order))
            cluster = block_start + self.per
        return grown


class OverlapGuard:
    """QEMU's metadata overlap check: may a repair write ``[offset, offset + length)``?

    Built from the image's metadata at the start of a pass. A write is widened to whole
    clusters and refused if it touches metadata of a kind it does not own (a refcount block
    write may touch refcount blocks, an L2 write active L2 tables, ...). The kinds are tried
    in QEMU's order, which decides the name reported.
    """

    ORDER = ("qcow2_header", "active L1 table", "refcount table", "snapshot table",
             "inactive L1 table", "active L2 table", "refcount block", "bitmap directory")

    def __init__(
        self,
        img: CheckImage,
        reftable: npt.NDArray[np.uint64],
        snapshots: list[Snapshot],
        snapshots_size: int,
    ) -> None:
        h = img.header
        self.cluster_size = img.cluster_size
        l1 = img.read_table(h.l1_table_offset, h.l1_size)
        l2 = l1 & np.uint64(L1_OFFSET_MASK)
        blocks = reftable & np.uint64(REFT_OFFSET_MASK)
        dirs = [(img.bitmaps.directory_offset, img.bitmaps.directory_size)] if img.bitmaps else []
        cs = img.cluster_size
        self.regions = {
            "active L1 table": _regions([(h.l1_table_offset, h.l1_size * 8)]),
            "refcount table": _regions([(h.refcount_table_offset, img.reftable_entries * 8)]),
            "snapshot table": _regions([(h.snapshots_offset, snapshots_size)]),
            "inactive L1 table": _regions([(s.l1_table_offset, s.l1_size * 8) for s in snapshots]),
            "active L2 table": _regions([(int(o), cs) for o in l2[l2 != 0].tolist()]),
            "refcount block": _regions([(int(o), cs) for o in blocks[blocks != 0].tolist()]),
            "bitmap directory": _regions(dirs),
        }

    def overlap(self, offset: int, length: int, ignore: frozenset[str] = frozenset()) -> str | None:
        """The kind of metadata the write would overwrite, or ``None`` if it is safe."""
        if length <= 0:
            return None
        if "qcow2_header" not in ignore and offset < self.cluster_size:
            return "qcow2_header"
        cs = self.cluster_size
        start = offset // cs * cs
        end = -(-(offset + length) // cs) * cs
        for name in self.ORDER[1:]:
            if name in ignore:
                continue
            starts, ends = self.regions[name]
            if bool(((starts < end) & (ends > start)).any()):
                return name
        return None


def _regions(spans: list[tuple[int, int]]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Start and end arrays of the non-empty spans (spans beyond 2^62 cannot be written)."""
    kept = [(o, o + n) for o, n in spans if n > 0 and o < 1 << 62]
    return (np.array([a for a, _ in kept], dtype=np.int64),
            np.array([b for _, b in kept], dtype=np.int64))
