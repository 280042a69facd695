"""The ``raw`` format driver: the guest sees the child protocol node's bytes unchanged."""

from __future__ import annotations

from bitback.block.driver import BlockDriver, Extent

__all__ = ["RawDriver"]


class RawDriver(BlockDriver):
    """A raw image over a protocol node (normally :class:`FileDriver`)."""

    format_name = "raw"

    def __init__(self, file: BlockDriver, *, read_only: bool) -> None:
        super().__init__(file.filename, read_only=read_only)
        self.file = file

    def length(self) -> int:
        # QEMU counts lengths in 512-byte sectors: a 1000-byte file is a 1024-byte disk whose
        # tail reads as zeros (and grows the file when written).
        return -(-self.file.length() // 512) * 512

    def pread(self, offset: int, length: int) -> bytes:
        self.check_request(offset, length)
        self.child_event("read_aio")
        return self.file.pread(offset, length)

    def readinto(self, offset: int, dest: memoryview) -> None:
        self.check_request(offset, len(dest))
        self.child_event("read_aio")
        self.file.readinto(offset, dest)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.check_request(offset, len(data), write=True)
        self.child_event("write_aio")
        self.file.pwrite(offset, data)

    def pwrite_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        self.check_request(offset, length, write=True)
        self.file.pwrite_zeroes(offset, length, may_unmap=may_unmap)

    def discard(self, offset: int, length: int) -> None:
        self.check_request(offset, length, write=True)
        self.file.discard(offset, length)

    def flush(self) -> None:
        self.file.flush()

    def block_status(self, offset: int, length: int) -> Extent:
        ext = self.file.block_status(offset, min(length, self.length() - offset))
        return ext

    def truncate(self, size: int, *, shrink: bool = False) -> None:
        if self.read_only:
            self.check_request(0, 0, write=True)
        self.file.truncate(size, shrink=shrink)

    def allocated_file_size(self) -> int | None:
        return self.file.allocated_file_size()

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        self.file.close()
