"""Backing chains as the guest and qemu-img see them: opening, walking, status, reading.

A driver's :meth:`~bitback.block.driver.BlockDriver.block_status` describes one node only.
This module adds the chain-level view QEMU's block layer gives its tools:

* :func:`open_chain` opens an image and its backing files node by node, with qemu-img's
  nested error messages (``Could not open backing file: ...``) and a loop guard;
* :func:`node_status` is ``bdrv_block_status`` of one node: the driver's extent, merged into
  a maximal run the way QEMU's qcow2 driver reports runs (never across an L2 table), with the
  generic layer's rules (unallocated with no backing, or past the backing's end, reads zero;
  a raw file maps 1:1; a qcow2 image QEMU deems metadata-preallocated has its data checked
  against holes in its file);
* :func:`status_above` is ``bdrv_block_status_above``: the first layer from the top that
  decides a range, down to an optional base (exclusive) - compare, convert and commit use it;
* :func:`map_entry` / :func:`iter_map` are qemu-img map's ``get_block_status`` and its
  merging into maximal runs;
* :func:`read` reads what the guest sees, zeros past the image's end up to its sector-rounded
  size (format drivers fall through to their backing nodes themselves).

Geometry of a run, for a 64 KiB-cluster qcow2 image (one L2 table maps 512 MiB)::

    guest   0        512M       1G
            |--------|----------|
    runs    [ a ][b ][ c ]           a run never crosses a 512 MiB boundary, as in QEMU,
                                     which matters for the EOF flag compare -s looks at
"""

from __future__ import annotations

import errno
import os
import weakref
from collections.abc import Collection, Iterator
from dataclasses import dataclass, replace

import numpy as np

from bitback.block.driver import BlockDriver, Extent, fill_zero
from bitback.block.open import FORMATS, MAX_CHAIN_DEPTH, open_image, resolve_backing
from bitback.errors import BitbackError, ImageFormatError, IOFailedError

__all__ = [
    "SECTOR",
    "AboveStatus",
    "ChainOpenError",
    "MapEntry",
    "backing_chain",
    "backing_of",
    "find_backing",
    "is_allocated_above",
    "iter_map",
    "iter_map_entries",
    "map_entry",
    "mergeable",
    "node_status",
    "open_chain",
    "read",
    "readinto",
    "status_above",
    "virtual_size",
]

SECTOR = 512

# Clusters asked of a driver in the first block-status query of a run, doubling up to the
# maximum (kept below the 4096 clusters past which bitback's qcow2 driver splits runs).
_FIRST_WINDOW_CLUSTERS = 32
_MAX_WINDOW_CLUSTERS = 2048


class ChainOpenError(BitbackError):
    """Opening an image or one of its backing files failed; the message nests the causes
    as qemu-img does (``Could not open backing file: Could not open 'b': ...``)."""

    def __init__(self, message: str, *, path: str | None = None, errno_: int = errno.EIO):
        super().__init__(message, path=path)
        self.errno = errno_


# -- opening --------------------------------------------------------------------------------


def _open_one(filename: str, fmt: str | None, *, read_only: bool) -> BlockDriver:
    """One node without its backing file; errors say what QEMU's open would say."""
    if os.path.isdir(filename):
        raise ChainOpenError(
            f"'file' driver requires '{filename}' to be a regular file",
            path=filename,
            errno_=errno.EISDIR,
        )
    return open_image(filename, fmt, read_only=read_only, backing=False)


def backing_of(node: BlockDriver) -> tuple[str | None, str | None]:
    """The backing file name and format stored in ``node`` (qcow2 headers; raw has none)."""
    header = getattr(node, "header", None)
    if header is None:
        return None, None
    name: str | None = header.backing_file or None
    fmt: str | None = header.backing_format
    return name, fmt


