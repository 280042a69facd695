"""The backup job: a point-in-time copy of a node into a target, full or by bitmap.

A backup is set up in one step on the I/O thread (:mod:`bitback.jobs.backup_setup`), which
fixes its point in time: the copy set is taken, the sync bitmap is frozen (a successor
records the writes from then on) and copy-before-write starts guarding the source. The job
then copies the set chunk by chunk; a guest write that reaches an uncopied cluster first
copies the old data (:class:`~bitback.copy.CopyBeforeWrite`), so the target ends up equal to
the source at the start, whatever the guest does meanwhile.

Outcome (spec 5.5), decided in :meth:`BackupJob.commit` / :meth:`BackupJob.abort`, before the
completion event:

==============  ==================================  =======================================
bitmap-mode     success                             failure or cancel
==============  ==================================  =======================================
on-success      bitmap := writes during the job     bitmap := old bits | writes during job
always          bitmap := writes during the job     writes during job | clusters not copied
never           bitmap := old bits | writes         bitmap := old bits | writes
==============  ==================================  =======================================

Then :meth:`BackupJob.clean` stops copy-before-write, releases the source and flushes and
closes a target the job opened, so real ``qemu-img`` can use it as soon as the event is out.
"""

from __future__ import annotations

import errno as _errno
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from bitback.bitmaps import DirtyBitmap
from bitback.block.iothread import IOThread
from bitback.block.node import BlockNode
from bitback.copy import BlockCopyState, CopyBeforeWrite, CopyError
from bitback.errors import BitbackError
from bitback.jobs.job import Job, JobFailed

if TYPE_CHECKING:
    from collections.abc import Callable

    from bitback.jobs.registry import JobRegistry
    from bitback.jobs.txn import JobTxn

__all__ = ["BACKUP_SOURCE_USE", "BackupJob", "BackupSetup"]

BACKUP_SOURCE_USE = "block device is in use by block job: backup"

log = logging.getLogger("bitbackd")


@dataclass
class BackupSetup:
    """Everything a backup holds from its point in time on (made on the I/O thread)."""

    source: BlockNode
    target: BlockNode
    sync: str  # full, top, none or bitmap (incremental arrives as bitmap + on-success)
    bcs: BlockCopyState
    cbw: CopyBeforeWrite
    bitmap: DirtyBitmap | None = None
    bitmap_mode: str | None = None
    successor: DirtyBitmap | None = None
    on_source_error: str = "report"
    on_target_error: str = "report"
    # Called on the I/O thread at clean-up: flush and close a target the job opened.
    release_target: Callable[[], list[BitbackError]] | None = None
    released: bool = field(default=False, init=False)

    def finish_bitmap(self, *, success: bool) -> None:
        """End the bitmap's freeze as the table in the module docstring says."""
        bitmap, successor = self.bitmap, self.successor
        if bitmap is None or successor is None:
            return
        mode = self.bitmap_mode
        if (success or mode == "always") and mode != "never":
            bitmap.abdicate()
            # QEMU gives the bitmap's name to the successor, which stays where it was added
            # at the job's start (the head of the list then), so the bitmap moves there: after
            # a successful incremental it is listed before older bitmaps (QEMU 7.2 measured;
            # found by tests/interop/test_random_programs.py).
            bitmaps = self.source.bitmaps
            if successor in bitmaps and bitmap in bitmaps:
                bitmaps.remove(bitmap)
                bitmaps[bitmaps.index(successor)] = bitmap
        else:
            bitmap.reclaim()
        if not success and mode == "always":
            bitmap.bits.merge(self.bcs.copy_bitmap)  # what never reached the target
        if successor in self.source.bitmaps:
            self.source.bitmaps.remove(successor)
        self.successor = None

    def release(self) -> list[BitbackError]:
        """Stop guarding the source, give it back, and let go of the target."""
        if self.released:
            return []
        self.released = True
        self.cbw.detach()
        if BACKUP_SOURCE_USE in self.source.users:
            self.source.users.remove(BACKUP_SOURCE_USE)
        return self.release_target() if self.release_target is not None else []


class BackupJob(Job):
    """QMP job type ``backup``; one :class:`BackupSetup` copied in chunks."""

    job_type = "backup"

    def __init__(
        self,
        job_id: str,
        registry: JobRegistry,
        setup: BackupSetup,
        io: IOThread,
        *,
        txn: JobTxn | None = None,
        auto_finalize: bool = True,
        auto_dismiss: bool = True,
        speed: int = 0,
    ) -> None:
        self.setup = setup
        self.io = io
        super().__init__(
            job_id,
            registry,
            txn=txn,
            auto_finalize=auto_finalize,
            auto_dismiss=auto_dismiss,
            speed=speed,
        )
        setup.bcs.on_progress = self.progress_update
        setup.bcs.on_skip = self._skipped
        self.progress_set_remaining(setup.bcs.remaining())

    def _skipped(self, nbytes: int) -> None:
        """``sync=top``: clusters the top image does not hold leave the total, as in QEMU
        7.2 (they are not counted as copied)."""
        self.progress_total -= nbytes

    def _chunk(self) -> int:
        """Bytes per step: large for throughput, one cluster per step under a low speed so
        the limit is honoured from the first step on."""
        bcs = self.setup.bcs
        if not self.speed:
            return bcs.max_chunk
        want = max(bcs.cluster_size, self.speed // 10 // bcs.cluster_size * bcs.cluster_size)
        return min(bcs.max_chunk, want)

    def _copy_next(self, offset: int) -> tuple[int, int] | None:
        """On the I/O thread: copy the next dirty run at or after ``offset``; returns where
        to continue and how many bytes were handled, or None when the set is done."""
        bcs = self.setup.bcs
        chunk = bcs.next_chunk(offset, self._chunk())
        if chunk is None:
            return None
        start, length = chunk
        return start + length, bcs.copy(start, length)

    async def run(self) -> None:
        setup = self.setup
        if setup.sync == "none":
            # Only copy-before-write copies; the job lasts until it is cancelled.
            await self.idle_until_cancelled()
            return
        offset = 0
        while not self.is_cancelled:
            await self.pause_point()
            if self.is_cancelled:
                return
            try:
                step = await self.io.run(self._copy_next, offset)
            except CopyError as exc:
                read = exc.error_is_read
                policy = setup.on_source_error if read else setup.on_target_error
                errno = exc.errno or _errno.EIO
                action = await self.error_action(policy, "read" if read else "write", errno)
                if action == "report":
                    raise JobFailed(os.strerror(errno), errno=errno) from exc
                continue  # ignore / stop (resumed): retry the same clusters
            if step is None:
                return
            offset, done = step
            await self.rate_limit(done)

    async def prepare(self) -> None:
        # The target must be on stable storage before the bitmap forgets what it held: a
        # flush failure fails the job, and abort() then gives the bits back.
        try:
            await self.io.run(self.setup.target.flush)
        except BitbackError as exc:
            errno = exc.errno or _errno.EIO
            raise JobFailed(f"flushing the backup target: {exc}", errno=errno) from exc

    async def commit(self) -> None:
        await self.io.run(self.setup.finish_bitmap, success=True)

    async def abort(self) -> None:
        await self.io.run(self.setup.finish_bitmap, success=False)

    async def clean(self) -> None:
        for exc in await self.io.run(self.setup.release):
            # Already flushed in prepare() on success; a failure here loses nothing that
            # the job reported as done, but it must not go unnoticed.
            log.warning("job %s: releasing the target: %s", self.id, exc)
