"""Helpers shared by the io command implementations: argument conversion with qemu-io's
error lines, the synopsis on usage errors, report and dump printing, option iteration.

Every helper that can fail prints qemu-io's message to the context and returns ``None`` (or
``False``), so that a command reads as qemu-io's C does: convert, and return on failure.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator

from bitback.block.driver import BlockDriver
from bitback.errors import BitbackError

from .parsing import (
    BDRV_REQUEST_MAX_BYTES,
    CvtnumError,
    GetOpt,
    GetOptError,
    PatternError,
    cvtnum,
    parse_pattern,
)
from .report import dump_buffer
from .table import CommandContext

__all__ = [
    "IO_ERRORS",
    "dump",
    "flush_after_write",
    "iovec",
    "num",
    "options",
    "pattern_arg",
    "report",
    "sector_aligned",
    "usage",
]

IO_ERRORS = (BitbackError, OSError)
"""What a failed request raises; commands turn these into ``<cmd> failed: <strerror>``."""


def num(text: str | None, ctx: CommandContext, shown: str | None = None) -> int | None:
    """cvtnum with qemu-io's error line; ``shown`` is the text named in the error."""
    try:
        if text is None:
            raise CvtnumError(errno.EINVAL, shown or "")
        return cvtnum(text, warn=ctx.warn_report)
    except CvtnumError as exc:
        ctx.print(CvtnumError(exc.errno, shown if shown is not None else exc.arg).message)
        return None


def pattern_arg(text: str, ctx: CommandContext) -> int | None:
    """A ``-P`` byte, or None after printing ``X is not a valid pattern byte``."""
    try:
        return parse_pattern(text)
    except PatternError as exc:
        ctx.print(exc.message)
        return None


def usage(ctx: CommandContext, name: str) -> bool:
    """qemu-io's ``qemuio_command_usage``: the synopsis on stdout; the command fails."""
    table = ctx.table
    if table is None:  # called outside a dispatcher: use the shared table
        from .commands import COMMAND_TABLE  # late import: commands imports this module

        table = COMMAND_TABLE
    cmd = table.find(name)
    if cmd is not None:
        ctx.print(cmd.usage_line())
    return False


def report(ctx: CommandContext, lines: list[str]) -> None:
    """Print report lines (see :func:`~.report.io_report`)."""
    for line in lines:
        ctx.print(line)


def dump(ctx: CommandContext, data: bytes | None, offset: int) -> None:
    """The ``-v`` hex dump of ``data``, if any was kept."""
    if data is not None:
        for line in dump_buffer(data, offset):
            ctx.print(line)


def iovec(args: list[str], ctx: CommandContext) -> list[int] | None:
    """qemu-io's ``create_iovec`` checks: each length and their sum within a request's size."""
    total = 0
    sizes = []
    for arg in args:
        size = num(arg, ctx)
        if size is None:
            return None
        if size > BDRV_REQUEST_MAX_BYTES:
            ctx.print(f"Argument '{arg}' exceeds maximum size {BDRV_REQUEST_MAX_BYTES}")
            return None
        if total > BDRV_REQUEST_MAX_BYTES - size:
            ctx.print(
                f"The total number of bytes exceed the maximum size {BDRV_REQUEST_MAX_BYTES}"
            )
            return None
        total += size
        sizes.append(size)
    return sizes


def options(opts: GetOpt, ctx: CommandContext, name: str) -> Iterator[tuple[str, str | None]]:
    """Iterate options; a getopt error prints glibc's line and the synopsis, then yields the
    pseudo-option ``"?"`` (as C's getopt returns '?'): the caller returns failure on it."""
    try:
        yield from opts
    except GetOptError as exc:
        ctx.eprint(exc.message)
        usage(ctx, name)
        yield "?", None


def flush_after_write(driver: BlockDriver, ctx: CommandContext, fua: bool) -> None:
    """FUA (``-f``) or write-through caching: the data is on disk when the write returns."""
    if (fua or ctx.writethrough) and not ctx.no_flush:
        driver.flush()


def sector_aligned(offset: int, count: int, ctx: CommandContext) -> bool:
    """The 512-byte alignment VM state and compressed requests need, with qemu-io's lines."""
    if offset % 512:
        ctx.print(f"{offset} is not a sector-aligned value for 'offset'")
        return False
    if count % 512:
        ctx.print(f"{count} is not a sector-aligned value for 'count'")
        return False
    return True