def open_chain(
    filename: str,
    fmt: str | None = None,
    *,
    read_only: bool = True,
    writable: Collection[int] = (),
    backing: bool = True,
) -> BlockDriver:
    """Open ``filename`` and (with ``backing``) its whole backing chain.

    The top node is writable unless ``read_only``; backing nodes are read-only except those
    whose depth (1 = the top's backing) is in ``writable`` (commit writes into its base).
    A failure deeper in the chain is reported the way qemu-img nests it::

        Could not open backing file: Could not open backing file: Could not open 'c': ...

    Raises :class:`~bitback.errors.BitbackError` (the driver's own for the top image,
    :class:`ChainOpenError` for backing files); nothing stays open after a failure.
    """
    top = _open_one(filename, fmt, read_only=read_only and 0 not in writable)
    seen = {os.path.realpath(filename)}
    node = top
    depth = 0
    try:
        while backing:
            name, bfmt = backing_of(node)
            if not name:
                break
            depth += 1
            path = resolve_backing(node.filename, name)
            real = os.path.realpath(path)
            if depth > MAX_CHAIN_DEPTH:
                raise ImageFormatError(
                    f"Backing chain of '{filename}' is deeper than {MAX_CHAIN_DEPTH} images",
                    path=filename,
                )
            try:
                if real in seen:
                    raise ImageFormatError(f"Backing file '{path}' creates an infinite loop.")
                seen.add(real)
                child = _open_one(
                    path, bfmt if bfmt in FORMATS else None, read_only=depth not in writable
                )
            except BitbackError as exc:
                raise ChainOpenError(
                    "Could not open backing file: " * depth + str(exc),
                    path=path,
                    errno_=exc.errno,
                ) from exc
            node.backing = child
            node = child
    except BaseException:
        top.close()
        raise
    return top


def backing_chain(node: BlockDriver) -> list[BlockDriver]:
    """``[node, node.backing, ...]``, top first."""
    out = []
    cur: BlockDriver | None = node
    while cur is not None:
        out.append(cur)
        cur = cur.backing
    return out


def find_backing(node: BlockDriver, name: str) -> BlockDriver | None:
    """The node below ``node`` that ``name`` designates (``bdrv_find_backing_image``).

    ``name`` matches a backing node if it is the name stored in its parent's header, or if
    it resolves (relative to the parent's directory, or as given) to the same file.
    """
    parent = node
    cur = node.backing
    while cur is not None:
        stored, _ = backing_of(parent)
        target = os.path.realpath(cur.filename)
        if name == stored or target in (
            os.path.realpath(resolve_backing(parent.filename, name)),
            os.path.realpath(name),
        ):
            return cur
        parent, cur = cur, cur.backing
    return None


