"""Entry points for tools that later work will build (bitbackd, bitback).

They exist so that the console scripts are installed from the start, and they say plainly
that the tool is not available yet instead of pretending to work.
"""

from __future__ import annotations

import sys

__all__ = ["bitback_main", "bitbackd_main"]

EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE from sysexits.h


def _unavailable(name: str) -> int:
    print(f"{name}: not available yet in this version of bitback", file=sys.stderr)
    return EXIT_UNAVAILABLE


def bitbackd_main() -> int:
    """The QMP storage daemon (not built yet)."""
    return _unavailable("bitbackd")


def bitback_main() -> int:
    """The nightly backup tool (not built yet)."""
    return _unavailable("bitback")
