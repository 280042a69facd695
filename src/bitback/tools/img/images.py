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
from typing import TextIO

from bitback.block.chain import backing_chain, open_chain
from bitback.block.driver import BlockDriver
from bitback.block.drivers.qcow2.check_image import stale_bitmaps_warning
from bitback.errors import BitbackError
from bitback.tools.img.options import PROG

__all__ = [
    "CACHE_MODES",
    "OpenFailed",
    "check_cache",
    "error_text",
    "load_bitmaps",
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


def error_text(exc: BitbackError) -> str:
    """``exc``'s message with the hint QEMU prints on a line of its own folded in, in
    parentheses (every bitback error is one line): an inconsistent bitmap's
    ``Try block-dirty-bitmap-remove to delete this bitmap from disk``."""
    text = str(exc)
    hint = getattr(exc, "hint", None)
    if isinstance(hint, str) and hint:
        text += f" ({hint[:1].lower()}{hint[1:]})"
    return text


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
    warn_stale_bitmaps: bool = True,
) -> BlockDriver:
    """Open an image (and its backing chain) as qemu-img's ``img_open`` does.

    Writable opens of a probed raw image print QEMU's warning about probing; a writable
    open of a qcow2 image marked corrupt fails, as in QEMU, unless ``allow_corrupt`` (check's
    repair mode). Persistent bitmaps are loaded now (:func:`load_bitmaps`), so a damaged
    bitmap fails the open as in QEMU; an image whose bitmaps a program without bitmap support
    invalidated gets QEMU's warning unless ``warn_stale_bitmaps`` is false (check prints it
    itself). Raises :class:`OpenFailed` with ``Could not open 'FILE': ...``.
    """
    try:
        node = open_chain(filename, fmt, read_only=read_only, writable=writable, backing=backing)
    except BitbackError as exc:
        raise OpenFailed(
            f"Could not open '{filename}': {exc}", path=filename, errno_=exc.errno
        ) from exc
    try:
        load_bitmaps(node, warn_stale=warn_stale_bitmaps)
    except BitbackError as exc:
        node.close()
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


def load_bitmaps(
    node: BlockDriver, *, warn_stale: bool = True, prog: str = PROG, err: TextIO | None = None
) -> None:
    """Load the persistent bitmaps of every qcow2 image in ``node``'s chain, as QEMU's open.

    The driver loads them lazily; QEMU reads every consistent bitmap's table and data while
    it opens the image, so a damaged table fails ``info``, ``check`` or ``convert`` at once
    (``Could not read bitmap_table table from image for bitmap 'b0': Invalid argument``). A
    failure in a backing file is prefixed the way :func:`open_chain` nests it. With
    ``warn_stale``, an image whose bitmaps extension lost its autoclear bit gets QEMU's
    two-line warning on ``err`` (default stderr; the second line without a newline, as QEMU
    prints it), naming ``prog``.
    """
    out = sys.stderr if err is None else err
    for depth, cur in enumerate(backing_chain(node)):
        store = getattr(cur, "persistent", None)
        if store is None:
            continue
        if store.stale_extension and warn_stale:
            version: int = getattr(cur, "header").version  # noqa: B009 - qcow2 only
            out.write("\n".join(stale_bitmaps_warning(version, prog)))
            out.flush()
        try:
            store.bitmaps  # noqa: B018 - the load is the point
        except BitbackError as exc:
            if not depth:
                raise
            nested = BitbackError("Could not open backing file: " * depth + str(exc),
                                  path=cur.filename)
            nested.errno = exc.errno
            raise nested from exc
