"""Command-line parsing for bitback-img, as qemu-img 7.2 parses.

* :func:`getopt` is glibc's ``getopt_long`` with GNU permutation (options may follow the
  file names: ``create f.qcow2 64M -f qcow2``), ``--`` ending options, unique prefixes of
  long options (``--outp=json``), and qemu-img's two error lines, which quote
  ``argv[optind - 1]`` - a quirk reproduced here (``info -xU f`` complains about ``info``).
* :func:`strtosz` is QEMU 7.2's ``qemu_strtosz``: decimal with an optional fraction that needs
  a unit (``1.5k``; ``1.1k`` rounds to 1126), hex without fraction (a unit after hex is
  deprecated but accepted), units ``b k m g t p e`` in powers of 1024, ERANGE past 2^64.
* :func:`cvtnum` is qemu-img's size argument check with its messages.
* :class:`OptionList` parses ``-o key=value,...`` the way QemuOpts does (``,,`` escapes a
  comma; typed values: size, number, bool, string).

Every error is a :class:`~bitback.errors.BitbackError` whose text is what follows
``bitback-img: `` on stderr (continuation lines included).
"""

from __future__ import annotations

import errno
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from bitback import units
from bitback.errors import InvalidArgumentError

__all__ = [
    "INT64_MAX",
    "PROG",
    "HelpRequested",
    "OptSpec",
    "OptionList",
    "RangeError",
    "UsageError",
    "cvtnum",
    "getopt",
    "output_format",
    "strtosz",
    "warn",
]

PROG = "bitback-img"
INT64_MAX = (1 << 63) - 1
UINT64_MAX = (1 << 64) - 1


class UsageError(InvalidArgumentError):
    """A command-line error with a pointer to ``--help``.

    qemu-img prints the pointer on a second line; bitback keeps every error to one line (the
    interop tests fold qemu-img's two lines the same way before comparing).
    """

    def __init__(self, message: str) -> None:
        super().__init__(f"{message} (try '{PROG} --help' for more information)")


class HelpRequested(Exception):
    """``-h``/``--help`` given to a command: the dispatcher prints the usage, exit 0."""


class RangeError(InvalidArgumentError):
    """A number that parses but does not fit (QEMU's ERANGE)."""


def warn(message: str) -> None:
    """qemu-img's ``warn_report``: ``PROG: warning: message`` on stderr."""
    print(f"{PROG}: warning: {message}", file=sys.stderr)


# -- getopt ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OptSpec:
    """Options of one command: ``short`` in getopt syntax (``"hf:U"``: ``f`` takes an
    argument) and ``long`` mapping a long name to (takes_argument, key reported)."""

    short: str
    long: Mapping[str, tuple[bool, str]] = field(default_factory=dict)

    def short_takes_arg(self, ch: str) -> bool | None:
        """None if ``ch`` is not an option, else whether it takes an argument."""
        i = self.short.find(ch)
        if ch == ":" or i < 0:
            return None
        return self.short[i + 1 : i + 2] == ":"


def getopt(
    argv: Sequence[str], spec: OptSpec, *, permute: bool = True
) -> tuple[list[tuple[str, str | None]], list[str]]:
    """Parse ``argv[1:]`` (``argv[0]`` is the command name) into options and operands.

    Returns ``([(key, value), ...], operands)``; ``key`` is the short letter or the key a
    long option maps to. ``permute=False`` stops at the first operand (``+`` in getopt).
    Raises :class:`UsageError` with qemu-img's text.
    """
    opts: list[tuple[str, str | None]] = []
    operands: list[str] = []
    i = 1
    last_operand: str | None = None
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            operands.extend(argv[i + 1 :])
            break
        if not arg.startswith("-") or arg == "-":
            if not permute:
                operands.extend(argv[i:])
                break
            operands.append(arg)
            last_operand = arg
            i += 1
            continue
        if arg.startswith("--"):
            i = _long_option(argv, i, spec, opts)
            continue
        # glibc reports a bad character in the middle of a cluster with optind still on
        # the cluster; by then the operands skipped so far sit just before it.
        before = last_operand if last_operand is not None else argv[i - 1]
        j = 1
        while j < len(arg):
            ch = arg[j]
            takes = spec.short_takes_arg(ch)
            last = j == len(arg) - 1
            if takes is None:
                raise UsageError(f"unrecognized option '{arg if last else before}'")
            if not takes:
                opts.append((ch, None))
                j += 1
                continue
            if not last:
                opts.append((ch, arg[j + 1 :]))
            elif i + 1 < len(argv):
                i += 1
                opts.append((ch, argv[i]))
            else:
                raise UsageError(f"missing argument for option '{arg}'")
            break
        i += 1
    return opts, operands


