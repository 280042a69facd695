"""``bitback-img check``: a thin shell around the qcow2 checker.

The checker (:func:`bitback.block.drivers.qcow2.check.check_qcow2`) finds, repairs and words
everything; this command opens the image first (so a missing file or backing file fails as
in qemu-img, exit 1), refuses formats without checks (exit 63), and prints: the checker's
messages on stderr, its report on stdout (none with ``-q``), its error line last.

Exit codes (qemu-img's): 0 clean, 1 check failed or bad usage, 2 corruptions, 3 leaked
clusters only, 63 format without checks.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Literal

from bitback.block.drivers.qcow2.check import check_qcow2
from bitback.block.drivers.qcow2.check_result import CheckResult
from bitback.errors import BitbackError
from bitback.tools.img.images import OpenFailed, check_cache, open_img, report
from bitback.tools.img.options import HelpRequested, OptSpec, UsageError, getopt, output_format

__all__ = ["EXIT_UNSUPPORTED", "img_check", "print_result"]

EXIT_UNSUPPORTED = 63

SPEC = OptSpec(
    "hf:r:T:qU",
    {
        "help": (False, "h"),
        "format": (True, "f"),
        "repair": (True, "r"),
        "output": (True, "output"),
        "force-share": (False, "U"),
    },
)


def print_result(result: CheckResult, output: str, quiet: bool) -> None:
    """Messages to stderr, report to stdout, interleaved as qemu-img prints them: after a
    repair, the second check's messages follow the "Double checking" line."""
    split = len(result.messages) if result.recheck_from is None else result.recheck_from
    first, second = result.messages[:split], result.messages[split:]
    for line in first:
        print(line, file=sys.stderr)
    sys.stderr.flush()
    if output == "json":
        if not quiet:
            sys.stdout.write(result.json_text())
        for line in second:
            print(line, file=sys.stderr)
        return
    text = "" if quiet else result.human()
    marker = "Double checking the fixed image now...\n"
    head, sep, tail = text.partition(marker)
    if sep:
        sys.stdout.write(head + sep)
        sys.stdout.flush()
    else:
        tail = head
    for line in second:
        print(line, file=sys.stderr)
    sys.stderr.flush()
    sys.stdout.write(tail)
    sys.stdout.flush()


def _require_writable(filename: str) -> None:
    """Fail as QEMU's read-write open fails when the file cannot be written."""
    try:
        os.close(os.open(filename, os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        err = exc.errno or errno.EIO
        raise OpenFailed(
            f"Could not open '{filename}': Could not open '{filename}': {os.strerror(err)}",
            path=filename, errno_=err,
        ) from exc


def img_check(argv: list[str]) -> int:
    """``check [-f fmt] [--output=human|json] [-r leaks|all] [-q] FILE``."""
    opts, operands = getopt(argv, SPEC)
    fmt: str | None = None
    output = "human"
    repair: Literal["leaks", "all"] | None = None
    quiet = False
    cache: str | None = None
    for key, value in opts:
        if key == "h":
            raise HelpRequested
        if key == "f":
            fmt = value
        elif key == "r":
            if value == "leaks":
                repair = "leaks"
            elif value == "all":
                repair = "all"
            else:
                raise UsageError(
                    f"Unknown option value for -r (expecting 'leaks' or 'all'): {value}"
                )
        elif key == "output":
            assert value is not None
            output = output_format(value)
        elif key == "q":
            quiet = True
        elif key == "T":
            cache = value
    if len(operands) != 1:
        raise UsageError("Expecting one image file name")
    filename = operands[0]
    check_cache(cache, source=True)
    # QEMU opens the image read-write for a repair, but with BDRV_O_CHECK: no automatic
    # repair of a dirty image first, and its persistent bitmaps are only rewritten when it
    # closes the image after the check. The checker works on the file, so a qcow2 image is
    # opened read-only here (nothing may change under the checker) and only its
    # writability is tested; other formats are opened as QEMU opens them.
    with open_img(filename, fmt, allow_corrupt=True, warn_stale_bitmaps=False) as node:
        fmt_name = node.format_name
    if repair is not None:
        if fmt_name == "qcow2":
            _require_writable(filename)
        else:
            open_img(filename, fmt, read_only=False).close()
    if fmt_name != "qcow2":
        report("This image format does not support checks")
        return EXIT_UNSUPPORTED
    try:
        result = check_qcow2(filename, repair=repair)
    except BitbackError as exc:
        raise OpenFailed(f"Could not open '{filename}': {exc}", path=filename) from exc
    print_result(result, output, quiet)
    if result.error_line is not None:
        report(result.error_line)
    return result.exit_code
