"""bitback.block.chain: opening chains, block status through them, map runs, reading.

The property test writes random patterns, zeroes and discards into a two-layer qcow2 chain
(the base shorter than the overlay) and checks the chain helpers against bytearray models.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitback.block.chain import (
    ChainOpenError,
    backing_chain,
    find_backing,
    is_allocated_above,
    iter_map,
    node_status,
    open_chain,
    read,
    status_above,
    virtual_size,
)
from bitback.block.drivers.qcow2.create import create_qcow2
from bitback.block.open import open_image

CS = 65536


def make_chain(tmp_path: Path, base_size: int = 1 << 20, top_size: int = 2 << 20) -> Path:
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    create_qcow2(str(base), base_size)
    create_qcow2(str(top), top_size, backing_file="base.qcow2", backing_fmt="qcow2")
    return top


def write(path: Path, offset: int, data: bytes) -> None:
    with open_image(str(path), read_only=False, backing=False) as node:
        node.pwrite(offset, data)


def test_open_chain_links_nodes_and_resolves_names(tmp_path: Path) -> None:
    top = make_chain(tmp_path)
    with open_chain(str(top)) as node:
        chain = backing_chain(node)
        assert [os.path.basename(n.filename) for n in chain] == ["top.qcow2", "base.qcow2"]
        assert (chain[1].read_only and not chain[0].read_only) or chain[0].read_only
        assert find_backing(node, "base.qcow2") is chain[1]
        assert find_backing(node, str(tmp_path / "base.qcow2")) is chain[1]
        assert find_backing(node, "top.qcow2") is None


def test_open_chain_nests_backing_errors_like_qemu(tmp_path: Path) -> None:
    create_qcow2(
        str(tmp_path / "l2.qcow2"), 1 << 20, backing_file="gone.qcow2", backing_fmt="qcow2"
    )
    create_qcow2(str(tmp_path / "l3.qcow2"), 1 << 20, backing_file="l2.qcow2", backing_fmt="qcow2")
    with pytest.raises(ChainOpenError) as err:
        open_chain(str(tmp_path / "l3.qcow2"))
    assert str(err.value) == (
        "Could not open backing file: Could not open backing file: "
        f"Could not open '{tmp_path / 'gone.qcow2'}': No such file or directory"
    )
    with open_chain(str(tmp_path / "l3.qcow2"), backing=False) as node:
        assert node.backing is None


def test_open_chain_refuses_loops(tmp_path: Path) -> None:
    create_qcow2(str(tmp_path / "a.qcow2"), 1 << 20, backing_file="b.qcow2", backing_fmt="qcow2")
    create_qcow2(str(tmp_path / "b.qcow2"), 1 << 20, backing_file="a.qcow2", backing_fmt="qcow2")
    with pytest.raises(ChainOpenError, match="creates an infinite loop"):
        open_chain(str(tmp_path / "a.qcow2"))


def test_raw_odd_size_rounds_to_sectors(tmp_path: Path) -> None:
    path = tmp_path / "odd.raw"
    path.write_bytes(b"\x01" * 1000)
    with open_chain(str(path)) as node:
        assert virtual_size(node) == 1024
        ext = node_status(node, 0, 1024)
        assert (ext.length, ext.allocated, ext.data, ext.host_offset) == (1000, True, True, 0)
        assert read(node, 0, 1024) == b"\x01" * 1000 + bytes(24)
        # qemu-img map: the data, then the rest of the last sector as a zero hole
        assert [(e.start, e.length, e.zero, e.offset) for e in iter_map(node)] == [
            (0, 1000, False, 0),
            (1000, 24, True, 1000),
        ]


def test_status_and_reads_past_a_short_backing_file(tmp_path: Path) -> None:
    top = make_chain(tmp_path)
    write(tmp_path / "base.qcow2", 0, b"\x07" * CS)
    with open_chain(str(top)) as node:
        inside = status_above(node, None, 0, 2 << 20)
        assert (inside.allocated, inside.data, inside.depth, inside.length) == (True, True, 1, CS)
        hole = status_above(node, None, CS, 2 << 20)
        # unallocated everywhere: the lowest layer's status, its own end-of-file included
        assert (hole.allocated, hole.zero, hole.length, hole.eof) == (
            False,
            True,
            (1 << 20) - CS,
            True,
        )
        past = status_above(node, None, 1 << 20, 1 << 20)
        assert (past.allocated, past.zero, past.eof) == (True, True, True)  # synthesized zeros
        above = status_above(node, node.backing, 0, 2 << 20)
        assert (above.allocated, above.zero, above.data) == (False, False, False)
        assert read(node, 0, 2 << 20) == b"\x07" * CS + bytes((2 << 20) - CS)
        assert is_allocated_above(node, node.backing, 0, 2 << 20) == (False, 2 << 20)
        assert is_allocated_above(node, None, 0, 2 << 20) == (True, CS)
        entries = [(e.start, e.length, e.depth, e.present, e.zero) for e in iter_map(node)]
        assert entries == [
            (0, CS, 1, True, False),
            (CS, (1 << 20) - CS, 1, False, True),
            (1 << 20, 1 << 20, 0, False, True),
        ]


OPS = st.lists(
    st.tuples(
        st.sampled_from(["base", "top"]),
        st.sampled_from(["write", "zero", "discard"]),
        st.integers(0, 31),  # offset in 64 KiB units... scaled below
        st.integers(1, 80),  # length in 4 KiB units
        st.integers(1, 255),
    ),
    max_size=12,
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(OPS)
def test_chain_reads_and_map_match_a_model(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, str, int, int, int]]
) -> None:
    tmp = tmp_path_factory.mktemp("chain")
    base_size, top_size = 1 << 20, 2 << 20
    top = make_chain(tmp, base_size, top_size)
    base_model = np.zeros(base_size, np.uint8)
    top_alloc = np.zeros(top_size, bool)  # where the top decides (whole clusters)
    top_data = np.zeros(top_size, np.uint8)
    touched: set[int] = set()  # clusters of the top that any operation touched

    def view() -> npt.NDArray[np.uint8]:
        out = np.zeros(top_size, np.uint8)
        out[:base_size] = base_model
        out[top_alloc] = top_data[top_alloc]
        return out

    for layer, op, off64k, len4k, pattern in ops:
        size = base_size if layer == "base" else top_size
        offset = off64k * CS // 2
        length = min(len4k * 4096, size - offset)
        if length <= 0:
            continue
        if layer == "top":
            touched.update(range(offset // CS, (offset + length - 1) // CS + 1))
        path = tmp / f"{layer}.qcow2"
        node = open_chain(str(path), read_only=False)
        try:
            if op == "write":
                node.pwrite(offset, bytes([pattern]) * length)
            elif op == "zero":
                node.pwrite_zeroes(offset, length)
            else:
                node.discard(offset, length)
        finally:
            node.close()
        model = base_model if layer == "base" else top_data
        if op == "discard":  # whole clusters only; they read as zeros afterwards
            a, b = -(-offset // CS) * CS, (offset + length) // CS * CS
            if offset + length == size:
                b = size
            if a < b:
                model[a:b] = 0
                if layer == "top":
                    top_alloc[a:b] = True
            continue
        if layer == "top":  # copy on write: the touched clusters take the current view
            lo = offset // CS * CS
            hi = min(size, -(-(offset + length) // CS) * CS)
            fresh = ~top_alloc[lo:hi]
            top_data[lo:hi][fresh] = view()[lo:hi][fresh]
            top_alloc[lo:hi] = True
        model[offset : offset + length] = pattern if op == "write" else 0
    expected = view().tobytes()
    with open_chain(str(top)) as node:
        assert read(node, 0, top_size) == expected
        assert read(node, 12345, 70000) == expected[12345 : 12345 + 70000]
        pos = 0
        for e in iter_map(node):
            assert e.start == pos and e.length > 0
            if e.zero:
                assert not any(expected[e.start : e.end])
            if e.depth == 0 and e.present:
                # the top decides only clusters that an operation on the top touched
                assert all(c in touched for c in range(e.start // CS, (e.end - 1) // CS + 1))
            pos = e.end
        assert pos == top_size
