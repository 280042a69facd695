"""Block-copy: copy the dirty job clusters of a source node to a target node.

This is the engine under a backup job (and, later, fleecing and NBD exports), QEMU's
``block/block-copy.c``. It knows no jobs, speeds or error policies: it owns a **copy bitmap**
(one bit per job cluster, set = still to copy) and copies dirty clusters when asked, either in
order (:meth:`BlockCopyState.copy`, driven by the job) or ahead of a guest write
(:meth:`BlockCopyState.before_write`, driven by :mod:`bitback.copy.before_write`).

Geometry. The copy bitmap's granule is the **job cluster** (:func:`job_cluster_size`), which
need not be the granularity of the dirty bitmap the copy set comes from; the set is rounded
*outwards*, so a job cluster touching any dirty granule is copied whole (spec 6.2)::

    bytes            0      32k     64k     96k    128k    160k    192k    224k    256k
    dirty bitmap     |  g0   |  g1   |  g2   |  g3   |  g4   |  g5   |  g6   |  g7   |
    (32k granules)           ^ dirty                         ^ dirty
    copy bitmap      |     c0 (64k)  |      c1       |      c2       |      c3       |
    (64k clusters)   ^ set (holds g1)                ^ set (holds g5)

    with 128k clusters: one bit per 128k, so c0 covers g0..g3 and c1 covers g4..g7;
    with a 128k-granule bitmap and 64k clusters each dirty granule sets two clusters.

The last job cluster may reach past the end of the disk (a 1 MiB + 512 disk has 17 clusters
of 64 KiB, the last holding 512 bytes): every read and write is clipped to the source's
length, but byte counts (:meth:`~BlockCopyState.remaining`, progress) are whole clusters, as
QEMU 7.2 counts them (its ``len`` is the copy bitmap's dirty count): a full backup of that
disk reports ``len`` 1114112, not 1049088 (measured; found by the random differential test,
``tests/interop/test_random_programs.py``).

What reaches the target (spec 6.4): data read through the source node (the guest's view,
backing chain included); ranges the source reports as zero, and clusters whose data reads as
all zero, become ``pwrite_zeroes(may_unmap=True)``, which a qcow2 target stores as zero
clusters - never as unallocated clusters that would expose the target's backing file. With
``skip_unallocated`` (``sync=top``) clusters that the source's top node does not allocate are
dropped from the set without being copied.

Large runs cost a constant number of Python steps: a run of dirty clusters (at most
:data:`MAX_BUFFER` bytes) is split only where block status changes kind (data / zero /
unallocated), each data part is one ``readinto`` into a reusable buffer and, normally, one
``pwrite``; the per-cluster zero test runs in numpy.

Threading: everything here runs on the daemon's single I/O thread; a copy and a guest write
never overlap, so there is no locking and no in-flight request list (QEMU needs both because
its copies yield while a guest write may arrive). Bits are cleared only after the target
write of their cluster succeeded; an error leaves the failed clusters dirty for a retry.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from enum import Enum
from itertools import pairwise
from typing import Literal

import numpy as np
import numpy.typing as npt

from bitback.bitmaps import GranuleBits
from bitback.block.chain import status_above
from bitback.block.driver import BlockDriver
from bitback.block.node import BlockNode
from bitback.errors import BitbackError, InvalidArgumentError, IOFailedError

__all__ = [
    "DEFAULT_CLUSTER_SIZE",
    "MAX_BUFFER",
    "BlockCopyState",
    "ClusterSizeError",
    "CopyError",
    "job_cluster_size",
]

log = logging.getLogger(__name__)

DEFAULT_CLUSTER_SIZE = 64 * 1024  # QEMU's BLOCK_COPY_CLUSTER_SIZE_DEFAULT
MAX_BUFFER = 8 * 1024 * 1024  # the largest single read/write; QEMU uses 1 MiB chunks

Operation = Literal["read", "write"]


class CopyError(IOFailedError):
    """A copy request failed: ``operation`` says which side (``"read"``: the source,
    ``"write"``: the target; QEMU's ``error_is_read``), ``errno`` why, ``offset`` where (the
    guest offset of the failed request)."""

    def __init__(
        self,
        message: str,
        *,
        operation: Operation,
        errno: int,
        offset: int,
        path: str | None = None,
    ) -> None:
        super().__init__(message, errno=errno, path=path)
        self.operation: Operation = operation
        self.offset = offset

    @property
    def error_is_read(self) -> bool:
        return self.operation == "read"


class ClusterSizeError(InvalidArgumentError):
    """The target's cluster size could not be determined and it has no backing file.

    ``hint`` is the line QEMU appends on the command line and in HMP (not in QMP).
    """

    def __init__(self, message: str, *, errno: int, hint: str) -> None:
        super().__init__(message)
        self.errno = errno
        self.hint = hint


def _skip_filters(node: BlockDriver) -> BlockDriver:
    """Descend through filter nodes (blkdebug: an ``image`` child), ``bdrv_skip_filters``."""
    while True:
        child = next((c for role, c in node.children() if role == "image"), None)
        if child is None:
            return node
        node = child


def job_cluster_size(target: BlockNode, *, warn: Callable[[str], None] | None = None) -> int:
    """The job cluster size for copying to ``target`` (QEMU 7.2
    ``block_copy_calculate_cluster_size``, spec 6.2).

    * the target reports a cluster size (qcow2): ``max(64 KiB, cluster size)``;
    * it reports none (raw, file, null: QEMU's ``-ENOTSUP``): 64 KiB; without a backing file
      QEMU warns that the backup may be unusable, and so do we (through ``warn``, default:
      this module's logger);
    * asking for it fails: 64 KiB with a backing file, else :class:`ClusterSizeError`.

    Filters above the target are looked through, as ``bdrv_get_info`` does.
    """
    node = _skip_filters(target)
    does_cow = node.backing is not None  # bdrv_backing_chain_next(target) != NULL
    try:
        cluster_size = node.cluster_size
    except BitbackError as exc:
        if does_cow:
            return DEFAULT_CLUSTER_SIZE
        raise ClusterSizeError(
            "Couldn't determine the cluster size of the target image, which has no backing "
            f"file: {exc}",
            errno=exc.errno,
            hint="Aborting, since this may create an unusable destination image",
        ) from exc
    if cluster_size is None:
        if not does_cow:
            (warn or log.warning)(
                "The target block device doesn't provide information about the block size "
                "and it doesn't have a backing file. The default block size of "
                f"{DEFAULT_CLUSTER_SIZE} bytes is used. If the actual block size of the "
                "target exceeds this default, the backup may be unusable"
            )
        return DEFAULT_CLUSTER_SIZE
    return max(DEFAULT_CLUSTER_SIZE, cluster_size)


def _bools(bits: GranuleBits) -> npt.NDArray[np.bool_]:
    raw = np.frombuffer(bits.to_bytes(), dtype=np.uint8)
    return np.unpackbits(raw, bitorder="little")[: len(bits)].astype(np.bool_)


class _Kind(Enum):
    DATA = "data"
    ZERO = "zero"
    SKIP = "skip"  # not allocated in the source's top node, with skip_unallocated


class BlockCopyState:
    """The copy set of one copy (a backup job) from ``source`` to ``target``, and the copier.

    ``copy_bitmap`` has one bit per ``cluster_size`` bytes of the source (bit set: still to
    copy); it starts empty - fill it with :meth:`set_all` or :meth:`set_from`. ``on_progress``
    is called with the number of bytes of every batch of clusters finished (copied, written
    as zeros or skipped), in whole clusters, so that the sum over a whole copy
    equals :meth:`remaining` at its start. Given ``on_skip``, clusters skipped by
    ``skip_unallocated`` are reported there instead: QEMU 7.2 does not count them as work
    done but lowers the job's remaining work (``len`` shrinks, ``offset`` does not grow).

    The source's length is taken once: the set does not follow a resize (a job blocks resizes
    of its nodes, as QEMU's op blockers do).
    """

    def __init__(
        self,
        source: BlockNode,
        target: BlockNode,
        *,
        cluster_size: int,
        skip_unallocated: bool = False,
        compress: bool = False,
        on_progress: Callable[[int], None] | None = None,
        on_skip: Callable[[int], None] | None = None,
    ) -> None:
        if cluster_size < 512 or cluster_size & (cluster_size - 1):
            raise InvalidArgumentError(
                f"Job cluster size {cluster_size} is not a power of two of at least 512"
            )
        self.source = source
        self.target = target
        self.cluster_size = cluster_size
        self.size = source.length()
        self.copy_bitmap = GranuleBits(self.size, cluster_size)
        self.skip_unallocated = skip_unallocated
        self.compress = compress
        self.on_progress = on_progress
        self.on_skip = on_skip
        self.max_chunk = max(cluster_size, MAX_BUFFER // cluster_size * cluster_size)
        self._buf: bytearray | None = None  # one read buffer, allocated on first use
        # Set by the owner when the target is a new image without a backing file: it reads
        # as zeros everywhere, and every cluster is written at most once (by the copy), so
        # zero runs need no write at all.
        self.target_zeroed = False

    # -- the copy set ---------------------------------------------------------------------
    def set_all(self) -> None:
        """Every cluster of the disk (``sync=full``, ``top`` and ``none``)."""
        self.copy_bitmap.set_all()

    def set_from(self, bits: GranuleBits) -> None:
        """OR in a dirty bitmap, rounded outwards to whole job clusters.

        Seed numbers (spec 6.2): 64 KiB granules {0, 256..259, 511, 512} set the 128 KiB
        clusters at 0, 16M, 16M+128k, 32M-128k and 32M (655360 bytes); 11 granules of 32 KiB
        set 7 clusters of 64 KiB; 5 granules of 128 KiB set 10 clusters of 64 KiB. Runs in
        numpy, however fragmented the bitmap.
        """
        cs, g = self.cluster_size, bits.granularity
        if g == cs:
            self.copy_bitmap.merge(bits)
            return
        # Only dirty bytes inside both disks count (granules past our end are dropped).
        dirty = _bools(bits)[: -(-min(bits.size, self.size) // g)]
        clusters = len(self.copy_bitmap)
        if g < cs:  # several granules per cluster: a cluster is set if any of them is
            per = cs // g
            padded = np.zeros(clusters * per, dtype=np.bool_)
            n = min(len(dirty), len(padded))
            padded[:n] = dirty[:n]
            mask = np.asarray(padded.reshape(clusters, per).any(axis=1), dtype=np.bool_)
        else:  # several clusters per granule: each cluster takes its granule's bit
            per = g // cs
            index = np.arange(clusters) // per
            mask = np.zeros(clusters, dtype=np.bool_)
            inside = index < len(dirty)
            mask[inside] = dirty[index[inside]]
            # A cluster past the end of a shorter dirty bitmap touches none of its bytes.
            mask[-(-min(bits.size, self.size) // cs) :] = False
        packed = np.packbits(mask, bitorder="little").tobytes()
        self.copy_bitmap.merge(GranuleBits.from_bytes(packed, self.size, cs))

    def remaining(self) -> int:
        """Bytes still to copy: dirty clusters times the cluster size, a partial last cluster
        counted whole (the job's ``len`` at its start, as QEMU 7.2 reports it)."""
        return self.copy_bitmap.count()

    def next_chunk(self, offset: int, max_bytes: int) -> tuple[int, int] | None:
        """The next run of dirty clusters at or after ``offset`` (rounded down to a cluster),
        as ``(start, length)``: at most ``max_bytes`` (rounded down to whole clusters, at
        least one) and clipped to the end of the disk; ``None`` when nothing is left."""
        cs = self.cluster_size
        limit = max(cs, max_bytes // cs * cs)
        return self.copy_bitmap.next_dirty_area(max(0, offset) // cs * cs, None, limit)

    # -- copying --------------------------------------------------------------------------
    def copy(self, offset: int, length: int) -> int:
        """Copy every still-dirty cluster intersecting ``[offset, offset+length)``.

        Normally the range is cluster aligned (its end may be the end of the disk); a range
        that is not covers the clusters it touches. Returns the bytes handled (copied, zeroed
        or skipped, in whole clusters). Raises :class:`CopyError` on the first failure;
        clusters finished before it stay finished (and counted), the failed ones stay dirty.
        """
        if offset < 0 or length < 0:
            raise InvalidArgumentError(f"Invalid copy range: offset {offset}, length {length}")
        cs = self.cluster_size
        pos = offset // cs * cs
        end = min(offset + length, self.size)
        done = 0
        while pos < end:
            area = self.copy_bitmap.next_dirty_area(pos, end, self.max_chunk)
            if area is None:
                break
            lo = area[0]
            # A range ending inside a cluster ends the run there: take the whole cluster.
            hi = min(-(-(lo + area[1]) // cs) * cs, self.size)
            done += self._copy_run(lo, hi)
            pos = hi
        return done

    def before_write(self, offset: int, length: int) -> int:
        """Copy-before-write: save every still-dirty cluster that a guest write (or
        write-zeroes, or discard) of ``[offset, offset+length)`` is about to change, so the
        target gets the data as it was when the copy set was defined (spec 6.1). Clusters
        outside the set, or already copied, cost nothing. Returns the bytes saved."""
        if length <= 0 or offset >= self.size:
            return 0
        return self.copy(offset, length)

    def _copy_run(self, lo: int, hi: int) -> int:
        """Copy ``[lo, hi)``: dirty clusters, ``lo`` aligned, ``hi`` aligned or the disk end,
        at most ``max_chunk`` long. Consecutive data parts are read and written together."""
        pos, pending, done = lo, lo, 0
        while pos < hi:
            kind, n = self._classify(pos, hi)
            if kind is not _Kind.DATA:
                if pending < pos:
                    done += self._copy_data(pending, pos)
                if kind is _Kind.ZERO:
                    self._write_zeroes(pos, pos + n)
                done += self._finish(pos, pos + n, skipped=kind is _Kind.SKIP)
                pending = pos + n
            pos += n
        if pending < hi:
            done += self._copy_data(pending, hi)
        return done

    def _status(self, pos: int, hi: int) -> tuple[_Kind, int]:
        base = self.source.backing if self.skip_unallocated else None
        st = status_above(self.source, base, pos, hi - pos)
        if self.skip_unallocated and not st.allocated:
            return _Kind.SKIP, st.length
        return (_Kind.ZERO if st.zero else _Kind.DATA), st.length

    def _classify(self, pos: int, hi: int) -> tuple[_Kind, int]:
        """What ``[pos, pos+n)`` holds, for whole clusters (``hi`` may end the last one).

        Extents of one kind are merged; a kind that does not fill a whole cluster makes
        the cluster data, as does a block-status failure (QEMU's fallback: copy it).
        """
        cs = self.cluster_size
        try:
            kind, n = self._status(pos, hi)
            while pos + n < hi:
                more, m = self._status(pos + n, hi)
                if more is not kind:
                    break
                n += m
        except BitbackError:
            return _Kind.DATA, min(cs, hi - pos)
        if pos + n >= hi:
            return kind, hi - pos
        if n < cs:
            return _Kind.DATA, min(cs, hi - pos)
        return kind, n // cs * cs

    def _copy_data(self, lo: int, hi: int) -> int:
        """Read ``[lo, hi)`` from the source in one request and write it to the target, as
        data runs and (for clusters that read as zero) zero runs."""
        if self._buf is None:
            self._buf = bytearray(self.max_chunk)
        view = memoryview(self._buf)[: hi - lo]
        try:
            self.source.readinto(lo, view)
        except BitbackError as exc:
            raise CopyError(
                str(exc), operation="read", errno=exc.errno, offset=lo, path=exc.path
            ) from exc
        done = 0
        for a, b, nonzero in self._zero_runs(view):
            if nonzero:
                self._write_data(lo + a, view[a:b])
            else:
                self._write_zeroes(lo + a, lo + b)
            done += self._finish(lo + a, lo + b)
        return done

    def _zero_runs(self, view: memoryview) -> list[tuple[int, int, bool]]:
        """``view`` cut into runs of clusters that do / do not hold a non-zero byte."""
        cs, n = self.cluster_size, len(view)
        whole = n // cs
        flags = np.empty(whole + (n % cs > 0), dtype=np.bool_)
        if whole:
            words = np.frombuffer(view, dtype=np.uint64, count=whole * cs // 8)
            flags[:whole] = words.reshape(whole, cs // 8).any(axis=1)
        if n % cs:
            flags[whole] = np.frombuffer(view, dtype=np.uint8, offset=whole * cs).any()
        cuts = [0, *(np.flatnonzero(flags[1:] != flags[:-1]) + 1).tolist(), len(flags)]
        return [(a * cs, min(b * cs, n), bool(flags[a])) for a, b in pairwise(cuts)]

    def _write_data(self, offset: int, data: memoryview) -> None:
        if not self.compress:
            try:
                self.target.pwrite(offset, data)
            except BitbackError as exc:
                raise self._write_error(exc, offset) from exc
            return
        # One compressed write per target cluster (the job cluster is a multiple of it).
        step = self.target.cluster_size or self.cluster_size
        if self.cluster_size % step:
            step = self.cluster_size
        for a in range(0, len(data), step):
            try:
                self.target.write_compressed(offset + a, data[a : a + step])
            except BitbackError as exc:
                raise self._write_error(exc, offset + a) from exc

    def _write_zeroes(self, lo: int, hi: int) -> None:
        if self.target_zeroed:
            return  # a fresh target without backing already reads as zeros there
        try:
            self.target.pwrite_zeroes(lo, hi - lo, may_unmap=True)
        except BitbackError as exc:
            raise self._write_error(exc, lo) from exc

    @staticmethod
    def _write_error(exc: BitbackError, offset: int) -> CopyError:
        return CopyError(str(exc), operation="write", errno=exc.errno, offset=offset, path=exc.path)

    def _finish(self, lo: int, hi: int, *, skipped: bool = False) -> int:
        """Clusters ``[lo, hi)`` reached the target (or need not): clear and count them,
        whole (``hi`` may be the end of the disk, inside the last cluster)."""
        self.copy_bitmap.reset_range(lo, hi - lo)
        cs = self.cluster_size
        nbytes = -(-(hi - lo) // cs) * cs
        report = self.on_skip if skipped and self.on_skip is not None else self.on_progress
        if report is not None:
            report(nbytes)
        return nbytes
