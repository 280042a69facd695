"""Argument parsing for the io tool, byte-for-byte as qemu-io 7.2 parses.

Four small pieces, each pure (no I/O except an optional warning callback):

* :func:`breakline` splits a command line on single spaces, as qemu-io does (no quoting, and a
  tab is *not* a separator: ``write<TAB>0`` is one word).
* :func:`cvtnum` is qemu-io's ``cvtnum``: QEMU's ``qemu_strtosz`` plus a check that the value
  fits in an ``int64_t``. Failures carry qemu-io's error number (EINVAL or ERANGE) so callers
  print qemu-io's exact text (:attr:`CvtnumError.message`).
* :func:`parse_pattern` is ``strtol(arg, &end, 0)`` restricted to one byte.
* :class:`GetOpt` is glibc's ``getopt``/``getopt_long`` as qemu-io uses it: GNU argument
  permutation (options may follow operands: ``write 0 -1`` reads ``-1`` as an option), ``--``
  ends options, glibc's error texts.

Sizes are parsed by :func:`bitback.units.strtosz` (QEMU's ``qemu_strtosz``), whose errno
(EINVAL: not a number, ERANGE: too large) selects qemu-io's message.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from bitback import units

__all__ = [
    "BDRV_REQUEST_MAX_BYTES",
    "CvtnumError",
    "GetOpt",
    "GetOptError",
    "PatternError",
    "breakline",
    "c_strtol",
    "cvtnum",
    "parse_pattern",
    "strtosz",
]

INT64_MAX = (1 << 63) - 1
LONG_MAX = INT64_MAX  # LP64

# Largest single request QEMU's block layer accepts: INT_MAX rounded down to a 512-byte sector.
BDRV_REQUEST_MAX_BYTES = (0x7FFFFFFF >> 9) << 9  # 2147483136

_C_SPACE = " \t\n\v\f\r"


def breakline(line: str) -> list[str]:
    """Split ``line`` into words on spaces, dropping empty words (qemu-io's ``breakline``)."""
    return [word for word in line.split(" ") if word]


@dataclass(frozen=True, slots=True)
class CvtnumError(Exception):
    """A size argument qemu-io refuses; ``errno`` is EINVAL (not a number) or ERANGE."""

    errno: int
    arg: str

    @property
    def message(self) -> str:
        """qemu-io's ``print_cvtnum_err`` text."""
        if self.errno == errno.EINVAL:
            return (
                "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- "
                + self.arg
            )
        if self.errno == errno.ERANGE:
            return f"Parsing error: argument too large -- {self.arg}"
        return f"Parsing error: {self.arg}"

    def __str__(self) -> str:
        return self.message


def strtosz(text: str, *, warn: Callable[[str], None] | None = None) -> int:
    """QEMU 7.2's ``qemu_strtosz`` (see :func:`bitback.units.strtosz`), failing with
    :class:`CvtnumError` so callers print qemu-io's exact texts."""
    try:
        return units.strtosz(text, warn=warn)
    except units.SizeError as exc:
        raise CvtnumError(exc.errno, text) from exc


def cvtnum(text: str, *, warn: Callable[[str], None] | None = None) -> int:
    """qemu-io's ``cvtnum``: :func:`strtosz`, then ERANGE above ``INT64_MAX``."""
    value = strtosz(text, warn=warn)
    if value > INT64_MAX:
        raise CvtnumError(errno.ERANGE, text)
    return value


def c_strtol(text: str) -> tuple[int, int]:
    """glibc ``strtol(text, &end, 0)``: (value, characters consumed), clamped to ``long``.

    Base 0 means a ``0x`` prefix selects hex and a leading ``0`` octal. With no digits the
    value is 0 and nothing is consumed.
    """
    i = 0
    while i < len(text) and text[i] in _C_SPACE:
        i += 1
    neg = False
    if i < len(text) and text[i] in "+-":
        neg = text[i] == "-"
        i += 1
    base = 10
    if units.hex_prefix_at(text, i):
        base, i = 16, i + 2
    elif text[i : i + 1] == "0":
        base = 8
    digits = "0123456789abcdef"[:base]
    start = i
    while i < len(text) and text[i].lower() in digits:
        i += 1
    if i == start:
        return 0, 0
    value = int(text[start:i], base)
    value = -value if neg else value
    return max(-LONG_MAX - 1, min(LONG_MAX, value)), i


@dataclass(frozen=True, slots=True)
class PatternError(Exception):
    """A ``-P`` argument that is not a byte value."""

    arg: str

    @property
    def message(self) -> str:
        return f"{self.arg} is not a valid pattern byte"

    def __str__(self) -> str:
        return self.message


def parse_pattern(text: str) -> int:
    """A pattern byte: C integer syntax (``0x41``, ``0101``, ``65``) in 0..255.

    Like qemu-io, an empty string is 0 (strtol consumes nothing and stops at the end).
    """
    value, used = c_strtol(text)
    if value < 0 or value > 255 or used != len(text):
        raise PatternError(text)
    return value


@dataclass(frozen=True, slots=True)
class GetOptError(Exception):
    """A command-line option glibc's getopt refuses; ``message`` is glibc's text."""

    message: str

    def __str__(self) -> str:
        return self.message


class GetOpt:
    """glibc ``getopt_long`` with argument permutation, over ``argv[1:]``.

    Iterating yields ``(option, argument)`` pairs in command-line order: ``option`` is the
    letter (``"P"``) or the long name (``"cmd"``); ``argument`` is ``None`` for flags. A bad
    option raises :class:`GetOptError` at the point where getopt would report it, so options
    before it have already been handled (as in C). After iteration, :attr:`operands` holds the
    non-option words in order. ``long_options`` maps a long name to (takes_argument, short
    letter or None); a unique prefix of a long name is accepted, as glibc does.
    """

    def __init__(
        self,
        argv: Sequence[str],
        optstring: str,
        long_options: Mapping[str, tuple[bool, str | None]] | None = None,
    ) -> None:
        self.prog = argv[0] if argv else ""
        self.args = list(argv[1:])
        self.optstring = optstring
        self.long_options: Mapping[str, tuple[bool, str | None]] = long_options or {}
        self.operands: list[str] = []

    def _takes_arg(self, letter: str) -> bool | None:
        """True/False for a known option letter, None for an unknown one."""
        i = self.optstring.find(letter)
        if letter == ":" or i < 0:
            return None
        return self.optstring[i + 1 : i + 2] == ":"

    def __iter__(self) -> Iterator[tuple[str, str | None]]:
        args = self.args
        i = 0
        while i < len(args):
            word = args[i]
            i += 1
            if word == "--":
                self.operands.extend(args[i:])
                return
            if word.startswith("--") and self.long_options:
                name, eq, value = word[2:].partition("=")
                key = self._long_name(name)
                takes_arg, short = self.long_options[key]
                if takes_arg and not eq:
                    if i >= len(args):
                        raise GetOptError(
                            f"{self.prog}: option '--{key}' requires an argument"
                        )
                    value, i = args[i], i + 1
                elif not takes_arg and eq:
                    raise GetOptError(f"{self.prog}: option '--{key}' doesn't allow an argument")
                yield (short or key), (value if takes_arg else None)
                continue
            if not word.startswith("-") or word == "-":
                self.operands.append(word)  # GNU permutation: keep scanning for options
                continue
            j = 1
            while j < len(word):
                letter = word[j]
                j += 1
                takes = self._takes_arg(letter)
                if takes is None:
                    raise GetOptError(f"{self.prog}: invalid option -- '{letter}'")
                if not takes:
                    yield letter, None
                    continue
                if j < len(word):
                    yield letter, word[j:]
                elif i < len(args):
                    yield letter, args[i]
                    i += 1
                else:
                    raise GetOptError(
                        f"{self.prog}: option requires an argument -- '{letter}'"
                    )
                break

    def _long_name(self, name: str) -> str:
        if name in self.long_options:
            return name
        matches = [key for key in self.long_options if key.startswith(name)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise GetOptError(f"{self.prog}: unrecognized option '--{name}'")
        choices = " ".join(f"'--{key}'" for key in matches)
        raise GetOptError(f"{self.prog}: option '--{name}' is ambiguous; possibilities: {choices}")
