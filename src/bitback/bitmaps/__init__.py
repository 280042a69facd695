"""Dirty bitmaps: which granules of a disk changed since a point in time.

* :mod:`bitback.bitmaps.bits` - :class:`GranuleBits`, one bit per granule (bitarray-backed),
  with range marking, extent search, resize, merge and QEMU's debug SHA-256.
* :mod:`bitback.bitmaps.dirty` - :class:`DirtyBitmap`, the QMP-visible bitmap: flags, status,
  the create-successor / abdicate / reclaim protocol, usability checks and granularity rules.

This package knows nothing of nodes, jobs or transactions; the block layer owns the list of
bitmaps of a node and marks them after writes.
"""

from __future__ import annotations

from bitback.bitmaps.bits import GranuleBits, granules_for
from bitback.bitmaps.dirty import (
    DEFAULT_GRANULARITY,
    MAX_GRANULARITY,
    MIN_GRANULARITY,
    BitmapBusyError,
    BitmapInconsistentError,
    BitmapReadOnlyError,
    BitmapStateError,
    BitmapStatus,
    DirtyBitmap,
    GranularityError,
    check_granularity,
    default_granularity,
)

__all__ = [
    "DEFAULT_GRANULARITY",
    "MAX_GRANULARITY",
    "MIN_GRANULARITY",
    "BitmapBusyError",
    "BitmapInconsistentError",
    "BitmapReadOnlyError",
    "BitmapStateError",
    "BitmapStatus",
    "DirtyBitmap",
    "GranularityError",
    "GranuleBits",
    "check_granularity",
    "default_granularity",
    "granules_for",
]
