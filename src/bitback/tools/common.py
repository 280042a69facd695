"""What every command-line tool shares: the one place errors become messages and exit codes.

Tools raise :class:`~bitback.errors.BitbackError` (or let ``OSError`` escape from the host);
:func:`run_tool` prints one line, ``PROG: MESSAGE``, on stderr and returns the exit code. No
traceback reaches the user; an unexpected exception is reported as an internal error with its
type, and exit code :data:`EXIT_INTERNAL`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Callable

from bitback.errors import BitbackError

__all__ = ["EXIT_ERROR", "EXIT_INTERNAL", "EXIT_USAGE", "run_tool", "tune_allocator"]

EXIT_ERROR = 1  # qemu-img and qemu-io exit 1 for every ordinary failure
EXIT_USAGE = 1  # so do command-line errors (qemu-img prints "Try 'qemu-img --help'")
EXIT_INTERNAL = 70  # EX_SOFTWARE: a bug in bitback, never an expected outcome


def tune_allocator() -> None:
    """Keep large I/O buffers on the heap instead of fresh mmaps.

    glibc serves allocations above its mmap threshold with a new mapping each time, so every
    multi-MiB read buffer costs page faults and kernel zeroing (measured: 2 ms per 2 MiB
    buffer, 16 times the cost of the copy itself). Raising the thresholds lets freed buffers
    be reused. Harmless where the calls do not exist (other libcs).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 64 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20)
    except (OSError, AttributeError):
        pass


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def run_tool(prog: str, main: Callable[[list[str]], int], argv: list[str] | None = None) -> int:
    """Run ``main(argv)`` and translate errors into one line and an exit code."""
    args = sys.argv[1:] if argv is None else argv
    tune_allocator()
    try:
        return main(args)
    except BitbackError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except BrokenPipeError:
        # Output closed early (e.g. piped into head): not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_ERROR
    except OSError as exc:
        where = f" '{exc.filename}'" if exc.filename else ""
        print(f"{prog}: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_ERROR
    except MemoryError:
        print(f"{prog}: out of memory", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # the edge: no traceback reaches users
        print(f"{prog}: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_INTERNAL
