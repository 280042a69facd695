"""The job framework: event orderings of the spec's section 4.2, groups, user verbs, error
policies, rate limiting, quit, query entries, and the QMP job commands.

Every test drives :class:`ScriptJob`, a job whose ``run()`` copies ``chunks`` pretend chunks,
waits on an asyncio event the test controls, and fails on the errnos it is handed; hooks and
events land in one list, so orderings read like the spec (``"drive0 waiting"`` is
``JOB_STATUS_CHANGE``, ``"COMPLETED drive0"`` ``BLOCK_JOB_COMPLETED``, ``"clean:drive0"`` the
clean hook). Nothing asserts timings: waits poll for a state, with a one-second ceiling.
"""

from __future__ import annotations

import asyncio
import errno
import functools
from collections.abc import Callable, Coroutine
from types import SimpleNamespace
from typing import Any

import pytest

import bitback.qmp.commands.jobs  # noqa: F401  (registers the commands)
from bitback.errors import InvalidArgumentError
from bitback.jobs import Job, JobError, JobFailed, JobRegistry, JobStatus, JobTxn
from bitback.qmp.errors import to_qmp_error
from bitback.qmp.registry import REGISTRY

CHUNK = 65536


def aio(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test body in a fresh event loop, with a 2 s safety net."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 2))

    return wrapper


async def until(cond: Callable[[], bool], timeout: float = 1.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.002)


class Recorder:
    """The fake event sink: events (and hook calls) as short lines."""

    def __init__(self) -> None:
        self.raw: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, name: str, data: dict[str, Any]) -> None:
        self.raw.append((name, data))

    @property
    def lines(self) -> list[str]:
        return [_line(name, data) for name, data in self.raw]

    def data(self, name: str, job_id: str) -> dict[str, Any]:
        return next(d for n, d in self.raw if n == name and d.get("device") == job_id)


def _line(name: str, d: dict[str, Any]) -> str:
    if name == "JOB_STATUS_CHANGE":
        return f"{d['id']} {d['status']}"
    if name == "hook":
        return f"{d['hook']}:{d['id']}"
    if name == "BLOCK_JOB_ERROR":
        return f"ERROR {d['device']} {d['operation']} {d['action']}"
    if name == "BLOCK_JOB_PENDING":
        return f"PENDING {d['id']}"
    short = name.removeprefix("BLOCK_JOB_")
    return f"{short} {d['device']}" + (f" error={d['error']}" if "error" in d else "")


