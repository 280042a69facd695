"""Sizes as QEMU parses and prints them.

``strtosz`` is QEMU 7.2's ``qemu_strtosz``: a non-negative decimal number, optionally with a
fraction, or a ``0x`` hexadecimal integer, followed by an optional case-insensitive unit
``B K M G T P E`` (powers of 1024); fractions of a unit round to the nearest byte.

>>> parse_size("64k"), parse_size("1.5M"), parse_size("0x200")
(65536, 1572864, 512)
"""

from __future__ import annotations

import errno
import re
from collections.abc import Callable

from bitback.errors import InvalidArgumentError

__all__ = [
    "GiB",
    "KiB",
    "MiB",
    "SizeError",
    "TiB",
    "format_size",
    "parse_size",
    "strtosz",
]

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

UINT64_MAX = (1 << 64) - 1
INT64_MAX = (1 << 63) - 1

_SUFFIX_SHIFT = {"b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_C_SPACE = " \t\n\v\f\r"


class SizeError(InvalidArgumentError):
    """A size QEMU's parser refuses; ``errno`` is EINVAL (not a size) or ERANGE (too big)."""

    def __init__(self, err: int, text: str) -> None:
        what = "too large" if err == errno.ERANGE else "invalid"
        super().__init__(f"{what} size: '{text}'")
        self.errno = err
        self.text = text


def hex_prefix_at(text: str, i: int) -> bool:
    """A ``0x`` prefix followed by a hex digit (C skips ``0x`` only when a digit follows)."""
    nxt = text[i + 2 : i + 3].lower()
    return text[i : i + 2].lower() == "0x" and nxt != "" and nxt in "0123456789abcdef"


def _c_strtoull_prefix(text: str, base: int) -> tuple[int, int, bool]:
    """glibc ``strtoull`` on ``text``: (value, characters consumed, overflowed).

    Leading C whitespace and one sign are accepted; base 16 accepts a ``0x`` prefix. With no
    digits nothing is consumed. A ``-`` negates modulo 2^64, as C does.
    """
    i = 0
    while i < len(text) and text[i] in _C_SPACE:
        i += 1
    neg = False
    if i < len(text) and text[i] in "+-":
        neg = text[i] == "-"
        i += 1
    digits = "0123456789abcdef"[:base]
    if base == 16 and hex_prefix_at(text, i):
        i += 2
    start = i
    while i < len(text) and text[i].lower() in digits:
        i += 1
    if i == start:
        return 0, 0, False
    value = int(text[start:i], base)
    if value > UINT64_MAX:
        return UINT64_MAX, i, True
    return (-value % (1 << 64) if neg else value), i, False


# What strtod accepts after the integral part of a size: a dot, digits, maybe an exponent.
_FRACTION_RE = re.compile(r"\.([0-9]+)([eE][+-]?[0-9]+)?")


def strtosz(text: str, *, warn: Callable[[str], None] | None = None) -> int:
    """QEMU 7.2's ``qemu_strtosz`` (unit 1024, default suffix ``B``) on the whole of ``text``.

    >>> strtosz("1.5k"), strtosz("1.1k"), strtosz("0x200"), strtosz("5.k"), strtosz("010")
    (1536, 1126, 512, 5120, 10)

    Raises :class:`CvtnumError` with EINVAL for malformed input and ERANGE when the result does
    not fit in 64 bits. ``warn`` receives QEMU's deprecation warning for a hex number with a
    multiplier suffix (``0x10k``), which QEMU still accepts.
    """
    val, used, overflow = _c_strtoull_prefix(text, 10)
    if used == 0:
        raise SizeError(errno.EINVAL, text)
    if overflow:
        # QEMU returns ERANGE at once; with trailing characters the caller's "whole string"
        # check then turns it into EINVAL (``99999999999999999999k`` is EINVAL).
        raise SizeError(errno.ERANGE if used == len(text) else errno.EINVAL, text)
    if "-" in text[:used]:
        raise SizeError(errno.EINVAL, text)
    pos = used
    hex_input = False
    frac_fixed = 0  # the fraction as a 0.64 fixed-point number, as QEMU keeps it
    rest = text[pos:]
    if val == 0 and rest[:1] in ("x", "X"):
        val, used, overflow = _c_strtoull_prefix(text, 16)
        if overflow:
            raise SizeError(errno.ERANGE if used == len(text) else errno.EINVAL, text)
        pos = used
        if text[pos : pos + 1] == ".":
            raise SizeError(errno.EINVAL, text)
        hex_input = True
    elif rest[:1] == ".":
        m = _FRACTION_RE.match(rest)
        if m is None:
            pos += 1  # "1." and "1.k": strtod finds no number; QEMU skips the dot
        elif m.group(2):
            raise SizeError(errno.EINVAL, text)  # exponents are refused outright
        else:
            fraction = float("0." + m.group(1))
            frac_fixed = min(int(fraction * 2.0**64), UINT64_MAX)
            pos += m.end()
    suffix = text[pos : pos + 1].lower()
    shift = _SUFFIX_SHIFT.get(suffix) if suffix else None
    if shift is not None:
        if hex_input and warn is not None:
            warn(f"Using a multiplier suffix on hex numbers is deprecated: {text}")
        pos += 1
    else:
        shift = 0
    if shift == 0:
        if frac_fixed:
            raise SizeError(errno.EINVAL, text)  # a fraction needs a unit above bytes
        result = val
    else:
        # Exact 64.64 fixed-point product, rounding half a byte upward, as QEMU does.
        scaled = (val << 64) + frac_fixed
        scaled <<= shift
        result = (scaled >> 64) + ((scaled >> 63) & 1)
    if pos != len(text):
        raise SizeError(errno.EINVAL, text)  # checked first: QEMU's end check wins
    if result > UINT64_MAX:
        raise SizeError(errno.ERANGE, text)
    return result


def parse_size(text: str) -> int:
    """Parse a size such as ``64k``, ``1.5M``, ``0x1000`` or ``512`` into bytes.

    :func:`strtosz` plus QEMU's usual limit for sizes of images and requests: the value must
    fit in an ``int64_t``. Raises :class:`SizeError` (an :class:`InvalidArgumentError`).
    """
    value = strtosz(text)
    if value > INT64_MAX:
        raise SizeError(errno.ERANGE, text)
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
