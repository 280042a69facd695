"""Byte-level reading and damaging of qcow2 files for the checker's tests.

:class:`Raw` reads header fields, L1/L2 entries and refcounts (every width, 1 to 64 bits) with
``struct`` from the layout of ``docs/interop/qcow2.txt``, never through bitback's codecs, and
can hand-allocate clusters the way QEMU does (appended at the end of the file, refcount 1,
COPIED set) or damage any of them. Only the first refcount block is handled: enough for the
small images tests use (it covers 32768 clusters at 64 KiB clusters and 16-bit refcounts).
"""

from __future__ import annotations

import os
import struct

__all__ = ["COMPRESSED", "COPIED", "OFFSET_MASK", "ZERO", "Raw"]

COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO = 1
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00


class Raw:
    """Byte-level access to a qcow2 file: header fields, L1/L2 entries, refcounts (any width).

    Use as a context manager (or call :meth:`close`).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR)
        head = os.pread(self.fd, 104, 0)
        self.cluster_bits = int(struct.unpack_from(">I", head, 20)[0])
        self.cs = 1 << self.cluster_bits
        self.l1_offset = int(struct.unpack_from(">Q", head, 40)[0])
        self.reftable = int(struct.unpack_from(">Q", head, 48)[0])
        version = struct.unpack_from(">I", head, 4)[0]
        self.order = int(struct.unpack_from(">I", head, 96)[0]) if version == 3 else 4

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def header_u32(self, offset: int) -> int:
        return int(struct.unpack(">I", os.pread(self.fd, 4, offset))[0])

    def put32(self, offset: int, value: int) -> None:
        os.pwrite(self.fd, struct.pack(">I", value), offset)

    def u64(self, offset: int) -> int:
        return int(struct.unpack(">Q", os.pread(self.fd, 8, offset))[0])

    def put64(self, offset: int, value: int) -> None:
        os.pwrite(self.fd, struct.pack(">Q", value), offset)

    @property
    def end_cluster(self) -> int:
        return -(-os.fstat(self.fd).st_size // self.cs)

    # refcounts ---------------------------------------------------------------------------

    def _refblock(self) -> int:
        return self.u64(self.reftable) & ~0x1FF

    def refcount(self, cluster: int) -> int:
        bits = 1 << self.order
        base = self._refblock()
        if bits >= 8:
            raw = os.pread(self.fd, bits // 8, base + cluster * bits // 8)
            return int.from_bytes(raw, "big")
        byte = os.pread(self.fd, 1, base + cluster * bits // 8)[0]
        return (byte >> (cluster * bits % 8)) & ((1 << bits) - 1)

    def set_refcount(self, cluster: int, value: int) -> None:
        bits = 1 << self.order
        base = self._refblock()
        if bits >= 8:
            os.pwrite(self.fd, value.to_bytes(bits // 8, "big"), base + cluster * bits // 8)
            return
        pos = base + cluster * bits // 8
        shift = cluster * bits % 8
        byte = os.pread(self.fd, 1, pos)[0]
        byte = (byte & ~(((1 << bits) - 1) << shift)) | (value << shift)
        os.pwrite(self.fd, bytes([byte]), pos)

    # allocation --------------------------------------------------------------------------

    def alloc(self, fill: int = 0xAB) -> int:
        """Append one cluster (filled with ``fill``) with refcount 1; its index."""
        cluster = self.end_cluster
        os.pwrite(self.fd, bytes([fill]) * self.cs, cluster * self.cs)
        self.set_refcount(cluster, 1)
        return cluster

    def l2_offset(self, l1_index: int = 0) -> int:
        """The L2 table an L1 entry points at (0: none)."""
        return self.u64(self.l1_offset + 8 * l1_index) & OFFSET_MASK

    def entry_offset(self, guest_cluster: int) -> int:
        """File offset of the L2 entry mapping ``guest_cluster`` (allocating its L2 table)."""
        per = self.cs // 8
        l1_index, l2_index = divmod(guest_cluster, per)
        if not self.l2_offset(l1_index):
            table = self.alloc(fill=0)
            self.put64(self.l1_offset + 8 * l1_index, (table * self.cs) | COPIED)
        return self.l2_offset(l1_index) + 8 * l2_index

    def map_data(self, guest_cluster: int) -> int:
        """Map a guest cluster to a new host cluster, as a guest write would; the host index."""
        entry = self.entry_offset(guest_cluster)
        host = self.alloc()
        self.put64(entry, (host * self.cs) | COPIED)
        return host

    def compressed_entry(self, offset: int, sectors: int) -> int:
        shift = 62 - (self.cluster_bits - 8)
        return COMPRESSED | ((sectors - 1) << shift) | offset

    def data_entries(self, l1_index: int = 0) -> list[tuple[int, int]]:
        """(file offset, value) of the non-zero entries of an L2 table."""
        base = self.l2_offset(l1_index)
        raw = os.pread(self.fd, self.cs, base)
        values = struct.unpack(f">{self.cs // 8}Q", raw)
        return [(base + 8 * j, v) for j, v in enumerate(values) if v]

    def first_data_entries(self) -> list[tuple[int, int]]:
        """The entries of the first L2 table in use."""
        for i in range(self.header_u32(36)):
            if self.l2_offset(i):
                return self.data_entries(i)
        return []
