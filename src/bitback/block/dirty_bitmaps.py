"""Dirty bitmaps on nodes: the operations behind the ``block-dirty-bitmap-*`` commands.

The bitmap itself (:mod:`bitback.bitmaps`) knows nothing of nodes; here a bitmap is attached
to a node (newest first, as QEMU lists them), found by node and name, and changed with QEMU's
checks and messages. Operations that a transaction may have to undo return what the undo
needs (the old bits, the added bitmap), so :mod:`bitback.txn` can register it before acting.

All functions run on the I/O thread (they touch the node's bitmap list, which writes mark).
"""

from __future__ import annotations

from collections.abc import Sequence

from bitback.bitmaps import DirtyBitmap, GranuleBits, check_granularity, default_granularity
from bitback.block.graph import BlockGraph
from bitback.block.node import BlockNode
from bitback.errors import InvalidArgumentError, NotFoundError, UnsupportedFeatureError

__all__ = [
    "MAX_BITMAP_NAME",
    "add_bitmap",
    "check_removable",
    "clear_bitmap",
    "find_bitmap",
    "forget_stored_bitmap",
    "merge_bitmaps",
    "remove_bitmap",
    "set_bitmap_enabled",
]

MAX_BITMAP_NAME = 1023  # BDRV_BITMAP_MAX_NAME_SIZE


def find_bitmap(graph: BlockGraph, node: str, name: str) -> tuple[BlockNode, DirtyBitmap]:
    """``block_dirty_bitmap_lookup``: the node by device or node name, then the bitmap."""
    try:
        bs = graph.lookup_name(node)
    except NotFoundError:
        raise NotFoundError(f"Node '{node}' not found") from None
    bitmap = bs.bitmap(name)
    if bitmap is None:
        raise NotFoundError(f"Dirty bitmap '{name}' not found")
    return bs, bitmap


def add_bitmap(
    node: BlockNode,
    name: str,
    *,
    granularity: int | None = None,
    persistent: bool = False,
    disabled: bool = False,
    label: str | None = None,
) -> DirtyBitmap:
    """Create an empty bitmap on ``node``; the node's cluster size (clamped to 4k..64k)
    sets the default granularity. ``label`` names the node in messages (QEMU says the device
    name when there is one)."""
    # QEMU's order: empty name (the caller checks it before looking the node up), then
    # granularity, persistence, an existing name, a long name.
    if not name:
        raise InvalidArgumentError("Bitmap name cannot be empty")
    if granularity is None:
        granularity = default_granularity(node.cluster_size)
    else:
        check_granularity(granularity)
    if persistent:
        store = getattr(node.driver, "persistent", None)
        if store is None:
            raise UnsupportedFeatureError(
                f"Can't store persistent bitmaps to {label or node.node_name}: "
                "Operation not supported"
            )
        store.check_new(name, granularity, label or node.node_name)
    if node.bitmap(name) is not None:
        raise InvalidArgumentError(f"Bitmap already exists: {name}")
    if len(name.encode()) > MAX_BITMAP_NAME:
        raise InvalidArgumentError(f"Bitmap name too long: {name}")
    bitmap = DirtyBitmap(node.length(), granularity, name, enabled=not disabled,
                         persistent=persistent)
    node.bitmaps.insert(0, bitmap)
    return bitmap


def check_removable(bitmap: DirtyBitmap) -> None:
    """Busy or read-only bitmaps stay; inconsistent ones may go (removing is how a user
    gets rid of them)."""
    if bitmap.busy or bitmap.readonly:
        bitmap.check_usable()


def remove_bitmap(node: BlockNode, bitmap: DirtyBitmap) -> None:
    """Drop ``bitmap`` from ``node`` (after :func:`check_removable`).

    A persistent bitmap leaves the image at once, as in QEMU: a transaction that aborts
    afterwards puts the bitmap back in memory, and closing the image stores it again.
    """
    check_removable(bitmap)
    forget_stored_bitmap(node, bitmap)
    node.bitmaps.remove(bitmap)


def forget_stored_bitmap(node: BlockNode, bitmap: DirtyBitmap) -> None:
    """Take a persistent bitmap out of its image now (the in-memory one is untouched).

    If the bitmap stays in memory after all (an aborted transaction), it is still
    persistent, so closing the image stores it again.
    """
    if bitmap.persistent and bitmap.name is not None:
        store = getattr(node.driver, "persistent", None)
        if store is not None:
            store.remove(bitmap.name)


def clear_bitmap(bitmap: DirtyBitmap) -> GranuleBits:
    """Reset every bit; returns the old bits for an undo."""
    bitmap.check_usable()
    old = bitmap.bits.copy()
    bitmap.bits.clear()
    return old


def set_bitmap_enabled(bitmap: DirtyBitmap, enabled: bool) -> bool:
    """Enable or disable recording; returns the previous state. Read-only bitmaps may be
    toggled (``BDRV_BITMAP_ALLOW_RO``)."""
    bitmap.check_usable(for_write=False)
    was = bitmap.enabled
    bitmap.enabled = enabled
    return was


def merge_bitmaps(target: DirtyBitmap, sources: Sequence[DirtyBitmap]) -> GranuleBits:
    """OR every source into ``target``, all or nothing; returns the old target bits.

    Every source is checked before the target changes. Sources must cover a disk of the
    target's size; granularities may differ.
    """
    target.check_usable()
    for src in sources:
        src.check_usable(for_write=False)
        if src.size != target.size:
            raise InvalidArgumentError(
                f"Bitmaps are of different sizes (destination size is {target.size}, "
                f"source size is {src.size}) and can't be merged"
            )
    old = target.bits.copy()
    for src in sources:
        if src is not target:
            target.bits.merge(src.bits)
    return old
