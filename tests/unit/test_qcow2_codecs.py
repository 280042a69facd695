"""Pure codec tests: header and table encodings round-trip and match qemu-img's bytes."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bitback.block.drivers.qcow2.create import layout_qcow2
from bitback.errors import ImageFormatError, UnsupportedFeatureError
from bitback.formats.qcow2.entries import (
    COMPRESSED,
    COPIED,
    ZERO,
    ClusterKind,
    classify,
    compressed_extent,
    decode_refblock,
    decode_table,
    encode_refblock,
    encode_table,
)
from bitback.formats.qcow2.header import (
    EXT_BACKING_FORMAT,
    EXT_FEATURE_TABLE,
    decode_header,
    encode_header,
)


def test_fresh_header_round_trips() -> None:
    _, pieces, _ = layout_qcow2(64 << 20, backing_file="base.qcow2", backing_fmt="qcow2")
    raw = pieces[0][1]
    decoded = decode_header(raw + bytes(65536 - len(raw)))
    assert decoded.size == 64 << 20
    assert decoded.backing_file == "base.qcow2"
    assert decoded.backing_format == "qcow2"
    assert decoded.extension(EXT_FEATURE_TABLE) is not None
    assert encode_header(decoded) == raw


def test_feature_table_dropped_when_cluster_too_small() -> None:
    _, pieces, _ = layout_qcow2(
        1 << 20, cluster_size=512, backing_file="b" * 300, backing_fmt="qcow2"
    )
    decoded = decode_header(pieces[0][1] + bytes(512))
    assert decoded.extension(EXT_FEATURE_TABLE) is None
    assert decoded.extension(EXT_BACKING_FORMAT) is not None
    assert decoded.backing_file == "b" * 300


@pytest.mark.parametrize(
    ("offset", "value", "error"),
    [
        (0, b"QFI\x00", ImageFormatError),  # magic
        (4, (1).to_bytes(4, "big"), UnsupportedFeatureError),  # version 1
        (20, (8).to_bytes(4, "big"), ImageFormatError),  # cluster_bits below 9
        (20, (22).to_bytes(4, "big"), ImageFormatError),  # cluster_bits above 21
        (96, (7).to_bytes(4, "big"), ImageFormatError),  # refcount_order 7
        (100, (100).to_bytes(4, "big"), ImageFormatError),  # header_length not aligned
    ],
)
def test_bad_headers_are_refused(offset: int, value: bytes, error: type[Exception]) -> None:
    _, pieces, _ = layout_qcow2(1 << 20)
    raw = bytearray(pieces[0][1] + bytes(65536 - len(pieces[0][1])))
    raw[offset : offset + len(value)] = value
    with pytest.raises(error):
        decode_header(bytes(raw))


def test_extension_running_past_cluster_is_refused() -> None:
    _, pieces, _ = layout_qcow2(1 << 20, cluster_size=512)
    raw = bytearray(pieces[0][1] + bytes(512))[:512]
    raw[112:120] = (0x1234).to_bytes(4, "big") + (4000).to_bytes(4, "big")
    with pytest.raises(ImageFormatError, match="extension"):
        decode_header(bytes(raw))


@given(st.integers(0, 6), st.integers(0, 2**32 - 1))
def test_refblock_round_trip(order: int, seed: int) -> None:
    bits = 1 << order
    entries = 512 * 8 // bits
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 1 << bits, size=entries, dtype=np.uint64, endpoint=False)
    raw = encode_refblock(array, order)
    assert len(raw) == 512
    assert np.array_equal(decode_refblock(raw, order), array)


def test_refblock_sub_byte_order_is_lsb_first() -> None:
    # refcount_bits=1: cluster 0 is bit 0 of byte 0 (qcow2.txt "refcount block entries").
    assert decode_refblock(b"\x01" + bytes(7), 0)[:8].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]
    assert decode_refblock(b"\x80" + bytes(7), 0)[:8].tolist() == [0, 0, 0, 0, 0, 0, 0, 1]


def test_classify_l2_entries() -> None:
    entries = np.array(
        [0, ZERO, 0x10000 | ZERO, 0x10000 | COPIED, COMPRESSED | 0x1234, 0x20000],
        dtype=np.uint64,
    )
    assert classify(entries).tolist() == [
        ClusterKind.UNALLOCATED,
        ClusterKind.ZERO_PLAIN,
        ClusterKind.ZERO_ALLOC,
        ClusterKind.NORMAL,
        ClusterKind.COMPRESSED,
        ClusterKind.NORMAL,
    ]
    # Version 2 has no zero flag: bit 0 means nothing.
    assert classify(entries[:2], zero_flag=False).tolist() == [0, 0]


def test_compressed_descriptor() -> None:
    # 64 KiB clusters: x = 62 - 8 = 54 offset bits; 2 additional sectors.
    entry = COMPRESSED | (2 << 54) | 0x50100
    offset, length = compressed_extent(entry, 16)
    assert offset == 0x50100
    assert length == 3 * 512 - 0x100


def test_table_round_trip() -> None:
    table = np.array([0, COPIED | 0x30000, 1 << 62], dtype=np.uint64)
    assert np.array_equal(decode_table(encode_table(table)), table)
    assert encode_table(table)[8:16] == (COPIED | 0x30000).to_bytes(8, "big")


def test_snapshot_table_entries() -> None:
    from bitback.formats.qcow2.snapshots import NO_ICOUNT, decode_snapshot_table

    def entry(id_str: bytes, name: bytes, extra: bytes) -> bytes:
        fixed = struct.pack(
            ">QIHHIIQII", 0x50000, 8, len(id_str), len(name), 1700000000, 5, 3_500_000_000,
            0, len(extra),
        )
        raw = fixed + extra + id_str + name
        return raw + bytes(-len(raw) % 8)

    extra = (7).to_bytes(8, "big") + (1 << 20).to_bytes(8, "big") + (42).to_bytes(8, "big")
    table = entry(b"1", b"first", extra) + entry(b"2", b"old", b"")
    first, second = decode_snapshot_table(table, 2)
    assert (first.id_str, first.name, first.vm_state_size, first.disk_size, first.icount) == (
        "1", "first", 7, 1 << 20, 42
    )
    assert (second.name, second.disk_size, second.icount) == ("old", None, NO_ICOUNT)
    assert second.vm_clock_nsec == 3_500_000_000
    with pytest.raises(ImageFormatError, match="truncated"):
        decode_snapshot_table(table[:50], 1)
