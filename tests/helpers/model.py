"""A bytearray model of what a guest reads from a qcow2 image driven by qemu-io commands.

The model is the oracle that both ``bitback-io`` and real ``qemu-io`` are held to. It encodes
QEMU 7.2's semantics exactly as far as they are visible to a guest (measured with qemu-io 7.2,
which opens images with ``discard=unmap`` and write-through caching):

* ``write [-P p] O L``: ``L`` bytes of ``p`` (default ``0xcd``) at ``O``; any alignment.
* ``write -z [-u] O L``: the range reads as zeros (never falls through to a backing file).
* ``discard O L``: every *whole* cluster inside the range reads as zeros afterwards (v3 zero
  flag, with or without a backing file); partial clusters at the edges are left as they were.
  A cluster that is the image's partial last cluster counts as whole when the range reaches
  the end of the image (``qcow2_co_pdiscard`` allows exactly that case). On a version 2
  image (compat 0.10, no zero flag) discarded clusters become unallocated, which reads as
  zeros without a backing file; *with* a backing file QEMU ignores the discard (it would
  expose the backing file), so it changes nothing.
* ``truncate N``: shrinking drops the clusters past ``N``; *growing* makes the new area read
  as zeros, with one QEMU subtlety the model keeps:

  - with a backing file longer than the old size, QEMU writes zeros over the new area
    (``BDRV_REQ_ZERO_WRITE`` in ``bdrv_co_truncate``), so it reads as zeros;
  - on a version 2 image that zeroing cannot use zero clusters, and QEMU 7.2 fails the
    truncate (``Failed to zero out new clusters: Operation not supported``, size unchanged)
    as soon as the new size reaches past the old last cluster; growing inside it works;
  - otherwise the new area of the old *partial last cluster* reads whatever that cluster
    still holds past the old end: data from before an earlier shrink comes back. Example with
    4 KiB clusters and no backing file: ``write -P 0x41 0 20k; truncate 17k; truncate 20k``
    and ``[17k, 20k)`` reads ``0x41`` again, on QEMU and on bitback alike.

To express the second rule the model stores each image's bytes up to the end of its last
cluster (``tail``): the bytes past the virtual size that a later growth could expose.
Operations that rewrite a whole cluster (``write -z`` or ``discard`` covering it, or reaching
the end of the image) zero the tail; partial writes leave it alone; a shrink turns the cut-off
bytes of the last cluster into tail.

Where QEMU and bitback may legitimately differ (QEMU's copy-on-write fills a new cluster's
part past the end of the image from the backing file, bitback with zeros), the difference can
never become visible: a later growth either writes zeros there (backing longer than the size)
or the backing file holds only zeros there. The model keeps QEMU's choice.

Requests that reach past the end of the image fail (``write failed: Input/output error``) and
change nothing; :meth:`DiskModel.apply` returns False for them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "DEFAULT_PATTERN",
    "DataOp",
    "Discard",
    "DiskModel",
    "Op",
    "Truncate",
    "Write",
    "WriteZeroes",
    "commands",
    "first_difference",
]

DEFAULT_PATTERN = 0xCD


@dataclass(frozen=True, slots=True)
class Write:
    """``write -P pattern offset length``."""

    offset: int
    length: int
    pattern: int = DEFAULT_PATTERN

    def command(self) -> str:
        return f"write -P 0x{self.pattern:02x} {self.offset} {self.length}"


@dataclass(frozen=True, slots=True)
class WriteZeroes:
    """``write -z [-u] offset length`` (``-u``: the driver may deallocate)."""

    offset: int
    length: int
    unmap: bool = False

    def command(self) -> str:
        return f"write -z{' -u' if self.unmap else ''} {self.offset} {self.length}"


@dataclass(frozen=True, slots=True)
class Discard:
    """``discard offset length``."""

    offset: int
    length: int

    def command(self) -> str:
        return f"discard {self.offset} {self.length}"


@dataclass(frozen=True, slots=True)
class Truncate:
    """``truncate size`` (grow or shrink; qemu-io passes ``exact=true``)."""

    size: int

    def command(self) -> str:
        return f"truncate {self.size}"


DataOp = Write | WriteZeroes | Discard
Op = DataOp | Truncate


def commands(ops: Iterable[Op]) -> list[str]:
    """The qemu-io command lines of ``ops``, in order."""
    return [op.command() for op in ops]


class DiskModel:
    """Guest-visible content of one qcow2 image (see the module docstring).

    ``backing`` is what the backing file reads as (its whole virtual size), or None;
    ``version`` the qcow2 version (2 for compat 0.10, 3 for 1.1).
    """

    def __init__(self, size: int, cluster_size: int,
                 backing: bytes | bytearray | memoryview | None = None, *,
                 version: int = 3) -> None:
        if size % 512 or cluster_size & (cluster_size - 1):
            raise ValueError("size must be a multiple of 512, cluster size a power of two")
        self.cluster_size = cluster_size
        self.size = size
        self.version = version
        self.backing_length = None if backing is None else len(backing)
        # Unallocated clusters read the backing file, past its end zeros; that is also what
        # QEMU's copy-on-write puts in the tail of the last cluster.
        span = self._cluster_end(size)
        if backing is None:
            self.data = bytearray(span)
        else:
            self.data = bytearray(memoryview(backing)[:span])
            self.data += bytes(span - len(self.data))

    def _cluster_end(self, offset: int) -> int:
        cs = self.cluster_size
        return -(-offset // cs) * cs

    def _whole_clusters(self, offset: int, end: int) -> tuple[int, int]:
        """Whole clusters inside ``[offset, end)``; the last partial cluster of the image
        counts as whole when the range reaches the end of the image."""
        cs = self.cluster_size
        lo = self._cluster_end(offset)
        hi = end // cs * cs
        if end == self.size:
            hi = self._cluster_end(end)
        return lo, hi

    def in_range(self, offset: int, length: int) -> bool:
        return offset >= 0 and length >= 0 and offset + length <= self.size

    def apply(self, op: Op) -> bool:
        """Apply one operation; False (and no change) when QEMU would fail it."""
        if isinstance(op, Truncate):
            return self._truncate(op.size)
        if not self.in_range(op.offset, op.length):
            return False
        end = op.offset + op.length
        if isinstance(op, Write):
            self.data[op.offset : end] = bytes([op.pattern]) * op.length
        elif isinstance(op, WriteZeroes):
            self.data[op.offset : end] = bytes(op.length)
            lo, hi = self._whole_clusters(op.offset, end)
            if lo < hi:  # whole clusters become zero clusters: their tail reads zero too
                self.data[lo:hi] = bytes(hi - lo)
        elif self.version >= 3 or self.backing_length is None:
            lo, hi = self._whole_clusters(op.offset, end)
            if lo < hi:
                self.data[lo:hi] = bytes(hi - lo)
        return True

    def apply_all(self, ops: Sequence[Op]) -> bool:
        """Apply every operation; True if all succeeded."""
        ok = True
        for op in ops:
            ok = self.apply(op) and ok
        return ok

    def _truncate(self, size: int) -> bool:
        if size < 0 or size % 512:
            return False
        old = self.size
        if size < old:
            del self.data[self._cluster_end(size) :]
        elif size > old:
            zero_write = self.backing_length is not None and self.backing_length > old
            if zero_write and self.version < 3 and size > self._cluster_end(old):
                return False  # no zero clusters in v2: QEMU cannot zero the new clusters
            if zero_write:
                # QEMU zeros [old, size); a tail past the new end stays what it was.
                self.data[old : min(size, len(self.data))] = bytes(min(size, len(self.data)) - old)
            self.data += bytes(self._cluster_end(size) - len(self.data))
        self.size = size
        return True

    def buffer(self) -> memoryview:
        """The guest-visible bytes without copying them (valid until the next change)."""
        return memoryview(self.data)[: self.size]

    def view(self) -> bytes:
        """What a guest reads: the whole virtual size."""
        return bytes(memoryview(self.data)[: self.size])


def first_difference(a: bytes, b: bytes) -> int | None:
    """Offset of the first byte where ``a`` and ``b`` differ (or the shorter length)."""
    if a == b:
        return None
    n = min(len(a), len(b))
    lo, hi = 0, n
    # Binary search on prefix equality: fast on large buffers.
    while hi - lo > 4096:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    for i in range(lo, hi):
        if a[i] != b[i]:
            return i
    return n
