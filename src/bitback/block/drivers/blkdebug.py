"""The ``blkdebug`` filter: fault injection driven by events from the node above.

A blkdebug node sits between a format node and its protocol node and passes every request
through, except when an *active* error rule matches it. Rules come in two kinds (spec 7.1):

``set-state {event, state?, new_state}``
    When ``event`` happens in ``state`` (absent or 0: any state), the node moves to
    ``new_state``.
``inject-error {event, state?, errno=5, sector?, once=false, immediately=false, iotype?}``
    When ``event`` happens in ``state``, the rule becomes active; an active rule fails the
    next matching request with ``errno`` instead of passing it down. ``once`` removes the rule
    for good after it fired; otherwise it keeps failing.

Every rule of an event sees the state as it was *before* the event; the state changes after
all of them ran. The first inject rule that matches an event first deactivates all rules that
were active. Example (QEMU 7.2 measured): rules ``read_aio 1->2``, ``read_aio 2->3`` and an
inject at state 2: the first read passes, the second fails, the third passes.

Events arrive through :meth:`debug_event` from the node whose child this is; they are named
as in QAPI's ``BlkdebugEvent`` (:data:`EVENTS`).
"""

from __future__ import annotations

import errno as _errno
import os
from dataclasses import dataclass
from typing import Any

from bitback.block.driver import BlockDriver, Extent
from bitback.errors import IOFailedError

__all__ = ["EVENTS", "IOTYPES", "BlkdebugDriver", "ErrorRule", "StateRule"]

# QAPI BlkdebugEvent, in schema order. The qcow2 driver raises read_aio, read_backing_aio,
# read_compressed, write_aio, write_compressed, cluster_alloc, l2_load, l2_update, l1_update,
# refblock_load, refblock_update; every node raises flush_to_os and flush_to_disk. The others
# are accepted in rules and never fire.
EVENTS = (
    "l1_update", "l1_grow_alloc_table", "l1_grow_write_table", "l1_grow_activate_table",
    "l2_load", "l2_update", "l2_update_compressed", "l2_alloc_cow_read", "l2_alloc_write",
    "read_aio", "read_backing_aio", "read_compressed", "write_aio", "write_compressed",
    "vmstate_load", "vmstate_save", "cow_read", "cow_write", "reftable_load", "reftable_grow",
    "reftable_update", "refblock_load", "refblock_update", "refblock_update_part",
    "refblock_alloc", "refblock_alloc_hookup", "refblock_alloc_write",
    "refblock_alloc_write_blocks", "refblock_alloc_write_table", "refblock_alloc_switch_table",
    "cluster_alloc", "cluster_alloc_bytes", "cluster_free", "flush_to_os", "flush_to_disk",
    "pwritev_rmw_head", "pwritev_rmw_after_head", "pwritev_rmw_tail", "pwritev_rmw_after_tail",
    "pwritev", "pwritev_zero", "pwritev_done", "empty_image_prepare", "l1_shrink_write_table",
    "l1_shrink_free_l2_clusters", "cor_write", "cluster_alloc_space", "none",
)  # fmt: skip

# QAPI BlkdebugIOType. A rule without ``iotype`` matches all of them but block-status.
IOTYPES = ("read", "write", "write-zeroes", "discard", "flush", "block-status")
_DEFAULT_IOTYPES = frozenset(IOTYPES) - {"block-status"}


@dataclass(slots=True)
class ErrorRule:
    """An ``inject-error`` rule. ``offset`` is ``sector * 512``, or ``None`` for any."""

    event: str
    state: int = 0
    errno: int = _errno.EIO
    offset: int | None = None
    once: bool = False
    immediately: bool = False
    iotypes: frozenset[str] = _DEFAULT_IOTYPES

    def matches(self, iotype: str, offset: int, length: int) -> bool:
        if iotype not in self.iotypes:
            return False
        return self.offset is None or (length > 0 and offset <= self.offset < offset + length)


