"""JSON text exactly as QEMU 7.2 pretty-prints a QObject (``qobject_to_json_pretty``).

Two things make QEMU's output differ from :func:`json.dumps`:

* a QDict is a hash table of 512 buckets (``tdb_hash`` of the key), iterated bucket by bucket,
  newest entry first inside a bucket - so ``qemu-img info --output=json`` lists
  ``virtual-size`` before ``filename``. :func:`qdict_order` reproduces that order from the
  insertion order (which must be QAPI's field order, as QEMU's visitor inserts them);
* strings escape everything outside printable ASCII as ``\\uXXXX`` with upper-case hex.

Layout: four spaces per level, ``"key": value``; an empty container still gets its closing
bracket on a line of its own (``"flags": [`` newline, indent, ``]``), as QEMU's JSON writer
puts a newline before every closing bracket.

>>> print(dumps_pretty({"filename": "a", "virtual-size": 1}))
{
    "virtual-size": 1,
    "filename": "a"
}
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["dumps_pretty", "qdict_bucket", "qdict_order", "quote"]

_BUCKETS = 512
_SPECIAL = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}


def qdict_bucket(key: str) -> int:
    """The QDict bucket of ``key``: QEMU's ``tdb_hash`` modulo 512."""
    raw = key.encode()
    value = (0x238F13AF * len(raw)) & 0xFFFFFFFF
    for i, ch in enumerate(raw):
        value = (value + (ch << (i * 5 % 24))) & 0xFFFFFFFF
    return ((1103515243 * value + 12345) & 0xFFFFFFFF) % _BUCKETS


def qdict_order(keys: Iterable[str]) -> list[str]:
    """Keys in QDict iteration order, given their insertion order."""
    buckets: dict[int, list[str]] = {}
    for key in keys:
        buckets.setdefault(qdict_bucket(key), []).insert(0, key)
    return [k for b in sorted(buckets) for k in buckets[b]]


def quote(text: str) -> str:
    """A JSON string literal as QEMU writes it."""
    out = ['"']
    for ch in text:
        cp = ord(ch)
        if ch in _SPECIAL:
            out.append(_SPECIAL[ch])
        elif 0x20 <= cp < 0x7F:
            out.append(ch)
        elif 0xDC80 <= cp <= 0xDCFF:
            out.append("\\uFFFD")  # an undecodable byte (surrogateescape): QEMU's U+FFFD
        elif cp > 0xFFFF:
            cp -= 0x10000
            out.append(f"\\u{0xD800 + (cp >> 10):04X}\\u{0xDC00 + (cp & 0x3FF):04X}")
        else:
            out.append(f"\\u{cp:04X}")
    out.append('"')
    return "".join(out)


def _dump(obj: object, level: int, out: list[str]) -> None:
    pad = "    " * (level + 1)
    if isinstance(obj, bool):
        out.append("true" if obj else "false")
    elif obj is None:
        out.append("null")
    elif isinstance(obj, int):
        out.append(str(obj))
    elif isinstance(obj, str):
        out.append(quote(obj))
    elif isinstance(obj, dict):
        out.append("{")
        for n, key in enumerate(qdict_order(obj)):
            out.append(",\n" if n else "\n")
            out.append(f"{pad}{quote(key)}: ")
            _dump(obj[key], level + 1, out)
        out.append("\n" + "    " * level + "}")
    elif isinstance(obj, (list, tuple)):
        out.append("[")
        for n, item in enumerate(obj):
            out.append(",\n" if n else "\n")
            out.append(pad)
            _dump(item, level + 1, out)
        out.append("\n" + "    " * level + "]")
    else:
        raise TypeError(f"cannot encode {type(obj).__name__} as QEMU JSON")


def dumps_pretty(obj: object) -> str:
    """``obj`` (dicts in QAPI insertion order, lists, str, int, bool, None) as QEMU's pretty
    JSON, without a final newline (qemu-img adds one when printing)."""
    out: list[str] = []
    _dump(obj, 0, out)
    return "".join(out)