def _long_option(
    argv: Sequence[str], i: int, spec: OptSpec, opts: list[tuple[str, str | None]]
) -> int:
    arg = argv[i]
    name, eq, value = arg[2:].partition("=")
    matches = [n for n in spec.long if n == name] or [n for n in spec.long if n.startswith(name)]
    if len(matches) != 1 or not name:
        raise UsageError(f"unrecognized option '{arg}'")
    takes, key = spec.long[matches[0]]
    if not takes:
        if eq:
            raise UsageError(f"unrecognized option '{arg}'")
        opts.append((key, None))
        return i + 1
    if eq:
        opts.append((key, value))
        return i + 1
    if i + 1 >= len(argv):
        raise UsageError(f"missing argument for option '{arg}'")
    opts.append((key, argv[i + 1]))
    return i + 2


def output_format(value: str) -> Literal["human", "json"]:
    """``--output`` (7.2 accepts exactly these two words)."""
    if value == "json":
        return "json"
    if value == "human":
        return "human"
    raise InvalidArgumentError("--output must be used with human or json as argument.")


# -- sizes ----------------------------------------------------------------------------------

def strtosz(text: str) -> int:
    """QEMU 7.2's ``qemu_strtosz`` (:func:`bitback.units.strtosz`). Raises
    :class:`RangeError` (ERANGE: 2^64 or more) or :class:`InvalidArgumentError` (EINVAL)."""
    try:
        return units.strtosz(text, warn=warn)
    except units.SizeError as exc:
        if exc.errno == errno.ERANGE:
            raise RangeError(f"size '{text}' is out of range") from exc
        raise InvalidArgumentError(f"invalid size '{text}'") from exc


def cvtnum(name: str, text: str, *, lo: int = 0, hi: int = INT64_MAX) -> int:
    """qemu-img 7.2's ``cvtnum``: a size argument with its two kinds of error text."""
    try:
        value = strtosz(text)
    except RangeError:
        value = UINT64_MAX + 1
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(
            f"Invalid {name} specified. You may use k, M, G, T, P or E suffixes for "
            "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
        ) from exc
    if not lo <= value <= hi:
        raise RangeError(f"Invalid {name} specified. Must be between {lo} and {hi}.")
    return value


# -- -o option lists ----------------------------------------------------------------------

OptType = Literal["size", "number", "bool", "string"]

_SIZE_HINT = (
    ". Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta- "
    "and exabytes, respectively."
)


def valid_option_list(text: str) -> bool:
    """qemu-img's ``is_valid_option_list``: non-empty, no leading comma, and an even number
    of trailing commas (each ``,,`` is an escaped comma)."""
    if not text or text.startswith(","):
        return False
    trailing = len(text) - len(text.rstrip(","))
    return trailing % 2 == 0


