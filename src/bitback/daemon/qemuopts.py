"""QEMU's three option-string syntaxes, read by pure functions.

* **QemuOpts** (``-drive``, ``-chardev``, ``-mon``, ``-device``): ``name=value`` items split at
  single commas; ``,,`` stands for one comma inside a value. A bare word is a boolean flag
  (``server`` = ``server=on``, ``nowait`` = ``wait=off``; QEMU 7.2 warns that this form is
  deprecated), except the first word of an option with an *implied name*
  (``-chardev socket,...`` = ``backend=socket``, which keeps the ``,,`` escape). Repeated names:
  the last wins. ``id`` is set apart: the *first* ``id=`` names the option.
* **keyval** (``--blockdev``, ``--monitor``): dotted keys build a tree whose leaves are strings::

      driver=qcow2,file.driver=file,inject.0.event=read_aio
      -> {"driver": "qcow2", "file": {"driver": "file"}, "inject": [{"event": "read_aio"}]}

  An all-digit fragment makes its parent a list (indices from 0, no gaps). The implied first
  value is taken verbatim up to the first ``,`` or ``=`` (no ``,,`` escape there).
* **JSON** (an option value starting with ``{``): QEMU's dialect, which also accepts
  single-quoted strings and ``\\'``, and caps nesting at 1024.

Every error is an :class:`OptionError` carrying QEMU 7.2's text (util/qemu-option.c,
util/keyval.c, qobject/json-*.c) *without* the option location; the caller adds that. Where
QEMU's outcome depends on hash-table order (which of two conflicting list indices wins), this
module uses insertion order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, TypeAlias, cast

from bitback.errors import InvalidArgumentError
from bitback.qmp.jsonstream import ParseError, parse_json_text

__all__ = [
    "JsonValue",
    "OptType",
    "OptionError",
    "QemuOptsResult",
    "id_wellformed",
    "keyval_parse",
    "parse_bool",
    "parse_dict_option",
    "parse_json_object",
    "parse_number",
    "parse_qemu_opts",
    "qemu_opts_id",
]

JsonValue: TypeAlias = "bool | int | float | str | list[JsonValue] | dict[str, JsonValue] | None"
OptType = Literal["str", "bool", "number"]

_INT_MAX = 2**31 - 1
_FRAGMENT_MAX = 127  # keyval key fragments are at most 127 characters


class OptionError(InvalidArgumentError):
    """An option value that does not parse; the message is QEMU's, without a location."""


def _alpha(c: str) -> bool:
    return "a" <= c <= "z" or "A" <= c <= "Z"


def _digit(c: str) -> bool:
    return "0" <= c <= "9"


def _alnum(c: str) -> bool:
    return _alpha(c) or _digit(c)


def id_wellformed(text: str) -> bool:
    """QEMU's identifier rule (util/id.c): an ASCII letter, then letters, digits, ``-._``."""
    return bool(text) and _alpha(text[0]) and all(_alnum(c) or c in "-._" for c in text[1:])


_TRUE = frozenset({"on", "yes", "true", "y"})
_FALSE = frozenset({"off", "no", "false", "n"})


def parse_bool(name: str, value: str) -> bool:
    """``on/yes/true/y`` or ``off/no/false/n`` as ``qapi_bool_parse``, else :class:`OptionError`."""
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise OptionError(f"Parameter '{name}' expects 'on' or 'off'")


def parse_number(name: str, value: str) -> int:
    """An unsigned 64-bit number as ``qemu_strtou64(value, NULL, 0)`` reads it.

    Decimal, ``0x`` hex or ``0`` octal; a leading ``-`` wraps modulo 2**64 as strtoull does.
    """
    text = value.lstrip(" \t\n\v\f\r")
    negative = text.startswith("-")
    if text.startswith(("+", "-")):
        text = text[1:]
    base = 10
    if text[:2].lower() == "0x" and len(text) > 2:
        base, text = 16, text[2:]
    elif text.startswith("0") and len(text) > 1:
        base, text = 8, text[1:]
    digits = "0123456789abcdef"[:base]
    if not text or any(c not in digits for c in text.lower()):
        raise OptionError(f"Parameter '{name}' expects a number")
    number = int(text, base)
    if number >= 2**64:
        raise OptionError(f"Value '{value}' is too large for parameter '{name}'")
    return (2**64 - number) % 2**64 if negative else number


# ---------------------------------------------------------------------------------------------
# QemuOpts


@dataclass(frozen=True, slots=True)
class QemuOptsResult:
    """One parsed QemuOpts string.

    ``items`` keeps every ``(name, value)`` in order, ``id`` items left out (a dict of them gives
    last-wins semantics); ``help`` is set when a bare ``help`` or ``?`` stopped the parse;
    ``warnings`` are the deprecation texts for short-form booleans, two lines each.
    """

    items: tuple[tuple[str, str], ...]
    help: bool
    warnings: tuple[str, ...]


