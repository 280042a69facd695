"""A small QAPI: declare command arguments, check a JSON ``arguments`` object against them.

Declarations read like the ``.json`` schema they transcribe::

    BITMAP_ADD = Struct("BlockDirtyBitmapAdd", [
        Member("node", STR), Member("name", STR),
        Member("granularity", UINT32, optional=True),
        Member("persistent", BOOL, optional=True),
    ])

:func:`validate_arguments` walks the value the way QEMU 7.2's QObject input visitor
(``qapi/qobject-input-visitor.c``) is driven by the generated code, and fails with QEMU's
exact text on the first fault in QEMU's order: members in schema order (base first, then the
selected variant), each nested object finished before the next member, unexpected members
last. Measured on QEMU 7.2 (and pinned in ``tests/unit/test_qmp_schema.py``):

=================================  ==========================================================
fault                              ``desc``
=================================  ==========================================================
required member absent             ``Parameter 'file.image.filename' is missing``
member nobody declared             ``Parameter 'file.inject-error[1].bogus' is unexpected``
wrong JSON type                    ``Invalid parameter type for 'size', expected: integer``
                                   (``string``, ``boolean``, ``number``, ``object``, ``array``)
uint64 / size not a JSON integer   ``Parameter 'granularity' expects uint64``
intN / uintN out of range          ``Parameter 'granularity' expects uint32_t`` (bare name)
enum value unknown                 ``Parameter 'sync' does not accept value 'bogus'`` (bare)
alternate type mismatch            ``Invalid parameter type for 'file', expected: BlockdevRef``
=================================  ==========================================================

"Bare" texts name the member only (``'event'``, never ``'file.inject-error[0].event'``), or
``'null'`` for a list element: QEMU formats them without the path. uint64 accepts negative
integers (they wrap, as in QEMU); floats never satisfy an integer type. When several members
are unexpected, QEMU names the first one of a GLib hash table; :class:`_UnvisitedKeys`
reproduces that choice.

``keyval=True`` validates what ``-blockdev driver=qcow2,file.driver=file,...`` parses to:
every scalar is a string, converted as QEMU's keyval visitor converts it: integers by
``strtoll``/``strtoull`` rules with base prefixes (``0x10``, ``010``), booleans from
``on/yes/true/y`` and ``off/no/false/n``, sizes by ``qemu_strtosz`` (``64k``); list
indexes print as ``inject-error.0.event``.

The result is a new dict keyed by the QAPI member names (dashes kept): present members,
plus the declared defaults of absent optional ones. Alternates yield their branch's value;
a flat union yields one dict with base and variant members.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bitback.qjson import qdict_order
from bitback.qmp.errors import QMPError, generic
from bitback.units import SizeError, strtosz

__all__ = [
    "ANY", "BOOL", "INT", "INT8", "INT16", "INT32", "INT64", "NULL", "NUMBER", "SIZE",
    "STR", "UINT8", "UINT16", "UINT32", "UINT64",
    "Alternate", "Builtin", "Enum", "ListOf", "Member", "QAPIType", "Struct", "Union",
    "validate", "validate_arguments",
]  # fmt: skip

_INT64_MIN, _INT64_MAX, _UINT64_MAX = -(1 << 63), (1 << 63) - 1, (1 << 64) - 1


class QAPIType:
    """Base of every type; ``name`` is the QAPI name, used in alternate errors."""

    name: str


@dataclass(frozen=True, slots=True)
class Builtin(QAPIType):
    """A built-in scalar: ``str bool int intN uintN size number any null``."""

    name: str


STR, BOOL, NUMBER, ANY, NULL = (Builtin(n) for n in ("str", "bool", "number", "any", "null"))
INT, INT8, INT16, INT32, INT64 = (Builtin(n) for n in ("int", "int8", "int16", "int32", "int64"))
UINT8, UINT16, UINT32, UINT64, SIZE = (
    Builtin(n) for n in ("uint8", "uint16", "uint32", "uint64", "size")
)
# Range-checked widths: (min, max, the C type QEMU names in the error).
_SIGNED = {"int8": (-(1 << 7), (1 << 7) - 1, "int8_t"), "int16": (-(1 << 15), (1 << 15) - 1,
           "int16_t"), "int32": (-(1 << 31), (1 << 31) - 1, "int32_t")}  # fmt: skip
_UNSIGNED = {"uint8": (0xFF, "uint8_t"), "uint16": (0xFFFF, "uint16_t"),
             "uint32": (0xFFFFFFFF, "uint32_t")}  # fmt: skip


@dataclass(frozen=True, slots=True, init=False)
class Enum(QAPIType):
    """A string from a fixed set."""

    name: str
    values: tuple[str, ...]

    def __init__(self, name: str, values: Sequence[str]) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "values", tuple(values))


_NO_DEFAULT: Any = object()


@dataclass(frozen=True, slots=True)
class Member:
    """A struct member; an absent optional member takes ``default`` if one is given."""

    name: str
    type: QAPIType
    optional: bool = False
    default: Any = field(default=_NO_DEFAULT, compare=False)

    @property
    def has_default(self) -> bool:
        return self.default is not _NO_DEFAULT


class Struct(QAPIType):
    """A JSON object with declared members; ``base`` members come first, as in QAPI."""

    def __init__(self, name: str, members: Sequence[Member], base: Struct | None = None) -> None:
        self.name = name
        self.members: tuple[Member, ...] = (base.members if base else ()) + tuple(members)
        self.by_name = {m.name: m for m in self.members}
        if len(self.by_name) != len(self.members):
            raise ValueError(f"{name}: duplicate member")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class Union(Struct):
    """A flat union: base members, one of them the enum ``discriminator`` whose value picks
    the variant struct whose members follow (values without a variant add none)."""

    def __init__(
        self,
        name: str,
        members: Sequence[Member],
        discriminator: str,
        variants: Mapping[str, Struct],
        base: Struct | None = None,
    ) -> None:
        super().__init__(name, members, base)
        tag = self.by_name.get(discriminator)
        if tag is None or tag.optional or not isinstance(tag.type, Enum):
            raise ValueError(f"{name}: discriminator must be a required enum member")
        if not set(variants) <= set(tag.type.values):
            raise ValueError(f"{name}: a variant for a value that {tag.type.name} lacks")
        self.discriminator = discriminator
        self.variants = dict(variants)


@dataclass(frozen=True, slots=True)
class ListOf(QAPIType):
    """A JSON array of ``element``."""

    element: QAPIType

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{self.element.name}List"


@dataclass(frozen=True, slots=True, init=False)
class Alternate(QAPIType):
    """One of several types told apart by JSON type (object, string, number, bool, null);
    e.g. ``BlockdevRef`` = ``Alternate("BlockdevRef", [BLOCKDEV_OPTIONS, STR])``.

    A recursive schema declares the alternate with the branches that exist so far and
    completes it with :meth:`set_branches` once the recursive type exists.
    """

    name: str
    branches: tuple[QAPIType, ...]

    def __init__(self, name: str, branches: Sequence[QAPIType]) -> None:
        object.__setattr__(self, "name", name)
        self.set_branches(branches)

    def set_branches(self, branches: Sequence[QAPIType]) -> None:
        """(Re)define the branches: at most one per JSON type, none a list or ``any``."""
        kinds = [_json_kind(b) for b in branches]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"{self.name}: two branches for one JSON type")
        object.__setattr__(self, "branches", tuple(branches))

    def branch_for(self, value: object) -> QAPIType | None:
        """The branch a value of this JSON type goes to, if any."""
        for branch in self.branches:
            if _json_kind(branch) == _value_kind(value):
                return branch
        return None


def _json_kind(t: QAPIType) -> str:
    if isinstance(t, Struct):
        return "object"
    if isinstance(t, Enum) or t == STR:
        return "string"
    if t == BOOL:
        return "boolean"
    if t == NULL:
        return "null"
    if isinstance(t, Builtin) and t.name != "any":
        return "number"
    raise ValueError(f"{t.name} cannot be an alternate branch")


def _value_kind(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if value is None:
        return "null"
    return "object" if isinstance(value, dict) else "array"


# -- GLib's hash table, for the choice among several unexpected members ------------------------

# GLib's table sizes are powers of two; slots are picked modulo the prime below each size.
_PRIME_MOD = (
    1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521,
    131071, 262139, 524287, 1048573, 2097143, 4194301, 8388593, 16777213, 33554393,
    67108859, 134217689, 268435399, 536870909, 1073741789, 2147483647,
)  # fmt: skip
_UNUSED, _TOMBSTONE = 0, 1


def _g_str_hash(key: str) -> int:
    h = 5381
    for byte in key.encode():
        h = (h * 33 + (byte - 256 if byte >= 128 else byte)) & 0xFFFFFFFF  # signed char
    return h if h >= 2 else 2  # 0 and 1 mark unused and deleted slots


class _UnvisitedKeys:
    """The ``GHashTable`` (GLib 2.74) in which QEMU's visitor tracks an object's unvisited
    keys: open addressing with quadratic probing, grown past 15/16 full, shrunk below 1/4,
    rehashed in place. Only the iteration order matters: QEMU reports the first key left."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._set_shift(3)
        self.hashes = [_UNUSED] * self.size
        self.keys: list[str | None] = [None] * self.size
        self.nnodes = self.noccupied = 0
        for key in keys:
            self.insert(key)

    def _set_shift(self, shift: int) -> None:
        self.size, self.mod, self.mask = 1 << shift, _PRIME_MOD[shift], (1 << shift) - 1

    def _lookup(self, key: str) -> tuple[int, int]:
        h = _g_str_hash(key)
        i = (h * 11 & 0xFFFFFFFF) % self.mod
        step, tombstone = 0, -1
        while self.hashes[i] != _UNUSED:
            if self.hashes[i] == h and self.keys[i] == key:
                return i, h
            if self.hashes[i] == _TOMBSTONE and tombstone < 0:
                tombstone = i
            step += 1
            i = (i + step) & self.mask
        return (tombstone if tombstone >= 0 else i), h

    def insert(self, key: str) -> None:
        i, h = self._lookup(key)
        if self.hashes[i] > _TOMBSTONE:
            return
        was_unused = self.hashes[i] == _UNUSED
        self.hashes[i], self.keys[i] = h, key
        self.nnodes += 1
        if was_unused:
            self.noccupied += 1
            self._maybe_resize()

    def remove(self, key: str) -> None:
        i, _ = self._lookup(key)
        if self.hashes[i] > _TOMBSTONE:
            self.hashes[i], self.keys[i] = _TOMBSTONE, None
            self.nnodes -= 1
            self._maybe_resize()

    def first(self) -> str | None:
        for h, key in zip(self.hashes, self.keys, strict=True):
            if h > _TOMBSTONE:
                return key
        return None

    def _maybe_resize(self) -> None:
        if (self.size > self.nnodes * 4 and self.size > 8) or (
            self.size <= self.noccupied + self.noccupied // 16
        ):
            self._resize()

    def _resize(self) -> None:
        old = self.size
        self._set_shift(max(int(self.nnodes * 1.333).bit_length(), 3))
        if self.size > old:
            self.hashes += [_UNUSED] * (self.size - old)
            self.keys += [None] * (self.size - old)
        placed = [False] * max(old, self.size)
        for i in range(old):
            h = self.hashes[i]
            if h <= _TOMBSTONE:
                self.hashes[i] = _UNUSED
                continue
            if placed[i]:
                continue
            key, self.hashes[i], self.keys[i] = self.keys[i], _UNUSED, None
            while True:  # place it, evicting whatever sits there into the next round
                j, step = (h * 11 & 0xFFFFFFFF) % self.mod, 0
                while placed[j]:
                    step += 1
                    j = (j + step) & self.mask
                placed[j] = True
                evicted_h, self.hashes[j] = self.hashes[j], h
                if evicted_h <= _TOMBSTONE:
                    self.keys[j] = key
                    break
                h, (key, self.keys[j]) = evicted_h, (self.keys[j], key)
        del self.hashes[self.size :], self.keys[self.size :]
        self.noccupied = self.nnodes


