"""Sizes as QEMU parses and prints them.

``parse_size`` follows ``qemu_strtosz``: a non-negative decimal number, optionally with a
fraction, or a ``0x`` hexadecimal integer, followed by an optional case-insensitive unit
``B K M G T P E`` (powers of 1024). The result must be a whole number of bytes.

>>> parse_size("64k"), parse_size("1.5M"), parse_size("0x200")
(65536, 1572864, 512)
"""

from __future__ import annotations

import re

from bitback.errors import InvalidArgumentError

__all__ = ["KiB", "MiB", "GiB", "TiB", "format_size", "parse_size"]

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

_UNITS = {"": 1, "b": 1, "k": KiB, "m": MiB, "g": GiB, "t": TiB, "p": 1 << 50, "e": 1 << 60}
_SIZE_RE = re.compile(r"^\s*(0[xX][0-9a-fA-F]+|[0-9]+(?:\.[0-9]*)?|\.[0-9]+)([bBkKmMgGtTpPeE]?)$")

# Largest size QEMU accepts from strtosz (INT64_MAX rounded down to a 512-byte sector is what
# image creation enforces; parsing itself stops at 2^63 - 1).
_MAX_SIZE = (1 << 63) - 1


def parse_size(text: str, *, default_unit: str = "") -> int:
    """Parse a size such as ``64k``, ``1.5M``, ``0x1000`` or ``512`` into bytes.

    ``default_unit`` applies when the text carries no unit (qemu-img's ``create`` sizes use
    bytes; some options use other defaults). Raises :class:`InvalidArgumentError` for anything
    that is not a non-negative whole number of bytes below 2^63.
    """
    m = _SIZE_RE.match(text)
    if not m:
        raise InvalidArgumentError(f"invalid size: '{text}'")
    number, unit = m.group(1), (m.group(2) or default_unit).lower()
    multiplier = _UNITS[unit]
    if number[:2].lower() == "0x":
        value = int(number, 16) * multiplier
    elif "." in number:
        whole, _, frac = number.partition(".")
        # Exact arithmetic: fractions of a unit must come out as whole bytes.
        digits = len(frac)
        scaled = int(whole or "0") * 10**digits + int(frac or "0")
        value, rest = divmod(scaled * multiplier, 10**digits)
        if rest:
            raise InvalidArgumentError(f"invalid size: '{text}' is not a whole number of bytes")
    else:
        value = int(number) * multiplier
    if value > _MAX_SIZE:
        raise InvalidArgumentError(f"invalid size: '{text}' is too large")
    return value


def format_size(size: int) -> str:
    """Print a size the way qemu-img does in ``info`` (``64 MiB``, ``1.5 GiB``, ``512 B``).

    QEMU's ``size_to_str`` picks the largest unit that keeps the value at least 1, and prints
    three significant digits, dropping a trailing ``.0``.
    """
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    value = float(size)
    i = 0
    while value >= 1024 and i < len(units) - 1:
        value /= 1024
        i += 1
    if i == 0:
        return f"{size} B"
    text = f"{value:.3g}"
    if "e" in text:  # 3 significant digits of a value >= 1000 (e.g. 1023.9 KiB)
        text = f"{value:.0f}"
    return f"{text} {units[i]}"
