"""Output formatting of qemu-io 7.2: sizes, times, I/O reports, hex dumps, info dumps.

Everything here returns strings; nothing prints. The shapes are qemu-io's own, down to its
quirks, because scripts (and QEMU's iotests) parse them:

* sizes (:func:`cvtstr`): ``"512 bytes"``, ``"1.500 KiB"``, ``"64 MiB"``: ``%.3f`` of the largest
  binary unit not above the value, with a literal ``.000`` cut off; below 1 KiB ``%f`` bytes
  (so a rate of 0.85 bytes/sec prints ``0.846409 bytes``).
* times (:func:`timestr`): ``"00.00 sec"`` under a second, ``"0:00:10.12"`` from one second on.
* the two-line I/O report (:func:`io_report`)::

      wrote 512/512 bytes at offset 0
      512 bytes, 1 ops; 00.00 sec (498.960 KiB/sec and 997.9193 ops/sec)

  or with ``-C`` one machine-readable line ``512,1,0:00:00.00,3176750.160,6204.590``.
* the ``-v`` hex dump (:func:`dump_buffer`), 16 bytes a line, printable means C ``isalnum``::

      00000000:  41 42 41 42 41  ABABA

* the "Format specific information" block of ``info`` (:func:`dump_specific_info`), whose
  key order is that of QEMU's QDict hash table, not insertion order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

from bitback.qjson import qdict_order

__all__ = [
    "cvtstr",
    "dump_buffer",
    "dump_specific_info",
    "io_report",
    "qdict_order",
    "timestr",
]

_UNITS = ((60, " EiB"), (50, " PiB"), (40, " TiB"), (30, " GiB"), (20, " MiB"), (10, " KiB"))


def _c_float(value: float, spec: str) -> str:
    """printf of a double as glibc does it, including its ``-nan`` for 0.0/0.0 on x86."""
    if math.isnan(value):
        return "-nan"
    return format(value, spec)


def cvtstr(value: float) -> str:
    """qemu-io's ``cvtstr``: a byte count or rate with a binary unit."""
    unit = next(((shift, name) for shift, name in _UNITS if value >= float(1 << shift)), None)
    if unit is None:
        text, suffix = _c_float(value, "f"), " bytes"
    else:
        text, suffix = _c_float(value / float(1 << unit[0]), ".3f"), unit[1]
    # QEMU cuts the string at the first ".000", wherever it is ("0.000123" -> "0 bytes").
    cut = text.find(".000")
    return (text[:cut] if cut >= 0 else text) + suffix


def timestr(elapsed_ns: int, *, verbose: bool = False) -> str:
    """qemu-io's ``timestr``: ``SS.ss sec`` below a second, else ``H:MM:SS.ss``."""
    sec, nsec = divmod(max(elapsed_ns, 0), 1_000_000_000)
    frac = nsec / 1e9
    if verbose or sec:
        hours, minutes, seconds = sec // 3600, (sec % 3600) // 60, sec % 60
        return f"{hours}:{minutes:02d}:{seconds + frac:05.2f}"
    return f"{frac:05.2f} sec"


def _per_second(value: float, elapsed_ns: int) -> float:
    """``value`` per second, with C's IEEE results for a zero interval (inf, or NaN for 0/0)."""
    seconds = elapsed_ns // 1_000_000_000 + (elapsed_ns % 1_000_000_000) / 1e9
    if seconds == 0:
        return math.inf if value > 0 else math.nan
    return value / seconds


def io_report(
    op: str,
    elapsed_ns: int,
    offset: int,
    count: int,
    total: int,
    ops: int = 1,
    *,
    machine: bool = False,
) -> list[str]:
    """The report lines qemu-io prints after a successful request (``print_report``).

    ``op`` is ``read``, ``wrote`` or ``discard``; ``count`` the bytes asked for, ``total`` the
    bytes transferred (the same, for every request that succeeds); ``machine`` is ``-C``.
    """
    ts = timestr(elapsed_ns, verbose=machine)
    byte_rate = _per_second(float(total), elapsed_ns)
    op_rate = _per_second(float(ops), elapsed_ns)
    if machine:
        return [f"{total},{ops},{ts},{_c_float(byte_rate, '.3f')},{_c_float(op_rate, '.3f')}"]
    return [
        f"{op} {total}/{count} bytes at offset {offset}",
        f"{cvtstr(float(total))}, {ops} ops; {ts} "
        f"({cvtstr(byte_rate)}/sec and {_c_float(op_rate, '.4f')} ops/sec)",
    ]


# C isalnum in the "C" locale: ASCII letters and digits print as themselves, the rest as '.'.
_PRINTABLE = bytes(
    c if (48 <= c <= 57 or 65 <= c <= 90 or 97 <= c <= 122) else ord(".") for c in range(256)
)


def dump_buffer(data: bytes | bytearray | memoryview, offset: int) -> Iterator[str]:
    """qemu-io's ``dump_buffer``: lines of 16 bytes, the address being ``offset`` + position.

    Each byte prints as ``%02x `` (a trailing space), then one more space and the characters;
    a short last line is not padded.
    """
    view = memoryview(data).cast("B")
    for i in range(0, len(view), 16):
        line = bytes(view[i : i + 16])
        hexpart = line.hex(" ")
        yield f"{offset + i:08x}:  {hexpart}  {line.translate(_PRINTABLE).decode('ascii')}"


def _scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _dump_value(value: object, indent: int) -> Iterator[str]:
    if isinstance(value, Mapping):
        yield from _dump_dict(value, indent)
    elif isinstance(value, list | tuple):
        yield from _dump_list(value, indent)


def _is_composite(value: object) -> bool:
    return isinstance(value, Mapping | list | tuple)


def _dump_dict(data: Mapping[str, object], indent: int) -> Iterator[str]:
    pad = " " * (indent * 4)
    for key in qdict_order(list(data)):
        value = data[key]
        name = key.replace("-", " ")  # QEMU shows key names with spaces for dashes
        if _is_composite(value):
            yield f"{pad}{name}:"
            yield from _dump_value(value, indent + 1)
        else:
            yield f"{pad}{name}: {_scalar(value)}"


def _dump_list(items: Sequence[object], indent: int) -> Iterator[str]:
    pad = " " * (indent * 4)
    for i, value in enumerate(items):
        if _is_composite(value):
            yield f"{pad}[{i}]:"
            yield from _dump_value(value, indent + 1)
        else:
            yield f"{pad}[{i}]: {_scalar(value)}"


def dump_specific_info(data: Mapping[str, object]) -> list[str]:
    """The lines QEMU prints under "Format specific information:" (``dump_qdict`` at level 1).

    ``data`` is a driver's :meth:`~bitback.block.driver.BlockDriver.format_specific_info`,
    keyed with QAPI names (``lazy-refcounts``), in QAPI field order (it decides the order
    within a hash bucket).
    """
    return list(_dump_dict(data, 1))
