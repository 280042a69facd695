"""The io command table: qemu-io 7.2's commands, run against any BlockDriver.

:data:`COMMANDS` is the table (data: name, alias, synopsis, one-line help, limits, function)
shared by ``bitback-io`` and the daemon's HMP ``qemu-io``. Each function takes ``(driver, argv,
ctx)``, writes only to ``ctx`` and returns whether it succeeded; nothing here exits, reads argv
or touches ``sys.stdout``. I/O failures become qemu-io's ``<cmd> failed: <strerror>`` lines.

The data-path commands (read, write and their vector and aio forms, discard) live in
:mod:`.rw`; the image-wide ones (flush, truncate, length, info, map, alloc) and help are here.
Output and failure semantics follow qemu-io 7.2 as measured, for example:

* ``read -P`` reports a mismatch *and* still prints the read report; the command fails.
* ``aio_read``/``aio_write`` "succeed once submitted": an I/O error or a pattern mismatch is
  printed but the command counts as a success. Here they run synchronously, so their output
  appears in order (qemu-io prints it whenever the request completes).
* parse errors (sizes, patterns) print on stdout; getopt errors print on stderr, followed by
  the command's synopsis on stdout.

Large requests: qemu-io allocates one buffer of the full length (up to 2 GiB). We move data in
:data:`~.io_ops.CHUNK`-sized pieces instead, to bound memory, after checking the whole range
first so that a request past the end still fails as a whole without writing anything. Requests of
up to 64 MiB (everything the seed scripts do) still reach the driver as one request.
"""

from __future__ import annotations

import io
import time

from bitback.block.driver import BlockDriver
from bitback.errors import BitbackError

from . import helptext
from .cmdutil import IO_ERRORS, num, options
from .io_ops import allocation, vm_state_offset
from .parsing import GetOpt, c_strtol
from .report import cvtstr, dump_specific_info
from .rw import aio_read_f, aio_write_f, discard_f, read_f, readv_f, write_f, writev_f
from .table import Command, CommandContext, CommandTable, strerror

__all__ = ["COMMANDS", "COMMAND_TABLE", "PREALLOC_MODES", "run_captured"]

PREALLOC_MODES = ("off", "metadata", "falloc", "full")


def _flush_f(driver: BlockDriver | None, argv: list[str], ctx: CommandContext) -> bool:
    """``flush``: flush the image; a failure is silent, as in qemu-io 7.2."""
    assert driver is not None
    try:
        if not ctx.no_flush:
            driver.flush()
    except IO_ERRORS:
        return False  # qemu-io 7.2 fails silently
    return True


def _aio_flush_f(driver: BlockDriver | None, argv: list[str], ctx: CommandContext) -> bool:
    """Completes outstanding aio requests: ours complete before their command returns."""
    return True


def _truncate_f(driver: BlockDriver | None, argv: list[str], ctx: CommandContext) -> bool:
    """``truncate [-m prealloc_mode] off``: resize, shrinking allowed (qemu-io passes no
    safety flag). Preallocation modes are accepted but the image always grows sparse."""
    assert driver is not None
    opts = GetOpt(argv, "m:")
    for opt, arg in options(opts, ctx, "truncate"):
        if opt == "?":
            return False
        if arg not in PREALLOC_MODES:
            ctx.error_report(f"Invalid preallocation mode '{arg}'")
            return False
        # Preallocation is accepted but not performed: the image grows sparse (mode "off").
    # qemu-io converts the first operand but names argv[1] in the error (a 7.2 quirk).
    operand = opts.operands[0] if opts.operands else None
    size = num(operand, ctx, shown=argv[1])
    if size is None:
        return False
    try:
        driver.truncate(size, shrink=True)  # qemu-io shrinks without asking
    except IO_ERRORS as exc:
        ctx.error_report(str(exc) if isinstance(exc, BitbackError) else strerror(exc))
        return False
    return True


def _length_f(driver: BlockDriver | None, argv: list[str], ctx: CommandContext) -> bool:
    """``length``: the virtual size with a binary unit (``64 MiB``)."""
    assert driver is not None
    ctx.print(cvtstr(float(driver.length())))
    return True


def _info_f(driver: BlockDriver | None, argv: list[str], ctx: CommandContext) -> bool:
    """``info``: format name, cluster size, VM state offset, format-specific dump."""
    assert driver is not None
    ctx.print(f"format name: {driver.format_name}")
    ctx.print(f"cluster size: {cvtstr(float(driver.cluster_size or 0))}")
    ctx.print(f"vm state offset: {cvtstr(float(vm_state_offset(driver)))}")
    specific = driver.format_specific_info()
    if specific:
        ctx.print("Format specific information:")
        for line in dump_specific_info(specific):
            ctx.print(line)
    return True


def _map_f(driver: BlockDriver | None, argv: list[str], ctx: CommandContext) -> bool:
    """``map``: runs of allocated / unallocated bytes of this node (not its backing chain)."""
    assert driver is not None
    offset, remaining = 0, driver.length()
    while remaining:
        try:
            allocated, run = allocation(driver, offset, remaining, merge=True)
        except IO_ERRORS as exc:
            ctx.error_report(f"Failed to get allocation status: {strerror(exc)}")
            return False
        if run == 0:
            ctx.error_report("Unexpected end of image")
            return False
        state = "    allocated" if allocated else "not allocated"
        ctx.print(
            f"{cvtstr(float(run))} (0x{run:x}) bytes {state} "
            f"at offset {cvtstr(float(offset))} (0x{offset:x})"
        )
        offset += run
        remaining -= run
    return True


