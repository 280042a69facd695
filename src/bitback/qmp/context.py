"""What a QMP command handler may use: the graph, the I/O thread, events and shutdown.

The daemon builds one :class:`QMPContext`; handlers receive it and never reach into the server
or its sessions. Block-layer state is only touched on the I/O thread: a handler gathers its
arguments, then does its graph work in one function passed to :meth:`QMPContext.block`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

from bitback.block.driver import BlockDriver
from bitback.block.graph import BlockGraph
from bitback.block.iothread import IOThread
from bitback.jobs.registry import JobRegistry

__all__ = ["QMPContext", "Version"]

P = ParamSpec("P")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Version:
    """The QEMU version bitbackd reports, so clients that branch on it take 7.2's paths."""

    major: int = 7
    minor: int = 2
    micro: int = 0
    package: str = "bitback"


@dataclass
class QMPContext:
    graph: BlockGraph
    io: IOThread
    emit_event: Callable[[str, dict[str, Any], float], None]
    request_quit: Callable[[str], None]
    # The qemu-io command table lives with the tools (above this layer); the daemon hands
    # it in: (node, command line, discard allowed, refusal for commands that write, if any)
    # -> output text.
    run_qemu_io: Callable[[BlockDriver, str, bool, str | None], str]
    jobs: JobRegistry = field(init=False)
    version: Version = field(default_factory=Version)

    def __post_init__(self) -> None:
        self.jobs = JobRegistry(self.emit)

    async def block(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run block-layer work on the I/O thread."""
        return await self.io.run(fn, *args, **kwargs)

    def emit(self, name: str, data: dict[str, Any]) -> None:
        """Broadcast an event, time-stamped now, to every negotiated client."""
        self.emit_event(name, data, time.time())
