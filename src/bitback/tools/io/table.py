"""The machinery of the io command language: command records, the table, the dispatcher.

A command is data (:class:`Command`): its name and alias, an argument synopsis, a one-line
help, the argument-count limits, what it needs (an open image, write permission) and the
function that runs it. A :class:`CommandTable` finds commands by name or alias and runs one
command line against a :class:`~bitback.block.driver.BlockDriver` (or none), writing into a
:class:`CommandContext`. The same table serves ``bitback-io`` (which adds ``quit`` and
``close``) and, later, the daemon's HMP ``qemu-io``, which captures the output in a string.

The dispatcher checks, in qemu-io's order: the command exists, an image is open when the
command needs one, the argument count, and write permission. Each failure prints qemu-io's
message to the error stream and counts as a failed command.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TextIO

from bitback.block.driver import BlockDriver
from bitback.errors import ImageFormatError

from .parsing import breakline

__all__ = [
    "Command",
    "CommandContext",
    "CommandFunc",
    "CommandTable",
    "strerror",
]

CommandFunc = Callable[[BlockDriver | None, list[str], "CommandContext"], bool]
"""``func(driver, argv, ctx) -> success``. ``argv[0]`` is the command word as typed; ``driver``
is ``None`` only for commands that do not need an open image."""


def strerror(exc: BaseException) -> str:
    """``strerror`` of the errno an exception carries (EIO when it carries none)."""
    code = getattr(exc, "errno", None)
    return os.strerror(code if isinstance(code, int) and code > 0 else errno.EIO)


def report_failure(ctx: CommandContext, name: str, exc: BaseException) -> None:
    """qemu-io's ``NAME failed: STRERROR`` line; when the image itself is damaged, first the
    driver's one-line diagnosis on the error stream, as QEMU reports qcow2 corruption."""
    if isinstance(exc, ImageFormatError):
        ctx.error_report(str(exc))
    ctx.print(f"{name} failed: {strerror(exc)}")


@dataclass(eq=False)
class CommandContext:
    """Where a command writes, and the open options of the session it runs in.

    ``out`` receives what qemu-io prints on stdout (reports, dumps, and most error lines, which
    qemu-io 7.2 prints with ``printf``); ``err`` what it prints on stderr (unknown command, bad
    argument count, getopt errors, ``error_report`` messages). HMP passes one ``StringIO`` as
    both. ``prog`` prefixes ``error_report`` lines (``bitback-io: Block node is read-only``);
    HMP leaves it empty, as QEMU does inside the monitor.

    ``writethrough``: flush after every write, as qemu-io's default cache mode does (its
    BlockBackend emulates FUA with a flush). ``discard``: whether discard requests reach the
    image (``-d unmap``, qemu-io's default) or are dropped after the bounds check (``-d
    ignore``, the default of a ``-drive`` in QEMU). ``no_flush``: flushes do nothing (cache mode
    ``unsafe``).
    """

    out: TextIO
    err: TextIO
    prog: str = ""
    writethrough: bool = False
    discard: bool = True
    no_flush: bool = False
    table: CommandTable | None = field(default=None, repr=False)

    def print(self, line: str = "") -> None:
        """One line on the output stream (qemu-io's ``printf``)."""
        self.out.write(line + "\n")

    def eprint(self, line: str) -> None:
        """One line on the error stream, unprefixed (``fprintf(stderr)``, ``perror``)."""
        self.err.write(line + "\n")

    def error_report(self, message: str) -> None:
        """QEMU's ``error_report``: the message on the error stream, after ``prog: ``."""
        prefix = f"{self.prog}: " if self.prog else ""
        self.err.write(prefix + message + "\n")

    def warn_report(self, message: str) -> None:
        """QEMU's ``warn_report``: like :meth:`error_report`, tagged ``warning:``."""
        self.error_report("warning: " + message)


@dataclass(frozen=True, slots=True)
class Command:
    """One command of the table (qemu-io's ``cmdinfo_t``).

    ``argmax == -1`` means no upper limit. ``args`` is the synopsis shown by ``help``; ``None``
    (no synopsis) and ``""`` print differently, as in qemu-io (``map  -- ...``). ``help`` is
    the extended help text, printed after the one-line form by ``help NAME``. ``needs_file``:
    refused with no image open. ``writes``: needs write permission (refused on a read-only
    image before its arguments are even parsed, as qemu-io requests permissions first).
    """

    name: str
    func: CommandFunc
    oneline: str
    args: str | None = None
    altname: str | None = None
    argmin: int = 0
    argmax: int = 0
    help: str | None = None
    needs_file: bool = True
    writes: bool = False

    def usage_line(self, name: str | None = None) -> str:
        """``help``'s one-line form, under the name the user typed (an alias prints as such)."""
        synopsis = f"{self.args} " if self.args is not None else ""
        return f"{name or self.name} {synopsis}-- {self.oneline}"


class CommandTable:
    """Commands sorted by name, found by name or alias, run one line at a time."""

    def __init__(self, commands: Iterable[Command]) -> None:
        self.commands: tuple[Command, ...] = tuple(sorted(commands, key=lambda c: c.name))
        names = [c.name for c in self.commands] + [c.altname for c in self.commands if c.altname]
        if len(names) != len(set(names)):
            raise ValueError("duplicate command name or alias in io command table")

    def extended(self, *extra: Command) -> CommandTable:
        """A new table with ``extra`` commands added (the CLI adds ``quit`` and ``close``)."""
        return CommandTable((*self.commands, *extra))

    def find(self, word: str) -> Command | None:
        """The command named or aliased ``word``, like qemu-io's ``find_command``."""
        for cmd in self.commands:
            if word in (cmd.name, cmd.altname):
                return cmd
        return None

    def run(self, driver: BlockDriver | None, line: str, ctx: CommandContext) -> bool:
        """Run one command line; True if it succeeded. A blank line is a success.

        Exceptions other than the I/O errors each command reports are bugs and propagate.
        """
        argv = breakline(line)
        if not argv:
            return True
        cmd = self.find(argv[0])
        if cmd is None:
            ctx.eprint(f'command "{argv[0]}" not found')
            return False
        if cmd.needs_file and driver is None:
            ctx.eprint("no file open, try 'help open'")
            return False
        nargs = len(argv) - 1
        if nargs < cmd.argmin or (cmd.argmax != -1 and nargs > cmd.argmax):
            if cmd.argmax == -1:
                expected = f"at least {cmd.argmin} arguments"
            elif cmd.argmin == cmd.argmax:
                expected = f"{cmd.argmin} arguments"
            else:
                expected = f"between {cmd.argmin} and {cmd.argmax} arguments"
            ctx.eprint(f"bad argument count {nargs} to {argv[0]}, expected {expected}")
            return False
        if cmd.writes and driver is not None and driver.read_only:
            why = " (image is marked corrupt)" if getattr(driver, "corrupt", False) else ""
            ctx.error_report("Block node is read-only" + why)
            return False
        ctx.table = self
        return cmd.func(driver, argv, ctx)
