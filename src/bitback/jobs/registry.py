"""The registry of live jobs: lookup by id, the QMP queries, the shared event sink, the
background completion work, and cancel-everything for ``quit``.

Jobs register themselves when created and leave when they reach ``null``. Lists are kept
oldest first; the queries answer newest first, as QEMU (which inserts at the list head) does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from bitback.errors import NotFoundError

if TYPE_CHECKING:
    from bitback.jobs.job import Job

__all__ = ["EmitFn", "JobNotFoundError", "JobRegistry"]

log = logging.getLogger(__name__)

EmitFn = Callable[[str, dict[str, Any]], None]
"""The daemon's event broadcaster: ``emit(name, data)``; called on the event loop thread."""


class JobNotFoundError(NotFoundError):
    """No block job has this id (QMP class ``DeviceNotActive``)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"Block job '{job_id}' not found")
        self.job_id = job_id


class JobRegistry:
    """Every job between creation and ``null``, and the event sink they share."""

    def __init__(self, emit: EmitFn) -> None:
        self._emit = emit
        self._jobs: list[Job] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def emit(self, name: str, data: dict[str, Any]) -> None:
        self._emit(name, data)

    @property
    def jobs(self) -> list[Job]:
        """The live jobs, oldest first."""
        return list(self._jobs)

    def get(self, job_id: str) -> Job | None:
        return next((job for job in self._jobs if job.id == job_id), None)

    def find_block_job(self, device: str) -> Job:
        """The job ``block-job-*`` commands name; :class:`JobNotFoundError` if none."""
        job = self.get(device)
        if job is None:
            raise JobNotFoundError(device)
        return job

    def find_job(self, job_id: str) -> Job:
        """The job ``job-*`` commands name; :class:`NotFoundError` ``Job not found`` if none."""
        job = self.get(job_id)
        if job is None:
            raise NotFoundError("Job not found")
        return job

    def query_block_jobs(self) -> list[dict[str, Any]]:
        """``query-block-jobs``: newest job first, as QEMU lists them."""
        return [job.block_job_info() for job in reversed(self._jobs)]

    def query_jobs(self) -> list[dict[str, Any]]:
        """``query-jobs``: newest job first."""
        return [job.job_info() for job in reversed(self._jobs)]

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run completion work in the background; :meth:`settle` waits for it."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("job completion failed", exc_info=task.exception())

    async def settle(self) -> None:
        """Until no completion work (finalize, group abort) is in flight. QMP verbs await it
        so their events precede their reply, as in QEMU."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    async def cancel_all(self) -> None:
        """``quit``: cancel every job, newest first, and wait until each one is gone."""
        while self._jobs:
            job = self._jobs[-1]
            job._cancel()
            await job.wait_finished()
            await self.settle()

    def _register(self, job: Job) -> None:
        self._jobs.append(job)

    def _unregister(self, job: Job) -> None:
        self._jobs.remove(job)
