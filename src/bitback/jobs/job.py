"""The generic job, and the rate limit it sleeps by.

A :class:`Job` is one background operation with a QMP identity: it moves through the statuses
of :mod:`bitback.jobs.status` (every change announced as ``JOB_STATUS_CHANGE``), honours the
user verbs (pause, resume, cancel, set-speed, finalize, dismiss, complete), and ends through
its completion group, :class:`~bitback.jobs.txn.JobTxn`. Subclasses supply the work
(:meth:`Job.run`) and the outcome hooks (:meth:`Job.prepare`, :meth:`Job.commit`,
:meth:`Job.abort`, :meth:`Job.clean`); the framework supplies everything else.

Threading: every method runs on the event loop thread, and every event goes out through the
registry's ``emit`` there. A job's own block-layer work belongs on the I/O thread
(``IOThread.run``), awaited from :meth:`Job.run`.

How a running job gives up the loop (QEMU's coroutine ``yield`` / ``enter``)::

    run() --await pause_point()----> parked (paused/standby) until resumed or cancelled
          --await rate_limit(n)----> asleep until its slice ends, kicked early by cancel,
                                     pause (it parks at once) or a faster speed

A job that is entered while parked takes its old status back *synchronously*, inside the
verb that entered it, so ``JOB_STATUS_CHANGE running`` precedes the reply to
``block-job-resume`` as in QEMU, where the job's coroutine runs inside the command.
"""

from __future__ import annotations

import asyncio
import errno as _errno
import logging
import os
import time
from collections.abc import Callable
from typing import Any, ClassVar

from bitback.errors import BitbackError, InvalidArgumentError
from bitback.jobs.registry import EmitFn, JobNotFoundError, JobRegistry
from bitback.jobs.status import (
    COMPLETED_STATUSES,
    READY_STATUSES,
    JobStatus,
    JobTransitionError,
    JobVerb,
    check_job_id,
    check_transition,
    check_verb,
)
from bitback.jobs.txn import JobTxn

__all__ = ["EmitFn", "Job", "JobFailed", "JobNotFoundError", "JobRegistry", "RateLimit"]

log = logging.getLogger(__name__)

_POLICIES = frozenset({"report", "ignore", "stop", "enospc", "auto"})


class JobFailed(BitbackError):
    """What :meth:`Job.run` or :meth:`Job.prepare` raises to fail its job.

    The job's ``ret`` becomes ``-errno``; ``message`` is the ``error`` text of
    ``BLOCK_JOB_COMPLETED`` and of the queries, by default ``strerror(errno)`` as QEMU
    reports it (``Input/output error``, ``No space left on device``).
    """

    def __init__(self, message: str | None = None, *, errno: int = _errno.EIO) -> None:
        super().__init__(message if message is not None else os.strerror(errno))
        self.errno = errno


class RateLimit:
    """A byte rate enforced over slices of :attr:`SLICE` seconds.

    Within a slice up to ``speed * SLICE`` bytes (at least one) pass freely; the request that
    exceeds the quota stretches the slice to as many slices as the bytes sent need, and the
    caller sleeps until its end. Example at 1 MiB/s: a slice allows 104857.6 bytes; sending
    512 KiB at once gives a delay of 5 slices (0.5 s) from the slice's start. ``speed=1``
    allows one byte per slice, so a 64 KiB chunk asks for a sleep of about 6554 s.
    """

    SLICE = 0.1

    def __init__(self) -> None:
        self._quota = 0.0  # bytes per slice; 0 means unlimited
        self._start = 0.0
        self._end = 0.0
        self._sent = 0

    def set_speed(self, speed: int) -> None:
        self._quota = max(speed * self.SLICE, 1.0) if speed else 0.0

    def delay(self, nbytes: int, now: float) -> float:
        """Account ``nbytes`` sent at ``now``; seconds to wait before sending more."""
        if not self._quota:
            return 0.0
        if self._end < now:  # the (possibly stretched) slice is over: start afresh
            self._start, self._end, self._sent = now, now + self.SLICE, 0
        self._sent += nbytes
        if self._sent < self._quota:
            return 0.0
        self._end = self._start + self._sent / self._quota * self.SLICE
        return self._end - now