def split_option_list(text: str) -> list[tuple[str, str | None]]:
    """``a=1,b=x,,y,c`` -> ``[("a", "1"), ("b", "x,y"), ("c", None)]`` (QemuOpts syntax)."""
    out: list[tuple[str, str | None]] = []
    pos = 0
    while pos < len(text):
        # A key ends at '=' or ','; a value ends at a single ','.
        m = re.match(r"[^=,]*", text[pos:])
        assert m is not None
        key = m.group()
        pos += len(key)
        value: str | None = None
        if text[pos : pos + 1] == "=":
            pos += 1
            chars = []
            while pos < len(text):
                if text[pos] == ",":
                    if text[pos + 1 : pos + 2] == ",":
                        chars.append(",")
                        pos += 2
                        continue
                    break
                chars.append(text[pos])
                pos += 1
            value = "".join(chars)
        out.append((key, value))
        pos += 1  # the separating comma
    return out


@dataclass
class OptionList:
    """Accumulated ``-o`` options with the types a format declares.

    ``types`` maps each accepted name to its type; values are checked as QemuOpts checks
    them and kept with their original text (``printed`` renders them as qemu-img's
    ``Formatting`` line does: sizes and numbers as decimal values, the rest as given).
    """

    types: Mapping[str, OptType]
    values: dict[str, str] = field(default_factory=dict)

    def parse(self, text: str) -> None:
        """Add ``key=value,...``; raises with QEMU's messages (``Invalid parameter 'x'``)."""
        for key, raw in split_option_list(text):
            if key not in self.types:
                raise InvalidArgumentError(f"Invalid parameter '{key}'")
            value = "on" if raw is None else raw
            self.check(key, value)
            self.values[key] = value

    def check(self, key: str, value: str) -> None:
        kind = self.types[key]
        if kind == "size":
            try:
                strtosz(value)
            except RangeError as exc:
                raise InvalidArgumentError(
                    f"Value '{value}' is out of range for parameter '{key}'"
                ) from exc
            except InvalidArgumentError as exc:
                raise InvalidArgumentError(
                    f"Parameter '{key}' expects a non-negative number below 2^64" + _SIZE_HINT
                ) from exc
        elif kind == "number":
            if _c_strtou64(value) is None:
                raise InvalidArgumentError(f"Parameter '{key}' expects a number")
        elif kind == "bool" and _parse_bool(value) is None:
            raise InvalidArgumentError(f"Parameter '{key}' expects 'on' or 'off'")

    def set(self, key: str, value: str) -> None:
        self.values[key] = value

    def get(self, key: str) -> str | None:
        return self.values.get(key)

    def get_size(self, key: str) -> int | None:
        v = self.values.get(key)
        return None if v is None else strtosz(v)

    def get_number(self, key: str) -> int | None:
        v = self.values.get(key)
        return None if v is None else _c_strtou64(v)

    def get_bool(self, key: str, default: bool = False) -> bool:
        v = self.values.get(key)
        parsed = None if v is None else _parse_bool(v)
        return default if parsed is None else parsed

    def printed(self, key: str) -> str | None:
        """The value as qemu-img's ``Formatting`` line shows it."""
        v = self.values.get(key)
        if v is None:
            return None
        kind = self.types[key]
        if kind == "size":
            return str(strtosz(v))
        if kind == "number":
            return str(_c_strtou64(v))
        return v


def _parse_bool(value: str) -> bool | None:
    if value in ("on", "yes", "true", "y"):
        return True
    if value in ("off", "no", "false", "n"):
        return False
    return None


def _c_strtou64(text: str) -> int | None:
    """``qemu_strtou64(text, NULL, 0)``: C base prefixes, the whole string, no sign games."""
    s = text.lstrip(" \t\n\v\f\r")  # C isspace
    if s.startswith("+"):
        s = s[1:]
    try:
        if re.fullmatch(r"0[xX][0-9a-fA-F]+", s):
            v = int(s, 16)
        elif re.fullmatch(r"0[0-7]*", s):
            v = int(s, 8)
        elif re.fullmatch(r"[1-9][0-9]*", s):
            v = int(s)
        else:
            return None
    except ValueError:
        return None
    return v if v <= UINT64_MAX else None
