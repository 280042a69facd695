"""The status and verb tables: equal to QEMU's, enforced by their guards, and walked by jobs.

``QEMU_STT`` and ``QEMU_VERBS`` restate QEMU 7.2's ``JobSTT`` and ``JobVerbTable``
(``job.c``; ``change`` from 8.2) as rows of 0/1 over the statuses in ``JobStatus`` order,
independently of :mod:`bitback.jobs.status`; the tests compare the two, check every
status x status and status x verb pair against the guards, drive real jobs through every
allowed transition, and address every refused verb to a job held in each status.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import pytest

import bitback.jobs.job as job_module
from bitback.errors import InvalidArgumentError
from bitback.jobs import (
    TRANSITIONS,
    VERBS,
    Job,
    JobError,
    JobRegistry,
    JobStatus,
    JobTransitionError,
    JobTxn,
    JobVerb,
    check_transition,
    check_verb,
)

S = JobStatus
#                 U C R P Y S W D X E N
QEMU_STT = {
    "undefined": "0 1 0 0 0 0 0 0 0 0 0",
    "created":   "0 0 1 0 0 0 0 0 1 0 1",
    "running":   "0 0 0 1 1 0 1 0 1 0 0",
    "paused":    "0 0 1 0 0 0 0 0 0 0 0",
    "ready":     "0 0 0 0 0 1 1 0 1 0 0",
    "standby":   "0 0 0 0 1 0 0 0 0 0 0",
    "waiting":   "0 0 0 0 0 0 0 1 1 0 0",
    "pending":   "0 0 0 0 0 0 0 0 1 1 0",
    "aborting":  "0 0 0 0 0 0 0 0 1 1 0",
    "concluded": "0 0 0 0 0 0 0 0 0 0 1",
    "null":      "0 0 0 0 0 0 0 0 0 0 0",
}  # fmt: skip
QEMU_VERBS = {
    "cancel":    "0 1 1 1 1 1 1 1 0 0 0",
    "pause":     "0 1 1 1 1 1 0 0 0 0 0",
    "resume":    "0 1 1 1 1 1 0 0 0 0 0",
    "set-speed": "0 1 1 1 1 1 0 0 0 0 0",
    "complete":  "0 0 0 0 1 0 0 0 0 0 0",
    "dismiss":   "0 0 0 0 0 0 0 0 0 1 0",
    "finalize":  "0 0 0 0 0 0 0 1 0 0 0",
    "change":    "0 0 0 0 1 0 0 0 0 0 0",
}  # fmt: skip
ALLOWED = {(S(a), S(b)) for a in TRANSITIONS for b in TRANSITIONS[S(a)]}


def _row(bits: str) -> frozenset[JobStatus]:
    return frozenset(s for s, bit in zip(JobStatus, bits.split(), strict=True) if bit == "1")


def test_tables_are_qemus() -> None:
    assert {s.value: TRANSITIONS[s] for s in JobStatus} == {k: _row(v) for k, v in QEMU_STT.items()}
    assert {v.value: VERBS[v] for v in JobVerb} == {k: _row(v) for k, v in QEMU_VERBS.items()}


@pytest.mark.parametrize("new", list(JobStatus))
@pytest.mark.parametrize("old", list(JobStatus))
def test_check_transition(old: JobStatus, new: JobStatus) -> None:
    if (old, new) in ALLOWED:
        check_transition(old, new)
    else:
        with pytest.raises(JobTransitionError) as info:
            check_transition(old, new)
        assert isinstance(info.value, AssertionError)
        assert (info.value.old, info.value.new) == (old, new)


@pytest.mark.parametrize("verb", list(JobVerb))
@pytest.mark.parametrize("status", list(JobStatus))
def test_check_verb(status: JobStatus, verb: JobVerb) -> None:
    if status in VERBS[verb]:
        check_verb("drive0", status, verb)
        return
    with pytest.raises(JobError) as info:
        check_verb("drive0", status, verb)
    assert str(info.value) == (
        f"Job 'drive0' in state '{status.value}' cannot accept command verb '{verb.value}'"
    )
    assert (info.value.job_id, info.value.status, info.value.verb) == ("drive0", status, verb)


# -- real jobs ------------------------------------------------------------------------------------
def aio(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 2))

    return wrapper


async def until(cond: Callable[[], bool]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 1.0
    while not cond():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.002)


class GateJob(Job):
    """Runs until ``gate`` is set (``ready`` first if asked); ``abort_gate`` holds abort()."""

    def __init__(self, job_id: str, registry: JobRegistry, *, ready: bool = False,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(job_id, registry, **kwargs)
        self.want_ready = ready
        self.gate = asyncio.Event()
        self.abort_gate: asyncio.Event | None = None

    async def run(self) -> None:
        if self.want_ready:
            self.transition_to_ready()
        while not self.gate.is_set():
            await self.pause_point()
            if self.is_cancelled:
                return
            await asyncio.sleep(0.002)

    async def abort(self) -> None:
        if self.abort_gate is not None:
            await self.abort_gate.wait()


@aio
async def test_jobs_reach_every_allowed_transition(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: set[tuple[JobStatus, JobStatus]] = set()

    def recording(old: JobStatus, new: JobStatus) -> None:
        check_transition(old, new)
        seen.add((old, new))

    monkeypatch.setattr(job_module, "check_transition", recording)
    reg = JobRegistry(lambda name, data: None)

    ok = GateJob("ok", reg)  # running, paused, waiting, pending, concluded, null
    ok.start()
    ok.user_pause()
    await until(lambda: ok.status is S.PAUSED)
    ok.user_resume()
    ok.gate.set()
    await ok.wait_finished()

    ready = GateJob("ready", reg, ready=True)  # ready, standby, ready -> waiting
    ready.start()
    await until(lambda: ready.status is S.READY)
    ready.user_pause()
    await until(lambda: ready.status is S.STANDBY)
    ready.user_resume()
    ready.gate.set()
    await ready.wait_finished()

    for job in (GateJob("r", reg, ready=True), GateJob("f", reg)):  # ready/running -> aborting
        job.start()
        await until(lambda job=job: job.status in (S.READY, S.RUNNING) and job.busy)
        job.cancel()
        await job.wait_finished()

    GateJob("c", reg).cancel()  # created -> aborting
    GateJob("e", reg).early_fail()  # created -> null

    pending = GateJob("p", reg, auto_finalize=False)  # pending -> aborting
    pending.gate.set()
    pending.start()
    await until(lambda: pending.status is S.PENDING)
    pending.cancel()

    txn = JobTxn()  # waiting -> aborting
    waiting, other = GateJob("w", reg, txn=txn), GateJob("o", reg, txn=txn)
    waiting.gate.set()
    waiting.start()
    other.start()
    await until(lambda: waiting.status is S.WAITING)
    waiting.cancel()
    await reg.settle()

    assert reg.jobs == []
    assert seen == ALLOWED


@asynccontextmanager
async def job_in(status: JobStatus) -> AsyncIterator[GateJob]:
    """A job held in ``status`` (which must be reachable) for the duration of the block."""
    reg = JobRegistry(lambda name, data: None)
    txn = JobTxn() if status is S.WAITING else None  # another member keeps the job waiting
    job = GateJob("j", reg, txn=txn, ready=status in (S.READY, S.STANDBY),
                  auto_finalize=status is not S.PENDING,
                  auto_dismiss=status is not S.CONCLUDED)  # fmt: skip
    other = GateJob("other", reg, txn=txn) if txn is not None else None
    if other is not None:
        other.start()
    if status is S.ABORTING:
        job.abort_gate = asyncio.Event()
    if status is not S.CREATED:
        job.start()
    if status in (S.PAUSED, S.STANDBY):
        await until(lambda: job.status is (S.READY if status is S.STANDBY else S.RUNNING))
        job.user_pause()
    if status in (S.WAITING, S.PENDING, S.CONCLUDED, S.NULL):
        job.gate.set()
    if status is S.ABORTING:
        job.cancel()
    await until(lambda: job.status is status)
    try:
        yield job
    finally:
        for each in (job, other):
            if each is not None:
                each.gate.set()
                if each.abort_gate is not None:
                    each.abort_gate.set()
        await reg.cancel_all()


USER_VERBS: dict[JobVerb, Callable[[Job], None]] = {
    JobVerb.CANCEL: lambda job: job.cancel(force=True),
    JobVerb.PAUSE: Job.user_pause,
    JobVerb.RESUME: Job.user_resume,
    JobVerb.SET_SPEED: lambda job: job.set_speed(1),
    JobVerb.COMPLETE: Job.complete,
    JobVerb.DISMISS: Job.dismiss,
    JobVerb.FINALIZE: Job.finalize,
}
HELD = [s for s in JobStatus if s is not S.UNDEFINED]
REFUSED = [(s, v) for s in HELD for v in USER_VERBS if s not in VERBS[v]]


@pytest.mark.parametrize(("status", "verb"), REFUSED, ids=[f"{s}-{v}" for s, v in REFUSED])
@aio
async def test_job_refuses_verb(status: JobStatus, verb: JobVerb) -> None:
    async with job_in(status) as job:
        with pytest.raises(InvalidArgumentError) as info:
            USER_VERBS[verb](job)
        if verb is JobVerb.RESUME and not job.user_paused:
            assert str(info.value) == "Can't resume a job that was not paused"
        else:
            assert str(info.value) == (
                f"Job 'j' in state '{status}' cannot accept command verb '{verb}'"
            )
        assert job.status is status


@aio
async def test_ready_job_without_complete_step_refuses_complete() -> None:
    async with job_in(S.READY) as job:
        with pytest.raises(InvalidArgumentError, match=r"^The active block job 'j' cannot be"):
            job.complete()
