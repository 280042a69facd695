"""Process-level commands: versions, status, the command list, ``quit``, and HMP."""

from __future__ import annotations

from typing import Any

from bitback.block.graph import BlockGraph
from bitback.block.node import BlockNode
from bitback.errors import NotFoundError
from bitback.qmp.context import QMPContext
from bitback.qmp.hmp import HmpParseError, QemuIoRequest, parse_hmp
from bitback.qmp.registry import REGISTRY
from bitback.qmp.schema import INT, STR, Member, Struct

__all__ = ["hmp_target"]

NO_ARGS = Struct("NoArguments", [])


@REGISTRY.command("query-version", NO_ARGS)
async def query_version(ctx: QMPContext, args: dict[str, Any]) -> object:
    v = ctx.version
    return {"qemu": {"major": v.major, "minor": v.minor, "micro": v.micro}, "package": v.package}


@REGISTRY.command("query-status", NO_ARGS)
async def query_status(ctx: QMPContext, args: dict[str, Any]) -> object:
    # No guest exists: the state of an emulator started with -S and never continued.
    return {"running": False, "singlestep": False, "status": "prelaunch"}


@REGISTRY.command("query-commands", NO_ARGS)
async def query_commands(ctx: QMPContext, args: dict[str, Any]) -> object:
    names = sorted({"qmp_capabilities", *REGISTRY.names()})
    return [{"name": name} for name in names]


@REGISTRY.command("quit", NO_ARGS)
async def quit_(ctx: QMPContext, args: dict[str, Any]) -> object:
    ctx.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
    ctx.request_quit("host-qmp-quit")
    return {}


HMP_ARGS = Struct(
    "HumanMonitorCommand",
    [Member("command-line", STR), Member("cpu-index", INT, optional=True)],
)


def hmp_target(graph: BlockGraph, request: QemuIoRequest) -> BlockNode:
    """The node ``qemu-io [-d] NAME`` runs on: a device's root (by qdev id with ``-d``),
    else a device name, else a node name (a temporary backend over the node in QEMU)."""
    if request.qdev:
        for backend in graph.backends:
            if backend.device_id == request.name and backend.qdev is not None:
                # The id names the virtio-blk-pci proxy, which has no drive of its own:
                # QEMU 7.2 answers this for every virtio-blk device.
                raise NotFoundError("Device does not have a block device backend")
        raise NotFoundError(f"Device '{request.name}' not found")
    named = graph.backend(request.name)
    if named is not None:
        return named.root
    return graph.lookup(None, request.name)


def _run_hmp(ctx: QMPContext, line: str) -> str:
    graph = ctx.graph
    try:
        request = parse_hmp(line)
    except HmpParseError as exc:
        text = f"{exc}\n"
        if str(exc).startswith("qemu-io:"):
            text += 'Try "help qemu-io" for more information\n'
        return text
    if request is None:
        return ""
    try:
        node = hmp_target(graph, request)
    except NotFoundError as exc:
        return f"Error: {exc}\n"
    conflict = _write_conflict(graph, request, node)
    return ctx.run_qemu_io(node, request.command, node.discard_unmap, conflict)


def _write_conflict(graph: BlockGraph, request: QemuIoRequest, node: BlockNode) -> str | None:
    """A node reached by node name while a guest device holds it: QEMU's temporary backend
    cannot get the write permission the device does not share, so commands that write fail
    with this text (reads work)."""
    if request.qdev or graph.backend(request.name) is not None:
        return None
    holder = next((b for b in graph.backends_of(node) if b.qdev is not None), None)
    if holder is None:
        return None
    name = node.node_name
    return (
        f"Permission conflict on node '{name}': permissions 'write' are both required by an "
        f"unnamed block device (uses node '{name}' as 'root' child) and unshared by block "
        f"device '{holder.qdev}' (uses node '{name}' as 'root' child)."
    )


@REGISTRY.command("human-monitor-command", HMP_ARGS)
async def human_monitor_command(ctx: QMPContext, args: dict[str, Any]) -> object:
    """Only ``qemu-io`` exists. Its output is returned (QEMU 7.2 prints it on stdout and
    returns ""); line ends are the monitor's ``\\r\\n``."""
    output = await ctx.block(_run_hmp, ctx, args["command-line"])
    return output.replace("\r\n", "\n").replace("\n", "\r\n")
