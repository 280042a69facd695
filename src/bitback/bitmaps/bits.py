"""One bit per granule: the storage under every dirty bitmap.

A :class:`GranuleBits` covers a disk of ``size`` bytes with granules of ``granularity`` bytes
(a power of two). Bit ``i`` stands for bytes ``[i*g, (i+1)*g)``; the last granule may reach
past the end of the disk. Offsets and lengths in the API are always in *bytes*::

    size = 160 KiB + 512, granularity = 64 KiB  ->  3 granules, the last one mostly past the end

    byte  0          64k         128k        160k+512    192k
          |  bit 0    |  bit 1    |  bit 2    |...........|
                                              ^ end of disk

    set_range(100, 1)        -> bit 0      (any granule the range touches becomes dirty)
    set_range(64k, 64k + 1)  -> bits 1, 2
    count()                  -> 3 * 64k    (whole granules, not clipped to the disk size)

Why ``bitarray``: one bit per granule, so a 1 TiB disk at 64 KiB granularity costs 2 MiB;
slice assignment, ``count`` and ``find`` run in C, so marking a 1 GiB write, clearing,
counting and finding the next dirty or clean extent never loop over granules in Python (only
iterating extents costs one Python step per extent); and its little-endian byte layout is
exactly the last level of QEMU's HBitmap (an array of 64-bit words, bit ``i`` at bit ``i % 64``
of word ``i // 64``, stored little-endian), so :meth:`GranuleBits.sha256` hashes
:meth:`GranuleBits.to_bytes` with no conversion and matches QMP's
``x-debug-block-dirty-bitmap-sha256``. The same layout is the qcow2 bitmap data format.

The array always holds exactly ``ceil(size / granularity)`` bits, so no bit past the last
granule can ever be set; QEMU's rounding to whole 64-bit words happens only when serializing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from bitarray import bitarray
from bitarray.util import zeros

from bitback.errors import InvalidArgumentError

__all__ = ["GranuleBits", "granules_for"]

INT64_MAX = (1 << 63) - 1

_WORD_BYTES = 8  # QEMU's HBitmap words are unsigned long: 64 bits on every 64-bit host


def granules_for(size: int, granularity: int) -> int:
    """Number of granules covering ``size`` bytes: ``ceil(size / granularity)``.

    >>> granules_for(64 << 20, 65536), granules_for((64 << 20) + 512, 65536), granules_for(0, 512)
    (1024, 1025, 0)
    """
    return -(-size // granularity)


def _check_size(size: int) -> None:
    if not 0 <= size <= INT64_MAX:
        raise InvalidArgumentError(f"Invalid bitmap size {size}")


class GranuleBits:
    """Bit ``i`` covers bytes ``[i*g, (i+1)*g)`` of a disk of ``size`` bytes.

    Contracts shared by every method:

    * ranges are byte ranges; a range marks or clears every granule it intersects, and is
      clipped to ``[0, size)`` first (a range wholly past the end does nothing);
    * negative offsets or lengths raise :class:`~bitback.errors.InvalidArgumentError`;
    * results that are byte offsets are never below the ``offset`` asked about and never at or
      past ``size`` (the end of the disk), even though granules are whole.

    Instances are mutable and compare equal when geometry and bits are equal.
    """

    __slots__ = ("_bits", "granularity", "size")

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __init__(self, size: int, granularity: int) -> None:
        if granularity < 1 or granularity & (granularity - 1):
            raise InvalidArgumentError(f"Granularity {granularity} is not a power of 2")
        _check_size(size)
        self.size = size
        self.granularity = granularity
        self._bits: bitarray = zeros(granules_for(size, granularity), endian="little")

    # ---------------------------------------------------------------- geometry helpers

    def __len__(self) -> int:
        """Number of granules (bits), dirty or not."""
        return len(self._bits)

    def _granule_span(self, offset: int, length: int) -> tuple[int, int] | None:
        """Granules ``[first, stop)`` intersecting ``[offset, offset+length)`` clipped to size."""
        if offset < 0 or length < 0:
            raise InvalidArgumentError(f"Invalid range: offset {offset}, length {length}")
        end = min(offset + length, self.size)
        if offset >= end:
            return None
        g = self.granularity
        return offset // g, (end - 1) // g + 1

    def _search_span(self, offset: int, end: int | None) -> tuple[int, int, int] | None:
        """(first granule, stop granule, clipped end byte) for a search in ``[offset, end)``."""
        if offset < 0 or (end is not None and end < 0):
            raise InvalidArgumentError(f"Invalid range: offset {offset}, end {end}")
        stop = self.size if end is None else min(end, self.size)
        if offset >= stop:
            return None
        g = self.granularity
        return offset // g, (stop - 1) // g + 1, stop

    # ---------------------------------------------------------------- marking

    def set_range(self, offset: int, length: int) -> None:
        """Mark dirty every granule intersecting ``[offset, offset+length)``.

        ``length == 0`` does nothing; the range is clipped to the disk size.
        """
        span = self._granule_span(offset, length)
        if span is not None:
            self._bits[span[0] : span[1]] = 1

    def reset_range(self, offset: int, length: int) -> None:
        """Mark clean every granule intersecting ``[offset, offset+length)``.

        QEMU 7.2 (``hbitmap_reset``) asserts that ``offset`` is granule-aligned and that
        ``length`` is too unless the range ends at the end of the disk; for such ranges the
        granules intersecting the range are exactly the granules it covers. For unaligned
        ranges this keeps the older HBitmap behaviour (every touched granule is cleared), so
        callers wanting "never lose a dirty byte" must pass aligned ranges.
        """
        span = self._granule_span(offset, length)
        if span is not None:
            self._bits[span[0] : span[1]] = 0

    def set_all(self) -> None:
        """Mark every granule dirty."""
        self._bits.setall(1)

    def clear(self) -> None:
        """Mark every granule clean (``block-dirty-bitmap-clear``)."""
        self._bits.setall(0)

    # ---------------------------------------------------------------- queries

    def granules(self) -> int:
        """Number of dirty granules."""
        return self._bits.count(1)

    def count(self) -> int:
        """Dirty bytes: dirty granules times granularity, *not* clipped to the disk size.

        A 64 MiB + 512 B disk at 64 KiB granularity with only its last 512 bytes written
        reports 65536 (spec 5.2, QEMU ``hbitmap_count``).
        """
        return self._bits.count(1) * self.granularity

    def empty(self) -> bool:
        """True when no granule is dirty."""
        return not self._bits.any()

    def get(self, offset: int) -> bool:
        """Whether the granule holding byte ``offset`` (``0 <= offset < size``) is dirty."""
        if not 0 <= offset < self.size:
            raise InvalidArgumentError(f"Offset {offset} is outside the bitmap (size {self.size})")
        return bool(self._bits[offset // self.granularity])

    def next_dirty(self, offset: int, end: int | None = None) -> int | None:
        """First dirty byte in ``[offset, min(end, size))``, or ``None``.

        The answer is the start of the first dirty granule, raised to ``offset`` when that
        granule starts before it (QEMU ``hbitmap_next_dirty``). With 64 KiB granules and
        granule 1 dirty, ``next_dirty(0) == 65536`` and ``next_dirty(70000) == 70000``.
        """
        span = self._search_span(offset, end)
        if span is None:
            return None
        index = self._bits.find(1, span[0], span[1])
        return None if index < 0 else max(offset, index * self.granularity)

    def next_clean(self, offset: int, end: int | None = None) -> int | None:
        """First clean byte in ``[offset, min(end, size))``, or ``None`` (``hbitmap_next_zero``)."""
        span = self._search_span(offset, end)
        if span is None:
            return None
        index = self._bits.find(0, span[0], span[1])
        return None if index < 0 else max(offset, index * self.granularity)

    def next_dirty_area(
        self, offset: int, end: int | None = None, max_length: int | None = None
    ) -> tuple[int, int] | None:
        """The first dirty run in ``[offset, min(end, size))`` as ``(start, length)``, or None.

        The run is maximal (it stops at the next clean granule or at the clipped end) and at most
        ``max_length`` bytes long when that is given (QEMU ``hbitmap_next_dirty_area``).
        """
        if max_length is not None and max_length <= 0:
            raise InvalidArgumentError(f"Invalid maximum length {max_length}")
        span = self._search_span(offset, end)
        if span is None:
            return None
        first, stop_granule, stop = span
        index = self._bits.find(1, first, stop_granule)
        if index < 0:
            return None
        start = max(offset, index * self.granularity)
        if max_length is not None:
            stop = min(stop, start + max_length)
            stop_granule = (stop - 1) // self.granularity + 1
        clean = self._bits.find(0, index, stop_granule)
        if clean >= 0:
            stop = clean * self.granularity  # > start: granule `index` is dirty
        return start, stop - start

    def dirty_extents(self, offset: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        """Maximal dirty byte runs ``(start, length)`` inside ``[offset, min(end, size))``.

        One Python step per run; the searches in between run in C. Granules 1-2 and 5 dirty at
        64 KiB on a 320 KiB + 1 disk, whole disk -> ``(65536, 131072), (327680, 1)``.
        """
        pos = offset
        while True:
            area = self.next_dirty_area(pos, end)
            if area is None:
                return
            yield area
            pos = area[0] + area[1]

    # ---------------------------------------------------------------- whole-bitmap operations

    def resize(self, new_size: int) -> None:
        """Follow the disk to ``new_size`` bytes (QEMU ``hbitmap_truncate``).

        Growing adds clean granules. Shrinking drops the granules that start at or past the new
        end; a granule the new end falls inside keeps its bit.
        """
        _check_size(new_size)
        want = granules_for(new_size, self.granularity)
        have = len(self._bits)
        if want > have:
            self._bits.extend(zeros(want - have, endian="little"))
        elif want < have:
            del self._bits[want:]
        self.size = new_size

    def merge(self, other: GranuleBits) -> None:
        """OR ``other`` into this bitmap.

        Same granularity: a C-speed OR over the common granules (``other`` is clipped to this
        size). Different granularity: each dirty byte run of ``other``, clipped to this size,
        is marked here, which is QEMU's sparse merge (one Python step per run of ``other``).
        """
        if other.granularity == self.granularity:
            n = min(len(self._bits), len(other._bits))
            if n == len(self._bits) == len(other._bits):
                self._bits |= other._bits
            elif n:
                self._bits[:n] |= other._bits[:n]
            return
        for start, length in other.dirty_extents(0, self.size):
            self.set_range(start, length)

    def copy(self) -> GranuleBits:
        """An independent bitmap with the same geometry and bits."""
        twin = type(self).__new__(type(self))
        twin.size = self.size
        twin.granularity = self.granularity
        twin._bits = self._bits.copy()
        return twin

    def assign(self, other: GranuleBits) -> None:
        """Replace the bits with ``other``'s; both must have the same size and granularity."""
        if (other.size, other.granularity) != (self.size, self.granularity):
            raise InvalidArgumentError(
                f"Cannot assign a bitmap of size {other.size}/granularity {other.granularity} "
                f"to one of size {self.size}/granularity {self.granularity}"
            )
        self._bits = other._bits.copy()

    # ---------------------------------------------------------------- serialization

    def to_bytes(self) -> bytes:
        """The bits as QEMU's HBitmap last level holds them.

        Little-endian bit order (granule ``i`` is bit ``i % 8`` of byte ``i // 8``), zero
        padded to whole 64-bit words, at least one word: a 1024-granule bitmap gives 128 bytes,
        a 1025-granule one 136, an empty one 8.
        """
        data = self._bits.tobytes()  # pad bits are zero
        words = max(1, -(-len(data) // _WORD_BYTES))
        return data + bytes(words * _WORD_BYTES - len(data))

    @classmethod
    def from_bytes(cls, data: bytes, size: int, granularity: int) -> GranuleBits:
        """Rebuild a bitmap from :meth:`to_bytes`-style data (also qcow2 bitmap data).

        ``data`` must hold at least ``ceil(granules / 8)`` bytes; bits past the last granule
        and bytes past that are ignored.
        """
        bits = cls(size, granularity)
        need = -(-len(bits._bits) // 8)
        if len(data) < need:
            raise InvalidArgumentError(
                f"Bitmap data too short: {len(data)} bytes for {len(bits._bits)} granules"
            )
        loaded = bitarray(endian="little")
        loaded.frombytes(bytes(data[:need]))
        del loaded[len(bits._bits) :]
        bits._bits = loaded
        return bits

    def sha256(self) -> str:
        """Hex SHA-256 of :meth:`to_bytes`, as QMP ``x-debug-block-dirty-bitmap-sha256`` gives.

        An empty 64 MiB bitmap at 64 KiB granularity hashes 128 zero bytes.
        """
        return hashlib.sha256(self.to_bytes()).hexdigest()

    # ---------------------------------------------------------------- dunders

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GranuleBits):
            return NotImplemented
        return (self.size, self.granularity) == (other.size, other.granularity) and (
            self._bits == other._bits
        )

    def __repr__(self) -> str:
        return (
            f"GranuleBits(size={self.size}, granularity={self.granularity}, "
            f"dirty_granules={self.granules()})"
        )
