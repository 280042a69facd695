"""The model a random program runs against: each node's bytes, size and dirty bitmaps, and
the backups running on it, written from the spec (sections 5 and 6), independently of
bitback.

The runner applies every step to the model *after* both backends ran it, with the outcome
they agreed on (a command that failed changes nothing; a job's end is its events). The
model then says

* what QEMU 7.2 must show for every bitmap (:meth:`Model.expect`): ``count``, granularity,
  ``recording``, ``busy`` and the ``x-debug-block-dirty-bitmap-sha256`` digest, newest first;
* the ``len`` a backup must report (:meth:`Model.job_len`), which also decides whether a slow
  backup can stay slow: QEMU's block-copy copies its first chunk (up to 1 MiB) before the
  rate limit applies, so a copy set of 1 MiB or less is done at once on QEMU but not on
  bitbackd (whose first step is one cluster) - a timing difference, not a behaviour;
* the bytes a full backup must hold (:attr:`MJob.snapshot`) and the disk at the end.

A bitmap's bits can be *unknown* to the model, in two ways:

* *timing*: QEMU 7.2 itself is not deterministic. A backup with ``bitmap-mode: always`` that
  fails or is cancelled gives its bitmap back the clusters it had not copied yet, and which
  clusters QEMU had copied depends on its parallel copy tasks. The runner then compares
  neither the bitmap's count and digest nor backups made from it.
* *unknown* only: the backends must agree, the model just cannot tell. A backup with
  ``bitmap-mode: always`` in a transaction that failed leaves its bitmap with the whole disk
  if its action had been prepared before the failing one (QEMU fills the copy bitmap from the
  sync bitmap only when the job starts), and the reply does not say which action failed.

Either lasts until the bitmap is cleared, removed or synced by a successful backup, and
spreads by merges. Likewise a disk is inexact after a write that failed (some of it may have
landed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from helpers.programs import Backup, BitmapCmd, Io, Merge, NodeSpec
from helpers.seedsetup import granule_sha256

__all__ = ["FIRST_CHUNK", "MBitmap", "MJob", "MNode", "Model", "job_cluster"]

KiB, MiB = 1 << 10, 1 << 20
DEFAULT_JOB_CLUSTER = 64 * KiB
FIRST_CHUNK = 1 * MiB  # QEMU 7.2's BLOCK_COPY_MAX_BUFFER: its first task is at most this


def job_cluster(target_cluster: int) -> int:
    """The backup's cluster size for a qcow2 target (spec 6.2)."""
    return max(DEFAULT_JOB_CLUSTER, target_cluster)


def default_granularity(cluster: int) -> int:
    """``bdrv_get_default_bitmap_granularity``: the cluster size within [4 KiB, 64 KiB]."""
    return min(64 * KiB, max(4 * KiB, cluster))


