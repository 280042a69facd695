"""``block-dirty-bitmap-*`` and ``x-debug-block-dirty-bitmap-sha256``."""

from __future__ import annotations

from typing import Any

from bitback.block.dirty_bitmaps import find_bitmap
from bitback.qmp.context import QMPContext
from bitback.qmp.registry import REGISTRY
from bitback.qmp.schema import BOOL, STR, UINT32, Alternate, ListOf, Member, Struct
from bitback.txn.actions import ActionEnv, run_transaction

__all__ = ["BITMAP_ADD_ARGS", "BITMAP_ARGS", "BITMAP_MERGE_ARGS"]

BITMAP_ARGS = Struct("BlockDirtyBitmap", [Member("node", STR), Member("name", STR)])

BITMAP_ADD_ARGS = Struct(
    "BlockDirtyBitmapAdd",
    [
        Member("node", STR),
        Member("name", STR),
        Member("granularity", UINT32, optional=True),
        Member("persistent", BOOL, optional=True),
        Member("disabled", BOOL, optional=True),
    ],
)

# A merge source is a bitmap name on the target's node, or {node, name} anywhere.
BITMAP_MERGE_ARGS = Struct(
    "BlockDirtyBitmapMerge",
    [
        Member("node", STR),
        Member("target", STR),
        Member("bitmaps", ListOf(Alternate("BlockDirtyBitmapOrStr", [STR, BITMAP_ARGS]))),
    ],
)


async def _one_action(ctx: QMPContext, kind: str, args: dict[str, Any]) -> object:
    """The plain bitmap commands are transactions of one action: one implementation of
    each step, its checks and its texts."""
    env = ActionEnv(graph=ctx.graph, io=ctx.io, registry=ctx.jobs)
    await run_transaction(env, [(kind, args)])
    return {}


def _register(kind: str, schema: Struct) -> None:
    async def handler(ctx: QMPContext, args: dict[str, Any]) -> object:
        return await _one_action(ctx, kind, args)

    handler.__name__ = kind.replace("-", "_")
    REGISTRY.command(kind, schema)(handler)


_register("block-dirty-bitmap-add", BITMAP_ADD_ARGS)
_register("block-dirty-bitmap-merge", BITMAP_MERGE_ARGS)
for _kind in ("remove", "clear", "enable", "disable"):
    _register(f"block-dirty-bitmap-{_kind}", BITMAP_ARGS)


@REGISTRY.command("x-debug-block-dirty-bitmap-sha256", BITMAP_ARGS)
async def bitmap_sha256(ctx: QMPContext, args: dict[str, Any]) -> object:
    def run() -> str:
        return find_bitmap(ctx.graph, args["node"], args["name"])[1].bits.sha256()

    return {"sha256": await ctx.block(run)}
