"""QEMU's ``ImageInfo`` for an opened node: what ``qemu-img info --output=json`` prints and
what QMP's ``query-block`` and ``query-named-block-nodes`` carry under ``image``.

Keys are inserted in QAPI member order; encoders that mimic QEMU's QDict order re-sort them.
"""

from __future__ import annotations

from typing import Any

from bitback.block.chain import backing_of, virtual_size
from bitback.block.driver import BlockDriver
from bitback.block.open import resolve_backing
from bitback.errors import ImageFormatError
from bitback.formats.qcow2.snapshots import NO_ICOUNT, decode_snapshot_table
from bitback.qjson import qdict_order

__all__ = ["image_info"]


def _format_specific(node: BlockDriver) -> dict[str, object] | None:
    """``format-specific`` ({type, data}) for formats that have it (qcow2)."""
    if node.format_name != "qcow2":
        return None
    data = node.format_specific_info()
    return {"type": node.format_name, "data": data}


def image_info(node: BlockDriver, filename: str) -> dict[str, Any]:
    """QEMU's ``ImageInfo`` of one opened node, keys inserted in QAPI order."""
    info: dict[str, Any] = {"filename": filename, "format": node.format_name}
    header = getattr(node, "header", None)
    if header is not None:
        info["dirty-flag"] = bool(header.incompatible_features & 1)
    else:
        info["dirty-flag"] = False
    actual = node.allocated_file_size()
    if actual is not None:
        info["actual-size"] = actual
    info["virtual-size"] = virtual_size(node)
    if node.cluster_size is not None:
        info["cluster-size"] = node.cluster_size
    name, fmt = backing_of(node)
    if name:
        info["backing-filename"] = name
        info["full-backing-filename"] = resolve_backing(filename, name)
        if fmt is not None:
            info["backing-filename-format"] = fmt
    snapshots = _snapshots(node)
    if snapshots:
        info["snapshots"] = snapshots
    specific = _format_specific(node)
    if specific is not None:
        info["format-specific"] = specific
    return info


def _snapshots(node: BlockDriver) -> list[dict[str, Any]]:
    """qemu-img's SnapshotInfo list for a qcow2 node (empty for other formats)."""
    header = getattr(node, "header", None)
    file = getattr(node, "file", None)
    if header is None or file is None or not header.nb_snapshots:
        return []
    # Bounded: at most 65536 entries of at most 40 + 1024 + 2 * 65535 bytes each would be
    # absurd; QEMU caps the table at 64 MiB.
    size = min(file.length() - header.snapshots_offset, 64 << 20)
    if size <= 0:
        raise ImageFormatError("Snapshot table is past the end of the file")
    entries = decode_snapshot_table(file.pread(header.snapshots_offset, size),
                                    header.nb_snapshots)
    out = []
    for e in entries:
        item: dict[str, Any] = {
            "id": e.id_str,
            "name": e.name,
            "vm-state-size": e.vm_state_size,
            "date-sec": e.date_sec,
            "date-nsec": e.date_nsec,
            "vm-clock-sec": e.vm_clock_nsec // 1_000_000_000,
            "vm-clock-nsec": e.vm_clock_nsec % 1_000_000_000,
        }
        if e.icount != NO_ICOUNT:
            item["icount"] = e.icount
        out.append({k: item[k] for k in qdict_order(item)})
    return out
