"""``bitback-img map``: the image's extents, as ``qemu-img map`` 7.2 prints them.

JSON prints every run (merged while depth, present, zero, data, file and contiguous offset
agree); ``offset`` appears when the deciding layer stores the range uncompressed. The human
form prints only data with an offset, and treats zero and unallocated alike so that more
runs merge (QEMU rewrites the *next* entry's flags before comparing, reproduced here).
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace

from bitback.block.chain import MapEntry, iter_map_entries, mergeable, virtual_size
from bitback.errors import BitbackError
from bitback.tools.img.images import open_img
from bitback.tools.img.options import (
    HelpRequested,
    OptSpec,
    UsageError,
    cvtnum,
    getopt,
    output_format,
)

__all__ = ["format_entry_human", "format_entry_json", "img_map"]

SPEC = OptSpec(
    "f:hs:l:U",
    {
        "help": (False, "h"),
        "format": (True, "f"),
        "output": (True, "output"),
        "start-offset": (True, "s"),
        "max-length": (True, "l"),
        "force-share": (False, "U"),
    },
)


def _c_hex(value: int) -> str:
    """C's ``%#x``: ``0`` for zero, ``0x...`` otherwise."""
    return "0" if value == 0 else f"{value:#x}"


def format_entry_json(e: MapEntry) -> str:
    """One JSON entry, without separator."""
    text = (
        f'{{ "start": {e.start}, "length": {e.length}, "depth": {e.depth}, '
        f'"present": {str(e.present).lower()}, "zero": {str(e.zero).lower()}, '
        f'"data": {str(e.data).lower()}'
    )
    if e.offset is not None:
        text += f', "offset": {e.offset}'
    return text + "}"


def format_entry_human(e: MapEntry) -> str | None:
    """One human line, or None when the entry is not printed (not data, or zero)."""
    if not e.data or e.zero:
        return None
    return (
        f"{_c_hex(e.start):<16}{_c_hex(e.length):<16}{_c_hex(e.offset or 0):<16}{e.filename or ''}"
    )


class _CompressedInHuman(BitbackError):
    pass


def img_map(argv: list[str]) -> int:
    """``map [-f fmt] [--output=human|json] [--start-offset=N] [--max-length=N] FILE``."""
    opts, operands = getopt(argv, SPEC)
    fmt: str | None = None
    output = "human"
    start, max_length = 0, -1
    for key, value in opts:
        if key == "h":
            raise HelpRequested
        if key == "f":
            fmt = value
        elif key == "output":
            output = output_format(value or "")
        elif key == "s":
            start = cvtnum("start offset", value or "")
        elif key == "l":
            max_length = cvtnum("max length", value or "")
    if len(operands) != 1:
        raise UsageError("Expecting one image file name")
    with open_img(operands[0], fmt) as node:
        out = sys.stdout
        if output == "human":
            out.write(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File\n")
        else:
            out.write("[")
        length = virtual_size(node)
        if max_length != -1:
            length = min(start + max_length, length)
        cur = MapEntry(start=start, length=0, depth=0, present=False, zero=False, data=False)
        try:
            for nxt in iter_map_entries(node, start, length):
                if mergeable(cur, nxt):
                    cur = replace(cur, length=cur.length + nxt.length)
                    continue
                if cur.length > 0:
                    nxt = _dump(output, cur, nxt)
                cur = nxt
            _dump(output, cur, None)
        except _CompressedInHuman as exc:
            out.flush()
            raise BitbackError(str(exc)) from None
        except BitbackError as exc:
            out.flush()
            raise BitbackError(f"Could not read file metadata: {os.strerror(exc.errno)}") from exc
        if output == "json":
            out.write("]\n")
    return 0


def _dump(output: str, e: MapEntry, nxt: MapEntry | None) -> MapEntry:
    """Print ``e``; returns ``nxt`` as the human form rewrites it for merging."""
    out = sys.stdout
    if output == "json":
        out.write(format_entry_json(e))
        if nxt is not None:
            out.write(",\n")
        return nxt if nxt is not None else e
    if e.data and e.offset is None:
        raise _CompressedInHuman("File contains external, encrypted or compressed clusters.")
    line = format_entry_human(e)
    if line is not None:
        out.write(line + "\n")
    if nxt is not None and (not nxt.data or nxt.zero):
        nxt = replace(nxt, data=False, zero=True)
    return nxt if nxt is not None else e
