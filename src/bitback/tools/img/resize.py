"""``bitback-img resize``: change an image's virtual size (``qemu-img resize``).

``resize [-f fmt] [--shrink] [-q] FILE [+|-]SIZE``. The size is always the *last* argument
and is taken out before option parsing, as qemu-img 7.2 does, so ``-1M`` is a size, not an
option. Relative sizes add to or subtract from the current size; the arithmetic wraps like
QEMU's 64-bit integers, so an absurd size is reported as not positive. Shrinking needs
``--shrink``; qcow2 sizes must be multiples of 512 (the driver says so).
"""

from __future__ import annotations

from bitback.bitmaps import BitmapInconsistentError
from bitback.block.chain import virtual_size
from bitback.errors import BitbackError, InvalidArgumentError
from bitback.tools.img.images import error_text, open_img, report
from bitback.tools.img.options import (
    PROG,
    HelpRequested,
    OptionList,
    OptSpec,
    UsageError,
    getopt,
    strtosz,
    warn,
)

__all__ = ["img_resize"]

SPEC = OptSpec(
    "f:hq",
    {
        "help": (False, "h"),
        "format": (True, "f"),
        "preallocation": (True, "preallocation"),
        "shrink": (False, "shrink"),
    },
)

_PREALLOC_MODES = ("off", "metadata", "falloc", "full")


def _int64(value: int) -> int:
    """Wrap to a signed 64-bit integer, as QEMU's arithmetic on sizes does."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >> 63 else value


def img_resize(argv: list[str]) -> int:
    """``resize [-f fmt] [--preallocation=off] [--shrink] [-q] FILE [+|-]SIZE``."""
    if len(argv) < 3:
        raise UsageError("Not enough arguments")
    size_arg = argv[-1]
    opts, operands = getopt(argv[:-1], SPEC)
    fmt: str | None = None
    quiet = shrink = False
    prealloc = "off"
    for key, value in opts:
        if key == "h":
            raise HelpRequested
        if key == "f":
            fmt = value
        elif key == "q":
            quiet = True
        elif key == "shrink":
            shrink = True
        elif key == "preallocation":
            assert value is not None
            if value not in _PREALLOC_MODES:
                raise InvalidArgumentError(f"Invalid preallocation mode '{value}'")
            prealloc = value
    if len(operands) != 1:
        raise UsageError("Expecting image file name and size")
    relative = {"+": 1, "-": -1}.get(size_arg[:1], 0)
    text = size_arg[1:] if relative else size_arg
    OptionList({"size": "size"}).check("size", text)
    amount = strtosz(text)
    with open_img(operands[0], fmt, read_only=False) as node:
        current = virtual_size(node)
        total = _int64(current + relative * amount) if relative else _int64(amount)
        if total <= 0:
            raise InvalidArgumentError("New image size must be positive")
        if total <= current and prealloc != "off":
            raise InvalidArgumentError("Preallocation can only be used for growing images")
        if total < current and not shrink:
            report("Use the --shrink option to perform a shrink operation.")
            warn(
                "Shrinking an image will delete all data beyond the shrunken image's end. "
                "Before performing such an operation, make sure there is no important data "
                "there."
            )
            return 1
        if prealloc != "off":
            raise InvalidArgumentError(
                f"Preallocation mode '{prealloc}' is not supported by {PROG}"
            )
        try:
            node.truncate(total, shrink=shrink)
        except BitmapInconsistentError as exc:
            raise BitbackError(error_text(exc)) from exc
        node.flush()
    if not quiet:
        print("Image resized.")
    return 0
