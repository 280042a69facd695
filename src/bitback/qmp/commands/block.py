"""Graph commands: blockdev-add/-del, query-block, query-named-block-nodes, block_resize,
and the virtio-blk front ends of device_add/device_del."""

from __future__ import annotations

import contextlib
import sys
from typing import Any

from bitback.block.graph import BlockBackend, BlockGraph, GraphError
from bitback.block.node import BlockNode
from bitback.errors import InvalidArgumentError
from bitback.qmp.commands.block_info import block_info, named_nodes_info
from bitback.qmp.commands.blockdev_schema import BLOCKDEV_OPTIONS, refuse_unsupported_driver
from bitback.qmp.context import QMPContext
from bitback.qmp.errors import QMPError
from bitback.qmp.registry import REGISTRY
from bitback.qmp.schema import BOOL, INT, STR, Member, Struct

__all__ = ["VIRTIO_BLK_DRIVERS", "attach_device", "open_blockdev"]

VIRTIO_BLK_DRIVERS = ("virtio-blk", "virtio-blk-pci", "virtio-blk-device")


def open_blockdev(graph: BlockGraph, opts: dict[str, Any]) -> BlockNode:
    """blockdev-add: the root must be named; ``discard=unmap`` lets discards through."""
    if "node-name" not in opts:
        raise InvalidArgumentError("'node-name' must be specified for the root node")
    return graph.add_blockdev(opts)


@REGISTRY.command("blockdev-add", BLOCKDEV_OPTIONS, precheck=refuse_unsupported_driver)
async def blockdev_add(ctx: QMPContext, args: dict[str, Any]) -> object:
    await ctx.block(open_blockdev, ctx.graph, args)
    return {}


@REGISTRY.command("blockdev-del", Struct("BlockdevDel", [Member("node-name", STR)]))
async def blockdev_del(ctx: QMPContext, args: dict[str, Any]) -> object:
    # A failure to flush while closing does not keep the node (QEMU reports it on stderr
    # and deletes the node all the same).
    for exc in await ctx.block(ctx.graph.delete_blockdev, args["node-name"]):
        print(f"bitbackd: closing {args['node-name']}: {exc}", file=sys.stderr)
    return {}


@REGISTRY.command("query-block", Struct("QueryBlock", []))
async def query_block(ctx: QMPContext, args: dict[str, Any]) -> object:
    return await ctx.block(block_info, ctx.graph)


@REGISTRY.command(
    "query-named-block-nodes",
    Struct("QueryNamedBlockNodes", [Member("flat", BOOL, optional=True)]),
)
async def query_named_block_nodes(ctx: QMPContext, args: dict[str, Any]) -> object:
    return await ctx.block(named_nodes_info, ctx.graph, flat=bool(args.get("flat", False)))


def resize(graph: BlockGraph, device: str | None, node_name: str | None, size: int) -> None:
    """block_resize: grow or shrink a root node; its bitmaps follow."""
    node = graph.lookup(device, node_name)
    if size < 0:
        raise InvalidArgumentError("Parameter 'size' expects a >0 size")
    parents = [p for p in graph.nodes.values() if any(c is node for _, c in p.children())]
    if parents:
        role = next(r for r, c in parents[0].children() if c is node)
        raise GraphError(
            f"Permission conflict on node '{node.node_name}': permissions 'resize' are both "
            f"required by an unnamed block device (uses node '{node.node_name}' as 'root' "
            f"child) and unshared by node '{parents[0].node_name}' (uses node "
            f"'{node.node_name}' as '{role}' child)."
        )
    if node.users:
        raise GraphError(f"Node '{node.node_name}' is busy: {node.users[0]}")
    node.truncate(size, shrink=True)


@REGISTRY.command(
    "block_resize",
    Struct(
        "BlockResize",
        [
            Member("device", STR, optional=True),
            Member("node-name", STR, optional=True),
            Member("size", INT),
        ],
    ),
)
async def block_resize(ctx: QMPContext, args: dict[str, Any]) -> object:
    await ctx.block(resize, ctx.graph, args.get("device"), args.get("node-name"), args["size"])
    return {}


# -- front ends -----------------------------------------------------------------------------


def _device_ids(graph: BlockGraph) -> set[str]:
    return {b.device_id for b in graph.backends if b.device_id is not None}


