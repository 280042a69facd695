"""The block graph: named nodes, the devices (block backends) above them, and how options
become nodes.

Terms, as in QEMU:

* a **node** (:class:`BlockNode`) is one driver instance; its ``node-name`` is given by the
  user or invented (``#block<N>``);
* a **backend** (:class:`BlockBackend`) is what a guest device or ``-drive`` holds: a root
  node plus a device name (``drive0``; empty for an anonymous backend made by
  ``device_add`` on a bare node) and the front end's qdev path;
* **lookup** follows ``bdrv_lookup_bs``: a name is tried as a device name first, then as a
  node name, so ``drive0`` reaches the root node of device ``drive0``.

Options arrive already validated (QMP schema or command line) as dictionaries keyed by QAPI
member names. Children given as dictionaries become new nodes; children given as strings
refer to existing nodes, which then gain a parent. Backing files named in a qcow2 header are
opened read-only, relative names resolved against the image's directory, as QEMU does.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from bitback.block.driver import BlockDriver
from bitback.block.drivers.blkdebug import BlkdebugDriver, rules_from_options
from bitback.block.drivers.file import FileDriver
from bitback.block.drivers.null import NullDriver
from bitback.block.drivers.raw import RawDriver
from bitback.block.node import BlockNode
from bitback.block.open import (
    MAX_CHAIN_DEPTH,
    probe_format,
    qcow2_dirty,
    repair_dirty,
    resolve_backing,
)
from bitback.errors import (
    BitbackError,
    ImageFormatError,
    InvalidArgumentError,
    NotFoundError,
    UnsupportedFeatureError,
)

__all__ = ["DRIVERS", "BlockBackend", "BlockGraph", "GraphError", "check_node_name"]

DRIVERS = ("blkdebug", "file", "null-co", "qcow2", "raw")

_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]*\Z")
MAX_NODE_NAME = 31


class GraphError(InvalidArgumentError):
    """A graph operation was refused (duplicate name, node in use, unknown node)."""


def check_node_name(name: str) -> None:
    """QEMU's rules for user-given node names (``bdrv_assign_node_name``)."""
    if not _NAME_RE.match(name):
        raise GraphError(f"Invalid node-name: '{name}'")
    if len(name) > MAX_NODE_NAME:
        raise GraphError("Node name too long")


def _prefixed(exc: BitbackError, prefix: str) -> BitbackError:
    """``exc`` with ``prefix`` before its message (QEMU's ``error_prepend``); class, errno
    and fields stay, so callers can still tell what failed."""
    exc.message = prefix + exc.message
    exc.args = (exc.message,)
    return exc


def _repair_if_dirty(file_opts: Any) -> None:
    """A qcow2 image on a plain file left dirty by a writer using lazy refcounts gets its
    refcounts rebuilt before it is opened read-write, as QEMU does."""
    if not (isinstance(file_opts, dict) and file_opts.get("driver") == "file"):
        return
    filename = file_opts.get("filename")
    if not isinstance(filename, str):
        return
    with FileDriver(filename, read_only=True) as probe:
        dirty = qcow2_dirty(probe)
    if dirty:
        repair_dirty(filename)


@dataclass
class BlockBackend:
    """A device's view of a root node. ``name`` is empty for anonymous backends."""

    name: str
    root: BlockNode
    qdev: str | None = None  # the guest device's QOM path, when one is attached
    device_id: str | None = None  # the ``id`` of that device (``-device``/``device_add``)
    auto_attached: bool = False  # ``-drive if=virtio`` made the device itself
    discard: bool = False  # ``discard=unmap``; HMP qemu-io drops discards otherwise
    options: dict[str, Any] = field(default_factory=dict)