@dataclass
class MBitmap:
    name: str
    granularity: int
    enabled: bool
    dirty: set[int] = field(default_factory=set)
    known: bool = True  # the model knows the bits
    timing: bool = False  # QEMU's timing decided them (implies not known)
    job: str | None = None  # the backup that froze it (busy)
    successor: set[int] = field(default_factory=set)
    succ_enabled: bool = False

    def mark(self, first: int, last: int) -> None:
        """Bytes ``[first, last]`` were written (a frozen bitmap's successor records)."""
        g = self.granularity
        if self.job is not None:
            if self.succ_enabled:
                self.successor.update(range(first // g, last // g + 1))
        elif self.enabled:
            self.dirty.update(range(first // g, last // g + 1))


@dataclass
class Slot:
    """Where a frozen bitmap's successor sits: QEMU adds it at the head of the node's list,
    and a bitmap that abdicates to it takes that place."""

    job: str


@dataclass
class MNode:
    spec: NodeSpec
    size: int
    disk: bytearray | None  # None: inexact (a write failed part way)
    entries: list[MBitmap | Slot] = field(default_factory=list)
    job: str | None = None  # the backup reading this node
    order_known: bool = True  # False: compare the bitmaps as a set (see aborted_always)

    def bitmaps(self) -> list[MBitmap]:
        return [e for e in self.entries if isinstance(e, MBitmap)]

    def find(self, name: str) -> MBitmap | None:
        return next((b for b in self.bitmaps() if b.name == name), None)


@dataclass
class MJob:
    id: str
    node: str
    sync: str
    bitmap: str | None
    mode: str | None
    len: int | None  # None: unknown (unknown bitmap, sync=top)
    snapshot: bytes | None  # the disk at the start (full backups of an exact disk)
    timing: bool = False  # its copy set came from a bitmap QEMU's timing decided


def _clip(dirty: set[int], granularity: int, size: int) -> set[int]:
    return {i for i in dirty if i * granularity < size}


class Model:
    """The model of one program's two nodes (see the module docstring)."""

    def __init__(self, nodes: tuple[NodeSpec, ...]) -> None:
        self.nodes = {n.name: MNode(n, n.size, bytearray(n.size)) for n in nodes}
        self.jobs: dict[str, MJob] = {}

    # -- guest requests ---------------------------------------------------------------------
    def io(self, step: Io, output: str) -> None:
        """An HMP request and what qemu-io printed (both backends printed it)."""
        node = self.nodes[step.node]
        end = step.offset + step.length
        if end > node.size or step.length == 0:
            return  # refused by the backend's range check: nothing reaches the node
        done = output.startswith(("wrote ", "discard "))
        # A discard is dropped unless the node has discard=unmap; through the backup filter
        # of a drive too (QEMU 7.2 opens that filter without BDRV_O_UNMAP).
        if step.op == "discard" and (not node.spec.discard
                                     or (node.job and node.spec.kind == "drive")):
            return
        for bm in node.bitmaps():  # marked after the request, whatever its outcome
            bm.mark(step.offset, end - 1)
        if not done:
            node.disk = None
            return
        if node.disk is None:
            return
        if step.op == "write":
            node.disk[step.offset:end] = bytes([step.pattern]) * step.length
        elif step.op in ("zero", "zero-unmap"):
            node.disk[step.offset:end] = bytes(step.length)
        else:
            self._discard(node, step.offset, end)

    @staticmethod
    def _discard(node: MNode, start: int, end: int) -> None:
        """qcow2 drops the parts of a discard that are not whole clusters, except a partial
        last cluster discarded up to the end of the disk; discarded clusters read zero."""
        assert node.disk is not None
        cs = node.spec.cluster
        lo, hi = -(-start // cs) * cs, end // cs * cs
        if end == node.size and node.size % cs and node.size // cs * cs >= start:
            hi = node.size
        if lo < hi:
            node.disk[lo:hi] = bytes(hi - lo)

    def resize(self, name: str, size: int) -> None:
        node = self.nodes[name]
        if size > node.size and node.size % node.spec.cluster:
            # qcow2 keeps a partial last cluster whole: growing shows again what a shrink
            # had hidden in it (QEMU 7.2 and bitback alike); the model does not follow that
            node.disk = None
        node.size = size
        if node.disk is not None:
            del node.disk[size:]
            node.disk.extend(bytes(size - len(node.disk)))
        for bm in node.bitmaps():
            bm.dirty = _clip(bm.dirty, bm.granularity, size)

    # -- bitmap commands (each called only for a command that succeeded) ---------------------
    def bitmap_cmd(self, step: BitmapCmd) -> None:
        node = self.nodes[step.node]
        if step.cmd == "add":
            gran = step.granularity or default_granularity(node.spec.cluster)
            node.entries.insert(0, MBitmap(step.name, gran, not step.disabled))
            return
        bm = node.find(step.name)
        assert bm is not None, step
        if step.cmd == "remove":
            node.entries.remove(bm)
        elif step.cmd == "clear":
            bm.dirty, bm.known, bm.timing = set(), True, False
        else:
            bm.enabled = step.cmd == "enable"

    def merge(self, step: Merge) -> None:
        node = self.nodes[step.node]
        target = node.find(step.target)
        assert target is not None, step
        for src_node, name in step.sources:
            source = self.nodes[src_node or step.node].find(name)
            assert source is not None, step
            self._merge_bits(target, source.dirty, source.granularity, node.size)
            target.known = target.known and source.known
            target.timing = target.timing or source.timing

    def aborted_always(self, step: Backup) -> None:
        """A backup with bitmap-mode ``always`` was in a transaction that failed: its bitmap
        may now hold the whole disk (see the module docstring)."""
        node = self.nodes[step.node]
        bm = node.find(step.bitmap or "")
        if bm is not None and bm.job is None:
            bm.known = False
            # abdicated to its successor, which was listed first: the bitmap moves to the
            # head - if its action was prepared at all, which the reply does not say
            node.entries.remove(bm)
            node.entries.insert(0, bm)
            node.order_known = False

    @staticmethod
    def _merge_bits(target: MBitmap, dirty: set[int], granularity: int, size: int) -> None:
        tg = target.granularity
        for i in dirty:
            lo, hi = i * granularity, min((i + 1) * granularity, size)
            if lo < hi:
                target.dirty.update(range(lo // tg, (hi - 1) // tg + 1))

    # -- backups ----------------------------------------------------------------------------
    def job_len(self, step: Backup, target_cluster: int) -> int | None:
        """The ``len`` the backup will report, if the model knows it: its job clusters, a
        partial last one counted whole (QEMU 7.2 reports its copy bitmap's dirty count;
        spec 6.3 says "clipped", which 7.2 does not do)."""
        node = self.nodes[step.node]
        cs = job_cluster(target_cluster)
        if step.sync in ("full", "none"):
            return -(-node.size // cs) * cs
        if step.sync not in ("incremental", "bitmap") or step.bitmap is None:
            return None
        bm = node.find(step.bitmap)
        if bm is None or not bm.known:
            return None
        g = bm.granularity
        clusters: set[int] = set()
        for i in bm.dirty:
            lo, hi = i * g, min((i + 1) * g, node.size)
            if lo < hi:
                clusters.update(range(lo // cs, (hi - 1) // cs + 1))
        return len(clusters) * cs

    def start(self, step: Backup, target_cluster: int) -> MJob:
        """A backup was set up: its point in time is now."""
        node = self.nodes[step.node]
        full = step.sync == "full" and node.disk is not None
        job = MJob(step.job, step.node, step.sync, step.bitmap,
                   step.mode or ("on-success" if step.bitmap else None),
                   self.job_len(step, target_cluster), bytes(node.disk or b"") if full else None)
        if step.bitmap is not None:
            bm = node.find(step.bitmap)
            assert bm is not None, step
            job.timing = bm.timing and step.sync in ("incremental", "bitmap")
            bm.job, bm.successor, bm.succ_enabled = step.job, set(), bm.enabled
            node.entries.insert(0, Slot(step.job))
        node.job = step.job
        self.jobs[step.job] = job
        return job

    def end(self, job_id: str, outcome: str) -> MJob:
        """The backup ended: ``completed``, ``failed`` or ``cancelled`` (spec 5.5)."""
        job = self.jobs.pop(job_id)
        node = self.nodes[job.node]
        node.job = None
        if job.bitmap is None:
            return job
        bm = node.find(job.bitmap)
        assert bm is not None and bm.job == job_id, job
        slot = next(e for e in node.entries if isinstance(e, Slot) and e.job == job_id)
        success = outcome == "completed"
        if (success or job.mode == "always") and job.mode != "never":
            # abdicate: the successor, named after the bitmap, takes the successor's place
            new = MBitmap(bm.name, bm.granularity, bm.succ_enabled, set(bm.successor))
            node.entries[node.entries.index(slot)] = new
            node.entries.remove(bm)
            if not success:  # plus whatever had not been copied: QEMU's timing decides
                new.known, new.timing = False, True
        else:  # reclaim: the old bits and the writes made meanwhile
            bm.dirty |= bm.successor
            bm.enabled, bm.job, bm.successor = bm.succ_enabled, None, set()
            node.entries.remove(slot)
        return job

    # -- what QEMU must show ----------------------------------------------------------------
    def expect(self, name: str) -> list[dict[str, Any]]:
        """The node's named bitmaps, newest first, as :func:`observed` shapes them;
        ``count`` and ``sha256`` are None where the model does not know the bits."""
        node = self.nodes[name]
        out = []
        for bm in node.bitmaps():
            known = bm.known
            out.append({
                "name": bm.name, "granularity": bm.granularity,
                "count": len(bm.dirty) * bm.granularity if known else None,
                "recording": bm.enabled if bm.job is None else bm.succ_enabled,
                "busy": bm.job is not None, "persistent": False,
                "sha256": granule_sha256(node.size, bm.granularity, bm.dirty)
                if known and bm.dirty else None,  # the runner digests non-empty ones
            })
        return out

    def timing(self, name: str) -> set[str]:
        """The node's bitmaps whose bits QEMU's timing decided."""
        return {bm.name for bm in self.nodes[name].bitmaps() if bm.timing}
