"""Opening images: format probing, the protocol node, and the backing chain.

``open_image`` is the one way tools open an image. It guards the chain against loops
(A -> B -> A) and absurd depth, and resolves relative backing names against the directory of
the image that names them, as QEMU does.
"""

from __future__ import annotations

import os

from bitback.block.driver import BlockDriver
from bitback.block.drivers.file import FileDriver
from bitback.block.drivers.raw import RawDriver
from bitback.errors import ImageCorruptError, ImageFormatError, InvalidArgumentError

__all__ = [
    "FORMATS",
    "MAX_CHAIN_DEPTH",
    "ignore_flushes",
    "open_image",
    "probe_format",
    "qcow2_dirty",
    "repair_dirty",
    "resolve_backing",
]

FORMATS = ("qcow2", "raw")

# A backing chain deeper than this is refused; real chains are far shorter, and the limit
# keeps hostile images from exhausting file descriptors or recursion.
MAX_CHAIN_DEPTH = 256

QCOW2_MAGIC = b"QFI\xfb"


def probe_format(file: BlockDriver) -> str:
    """Guess a format from the first bytes, as qemu-img does for qcow2 vs raw."""
    return "qcow2" if file.pread(0, 4) == QCOW2_MAGIC else "raw"


def resolve_backing(image_filename: str, backing: str) -> str:
    """Backing names are relative to the directory of the image naming them."""
    if os.path.isabs(backing) or backing.startswith("json:"):
        return backing
    return os.path.join(os.path.dirname(image_filename), backing)


def ignore_flushes(node: BlockDriver) -> None:
    """Cache mode ``unsafe`` for ``node``: its protocol file skips fsync on flush.

    qemu-img convert writes its target this way by default; metadata is still written in
    the crash-safe order, so only a host crash (not a process crash) can lose data.
    """
    file = getattr(node, "file", node)
    if isinstance(file, FileDriver):
        file.ignore_flush = True


def qcow2_dirty(file: BlockDriver) -> bool:
    """Whether a qcow2 v3 header carries the dirty bit (lazy refcounts left unsynced)."""
    head = file.pread(0, 80)
    return int.from_bytes(head[4:8], "big") >= 3 and bool(head[79] & 1)


def repair_dirty(filename: str) -> None:
    """Rebuild the refcounts of an image left dirty, as QEMU does on a read-write open.

    A writer using lazy refcounts died: its refcounts may be too low, so they must be
    recomputed before anything is allocated. The repair clears the dirty bit when it succeeds.
    """
    from bitback.block.drivers.qcow2.check import check_qcow2

    result = check_qcow2(filename, repair="all")
    if result.failure is not None or result.corruptions or result.check_errors:
        raise ImageCorruptError(
            f"'{filename}' was left dirty and its refcounts could not be repaired "
            f"({result.corruptions} corruptions remain)",
            path=filename,
        )


def open_image(
    filename: str,
    fmt: str | None = None,
    *,
    read_only: bool = False,
    backing: bool = True,
    _chain: tuple[str, ...] = (),
) -> BlockDriver:
    """Open ``filename`` as format ``fmt`` (probed when ``None``) with its backing chain.

    ``backing=False`` opens the image alone (its unallocated ranges then read as zeros), as
    ``qemu-img rebase -u`` and ``info`` need. Backing files are opened read-only.
    """
    if fmt is not None and fmt not in FORMATS:
        raise InvalidArgumentError(f"Unknown driver '{fmt}'")
    real = os.path.realpath(filename)
    if real in _chain:
        raise ImageFormatError(
            f"Backing chain loop: '{filename}' is its own backing file", path=filename
        )
    if len(_chain) >= MAX_CHAIN_DEPTH:
        raise ImageFormatError(
            f"Backing chain of '{filename}' is deeper than {MAX_CHAIN_DEPTH} images", path=filename
        )
    file = FileDriver(filename, read_only=read_only)
    try:
        if fmt is None:
            fmt = probe_format(file)
        if fmt == "raw":
            return RawDriver(file, read_only=read_only)
        from bitback.block.drivers.qcow2.driver import Qcow2Driver

        if not read_only and qcow2_dirty(file):
            file.close()
            repair_dirty(filename)
            file = FileDriver(filename, read_only=read_only)

        node = Qcow2Driver(file, read_only=read_only)
        try:
            name = node.header.backing_file
            if backing and name:
                path = resolve_backing(filename, name)
                bfmt = node.header.backing_format
                node.backing = open_image(
                    path,
                    bfmt if bfmt in FORMATS else None,
                    read_only=True,
                    _chain=(*_chain, real),
                )
        except BaseException:
            node.close()
            raise
        return node
    except BaseException:
        if not file.closed:
            file.close()
        raise
