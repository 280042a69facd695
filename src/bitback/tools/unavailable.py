"""Entry points for tools that later work will build (the ``bitback`` backup tool).

They exist so that the console scripts are installed from the start, and they say plainly
that the tool is not available yet instead of pretending to work.
"""

from __future__ import annotations

import sys

__all__ = ["bitback_main"]

EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE from sysexits.h


def _unavailable(name: str) -> int:
    print(f"{name}: not available yet in this version of bitback", file=sys.stderr)
    return EXIT_UNAVAILABLE


def bitback_main() -> int:
    """The nightly backup tool (not built yet)."""
    return _unavailable("bitback")
