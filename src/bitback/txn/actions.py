"""The actions of QMP's ``transaction``, on plain (already validated) argument dicts.

Each action's ``prepare`` registers its undo first, then applies itself tentatively:

=========================  ===============================  ================================
action                     prepare                          abort / commit
=========================  ===============================  ================================
block-dirty-bitmap-add     add the bitmap                   remove it / -
block-dirty-bitmap-remove  check it, mark it busy           unmark / remove it
block-dirty-bitmap-clear   clear, keep the old bits         put the old bits back / -
block-dirty-bitmap-enable  enable, keep the old state       restore / -
 (and -disable)
block-dirty-bitmap-merge   merge, keep the old bits         put the old bits back / -
drive-backup,              set the backup up (its point     cancel the job (it was never
blockdev-backup            in time) and create its job      started) / start the job
abort                      fail                             -
=========================  ===============================  ================================

Only backup actions take part in ``completion-mode: grouped`` (their jobs then share one
:class:`~bitback.jobs.JobTxn`); the bitmap actions refuse it, as QEMU 7.2 does (``abort``
just fails, whatever the mode).
A lone ``drive-backup`` or ``blockdev-backup`` command is a transaction of one action.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from bitback.bitmaps import DirtyBitmap, GranuleBits
from bitback.block.dirty_bitmaps import (
    add_bitmap,
    check_removable,
    clear_bitmap,
    find_bitmap,
    forget_stored_bitmap,
    merge_bitmaps,
    remove_bitmap,
    set_bitmap_enabled,
)
from bitback.block.graph import BlockGraph
from bitback.block.iothread import IOThread
from bitback.block.node import BlockNode
from bitback.errors import InvalidArgumentError, UnsupportedFeatureError
from bitback.jobs.backup import BackupJob
from bitback.jobs.backup_setup import BackupPlan, plan_blockdev_backup, plan_drive_backup
from bitback.jobs.registry import JobRegistry
from bitback.jobs.txn import JobTxn
from bitback.txn.transaction import Transaction

__all__ = ["ACTIONS", "ActionEnv", "prepare_action"]


@dataclass
class ActionEnv:
    """What actions work with. ``group`` is the shared job group in grouped mode."""

    graph: BlockGraph
    io: IOThread
    registry: JobRegistry
    completion_mode: str = "individual"
    group: JobTxn | None = None


Action = Callable[[ActionEnv, Transaction, dict[str, Any]], Awaitable[None]]


def _individual_only(env: ActionEnv, kind: str) -> None:
    if env.completion_mode != "individual":
        raise InvalidArgumentError(
            f"Action '{kind}' does not support Transaction property completion-mode = "
            f"{env.completion_mode}"
        )


# -- dirty bitmaps ------------------------------------------------------------------------------


async def _bitmap_add(env: ActionEnv, txn: Transaction, data: dict[str, Any]) -> None:
    _individual_only(env, "block-dirty-bitmap-add")
    added: list[tuple[BlockNode, DirtyBitmap]] = []

    def undo() -> None:
        for node, bitmap in added:
            if bitmap in node.bitmaps:
                node.bitmaps.remove(bitmap)

    def run() -> None:
        if not data["name"]:
            raise InvalidArgumentError("Bitmap name cannot be empty")
        node = env.graph.lookup_name(data["node"])
        bitmap = add_bitmap(
            node,
            data["name"],
            granularity=data.get("granularity"),
            persistent=data.get("persistent", False),
            disabled=data.get("disabled", False),
            label=data["node"],
        )
        added.append((node, bitmap))

    txn.on_abort(lambda: env.io.run(undo))
    await env.io.run(run)


async def _bitmap_remove(env: ActionEnv, txn: Transaction, data: dict[str, Any]) -> None:
    _individual_only(env, "block-dirty-bitmap-remove")
    held: list[tuple[BlockNode, DirtyBitmap]] = []

    def run() -> None:
        node, bitmap = find_bitmap(env.graph, data["node"], data["name"])
        check_removable(bitmap)
        forget_stored_bitmap(node, bitmap)  # as QEMU: off the disk in prepare; see there
        bitmap.busy = True  # later actions of this transaction must not use it
        held.append((node, bitmap))

    def undo() -> None:
        for _, bitmap in held:
            bitmap.busy = False

    def commit() -> None:
        for node, bitmap in held:
            bitmap.busy = False
            if bitmap in node.bitmaps:
                remove_bitmap(node, bitmap)

    txn.on_abort(lambda: env.io.run(undo))
    txn.on_commit(lambda: env.io.run(commit))
    await env.io.run(run)


def _restore_bits(saved: list[tuple[DirtyBitmap, GranuleBits]]) -> Callable[[], None]:
    def undo() -> None:
        for bitmap, bits in saved:
            bitmap.bits.assign(bits)

    return undo


async def _bitmap_clear(env: ActionEnv, txn: Transaction, data: dict[str, Any]) -> None:
    _individual_only(env, "block-dirty-bitmap-clear")
    saved: list[tuple[DirtyBitmap, GranuleBits]] = []

    def run() -> None:
        bitmap = find_bitmap(env.graph, data["node"], data["name"])[1]
        saved.append((bitmap, clear_bitmap(bitmap)))

    txn.on_abort(lambda: env.io.run(_restore_bits(saved)))
    await env.io.run(run)


def _toggle(kind: str, enabled: bool) -> Action:
    async def action(env: ActionEnv, txn: Transaction, data: dict[str, Any]) -> None:
        _individual_only(env, kind)
        saved: list[tuple[DirtyBitmap, bool]] = []

        def run() -> None:
            bitmap = find_bitmap(env.graph, data["node"], data["name"])[1]
            saved.append((bitmap, set_bitmap_enabled(bitmap, enabled)))

        def undo() -> None:
            for bitmap, was in saved:
                bitmap.enabled = was

        txn.on_abort(lambda: env.io.run(undo))
        await env.io.run(run)

    return action


def merge_sources(graph: BlockGraph, node: str, sources: list[Any]) -> list[DirtyBitmap]:
    """Merge sources: a plain name lives on ``node``; ``{node, name}`` anywhere."""
    out = []
    for src in sources:
        if isinstance(src, str):
            out.append(find_bitmap(graph, node, src)[1])
        else:
            out.append(find_bitmap(graph, src["node"], src["name"])[1])
    return out


async def _bitmap_merge(env: ActionEnv, txn: Transaction, data: dict[str, Any]) -> None:
    _individual_only(env, "block-dirty-bitmap-merge")
    saved: list[tuple[DirtyBitmap, GranuleBits]] = []

    def run() -> None:
        # QEMU 7.2's order (block_dirty_bitmap_merge): the target is looked up; each source
        # in turn is looked up and checked (merged into an anonymous bitmap of the target's
        # size) before the next; the target's own state is checked last. So a source of
        # another size is reported before a later one that does not exist, and a missing
        # source before a busy target (found by tests/interop/test_random_programs.py).
        # merge_bitmaps checks them all again.
        target = find_bitmap(env.graph, data["node"], data["target"])[1]
        sources = []
        for spec in data["bitmaps"]:
            source = merge_sources(env.graph, data["node"], [spec])[0]
            source.check_usable(for_write=False)
            if source.size != target.size:
                raise InvalidArgumentError(
                    f"Bitmaps are of different sizes (destination size is {target.size}, "
                    f"source size is {source.size}) and can't be merged"
                )
            sources.append(source)
        target.check_usable()
        saved.append((target, merge_bitmaps(target, sources)))

    txn.on_abort(lambda: env.io.run(_restore_bits(saved)))
    await env.io.run(run)


# -- backups --------------------------------------------------------------------------------


def _backup(planner: Callable[[BlockGraph, JobRegistry, dict[str, Any]], BackupPlan]) -> Action:
    async def action(env: ActionEnv, txn: Transaction, data: dict[str, Any]) -> None:
        plans: list[BackupPlan] = []
        jobs: list[BackupJob] = []

        async def undo() -> None:
            if jobs:
                # QEMU 7.2 fills a backup's copy bitmap from its sync bitmap only when the job
                # starts; created with every bit set, it is still full in a job that never
                # started, so bitmap-mode=always gives the bitmap the whole disk (measured;
                # found by tests/interop/test_random_programs.py).
                await env.io.run(plans[0].setup.bcs.set_all)
                # Never started: cancelling runs its abort and clean-up (the bitmap gets its
                # bits back, the target is released) with created/aborting/concluded/null.
                jobs[0].cancel(force=True)
                await jobs[0].wait_finished()
            elif plans:
                await env.io.run(plans[0].undo)

        txn.on_abort(undo)
        plan = await env.io.run(planner, env.graph, env.registry, data)
        plans.append(plan)
        job = BackupJob(
            plan.job_id,
            env.registry,
            plan.setup,
            env.io,
            txn=env.group,
            auto_finalize=plan.auto_finalize,
            auto_dismiss=plan.auto_dismiss,
            speed=plan.speed,
        )
        jobs.append(job)
        txn.on_commit(job.start)

    return action


async def _abort(env: ActionEnv, txn: Transaction, data: dict[str, Any]) -> None:
    # No completion-mode check: QEMU 7.2's abort_prepare only fails, so a grouped
    # transaction reaching an abort action says "aborted", not "does not support" (measured;
    # found by tests/interop/test_random_programs.py).
    raise InvalidArgumentError("Transaction aborted using Abort action")


def _unsupported(kind: str) -> Action:
    async def action(env: ActionEnv, txn: Transaction, data: dict[str, Any]) -> None:
        raise UnsupportedFeatureError(f"Action '{kind}' is not supported by bitbackd")

    return action


ACTIONS: dict[str, Action] = {
    "abort": _abort,
    "block-dirty-bitmap-add": _bitmap_add,
    "block-dirty-bitmap-remove": _bitmap_remove,
    "block-dirty-bitmap-clear": _bitmap_clear,
    "block-dirty-bitmap-enable": _toggle("block-dirty-bitmap-enable", True),
    "block-dirty-bitmap-disable": _toggle("block-dirty-bitmap-disable", False),
    "block-dirty-bitmap-merge": _bitmap_merge,
    "drive-backup": _backup(plan_drive_backup),
    "blockdev-backup": _backup(plan_blockdev_backup),
    "blockdev-snapshot": _unsupported("blockdev-snapshot"),
    "blockdev-snapshot-sync": _unsupported("blockdev-snapshot-sync"),
    "blockdev-snapshot-internal-sync": _unsupported("blockdev-snapshot-internal-sync"),
}


async def prepare_action(
    env: ActionEnv, txn: Transaction, kind: str, data: dict[str, Any]
) -> None:
    """Prepare one action; on error the caller aborts ``txn``."""
    await ACTIONS[kind](env, txn, data)


async def run_transaction(env: ActionEnv, actions: list[tuple[str, dict[str, Any]]]) -> None:
    """Prepare every action in order; all succeed and commit, or the first error aborts
    them all (newest first) and is raised."""
    txn = Transaction()
    try:
        for kind, data in actions:
            await prepare_action(env, txn, kind, data)
    except BaseException:
        await txn.abort()
        raise
    await txn.commit()
