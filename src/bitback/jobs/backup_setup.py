"""Setting a backup up: the checks of ``drive-backup`` / ``blockdev-backup`` and the one step
that fixes the backup's point in time.

Everything here runs on the I/O thread, inside one QMP command (or one transaction), so no
guest write can come between the checks and the freeze. All checks come first; only when
every one passed is anything changed (a target file created, a bitmap frozen, the source
guarded), so a refused backup leaves nothing behind but, as in QEMU, a target file that
``mode=absolute-paths`` created.

The checks and their texts follow QEMU 7.2 (``blockdev.c`` ``do_backup_common``,
``block/backup.c`` ``backup_job_create``); ``incremental`` is turned into ``bitmap`` with
bitmap-mode ``on-success`` there, as QEMU does.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bitback.block.drivers.qcow2.create import create_qcow2
from bitback.block.graph import BlockGraph
from bitback.block.node import BlockNode
from bitback.copy import BlockCopyState, CopyBeforeWrite, job_cluster_size
from bitback.errors import BitbackError, InvalidArgumentError, NotFoundError
from bitback.jobs.backup import BACKUP_SOURCE_USE, BackupSetup
from bitback.jobs.registry import JobRegistry
from bitback.jobs.status import check_job_id

__all__ = ["BackupPlan", "plan_blockdev_backup", "plan_drive_backup"]

BACKUP_TARGET_USE = "block device is in use by block job: backup"


@dataclass
class BackupPlan:
    """A backup ready to become a job: its id, what it holds, and the job options."""

    job_id: str
    setup: BackupSetup
    speed: int
    auto_finalize: bool
    auto_dismiss: bool

    def undo(self) -> None:
        """Give everything back (a transaction aborted before the job existed)."""
        self.setup.finish_bitmap(success=False)
        self.setup.release()


def device_or_node_name(graph: BlockGraph, node: BlockNode) -> str:
    """QEMU's ``bdrv_get_device_or_node_name``."""
    backend = next((b for b in graph.backends_of(node) if b.name), None)
    return backend.name if backend is not None else node.node_name


def _default_job_id(graph: BlockGraph, device: str, args: dict[str, Any]) -> str:
    """The job id: given, else the device name; a bare node name gives QEMU's ''."""
    if "job-id" in args:
        return str(args["job-id"])
    return device if graph.backend(device) is not None else ""


def _check_bitmap_args(source: BlockNode, args: dict[str, Any]) -> tuple[str, Any, str | None]:
    """``do_backup_common``'s bitmap rules; returns (sync, bitmap, bitmap-mode)."""
    sync = args["sync"]
    has_mode = "bitmap-mode" in args
    mode = args.get("bitmap-mode")
    if sync in ("bitmap", "incremental") and "bitmap" not in args:
        raise InvalidArgumentError(f"must provide a valid bitmap name for '{sync}' sync mode")
    if sync == "incremental":
        if has_mode and mode != "on-success":
            raise InvalidArgumentError(
                "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'"
            )
        sync, mode, has_mode = "bitmap", "on-success", True
    bitmap = None
    if "bitmap" in args:
        bitmap = source.bitmap(args["bitmap"])
        if bitmap is None:
            raise NotFoundError(f"Bitmap '{args['bitmap']}' could not be found")
        if not has_mode:
            raise InvalidArgumentError("Bitmap sync mode must be given when providing a bitmap")
        bitmap.check_usable(for_write=False)
        if sync == "none":
            raise InvalidArgumentError(
                "sync mode 'none' does not produce meaningful bitmap outputs"
            )
        if mode == "never" and sync != "bitmap":
            raise InvalidArgumentError(
                f"Bitmap sync mode 'never' has no meaningful effect when combined with sync "
                f"mode '{sync}'"
            )
    elif has_mode:
        raise InvalidArgumentError("Cannot specify bitmap sync mode without a bitmap")
    return sync, bitmap, mode


