"""The root exception of bitback and its families.

Every error bitback raises on purpose derives from :class:`BitbackError`. Errors carry their
facts as fields (the image, the offset, the feature) and a one-line message; the tools and the
daemon translate them once, at their edge, into exit codes or QMP error classes.
"""

from __future__ import annotations

import errno as _errno

__all__ = [
    "BitbackError",
    "IOFailedError",
    "ImageCorruptError",
    "ImageFormatError",
    "InvalidArgumentError",
    "NoSpaceError",
    "NotFoundError",
    "ReadOnlyError",
    "UnsupportedFeatureError",
]


class BitbackError(Exception):
    """Root of every deliberate bitback error.

    ``errno`` is the POSIX error number that best describes the failure; tools print
    ``strerror(errno)`` where qemu-io and qemu-img would.
    """

    errno: int = _errno.EIO

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = path

    def __str__(self) -> str:
        return self.message


class InvalidArgumentError(BitbackError, ValueError):
    """A caller passed a value the operation cannot accept (size, offset, option)."""

    errno = _errno.EINVAL


class NotFoundError(BitbackError):
    """A file, node or other named thing does not exist."""

    errno = _errno.ENOENT


class ImageFormatError(BitbackError):
    """An image is not a valid image of the format it claims (bad header, bad table)."""

    errno = _errno.EINVAL


class ImageCorruptError(ImageFormatError):
    """Metadata inside an image contradicts itself (overlap, pointer past the end...)."""

    errno = _errno.EIO


class UnsupportedFeatureError(BitbackError):
    """The image uses a feature that bitback does not implement (encryption, ...)."""

    errno = _errno.ENOTSUP


class ReadOnlyError(BitbackError):
    """A write was attempted on something opened read-only."""

    errno = _errno.EACCES


class NoSpaceError(BitbackError):
    """A request reaches past the end of a device, or the host has no room."""

    errno = _errno.ENOSPC


class IOFailedError(BitbackError):
    """An I/O request failed; ``errno`` carries the reason (EIO, ENOSPC, ...)."""

    def __init__(self, message: str, *, errno: int = _errno.EIO, path: str | None = None) -> None:
        super().__init__(message, path=path)
        self.errno = errno
