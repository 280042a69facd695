"""``bitback-img rebase``: point an image at another backing file (``qemu-img rebase``).

Unsafe mode (``-u``) rewrites only the header's backing name and format; the image is not
read and its old backing file need not exist.

Safe mode keeps what the guest sees unchanged. For every range the image does not allocate
itself, the old backing chain and the new one are read (2 MiB at a time; past a backing
file's end reads zeros) and each 512-byte sector where they differ gets the old content
written into the image (zeros written as zeroes when the old chain is past its end). Then
the header switches. ``-b ""`` makes the image standalone: the new "backing" is all zeros,
so everything the old chain provided is copied in. When the new backing file is already
in the chain (dropping intermediate images), only ranges that the images in between
allocate are compared.

7.2 requires ``-F`` with a non-empty ``-b``; unlike qemu-img, which copies first and then
refuses to switch, bitback refuses before copying (the message and exit code are the same,
the image is left untouched).
"""

from __future__ import annotations

import numpy as np

from bitback.block.chain import (
    find_backing,
    is_allocated_above,
    readinto,
    virtual_size,
)
from bitback.block.driver import BlockDriver
from bitback.block.open import FORMATS, resolve_backing
from bitback.errors import BitbackError, ImageFormatError, InvalidArgumentError
from bitback.tools.img.images import check_cache, open_img
from bitback.tools.img.options import HelpRequested, OptSpec, UsageError, getopt
from bitback.tools.img.progress import Progress

__all__ = ["differing_runs", "img_rebase"]

IO_BUF_SIZE = 2 << 20
SECTOR = 512

SPEC = OptSpec("hf:F:b:upt:T:qU", {"help": (False, "h"), "force-share": (False, "U")})

# Format names qemu-img 7.2 knows (``-F`` is checked against them even in unsafe mode).
QEMU_FORMATS = frozenset(FORMATS) | {
    "blkdebug",
    "blklogwrites",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-on-read",
    "dmg",
    "file",
    "luks",
    "nbd",
    "null-aio",
    "null-co",
    "parallels",
    "preallocate",
    "qcow",
    "qed",
    "quorum",
    "throttle",
    "vdi",
    "vhdx",
    "vmdk",
    "vpc",
    "vvfat",
}


