"""Job commands: ``query-jobs``, ``query-block-jobs``, ``block-job-*`` and ``job-*``.

Two families address the same jobs (QEMU 7.2, ``blockdev.c`` and ``job-qmp.c``):

===========================  ===================================  ===========================
command                      arguments                            unknown id
===========================  ===================================  ===========================
``block-job-pause``,         ``device``                           ``DeviceNotActive``:
``-resume``, ``-complete``                                        ``Block job 'X' not found``
``block-job-cancel``         ``device``, ``force`` (default off)  same
``block-job-set-speed``      ``device``, ``speed`` (int)          same
``block-job-finalize``,      ``id``                               same
``-dismiss``
``job-pause``, ``-resume``,  ``id``                               ``GenericError``:
``-cancel``, ``-complete``,                                       ``Job not found``
``-finalize``, ``-dismiss``
===========================  ===================================  ===========================

``block-job-cancel`` refuses a user-paused job unless ``force`` is set (``The block job for
device 'X' is currently paused``); ``job-cancel`` always forces. Every other refusal comes
from the job (the verb table's ``Job 'X' in state 'Y' cannot accept command verb 'Z'``,
``Job is already paused``, ``Can't resume a job that was not paused``...).

Verbs that finish jobs (cancel, finalize) wait for the completion work they set off, so the
job's events precede the reply, as in QEMU. Handlers reach the jobs as ``ctx.jobs``.
"""

from __future__ import annotations

from typing import Any

from bitback.jobs import Job, JobNotFoundError
from bitback.qmp.commands.misc import NO_ARGS
from bitback.qmp.context import QMPContext
from bitback.qmp.errors import ErrorClass, QMPError, generic
from bitback.qmp.registry import REGISTRY
from bitback.qmp.schema import BOOL, INT, STR, Member, Struct

__all__ = ["BLOCK_JOB_ARGS", "BLOCK_JOB_CANCEL_ARGS", "BLOCK_JOB_SET_SPEED_ARGS", "JOB_ARGS"]

BLOCK_JOB_ARGS = Struct("BlockJobDevice", [Member("device", STR)])
BLOCK_JOB_CANCEL_ARGS = Struct(
    "BlockJobCancel",
    [Member("device", STR), Member("force", BOOL, optional=True, default=False)],
)
BLOCK_JOB_SET_SPEED_ARGS = Struct("BlockJobSetSpeed", [Member("device", STR), Member("speed", INT)])
JOB_ARGS = Struct("JobId", [Member("id", STR)])


def _block_job(ctx: QMPContext, device: str) -> Job:
    try:
        return ctx.jobs.find_block_job(device)
    except JobNotFoundError as exc:
        raise QMPError(ErrorClass.DEVICE_NOT_ACTIVE, exc.message) from exc


@REGISTRY.command("query-jobs", NO_ARGS)
async def query_jobs(ctx: QMPContext, args: dict[str, Any]) -> object:
    return ctx.jobs.query_jobs()


@REGISTRY.command("query-block-jobs", NO_ARGS)
async def query_block_jobs(ctx: QMPContext, args: dict[str, Any]) -> object:
    return ctx.jobs.query_block_jobs()


# -- block-job-* ------------------------------------------------------------------------------
@REGISTRY.command("block-job-pause", BLOCK_JOB_ARGS)
async def block_job_pause(ctx: QMPContext, args: dict[str, Any]) -> object:
    _block_job(ctx, args["device"]).user_pause()
    return {}


@REGISTRY.command("block-job-resume", BLOCK_JOB_ARGS)
async def block_job_resume(ctx: QMPContext, args: dict[str, Any]) -> object:
    _block_job(ctx, args["device"]).user_resume()
    return {}


@REGISTRY.command("block-job-cancel", BLOCK_JOB_CANCEL_ARGS)
async def block_job_cancel(ctx: QMPContext, args: dict[str, Any]) -> object:
    device, force = args["device"], args["force"]
    job = _block_job(ctx, device)
    if job.user_paused and not force:
        raise generic(f"The block job for device '{device}' is currently paused")
    job.cancel(force)
    await ctx.jobs.settle()
    return {}


@REGISTRY.command("block-job-set-speed", BLOCK_JOB_SET_SPEED_ARGS)
async def block_job_set_speed(ctx: QMPContext, args: dict[str, Any]) -> object:
    _block_job(ctx, args["device"]).set_speed(args["speed"])
    return {}


@REGISTRY.command("block-job-complete", BLOCK_JOB_ARGS)
async def block_job_complete(ctx: QMPContext, args: dict[str, Any]) -> object:
    _block_job(ctx, args["device"]).complete()
    return {}


@REGISTRY.command("block-job-finalize", JOB_ARGS)
async def block_job_finalize(ctx: QMPContext, args: dict[str, Any]) -> object:
    _block_job(ctx, args["id"]).finalize()
    await ctx.jobs.settle()
    return {}


@REGISTRY.command("block-job-dismiss", JOB_ARGS)
async def block_job_dismiss(ctx: QMPContext, args: dict[str, Any]) -> object:
    _block_job(ctx, args["id"]).dismiss()
    return {}


# -- job-* ------------------------------------------------------------------------------------
@REGISTRY.command("job-pause", JOB_ARGS)
async def job_pause(ctx: QMPContext, args: dict[str, Any]) -> object:
    ctx.jobs.find_job(args["id"]).user_pause()
    return {}


@REGISTRY.command("job-resume", JOB_ARGS)
async def job_resume(ctx: QMPContext, args: dict[str, Any]) -> object:
    ctx.jobs.find_job(args["id"]).user_resume()
    return {}


@REGISTRY.command("job-cancel", JOB_ARGS)
async def job_cancel(ctx: QMPContext, args: dict[str, Any]) -> object:
    ctx.jobs.find_job(args["id"]).cancel(force=True)
    await ctx.jobs.settle()
    return {}


@REGISTRY.command("job-complete", JOB_ARGS)
async def job_complete(ctx: QMPContext, args: dict[str, Any]) -> object:
    ctx.jobs.find_job(args["id"]).complete()
    return {}


@REGISTRY.command("job-finalize", JOB_ARGS)
async def job_finalize(ctx: QMPContext, args: dict[str, Any]) -> object:
    ctx.jobs.find_job(args["id"]).finalize()
    await ctx.jobs.settle()
    return {}


@REGISTRY.command("job-dismiss", JOB_ARGS)
async def job_dismiss(ctx: QMPContext, args: dict[str, Any]) -> object:
    ctx.jobs.find_job(args["id"]).dismiss()
    return {}
