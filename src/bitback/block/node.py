"""BlockNode: the generic layer every request passes through, QEMU's BlockDriverState.

A driver (qcow2, file, blkdebug...) knows its format; the node around it adds what is common
to all of them and what the daemon needs to address it:

* a **node name** (``#block123`` when QEMU would invent one);
* **dirty bitmaps**: every write, write-zeroes and discard that reaches this node marks every
  enabled bitmap attached to it, after the request and whether or not it failed (QEMU's
  ``bdrv_co_write_req_finish`` is conservative the same way); a qcow2 image's persistent
  bitmaps are attached when the node is made, and stored by the image when it closes;
* the **write generation**: ``flush`` raises blkdebug's ``flush_to_disk`` event and flushes
  the driver only when something was written since the last flush, so a flush right after
  open is silent (spec 7.2);
* **references**: parents (other nodes, devices, the monitor that added it) keep a node open;
  the last :meth:`release` closes it.

Nodes stack: a qcow2 node's ``file`` is itself a :class:`BlockNode`, so the qcow2 driver's
metadata and data requests reach the blkdebug or file node below through the same path, and
``debug_event`` calls travel exactly one link down, as ``BLKDBG_EVENT(bs->file, ...)`` does.

Nodes are not thread-safe: the daemon touches the whole graph from its single I/O thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from bitback.block.driver import BlockDriver, Extent

if TYPE_CHECKING:
    from bitback.bitmaps import DirtyBitmap

__all__ = ["BlockNode"]


class BlockNode(BlockDriver):
    """One node of the graph: a driver plus name, bitmaps, write generation and references."""

    format_name = "node"  # instances report their driver's name through ``drv``

    def __init__(self, driver: BlockDriver, node_name: str, *, auto_named: bool = False) -> None:
        self.driver = driver  # first: the ``backing`` property below forwards to it
        self.grows_on_write = driver.grows_on_write
        backing = driver.backing
        super().__init__(driver.filename, read_only=driver.read_only)
        # The base initialiser resets ``backing``, which forwards to the driver: restore it.
        driver.backing = backing
        self.node_name = node_name
        self.auto_named = auto_named
        self.bitmaps: list[DirtyBitmap] = []  # newest first, as QEMU lists them
        self.discard_unmap = False  # ``discard=unmap``: discards pass down (else dropped)
        self.write_gen = 0
        self.flushed_gen = 0
        self.refs = 1  # the creator's reference
        # Set when a parent node, device or job holds this node; blockdev-del refuses then.
        self.users: list[str] = []
        # Called with (offset, length) before every write, write-zeroes and discard reaches
        # the driver: copy-before-write saves the old data there. A hook that raises fails
        # the write (nothing is written, nothing is marked).
        self.before_write: list[Callable[[int, int], None]] = []
        # Bitmaps stored in the image (qcow2) become this node's: the node marks them like
        # any other, and hands its current list back when the image stores them at close.
        store = getattr(driver, "persistent", None)
        if store is not None:
            self.bitmaps = list(store.bitmaps)
            store.track_writes = False
            store.source = lambda: self.bitmaps

    @property
    def backing(self) -> BlockDriver | None:
        return self.driver.backing

    @backing.setter
    def backing(self, node: BlockDriver | None) -> None:
        self.driver.backing = node

    @property
    def drv(self) -> str:
        """The driver's name as QMP reports it (``qcow2``, ``file``, ``blkdebug``...)."""
        return self.driver.format_name

    # -- geometry -------------------------------------------------------------------------
    def length(self) -> int:
        return self.driver.length()

    @property
    def cluster_size(self) -> int | None:
        return self.driver.cluster_size

    def children(self) -> list[tuple[str, BlockDriver]]:
        return self.driver.children()

    # -- reads ----------------------------------------------------------------------------
    def pread(self, offset: int, length: int) -> bytes:
        return self.driver.pread(offset, length)

    def readinto(self, offset: int, dest: memoryview) -> None:
        self.driver.readinto(offset, dest)

    def block_status(self, offset: int, length: int) -> Extent:
        return self.driver.block_status(offset, length)

    # -- writes ---------------------------------------------------------------------------
    def _written(self, offset: int, length: int) -> None:
        self.write_gen += 1
        if length and self.grows_on_write:
            # A protocol node grown by this write takes its bitmaps along, to the end rounded
            # up to a sector, as QEMU's bdrv_co_write_req_finish does.
            end = -(-(offset + length) // 512) * 512
            for bitmap in self.bitmaps:
                if bitmap.size < end:
                    bitmap.resize(end)
        if length:
            for bitmap in self.bitmaps:
                bitmap.mark(offset, length)

    def _admit(self, offset: int, length: int) -> None:
        """Refuse a write outside the node before it counts as a write (QEMU's
        ``bdrv_check_request`` runs before the request is tracked, so nothing is marked),
        then let the before-write hooks run."""
        if self.driver.grows_on_write:
            if offset < 0 or length < 0:
                self.driver.check_request(offset, length, write=True)
        else:
            self.driver.check_request(offset, length, write=True)
        if length:
            for hook in list(self.before_write):
                hook(offset, length)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        length = len(memoryview(data).cast("B"))
        self._admit(offset, length)
        try:
            self.driver.pwrite(offset, data)
        finally:
            self._written(offset, length)

    def pwrite_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        self._admit(offset, length)
        try:
            self.driver.pwrite_zeroes(offset, length, may_unmap=may_unmap)
        finally:
            self._written(offset, length)

    def discard(self, offset: int, length: int) -> None:
        self._admit(offset, length)
        try:
            self.driver.discard(offset, length)
        finally:
            self._written(offset, length)

    def write_compressed(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Compressed write, for drivers that have one (qcow2); ENOTSUP otherwise."""
        hook = getattr(self.driver, "write_compressed", None)
        if hook is None:
            self._unsupported("compressed writes")
            return
        self._admit(offset, len(memoryview(data).cast("B")))
        try:
            hook(offset, data)
        finally:
            self._written(offset, len(memoryview(data).cast("B")))

    def flush(self) -> None:
        """Flush the driver when it was written since the last flush.

        ``flush_to_os`` is raised on every flush and ``flush_to_disk`` only when there is
        something to flush: the order and condition of QEMU's ``bdrv_co_flush``.
        """
        if self.read_only:
            return
        gen = self.write_gen
        self.driver.child_event("flush_to_os")
        if gen == self.flushed_gen:
            return
        self.driver.child_event("flush_to_disk")
        self.driver.flush()
        self.flushed_gen = gen

    def truncate(self, size: int, *, shrink: bool = False) -> None:
        """Resize the node; attached bitmaps follow (new area clean, bits past a smaller end
        dropped). A resize counts as a write, to any size, the same one too: the next flush
        raises ``flush_to_disk`` (QEMU's truncate ends like a write request)."""
        self.write_gen += 1
        self.driver.truncate(size, shrink=shrink)
        for bitmap in self.bitmaps:
            bitmap.resize(self.length())

    def debug_event(self, event: str) -> None:
        self.driver.debug_event(event)

    # -- lifetime ---------------------------------------------------------------------------
    def retain(self) -> None:
        self.refs += 1

    def close(self) -> None:
        """Drop one reference; the last one closes the driver (and so its children)."""
        if self.closed:
            return
        self.refs -= 1
        if self.refs > 0:
            return
        self.closed = True
        self.driver.close()

    # -- description ----------------------------------------------------------------------
    def allocated_file_size(self) -> int | None:
        return self.driver.allocated_file_size()

    def format_specific_info(self) -> dict[str, object]:
        return self.driver.format_specific_info()

    def bitmap(self, name: str) -> DirtyBitmap | None:
        """The named bitmap of this node, if any."""
        for bitmap in self.bitmaps:
            if bitmap.name == name:
                return bitmap
        return None

    def __repr__(self) -> str:
        return f"<BlockNode {self.node_name} {self.drv} {self.filename!r}>"