# -- keyval scalar conversions ------------------------------------------------------------------

_C_SPACE = " \t\n\v\f\r"
_TRUE, _FALSE = frozenset({"on", "yes", "true", "y"}), frozenset({"off", "no", "false", "n"})
_FLOAT_PREFIX = re.compile(
    r"[+-]?(?:0[xX](?:[0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)(?:[pP][+-]?[0-9]+)?"
    r"|(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|inf(?:inity)?|nan)",
    re.IGNORECASE,
)


def _c_strtox(text: str, signed: bool) -> int | None:
    """``qemu_strtoi64`` / ``qemu_strtou64`` with base 0 and no end pointer: the whole
    string must be one number (leading C whitespace and a sign allowed; ``0x`` hex, ``0``
    octal). ``None`` on error; unsigned wraps a negative value modulo 2^64, as C does."""
    s = text.lstrip(_C_SPACE)
    neg = s[:1] == "-"
    if s[:1] in ("+", "-"):
        s = s[1:]
    if s[:2].lower() == "0x" and s[2:3] != "" and s[2:3] in "0123456789abcdefABCDEF":
        base, s = 16, s[2:]
    else:
        base = 8 if s[:1] == "0" else 10
    digits = "0123456789abcdef"[:base]
    if not s or any(c.lower() not in digits for c in s):
        return None  # no digits, or characters after the number
    if base == 10 and len(s) > 20:
        return None  # overflow (a decimal number has no leading zero)
    magnitude = int(s, base)
    if signed:
        value = -magnitude if neg else magnitude
        return value if _INT64_MIN <= value <= _INT64_MAX else None
    if magnitude > _UINT64_MAX:
        return None
    return (-magnitude) & _UINT64_MAX if neg else magnitude


