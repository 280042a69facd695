"""QMP commands: their argument schemas, their handlers, and dispatch.

A command is declared once, next to its handler::

    @REGISTRY.command("block-dirty-bitmap-clear", BITMAP_ARGS)
    async def bitmap_clear(ctx: QMPContext, args: dict[str, Any]) -> object:
        ...

Dispatch validates ``arguments`` against the schema first (QEMU's texts for missing,
unexpected and mistyped members), then runs the handler. Handlers raise
:class:`~bitback.errors.BitbackError` or :class:`~bitback.qmp.errors.QMPError`; the session
translates once, at the edge.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bitback.qmp.errors import QMPError
from bitback.qmp.schema import Struct, validate_arguments

if TYPE_CHECKING:
    from bitback.qmp.context import QMPContext

__all__ = ["REGISTRY", "CommandDef", "CommandRegistry", "Handler"]

Handler = Callable[["QMPContext", dict[str, Any]], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class CommandDef:
    name: str
    args: Struct
    handler: Handler
    # Runs on the raw arguments before validation, for refusals that read better than the
    # schema's (e.g. a QEMU driver bitbackd lacks).
    precheck: Callable[[dict[str, Any]], None] | None = None


class CommandRegistry:
    """Name -> command. One process-wide instance, :data:`REGISTRY`."""

    def __init__(self) -> None:
        self._commands: dict[str, CommandDef] = {}

    def command(
        self,
        name: str,
        args: Struct,
        *,
        precheck: Callable[[dict[str, Any]], None] | None = None,
    ) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            if name in self._commands:
                raise ValueError(f"QMP command {name} declared twice")
            self._commands[name] = CommandDef(name, args, handler, precheck)
            return handler

        return register

    def names(self) -> list[str]:
        return sorted(self._commands)

    def get(self, name: str) -> CommandDef | None:
        return self._commands.get(name)

    async def dispatch(self, ctx: QMPContext, name: str, arguments: dict[str, Any]) -> object:
        """Validate and run one command; its return value is the reply's ``return``."""
        cmd = self._commands.get(name)
        if cmd is None:
            raise QMPError("CommandNotFound", f"The command {name} has not been found")
        if cmd.precheck is not None:
            cmd.precheck(arguments)
        args = validate_arguments(cmd.args, arguments)
        return await cmd.handler(ctx, args)


REGISTRY = CommandRegistry()
