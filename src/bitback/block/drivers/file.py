"""The ``file`` protocol driver: a host file, read and written with pread/pwrite.

Unlike format drivers, a file node grows when written past its end (qcow2 appends clusters
that way), and reads past the end return zeros, as QEMU's file-posix does for format drivers.
Holes are found with SEEK_DATA / SEEK_HOLE and made with fallocate(PUNCH_HOLE) where the
filesystem supports it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os

from bitback.block.driver import BlockDriver, Extent, fill_zero
from bitback.errors import IOFailedError, NotFoundError, ReadOnlyError

__all__ = ["FileDriver"]

_MAX_IO = 1 << 30  # largest single pread/pwrite; longer requests loop


_PUNCH_HOLE = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """libc for fallocate(2), which the os module does not expose with flags."""
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        lib.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
        return lib
    except (OSError, AttributeError):
        return None


def _io_error(exc: OSError, what: str, path: str) -> IOFailedError:
    err = exc.errno or errno.EIO
    return IOFailedError(f"{what} {path}: {os.strerror(err)}", errno=err, path=path)


class FileDriver(BlockDriver):
    """A host file as a block node."""

    format_name = "file"
    grows_on_write = True

    def __init__(self, filename: str, *, read_only: bool = False, create: bool = False) -> None:
        super().__init__(filename, read_only=read_only)
        flags = os.O_RDONLY if read_only else os.O_RDWR
        if create:
            flags |= os.O_CREAT | os.O_TRUNC
        flags |= getattr(os, "O_CLOEXEC", 0)
        try:
            self.fd = os.open(filename, flags, 0o644)
        except FileNotFoundError as exc:
            raise NotFoundError(
                f"Could not open '{filename}': No such file or directory", path=filename
            ) from exc
        except IsADirectoryError as exc:
            raise IOFailedError(
                f"Could not open '{filename}': Is a directory", errno=errno.EISDIR, path=filename
            ) from exc
        except OSError as exc:
            raise IOFailedError(
                f"Could not open '{filename}': {os.strerror(exc.errno or errno.EIO)}",
                errno=exc.errno or errno.EIO,
                path=filename,
            ) from exc
        if os.path.isdir(filename):
            os.close(self.fd)
            raise IOFailedError(
                f"Could not open '{filename}': Is a directory", errno=errno.EISDIR, path=filename
            )
        self._size = os.fstat(self.fd).st_size
        # Cache mode "unsafe" (QEMU's cache.no-flush): flushes return at once. Writes still
        # reach the file in order, so a crash of the process loses nothing; only a crash of
        # the host can.
        self.ignore_flush = False

    def length(self) -> int:
        return self._size

    def pread(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise IOFailedError("negative offset or length", errno=errno.EINVAL)
        if length <= _MAX_IO:
            try:
                data = os.pread(self.fd, length, offset)
            except OSError as exc:
                raise _io_error(exc, "read from", self.filename) from exc
            if len(data) < length:  # past EOF reads as zeros
                data += bytes(length - len(data))
            return data
        parts = []
        pos = offset
        while pos < offset + length:
            n = min(_MAX_IO, offset + length - pos)
            parts.append(self.pread(pos, n))
            pos += n
        return b"".join(parts)

    def readinto(self, offset: int, dest: memoryview) -> None:
        pos = 0
        try:
            while pos < len(dest):
                n = os.preadv(self.fd, [dest[pos : pos + _MAX_IO]], offset + pos)
                if n <= 0:  # end of file: the rest reads as zeros
                    fill_zero(dest[pos:])
                    return
                pos += n
        except OSError as exc:
            raise _io_error(exc, "read from", self.filename) from exc

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self.read_only:
            raise ReadOnlyError(f"{self.filename}: image is read-only", path=self.filename)
        view = memoryview(data).cast("B")
        pos = 0
        try:
            while pos < len(view):
                n = os.pwrite(self.fd, view[pos : pos + _MAX_IO], offset + pos)
                if n <= 0:
                    raise OSError(errno.EIO, "short write")
                pos += n
        except OSError as exc:
            raise _io_error(exc, "write to", self.filename) from exc
        self._size = max(self._size, offset + len(view))

    def pwrite_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        if self.read_only:
            raise ReadOnlyError(f"{self.filename}: image is read-only", path=self.filename)
        end = offset + length
        if may_unmap and end <= self._size and self._punch_hole(offset, length):
            return
        if offset >= self._size:
            self.truncate(max(self._size, end))
            return
        if end > self._size:
            self.truncate(end)
            end = self._size
        super().pwrite_zeroes(offset, end - offset)

    def _punch_hole(self, offset: int, length: int) -> bool:
        if length == 0:
            return True
        libc = _libc()
        if libc is None:
            return False
        rc = libc.fallocate(self.fd, _PUNCH_HOLE, ctypes.c_longlong(offset),
                            ctypes.c_longlong(length))
        return bool(rc == 0)

    def discard(self, offset: int, length: int) -> None:
        if self.read_only:
            raise ReadOnlyError(f"{self.filename}: image is read-only", path=self.filename)
        if offset < self._size:
            self._punch_hole(offset, min(length, self._size - offset))

    def flush(self) -> None:
        if self.read_only or self.ignore_flush:
            return
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise _io_error(exc, "flush", self.filename) from exc

    def block_status(self, offset: int, length: int) -> Extent:
        end = min(offset + length, self._size)
        if offset >= self._size:
            return Extent(offset, length, allocated=True, zero=True, data=False)
        try:
            data_start = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole until EOF
                return Extent(offset, end - offset, allocated=True, zero=True, data=False)
            return Extent(offset, end - offset, allocated=True, zero=False, data=True,
                          host_offset=offset)
        if data_start > offset:
            n = min(data_start, end) - offset
            return Extent(offset, n, allocated=True, zero=True, data=False)
        try:
            hole = os.lseek(self.fd, offset, os.SEEK_HOLE)
        except OSError:
            hole = end
        n = min(hole, end) - offset
        return Extent(offset, max(n, 1) if n <= 0 else n, allocated=True, zero=False, data=True,
                      host_offset=offset)

    def truncate(self, size: int, *, shrink: bool = False) -> None:
        if self.read_only:
            raise ReadOnlyError(f"{self.filename}: image is read-only", path=self.filename)
        try:
            os.ftruncate(self.fd, size)
        except OSError as exc:
            raise _io_error(exc, "resize", self.filename) from exc
        self._size = size

    def allocated_file_size(self) -> int | None:
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        os.close(self.fd)