class BlockGraph:
    """All nodes and backends of one daemon."""

    def __init__(self) -> None:
        self.nodes: dict[str, BlockNode] = {}
        self.backends: list[BlockBackend] = []
        self.monitor_owned: dict[str, BlockNode] = {}  # nodes added by blockdev-add
        self._counter = 0
        self.anon_devices = 0  # numbering of front ends created without an id

    # -- lookup ---------------------------------------------------------------------------
    def backend(self, name: str) -> BlockBackend | None:
        """The backend with device name ``name`` (never an anonymous one)."""
        if not name:
            return None
        return next((b for b in self.backends if b.name == name), None)

    def lookup(self, device: str | None, node_name: str | None) -> BlockNode:
        """Device name first, then node name (``bdrv_lookup_bs``)."""
        if device is not None:
            backend = self.backend(device)
            if backend is not None:
                return backend.root
        if node_name is not None and node_name in self.nodes:
            return self.nodes[node_name]
        raise NotFoundError(
            f"Cannot find device='{device or ''}' nor node-name='{node_name or ''}'"
        )

    def lookup_name(self, name: str) -> BlockNode:
        """One name that may be a device or a node (the ``node`` argument of bitmap
        commands)."""
        return self.lookup(name, name)

    def backends_of(self, node: BlockNode) -> Iterator[BlockBackend]:
        return (b for b in self.backends if b.root is node)

    # -- building nodes -------------------------------------------------------------------
    def _auto_name(self) -> str:
        # QEMU's id_generate: a counter and two random digits, so that nobody relies on the
        # exact name of a node they did not name.
        name = f"#block{self._counter}{random.randrange(100):02d}"
        self._counter += 1
        return name

    def _register(self, driver: BlockDriver, name: str | None) -> BlockNode:
        if name is not None and name in self.nodes:
            # A child opened first under the same name (``node-name`` given twice in one
            # tree): the names were unique when checked, not any more.
            driver.close()
            raise GraphError(f"Duplicate nodes with node-name='{name}'")
        node = BlockNode(driver, name or self._auto_name(), auto_named=name is None)
        self.nodes[node.node_name] = node
        return node

    def _check_new_name(self, name: str) -> None:
        check_node_name(name)
        if name in self.nodes:
            raise GraphError(f"Duplicate nodes with node-name='{name}'")
        if self.backend(name) is not None:
            raise GraphError(f"node-name={name} is conflicting with a device id")

    def _child(
        self, ref: Any, role: str, *, read_only: bool, created: list[BlockNode]
    ) -> BlockNode:
        """Open or reference a child given as options (dict) or as a node name (str)."""
        if isinstance(ref, str):
            node = self.nodes.get(ref)
            if node is None:
                raise NotFoundError(f"Cannot find device='{ref}' nor node-name='{ref}'")
            node.retain()
            return node
        opts = dict(ref)
        opts.setdefault("read-only", read_only)
        return self._open(opts, created)

    def _open(self, opts: dict[str, Any], created: list[BlockNode], depth: int = 0) -> BlockNode:
        name = opts.get("node-name")
        if name is not None:
            self._check_new_name(name)
        read_only = bool(opts.get("read-only", False))
        driver = opts["driver"]
        drv: BlockDriver
        if driver == "file":
            if not opts["filename"]:
                raise InvalidArgumentError("The 'file' block driver requires a file name")
            drv = FileDriver(opts["filename"], read_only=read_only)
        elif driver == "null-co":
            drv = NullDriver(
                opts.get("size", 1 << 30),
                read_zeroes=bool(opts.get("read-zeroes", False)),
                read_only=read_only,
            )
        elif driver == "blkdebug":
            unsupported = sorted(set(opts) & {"config", "align", "max-transfer",
                                              "opt-write-zero", "max-write-zero",
                                              "opt-discard", "max-discard"})
            if unsupported:
                raise UnsupportedFeatureError(
                    f"blkdebug option '{unsupported[0]}' is not supported by bitbackd"
                )
            image = self._child(opts["image"], "image", read_only=read_only, created=created)
            errors, states = rules_from_options(opts)
            drv = BlkdebugDriver(image, errors, states, read_only=read_only)
        elif driver in ("raw", "qcow2"):
            if driver == "qcow2" and not read_only:
                _repair_if_dirty(opts["file"])
            file = self._child(opts["file"], "file", read_only=read_only, created=created)
            drv = self._format(driver, file, opts, read_only, created, depth)
        else:
            raise InvalidArgumentError(f"Driver '{driver}' is not supported by bitbackd")
        node = self._register(drv, name)
        node.discard_unmap = opts.get("discard") == "unmap"
        created.append(node)
        return node

    def _format(
        self,
        driver: str,
        file: BlockNode,
        opts: dict[str, Any],
        read_only: bool,
        created: list[BlockNode],
        depth: int,
    ) -> BlockDriver:
        try:
            if driver == "raw":
                if "offset" in opts or "size" in opts:
                    raise UnsupportedFeatureError("raw 'offset'/'size' are not supported")
                return RawDriver(file, read_only=read_only)
            from bitback.block.drivers.qcow2.driver import Qcow2Driver

            if "data-file" in opts or "encrypt" in opts:
                raise UnsupportedFeatureError("qcow2 external data files and encryption "
                                              "are not supported")
            if not read_only and qcow2_dirty(file):
                # Only images on plain files are repaired (above); anything else would be
                # written with refcounts that may be too low.
                raise UnsupportedFeatureError(
                    f"'{file.filename}' was left dirty (lazy refcounts) and cannot be repaired "
                    "through this node; run 'bitback-img check -r all' on it first"
                )
            qcow2 = Qcow2Driver(file, read_only=read_only)
            try:
                qcow2.persistent.bitmaps  # noqa: B018 - load now, so a bad bitmap fails the open
            except BaseException:
                qcow2.close()
                raise
        except BaseException:
            file.close()
            raise
        try:
            self._open_backing(qcow2, opts, created, depth)
        except BaseException:
            qcow2.close()
            raise
        return qcow2

    def _open_backing(
        self, qcow2: Any, opts: dict[str, Any], created: list[BlockNode], depth: int
    ) -> None:
        if "backing" in opts:
            ref = opts["backing"]
            if ref is not None:
                try:
                    qcow2.backing = self._child(ref, "backing", read_only=True, created=created)
                except BitbackError as exc:
                    raise _prefixed(exc, "Could not open backing file: ") from None
            return
        name = qcow2.header.backing_file
        if not name:
            return
        if depth + 1 >= MAX_CHAIN_DEPTH:
            raise ImageFormatError(
                f"Backing chain of '{qcow2.filename}' is deeper than {MAX_CHAIN_DEPTH} images"
            )
        path = resolve_backing(qcow2.filename, name)
        fmt = qcow2.header.backing_format
        try:
            file = self._open({"driver": "file", "filename": path, "read-only": True}, created)
            if fmt not in ("qcow2", "raw"):
                fmt = probe_format(file)
            backing_opts = {"driver": fmt, "read-only": True}
            qcow2.backing = self._register(
                self._format(fmt, file, backing_opts, True, created, depth + 1), None
            )
        except BitbackError as exc:
            raise _prefixed(exc, "Could not open backing file: ") from None
        created.append(qcow2.backing)

    def add_blockdev(self, opts: dict[str, Any], *, monitor_owned: bool = True) -> BlockNode:
        """Open the node tree described by ``opts`` (blockdev-add). All or nothing: on
        failure every node opened so far is closed and forgotten."""
        created: list[BlockNode] = []
        try:
            node = self._open(dict(opts), created)
        except BaseException:
            for n in reversed(created):
                self.nodes.pop(n.node_name, None)
            for n in reversed(created):
                if not n.closed and n.refs > 0:
                    n.refs = 1
                    n.close()
            raise
        if monitor_owned:
            self.monitor_owned[node.node_name] = node
        return node

    # -- backends -------------------------------------------------------------------------
    def add_backend(self, backend: BlockBackend) -> None:
        if self.backend(backend.name) is not None or backend.name in self.nodes:
            raise GraphError(f"Duplicate ID '{backend.name}' for drive")
        self.backends.append(backend)

    def remove_backend(self, backend: BlockBackend) -> None:
        self.backends.remove(backend)
        backend.root.close()

    # -- deletion -------------------------------------------------------------------------
    def parents_of(self, node: BlockNode) -> list[str]:
        """Who holds ``node``: parent nodes (by name) and devices."""
        held = [
            parent.node_name
            for parent in self.nodes.values()
            if any(child is node for _, child in parent.children())
        ]
        held += [b.name or (b.device_id or "") for b in self.backends if b.root is node]
        return held + list(node.users)

    def delete_blockdev(self, node_name: str) -> list[BitbackError]:
        """blockdev-del: only nodes added by blockdev-add, and only while nothing uses them.

        Once the checks pass the node goes, whatever happens while it closes: errors from
        flushing or storing its bitmaps are returned for the caller to report (QEMU prints
        them and deletes the node all the same); nothing half-closed stays in the graph.
        """
        node = self.nodes.get(node_name)
        if node is None:
            raise NotFoundError(f"Failed to find node with node-name='{node_name}'")
        # QEMU's order of checks (qmp_blockdev_del): a device, then ownership, then parents.
        if any(b.root is node for b in self.backends):
            raise GraphError(f"Node {node_name} is in use")
        if node_name not in self.monitor_owned:
            raise GraphError(f"Node {node_name} is not owned by the monitor")
        if self.parents_of(node):
            raise GraphError(f"Block device {node_name} is in use")
        del self.monitor_owned[node_name]
        try:
            self._drop_tree(node)
        except BitbackError as exc:
            return [exc]
        return []

    def release_node(self, node: BlockNode) -> list[BitbackError]:
        """Flush and close a node the daemon opened for itself (a backup target), and
        forget every node that closing it closed. Errors are returned, not raised: the
        caller decides whether a failed flush fails its operation."""
        failures: list[BitbackError] = []
        try:
            node.flush()
        except BitbackError as exc:
            failures.append(exc)
        try:
            self._drop_tree(node)
        except BitbackError as exc:
            failures.append(exc)
            self._forget_closed()
        return failures

    def _forget_closed(self) -> None:
        for name, other in list(self.nodes.items()):
            if other.closed:
                del self.nodes[name]

    def _drop_tree(self, node: BlockNode) -> None:
        """Close ``node`` and forget every node that closing it closed (also when closing
        fails half-way: a closed node must never stay reachable)."""
        try:
            node.close()
        finally:
            self._forget_closed()

    def close_all(self) -> list[BitbackError]:
        """Flush and close everything (quit, SIGTERM). Errors are collected, not raised, so
        one failing image does not keep the others open."""
        failures: list[BitbackError] = []
        roots = [b.root for b in self.backends] + list(self.monitor_owned.values())
        self.backends.clear()
        self.monitor_owned.clear()
        for node in roots:
            try:
                node.flush()
            except BitbackError as exc:
                failures.append(exc)
        for node in roots:
            try:
                node.close()
            except BitbackError as exc:
                failures.append(exc)
        for node in list(self.nodes.values()):
            if not node.closed:
                node.refs = 1
                try:
                    node.close()
                except BitbackError as exc:
                    failures.append(exc)
        self.nodes.clear()
        return failures
