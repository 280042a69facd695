"""The qcow2 format driver: open, read, write, zero, discard, map, resize, flush.

Reads and writes work on *runs*: maximal ranges inside one L2 table whose clusters have the
same kind (and, for data, contiguous host offsets), found with numpy over the table slice. A
1 MiB write into fresh space is one allocation, one ``pwrite`` and one slice assignment, not
sixteen Python iterations.

Write order (crash safety, see :mod:`.refcounts`): guest data goes to freshly allocated
clusters at once; refcounts, L2 tables and L1 entries stay in memory until a flush (or cache
pressure) writes them as refcounts -> barrier -> L2/L1 -> barrier -> dropped references.
After a crash every on-disk L2 entry points at a cluster whose refcount is on disk and whose
data was written before it; everything since the last flush may be lost, nothing flushed is.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import numpy.typing as npt

from bitback.block.driver import BlockDriver, Extent, fill_zero
from bitback.block.drivers.qcow2 import compress
from bitback.block.drivers.qcow2.bitmap_store import PersistentBitmaps
from bitback.block.drivers.qcow2.create import l1_entries_for
from bitback.block.drivers.qcow2.refcounts import RefcountTable
from bitback.block.drivers.qcow2.tables import L2Cache
from bitback.block.drivers.qcow2.validate import check_features, check_geometry
from bitback.errors import (
    ImageCorruptError,
    ImageFormatError,
    InvalidArgumentError,
    ReadOnlyError,
    UnsupportedFeatureError,
)
from bitback.formats.qcow2.entries import (
    COMPRESSED,
    COPIED,
    L2_OFFSET_MASK,
    ZERO,
    ClusterKind,
    U64Array,
    classify,
    compressed_extent,
)
from bitback.formats.qcow2.header import (
    AUTOCLEAR_BITMAPS,
    COMPAT_LAZY_REFCOUNTS,
    EXT_BACKING_FORMAT,
    EXT_BITMAPS,
    INCOMPAT_CORRUPT,
    Header,
    decode_header,
    encode_header,
)

__all__ = ["Qcow2Driver"]

_MAX_SNAPSHOTS = 65536
_NORMAL = np.uint8(ClusterKind.NORMAL)
_COMPRESSED_KIND = np.uint8(ClusterKind.COMPRESSED)


class Qcow2Driver(BlockDriver):
    """A qcow2 image over a protocol node (normally a :class:`FileDriver`)."""

    format_name = "qcow2"

    def __init__(self, file: BlockDriver, *, read_only: bool) -> None:
        super().__init__(file.filename, read_only=read_only)
        self.file = file
        head = file.pread(0, 104)
        if head[:4] != b"QFI\xfb":
            raise ImageFormatError("Image is not in qcow2 format", path=file.filename)
        version = int.from_bytes(head[4:8], "big")
        if file.length() < (72 if version == 2 else 104):
            raise ImageFormatError("qcow2 header too short", path=file.filename)
        cluster_bits = int.from_bytes(head[20:24], "big")
        first = file.pread(0, min(file.length(), 1 << min(max(cluster_bits, 9), 21)))
        header = decode_header(first)
        self.corrupt = bool(header.incompatible_features & INCOMPAT_CORRUPT)
        check_features(header, writable=not read_only)
        if self.corrupt:
            self.read_only = True  # an image marked corrupt may be read, never written
        self.header = header
        # Bytes of cluster 0 in use now, so a shorter rewrite can clear what it leaves.
        self._header_len = max(
            len(encode_header(header)), header.backing_file_offset + header.backing_file_size
        )
        self.cb = header.cluster_bits
        self.cs = header.cluster_size
        self.l2_bits = self.cb - 3
        check_geometry(header)
        self.tables = L2Cache(
            file, cluster_bits=self.cb, l1_offset=header.l1_table_offset, l1_size=header.l1_size
        )
        self.refcounts = RefcountTable(
            file,
            cluster_bits=self.cb,
            refcount_order=header.refcount_order,
            table_offset=header.refcount_table_offset,
            table_clusters=header.refcount_table_clusters,
            on_table_moved=self._table_moved,
            barrier=self._barrier,
        )
        self._zero_flag = header.version >= 3
        self._modified = False
        # Persistent bitmaps: read-write opens mark them in use before anything changes.
        self.persistent = PersistentBitmaps(self)
        if not self.read_only:
            self.persistent.mark_in_use()
        self._unflushed = False
        self._meta: U64Array | None = None  # sorted metadata clusters, for overlap checks
        self._compress_next = 0
        self._decompressed: tuple[int, bytes] | None = None
        # Per L2 table: (table, generation, run starts, run stops, run kinds); see _read_runs.
        self._run_index: dict[
            int, tuple[U64Array, int, npt.NDArray[np.int64], npt.NDArray[np.int64],
                       npt.NDArray[np.int64]]
        ] = {}

    # -- geometry -------------------------------------------------------------------------
    def length(self) -> int:
        return self.header.size

    @property
    def cluster_size(self) -> int:
        return self.cs

    def _split(self, offset: int) -> tuple[int, int]:
        """Guest offset -> (L1 index, cluster index inside that L2 table)."""
        cluster = offset >> self.cb
        return cluster >> self.l2_bits, cluster & ((1 << self.l2_bits) - 1)

    def _slices(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """Split a request into (l1_index, first_cluster_in_l2, cluster_count) per table."""
        out = []
        pos, end = offset, offset + length
        span = 1 << (self.cb + self.l2_bits)
        while pos < end:
            l1_index, first = self._split(pos)
            stop = min(end, (l1_index + 1) * span)
            last = ((stop - 1) >> self.cb) & ((1 << self.l2_bits) - 1)
            out.append((l1_index, first, last - first + 1))
            pos = stop
        return out

    def _runs(self, entries: U64Array, *, for_write: bool) -> list[tuple[int, int, int]]:
        """Maximal runs (start, stop, kind) of one table slice.

        For reads, runs group clusters of one :class:`ClusterKind` (data runs also need
        contiguous host offsets; compressed clusters stand alone). For writes, kind is 1 for
        clusters that can be overwritten in place (data with COPIED) and 0 otherwise.
        """
        n = len(entries)
        if not entries.any():  # all unallocated: the common case of fresh space
            return [(0, n, 0 if for_write else int(ClusterKind.UNALLOCATED))]
        kinds = classify(entries, zero_flag=self._zero_flag)
        host = entries & np.uint64(L2_OFFSET_MASK)
        if for_write:
            kinds = ((kinds == _NORMAL) & ((entries & np.uint64(COPIED)) != 0)).astype(np.uint8)
            data = kinds == 1
        else:
            data = kinds == _NORMAL
        brk = np.ones(n, dtype=bool)
        if n > 1:
            brk[1:] = (kinds[1:] != kinds[:-1]) | (
                data[1:] & (host[1:] != host[:-1] + np.uint64(self.cs))
            )
            if not for_write:
                brk[1:] |= kinds[1:] == _COMPRESSED_KIND
        starts = np.flatnonzero(brk)
        stops = np.append(starts[1:], n)
        return [(int(a), int(b), int(kinds[a])) for a, b in zip(starts, stops, strict=True)]

    def _run_index_of(
        self, l1_index: int, table: U64Array
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """(starts, stops, kinds) of every read run of ``table`` (see :meth:`_runs`), built
        once per table version.

        Reads and block status then cost a binary search plus one step per run, instead of
        numpy calls over the slice on every request (which dominated on fragmented images).
        """
        gen = self.tables.generation.get(l1_index, 0)
        cached = self._run_index.get(l1_index)
        if cached is None or cached[0] is not table or cached[1] != gen:
            runs = np.array(self._runs(table, for_write=False), dtype=np.int64).reshape(-1, 3)
            if len(self._run_index) > self.tables.max_tables:
                self._run_index.clear()
            cached = (table, gen, runs[:, 0].copy(), runs[:, 1].copy(), runs[:, 2].copy())
            self._run_index[l1_index] = cached
        return cached[2], cached[3], cached[4]

    def _read_runs(
        self, l1_index: int, table: U64Array, first: int, count: int
    ) -> list[tuple[int, int, int]]:
        """Read runs of ``table[first:first+count]``, relative to ``first``."""
        starts, stops, kinds = self._run_index_of(l1_index, table)
        end = first + count
        i0 = int(np.searchsorted(stops, first, side="right"))
        i1 = int(np.searchsorted(starts, end, side="left"))
        return [
            (max(a, first) - first, min(b, end) - first, k)
            for a, b, k in zip(
                starts[i0:i1].tolist(), stops[i0:i1].tolist(), kinds[i0:i1].tolist(),
                strict=True,
            )
        ]

    def _check_host(self, host: int, length: int) -> None:
        """Refuse in-place writes to data clusters that are unaligned, past EOF or on top
        of metadata (a damaged or hostile image): QEMU's overlap check, in short."""
        if host % self.cs or host < self.cs:
            raise ImageCorruptError(f"Data cluster offset 0x{host:x} is invalid")
        if host + length > self.file.length():
            raise ImageCorruptError(f"Data cluster at 0x{host:x} is past the end of the file")
        self._check_overlap(host, length)

    def _check_overlap(self, host: int, length: int) -> None:
        """Refuse to write data over metadata (for freshly allocated clusters this can only
        happen when the image's refcounts wrongly say 0 for a table)."""
        if self._meta is None:
            self._meta = np.unique(
                np.concatenate([
                    np.zeros(1, dtype=np.uint64),
                    self.tables.metadata_clusters(),
                    self.refcounts.metadata_clusters(),
                ])
            )
        first = host >> self.cb
        last = (host + length - 1) >> self.cb
        i = int(np.searchsorted(self._meta, np.uint64(first)))
        if i < len(self._meta) and int(self._meta[i]) <= last:
            raise ImageCorruptError(
                f"Cluster at 0x{host:x} overlaps image metadata (refcounts are wrong); "
                "refusing to write"
            )

    # -- reading ----------------------------------------------------------------------------
    def pread(self, offset: int, length: int) -> bytes:
        self.check_request(offset, length)
        out = bytearray(length)
        self._read_into(offset, memoryview(out))
        return bytes(out)

    def _read_into(self, offset: int, out: memoryview) -> None:
        end = offset + len(out)
        for l1_index, first, count in self._slices(offset, len(out)):
            base = ((l1_index << self.l2_bits) + first) << self.cb
            table = self.tables.get(l1_index)
            if table is None:
                lo, hi = max(offset, base), min(end, base + (count << self.cb))
                self._read_unallocated(lo, out[lo - offset : hi - offset])
                continue
            entries = table[first : first + count]
            for a, b, kind in self._read_runs(l1_index, table, first, count):
                lo = max(offset, base + (a << self.cb))
                hi = min(end, base + (b << self.cb))
                dest = out[lo - offset : hi - offset]
                if kind == ClusterKind.NORMAL:
                    host = int(entries[a]) & L2_OFFSET_MASK
                    # After the L2 lookup, right before the data read: an error rule that
                    # this event arms must hit the data, not the metadata (spec 7.2).
                    self.child_event("read_aio")
                    self.file.readinto(host + lo - base - (a << self.cb), dest)
                elif kind == ClusterKind.UNALLOCATED:
                    self._read_unallocated(lo, dest)
                elif kind == ClusterKind.COMPRESSED:
                    cluster = self._decompress(int(entries[a]))
                    start = lo - base - (a << self.cb)
                    dest[:] = cluster[start : start + hi - lo]
                else:  # zero clusters
                    fill_zero(dest)

    def _read_unallocated(self, offset: int, dest: memoryview) -> None:
        """Unallocated ranges read from the backing node, zeros past its end."""
        backing = self.backing
        n = 0 if backing is None else max(0, min(len(dest), backing.length() - offset))
        if n:
            assert backing is not None
            self.child_event("read_backing_aio")
            backing.readinto(offset, dest[:n])
        if n < len(dest):
            fill_zero(dest[n:])

    def readinto(self, offset: int, dest: memoryview) -> None:
        self.check_request(offset, len(dest))
        self._read_into(offset, dest)

    def _decompress(self, entry: int) -> bytes:
        host, size = compressed_extent(entry, self.cb)
        if self._decompressed is not None and self._decompressed[0] == entry:
            return self._decompressed[1]
        self.child_event("read_compressed")
        raw = self.file.pread(host, size)
        data = compress.decompress(raw, self.cs, self.header.compression_type)
        self._decompressed = (entry, data)
        return data

    # -- writing ----------------------------------------------------------------------------
    def _begin_modify(self) -> None:
        """Checks and header fix-ups due before the first change of this open."""
        if self.read_only:
            why = "image is marked corrupt" if self.corrupt else "image is read-only"
            raise ReadOnlyError(f"{self.filename}: {why}", path=self.filename)
        self._unflushed = True
        if self._modified:
            return
        self._modified = True
        # Autoclear features we do not maintain must be cleared before the image changes,
        # so readers know their extra data is stale. The bitmaps bit stays when the bitmaps
        # were loaded (they are kept up to date); a stale extension goes with its bit.
        keep = AUTOCLEAR_BITMAPS if self.persistent.ext is not None else 0
        if self.header.autoclear_features & ~keep or self.persistent.stale_extension:
            header = replace(self.header, autoclear_features=self.header.autoclear_features
                             & keep)
            if self.persistent.stale_extension:
                header = header.with_extension(EXT_BITMAPS, None)
                self.persistent.stale_extension = False
            self._write_header(header)
            self._barrier()

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        self.check_request(offset, len(view), write=True)
        if not len(view):
            return
        self.persistent.mark(offset, len(view))
        self._begin_modify()
        end = offset + len(view)
        for l1_index, first, count in self._slices(offset, len(view)):
            base = ((l1_index << self.l2_bits) + first) << self.cb
            table = self._writable_table(l1_index)
            entries = table[first : first + count]
            for a, b, inplace in self._runs(entries, for_write=True):
                lo = max(offset, base + (a << self.cb))
                hi = min(end, base + (b << self.cb))
                chunk = view[lo - offset : hi - offset]
                if inplace:
                    cluster_host = int(entries[a]) & L2_OFFSET_MASK
                    self._check_host(cluster_host, (b - a) << self.cb)
                    self.child_event("write_aio")
                    self.file.pwrite(cluster_host + lo - base - (a << self.cb), chunk)
                else:
                    self._allocating_write(l1_index, first + a, first + b, lo, chunk)
        self._maybe_evict()

    def _allocating_write(
        self, l1_index: int, c0: int, c1: int, lo: int, chunk: memoryview
    ) -> None:
        """Write ``chunk`` at guest ``lo`` into new clusters c0..c1 of table ``l1_index``.

        Parts of the first and last cluster outside the request are filled with what the
        guest reads there now (backing data, zeros, old or decompressed data): copy on write.
        """
        base = (l1_index << self.l2_bits) << self.cb
        g0, g1 = base + (c0 << self.cb), base + (c1 << self.cb)
        head, tail = lo - g0, g1 - (lo + len(chunk))
        buf: memoryview | bytearray
        if head or tail:
            buf = bytearray(g1 - g0)
            if head:
                self._read_current(g0, memoryview(buf)[:head])
            if tail:
                self._read_current(lo + len(chunk), memoryview(buf)[g1 - g0 - tail :])
            buf[head : head + len(chunk)] = chunk
        else:
            buf = chunk
        table = self.tables.get(l1_index)
        assert table is not None
        old = table[c0:c1].copy()
        pos = 0
        total = c1 - c0
        self.child_event("cluster_alloc")
        try:
            while pos < total:
                start, n = self.refcounts.allocate(total - pos)
                try:
                    self._check_overlap(start << self.cb, n << self.cb)
                    piece = memoryview(buf)[pos << self.cb : (pos + n) << self.cb]
                    self.child_event("write_aio")
                    self.file.pwrite(start << self.cb, piece)
                except BaseException:
                    # Nothing points at these clusters yet: give them back, or they leak.
                    self.refcounts.free_later(start, n)
                    raise
                hosts = np.arange(start, start + n, dtype=np.uint64) << np.uint64(self.cb)
                table[c0 + pos : c0 + pos + n] = hosts | np.uint64(COPIED)
                pos += n
        finally:
            # Pieces written before a failure stay mapped (their data is on disk).
            if pos:
                self.tables.mark_dirty(l1_index)
                self._release(old[:pos])

    def _read_current(self, offset: int, dest: memoryview) -> None:
        """What the guest reads at ``offset`` now, clipped to the virtual size."""
        n = max(0, min(len(dest), self.header.size - offset))
        if n:
            self._read_into(offset, dest[:n])
        if n < len(dest):
            fill_zero(dest[n:])

    def _release(self, old: U64Array) -> None:
        """Drop the references that replaced L2 entries held (once tables are written)."""
        if not old.any():
            return
        kinds = classify(old, zero_flag=self._zero_flag)
        hosts = old & np.uint64(L2_OFFSET_MASK)
        owned = ((kinds == _NORMAL) | (kinds == np.uint8(ClusterKind.ZERO_ALLOC))) & (hosts != 0)
        clusters = hosts[owned] >> np.uint64(self.cb)
        if clusters.size:
            brk = np.flatnonzero(np.diff(clusters.astype(np.int64)) != 1) + 1
            for run in np.split(clusters, brk):
                self.refcounts.free_later(int(run[0]), len(run))
        for entry in old[kinds == _COMPRESSED_KIND]:
            host, size = compressed_extent(int(entry), self.cb)
            first, last = host >> self.cb, (host + size - 1) >> self.cb
            self.refcounts.free_later(first, last - first + 1)

    def _writable_table(self, l1_index: int) -> U64Array:
        """The L2 table for ``l1_index``, allocated or copied so that it may be changed."""
        table = self.tables.get(l1_index)
        entry = int(self.tables.l1[l1_index])
        if table is not None and entry & COPIED:
            return table
        start = self.refcounts.allocate_contiguous(1)
        if table is None:
            new = np.zeros(self.tables.l2_entries, dtype=np.uint64)
        else:  # shared with a snapshot: copy the table, then drop our reference to the old
            new = table.copy()
            self.refcounts.free_later(self.tables.l2_offset(l1_index) >> self.cb, 1)
            self.tables.forget(l1_index)
        self.tables.install(l1_index, new, start << self.cb)
        self._meta = None
        return new

    def pwrite_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        self.check_request(offset, length, write=True)
        if not length:
            return
        self.persistent.mark(offset, length)
        self._write_zeroes(offset, length, may_unmap)

    def _write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        if not self._zero_flag:  # version 2 has no zero flag: write zeroes
            super().pwrite_zeroes(offset, length, may_unmap=may_unmap)
            return
        self._begin_modify()
        end = offset + length
        a, b = self._whole_clusters(offset, end)
        if offset < a:
            self._zero_partial(offset, min(a, end))
        if a < b:
            self._set_entries(a, b, "zero-unmap" if may_unmap else "zero")
        if max(a, b) < end:
            self._zero_partial(max(a, b), end)
        self._maybe_evict()

    def _whole_clusters(self, offset: int, end: int) -> tuple[int, int]:
        """The whole clusters inside [offset, end); the image's partial last cluster counts
        as whole when the range reaches the end of the image."""
        a = -(-offset // self.cs) * self.cs
        b = end // self.cs * self.cs
        if end == self.header.size:
            b = -(-end // self.cs) * self.cs
        return a, b

    def _zero_partial(self, lo: int, hi: int) -> None:
        """Zero part of a cluster: as a zero cluster if the rest already reads as zeros."""
        c0 = lo // self.cs * self.cs
        c1 = min(c0 + self.cs, self.header.size)
        l1_index, index = self._split(c0)
        table = self.tables.get(l1_index)
        kind = (
            ClusterKind.UNALLOCATED
            if table is None
            else ClusterKind(int(classify(table[index : index + 1])[0]))
        )
        if kind in (ClusterKind.UNALLOCATED, ClusterKind.ZERO_PLAIN, ClusterKind.ZERO_ALLOC) and (
            self._reads_zero(c0, lo - c0) and self._reads_zero(hi, c1 - hi)
        ):
            self._set_entries(c0, c0 + self.cs, "zero")
        else:
            self.pwrite(lo, bytes(hi - lo))

    def _reads_zero(self, offset: int, length: int) -> bool:
        """Whether the guest is known to read zeros there, from block status alone."""
        pos, end = offset, offset + length
        while pos < end:
            node: BlockDriver | None = self
            step = end - pos
            zero = True
            while node is not None and pos < node.length():
                ext = node.block_status(pos, end - pos)
                step = min(step, ext.length)
                if ext.allocated:
                    zero = ext.zero
                    break
                node = node.backing
            if not zero:
                return False
            pos += max(step, 1)
        return True

    def discard(self, offset: int, length: int) -> None:
        """Deallocate whole clusters; partial clusters are ignored (as QEMU does)."""
        self.check_request(offset, length, write=True)
        self.persistent.mark(offset, length)
        if self.header.version < 3 and self.backing is not None:
            return  # no zero flag: discarding would expose the backing file
        a, b = self._whole_clusters(offset, offset + length)
        if a >= b:
            return
        self._begin_modify()
        self._set_entries(a, b, "discard")
        self._maybe_evict()

    def _set_entries(self, lo: int, hi: int, mode: str) -> None:
        """Rewrite the entries of whole clusters [lo, hi) without writing data.

        Modes (as QEMU's qcow2 driver treats its entries):

        ``zero``        ZERO flag set, host clusters kept (preallocated zero clusters);
        ``zero-unmap``  ZERO flag set, host clusters released;
        ``discard``     zero clusters (v3) or unallocated (v2), host clusters released;
                        unallocated clusters without a backing file are left alone;
        ``full``        unallocated, host clusters released (shrinking).

        Compressed clusters are always released: a zero flag cannot be combined with them.
        """
        for l1_index, first, count in self._slices(lo, hi - lo):
            if self.tables.get(l1_index) is None and (
                mode == "full" or (mode == "discard" and self.backing is None)
            ):
                continue
            table = self._writable_table(l1_index)
            entries = table[first : first + count]
            old = entries.copy()
            kinds = classify(old, zero_flag=self._zero_flag)
            hosts = old & np.uint64(L2_OFFSET_MASK)
            release = kinds == _COMPRESSED_KIND
            if mode != "zero":
                release |= hosts != 0
            if mode == "full":
                new = np.zeros_like(old)
            elif mode == "discard":
                alone = (kinds == np.uint8(ClusterKind.UNALLOCATED)) & (self.backing is None)
                new = np.where(alone, old, np.uint64(ZERO if self._zero_flag else 0))
            else:
                new = np.where(release, np.uint64(0), old) | np.uint64(ZERO)
            if np.array_equal(new, old):
                continue
            entries[:] = new
            self.tables.mark_dirty(l1_index)
            self._release(np.where(release, old, np.uint64(0)))

    # -- compressed writes ----------------------------------------------------------------
    def write_compressed(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Store one whole cluster compressed (qemu-img convert -c).

        ``offset`` must be cluster aligned and ``data`` one cluster long (or reach the end
        of the image). Data that does not shrink is written uncompressed.
        """
        view = memoryview(data).cast("B")
        if offset % self.cs or (len(view) != self.cs and offset + len(view) != self.header.size):
            raise InvalidArgumentError("compressed writes must cover one whole cluster")
        self.check_request(offset, len(view), write=True)
        self.persistent.mark(offset, len(view))
        payload = bytes(view) + bytes(self.cs - len(view))
        packed = compress.compress(payload, self.header.compression_type)
        if len(packed) >= self.cs - 512:
            self.pwrite(offset, view)
            return
        self._begin_modify()
        l1_index, index = self._split(offset)
        table = self._writable_table(l1_index)
        old = table[index : index + 1].copy()
        host = self._alloc_bytes(len(packed))
        self.child_event("write_compressed")
        self.file.pwrite(host, packed)
        x = 62 - (self.cb - 8)
        sectors = ((host + len(packed) - 1) >> 9) - (host >> 9)
        table[index] = np.uint64(host | (sectors << x) | COMPRESSED)
        self.tables.mark_dirty(l1_index)
        self._release(old)
        self._maybe_evict()

    def _alloc_bytes(self, size: int) -> int:
        """Byte range for compressed data, packed into shared clusters like QEMU does."""
        cur = self._compress_next
        cluster = cur >> self.cb
        if (
            cur % self.cs
            and cur % self.cs + size <= self.cs
            and self.refcounts.get(cluster) < self.refcounts.max_refcount
        ):
            self.refcounts.update(cluster, 1, 1)
            host = cur
        else:
            host = self.refcounts.allocate_contiguous(1) << self.cb
        self._compress_next = host + size
        return host

    # -- block status -----------------------------------------------------------------------
    def block_status(self, offset: int, length: int) -> Extent:
        length = min(length, self.header.size - offset)
        if length <= 0:
            return Extent(offset, max(length, 0), allocated=False, zero=True, data=False)
        l1_index, first = self._split(offset)
        table = self.tables.get(l1_index)
        span_end = ((l1_index + 1) << self.l2_bits) << self.cb
        if table is None:
            # Merge consecutive unallocated L2 tables in one step.
            l1 = self.tables.l1
            nz = np.flatnonzero(l1[l1_index:] != 0)
            stop = l1_index + (int(nz[0]) if nz.size else len(l1) - l1_index)
            n = min(length, (stop << (self.l2_bits + self.cb)) - offset)
            return Extent(offset, n, allocated=False, zero=self.backing is None, data=False)
        count = min(span_end, offset + length) - (offset & ~(self.cs - 1))
        count = -(-count // self.cs)
        _, stops, kinds = self._run_index_of(l1_index, table)
        i = int(np.searchsorted(stops, first, side="right"))
        b, kind = min(int(stops[i]), first + count) - first, int(kinds[i])
        n = min(offset + length, span_end, ((offset >> self.cb) + b) << self.cb) - offset
        entry = int(table[first])
        host = entry & L2_OFFSET_MASK
        delta = offset & (self.cs - 1)
        if kind == ClusterKind.UNALLOCATED:
            return Extent(offset, n, allocated=False, zero=self.backing is None, data=False)
        if kind == ClusterKind.NORMAL:
            return Extent(
                offset, n, allocated=True, zero=False, data=True, host_offset=host + delta
            )
        if kind == ClusterKind.COMPRESSED:
            return Extent(offset, n, allocated=True, zero=False, data=True, compressed=True)
        return Extent(
            offset, n, allocated=True, zero=True, data=False,
            host_offset=(host + delta) if kind == ClusterKind.ZERO_ALLOC else None,
        )

    # -- resize -----------------------------------------------------------------------------
    def truncate(self, size: int, *, shrink: bool = False) -> None:
        if self.read_only:
            self._begin_modify()
        if size < 0:
            raise InvalidArgumentError("Image size must be a non-negative number")
        if size % 512:
            raise InvalidArgumentError("The new size must be a multiple of 512")
        old = self.header.size
        if size == old:
            return
        if self.header.version < 3 and self.header.nb_snapshots:
            raise UnsupportedFeatureError("Can't resize a v2 image which has snapshots")
        self.persistent.check_resize()
        backing = self.backing
        if (
            size > -(-old // self.cs) * self.cs
            and not self._zero_flag
            and backing is not None
            and backing.length() > old
        ):
            # The new clusters must hide the backing file, and v2 has no zero flag.
            raise UnsupportedFeatureError(
                "Failed to zero out new clusters: Operation not supported"
            )
        self._begin_modify()
        self.flush_metadata()
        if size > old:
            need = l1_entries_for(size, self.cb)
            if need > len(self.tables.l1):
                self._grow_l1(need)
            self._write_header(replace(self.header, size=size))
            self._barrier()
            if backing is not None and backing.length() > old:
                # Hiding the backing file is not a guest write: bitmaps stay clean there.
                self._write_zeroes(old, size - old, False)
        else:
            cut = -(-size // self.cs) * self.cs
            if cut < old:
                self._set_entries(cut, -(-old // self.cs) * self.cs, "full")
                self._drop_l2_tables(l1_entries_for(size, self.cb))
            self.flush_metadata()
            self._write_header(replace(self.header, size=size))
        self.persistent.resized(size)
        self.flush()

    def _drop_l2_tables(self, keep: int) -> None:
        """Free L2 tables past the first ``keep`` L1 entries (after a shrink)."""
        l1 = self.tables.l1
        for index in np.flatnonzero(l1[keep:] != 0) + keep:
            offset = self.tables.l2_offset(int(index))
            self.tables.forget(int(index))
            l1[index] = 0
            self.tables.dirty_l1.add(int(index))
            self.refcounts.free_later(offset >> self.cb, 1)
        self._meta = None

    def _grow_l1(self, entries: int) -> None:
        """Move the L1 table to a larger place; durable before the header points at it."""
        if entries * 8 > 32 << 20:
            raise InvalidArgumentError("The image size is too large for this cluster size")
        clusters = -(-entries * 8 // self.cs)
        start = self.refcounts.allocate_contiguous(clusters)
        old_offset, old_clusters = self.tables.l1_offset, self.tables.l1_clusters
        grown = np.zeros(entries, dtype=np.uint64)
        grown[: len(self.tables.l1)] = self.tables.l1
        self.refcounts.write_dirty()
        self.file.pwrite(start << self.cb, grown.astype(">u8").tobytes())
        self._barrier()
        self.tables.l1 = grown
        self.tables.l1_offset = start << self.cb
        self._write_header(
            replace(self.header, l1_size=entries, l1_table_offset=start << self.cb)
        )
        self._barrier()
        if old_clusters:
            self.refcounts.free_later(old_offset >> self.cb, old_clusters)
        self._meta = None

    # -- metadata write-back ------------------------------------------------------------------
    def _barrier(self) -> None:
        self.file.flush()

    def _table_moved(self, offset: int, clusters: int) -> None:
        self._write_header(
            replace(self.header, refcount_table_offset=offset, refcount_table_clusters=clusters)
        )
        self._barrier()
        self._meta = None

    def _write_header(self, header: Header) -> None:
        raw = encode_header(header)
        self.file.pwrite(0, raw + bytes(max(0, self._header_len - len(raw))))
        self._header_len = len(raw)
        self.header = decode_header(raw + bytes(self.cs - len(raw)))

    def flush_metadata(self) -> None:
        """Write cached metadata in the crash-safe order (no final fsync)."""
        if self.refcounts.dirty:
            self.refcounts.write_dirty()
            if self.tables.dirty:
                self._barrier()
        if self.tables.dirty:
            self.tables.write_dirty()
            if self.refcounts.frees_pending:
                self._barrier()
        self.refcounts.apply_frees()

    def _maybe_evict(self) -> None:
        if self.tables.over_budget():
            self.flush_metadata()
            self.tables.evict_clean()

    def flush(self) -> None:
        if self.read_only or not self._unflushed:
            return
        self.flush_metadata()
        self.file.flush()
        self._unflushed = False

    # -- header edits -----------------------------------------------------------------------
    def set_backing(self, name: str | None, fmt: str | None) -> None:
        """Rewrite only the backing file name and format in the header (rebase -u)."""
        self._begin_modify()
        header = replace(self.header, backing_file=name or None)
        header = header.with_extension(
            EXT_BACKING_FORMAT, fmt.encode() if (name and fmt) else None
        )
        encode_header(header)  # raises if it does not fit before anything is written
        self.flush_metadata()
        self._write_header(header)
        self.flush()

    def make_empty(self) -> None:
        """Deallocate every cluster, so all of the image falls through to its backing."""
        self._begin_modify()
        for index in np.flatnonzero(self.tables.l1 != 0):
            table = self._writable_table(int(index))
            old = table.copy()
            table[:] = 0
            self.tables.mark_dirty(int(index))
            self._release(old)
            self._maybe_evict()
        self.flush()

    # -- description ----------------------------------------------------------------------
    def allocated_file_size(self) -> int | None:
        return self.file.allocated_file_size()

    def format_specific_info(self) -> dict[str, object]:
        """``ImageInfoSpecificQCow2``: keys inserted in QAPI order (printers re-sort them).

        ``bitmaps`` lists the bitmap directory as it is on disk (an image opened read-write
        shows its bitmaps ``in-use``), only when the image has bitmaps; each entry is
        ``Qcow2BitmapInfo`` (name, granularity, flags).
        """
        h = self.header
        if h.version < 3:
            return {"compat": "0.10", "compression-type": "zlib", "refcount-bits": 16}
        info: dict[str, object] = {
            "compat": "1.1",
            "compression-type": "zstd" if h.compression_type else "zlib",
            "lazy-refcounts": bool(h.compatible_features & COMPAT_LAZY_REFCOUNTS),
            "refcount-bits": h.refcount_bits,
        }
        if self.persistent.entries:
            info["bitmaps"] = [
                {"name": e.name, "granularity": e.granularity, "flags": e.info_flags()}
                for e in self.persistent.entries
            ]
        info["corrupt"] = self.corrupt
        info["extended-l2"] = False
        return info

    def close(self) -> None:
        if self.closed:
            return
        try:
            if not self.read_only:
                try:
                    self.persistent.store()
                finally:
                    self.flush()
        finally:
            super().close()
            self.file.close()

