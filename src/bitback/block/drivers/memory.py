"""An in-memory protocol driver: a bytearray that behaves like a file node.

It keeps unit tests of format drivers fast and free of the file system, and serves as the
trivial model that property tests compare against.
"""

from __future__ import annotations

from bitback.block.driver import BlockDriver, Extent
from bitback.errors import ReadOnlyError

__all__ = ["MemoryDriver"]


class MemoryDriver(BlockDriver):
    """Bytes in memory; grows when written past the end, like a file."""

    format_name = "memory"

    def __init__(self, data: bytes = b"", *, name: str = "memory", read_only: bool = False):
        super().__init__(name, read_only=read_only)
        self.data = bytearray(data)
        self.flushes = 0

    def length(self) -> int:
        return len(self.data)

    def pread(self, offset: int, length: int) -> bytes:
        chunk = bytes(self.data[offset : offset + length])
        return chunk + bytes(length - len(chunk))

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self.read_only:
            raise ReadOnlyError(f"{self.filename}: read-only")
        end = offset + len(data)
        if end > len(self.data):
            self.data.extend(bytes(end - len(self.data)))
        self.data[offset:end] = data

    def flush(self) -> None:
        self.flushes += 1

    def block_status(self, offset: int, length: int) -> Extent:
        n = max(0, min(length, len(self.data) - offset))
        if n == 0:
            return Extent(offset, length, allocated=True, zero=True, data=False)
        return Extent(offset, n, allocated=True, zero=False, data=True, host_offset=offset)

    def truncate(self, size: int, *, shrink: bool = False) -> None:
        if size < len(self.data):
            del self.data[size:]
        else:
            self.data.extend(bytes(size - len(self.data)))