def _span(text: str, pos: int, stops: str) -> int:
    """Index of the first character of ``stops`` at or after ``pos`` (``len`` if none)."""
    while pos < len(text) and text[pos] not in stops:
        pos += 1
    return pos


def _opt_value(text: str, pos: int) -> tuple[str, int]:
    """A value up to a single comma, ``,,`` read as ``,``; returns it and the comma's index."""
    out: list[str] = []
    while True:
        comma = text.find(",", pos)
        if comma < 0:
            out.append(text[pos:])
            return "".join(out), len(text)
        if text[comma + 1 : comma + 2] == ",":
            out.append(text[pos : comma + 1])
            pos = comma + 2
            continue
        out.append(text[pos:comma])
        return "".join(out), comma


def _name_value(
    text: str, pos: int, implied: str | None, warn: bool
) -> tuple[str, str, int, bool, str | None]:
    """One item: (name, value, next position, is a help flag, deprecation warning or None)."""
    end = _span(text, pos, "=,")
    is_help, warning = False, None
    if end == len(text) or text[end] != "=":
        if implied is not None:
            name = implied
            value, nxt = _opt_value(text, pos)
        else:
            name, nxt, prefix = text[pos:end], end, ""
            if name.startswith("no"):
                name, value, prefix = name[2:], "off", "no"
            else:
                value = "on"
                is_help = name in ("help", "?")
            if warn and not is_help:
                hint = f"{name}={value}"
                if name == "delay":  # QEMU points 'delay' users at the positive spelling
                    hint = f"nodelay={'on' if prefix else 'off'}"
                warning = (
                    f"short-form boolean option '{prefix}{name}' deprecated\n"
                    f"Please use {hint} instead"
                )
    else:
        name = text[pos:end]
        value, nxt = _opt_value(text, end + 1)
    if nxt < len(text):
        nxt += 1  # the separating comma
    return name, value, nxt, is_help, warning


def qemu_opts_id(text: str) -> str | None:
    """The value of the first ``id=`` item of a QemuOpts string, checked to be well formed."""
    pos = 0
    while pos < len(text):
        name, value, pos, _, _ = _name_value(text, pos, None, False)
        if name == "id":
            if not id_wellformed(value):
                raise OptionError("Parameter 'id' expects an identifier")
            return value
    return None


def parse_qemu_opts(
    text: str,
    *,
    implied: str | None = None,
    desc: Mapping[str, OptType] | None = None,
    allow_help: bool = False,
    warn_flags: bool = True,
) -> QemuOptsResult:
    """Split a QemuOpts string into items, validating them against ``desc``.

    ``desc`` maps each accepted name to its type (``None`` accepts any name, as ``-drive`` and
    ``-device`` do); an unknown name or a bad boolean/number raises :class:`OptionError` at the
    first offending item, as QEMU does. With ``allow_help`` a bare ``help``/``?`` ends the parse
    with ``help=True``; otherwise it is an ordinary ``help=on`` item.
    """
    items: list[tuple[str, str]] = []
    warnings: list[str] = []
    pos = 0
    while pos < len(text):
        name, value, pos, is_help, warning = _name_value(text, pos, implied, warn_flags)
        implied = None
        if warning is not None:
            warnings.append(warning)
        if is_help and allow_help:
            return QemuOptsResult(tuple(items), True, tuple(warnings))
        if name == "id":
            continue
        if desc is not None:
            kind = desc.get(name)
            if kind is None:
                raise OptionError(f"Invalid parameter '{name}'")
            if kind == "bool":
                parse_bool(name, value)
            elif kind == "number":
                parse_number(name, value)
        items.append((name, value))
    return QemuOptsResult(tuple(items), False, tuple(warnings))


# ---------------------------------------------------------------------------------------------
# keyval


def _index_len(key: str, pos: int, end: int) -> int:
    """Length of the run of decimal digits at ``pos`` (a list index fragment), 0 if none."""
    start = pos
    while pos < end and _digit(key[pos]):
        pos += 1
    return pos - start


def _qapi_name_len(key: str, pos: int, end: int) -> int:
    """Length of the QAPI name at ``pos`` (``[__RFQDN_]letter{alnum,-,_}``), 0 if none."""
    p = pos
    if p < end and key[p] == "_":
        if key[p + 1 : p + 2] != "_":
            return 0
        p += 2
        while p < end and (_alnum(key[p]) or key[p] in "-."):
            p += 1
        if p >= end or key[p] != "_":
            return 0
        p += 1
    if p >= end or not _alpha(key[p]):
        return 0
    p += 1
    while p < end and (_alnum(key[p]) or key[p] in "-_"):
        p += 1
    return p - pos


