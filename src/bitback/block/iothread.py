"""The one way the daemon runs block-layer work: on a single I/O thread.

The block layer is synchronous and not thread-safe; the event loop must not block on disk I/O.
Every piece of block work (a QMP command's graph changes, an HMP write, a job's chunk) is a
plain function submitted here. One worker thread runs them in submission order, so the graph
sees one request at a time, exactly as QEMU's main loop serialises monitor commands, while the
event loop keeps reading, writing and timing other clients.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

__all__ = ["IOThread"]

P = ParamSpec("P")
T = TypeVar("T")


class IOThread:
    """A single worker thread for block-layer calls."""

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="bitback-io"
        )

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(*args, **kwargs)`` on the I/O thread and return its result (or raise its
        exception) in the calling coroutine."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn`` on the I/O thread and wait for it from a thread that is not the event
        loop (start-up and shutdown, before and after the loop runs)."""
        return self._pool.submit(fn, *args, **kwargs).result()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