class ScriptJob(Job):
    """``chunks`` chunks of CHUNK bytes; before each one the job passes a pause point and
    waits for ``gate`` (if given); ``errors`` are errnos that the next attempts meet, handled
    by ``policy``; ``fail_prepare`` fails prepare. Hooks are recorded as events."""

    def __init__(
        self,
        job_id: str,
        registry: JobRegistry,
        *,
        chunks: int = 2,
        errors: tuple[int, ...] = (),
        policy: str = "report",
        gate: asyncio.Event | None = None,
        fail_prepare: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(job_id, registry, **kwargs)
        self.chunks = chunks
        self.errors = list(errors)
        self.policy = policy
        self.gate = gate
        self.fail_prepare = fail_prepare
        self.attempts = 0

    async def run(self) -> None:
        self.progress_set_remaining(self.chunks * CHUNK)
        for _ in range(self.chunks):
            while True:
                await self.pause_point()
                if self.is_cancelled:
                    return
                if self.gate is not None and not self.gate.is_set():
                    await asyncio.sleep(0.002)
                    continue
                self.attempts += 1
                if not self.errors:
                    break
                err = self.errors.pop(0)
                if await self.error_action(self.policy, "read", err) == "report":
                    raise JobFailed(errno=err)
            self.progress_update(CHUNK)
            await self.rate_limit(CHUNK)

    def _hook(self, name: str) -> None:
        self.registry.emit("hook", {"hook": name, "id": self.id})

    async def prepare(self) -> None:
        self._hook("prepare")
        if self.fail_prepare:
            raise JobFailed(errno=errno.EIO)

    async def commit(self) -> None:
        self._hook("commit")

    async def abort(self) -> None:
        self._hook("abort")

    async def clean(self) -> None:
        self._hook("clean")


def setup() -> tuple[Recorder, JobRegistry]:
    rec = Recorder()
    return rec, JobRegistry(rec)


def success(job_id: str) -> list[str]:
    """The completion of one successful job once its group is pending."""
    return [f"commit:{job_id}", f"clean:{job_id}", f"COMPLETED {job_id}",
            f"{job_id} concluded", f"{job_id} null"]  # fmt: skip


def cancelled(job_id: str, *, started: bool = True) -> list[str]:
    event = [f"CANCELLED {job_id}"] if started else []
    return [f"{job_id} aborting", f"abort:{job_id}", f"clean:{job_id}", *event,
            f"{job_id} concluded", f"{job_id} null"]  # fmt: skip


# -- section 4.2 orderings ------------------------------------------------------------------------
@pytest.mark.parametrize("chunks", [2, 0], ids=["data", "empty"])
@aio
async def test_successful_job(chunks: int) -> None:
    """4.2.1 (also with nothing to copy); the job leaves the queries in the very step that
    sends BLOCK_JOB_COMPLETED (4.3)."""
    rec, reg = setup()
    job = ScriptJob("j", reg, chunks=chunks)
    gone_after_completed: list[bool] = []

    def sink(name: str, data: dict[str, Any]) -> None:
        rec(name, data)
        if name == "BLOCK_JOB_COMPLETED":
            asyncio.get_running_loop().call_soon(
                lambda: gone_after_completed.append(reg.query_block_jobs() == [])
            )

    reg._emit = sink
    job.start()
    await job.wait_finished()
    assert rec.lines == ["j created", "j running", "j waiting", "j pending", "prepare:j",
                         *success("j")]  # fmt: skip
    data = rec.data("BLOCK_JOB_COMPLETED", "j")
    size = chunks * CHUNK
    assert data == {"type": "backup", "device": "j", "len": size, "offset": size, "speed": 0}
    await until(lambda: bool(gone_after_completed))
    assert gone_after_completed == [True]
    assert reg.jobs == [] and job.status is JobStatus.NULL and job.txn is None


@aio
async def test_failed_job_reports() -> None:
    """4.2.2: one BLOCK_JOB_ERROR, no waiting/pending, COMPLETED with strerror text."""
    rec, reg = setup()
    job = ScriptJob("j", reg, errors=(errno.EIO,))
    job.start()
    await job.wait_finished()
    assert rec.lines == ["j created", "j running", "ERROR j read report", "j aborting",
                         "abort:j", "clean:j", "COMPLETED j error=Input/output error",
                         "j concluded", "j null"]  # fmt: skip
    data = rec.data("BLOCK_JOB_COMPLETED", "j")
    assert data["offset"] < data["len"]
    assert job.ret == -errno.EIO


@pytest.mark.parametrize("drive0_chunks", [2, 0], ids=["finished-work", "race-nothing-to-do"])
@aio
async def test_grouped_failure(drive0_chunks: int) -> None:
    """4.2.3: drive0 finished and waits; drive1 fails; drive0 is reported cancelled."""
    rec, reg = setup()
    txn, gate = JobTxn(), asyncio.Event()
    drive0 = ScriptJob("drive0", reg, txn=txn, chunks=drive0_chunks)
    drive1 = ScriptJob("drive1", reg, txn=txn, errors=(errno.EIO,), gate=gate)
    assert txn.jobs == (drive1, drive0)  # newest first, as QEMU's list
    drive0.start()
    drive1.start()
    await until(lambda: drive0.status is JobStatus.WAITING)
    gate.set()
    await drive0.wait_finished()
    assert rec.lines == [
        "drive0 created", "drive1 created", "drive0 running", "drive1 running",
        "drive0 waiting", "ERROR drive1 read report", "drive1 aborting", "abort:drive1",
        "clean:drive1", "COMPLETED drive1 error=Input/output error", "drive1 concluded",
        "drive1 null", *cancelled("drive0"),
    ]  # fmt: skip
    data = rec.data("BLOCK_JOB_CANCELLED", "drive0")
    assert data["len"] == data["offset"] == drive0_chunks * CHUNK
    assert reg.jobs == []


@aio
async def test_grouped_success() -> None:
    """4.2.4: both wait, both pending, then each finishes, newest first."""
    rec, reg = setup()
    txn, gate = JobTxn(), asyncio.Event()
    drive0 = ScriptJob("drive0", reg, txn=txn)
    drive1 = ScriptJob("drive1", reg, txn=txn, gate=gate)
    drive0.start()
    drive1.start()
    await until(lambda: drive0.status is JobStatus.WAITING)
    gate.set()
    await drive0.wait_finished()
    assert rec.lines == [
        "drive0 created", "drive1 created", "drive0 running", "drive1 running",
        "drive0 waiting", "drive1 waiting", "drive1 pending", "drive0 pending",
        "prepare:drive1", "prepare:drive0", *success("drive1"), *success("drive0"),
    ]  # fmt: skip


@aio
async def test_error_stop_then_resume() -> None:
    """4.2.5: stop pauses as the user would; resume says running at once and retries."""
    rec, reg = setup()
    job = ScriptJob("j", reg, errors=(errno.EIO,), policy="stop")
    job.start()
    await until(lambda: job.status is JobStatus.PAUSED)
    assert rec.lines == ["j created", "j running", "ERROR j read stop", "j paused"]
    info = job.block_job_info()
    state = (info["status"], info["paused"], info["io-status"], info["busy"])
    assert state == ("paused", True, "failed", False)
    job.user_resume()
    assert rec.lines[-1] == "j running" and job.iostatus == "ok"
    await job.wait_finished()
    assert rec.lines[4:] == ["j running", "j waiting", "j pending", "prepare:j", *success("j")]
    assert rec.data("BLOCK_JOB_COMPLETED", "j")["offset"] == 2 * CHUNK
    assert job.attempts == 3  # the failed chunk was retried


@pytest.mark.parametrize("paused", [False, True], ids=["running", "paused"])
@aio
async def test_cancel(paused: bool) -> None:
    """4.2.6; a paused job says running first, within the cancel."""
    rec, reg = setup()
    job = ScriptJob("j", reg, gate=asyncio.Event())
    job.start()
    if paused:
        job.user_pause()
    await until(lambda: job.status is (JobStatus.PAUSED if paused else JobStatus.RUNNING))
    job.cancel(force=True)
    pause = ["j paused", "j running"] if paused else []
    assert rec.lines == ["j created", "j running", *pause] and not job.user_paused
    await job.wait_finished()
    assert rec.lines == ["j created", "j running", *pause, *cancelled("j")]
    assert job.error == "Operation canceled"


@aio
async def test_cancel_unstarted_job_emits_no_block_job_event() -> None:
    rec, reg = setup()
    job = ScriptJob("j", reg)
    job.cancel(force=True)
    await job.wait_finished()
    assert rec.lines == ["j created", *cancelled("j", started=False)]


@aio
async def test_cancel_unstarted_group() -> None:
    """A transaction that failed after creating its jobs cancels them: both vanish."""
    rec, reg = setup()
    txn = JobTxn()
    a, b = ScriptJob("a", reg, txn=txn), ScriptJob("b", reg, txn=txn)
    b.cancel(force=True)
    await reg.settle()
    assert rec.lines == ["a created", "b created", *cancelled("b", started=False),
                         *cancelled("a", started=False)]  # fmt: skip
    assert a.status is b.status is JobStatus.NULL


@aio
async def test_cancel_waiting_member_cancels_group() -> None:
    """As measured on QEMU 7.2: the running member ends first, then the waiting one."""
    rec, reg = setup()
    txn = JobTxn()
    a = ScriptJob("a", reg, txn=txn)
    b = ScriptJob("b", reg, txn=txn, gate=asyncio.Event())
    a.start()
    b.start()
    await until(lambda: a.status is JobStatus.WAITING)
    a.cancel()
    await reg.settle()
    assert rec.lines[5:] == [*cancelled("b"), *cancelled("a")]


@aio
async def test_prepare_failure_aborts_group() -> None:
    rec, reg = setup()
    txn = JobTxn()
    ScriptJob("a", reg, txn=txn).start()
    ScriptJob("b", reg, txn=txn, fail_prepare=True).start()
    await until(lambda: reg.jobs == [])
    assert rec.lines[6:] == [
        "b pending", "a pending", "prepare:b", "b aborting", "abort:b", "clean:b",
        "COMPLETED b error=Input/output error", "b concluded", "b null", *cancelled("a"),
    ]  # fmt: skip


# -- auto-finalize and auto-dismiss off -------------------------------------------------------
@aio
async def test_manual_finalize_and_dismiss() -> None:
    rec, reg = setup()
    job = ScriptJob("j", reg, auto_finalize=False, auto_dismiss=False)
    job.start()
    await until(lambda: job.status is JobStatus.PENDING)
    await asyncio.sleep(0.02)
    assert rec.lines[2:] == ["j waiting", "j pending", "PENDING j"]
    with pytest.raises(JobError, match="in state 'pending' cannot accept command verb 'dismiss'"):
        job.dismiss()
    job.finalize()
    await reg.settle()
    assert rec.lines[5:] == ["prepare:j", "commit:j", "clean:j", "COMPLETED j", "j concluded"]
    assert [e["status"] for e in reg.query_jobs()] == ["concluded"]
    job.dismiss()
    assert rec.lines[-1] == "j null" and reg.jobs == []


@aio
async def test_cancel_pending_job() -> None:
    rec, reg = setup()
    job = ScriptJob("j", reg, auto_finalize=False)
    job.start()
    await until(lambda: job.status is JobStatus.PENDING)
    job.cancel()
    await reg.settle()
    assert rec.lines[5:] == cancelled("j")


# -- pause, resume, error policies --------------------------------------------------------------
@aio
async def test_pause_before_start_parks_at_first_pause_point() -> None:
    rec, reg = setup()
    job = ScriptJob("j", reg)
    job.user_pause()
    job.start()
    await until(lambda: job.status is JobStatus.PAUSED)
    assert job.progress_current == 0
    job.user_resume()
    await job.wait_finished()
    assert rec.lines[:4] == ["j created", "j running", "j paused", "j running"]


@aio
async def test_ignore_retries_the_chunk() -> None:
    rec, reg = setup()
    job = ScriptJob("j", reg, errors=(errno.EIO, errno.EIO), policy="ignore")
    job.start()
    await job.wait_finished()
    assert rec.lines[2:4] == ["ERROR j read ignore", "ERROR j read ignore"]
    assert rec.lines[-3] == "COMPLETED j" and job.attempts == 4


@pytest.mark.parametrize(
    ("err", "action", "iostatus"),
    [(errno.ENOSPC, "stop", "nospace"), (errno.EIO, "report", "ok")],
)
@aio
async def test_enospc_policy(err: int, action: str, iostatus: str) -> None:
    rec, reg = setup()
    job = ScriptJob("j", reg, errors=(err,), policy="enospc")
    job.start()
    await until(lambda: job.status in (JobStatus.PAUSED, JobStatus.NULL))
    assert rec.lines[2] == f"ERROR j read {action}" and job.iostatus == iostatus
    if action == "stop":
        job.cancel(force=True)  # a job stopped by an error is user-paused: force needed
        assert job.iostatus == "ok"
    await job.wait_finished()
    expected = "CANCELLED j" if action == "stop" else "COMPLETED j error=Input/output error"
    assert rec.lines[-3] == expected


# -- rate limiting --------------------------------------------------------------------------------
@aio
async def test_speed_one_stalls_until_speed_zero() -> None:
    rec, reg = setup()
    job = ScriptJob("j", reg, speed=1)
    job.start()
    await until(lambda: job.progress_current == CHUNK and not job.busy)
    await asyncio.sleep(0.05)
    assert job.status is JobStatus.RUNNING and job.progress_current == CHUNK
    job.set_speed(0)
    await job.wait_finished()
    assert rec.data("BLOCK_JOB_COMPLETED", "j")["offset"] == 2 * CHUNK


@aio
async def test_sleeping_job_pauses_and_cancels_at_once() -> None:
    rec, reg = setup()
    job = ScriptJob("j", reg, speed=1)
    job.start()
    await until(lambda: job.progress_current == CHUNK and not job.busy)
    job.user_pause()
    assert rec.lines[-1] == "j paused"  # within the verb, as in QEMU
    job.user_resume()
    assert rec.lines[-1] == "j running"
    await asyncio.sleep(0.02)
    assert job.progress_current == CHUNK  # still limited
    job.set_speed(10)  # faster, but still far too slow to finish
    await asyncio.sleep(0.02)
    assert job.progress_current == CHUNK
    job.cancel()
    await job.wait_finished()
    assert rec.lines[-4:] == ["clean:j", "CANCELLED j", "j concluded", "j null"]


class IdleJob(Job):
    async def run(self) -> None:
        await self.idle_until_cancelled()


@aio
async def test_idle_job_pauses_and_ends_on_cancel() -> None:
    rec, reg = setup()
    job = IdleJob("j", reg)
    job.start()
    await until(lambda: not job.busy)
    job.user_pause()
    assert rec.lines[-1] == "j paused"
    job.user_resume()
    await asyncio.sleep(0.01)
    assert job.status is JobStatus.RUNNING
    job.cancel()
    await job.wait_finished()
    assert rec.lines[-3:] == ["CANCELLED j", "j concluded", "j null"]


def test_rate_limit_slices() -> None:
    from bitback.jobs import RateLimit

    limit = RateLimit()
    assert limit.delay(10**9, 0.0) == 0.0  # unlimited
    limit.set_speed(1024 * 1024)
    assert limit.delay(50_000, 10.0) == 0.0  # within the slice's quota
    assert limit.delay(474_288, 10.0) == pytest.approx(0.5)  # 512 KiB: five slices
    assert limit.delay(0, 10.6) == 0.0  # the stretched slice is over


# -- speed, ids, quit, queries ---------------------------------------------------------------------
@aio
async def test_creation_refusals() -> None:
    rec, reg = setup()
    for bad in ("1bad", "", "a b", "é"):
        with pytest.raises(InvalidArgumentError, match=f"^Invalid job ID '{bad}'$"):
            ScriptJob(bad, reg)
    ScriptJob("j", reg)
    with pytest.raises(InvalidArgumentError, match=r"^Job ID 'j' already in use$"):
        ScriptJob("j", reg)
    with pytest.raises(InvalidArgumentError, match=r"^Parameter 'speed' expects a non-negative"):
        ScriptJob("k", reg, speed=-1)
    assert rec.lines == ["j created", "k created", "k null"]
    assert [j.id for j in reg.jobs] == ["j"]
    with pytest.raises(InvalidArgumentError, match="expects a non-negative value"):
        reg.jobs[0].set_speed(-5)


@aio
async def test_cancel_all() -> None:
    rec, reg = setup()
    running = ScriptJob("running", reg, gate=asyncio.Event())
    stopped = ScriptJob("stopped", reg, errors=(errno.EIO,), policy="stop")
    concluded = ScriptJob("concluded", reg, auto_dismiss=False, chunks=0)
    ScriptJob("created", reg)
    for job in (running, stopped, concluded):
        job.start()
    await until(lambda: stopped.status is JobStatus.PAUSED)
    await until(lambda: concluded.status is JobStatus.CONCLUDED)
    await reg.cancel_all()
    assert reg.jobs == []
    nulls = [line for line in rec.lines if line.endswith(" null")]
    assert nulls == ["created null", "concluded null", "stopped null", "running null"]


@aio
async def test_query_entries() -> None:
    _rec, reg = setup()
    a = ScriptJob("a", reg, gate=asyncio.Event(), speed=5, auto_dismiss=False)
    b = ScriptJob("b", reg, auto_finalize=False)
    a.start()
    await until(lambda: a.progress_total > 0)
    assert reg.query_block_jobs()[1] == {
        "type": "backup", "device": "a", "len": 2 * CHUNK, "offset": 0, "busy": True,
        "paused": False, "speed": 5, "io-status": "ok", "ready": False, "status": "running",
        "auto-finalize": True, "auto-dismiss": False,
    }  # fmt: skip
    assert reg.query_block_jobs()[0]["paused"] is True  # b was never started
    assert reg.query_jobs() == [
        {"id": "b", "type": "backup", "status": "created", "current-progress": 0,
         "total-progress": 0},
        {"id": "a", "type": "backup", "status": "running", "current-progress": 0,
         "total-progress": 2 * CHUNK},
    ]  # fmt: skip
    assert b.block_job_info()["auto-finalize"] is False
    a.cancel()
    await a.wait_finished()  # concluded, kept: the queries carry the error
    assert reg.query_block_jobs()[1]["error"] == "Operation canceled"
    assert reg.query_jobs()[1]["error"] == "Operation canceled"
    await reg.cancel_all()


# -- QMP commands ---------------------------------------------------------------------------------
async def qmp(reg: JobRegistry, name: str, **args: Any) -> object:
    """The command's return value; for an error its ``desc``, prefixed by the class unless
    it is GenericError."""
    ctx: Any = SimpleNamespace(jobs=reg)
    try:
        return await REGISTRY.dispatch(ctx, name, args)
    except Exception as exc:
        err = to_qmp_error(exc)
        return err.desc if err.error_class == "GenericError" else f"{err.error_class}: {err.desc}"


@aio
async def test_qmp_not_found() -> None:
    _rec, reg = setup()
    not_found = "DeviceNotActive: Block job 'x' not found"
    for name in ("block-job-pause", "block-job-resume", "block-job-cancel", "block-job-complete"):
        assert await qmp(reg, name, device="x") == not_found
    assert await qmp(reg, "block-job-set-speed", device="x", speed=1) == not_found
    for name in ("block-job-finalize", "block-job-dismiss"):
        assert await qmp(reg, name, id="x") == not_found
    for verb in ("pause", "resume", "cancel", "complete", "finalize", "dismiss"):
        assert await qmp(reg, f"job-{verb}", id="x") == "Job not found"
    assert await qmp(reg, "block-job-cancel") == "Parameter 'device' is missing"
    assert await qmp(reg, "query-jobs") == [] and await qmp(reg, "query-block-jobs") == []


@aio
async def test_qmp_verbs() -> None:
    rec, reg = setup()
    job = ScriptJob("j", reg, gate=asyncio.Event())
    job.start()
    steps: list[tuple[str, dict[str, Any], object]] = [
        ("block-job-resume", {"device": "j"}, "Can't resume a job that was not paused"),
        ("block-job-complete", {"device": "j"},
         "Job 'j' in state 'running' cannot accept command verb 'complete'"),
        ("block-job-set-speed", {"device": "j", "speed": -1},
         "Parameter 'speed' expects a non-negative value"),
        ("block-job-set-speed", {"device": "j", "speed": 0}, {}),
        ("block-job-pause", {"device": "j"}, {}),
        ("job-pause", {"id": "j"}, "Job is already paused"),
        ("block-job-cancel", {"device": "j"}, "The block job for device 'j' is currently paused"),
        ("job-resume", {"id": "j"}, {}),
        ("block-job-cancel", {"device": "j", "force": False}, {}),
    ]  # fmt: skip
    for name, args, expected in steps:
        assert await qmp(reg, name, **args) == expected, name
    await job.wait_finished()
    assert rec.lines[-3] == "CANCELLED j"


@aio
async def test_qmp_events_precede_reply() -> None:
    """Finalize, dismiss and the cancel of a finished job send their events before {}."""
    rec, reg = setup()
    a = ScriptJob("a", reg, auto_finalize=False, auto_dismiss=False)
    b = ScriptJob("b", reg, auto_finalize=False)
    a.start()
    b.start()
    await until(lambda: a.status is b.status is JobStatus.PENDING)
    assert await qmp(reg, "block-job-finalize", id="a") == {}
    assert rec.lines[-1] == "a concluded"
    assert await qmp(reg, "job-dismiss", id="a") == {}
    assert rec.lines[-1] == "a null"
    assert await qmp(reg, "job-cancel", id="b") == {}
    assert rec.lines[-4:] == ["clean:b", "CANCELLED b", "b concluded", "b null"]