def _alloc_f(driver: BlockDriver | None, argv: list[str], ctx: CommandContext) -> bool:
    """``alloc offset [count]``: how much of ``count`` (default 512) bytes at ``offset`` this
    node allocates; a range past the end is cut at the end."""
    assert driver is not None
    start = num(argv[1], ctx)
    if start is None:
        return False
    count = 512
    if len(argv) == 3:
        value = num(argv[2], ctx)
        if value is None:
            return False
        count = value
    offset, remaining, allocated_bytes = start, count, 0
    while remaining:
        try:
            allocated, run = allocation(driver, offset, remaining, merge=False)
        except IO_ERRORS as exc:
            ctx.print(f"is_allocated failed: {strerror(exc)}")
            return False
        offset += run
        remaining -= run
        if allocated:
            allocated_bytes += run
        if run == 0:  # the end of the image: count only what exists
            count -= remaining
            remaining = 0
    ctx.print(f"{allocated_bytes}/{count} bytes allocated at offset {cvtstr(float(start))}")
    return True


def _sleep_f(driver: BlockDriver | None, argv: list[str], ctx: CommandContext) -> bool:
    """``sleep ms``: wait (C ``strtol`` syntax, no negative values)."""
    ms, used = c_strtol(argv[1])
    if ms < 0 or used != len(argv[1]):
        ctx.print(f"{argv[1]} is not a valid number")
        return False
    time.sleep(ms / 1000)
    return True


def _help_f(driver: BlockDriver | None, argv: list[str], ctx: CommandContext) -> bool:
    """``help [command]``: every command's synopsis, or one command's extended help."""
    table = ctx.table or COMMAND_TABLE
    if len(argv) < 2:
        for cmd in table.commands:
            ctx.print(cmd.usage_line())
        ctx.print()
        ctx.print("Use 'help commandname' for extended help.")
        return True
    found = table.find(argv[1])
    if found is None:
        ctx.print(f"command {argv[1]} not found")
        return False
    ctx.print(found.usage_line(argv[1]))
    if found.help:
        ctx.out.write(found.help)
    return True


_READ_ONELINE = "reads a number of bytes at a specified offset"
_WRITE_ONELINE = "writes a number of bytes at a specified offset"

COMMANDS: tuple[Command, ...] = (
    Command("read", read_f, _READ_ONELINE, "[-abCqv] [-P pattern [-s off] [-l len]] off len",
            "r", 2, -1, helptext.READ_HELP),
    Command("readv", readv_f, _READ_ONELINE, "[-Cqv] [-P pattern] off len [len..]",
            None, 2, -1, helptext.READV_HELP),
    Command("write", write_f, _WRITE_ONELINE,
            "[-bcCfnquz] [-P pattern | -s source_file] off len",
            "w", 2, -1, helptext.WRITE_HELP, writes=True),
    Command("writev", writev_f, _WRITE_ONELINE, "[-Cfq] [-P pattern] off len [len..]",
            None, 2, -1, helptext.WRITEV_HELP, writes=True),
    Command("aio_read", aio_read_f, "asynchronously reads a number of bytes",
            "[-Ciqv] [-P pattern] off len [len..]", None, 2, -1, helptext.AIO_READ_HELP),
    Command("aio_write", aio_write_f, "asynchronously writes a number of bytes",
            "[-Cfiquz] [-P pattern] off len [len..]", None, 2, -1, helptext.AIO_WRITE_HELP,
            writes=True),
    Command("aio_flush", _aio_flush_f, "completes all outstanding aio requests"),
    Command("flush", _flush_f, "flush all in-core file state to disk", altname="f"),
    Command("truncate", _truncate_f, "truncates the current file at the given offset",
            "[-m prealloc_mode] off", "t", 1, 3, writes=True),
    Command("length", _length_f, "gets the length of the current file", altname="l"),
    Command("info", _info_f, "prints information about the current file", altname="i"),
    Command("discard", discard_f, "discards a number of bytes at a specified offset",
            "[-Cq] off len", "d", 2, -1, helptext.DISCARD_HELP, writes=True),
    Command("alloc", _alloc_f, "checks if offset is allocated in the file", "offset [count]",
            "a", 1, 2),
    Command("map", _map_f, "prints the allocated areas of a file", ""),
    Command("sleep", _sleep_f, "waits for the given value in milliseconds", argmin=1,
            argmax=1, needs_file=False),
    Command("help", _help_f, "help for one or all commands", "[command]", "?", 0, 1,
            needs_file=False),
)
"""The shared command table (qemu-io's ``qemu-io-cmds.c`` subset)."""

COMMAND_TABLE = CommandTable(COMMANDS)
""":data:`COMMANDS` as a table, ready to run lines (``bitback-io`` extends it)."""


def run_captured(
    driver: BlockDriver | None, line: str, *, discard: bool = False
) -> tuple[bool, str]:
    """Run one command line the way HMP's ``qemu-io`` does: both output streams captured in
    one string, no ``prog:`` prefix, writeback caching, and discard requests dropped unless
    the device was opened with ``discard=unmap`` (``-drive``'s default is ``ignore``)."""
    buf = io.StringIO()
    ctx = CommandContext(buf, buf, discard=discard)
    ok = COMMAND_TABLE.run(driver, line, ctx)
    return ok, buf.getvalue()