def attach_device(graph: BlockGraph, driver: str, device_id: str | None, drive: str) -> None:
    """Attach a virtio-blk front end to device or node ``drive``.

    Realizing the device reads the first sector once (QEMU's geometry guess): blkdebug
    scripts count that read (spec 3.9), so it is done here, through the root node.
    """
    if driver not in VIRTIO_BLK_DRIVERS:
        # bitbackd has no other device models (it runs no guest).
        raise InvalidArgumentError(f"'{driver}' is not a valid device model name")
    if device_id is not None and device_id in _device_ids(graph):
        raise InvalidArgumentError(f"Duplicate device ID '{device_id}'")
    if device_id is None:
        graph.anon_devices += 1
        qdev = f"/machine/peripheral-anon/device[{graph.anon_devices - 1}]/virtio-backend"
    else:
        qdev = f"/machine/peripheral/{device_id}/virtio-backend"
    backend = graph.backend(drive)
    if backend is not None:
        if backend.qdev is not None:
            if backend.auto_attached:
                raise InvalidArgumentError(
                    f"Drive '{drive}' is already in use because it has been automatically "
                    "connected to another device (did you need 'if=none' in the drive "
                    "options?)"
                )
            raise InvalidArgumentError(f"Drive '{drive}' is already in use by another device")
        backend.qdev, backend.device_id = qdev, device_id
        node = backend.root
    else:
        node_or_none = graph.nodes.get(drive)
        if node_or_none is None:
            raise InvalidArgumentError(
                f"Property 'virtio-blk-device.drive' can't find value '{drive}'"
            )
        node = node_or_none
        holder = next((b for b in graph.backends_of(node) if b.qdev is not None), None)
        if holder is not None:
            raise InvalidArgumentError(
                f"Permission conflict on node '{node.node_name}': permissions 'write' are both "
                f"required by block device '{holder.qdev}' (uses node '{node.node_name}' as "
                f"'root' child) and unshared by block device '{qdev}' (uses node "
                f"'{node.node_name}' as 'root' child)."
            )
        node.retain()
        graph.add_backend(BlockBackend("", node, qdev=qdev, device_id=device_id))
    with contextlib.suppress(Exception):  # QEMU ignores a failed geometry guess
        node.pread(0, min(512, node.length()))


def detach_device(graph: BlockGraph, device_id: str) -> str:
    """Remove the front end ``device_id``; returns its QOM path. An anonymous backend goes
    with it; a named drive stays, unattached."""
    for backend in graph.backends:
        if backend.device_id == device_id and backend.qdev is not None:
            qdev = backend.qdev
            if backend.name:
                backend.qdev = backend.device_id = None
                backend.auto_attached = False
            else:
                graph.remove_backend(backend)
            return qdev
    raise QMPError("DeviceNotFound", f"Device '{device_id}' not found")


@REGISTRY.command(
    "device_add",
    Struct(
        "DeviceAdd",
        [
            Member("driver", STR),
            Member("bus", STR, optional=True),
            Member("id", STR, optional=True),
            Member("drive", STR, optional=True),
        ],
    ),
)
async def device_add(ctx: QMPContext, args: dict[str, Any]) -> object:
    if args["driver"] not in VIRTIO_BLK_DRIVERS:
        raise InvalidArgumentError(f"'{args['driver']}' is not a valid device model name")
    if "drive" not in args:
        raise InvalidArgumentError("drive property not set")
    await ctx.block(attach_device, ctx.graph, args["driver"], args.get("id"), args["drive"])
    return {}


@REGISTRY.command("device_del", Struct("DeviceDel", [Member("id", STR)]))
async def device_del(ctx: QMPContext, args: dict[str, Any]) -> object:
    """No guest has to agree: the unplug completes at once (QEMU under -S waits forever for
    the guest), with the two DEVICE_DELETED events QEMU sends for a virtio-blk-pci device."""
    device_id = args["id"]
    qdev = await ctx.block(detach_device, ctx.graph, device_id)
    ctx.emit("DEVICE_DELETED", {"path": qdev})
    ctx.emit("DEVICE_DELETED", {"device": device_id, "path": qdev.rsplit("/", 1)[0]})
    return {}

