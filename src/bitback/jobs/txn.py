"""Completion groups: jobs that succeed together or fail together.

A :class:`JobTxn` holds the jobs of one ``transaction`` with ``completion-mode: grouped``;
every other job is alone in a group of one, so a single job and a group end through the same
code, QEMU's ``job_completed_txn_success`` / ``job_completed_txn_abort`` (``job.c``).

Members are kept newest first (QEMU inserts at the list head), and every step that walks the
group walks it in that order. Success, once every member's ``run()`` has returned::

    each member, as it returns:   waiting
    the last one to return:       every member pending  (BLOCK_JOB_PENDING if not auto-finalize)
    finalize (auto, or job-finalize on any member):
        prepare every member      (the first failure aborts the group, see below)
        then per member:          commit -> clean -> BLOCK_JOB_COMPLETED -> concluded -> null*

Failure (``run()`` or ``prepare()`` failed) or cancel of any member::

    the failed member:            aborting
    every other member:           cancelled (its run() is woken to return early)
    then per member, in order:    wait for its run() to return (-> aborting),
                                  abort -> clean -> BLOCK_JOB_COMPLETED with "error" (the
                                  failed one) or BLOCK_JOB_CANCELLED (cancelled ones, even one
                                  whose work had finished) -> concluded -> null*

``*`` ``null`` at once with auto-dismiss, else on ``job-dismiss``. A member that never started
emits no BLOCK_JOB_* event: only aborting, concluded, null. The event, ``concluded`` and
``null`` of one job are emitted back to back, so the job leaves ``query-block-jobs`` together
with its completion event.

QEMU runs a group's completion in one main-loop step; bitback's hooks are coroutines, so the
group refuses to start a second completion while one runs: a cancel that arrives while the
group prepares is folded into that run (the group aborts instead of committing), one that
arrives while it commits is too late and ignored, and a finalize during either is a no-op.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from bitback.jobs.status import JobStatus

if TYPE_CHECKING:
    from bitback.jobs.job import Job

__all__ = ["JobTxn"]

log = logging.getLogger(__name__)


class JobTxn:
    """A completion group. Add jobs while they are ``created``; the framework does the rest.

    ``aborting``, ``finalizing`` and ``committing`` tell which completion runs, if any.
    """

    def __init__(self) -> None:
        self._jobs: list[Job] = []  # newest first
        self.aborting = False
        self.finalizing = False
        self.committing = False

    @property
    def jobs(self) -> tuple[Job, ...]:
        """The members still in the group, newest first."""
        return tuple(self._jobs)

    def add(self, job: Job) -> None:
        """Make ``job`` a member. A job that was given no group sits alone in one made at its
        creation; it may move here as long as it has not started."""
        if job.txn is self:
            return
        old = job.txn
        if old is not None:
            if job.started or old.jobs != (job,):
                raise ValueError(f"job {job.id} cannot change its completion group")
            old.remove(job)
        job.txn = self
        self._jobs.insert(0, job)

    def remove(self, job: Job) -> None:
        if job in self._jobs:
            self._jobs.remove(job)
        if job.txn is self:
            job.txn = None

    # -- entry points (all synchronous; the long parts run as background work) ----------------
    def job_completed(self, job: Job) -> None:
        """``job``'s run() has returned (or it was cancelled before it started)."""
        job._update_rc()
        if job.ret:
            self._abort(job)
        else:
            self._success(job)

    def cancel_completed(self, job: Job) -> None:
        """``job``, whose run() had already returned, was cancelled."""
        if not self.finalizing:  # while finalizing, the running finalize notices the cancel
            self._abort(job)

    def finalize(self, job: Job) -> None:
        """Prepare then commit every member (auto-finalize, or ``job-finalize`` on ``job``)."""
        if self.finalizing or self.aborting:
            return
        self.finalizing = True
        job.registry.spawn(self._finalize_all())

    def _success(self, job: Job) -> None:
        job._transition(JobStatus.WAITING)
        if not all(other.is_completed for other in self._jobs):
            return
        for member in self._jobs:
            member._transition(JobStatus.PENDING)
            if not member.auto_finalize:
                member.registry.emit(
                    "BLOCK_JOB_PENDING", {"type": member.job_type, "id": member.id}
                )
        if all(member.auto_finalize for member in self._jobs):
            self.finalize(job)

    def _abort(self, job: Job) -> None:
        if self.aborting or self.finalizing:
            return
        self._cancel_others(job)
        job.registry.spawn(self._abort_all())

    def _cancel_others(self, job: Job) -> None:
        """``job`` failed first: mark the group aborting and every other member cancelled."""
        self.aborting = True
        for other in self._jobs:
            if other is not job:
                other._cancel_async()

    # -- the completion work -------------------------------------------------------------------
    async def _finalize_all(self) -> None:
        failed: Job | None = None
        for member in list(self._jobs):
            if member.ret == 0:
                await _run_hook(member, member.prepare, may_fail=True)
                member._update_rc()
            if member.ret:
                failed = member
                break
        if failed is None:  # a cancel that arrived while the group prepared
            failed = next((member for member in self._jobs if member.is_cancelled), None)
            if failed is not None:
                failed._update_rc()
        if failed is not None:
            self.finalizing = False
            self._cancel_others(failed)
            await self._abort_all()
            return
        self.committing = True
        while self._jobs:
            await self._finalize_one(self._jobs[0])

    async def _abort_all(self) -> None:
        while self._jobs:
            member = self._jobs[0]
            if not member.is_completed:
                if member.started:
                    member._enter()
                    await member._run_done.wait()
                else:
                    member._update_rc()
            await self._finalize_one(member)

    async def _finalize_one(self, job: Job) -> None:
        job._update_rc()  # a late failure or cancel still takes the abort path
        if job.ret:
            await _run_hook(job, job.abort)
        else:
            await _run_hook(job, job.commit)
        await _run_hook(job, job.clean)
        if job.started:
            if job.is_cancelled:
                job.registry.emit("BLOCK_JOB_CANCELLED", job.cancelled_event_data())
            else:
                job.registry.emit("BLOCK_JOB_COMPLETED", job.completed_event_data())
        self.remove(job)
        job._conclude()


async def _run_hook(
    job: Job, hook: Callable[[], Coroutine[Any, Any, None]], *, may_fail: bool = False
) -> None:
    """Run an outcome hook. A failing ``prepare`` fails its job; any other hook's exception
    is logged and swallowed: the job must still reach ``null``."""
    try:
        await hook()
    except Exception as exc:
        if may_fail:
            job._record_failure(exc, hook.__name__)
        else:
            log.error("job %s: %s raised", job.id, hook.__name__, exc_info=exc)
