"""``bitback-io``: qemu-io's command line around the shared io command table.

::

    bitback-io [-f FMT] [-r] [-n] [-t CACHE] [-d DISCARD] [-U] [-c CMD]... [IMAGE]

Every ``-c`` runs in order, and a failing one does not stop the rest (qemu-io 7.2 goes on too);
``quit`` does. Without ``-c`` the tool reads commands from stdin, one a line, after a
``qemu-io> `` prompt: the prompt is qemu-io's own so that scripts driving qemu-io
interactively (QEMU's iotests wait for exactly this string) drive us unchanged. The exit
status is 0 when every command succeeded, 1 otherwise, in both modes.

Command-line errors (unknown option, unknown format, missing image...) are raised as
:class:`~bitback.errors.BitbackError` and become one line on stderr and exit status 1 in
:func:`~bitback.tools.common.run_tool`, the one place where that translation happens.

Caching follows qemu-io: the default is write-through (every write is flushed before it
reports), ``-t writeback``/``-t none``/``-n`` flush only on ``flush``, ``-t unsafe`` never.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TextIO

from bitback import __version__
from bitback.block.driver import BlockDriver
from bitback.block.open import open_image
from bitback.errors import BitbackError, InvalidArgumentError
from bitback.tools.common import run_tool
from bitback.tools.img.images import load_bitmaps

from .commands import COMMAND_TABLE
from .parsing import GetOpt, GetOptError
from .table import Command, CommandContext, CommandTable

__all__ = ["PROG", "PROMPT", "main"]

PROG = "bitback-io"
PROMPT = "qemu-io> "

USAGE = f"""Usage: {PROG} [OPTIONS]... [-c STRING]... [file]
bitback disk exerciser (the qemu-io command language)

  -c, --cmd STRING     execute command with its arguments
                       from the given string
  -f, --format FMT     specifies the block driver to use
  -r, --read-only      export read-only
  -n, --nocache        disable host cache, short for -t none
  -t, --cache=MODE     use the given cache mode for the image
  -d, --discard=MODE   use the given discard mode for the image
  -U, --force-share    force shared permissions
  -i, --aio=MODE, -k, -m, -T ARG
                       accepted for qemu-io compatibility, no effect
  -h, --help           display this help and exit
  -V, --version        output version information and exit

See '{PROG} -c help' for information on available commands.
"""

# Options qemu-io has and bitback-io does not (yet): recognised, so that the error says so.
_UNSUPPORTED = {"s": "snapshot", "C": "copy-on-read", "object": "object",
                "image-opts": "image-opts"}
# Options that only tune how QEMU does its I/O (AIO engine, buffer alignment, tracing): accepted
# and ignored, so that invocations written for qemu-io (iotests pass --aio) run unchanged.
_AIO_MODES = ("threads", "native", "io_uring")

_LONG_OPTIONS: dict[str, tuple[bool, str | None]] = {
    "help": (False, "h"), "format": (True, "f"), "cmd": (True, "c"),
    "read-only": (False, "r"), "nocache": (False, "n"), "cache": (True, "t"),
    "discard": (True, "d"), "force-share": (False, "U"), "version": (False, "V"),
    "snapshot": (False, "s"), "copy-on-read": (False, "C"), "misalign": (False, "m"),
    "native-aio": (False, "k"), "aio": (True, "i"), "trace": (True, "T"),
    "object": (True, None), "image-opts": (False, None),
}

# QEMU's bdrv_parse_cache_mode: mode -> (write-through, flushes ignored)
_CACHE_MODES = {
    "none": (False, False), "off": (False, False), "directsync": (True, False),
    "writeback": (False, False), "unsafe": (False, True), "writethrough": (True, False),
}
_DISCARD_MODES = {"ignore": False, "off": False, "unmap": True, "on": True}


@dataclass
class Options:
    """The parsed command line."""

    commands: list[str] = field(default_factory=list)
    fmt: str | None = None
    read_only: bool = False
    writethrough: bool = True  # qemu-io's default cache mode
    no_flush: bool = False
    discard: bool = True  # qemu-io opens with BDRV_O_UNMAP
    filename: str | None = None
    info: str | None = None  # text to print instead of running (--help, --version)


def parse_args(argv: list[str]) -> Options:
    """Parse ``argv`` (without the program name) like qemu-io's getopt_long loop."""
    opts = Options()
    getopt = GetOpt([PROG, *argv], "hc:d:f:rsnCmki:t:T:VU", _LONG_OPTIONS)
    try:
        for opt, arg in getopt:
            if opt in _UNSUPPORTED:
                flag = f"-{opt}" if len(opt) == 1 else f"--{opt}"
                raise InvalidArgumentError(f"option {flag} (--{_UNSUPPORTED[opt]}) is not "
                                           "supported by bitback-io")
            if opt == "c":
                opts.commands.append(arg or "")
            elif opt == "f":
                opts.fmt = arg
            elif opt == "r":
                opts.read_only = True
            elif opt in ("n", "t"):
                mode = "none" if opt == "n" else (arg or "")
                if mode not in _CACHE_MODES:
                    raise InvalidArgumentError(f"Invalid cache option: {mode}")
                opts.writethrough, opts.no_flush = _CACHE_MODES[mode]
            elif opt == "d":
                if arg not in _DISCARD_MODES:
                    raise InvalidArgumentError(f"Invalid discard option: {arg}")
                opts.discard = _DISCARD_MODES[arg]
            elif opt == "h":
                opts.info = USAGE
            elif opt == "V":
                opts.info = f"{PROG} version {__version__}\n"
            elif opt == "i" and arg not in _AIO_MODES:
                raise InvalidArgumentError(f"Invalid aio option: {arg}")
            # -U: bitback takes no image locks, so sharing is always allowed.
            # -i, -k, -m, -T: ignored (see _AIO_MODES).
    except GetOptError as exc:
        raise InvalidArgumentError(exc.message.removeprefix(f"{PROG}: ")) from None
    if len(getopt.operands) > 1:
        raise InvalidArgumentError(
            f"unexpected argument '{getopt.operands[1]}': only one image can be given"
        )
    opts.filename = getopt.operands[0] if getopt.operands else None
    return opts


