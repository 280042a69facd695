"""The one driver interface every block driver implements.

Drivers are synchronous: each call completes the request (the daemon runs them off its event
loop through one helper). A driver is one node of an image graph: a *protocol* driver (file,
memory) stores bytes; a *format* driver (raw, qcow2) interprets a child protocol node and may
have a ``backing`` node whose contents show through where it has none of its own.

Request contract, shared by every driver:

* ``offset``/``length`` are bytes; any alignment is accepted (drivers do read-modify-write).
* A request that reaches past ``length()`` fails with :class:`IOFailedError` (EIO), as QEMU's
  ``bdrv_check_request`` does; nothing is written.
* ``pwrite_zeroes`` makes the range read as zeros. With ``may_unmap`` the driver may release
  storage, but the range must still read as zeros (never fall through to a backing file).
* ``discard`` is advisory: afterwards the range reads as zeros *or* as it did before
  (qcow2 with a backing file makes it zero; without one it is deallocated and reads zero).
* ``flush`` returns once everything written before it is on stable storage.
* ``block_status`` describes the extent starting at ``offset`` (at most ``length`` bytes) in
  *this* node only; callers walk ``backing`` themselves (see :mod:`bitback.block.chain`).
"""

from __future__ import annotations

import errno
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from bitback.errors import IOFailedError, ReadOnlyError

__all__ = ["BlockDriver", "Extent", "fill_zero"]

_ZEROS = memoryview(bytes(1 << 20))


def fill_zero(dest: memoryview) -> None:
    """Zero ``dest`` without allocating a buffer of its size."""
    pos = 0
    while pos < len(dest):
        n = min(len(_ZEROS), len(dest) - pos)
        dest[pos : pos + n] = _ZEROS[:n]
        pos += n


@dataclass(frozen=True, slots=True)
class Extent:
    """What one contiguous range of a node holds.

    ``allocated``: this node decides the content (False: it falls through to ``backing``,
    or reads as zeros without one). ``zero``: reads return zeros. ``data``: the node stores
    data for the range (possibly zeros). ``host_offset``: where the data lives in the child
    protocol node, when it is stored uncompressed and contiguously.
    """

    offset: int
    length: int
    allocated: bool
    zero: bool
    data: bool
    host_offset: int | None = None
    compressed: bool = False

    @property
    def end(self) -> int:
        return self.offset + self.length


class BlockDriver(ABC):
    """Base of all drivers. Subclasses implement the abstract hooks; optional hooks that a
    driver does not support raise ``ENOTSUP`` through :meth:`_unsupported`."""

    format_name: ClassVar[str]
    # Protocol nodes that store bytes (a host file), and filters over them, grow when
    # written past their end; the generic layer then checks only that a request is not
    # negative.
    grows_on_write: bool = False

    def __init__(self, filename: str, *, read_only: bool) -> None:
        self.filename = filename
        self.read_only = read_only
        self.backing: BlockDriver | None = None
        self.closed = False

    # -- geometry -------------------------------------------------------------------------
    @abstractmethod
    def length(self) -> int:
        """Virtual size in bytes."""

    @property
    def cluster_size(self) -> int | None:
        """Allocation unit, if the format has one (qcow2); ``None`` otherwise."""
        return None

    # -- data path ------------------------------------------------------------------------
    @abstractmethod
    def pread(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset``."""

    def readinto(self, offset: int, dest: memoryview) -> None:
        """Read ``len(dest)`` bytes at ``offset`` into ``dest`` (no intermediate copy where
        the driver can avoid one)."""
        dest[:] = self.pread(offset, len(dest))

    @abstractmethod
    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``offset``."""

    def pwrite_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        """Make ``[offset, offset+length)`` read as zeros. Default: write zero bytes."""
        self.check_request(offset, length, write=True)
        chunk = 1 << 20
        zeros = bytes(min(chunk, length))
        pos, end = offset, offset + length
        while pos < end:
            n = min(chunk, end - pos)
            self.pwrite(pos, zeros[:n])
            pos += n

    def discard(self, offset: int, length: int) -> None:
        """Advisory deallocation; the default does nothing (always allowed)."""
        self.check_request(offset, length, write=True)

    @abstractmethod
    def flush(self) -> None:
        """Make everything written so far durable."""

    @abstractmethod
    def block_status(self, offset: int, length: int) -> Extent:
        """Describe the extent of this node that starts at ``offset``."""

    def truncate(self, size: int, *, shrink: bool = False) -> None:
        """Change the virtual size."""
        self._unsupported("resize")

    def close(self) -> None:
        """Flush (if writable) and release resources, backing chain included."""
        if self.closed:
            return
        self.closed = True
        if self.backing is not None:
            self.backing.close()

    # -- graph ----------------------------------------------------------------------------
    def children(self) -> list[tuple[str, BlockDriver]]:
        """The nodes this one reads or writes through, as ``(role, node)`` pairs: ``file`` for
        a format driver's protocol node, ``image`` for a filter's child, ``backing``."""
        kids: list[tuple[str, BlockDriver]] = []
        file = getattr(self, "file", None)
        if isinstance(file, BlockDriver):
            kids.append(("file", file))
        if self.backing is not None:
            kids.append(("backing", self.backing))
        return kids

    def debug_event(self, event: str) -> None:
        """A parent announces ``event`` (a blkdebug event name, such as ``read_aio``) on its
        link to this node, just before the request it names. Only blkdebug reacts."""
        return None

    def child_event(self, event: str) -> None:
        """Raise ``event`` on this node's primary child (its protocol node), as QEMU's
        ``BLKDBG_EVENT(bs->file, ...)`` does."""
        file = getattr(self, "file", None)
        if isinstance(file, BlockDriver):
            file.debug_event(event)

    # -- description ----------------------------------------------------------------------
    def allocated_file_size(self) -> int | None:
        """Bytes the node takes on the host (``disk size`` in qemu-img info)."""
        return None

    def format_specific_info(self) -> dict[str, object]:
        """Format-specific keys for ``info --output=json`` (qemu-img's shape)."""
        return {}

    # -- helpers for subclasses -----------------------------------------------------------
    def check_request(self, offset: int, length: int, *, write: bool = False) -> None:
        """Refuse requests outside the node or writes to a read-only node."""
        if write and self.read_only:
            raise ReadOnlyError(f"{self.filename}: image is read-only", path=self.filename)
        if offset < 0 or length < 0 or offset + length > self.length():
            raise IOFailedError(
                f"request {offset}+{length} is beyond the end of {self.filename}",
                errno=errno.EIO,
                path=self.filename,
            )

    def _unsupported(self, what: str) -> None:
        raise IOFailedError(
            f"{self.format_name} does not support {what}", errno=errno.ENOTSUP, path=self.filename
        )

    def __enter__(self) -> BlockDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