class Job:
    """One job. Subclass it, implement :meth:`run`, create it, then :meth:`start` it.

    Public state (read it, do not assign it, except the progress counters):
    ``id``, ``status``, ``speed``, ``progress_current`` / ``progress_total`` (bytes, the
    ``offset`` / ``len`` of the BLOCK_JOB_* events), ``ret`` (0 or ``-errno``), ``error``
    (text or None), ``iostatus`` (``ok`` / ``failed`` / ``nospace``), ``user_paused``,
    ``busy`` (False while the job sleeps or is parked), ``txn`` (its group; None once
    finalized), ``auto_finalize``, ``auto_dismiss``.

    Creating a job registers it (the id must be well-formed and unused), emits
    ``JOB_STATUS_CHANGE created`` and puts it in ``txn`` or in a new group of its own. A
    subclass whose own set-up fails after that calls :meth:`early_fail` (``null``, gone)
    before raising; a created job that will never run is dropped with ``cancel(force=True)``.
    """

    job_type: ClassVar[str] = "backup"
    """The QMP ``type`` (``JobType``)."""

    can_complete: ClassVar[bool] = False
    """Whether the job has a ``job-complete`` step (mirror's switch-over); see
    :meth:`do_complete`."""

    def __init__(
        self,
        job_id: str,
        registry: JobRegistry,
        *,
        txn: JobTxn | None = None,
        auto_finalize: bool = True,
        auto_dismiss: bool = True,
        speed: int = 0,
    ) -> None:
        check_job_id(job_id)
        if registry.get(job_id) is not None:
            raise InvalidArgumentError(f"Job ID '{job_id}' already in use")
        self.id = job_id
        self.registry = registry
        self.auto_finalize = auto_finalize
        self.auto_dismiss = auto_dismiss
        self.status = JobStatus.UNDEFINED
        self.speed = 0
        self.progress_current = 0
        self.progress_total = 0
        self.ret = 0
        self.error: str | None = None
        self.iostatus = "ok"
        self.user_paused = False
        self.busy = False
        self.txn: JobTxn | None = None
        self._pause_count = 1  # a job is born paused; start() takes that pause away
        self._cancelled = False
        self._started = False
        self._deferred = False  # run() has returned (QEMU's deferred_to_main_loop)
        self._parked = False  # waiting in a pause point
        self._resume_status = JobStatus.RUNNING
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._limit = RateLimit()
        self._run_done = asyncio.Event()
        self._finished = asyncio.Event()
        registry._register(self)
        self._transition(JobStatus.CREATED)
        (txn if txn is not None else JobTxn()).add(self)
        if speed < 0:  # QEMU checks the speed after creating the job: created, then null
            self.early_fail()
            raise InvalidArgumentError("Parameter 'speed' expects a non-negative value")
        self.speed = speed
        self._limit.set_speed(speed)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id!r} {self.status}>"

    # -- subclass hooks ------------------------------------------------------------------------
    async def run(self) -> None:
        """The work. Raise :class:`JobFailed` to fail. Between chunks call
        ``await self.pause_point()``; after each chunk ``await self.rate_limit(nbytes)``;
        return early once :attr:`is_cancelled`."""
        raise NotImplementedError

    async def prepare(self) -> None:
        """Before any member of the group commits; raising :class:`JobFailed` aborts the
        whole group."""

    async def commit(self) -> None:
        """Success: make the outcome permanent (e.g. a bitmap's abdicate)."""

    async def abort(self) -> None:
        """Failure or cancel: undo (e.g. a bitmap's reclaim)."""

    async def clean(self) -> None:
        """Always, after commit or abort and before the BLOCK_JOB_* completion event:
        release what the job holds (its target, its filter)."""

    def do_complete(self) -> None:
        """``job-complete`` for a job with :attr:`can_complete` (never called otherwise)."""

    def completed_event_data(self) -> dict[str, Any]:
        """Data of ``BLOCK_JOB_COMPLETED`` (``error`` only when the job failed)."""
        data = self.cancelled_event_data()
        if self.ret < 0:
            data["error"] = self.error or os.strerror(-self.ret)
        return data

    def cancelled_event_data(self) -> dict[str, Any]:
        """Data of ``BLOCK_JOB_CANCELLED`` (and of ``BLOCK_JOB_READY``)."""
        return {
            "type": self.job_type,
            "device": self.id,
            "len": self.progress_total,
            "offset": self.progress_current,
            "speed": self.speed,
        }

    # -- state -----------------------------------------------------------------------------
    @property
    def is_cancelled(self) -> bool:
        return self._cancelled

    @property
    def is_completed(self) -> bool:
        """The job's work has ended (waiting, pending, aborting, concluded or null)."""
        return self.status in COMPLETED_STATUSES

    @property
    def started(self) -> bool:
        return self._started

    @property
    def paused(self) -> bool:
        """A pause is requested or in force (``query-block-jobs`` ``paused``)."""
        return self._pause_count > 0

    def progress_update(self, nbytes: int) -> None:
        """``nbytes`` more are done."""
        self.progress_current += nbytes

    def progress_set_remaining(self, nbytes: int) -> None:
        """``nbytes`` remain to be done: the total becomes done + remaining."""
        self.progress_total = self.progress_current + nbytes

    def _transition(self, new: JobStatus) -> None:
        """The one place a status changes: check the table, log, announce."""
        old = self.status
        check_transition(old, new)
        self.status = new
        log.debug("job %s: %s -> %s", self.id, old, new)
        if new is not old:
            self.registry.emit("JOB_STATUS_CHANGE", {"id": self.id, "status": str(new)})
        if new is JobStatus.NULL or (new is JobStatus.CONCLUDED and not self.auto_dismiss):
            self._finished.set()

    # -- running -----------------------------------------------------------------------------
    def start(self) -> None:
        """``created -> running`` and schedule :meth:`run` on the running event loop."""
        if self._started or self.status is not JobStatus.CREATED:
            raise JobTransitionError(self.status, JobStatus.RUNNING)
        loop = asyncio.get_running_loop()
        self._started = True
        self._pause_count -= 1
        self.busy = True
        self._transition(JobStatus.RUNNING)
        self._task = loop.create_task(self._main(), name=f"job {self.id}")

    async def _main(self) -> None:
        try:
            await self.pause_point()
            await self.run()
        except Exception as exc:
            self._record_failure(exc, "run()")
        self._deferred = True
        self.busy = False
        assert self.txn is not None
        self.txn.job_completed(self)
        self._run_done.set()

    def _record_failure(self, exc: Exception, where: str) -> None:
        """Fail the job with what ``where`` (run or prepare) raised: a :class:`JobFailed`
        gives errno and text, another bitback error its errno (text ``strerror``), anything
        else is a bug, logged, and fails the job with EIO."""
        if isinstance(exc, JobFailed):
            errno, message = exc.errno, exc.message
        elif isinstance(exc, BitbackError):
            errno, message = exc.errno, None
        else:
            log.error("job %s: %s raised", self.id, where, exc_info=exc)
            errno, message = _errno.EIO, None
        errno = errno or _errno.EIO
        self.ret = -errno
        self.error = message if message is not None else os.strerror(errno)

    def _update_rc(self) -> None:
        """Fold a cancel into ``ret``; a failed job moves to ``aborting``."""
        if not self.ret and self._cancelled:
            self.ret = -_errno.ECANCELED
        if self.ret:
            if self.error is None:
                self.error = os.strerror(-self.ret)
            self._transition(JobStatus.ABORTING)

    async def pause_point(self) -> None:
        """Park here while a pause is requested (status paused, or standby when ready) until
        resumed; return at once when no pause is requested or the job is cancelled."""
        if self._pause_count == 0 or self._cancelled:
            return
        self._park()
        await self._yield(None)

    def _park(self) -> None:
        self._resume_status = self.status
        self._transition(JobStatus.STANDBY if self.status is JobStatus.READY else JobStatus.PAUSED)
        self._parked = True

    async def rate_limit(self, nbytes: int) -> None:
        """Account ``nbytes`` just processed and sleep as long as :attr:`speed` demands (not
        at all at speed 0, but the loop is given up once). The sleep ends early on cancel,
        parks on pause, and is recomputed after a resume or a speed change."""
        self._limit.delay(nbytes, time.monotonic())  # account the chunk
        while True:
            delay = self._limit.delay(0, time.monotonic())
            await self._sleep(delay)
            if not delay or self._cancelled:
                return

    async def idle_until_cancelled(self) -> None:
        """Give up the loop until the job is cancelled, parking while paused: the ``run`` of
        a job whose work is done by others (a ``sync=none`` backup's copy-before-write)."""
        while not self._cancelled:
            if self._pause_count == 0:
                await self._yield(None)
            await self.pause_point()

    async def _sleep(self, delay: float) -> None:
        if self._cancelled:
            return
        if self._pause_count == 0:
            await self._yield(delay)
        await self.pause_point()

    async def _yield(self, delay: float | None) -> None:
        """Give up the loop until :meth:`_enter` (or the timer, after ``delay`` seconds)."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiter = waiter
        if delay is not None:
            self._timer = loop.call_later(delay, self._timer_fired)
        self.busy = False
        try:
            await waiter
        finally:
            self._waiter = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def _timer_fired(self) -> None:
        self._timer = None
        self._enter()

    def _enter(self, cond: Callable[[], bool] | None = None) -> None:
        """Wake the job if it gave up the loop (and ``cond()`` holds)."""
        waiter = self._waiter
        if waiter is None or waiter.done() or (cond is not None and not cond()):
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._parked:
            if self._pause_count > 0 and not self._cancelled:
                return
            self._parked = False
            self._transition(self._resume_status)
        elif self._pause_count > 0 and not self._cancelled:
            # Woken from a sleep, the job would walk straight into its pause point: park it
            # now, so the status change happens within the verb, as in QEMU.
            self._park()
            return
        self.busy = True
        waiter.set_result(None)

    def _timer_pending(self) -> bool:
        return self._timer is not None

    def _pause(self) -> None:
        self._pause_count += 1
        if not self._parked:
            self._enter()

    def _resume(self) -> None:
        assert self._pause_count > 0
        self._pause_count -= 1
        if not self._pause_count:
            self._enter(lambda: not self._timer_pending())

    async def error_action(self, policy: str, operation: str, errno: int) -> str:
        """Decide what an I/O error does, by ``on-source-error`` / ``on-target-error``
        ``policy``; emit ``BLOCK_JOB_ERROR``; return the action.

        * ``report``: the caller fails the job (raise :class:`JobFailed`);
        * ``ignore``: the caller retries;
        * ``stop`` (also ``enospc`` / ``auto`` for ENOSPC, which otherwise report): the job
          is paused as if by the user (io-status ``failed``, ``nospace`` for ENOSPC) and this
          returns once it is resumed (or cancelled: check :attr:`is_cancelled`), after which
          the caller retries.
        """
        if policy not in _POLICIES:
            raise ValueError(f"unknown error policy {policy!r}")
        if policy in ("enospc", "auto"):
            action = "stop" if errno == _errno.ENOSPC else "report"
        else:
            action = policy
        self.registry.emit(
            "BLOCK_JOB_ERROR", {"device": self.id, "operation": operation, "action": action}
        )
        if action == "stop":
            if not self.user_paused:
                self._pause_count += 1
                self.user_paused = True  # the pause is the user's to lift: block-job-resume
            if self.iostatus == "ok":
                self.iostatus = "nospace" if errno == _errno.ENOSPC else "failed"
            await self.pause_point()
        return action

    def transition_to_ready(self) -> None:
        """``running -> ready`` and ``BLOCK_JOB_READY`` (jobs with a complete step)."""
        self._transition(JobStatus.READY)
        self.registry.emit("BLOCK_JOB_READY", self.cancelled_event_data())

    # -- user verbs ----------------------------------------------------------------------------
    def _check(self, verb: JobVerb) -> None:
        check_verb(self.id, self.status, verb)

    def user_pause(self) -> None:
        self._check(JobVerb.PAUSE)
        if self.user_paused:
            raise InvalidArgumentError("Job is already paused")
        self.user_paused = True
        self._pause()

    def user_resume(self) -> None:
        """Lift the user's pause (also the pause of an error ``stop``); io-status back to ok."""
        if not self.user_paused or self._pause_count <= 0:
            raise InvalidArgumentError("Can't resume a job that was not paused")
        self._check(JobVerb.RESUME)
        self.iostatus = "ok"
        self.user_paused = False
        self._resume()

    def set_speed(self, speed: int) -> None:
        """New rate limit in bytes/s (0 = none); a sleeping job is woken if it may go faster."""
        self._check(JobVerb.SET_SPEED)
        if speed < 0:
            raise InvalidArgumentError("Parameter 'speed' expects a non-negative value")
        old, self.speed = self.speed, speed
        self._limit.set_speed(speed)
        if speed and speed <= old:
            return
        self._enter(self._timer_pending)

    def cancel(self, force: bool = False) -> None:
        """Cancel the job (and, through its group, every other member).

        Every bitback job treats a cancel as forced, as QEMU's backup does; ``force`` only
        matters to ``block-job-cancel``'s refusal of a user-paused job, checked by the QMP
        layer. A job that never started goes through aborting, concluded and null at once.
        """
        self._check(JobVerb.CANCEL)
        self._cancel()

    def _cancel(self) -> None:
        if self.status is JobStatus.CONCLUDED:
            self._dismiss()
            return
        txn = self.txn
        assert txn is not None
        if self._deferred and txn.committing:
            return  # too late: the group is committing (QEMU does that in one step)
        self._cancel_async()
        if not self._started:
            if not self.is_completed:
                txn.job_completed(self)
        elif self._deferred:
            txn.cancel_completed(self)
        else:
            self._enter()

    def _cancel_async(self) -> None:
        """Mark cancelled and drop the user's pause; whoever calls this wakes the job."""
        if self.user_paused:
            self.iostatus = "ok"
            self.user_paused = False
            self._pause_count -= 1
        self._cancelled = True

    def finalize(self) -> None:
        """Finalize the job's group (``pending`` jobs with auto-finalize off)."""
        self._check(JobVerb.FINALIZE)
        assert self.txn is not None
        self.txn.finalize(self)

    def dismiss(self) -> None:
        """Remove a ``concluded`` job (auto-dismiss off): ``null``, gone from the queries."""
        self._check(JobVerb.DISMISS)
        self._dismiss()

    def complete(self) -> None:
        """``job-complete``: refused by the verb table unless the job is ``ready``."""
        self._check(JobVerb.COMPLETE)
        if self._pause_count or self._cancelled or not self.can_complete:
            raise InvalidArgumentError(f"The active block job '{self.id}' cannot be completed")
        self.do_complete()

    def early_fail(self) -> None:
        """Drop a job that was created but cannot be set up: ``created -> null``."""
        if self.status is not JobStatus.CREATED:
            raise JobTransitionError(self.status, JobStatus.NULL)
        self._dismiss()

    def _conclude(self) -> None:
        self._transition(JobStatus.CONCLUDED)
        if self.auto_dismiss or not self._started:
            self._dismiss()

    def _dismiss(self) -> None:
        self.busy = False
        self._parked = False
        self._deferred = True
        if self.txn is not None:
            self.txn.remove(self)
        self._transition(JobStatus.NULL)
        self.registry._unregister(self)

    async def wait_finished(self) -> None:
        """Until the job is ``null`` (or ``concluded``, with auto-dismiss off)."""
        await self._finished.wait()

    # -- queries -----------------------------------------------------------------------------
    def block_job_info(self) -> dict[str, Any]:
        """This job's ``query-block-jobs`` entry (QEMU 7.2 ``BlockJobInfo``)."""
        info: dict[str, Any] = {
            "type": self.job_type,
            "device": self.id,
            "len": self.progress_total,
            "offset": self.progress_current,
            "busy": self.busy,
            "paused": self.paused,
            "speed": self.speed,
            "io-status": self.iostatus,
            "ready": self.status in READY_STATUSES,
            "status": str(self.status),
            "auto-finalize": self.auto_finalize,
            "auto-dismiss": self.auto_dismiss,
        }
        if self.ret:
            info["error"] = self.error or os.strerror(-self.ret)
        return info

    def job_info(self) -> dict[str, Any]:
        """This job's ``query-jobs`` entry (``JobInfo``)."""
        info: dict[str, Any] = {
            "id": self.id,
            "type": self.job_type,
            "status": str(self.status),
            "current-progress": self.progress_current,
            "total-progress": self.progress_total,
        }
        if self.error is not None:
            info["error"] = self.error
        return info
