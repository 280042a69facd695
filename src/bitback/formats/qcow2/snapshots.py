"""The qcow2 internal snapshot table: pure codec, no I/O.

Each entry (qcow2.txt, "Snapshot table entry") is a fixed 40-byte part, extra data, the ID
string and the name, padded to 8 bytes::

    u64 l1_table_offset  u32 l1_size  u16 id_str_size  u16 name_size
    u32 date_sec  u32 date_nsec  u64 vm_clock_nsec  u32 vm_state_size  u32 extra_data_size
    extra: [u64 vm_state_size_large] [u64 disk_size] [u64 icount]   (each only if present)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from bitback.errors import ImageFormatError

__all__ = ["NO_ICOUNT", "SnapshotEntry", "decode_snapshot_table"]

_FIXED = struct.Struct(">QIHHIIQII")
NO_ICOUNT = (1 << 64) - 1  # "icount not recorded", as QEMU stores it
_MAX_EXTRA = 1024  # QEMU's QCOW_MAX_SNAPSHOT_EXTRA_DATA


@dataclass(frozen=True, slots=True)
class SnapshotEntry:
    """One internal snapshot, under the spec's field names."""

    l1_table_offset: int
    l1_size: int
    id_str: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int | None
    icount: int


def decode_snapshot_table(buf: bytes, count: int) -> list[SnapshotEntry]:
    """Decode ``count`` entries from the start of ``buf``; raises :class:`ImageFormatError`
    when an entry runs past ``buf`` or carries absurd extra data."""
    out: list[SnapshotEntry] = []
    pos = 0
    for i in range(count):
        if pos + _FIXED.size > len(buf):
            raise ImageFormatError(f"Snapshot table entry {i} is truncated")
        (l1_offset, l1_size, id_size, name_size, date_sec, date_nsec, clock, vm_state,
         extra_size) = _FIXED.unpack_from(buf, pos)
        if extra_size > _MAX_EXTRA:
            raise ImageFormatError(f"Too much extra metadata in snapshot table entry {i}")
        extra_start = pos + _FIXED.size
        strings = extra_start + extra_size
        end = strings + id_size + name_size
        if end > len(buf):
            raise ImageFormatError(f"Snapshot table entry {i} is truncated")
        extra = buf[extra_start:strings]
        if len(extra) >= 8:
            vm_state = int.from_bytes(extra[0:8], "big")
        disk_size = int.from_bytes(extra[8:16], "big") if len(extra) >= 16 else None
        icount = int.from_bytes(extra[16:24], "big") if len(extra) >= 24 else NO_ICOUNT
        out.append(
            SnapshotEntry(
                l1_table_offset=l1_offset,
                l1_size=l1_size,
                id_str=buf[strings : strings + id_size].decode("utf-8", "replace"),
                name=buf[strings + id_size : end].decode("utf-8", "replace"),
                date_sec=date_sec,
                date_nsec=date_nsec,
                vm_clock_nsec=clock,
                vm_state_size=vm_state,
                disk_size=disk_size,
                icount=icount,
            )
        )
        pos = -(-end // 8) * 8
    return out
