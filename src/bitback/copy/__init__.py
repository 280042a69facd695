"""Block-copy and copy-before-write: the data path of a backup, with no job in it.

* :mod:`bitback.copy.block_copy` - :class:`BlockCopyState`, the copy set of one copy (one
  bit per job cluster) and the copier that moves dirty clusters from a source node to a
  target node; :func:`job_cluster_size`; :class:`CopyError`.
* :mod:`bitback.copy.before_write` - :class:`CopyBeforeWrite`, the node hook that saves a
  cluster's old contents before a guest write changes it, so a copy captures one point in
  time.

Layering: this package uses :mod:`bitback.errors`, :mod:`bitback.bitmaps` and
:mod:`bitback.block` only; jobs (speed, pause, error policies, events) live above it. It is
synchronous and single-threaded, like the block layer it drives.
"""

from __future__ import annotations

from bitback.copy.before_write import ON_CBW_ERROR, CopyBeforeWrite, OnCbwError
from bitback.copy.block_copy import (
    DEFAULT_CLUSTER_SIZE,
    MAX_BUFFER,
    BlockCopyState,
    ClusterSizeError,
    CopyError,
    job_cluster_size,
)

__all__ = [
    "DEFAULT_CLUSTER_SIZE",
    "MAX_BUFFER",
    "ON_CBW_ERROR",
    "BlockCopyState",
    "ClusterSizeError",
    "CopyBeforeWrite",
    "CopyError",
    "OnCbwError",
    "job_cluster_size",
]
