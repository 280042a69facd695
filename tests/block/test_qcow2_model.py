"""The qcow2 driver against a bytearray model, in memory (hypothesis).

Random programs of writes, zero writes (with and without unmap), discards, cluster-aligned
resizes, flushes and reopen-from-disk run on a qcow2 image held by a MemoryDriver; every read
must equal the model. At the end real ``qemu-img check`` must find the image clean and real
``qemu-img convert`` must read the same bytes: the image is not only self-consistent but what
QEMU means by it.
"""

from __future__ import annotations

import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitback.block.driver import BlockDriver
from bitback.block.drivers.memory import MemoryDriver
from bitback.block.drivers.qcow2.create import layout_qcow2
from bitback.block.drivers.qcow2.driver import Qcow2Driver
from bitback.block.drivers.raw import RawDriver

CLUSTER_SIZES = [512, 4096, 65536]


def memory_image(
    size: int, cluster_size: int, *, backing: bool, refcount_bits: int
) -> MemoryDriver:
    _, pieces, length = layout_qcow2(
        size,
        cluster_size=cluster_size,
        refcount_bits=refcount_bits,
        backing_file="base.raw" if backing else None,
        backing_fmt="raw" if backing else None,
    )
    mem = MemoryDriver(name="image.qcow2")
    mem.truncate(length)
    for offset, data in pieces:
        mem.pwrite(offset, data)
    return mem


def open_node(mem: MemoryDriver, backing: BlockDriver | None) -> Qcow2Driver:
    node = Qcow2Driver(mem, read_only=False)
    node.backing = backing
    return node


@dataclass
class Op:
    kind: str
    offset: int = 0
    length: int = 0
    value: int = 0


def ops(size: int, cluster: int) -> st.SearchStrategy[list[Op]]:
    span = st.tuples(st.integers(0, size - 1), st.integers(1, 3 * cluster))
    write = st.builds(lambda s, v: Op("write", s[0], s[1], v), span, st.integers(0, 255))
    zero = st.builds(lambda s, u: Op("zero", s[0], s[1], int(u)), span, st.booleans())
    discard = st.builds(lambda s: Op("discard", s[0], s[1]), span)
    resize = st.builds(lambda n: Op("resize", n * cluster), st.integers(1, 2 * size // cluster))
    other = st.sampled_from([Op("flush"), Op("reopen")])
    return st.lists(st.one_of(write, write, zero, discard, resize, other), max_size=25)


@st.composite
def programs(draw: st.DrawFn) -> tuple[int, int, bool, int, list[Op]]:
    cluster = draw(st.sampled_from(CLUSTER_SIZES))
    size = cluster * draw(st.integers(1, 40))
    backing = draw(st.booleans())
    refcount_bits = draw(st.sampled_from([1, 16, 64]))
    return cluster, size, backing, refcount_bits, draw(ops(size, cluster))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs())
def test_qcow2_matches_model(
    qemu_img: str, program: tuple[int, int, bool, int, list[Op]]
) -> None:
    cluster, size, with_backing, refcount_bits, program_ops = program
    base_bytes = bytes((i * 7 + 3) & 0xFF for i in range(size // 2))
    backing = None
    model = bytearray(size)
    if with_backing:
        backing = RawDriver(MemoryDriver(base_bytes, name="base.raw"), read_only=True)
        model[: len(base_bytes)] = base_bytes
    mem = memory_image(size, cluster, backing=with_backing, refcount_bits=refcount_bits)
    node = open_node(mem, backing)
    for op in program_ops:
        size = len(model)
        if op.kind in ("write", "zero", "discard"):
            offset = op.offset % size
            length = min(op.length, size - offset)
            if op.kind == "write":
                node.pwrite(offset, bytes([op.value]) * length)
                model[offset : offset + length] = bytes([op.value]) * length
            elif op.kind == "zero":
                node.pwrite_zeroes(offset, length, may_unmap=bool(op.value))
                model[offset : offset + length] = bytes(length)
            else:
                node.discard(offset, length)
                # v3: whole clusters inside the range read as zero; partial ones untouched.
                lo = -(-offset // cluster) * cluster
                hi = (offset + length) // cluster * cluster
                if offset + length == size:
                    hi = size
                if lo < hi:
                    model[lo:hi] = bytes(hi - lo)
        elif op.kind == "resize":
            new = op.offset
            node.truncate(new, shrink=True)
            if new < size:
                del model[new:]
            else:
                # Growing over a backing file that covers the new area zeroes it explicitly.
                model.extend(bytes(new - size))
        elif op.kind == "flush":
            node.flush()
        else:
            node.close()
            mem.closed = False  # the memory "file" outlives the node, like a real file
            node = open_node(mem, backing)
        assert node.length() == len(model)
        assert node.pread(0, len(model)) == bytes(model), op
    node.close()

    # Real QEMU's view of the same bytes.
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "image.qcow2"
        image.write_bytes(bytes(mem.data))
        if with_backing:
            (Path(tmp) / "base.raw").write_bytes(base_bytes)
        check = subprocess.run([qemu_img, "check", str(image)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        raw = Path(tmp) / "out.raw"
        subprocess.run([qemu_img, "convert", "-O", "raw", str(image), str(raw)], check=True)
        assert raw.read_bytes() == bytes(model)