def _plan(
    graph: BlockGraph,
    registry: JobRegistry,
    source: BlockNode,
    target: BlockNode,
    args: dict[str, Any],
    job_id: str,
    release_target: Callable[[], list[BitbackError]],
) -> BackupPlan:
    """Check everything, then freeze: the common part of both commands."""
    speed = int(args.get("speed", 0))
    if speed < 0:
        raise InvalidArgumentError("Parameter 'speed' expects a non-negative value")
    sync, bitmap, mode = _check_bitmap_args(source, args)
    if source is target:
        raise InvalidArgumentError("Source and target cannot be the same")
    compress = bool(args.get("compress", False))
    if compress and not hasattr(target.driver, "write_compressed"):
        raise InvalidArgumentError(
            f"Compression is not supported for this drive {device_or_node_name(graph, target)}"
        )
    for node in (source, target):
        if node.users:
            raise InvalidArgumentError(
                f"Node '{device_or_node_name(graph, node)}' is busy: {node.users[0]}"
            )
    if bitmap is not None and mode != "never":
        bitmap.check_usable()
    if source.length() != target.length():
        raise InvalidArgumentError("Source and target image have different sizes")
    cluster_size = job_cluster_size(target)
    check_job_id(job_id)
    if registry.get(job_id) is not None:
        raise InvalidArgumentError(f"Job ID '{job_id}' already in use")

    # -- the point in time: nothing above changed anything -----------------------------------
    bcs = BlockCopyState(
        source, target, cluster_size=cluster_size, skip_unallocated=sync == "top",
        compress=compress,
    )
    successor = None
    if bitmap is not None:
        if sync == "bitmap":
            bcs.set_from(bitmap.bits)
        else:
            bcs.set_all()
        successor = bitmap.create_successor()
        source.bitmaps.insert(0, successor)
    else:
        bcs.set_all()
    cbw = CopyBeforeWrite(source, bcs)
    cbw.attach()
    source.users.append(BACKUP_SOURCE_USE)
    target.users.append(BACKUP_TARGET_USE)

    def release() -> list[BitbackError]:
        if BACKUP_TARGET_USE in target.users:
            target.users.remove(BACKUP_TARGET_USE)
        return release_target()

    setup = BackupSetup(
        source=source,
        target=target,
        sync=sync,
        bcs=bcs,
        cbw=cbw,
        bitmap=bitmap,
        bitmap_mode=mode,
        successor=successor,
        on_source_error=args.get("on-source-error", "report"),
        on_target_error=args.get("on-target-error", "report"),
        release_target=release,
    )
    return BackupPlan(
        job_id=job_id,
        setup=setup,
        speed=speed,
        auto_finalize=bool(args.get("auto-finalize", True)),
        auto_dismiss=bool(args.get("auto-dismiss", True)),
    )


def _create_target(source: BlockNode, path: str, fmt: str, sync: str) -> bool:
    """``mode=absolute-paths``: a new image of the source's size; its backing is the
    source's backing file for ``top``, the source itself for ``none``, else nothing.
    Returns whether the new image reads as zeros everywhere (no backing file)."""
    size = source.length()
    backing_file = backing_fmt = None
    if sync == "top" and isinstance(source.backing, BlockNode):
        backing_file, backing_fmt = source.backing.filename, source.backing.drv
    elif sync == "none":
        backing_file, backing_fmt = source.filename, source.drv
    try:
        if fmt == "qcow2":
            create_qcow2(path, size, backing_file=backing_file, backing_fmt=backing_fmt)
        else:
            with open(path, "wb") as f:
                f.truncate(size)
    except OSError as exc:
        raise NotFoundError(
            f"Could not create '{path}': {os.strerror(exc.errno or 0)}", path=path
        ) from exc
    return backing_file is None


def plan_drive_backup(graph: BlockGraph, registry: JobRegistry, args: dict[str, Any]) -> BackupPlan:
    """``drive-backup``: the target is a file, created (``absolute-paths``) or opened
    (``existing``) here and closed when the job ends."""
    device = args["device"]
    source = graph.lookup(device, device)
    # QEMU 7.2's "early check to avoid creating target": a busy source is refused before the
    # target is made and before any bitmap check (found by test_random_programs.py).
    if source.users:
        raise InvalidArgumentError(
            f"Node '{device_or_node_name(graph, source)}' is busy: {source.users[0]}"
        )
    job_id = _default_job_id(graph, device, args)
    mode = args.get("mode", "absolute-paths")
    sync = args["sync"]
    if sync == "top" and source.backing is None:
        args = {**args, "sync": "full"}
        sync = "full"
    path = args["target"]
    fmt = args.get("format")
    if fmt is None and mode != "existing":
        fmt = source.drv
    if fmt not in (None, "qcow2", "raw"):
        raise InvalidArgumentError(f"Unknown driver '{fmt}'")
    fresh = False
    if mode == "absolute-paths":
        assert fmt is not None
        fresh = _create_target(source, path, fmt, sync)
    opts: dict[str, Any] = {"driver": fmt, "file": {"driver": "file", "filename": path}}
    if fmt is None:
        from bitback.block.drivers.file import FileDriver
        from bitback.block.open import probe_format

        with FileDriver(path, read_only=True) as probe:
            opts["driver"] = probe_format(probe)
    if sync == "none" and opts["driver"] == "qcow2":
        opts["backing"] = source.node_name  # reads of uncopied clusters fall through
    target = graph.add_blockdev(opts, monitor_owned=False)

    def release_target() -> list[BitbackError]:
        return graph.release_node(target)

    try:
        plan = _plan(graph, registry, source, target, args, job_id, release_target)
    except BaseException:
        graph.release_node(target)
        raise
    plan.setup.bcs.target_zeroed = fresh
    return plan


def plan_blockdev_backup(
    graph: BlockGraph, registry: JobRegistry, args: dict[str, Any]
) -> BackupPlan:
    """``blockdev-backup``: the target is an existing node; it is flushed, not closed."""
    device = args["device"]
    source = graph.lookup(device, device)
    target = graph.lookup(args["target"], args["target"])
    job_id = _default_job_id(graph, device, args)
    if args["sync"] == "top" and source.backing is None:
        args = {**args, "sync": "full"}

    def release_target() -> list[BitbackError]:
        return []

    return _plan(graph, registry, source, target, args, job_id, release_target)
