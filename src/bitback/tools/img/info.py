"""``bitback-img info``: what ``qemu-img info`` prints, human or JSON, alone or per chain.

The image is opened without its backing file (a missing backing file is not an error here);
``--backing-chain`` then opens each backing file in turn, by its resolved name and stored
format. JSON keys are QEMU's (``ImageInfo``), in the order its QDict prints them; the human
form is ``bdrv_image_info_dump``'s, format-specific data included (for qcow2 images with
persistent bitmaps, their ``bitmaps`` list: flags, name, granularity). The image is opened as
QEMU opens it, bitmaps loaded, so a damaged bitmap fails ``info`` as it fails qemu-img's.
"""

from __future__ import annotations

import math
import time
from typing import Any

from bitback.block.info import image_info
from bitback.block.open import MAX_CHAIN_DEPTH
from bitback.errors import BitbackError, ImageFormatError, InvalidArgumentError
from bitback.qjson import dumps_pretty, qdict_order
from bitback.tools.img.images import open_img
from bitback.tools.img.options import HelpRequested, OptSpec, UsageError, getopt, output_format

__all__ = ["dump_human", "image_info", "img_info", "size_to_str"]

SPEC = OptSpec(
    "f:hU",
    {
        "help": (False, "h"),
        "format": (True, "f"),
        "output": (True, "output"),
        "backing-chain": (False, "backing-chain"),
        "force-share": (False, "U"),
    },
)

_SUFFIXES = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")


def size_to_str(value: int) -> str:
    """QEMU's ``size_to_str``: three significant digits, and a unit chosen so the number
    stays below 1000 (1000 KiB prints as ``0.977 MiB``)."""
    _, exp = math.frexp(value / (1000.0 / 1024.0))
    i = int((exp - 1) / 10)  # C division: truncates toward zero
    return f"{value / (1 << (i * 10)):0.3g} {_SUFFIXES[i]}B"


def _snapshot_lines(snapshots: list[dict[str, Any]]) -> list[str]:
    """QEMU's ``bdrv_snapshot_dump`` table (dates in local time, as QEMU prints them)."""
    lines = ["Snapshot list:", f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}"
             f"{'VM CLOCK':>13}{'ICOUNT':>11}"]
    for sn in snapshots:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sn["date-sec"]))
        secs, msecs = sn["vm-clock-sec"], sn["vm-clock-nsec"] // 1_000_000
        clock = f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}.{msecs:03d}"
        icount = str(sn["icount"]) if "icount" in sn else ""
        lines.append(
            f"{sn['id']:<9} {sn['name']:<16} {size_to_str(sn['vm-state-size']):>8}"
            f"{date:>20}{clock:>13}{icount:>11}"
        )
    return lines


def collect(filename: str, fmt: str | None, chain: bool) -> list[dict[str, Any]]:
    """Info for the image and, with ``chain``, each backing file below it."""
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    current: str | None = filename
    while current is not None:
        if len(out) > MAX_CHAIN_DEPTH:
            raise ImageFormatError(
                f"Backing chain of '{filename}' is deeper than {MAX_CHAIN_DEPTH} images"
            )
        if current in seen:
            raise InvalidArgumentError(f"Backing file '{current}' creates an infinite loop.")
        seen.add(current)
        with open_img(current, fmt, backing=False) as node:
            info = image_info(node, current)
        out.append(info)
        current, fmt = None, None
        if chain:
            if "full-backing-filename" in info:
                current = info["full-backing-filename"]
            elif "backing-filename" in info:
                raise BitbackError(
                    "Could not determine absolute backing filename, but backing filename "
                    f"'{info['backing-filename']}' present"
                )
            fmt = info.get("backing-filename-format")
    return out


def _dump_value(value: object, indent: int, out: list[str]) -> None:
    """QEMU's ``dump_qobject``: scalars inline, dicts and lists one entry per line."""
    if isinstance(value, dict):
        for key in qdict_order(value):
            item = value[key]
            composite = isinstance(item, (dict, list))
            out.append(f"{' ' * indent * 4}{key.replace('-', ' ')}:{chr(10) if composite else ' '}")
            _dump_value(item, indent + 1, out)
            if not composite:
                out.append("\n")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            composite = isinstance(item, (dict, list))
            out.append(f"{' ' * indent * 4}[{i}]:{chr(10) if composite else ' '}")
            _dump_value(item, indent + 1, out)
            if not composite:
                out.append("\n")
    elif isinstance(value, bool):
        out.append("true" if value else "false")
    else:
        out.append(str(value))


def dump_human(info: dict[str, Any]) -> str:
    """``bdrv_image_info_dump``: the human text of one image."""
    vsize = info["virtual-size"]
    lines = [
        f"image: {info['filename']}",
        f"file format: {info['format']}",
        f"virtual size: {size_to_str(vsize)} ({vsize} bytes)",
        "disk size: "
        + (size_to_str(info["actual-size"]) if "actual-size" in info else "unavailable"),
    ]
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    if "backing-filename" in info:
        line = f"backing file: {info['backing-filename']}"
        full = info.get("full-backing-filename")
        if full is None:
            line += " (cannot determine actual path)"
        elif full != info["backing-filename"]:
            line += f" (actual path: {full})"
        lines.append(line)
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}")
    if "snapshots" in info:
        lines.extend(_snapshot_lines(info["snapshots"]))
    text = "\n".join(lines) + "\n"
    specific = info.get("format-specific")
    if specific is not None:
        out: list[str] = []
        _dump_value(specific["data"], 1, out)
        text += "Format specific information:\n" + "".join(out)
    return text


def img_info(argv: list[str]) -> int:
    """``info [-f fmt] [--output=human|json] [--backing-chain] [-U] FILE``."""
    opts, operands = getopt(argv, SPEC)
    fmt: str | None = None
    chain = False
    output = "human"
    for key, value in opts:
        if key == "h":
            raise HelpRequested
        if key == "f":
            fmt = value
        elif key == "output":
            assert value is not None
            output = output_format(value)
        elif key == "backing-chain":
            chain = True
    if len(operands) != 1:
        raise UsageError("Expecting one image file name")
    infos = collect(operands[0], fmt, chain)
    if output == "json":
        print(dumps_pretty(infos if chain else infos[0]))
    else:
        print("\n".join(dump_human(info) for info in infos), end="")
    return 0