def open_device(opts: Options, err: TextIO) -> BlockDriver:
    """Open the image as qemu-io does, with its error shape and its warning for probed raw."""
    assert opts.filename is not None
    try:
        driver = open_image(opts.filename, opts.fmt, read_only=opts.read_only)
    except BitbackError as exc:
        raise BitbackError(f"can't open device {opts.filename}: {exc}", path=opts.filename) \
            from exc
    try:
        # QEMU loads persistent bitmaps while it opens the image: a damaged one fails here.
        load_bitmaps(driver, prog=PROG, err=err)
    except BitbackError as exc:
        driver.close()
        raise BitbackError(f"can't open device {opts.filename}: {exc}", path=opts.filename) \
            from exc
    if opts.fmt is None and driver.format_name == "raw":
        # QEMU also refuses writes to block 0 that would change the probed format; we only
        # warn (see the report on differences).
        err.write(
            f"WARNING: Image format was not specified for '{opts.filename}' and probing "
            "guessed raw.\n"
            "         Automatically detecting the format is dangerous for raw images, "
            "write operations on block 0 will be restricted.\n"
            "         Specify the 'raw' format explicitly to remove the restrictions.\n"
        )
    return driver


@dataclass(eq=False)
class Session:
    """One run of the tool: the open image (``close`` drops it) and the ``quit`` flag."""

    driver: BlockDriver | None
    ctx: CommandContext
    table: CommandTable = COMMAND_TABLE
    quit: bool = False

    def __post_init__(self) -> None:
        self.table = self.table.extended(
            Command("quit", self._quit, "exit the program", altname="q", needs_file=False),
            Command("close", self._close, "close the current open file", altname="c"),
        )

    def _quit(self, driver: BlockDriver | None, argv: list[str], ctx: CommandContext) -> bool:
        self.quit = True
        return True

    def _close(self, driver: BlockDriver | None, argv: list[str], ctx: CommandContext) -> bool:
        self.close()
        return True

    def close(self) -> None:
        if self.driver is not None:
            driver, self.driver = self.driver, None
            driver.close()

    def run(self, line: str) -> bool:
        return self.table.run(self.driver, line, self.ctx)

    def run_all(self, lines: list[str]) -> bool:
        """Every ``-c`` in order, until ``quit``; True if all succeeded."""
        ok = True
        for line in lines:
            if self.quit:
                break
            ok = self.run(line) and ok
        return ok

    def interact(self, stdin: TextIO) -> bool:
        """Prompt, read a line, run it, until end of input or ``quit``."""
        ok = True
        interactive = stdin.isatty()
        if interactive:
            import readline  # noqa: F401 - line editing and history for input()
        while not self.quit:
            if interactive:
                try:
                    line = input(PROMPT)
                except EOFError:
                    self.ctx.out.write("\n")
                    break
            else:
                self.ctx.out.write(PROMPT)
                self.ctx.out.flush()
                line = stdin.readline()
                if not line:
                    break
                line = line.removesuffix("\n")
            ok = self.run(line) and ok
        return ok


def _main(argv: list[str]) -> int:
    opts = parse_args(argv)
    if opts.info is not None:
        sys.stdout.write(opts.info)
        return 0
    ctx = CommandContext(sys.stdout, sys.stderr, prog=PROG, writethrough=opts.writethrough,
                         discard=opts.discard, no_flush=opts.no_flush)
    driver = open_device(opts, sys.stderr) if opts.filename is not None else None
    session = Session(driver, ctx)
    try:
        ok = session.run_all(opts.commands) if opts.commands else session.interact(sys.stdin)
    finally:
        sys.stdout.flush()
        session.close()
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    """Console entry point of ``bitback-io``."""
    return run_tool(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
