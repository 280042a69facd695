"""The generic all-or-nothing mechanism (QEMU's ``Transaction``, ``util/transactions.c``).

Usage, inside one step::

    txn.on_abort(restore_old_bits)     # first say how to undo...
    old = bitmap.bits.copy(); bitmap.bits.clear()   # ...then act

A step that fails after registering its undo is undone with the others, so a step must
register before it changes anything and its undo must cope with a half-done step.

Callbacks may be plain functions or coroutines functions; they run in the calling task.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable

__all__ = ["Callback", "Transaction"]

log = logging.getLogger("bitbackd")

Callback = Callable[[], "Awaitable[None] | None"]


async def _call(fn: Callback) -> None:
    result = fn()
    if inspect.isawaitable(result):
        await result


class Transaction:
    """Undo, commit and clean-up callbacks of the steps taken so far."""

    def __init__(self) -> None:
        self._aborts: list[Callback] = []
        self._commits: list[Callback] = []
        self._cleans: list[Callback] = []
        self.finished = False

    def on_abort(self, fn: Callback) -> None:
        """How to undo the step about to be taken (runs newest first on failure)."""
        self._aborts.append(fn)

    def on_commit(self, fn: Callback) -> None:
        """What to do once every step succeeded (runs in registration order)."""
        self._commits.append(fn)

    def on_clean(self, fn: Callback) -> None:
        """What to do at the end either way (runs newest first, after abort or commit)."""
        self._cleans.append(fn)

    async def abort(self) -> None:
        """Undo every step, newest first. An undo that fails is logged and the others still
        run: stopping half-way would leave the steps before it applied."""
        await self._finish(list(reversed(self._aborts)))

    async def commit(self) -> None:
        await self._finish(list(self._commits))

    async def _finish(self, callbacks: list[Callback]) -> None:
        if self.finished:
            raise RuntimeError("transaction finished twice")
        self.finished = True
        for fn in [*callbacks, *reversed(self._cleans)]:
            try:
                await _call(fn)
            except Exception:
                log.exception("transaction callback %r failed", fn)