def differing_runs(old: bytearray, new: bytearray, n: int) -> list[tuple[int, int]]:
    """``(start, length)`` runs of 512-byte sectors where ``old[:n]`` and ``new[:n]``
    differ (the last sector may be partial)."""
    if memoryview(old)[:n].tobytes() == memoryview(new)[:n].tobytes():
        return []
    sectors = -(-n // SECTOR)
    a = np.zeros(sectors * SECTOR, np.uint8)
    b = np.zeros(sectors * SECTOR, np.uint8)
    a[:n] = np.frombuffer(old, np.uint8, n)
    b[:n] = np.frombuffer(new, np.uint8, n)
    diff = (a.reshape(sectors, SECTOR) != b.reshape(sectors, SECTOR)).any(axis=1)
    edges = np.flatnonzero(np.diff(np.concatenate(([False], diff, [False])).astype(np.int8)))
    runs = []
    for lo, hi in zip(edges[::2], edges[1::2], strict=True):
        start = int(lo) * SECTOR
        runs.append((start, min(int(hi) * SECTOR, n) - start))
    return runs


def _set_backing(node: BlockDriver, name: str | None, fmt: str | None) -> None:
    """Switch the header, with qemu-img's messages for what can go wrong."""
    shown = name or ""
    setter = getattr(node, "set_backing", None)
    if setter is None:
        raise BitbackError(
            f"Could not change the backing file to '{shown}': Operation not supported"
        )
    if name and fmt is None:
        raise BitbackError(
            f"Could not change the backing file to '{shown}': backing format must be specified"
        )
    if name and len(name.encode()) > 1023:
        raise BitbackError(f"Could not change the backing file to '{shown}': Invalid argument")
    try:
        setter(name, fmt)
    except ImageFormatError as exc:
        raise BitbackError(
            f"Could not change the backing file to '{shown}': No space left in the file header"
        ) from exc


class _SafeRebase:
    """The copy step of a safe rebase."""

    def __init__(
        self,
        image: BlockDriver,
        old: BlockDriver | None,
        new: BlockDriver | None,
        prefix: BlockDriver | None,
        progress: Progress,
    ) -> None:
        self.image, self.old, self.new, self.prefix = image, old, new, prefix
        self.progress = progress
        self.buf_old = bytearray(IO_BUF_SIZE)
        self.buf_new = bytearray(IO_BUF_SIZE)

    def _read(
        self, node: BlockDriver | None, buf: bytearray, offset: int, n: int, what: str
    ) -> None:
        if node is None:
            buf[:n] = bytes(n)
            return
        try:
            readinto(node, offset, memoryview(buf)[:n])
        except BitbackError as exc:
            raise BitbackError(f"error while reading from {what} backing file") from exc

    def run(self) -> None:
        size = virtual_size(self.image)
        old_size = virtual_size(self.old) if self.old is not None else 0
        new_size = virtual_size(self.new) if self.new is not None else 0
        step = 100.0 / (size // min(size, IO_BUF_SIZE)) if size else 0.0
        offset = 0
        while offset < size:
            n = min(IO_BUF_SIZE, size - offset)
            allocated, n = is_allocated_above(self.image, self.image.backing, offset, n)
            if allocated:
                offset += n
                continue
            if self.prefix is not None:
                assert self.image.backing is not None
                changed, n = is_allocated_above(self.image.backing, self.prefix, offset, n)
                if not changed:
                    offset += n
                    continue
            old_is_zero = offset >= old_size
            if not old_is_zero:
                n = min(n, old_size - offset)
            if self.new is not None and offset < new_size:
                n = min(n, new_size - offset)
            self._read(None if old_is_zero else self.old, self.buf_old, offset, n, "old")
            self._read(self.new if offset < new_size else None, self.buf_new, offset, n, "new")
            for start, length in differing_runs(self.buf_old, self.buf_new, n):
                try:
                    if old_is_zero:
                        self.image.pwrite_zeroes(offset + start, length)
                    else:
                        view = memoryview(self.buf_old)[start : start + length]
                        self.image.pwrite(offset + start, view)
                except BitbackError as exc:
                    raise BitbackError(f"Error while writing to COW image: {exc}") from exc
            offset += n
            self.progress.print(step, 100)


def img_rebase(argv: list[str]) -> int:
    """``rebase [-f fmt] [-u] -b BACKING [-F fmt] [-p] [-q] FILE``."""
    opts, operands = getopt(argv, SPEC)
    fmt: str | None = None
    base: str | None = None
    base_fmt: str | None = None
    unsafe = progress = quiet = False
    cache: str | None = None
    src_cache: str | None = None
    for key, value in opts:
        if key == "h":
            raise HelpRequested
        if key == "f":
            fmt = value
        elif key == "F":
            base_fmt = value
        elif key == "b":
            base = value
        elif key == "u":
            unsafe = True
        elif key == "p":
            progress = True
        elif key == "q":
            quiet = True
        elif key == "t":
            cache = value
        elif key == "T":
            src_cache = value
    if len(operands) != 1:
        raise UsageError("Expecting one image file name")
    if not unsafe and base is None:
        raise UsageError("Must specify backing file (-b) or use unsafe mode (-u)")
    filename = operands[0]
    meter = Progress(progress and not quiet, 2.0)
    try:
        meter.print(0, 100)
        check_cache(cache)
        check_cache(src_cache, source=True)
        with open_img(filename, fmt, read_only=False, backing=not unsafe) as image:
            if base_fmt is not None and base_fmt not in QEMU_FORMATS:
                raise InvalidArgumentError(f"Invalid format name: '{base_fmt}'")
            if not unsafe:
                assert base is not None
                _safe_rebase(image, filename, base, base_fmt, meter)
            _set_backing(image, base or None, base_fmt)
            meter.print(100, 0)
    finally:
        meter.end()
    return 0


def _safe_rebase(
    image: BlockDriver, filename: str, base: str, base_fmt: str | None, meter: Progress
) -> None:
    new: BlockDriver | None = None
    prefix: BlockDriver | None = None
    opened: BlockDriver | None = None
    try:
        if base:
            prefix = find_backing(image, resolve_backing(filename, base))
            if prefix is not None:
                new = prefix
            else:
                try:
                    opened = new = open_img(resolve_backing(filename, base), base_fmt)
                except BitbackError as exc:
                    cause = exc.__cause__ if exc.__cause__ is not None else exc
                    raise BitbackError(
                        f"Could not open new backing file '{base}': {cause}"
                    ) from exc
            if base_fmt is None:
                raise BitbackError(
                    f"Could not change the backing file to '{base}': "
                    "backing format must be specified"
                )
        if getattr(image, "set_backing", None) is None:
            return  # raw: nothing is unallocated; the header switch reports the error
        _SafeRebase(image, image.backing, new, prefix, meter).run()
        image.flush()
    finally:
        if opened is not None:
            opened.close()