def virtual_size(node: BlockDriver) -> int:
    """The size QEMU reports: the node's length rounded up to whole 512-byte sectors."""
    return -(-node.length() // SECTOR) * SECTOR


# -- one node ---------------------------------------------------------------------------------


def _l2_span(node: BlockDriver) -> int | None:
    """Guest bytes one L2 table maps (runs stop there, as QEMU's qcow2 runs do)."""
    cs = node.cluster_size
    return None if cs is None else cs * (cs // 8)


def _same_kind(a: Extent, b: Extent) -> bool:
    if (a.allocated, a.zero, a.data, a.compressed) != (b.allocated, b.zero, b.data, b.compressed):
        return False
    if (a.host_offset is None) != (b.host_offset is None):
        return False
    return a.host_offset is None or a.host_offset + a.length == b.host_offset


def _driver_extent(node: BlockDriver, offset: int, length: int) -> Extent:
    ext = node.block_status(offset, length)
    if ext.offset != offset or ext.length <= 0:
        raise IOFailedError(
            f"{node.filename}: block status at {offset} returned {ext.offset}+{ext.length}",
            errno=errno.EIO,
            path=node.filename,
        )
    n = min(ext.length, length)
    return ext if n == ext.length else replace(ext, length=n)


_PREALLOCATED: weakref.WeakKeyDictionary[BlockDriver, bool] = weakref.WeakKeyDictionary()


def _format_driver(node: BlockDriver) -> BlockDriver:
    """The driver behind ``node``: in bitbackd every driver is wrapped in a graph node, whose
    ``format_name`` is its own; format-specific decisions must see the driver."""
    inner = getattr(node, "driver", None)
    return inner if isinstance(inner, BlockDriver) else node


def metadata_preallocated(node: BlockDriver) -> bool:
    """QEMU's ``qcow2_detect_metadata_preallocation``, decided once per open node.

    An image whose file holds far fewer allocated bytes than its refcounts claim (made with
    ``preallocation=metadata``, or written by QEMU, which leaves holes in data clusters) gets
    its data ranges checked against the file's holes: holes inside data clusters then read
    as zero in block status ("zero": true, "data": true in qemu-img map).
    """
    node = _format_driver(node)
    cached = _PREALLOCATED.get(node)
    if cached is not None:
        return cached
    result = False
    file = getattr(node, "file", None)
    refcounts = getattr(node, "refcounts", None)
    cs = node.cluster_size
    if node.format_name == "qcow2" and file is not None and cs and hasattr(refcounts, "get_range"):
        real = file.allocated_file_size()
        if real is not None:
            real_clusters = real // cs
            threshold = max(real_clusters * 10 // 9, real_clusters + 2)
            end_cluster = -(-file.length() // cs)
            counts = refcounts.get_range(0, end_cluster) if end_cluster else np.zeros(0)  # type: ignore[union-attr]
            result = int(np.count_nonzero(counts)) >= threshold
    _PREALLOCATED[node] = result
    return result


def _recurse_into_file(node: BlockDriver, ext: Extent) -> Extent:
    """The generic layer's ``BDRV_BLOCK_RECURSE`` step for a data extent of ``node``."""
    file = getattr(_format_driver(node), "file", None)
    if file is None or ext.host_offset is None:
        return ext
    size = file.length()
    if ext.host_offset >= size:
        return replace(ext, zero=True)
    fst = file.block_status(ext.host_offset, min(ext.length, size - ext.host_offset))
    if fst.zero:
        if fst.end >= size:  # a hole up to the end of the file: zeros for the rest
            return replace(ext, zero=True)
        return replace(ext, length=min(ext.length, fst.length), zero=True)
    return replace(ext, length=min(ext.length, fst.length))


def node_status(node: BlockDriver, offset: int, length: int) -> Extent:
    """``bdrv_block_status`` of ``node`` alone at ``offset`` (at most ``length`` bytes).

    Returns an :class:`Extent` whose ``allocated`` means this node decides the content.
    Unallocated ranges get ``zero=True`` when nothing shows through (no backing, or past
    the backing's end) - still ``allocated=False``, as QEMU reports them. ``offset`` must be
    below :func:`virtual_size`; the sector-rounded tail of an odd-sized node reads as zeros
    (QEMU's file driver reports it as a hole).
    """
    vsize = virtual_size(node)
    length = min(length, vsize - offset)
    if length <= 0:
        raise IOFailedError(
            f"{node.filename}: block status at {offset} is past the end", path=node.filename
        )
    size = node.length()
    if offset >= size:  # only inside the rounded-up last sector
        ext = Extent(offset, length, allocated=True, zero=True, data=False)
    else:
        cap = min(offset + length, size)
        span = _l2_span(node)
        window = cap - offset
        if span is not None:
            cap = min(cap, (offset // span + 1) * span)
            # Ask for a few clusters first and widen while the run goes on: a driver's cost
            # may grow with the range asked, and fragmented images have short runs.
            window = _FIRST_WINDOW_CLUSTERS * (node.cluster_size or SECTOR)
        asked_end = offset + min(cap - offset, window)
        ext = _driver_extent(node, offset, asked_end - offset)
        # Drivers may report a long run in pieces; QEMU reports it whole. A run shorter
        # than what was asked has ended; one that fills the request may go on.
        while ext.end == asked_end < cap:
            window = min(window * 2, _MAX_WINDOW_CLUSTERS * (node.cluster_size or SECTOR))
            start = ext.end
            asked_end = start + min(cap - start, window)
            nxt = _driver_extent(node, start, asked_end - start)
            if not _same_kind(ext, nxt):
                break
            ext = replace(ext, length=nxt.end - offset)
        if (
            ext.data
            and not ext.zero
            and not ext.compressed
            and ext.host_offset is not None
            and metadata_preallocated(node)
        ):
            ext = _recurse_into_file(node, ext)
    if _format_driver(node).format_name == "raw" and ext.host_offset is None:
        ext = replace(ext, host_offset=offset)  # raw maps guest offsets 1:1, holes too
    if not ext.allocated:
        below = node.backing
        if below is None or offset >= virtual_size(below):
            ext = replace(ext, zero=True, data=False)
        else:
            ext = replace(ext, zero=False, data=False)
    return ext


# -- through the chain ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AboveStatus:
    """``bdrv_block_status_above``: who decides ``[offset, offset+length)`` above a base.

    The flags are QEMU's: ``allocated`` (some layer above the base decides the range, or it
    lies past the end of a short backing file), ``zero``, ``data``, ``offset_valid`` (the
    deciding layer stores it uncompressed) and ``eof`` (the run reaches the end of the top
    image or, when nothing decides it, of the lowest layer examined). ``node`` is the
    deciding layer (the lowest examined when none does), ``depth`` its distance from the top.
    """

    offset: int
    length: int
    allocated: bool
    zero: bool
    data: bool
    offset_valid: bool
    eof: bool
    depth: int
    node: BlockDriver

    @property
    def end(self) -> int:
        return self.offset + self.length

    def flags(self) -> tuple[bool, bool, bool, bool, bool]:
        """The status bits qemu-img compare -s compares."""
        return (self.allocated, self.zero, self.data, self.offset_valid, self.eof)


def status_above(
    top: BlockDriver, base: BlockDriver | None, offset: int, length: int
) -> AboveStatus:
    """Status of ``top`` through its chain down to ``base`` (exclusive; ``None``: all).

    ``offset`` must be below ``virtual_size(top)``.
    """
    if top is base:
        return AboveStatus(offset, length, False, False, False, False, False, 0, top)
    ext = node_status(top, offset, length)
    top_end = virtual_size(top)

    def result(e: Extent, node: BlockDriver, depth: int, eof: bool) -> AboveStatus:
        return AboveStatus(
            offset=offset,
            length=e.length,
            allocated=e.allocated,
            zero=e.zero,
            data=e.data,
            offset_valid=e.host_offset is not None and not e.compressed,
            eof=eof or offset + e.length == top_end,
            depth=depth,
            node=node,
        )

    if ext.allocated:
        return result(ext, top, 0, False)
    node, depth = top, 0
    cur = top.backing
    while cur is not None and cur is not base:
        depth += 1
        if offset >= virtual_size(cur):
            # The upper layer deferred to a short layer: zeros synthesized past its end
            # behave as if allocated.
            synth = Extent(offset, ext.length, allocated=True, zero=True, data=False)
            return result(synth, cur, depth, False)
        lower = node_status(cur, offset, ext.length)
        if lower.allocated:
            return result(lower, cur, depth, False)  # a lower layer's EOF is not the top's
        ext, node = lower, cur
        cur = cur.backing
    # Nothing above the base decides: the lowest examined layer's status, its EOF included.
    return result(ext, node, depth, ext.end == virtual_size(node))


def is_allocated_above(
    top: BlockDriver, base: BlockDriver | None, offset: int, length: int
) -> tuple[bool, int]:
    """``bdrv_is_allocated_above``: whether some layer from ``top`` down to ``base``
    (exclusive) decides the range at ``offset``, and for how many bytes that holds."""
    n = length
    cur: BlockDriver | None = top
    while cur is not None and cur is not base:
        size = virtual_size(cur)
        if offset < size:
            ext = node_status(cur, offset, length)
            if ext.allocated:
                return True, ext.length
            # A lower layer's run that reaches its own end does not bound the answer.
            if n > ext.length and (cur is top or ext.end < size):
                n = ext.length
        cur = cur.backing
    return False, n


@dataclass(frozen=True, slots=True)
class MapEntry:
    """One line of ``qemu-img map``: ``offset`` is None when QEMU prints none."""

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None = None
    filename: str | None = None
    compressed: bool = False

    @property
    def end(self) -> int:
        return self.start + self.length


def map_entry(top: BlockDriver, offset: int, length: int) -> MapEntry:
    """qemu-img map's ``get_block_status``: walk down until a layer says data or zero."""
    node, depth = top, 0
    while True:
        ext = node_status(node, offset, length)
        length = ext.length
        if ext.allocated or ext.zero or node.backing is None:
            break
        node = node.backing
        depth += 1
    has_offset = ext.host_offset is not None and not ext.compressed
    return MapEntry(
        start=offset,
        length=ext.length,
        depth=depth,
        present=ext.allocated,
        zero=ext.zero,
        data=ext.data,
        offset=ext.host_offset if has_offset else None,
        filename=node.filename if has_offset else None,
        compressed=ext.compressed,
    )


def iter_map_entries(
    top: BlockDriver, start: int = 0, end: int | None = None
) -> Iterator[MapEntry]:
    """Unmerged :func:`map_entry` results covering ``[start, end)`` in order."""
    stop = virtual_size(top) if end is None else min(end, virtual_size(top))
    pos = start
    while pos < stop:
        entry = map_entry(top, pos, stop - pos)
        yield entry
        pos = entry.end


def mergeable(cur: MapEntry, nxt: MapEntry) -> bool:
    """qemu-img map's ``entry_mergeable`` (7.2: no "compressed" field)."""
    if cur.length == 0:
        return False
    if (cur.zero, cur.data, cur.depth, cur.present) != (nxt.zero, nxt.data, nxt.depth, nxt.present):
        return False
    if cur.filename != nxt.filename:
        return False
    if (cur.offset is None) != (nxt.offset is None):
        return False
    return cur.offset is None or nxt.offset == cur.offset + cur.length


def iter_map(top: BlockDriver, start: int = 0, end: int | None = None) -> Iterator[MapEntry]:
    """Map entries merged into maximal runs, as ``qemu-img map --output=json`` prints them.

    Example: a 64 MiB image with 1 MiB of data at 0 yields two entries,
    ``(0, 1M, data, offset=...)`` and ``(1M, 63M, zero, present=False)``.
    """
    cur: MapEntry | None = None
    for entry in iter_map_entries(top, start, end):
        if cur is not None and mergeable(cur, entry):
            cur = replace(cur, length=cur.length + entry.length)
            continue
        if cur is not None:
            yield cur
        cur = entry
    if cur is not None:
        yield cur


# -- reading ------------------------------------------------------------------------------


def readinto(node: BlockDriver, offset: int, dest: memoryview) -> None:
    """Fill ``dest`` with what the guest reads at ``offset``.

    Format drivers fall through to their backing node themselves (zeros past its end, as the
    driver contract requires); this adds the zeros past the node's own end, up to the
    sector-rounded :func:`virtual_size` QEMU reads (the tail of an odd-sized raw file).
    One driver request covers the whole range, whatever mix of clusters it spans.
    """
    n = max(0, min(len(dest), node.length() - offset))
    if n:
        node.readinto(offset, dest[:n])
    if n < len(dest):
        fill_zero(dest[n:])


def read(node: BlockDriver, offset: int, length: int) -> bytes:
    """:func:`readinto` into a new buffer."""
    buf = bytearray(length)
    readinto(node, offset, memoryview(buf))
    return bytes(buf)
