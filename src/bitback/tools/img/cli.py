"""``bitback-img``: the qemu-img 7.2 subset bitback implements, behind one dispatch table.

``bitback-img [-h | -V] COMMAND [command options]``. Global options stop at the command name
(getopt ``+``); each command parses its own options with GNU permutation. Errors are printed
once, by :func:`bitback.tools.common.run_tool`, as ``bitback-img: message``; commands with
their own exit codes (check, compare) return them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import cast

from bitback import __version__
from bitback.tools.common import run_tool
from bitback.tools.img.options import PROG, HelpRequested, OptSpec, UsageError, getopt

__all__ = ["COMMANDS", "main", "print_help"]

Command = Callable[[list[str]], int]

# name -> (module, syntax line of the help text). Modules are imported on use, so a quick
# ``info`` does not pay for loading the checker or the converter.
COMMANDS: dict[str, tuple[str, str]] = {
    "bitmap": (
        "bitmap",
        "bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)... "
        "[-b source_file [-F source_fmt]] [-g granularity] [--object objectdef] [-f fmt] "
        "filename bitmap",
    ),
    "check": (
        "check",
        "check [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]] [-T src_cache] [-U] filename",
    ),
    "commit": ("commit", "commit [-q] [-f fmt] [-t cache] [-b base] [-d] [-p] filename"),
    "compare": (
        "compare",
        "compare [-f fmt] [-F fmt] [-T src_cache] [-p] [-q] [-s] [-U] filename1 filename2",
    ),
    "convert": (
        "convert",
        "convert [--bitmaps [--skip-broken-bitmaps]] [-U] [-c] [-p] [-q] [-n] [-f fmt] "
        "[-t cache] [-T src_cache] [-O output_fmt] "
        "[-B backing_file [-F backing_fmt]] [-o options] [-S sparse_size] "
        "filename [filename2 [...]] output_filename",
    ),
    "create": (
        "create",
        "create [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] filename [size]",
    ),
    "info": ("info", "info [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename"),
    "map": (
        "map",
        "map [-f fmt] [--start-offset=offset] [--max-length=len] [--output=ofmt] [-U] filename",
    ),
    "rebase": (
        "rebase",
        "rebase [-U] [-q] [-f fmt] [-t cache] [-T src_cache] [-p] [-u] -b backing_file "
        "[-F backing_fmt] filename",
    ),
    "resize": (
        "resize",
        "resize [-f fmt] [--preallocation=prealloc] [-q] [--shrink] filename [+ | -]size",
    ),
}


def handler(name: str) -> Command:
    """The ``img_<name>`` function of a command's module."""
    module = importlib.import_module(f"bitback.tools.img.{COMMANDS[name][0]}")
    return cast(Command, getattr(module, f"img_{name}"))


_VERSION = f"{PROG} version {__version__} (qemu-img 7.2 compatible subset)"

_PARAMETERS = """\
Command parameters:
  'filename' is a disk image filename
  'fmt' is the disk image format. It is guessed automatically in most cases
  'cache' is the cache mode used to write the output disk image, the valid
    options are: 'none', 'writeback' (default, except for convert), 'writethrough',
    'directsync' and 'unsafe' (default for convert)
  'src_cache' is the cache mode used to read input disk images, the valid
    options are the same as for the 'cache' option
  'size' is the disk image size in bytes. Optional suffixes
    'k' or 'K' (kilobyte, 1024), 'M' (megabyte, 1024k), 'G' (gigabyte, 1024M),
    'T' (terabyte, 1024G), 'P' (petabyte, 1024T) and 'E' (exabyte, 1024P)  are
    supported. 'b' is ignored.
  'output_filename' is the destination disk image filename
  'output_fmt' is the destination format
  'options' is a comma separated list of format specific options in a
    name=value format. Use -o help for an overview of the options supported by
    the used format
  '-c' indicates that target image must be compressed (qcow format only)
  '-u' allows unsafe backing chains. For rebasing, it is assumed that old and
       new backing file match exactly. The image doesn't need a working
       backing file before rebasing in this case (useful for renaming the
       backing file). For image creation, allow creating without attempting
       to open the backing file.
  '-h' with or without a command shows this help and lists the supported formats
  '-p' show progress of command (only certain commands)
  '-q' use Quiet mode - do not print any output (except errors)
  '-S' indicates the consecutive number of bytes (defaults to 4k) that must
       contain only zeros for qemu-img to create a sparse image during
       conversion. If the number of bytes is 0, the source will not be scanned for
       unallocated or zero sectors, and the destination image will always be
       fully allocated
  '--output' takes the format in which the output must be done (human or json)
  '-n' skips the target volume creation (useful if the volume is created
       prior to running qemu-img)

Parameters to bitmap subcommand:
  'bitmap' names the bitmap the actions work on, in the order given: '--add',
       '--remove', '--clear', '--enable', '--disable', or '--merge source'
  '-g granularity' is the granularity of a bitmap made by '--add'
  '-b source' and '-F src_fmt' name the image (and its format) holding the
       bitmaps that '--merge' reads, when it is not the image itself

Parameters to check subcommand:
  '-r' tries to repair any inconsistencies that are found during the check.
       '-r leaks' repairs only cluster leaks, whereas '-r all' fixes all
       kinds of errors, with a higher risk of choosing the wrong fix or
       hiding corruption that has already occurred.

Parameters to convert subcommand:
  '--bitmaps' copies every persistent bitmap of the (single) source image to the
       target; '--skip-broken-bitmaps' leaves out the inconsistent ones

Parameters to compare subcommand:
  '-f' first image format
  '-F' second image format
  '-s' run in Strict mode - fail on different image size or sector allocation
"""


def print_help() -> int:
    """The usage text (``-h``, ``--help``, also inside a command, as in qemu-img 7.2)."""
    lines = [
        _VERSION,
        f"usage: {PROG} [standard options] command [command options]",
        "QEMU disk image utility (bitback's implementation of the qemu-img subset below)",
        "",
        "    '-h', '--help'       display this help and exit",
        "    '-V', '--version'    output version information and exit",
        "",
        "Command syntax:",
        *(f"  {syntax}" for _, syntax in COMMANDS.values()),
        "",
        _PARAMETERS,
        "Supported formats: qcow2 raw",
    ]
    print("\n".join(lines))
    return 0


_GLOBAL = OptSpec("hVT:", {"help": (False, "h"), "version": (False, "V"), "trace": (True, "T")})


def _main(argv: list[str]) -> int:
    opts, operands = getopt([PROG, *argv], _GLOBAL, permute=False)
    for key, _ in opts:
        if key == "h":
            return print_help()
        if key == "V":
            print(_VERSION)
            return 0
        # -T (tracing) is accepted and ignored: bitback has no trace events.
    if not operands:
        raise UsageError("Not enough arguments")
    name = operands[0]
    if name not in COMMANDS:
        raise UsageError(f"Command not found: {name}")
    try:
        return handler(name)(operands)
    except HelpRequested:
        return print_help()


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status."""
    return run_tool(PROG, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