@dataclass(frozen=True, slots=True)
class StateRule:
    """A ``set-state`` rule."""

    event: str
    new_state: int
    state: int = 0


def rules_from_options(options: dict[str, Any]) -> tuple[list[ErrorRule], list[StateRule]]:
    """Build rules from validated ``blockdev-add`` blkdebug options."""
    errors = [
        ErrorRule(
            event=r["event"],
            state=r.get("state", 0),
            errno=r.get("errno", _errno.EIO),
            offset=r["sector"] * 512 if r.get("sector", -1) >= 0 else None,
            once=r.get("once", False),
            immediately=r.get("immediately", False),
            iotypes=frozenset([r["iotype"]]) if "iotype" in r else _DEFAULT_IOTYPES,
        )
        for r in options.get("inject-error", [])
    ]
    states = [
        StateRule(event=r["event"], new_state=r["new_state"], state=r.get("state", 0))
        for r in options.get("set-state", [])
    ]
    return errors, states


class BlkdebugDriver(BlockDriver):
    """A pass-through filter over ``image`` that fails requests as its rules say."""

    format_name = "blkdebug"

    def __init__(
        self,
        image: BlockDriver,
        errors: list[ErrorRule],
        states: list[StateRule],
        *,
        read_only: bool,
    ) -> None:
        super().__init__(image.filename, read_only=read_only)
        self.image = image
        self.grows_on_write = image.grows_on_write
        self.state = 1
        self._errors = list(errors)
        self._states = list(states)
        self._active: list[ErrorRule] = []

    def children(self) -> list[tuple[str, BlockDriver]]:
        return [("image", self.image)]

    # -- events ---------------------------------------------------------------------------
    def debug_event(self, event: str) -> None:
        before = self.state
        new_state = before
        armed_any = False
        # QEMU keeps each event's rules newest first and pushes armed rules on the head of
        # the active list: walking in reverse and pushing leaves them in definition order.
        for rule in reversed(self._errors):
            if rule.event == event and rule.state in (0, before):
                if not armed_any:
                    self._active.clear()
                    armed_any = True
                self._active.insert(0, rule)
        # Newest first, the last assignment winning: the first rule defined decides.
        for srule in reversed(self._states):
            if srule.event == event and srule.state in (0, before):
                new_state = srule.new_state
        self.state = new_state

    def _check(self, iotype: str, offset: int = 0, length: int = 0) -> None:
        for rule in self._active:
            if rule.matches(iotype, offset, length):
                if not rule.errno:
                    return  # errno 0 injects nothing (and is never used up), as in QEMU
                if rule.once:
                    self._active.remove(rule)
                    self._errors.remove(rule)
                raise IOFailedError(os.strerror(rule.errno), errno=rule.errno, path=self.filename)

    # -- data path ------------------------------------------------------------------------
    def length(self) -> int:
        return self.image.length()

    def pread(self, offset: int, length: int) -> bytes:
        self._check("read", offset, length)
        return self.image.pread(offset, length)

    def readinto(self, offset: int, dest: memoryview) -> None:
        self._check("read", offset, len(dest))
        self.image.readinto(offset, dest)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check("write", offset, len(memoryview(data).cast("B")))
        self.image.pwrite(offset, data)

    def pwrite_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        self._check("write-zeroes", offset, length)
        self.image.pwrite_zeroes(offset, length, may_unmap=may_unmap)

    def discard(self, offset: int, length: int) -> None:
        self._check("discard", offset, length)
        self.image.discard(offset, length)

    def flush(self) -> None:
        self._check("flush")
        self.image.flush()

    def block_status(self, offset: int, length: int) -> Extent:
        self._check("block-status", offset, length)
        return self.image.block_status(offset, length)

    def truncate(self, size: int, *, shrink: bool = False) -> None:
        self.image.truncate(size, shrink=shrink)

    def allocated_file_size(self) -> int | None:
        return self.image.allocated_file_size()

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        self.image.close()
