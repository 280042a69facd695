"""The ``null-co`` protocol driver: a disk of a given size that stores nothing.

Writes succeed and are dropped; reads return zeros (QEMU leaves the buffer untouched unless
``read-zeroes`` is set; zeros are the only safe choice in Python). Useful as a fast backup
target or source in tests and benchmarks, exactly as QEMU's iotests use it.
"""

from __future__ import annotations

from bitback.block.driver import BlockDriver, Extent, fill_zero

__all__ = ["NullDriver"]


class NullDriver(BlockDriver):
    """``size`` bytes of nothing."""

    format_name = "null-co"

    def __init__(self, size: int, *, read_zeroes: bool = False, read_only: bool = False) -> None:
        super().__init__("null-co://", read_only=read_only)
        self._size = size
        self.read_zeroes = read_zeroes

    def length(self) -> int:
        return self._size

    def pread(self, offset: int, length: int) -> bytes:
        self.check_request(offset, length)
        return bytes(length)

    def readinto(self, offset: int, dest: memoryview) -> None:
        self.check_request(offset, len(dest))
        fill_zero(dest)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.check_request(offset, len(memoryview(data).cast("B")), write=True)

    def pwrite_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        self.check_request(offset, length, write=True)

    def flush(self) -> None:
        return None

    def block_status(self, offset: int, length: int) -> Extent:
        n = max(0, min(length, self._size - offset))
        return Extent(offset, n, allocated=True, zero=self.read_zeroes, data=not self.read_zeroes)

    def truncate(self, size: int, *, shrink: bool = False) -> None:
        self._size = size
