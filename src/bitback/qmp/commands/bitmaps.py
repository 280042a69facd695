"""``block-dirty-bitmap-*`` and ``x-debug-block-dirty-bitmap-sha256``."""

from __future__ import annotations

from typing import Any

from bitback.bitmaps import DirtyBitmap
from bitback.block.dirty_bitmaps import (
    add_bitmap,
    clear_bitmap,
    find_bitmap,
    merge_bitmaps,
    remove_bitmap,
    set_bitmap_enabled,
)
from bitback.errors import InvalidArgumentError
from bitback.qmp.context import QMPContext
from bitback.qmp.registry import REGISTRY
from bitback.qmp.schema import BOOL, STR, UINT32, Alternate, ListOf, Member, Struct

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


@REGISTRY.command("block-dirty-bitmap-add", BITMAP_ADD_ARGS)
async def bitmap_add(ctx: QMPContext, args: dict[str, Any]) -> object:
    if not args["name"]:
        raise InvalidArgumentError("Bitmap name cannot be empty")

    def run() -> None:
        node = ctx.graph.lookup_name(args["node"])
        add_bitmap(
            node,
            args["name"],
            granularity=args.get("granularity"),
            persistent=args.get("persistent", False),
            disabled=args.get("disabled", False),
            label=args["node"],
        )

    await ctx.block(run)
    return {}


@REGISTRY.command("block-dirty-bitmap-remove", BITMAP_ARGS)
async def bitmap_remove(ctx: QMPContext, args: dict[str, Any]) -> object:
    def run() -> None:
        node, bitmap = find_bitmap(ctx.graph, args["node"], args["name"])
        remove_bitmap(node, bitmap)

    await ctx.block(run)
    return {}


@REGISTRY.command("block-dirty-bitmap-clear", BITMAP_ARGS)
async def bitmap_clear(ctx: QMPContext, args: dict[str, Any]) -> object:
    def run() -> None:
        clear_bitmap(find_bitmap(ctx.graph, args["node"], args["name"])[1])

    await ctx.block(run)
    return {}


@REGISTRY.command("block-dirty-bitmap-enable", BITMAP_ARGS)
async def bitmap_enable(ctx: QMPContext, args: dict[str, Any]) -> object:
    def run() -> None:
        set_bitmap_enabled(find_bitmap(ctx.graph, args["node"], args["name"])[1], True)

    await ctx.block(run)
    return {}


@REGISTRY.command("block-dirty-bitmap-disable", BITMAP_ARGS)
async def bitmap_disable(ctx: QMPContext, args: dict[str, Any]) -> object:
    def run() -> None:
        set_bitmap_enabled(find_bitmap(ctx.graph, args["node"], args["name"])[1], False)

    await ctx.block(run)
    return {}


def resolve_sources(ctx: QMPContext, node: str, sources: list[Any]) -> list[DirtyBitmap]:
    """Merge sources: a plain name lives on ``node``; ``{node, name}`` anywhere."""
    out = []
    for src in sources:
        if isinstance(src, str):
            out.append(find_bitmap(ctx.graph, node, src)[1])
        else:
            out.append(find_bitmap(ctx.graph, src["node"], src["name"])[1])
    return out


@REGISTRY.command("block-dirty-bitmap-merge", BITMAP_MERGE_ARGS)
async def bitmap_merge(ctx: QMPContext, args: dict[str, Any]) -> object:
    def run() -> None:
        target = find_bitmap(ctx.graph, args["node"], args["target"])[1]
        merge_bitmaps(target, resolve_sources(ctx, args["node"], args["bitmaps"]))

    await ctx.block(run)
    return {}


@REGISTRY.command("x-debug-block-dirty-bitmap-sha256", BITMAP_ARGS)
async def bitmap_sha256(ctx: QMPContext, args: dict[str, Any]) -> object:
    def run() -> str:
        return find_bitmap(ctx.graph, args["node"], args["name"])[1].bits.sha256()

    return {"sha256": await ctx.block(run)}