def _c_strtod_finite(text: str) -> float | None:
    """``qemu_strtod_finite`` as the keyval visitor calls it: a leading number (C
    ``strtod`` syntax, trailing characters ignored, as QEMU ignores them), finite."""
    m = _FLOAT_PREFIX.match(text.lstrip(_C_SPACE))
    if m is None:
        return None
    token = m.group()
    value = float.fromhex(token) if "x" in token.lower() else float(token)
    if not math.isfinite(value) or (value != 0 and abs(value) < 2.2250738585072014e-308):
        return None  # overflow, or underflow (strtod's ERANGE)
    return value


# -- the visitor --------------------------------------------------------------------------------

_ABSENT: Any = object()


@dataclass(slots=True)
class _Frame:
    name: str | None  # the container's name in its parent
    value: Any  # dict or list
    unvisited: _UnvisitedKeys | None = None
    index: int = -1


class _Visitor:
    def __init__(self, root: Any, keyval: bool) -> None:
        self.root = root
        self.keyval = keyval
        self.stack: list[_Frame] = []

    # -- naming and lookup (full_name, qobject_input_get_object) ---------------------------
    def full_name(self, name: str | None) -> str:
        path = ""
        for frame in reversed(self.stack):
            if isinstance(frame.value, dict):
                path = "." + (name if name is not None else "<anonymous>") + path
            else:
                path = (f".{frame.index}" if self.keyval else f"[{frame.index}]") + path
            name = frame.name
        if name is not None:
            return name + path
        if path.startswith("."):
            return path[1:]
        return path or "<anonymous>"

    def get(self, name: str | None, consume: bool = True) -> Any:
        if not self.stack:
            return self.root
        top = self.stack[-1]
        if isinstance(top.value, dict):
            assert name is not None
            value = top.value.get(name, _ABSENT)
            if consume and value is not _ABSENT and top.unvisited is not None:
                top.unvisited.remove(name)
            return value
        if consume:
            top.index += 1
            return top.value[top.index] if top.index < len(top.value) else _ABSENT
        return top.value[top.index + 1] if top.index + 1 < len(top.value) else _ABSENT

    def need(self, name: str | None, consume: bool = True) -> Any:
        value = self.get(name, consume)
        if value is _ABSENT:
            raise generic(f"Parameter '{self.full_name(name)}' is missing")
        return value

    def wrong_type(self, name: str | None, expected: str) -> QMPError:
        return generic(f"Invalid parameter type for '{self.full_name(name)}', expected: {expected}")

    # -- containers ---------------------------------------------------------------------
    def visit(self, t: QAPIType, name: str | None) -> Any:
        if isinstance(t, Struct):
            return self.struct(t, name)
        if isinstance(t, ListOf):
            value = self.need(name)
            if not isinstance(value, list):
                raise self.wrong_type(name, "array")
            self.stack.append(_Frame(name, value))
            out = [self.visit(t.element, None) for _ in value]
            self.stack.pop()
            return out
        if isinstance(t, Alternate):
            value = self.need(name, consume=False)
            branch = t.branch_for(value)
            if branch is None:
                shown = name if name is not None else "null"
                raise generic(f"Invalid parameter type for '{shown}', expected: {t.name}")
            return self.visit(branch, name)
        if isinstance(t, Enum):
            text = self.string(name)
            if text not in t.values:
                shown = name if name is not None else "null"
                raise generic(f"Parameter '{shown}' does not accept value '{text}'")
            return text
        if isinstance(t, Builtin):
            return self.scalar(t, name)
        raise TypeError(f"not a QAPI type: {t!r}")

    def struct(self, t: Struct, name: str | None) -> dict[str, Any]:
        value = self.need(name)
        if not isinstance(value, dict):
            raise self.wrong_type(name, "object")
        frame = _Frame(name, value, _UnvisitedKeys(qdict_order(value)))
        self.stack.append(frame)
        out: dict[str, Any] = {}
        self.members(t.members, value, out)
        if isinstance(t, Union):
            variant = t.variants.get(out[t.discriminator])
            if variant is not None:
                self.members(variant.members, value, out)
        assert frame.unvisited is not None
        left = frame.unvisited.first()
        if left is not None:
            raise generic(f"Parameter '{self.full_name(left)}' is unexpected")
        self.stack.pop()
        return out

    def members(
        self, members: Sequence[Member], value: dict[str, Any], out: dict[str, Any]
    ) -> None:
        for m in members:
            if m.optional and m.name not in value:
                if m.has_default:
                    out[m.name] = m.default
                continue
            out[m.name] = self.visit(m.type, m.name)

    # -- scalars --------------------------------------------------------------------------
    def string(self, name: str | None) -> str:
        value = self.need(name)
        if isinstance(value, str):
            return value
        if not self.keyval:
            raise self.wrong_type(name, "string")
        if isinstance(value, (dict, list)):
            raise generic(f"Parameters '{self.full_name(name)}.*' are unexpected")
        raise generic(f"Internal error: parameter {self.full_name(name)} invalid")

    def scalar(self, t: Builtin, name: str | None) -> Any:
        kind = t.name
        if kind == "any":
            return self.need(name)
        if kind == "str":
            return self.string(name)
        if kind == "null":
            if self.need(name) is not None:
                raise self.wrong_type(name, "null")
            return None
        if self.keyval:
            return self.keyval_scalar(kind, name)
        value = self.need(name)
        is_num = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind == "bool":
            if not isinstance(value, bool):
                raise self.wrong_type(name, "boolean")
            return value
        if kind == "number":
            if not is_num:
                raise self.wrong_type(name, "number")
            return float(value)
        if kind in ("uint64", "size") or kind in _UNSIGNED:
            if not (is_num and isinstance(value, int) and _INT64_MIN <= value <= _UINT64_MAX):
                raise generic(f"Parameter '{self.full_name(name)}' expects uint64")
            return self.check_range(kind, name, value & _UINT64_MAX)
        if not (is_num and isinstance(value, int) and _INT64_MIN <= value <= _INT64_MAX):
            raise self.wrong_type(name, "integer")
        return self.check_range(kind, name, value)

    def keyval_scalar(self, kind: str, name: str | None) -> Any:
        text = self.string(name)
        full = self.full_name(name)
        if kind == "bool":
            if text in _TRUE or text in _FALSE:
                return text in _TRUE
            raise generic(f"Parameter '{full}' expects 'on' or 'off'")
        if kind == "number":
            number = _c_strtod_finite(text)
            if number is None:
                raise generic(f"Invalid parameter type for '{full}', expected: number")
            return number
        if kind == "size":
            try:
                return strtosz(text)
            except SizeError:
                raise generic(f"Parameter '{full}' expects size") from None
        value = _c_strtox(text, signed=not kind.startswith("uint"))
        if value is None:
            raise generic(f"Parameter '{full}' expects integer")
        return self.check_range(kind, name, value)

    def check_range(self, kind: str, name: str | None, value: int) -> int:
        """``visit_type_intN`` / ``visit_type_uintN``: the error names the bare member."""
        bare = name if name is not None else "null"
        limits = _SIGNED.get(kind)
        if limits is not None and not limits[0] <= value <= limits[1]:
            raise generic(f"Parameter '{bare}' expects {limits[2]}")
        ulimits = _UNSIGNED.get(kind)
        if ulimits is not None and value > ulimits[0]:
            raise generic(f"Parameter '{bare}' expects {ulimits[1]}")
        return value


def validate(t: QAPIType, value: Any, *, keyval: bool = False) -> Any:
    """Check ``value`` against ``t`` as QEMU's input visitor does; return the checked value.

    Raises :class:`~bitback.qmp.errors.QMPError` (``GenericError``) with QEMU's text.
    """
    return _Visitor(value, keyval).visit(t, None)


def validate_arguments(
    schema: Struct, arguments: Mapping[str, Any], *, keyval: bool = False
) -> dict[str, Any]:
    """A command's ``arguments`` object checked against its argument struct (or, for a
    boxed command such as ``blockdev-add``, its union); see the module docstring."""
    result: dict[str, Any] = validate(schema, dict(arguments), keyval=keyval)
    return result
