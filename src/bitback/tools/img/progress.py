"""qemu-img's ``-p`` progress line (``util/qemu-progress.c``).

Each print is ``"    (%3.2f/100%)\\r"`` on stdout; the end prints ``"\\n"``. A print happens
when the value moved by more than ``min_skip`` percent since the last one, or is 0 or 100.
QEMU keeps the value in a C ``float``; so does this class, so the same sequence of updates
prints the same lines.
"""

from __future__ import annotations

import struct
import sys
from typing import TextIO

__all__ = ["Progress"]


def _f32(value: float) -> float:
    """Round to single precision, as QEMU's ``float`` arithmetic does."""
    return float(struct.unpack("f", struct.pack("f", value))[0])


class Progress:
    """A progress line; disabled instances ignore every call (qemu-img without ``-p``)."""

    def __init__(self, enabled: bool, min_skip: float, out: TextIO | None = None) -> None:
        self.enabled = enabled
        self.min_skip = _f32(min_skip)
        self.current = 0.0
        self.last_print = 0.0
        self.out = out if out is not None else sys.stdout

    def print(self, delta: float, max_: int) -> None:
        """``qemu_progress_print``: ``max_ == 0`` sets the value to ``delta`` percent,
        otherwise the value grows by ``delta`` percent of ``max_``."""
        if not self.enabled:
            return
        step = _f32(_f32(delta / 100) * max_)
        current = min(_f32(delta) if max_ == 0 else _f32(self.current + step), 100.0)
        self.current = current
        if (
            current > _f32(self.last_print + self.min_skip)
            or current < _f32(self.last_print - self.min_skip)
            or current in (0.0, 100.0)
        ):
            self.last_print = current
            self.out.write(f"    ({current:3.2f}/100%)\r")
            self.out.flush()

    def end(self) -> None:
        """``qemu_progress_end``: finish the line."""
        if self.enabled:
            self.out.write("\n")
            self.out.flush()
