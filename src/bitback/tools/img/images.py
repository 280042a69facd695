"""What the bitback-img commands share: opening images, reporting errors, cache options.

qemu-img reports a failed open as ``Could not open 'FILE': <cause>``, where the cause of a
missing file is itself ``Could not open 'FILE': No such file or directory`` - hence the
doubled text, kept for compatibility. Commands with special exit codes (check, compare)
print errors with :func:`report` and return their code; the others raise
:class:`~bitback.errors.BitbackError` and let :func:`bitback.tools.common.run_tool` print it.
"""

from __future__ import annotations

import sys
from collections.abc import Collection

from bitback.block.chain import open_chain
from bitback.block.driver import BlockDriver
from bitback.errors import BitbackError
from bitback.tools.img.options import PROG

__all__ = [
    "CACHE_MODES",
    "OpenFailed",
    "check_cache",
    "open_img",
    "report",
]

# bdrv_parse_cache_mode's words; bitback accepts them all and always writes through its
# own flush-on-close, which is what every mode guarantees at exit.
CACHE_MODES = ("none", "off", "writeback", "writethrough", "directsync", "unsafe")

_RAW_PROBE_WARNING = (
    "WARNING: Image format was not specified for '{name}' and probing guessed raw.\n"
    "         Automatically detecting the format is dangerous for raw images, write "
    "operations on block 0 will be restricted.\n"
    "         Specify the 'raw' format explicitly to remove the restrictions."
)


class OpenFailed(BitbackError):
    """An image could not be opened; the message is qemu-img's whole error text."""

    def __init__(self, message: str, *, path: str | None = None, errno_: int = 5) -> None:
        super().__init__(message, path=path)
        self.errno = errno_


def report(message: str) -> None:
    """Print ``PROG: message`` on stderr (qemu-img's ``error_report``)."""
    print(f"{PROG}: {message}", file=sys.stderr)


def check_cache(mode: str | None, *, source: bool = False) -> None:
    """Validate a ``-t``/``-T`` cache mode with qemu-img's message."""
    if mode is not None and mode not in CACHE_MODES:
        what = "source cache" if source else "cache"
        raise BitbackError(f"Invalid {what} option: {mode}")


def open_img(
    filename: str,
    fmt: str | None,
    *,
    read_only: bool = True,
    writable: Collection[int] = (),
    backing: bool = True,
    allow_corrupt: bool = False,
) -> BlockDriver:
    """Open an image (and its backing chain) as qemu-img's ``img_open`` does.

    Writable opens of a probed raw image print QEMU's warning about probing; a writable
    open of a qcow2 image marked corrupt fails, as in QEMU, unless ``allow_corrupt`` (check's
    repair mode). Raises :class:`OpenFailed` with ``Could not open 'FILE': ...``.
    """
    try:
        node = open_chain(filename, fmt, read_only=read_only, writable=writable, backing=backing)
    except BitbackError as exc:
        raise OpenFailed(
            f"Could not open '{filename}': {exc}", path=filename, errno_=exc.errno
        ) from exc
    if not read_only and getattr(node, "corrupt", False) and not allow_corrupt:
        node.close()
        raise OpenFailed(
            f"Could not open '{filename}': qcow2: Image is corrupt; cannot be opened read/write",
            path=filename,
        )
    if fmt is None and node.format_name == "raw" and not node.read_only:
        print(_RAW_PROBE_WARNING.format(name=filename), file=sys.stderr)
    return node
