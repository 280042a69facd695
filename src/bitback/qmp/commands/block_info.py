"""The replies of ``query-block`` and ``query-named-block-nodes``.

Shapes are QEMU 7.2's (``BlockInfo``, ``BlockDeviceInfo``, ``ImageInfo``,
``BlockDirtyInfo``) with one addition the seed-era clients need (spec 3.5 and 12): each
``query-block`` entry also carries the node's named bitmaps in a top-level ``dirty-bitmaps``
list, each with the pre-6.0 ``status`` member. Throttling members are always zero (bitbackd
has no I/O throttling); ``cache`` reports QEMU's ``-drive`` default, write-back.

Anonymous bitmaps (a job's successor) are internal and never listed, as
``docs/interop/bitmaps.rst`` asks.
"""

from __future__ import annotations

from typing import Any

from bitback.block.graph import BlockBackend, BlockGraph
from bitback.block.info import image_info
from bitback.block.node import BlockNode

__all__ = ["block_info", "device_info", "named_nodes_info"]


def _image(node: BlockNode, *, chain: bool) -> dict[str, Any]:
    info = image_info(node.driver, node.filename)
    if node.drv == "file":
        info.pop("cluster-size", None)
    backing = node.backing
    if chain and isinstance(backing, BlockNode):
        info["backing-image"] = _image(backing, chain=True)
    return info


def _depth(node: BlockNode) -> int:
    depth = 0
    backing = node.backing
    while isinstance(backing, BlockNode):
        depth += 1
        backing = backing.backing
    return depth


def bitmaps_info(node: BlockNode) -> list[dict[str, object]]:
    """The node's named bitmaps, newest first."""
    return [bm.info() for bm in node.bitmaps if bm.name is not None]


def device_info(node: BlockNode, *, chain: bool = True) -> dict[str, Any]:
    """``BlockDeviceInfo`` of one node (``inserted`` in query-block)."""
    info: dict[str, Any] = {
        "file": node.filename,
        "node-name": node.node_name,
        "ro": node.read_only,
        "drv": node.drv,
    }
    backing = node.backing
    if isinstance(backing, BlockNode):
        info["backing_file"] = backing.filename
    info["backing_file_depth"] = _depth(node)
    info["encrypted"] = False
    info["detect_zeroes"] = "off"
    for key in ("bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"):
        info[key] = 0
    info["image"] = _image(node, chain=chain)
    info["cache"] = {"writeback": True, "direct": False, "no-flush": False}
    info["write_threshold"] = 0
    bitmaps = bitmaps_info(node)
    if bitmaps:
        info["dirty-bitmaps"] = bitmaps
    return info


def _backend_info(backend: BlockBackend) -> dict[str, Any]:
    node = backend.root
    entry: dict[str, Any] = {"device": backend.name}
    if backend.qdev is not None:
        entry["qdev"] = backend.qdev
    entry["type"] = "unknown"
    entry["removable"] = False
    entry["locked"] = False
    entry["inserted"] = device_info(node)
    if backend.qdev is not None:
        entry["io-status"] = "ok"
    bitmaps = bitmaps_info(node)
    if bitmaps:
        entry["dirty-bitmaps"] = bitmaps  # the seed-era place (removed from QEMU in 6.0)
    return entry


def block_info(graph: BlockGraph) -> list[dict[str, Any]]:
    """``query-block``: every backend that has a name or a guest device."""
    return [_backend_info(b) for b in graph.backends if b.name or b.qdev is not None]


def named_nodes_info(graph: BlockGraph, *, flat: bool = False) -> list[dict[str, Any]]:
    """``query-named-block-nodes``: every node, newest first."""
    return [device_info(node, chain=not flat) for node in reversed(graph.nodes.values())]
