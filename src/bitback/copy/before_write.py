"""Copy-before-write: the hook that makes a copy capture one point in time.

QEMU inserts a ``copy-before-write`` filter node above the source for the length of a backup
job (``block/copy-before-write.c``); every guest write, write-zeroes and discard passes
through it, and before the request goes down the filter has block-copy save whatever the
request is about to change. bitback needs no extra node for this: every
:class:`~bitback.block.node.BlockNode` calls its ``before_write`` hooks with
``(offset, length)`` before a write of any kind reaches its driver, and a hook that raises
fails the write with nothing written and no bitmap marked. :class:`CopyBeforeWrite` is such
a hook.

What gets saved: every job cluster of the copy set that the request touches, however little
of it (``cbw_do_copy_before_write`` widens the request to whole clusters)::

    guest write             [=====)                       offset 100k, length 40k
    job clusters (64k)  |   c1   |   c2   |   c3   |
    copy bitmap         | dirty  | clean  | dirty  |      c1: copied now, then written
                                                          c2: done (or never in the set):
                                                              nothing to save
                                                          c3: not touched: left for the job

Clusters saved this way leave the copy set (the job will not copy them again) and count as
progress, as in QEMU, so a job that started with ``len`` bytes still ends at ``offset ==
len``. The guest's new data is recorded by the node's dirty bitmaps (the successor of a
frozen bitmap), never in the copy set.

Errors (``on-cbw-error``, QEMU 7.1+): with the default ``break-guest-write`` a failed early
copy fails the guest's write with the :class:`~bitback.copy.block_copy.CopyError` - the guest
sees an I/O error and its data is not written, but the copy stays exact. With
``break-snapshot`` the guest's write proceeds, the first error is kept in
:attr:`CopyBeforeWrite.snapshot_error`, and no further copies are made: the copy no longer
represents a point in time and its user must fail it.

Like the rest of :mod:`bitback.copy`, this runs on the daemon's single I/O thread: the hook
runs to completion inside the guest's request, so no lock is needed and the early copy and
the guest write cannot interleave with a job's copy of the same cluster.
"""

from __future__ import annotations

from typing import Literal

from bitback.block.node import BlockNode
from bitback.copy.block_copy import BlockCopyState, CopyError
from bitback.errors import InvalidArgumentError

__all__ = ["ON_CBW_ERROR", "CopyBeforeWrite", "OnCbwError"]

OnCbwError = Literal["break-guest-write", "break-snapshot"]
ON_CBW_ERROR: tuple[OnCbwError, ...] = ("break-guest-write", "break-snapshot")


class CopyBeforeWrite:
    """Saves the old contents of copy-set clusters before the guest changes them.

    ``source`` must be the node whose writes the copy has to precede - the node the copy
    reads from (``bcs.source``), since a write anywhere else would not change what the copy
    reads. :meth:`attach` starts watching, :meth:`detach` stops (both idempotent).
    """

    def __init__(
        self,
        source: BlockNode,
        bcs: BlockCopyState,
        *,
        on_cbw_error: OnCbwError = "break-guest-write",
    ) -> None:
        if on_cbw_error not in ON_CBW_ERROR:
            raise InvalidArgumentError(f"Invalid parameter '{on_cbw_error}'")
        if source is not bcs.source:
            raise InvalidArgumentError(
                f"copy-before-write on node '{source.node_name}' but the copy reads from "
                f"'{bcs.source.node_name}'"
            )
        self.source = source
        self.bcs = bcs
        self.on_cbw_error: OnCbwError = on_cbw_error
        self.snapshot_error: CopyError | None = None
        self.copied = 0  # bytes saved ahead of guest writes (a subset of the progress)
        self._hook = self._before_write  # one bound method, so detach finds the same object

    @property
    def attached(self) -> bool:
        return any(hook is self._hook for hook in self.source.before_write)

    def attach(self) -> None:
        """Start saving clusters ahead of guest writes to ``source``."""
        if not self.attached:
            self.source.before_write.append(self._hook)

    def detach(self) -> None:
        """Stop; the clusters still in the copy set are left to the copy's owner."""
        hooks = self.source.before_write
        hooks[:] = [hook for hook in hooks if hook is not self._hook]

    def _before_write(self, offset: int, length: int) -> None:
        """The node's hook: runs before a write, write-zeroes or discard of the range."""
        if self.snapshot_error is not None:
            return  # break-snapshot already gave up on this copy
        try:
            self.copied += self.bcs.before_write(offset, length)
        except CopyError as exc:
            if self.on_cbw_error == "break-guest-write":
                raise
            self.snapshot_error = exc

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"<CopyBeforeWrite {self.source.node_name} {state} {self.on_cbw_error}>"
