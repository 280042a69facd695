"""``drive-backup``, ``blockdev-backup`` and ``transaction``.

A lone backup command is a transaction of one action, as in QEMU (``blockdev_do_action``):
the same checks, the same point-in-time step, the same job start.
"""

from __future__ import annotations

from typing import Any

from bitback.jobs.txn import JobTxn
from bitback.qmp.commands.bitmaps import BITMAP_ADD_ARGS, BITMAP_ARGS, BITMAP_MERGE_ARGS
from bitback.qmp.context import QMPContext
from bitback.qmp.registry import REGISTRY
from bitback.qmp.schema import ANY, BOOL, INT, STR, Enum, ListOf, Member, Struct, Union
from bitback.txn.actions import ActionEnv, run_transaction

__all__ = ["BLOCKDEV_BACKUP_ARGS", "DRIVE_BACKUP_ARGS", "TRANSACTION_ARGS"]


def _opt(name: str, t: Any) -> Member:
    return Member(name, t, optional=True)


_ON_ERROR = Enum("BlockdevOnError", ["report", "ignore", "enospc", "stop", "auto"])

BACKUP_COMMON = Struct(
    "BackupCommon",
    [
        _opt("job-id", STR),
        Member("device", STR),
        Member("sync", Enum("MirrorSyncMode", ["top", "full", "none", "incremental", "bitmap"])),
        _opt("speed", INT),
        _opt("bitmap", STR),
        _opt("bitmap-mode", Enum("BitmapSyncMode", ["on-success", "never", "always"])),
        _opt("compress", BOOL),
        _opt("on-source-error", _ON_ERROR),
        _opt("on-target-error", _ON_ERROR),
        _opt("auto-finalize", BOOL),
        _opt("auto-dismiss", BOOL),
        _opt("filter-node-name", STR),
        _opt(
            "x-perf",
            Struct(
                "BackupPerf",
                [_opt("use-copy-range", BOOL), _opt("max-workers", INT), _opt("max-chunk", INT)],
            ),
        ),
    ],
)

DRIVE_BACKUP_ARGS = Struct(
    "DriveBackup",
    [
        Member("target", STR),
        _opt("format", STR),
        _opt("mode", Enum("NewImageMode", ["existing", "absolute-paths"])),
    ],
    base=BACKUP_COMMON,
)

BLOCKDEV_BACKUP_ARGS = Struct("BlockdevBackup", [Member("target", STR)], base=BACKUP_COMMON)

_ACTION_DATA: dict[str, Struct] = {
    "abort": Struct("Abort", []),
    "block-dirty-bitmap-add": BITMAP_ADD_ARGS,
    "block-dirty-bitmap-remove": BITMAP_ARGS,
    "block-dirty-bitmap-clear": BITMAP_ARGS,
    "block-dirty-bitmap-enable": BITMAP_ARGS,
    "block-dirty-bitmap-disable": BITMAP_ARGS,
    "block-dirty-bitmap-merge": BITMAP_MERGE_ARGS,
    "blockdev-backup": BLOCKDEV_BACKUP_ARGS,
    "drive-backup": DRIVE_BACKUP_ARGS,
}
# Snapshot actions exist in QEMU's enum; bitbackd refuses them by name when they run.
_SNAPSHOTS = ("blockdev-snapshot", "blockdev-snapshot-internal-sync", "blockdev-snapshot-sync")

TRANSACTION_ACTION = Union(
    "TransactionAction",
    [Member("type", Enum("TransactionActionKind", [*sorted(_ACTION_DATA), *_SNAPSHOTS]))],
    "type",
    {
        **{
            kind: Struct(f"{data.name}Wrapper", [Member("data", data)])
            for kind, data in _ACTION_DATA.items()
        },
        **{kind: Struct("SnapshotWrapper", [Member("data", ANY)]) for kind in _SNAPSHOTS},
    },
)

TRANSACTION_ARGS = Struct(
    "Transaction",
    [
        Member("actions", ListOf(TRANSACTION_ACTION)),
        _opt(
            "properties",
            Struct(
                "TransactionProperties",
                [_opt("completion-mode", Enum("ActionCompletionMode", ["individual", "grouped"]))],
            ),
        ),
    ],
)


def _env(ctx: QMPContext, mode: str = "individual") -> ActionEnv:
    return ActionEnv(
        graph=ctx.graph,
        io=ctx.io,
        registry=ctx.jobs,
        completion_mode=mode,
        group=JobTxn() if mode == "grouped" else None,
    )


@REGISTRY.command("drive-backup", DRIVE_BACKUP_ARGS)
async def drive_backup(ctx: QMPContext, args: dict[str, Any]) -> object:
    await run_transaction(_env(ctx), [("drive-backup", args)])
    return {}


@REGISTRY.command("blockdev-backup", BLOCKDEV_BACKUP_ARGS)
async def blockdev_backup(ctx: QMPContext, args: dict[str, Any]) -> object:
    await run_transaction(_env(ctx), [("blockdev-backup", args)])
    return {}


@REGISTRY.command("transaction", TRANSACTION_ARGS)
async def transaction(ctx: QMPContext, args: dict[str, Any]) -> object:
    mode = args.get("properties", {}).get("completion-mode", "individual")
    actions = [(a["type"], a.get("data", {})) for a in args["actions"]]
    await run_transaction(_env(ctx, mode), actions)
    return {}