def _keyval_one(
    root: dict[str, object], text: str, pos: int, implied: str | None
) -> tuple[int, bool]:
    """Parse one ``key=value`` into ``root``; returns the next position and 'was help'."""
    end = _span(text, pos, "=,")
    key, kstart, kend, val_end = text, pos, end, -1
    if end > pos and (end == len(text) or text[end] != "="):
        if text[pos:end] in ("help", "?"):
            return min(end + 1, len(text)), True
        if implied is not None:
            key, kstart, kend, val_end = implied, 0, len(implied), end
    whole = key[kstart:kend]
    cur, frag, s = root, "", kstart
    while True:
        if s != kstart and _index_len(key, s, kend):
            flen = _index_len(key, s, kend)
        else:
            flen = _qapi_name_len(key, s, kend)
        if not flen or (s + flen < kend and key[s + flen] != "."):
            raise OptionError(f"Invalid parameter '{whole}'")
        if flen > _FRAGMENT_MAX:
            kind = " fragment" if s != kstart or s + flen != kend else ""
            raise OptionError(f"Parameter{kind} '{key[s : s + flen]}' is too long")
        if s != kstart:
            nxt = cur.setdefault(frag, {})
            if not isinstance(nxt, dict):
                raise OptionError(f"Parameters '{key[kstart : s - 1]}.*' used inconsistently")
            cur = nxt
        frag = key[s : s + flen]
        s += flen
        if s >= kend:
            break
        s += 1  # the '.' between fragments
    if val_end >= 0:
        value, nxt_pos = text[pos:val_end], val_end
    else:
        if s >= len(text) or text[s] != "=":
            raise OptionError(f"Expected '=' after parameter '{text[kstart:s]}'")
        value, nxt_pos = _opt_value(text, s + 1)
    if isinstance(cur.get(frag, ""), dict):
        raise OptionError(f"Parameters '{whole}.*' used inconsistently")
    cur[frag] = value
    return min(nxt_pos + 1, len(text)), False


def _listify(node: dict[str, object], path: list[str]) -> object:
    """Turn dicts whose keys are all indices into lists, children first."""
    has_index = has_member = False
    for k, v in node.items():
        if _digit(k[0]):
            has_index = True
        else:
            has_member = True
        if isinstance(v, dict):
            node[k] = _listify(v, [*path, k])
    prefix = "".join(f"{p}." for p in path)
    if has_index and has_member:
        raise OptionError(f"Parameters '{prefix}*' used inconsistently")
    if not has_index:
        return node
    slots: dict[int, object] = {}
    max_index = -1
    for k, v in node.items():
        index = min(int(k), _INT_MAX)
        max_index = max(max_index, index)
        if index < len(node):
            slots[index] = v
    out: list[object] = []
    for i in range(min(len(node) + 1, max_index + 1)):
        if i not in slots:
            raise OptionError(f"Parameter '{prefix}{i}' missing")
        out.append(slots[i])
    return out


def keyval_parse(text: str, implied_key: str | None = None) -> dict[str, JsonValue]:
    """Parse ``KEY=VALUE,...`` with dotted keys into a tree of dicts, lists and strings.

    ``implied_key`` names the value of a first item written without ``KEY=``. A bare ``help``
    is refused with QEMU's "Help is not available for this option".
    """
    root: dict[str, object] = {}
    pos, want_help = 0, False
    while pos < len(text):
        pos, is_help = _keyval_one(root, text, pos, implied_key)
        want_help = want_help or is_help
        implied_key = None
    if want_help:
        raise OptionError("Help is not available for this option")
    tree = _listify(root, [])
    assert isinstance(tree, dict)
    return cast("dict[str, JsonValue]", tree)  # leaves are str, inner nodes dicts and lists


# ---------------------------------------------------------------------------------------------
# JSON (QEMU's dialect)


def parse_json_object(text: str) -> dict[str, JsonValue]:
    """Parse ``text`` (which starts with ``{``) as exactly one JSON object, QEMU style.

    As ``qobject_from_json``: the text goes through QEMU's JSON streamer, then end of input
    (:func:`bitback.qmp.jsonstream.parse_json_text`). The first message decides: its error
    (a lexical error before the object closes is a ``stray`` one), or its value, unless
    anything at all follows it ("Expecting at most one JSON value").
    """
    result = parse_json_text(text)
    if isinstance(result, ParseError):
        raise OptionError(result.desc)
    if not isinstance(result, dict):
        raise OptionError("JSON parse error, expecting value")
    return cast("dict[str, JsonValue]", result)


def parse_dict_option(text: str, implied_key: str | None) -> tuple[dict[str, JsonValue], bool]:
    """A ``--blockdev``/``--monitor`` value: JSON if it starts with ``{``, else keyval.

    Returns the tree and whether it came from keyval (leaves are then all strings, and the
    consumer must convert them to the types it expects, as QEMU's keyval visitor does).
    """
    if text.startswith("{"):
        return parse_json_object(text), False
    return keyval_parse(text, implied_key), True
