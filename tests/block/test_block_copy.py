"""Block-copy and copy-before-write, in process, over real qcow2 files (spec 6).

Images are made with :func:`create_qcow2` in ``tmp_path`` and opened through
:meth:`BlockGraph.add_blockdev` with QMP-shaped options; faults come from blkdebug rules under
the source or the target. Results are checked by reading the nodes back and, where the layout
matters, against real ``qemu-img map / check / compare``.

The geometry the seed numbers come from (spec 6.2), its first batch of guest writes::

    writes       [0, 512)     [16M, 16M+256k)       [32M-32k, 32M+32k)
    64k granules {0}          {256, 257, 258, 259}  {511, 512}            7 granules
    128k job     {0}          {128, 129}            {255, 256}            5 clusters = 655360
    32k granules {0}          {512 .. 519}          {1023, 1024}          11 granules
    64k job      {0}          {256 .. 259}          {511, 512}            7 clusters = 458752
"""

from __future__ import annotations

import errno
import json
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitback.bitmaps import GranuleBits
from bitback.block.driver import BlockDriver
from bitback.block.drivers.null import NullDriver
from bitback.block.drivers.qcow2.create import create_qcow2
from bitback.block.graph import BlockGraph
from bitback.block.node import BlockNode
from bitback.copy import (
    BlockCopyState,
    ClusterSizeError,
    CopyBeforeWrite,
    CopyError,
    job_cluster_size,
)
from bitback.errors import IOFailedError
from helpers.procs import run

K = 1 << 10
M = 1 << 20
SEED_WRITES = ((0, 512), (16 * M, 256 * K), (32736 * K, 64 * K))
Rule = dict[str, Any]


# --------------------------------------------------------------------------- helpers
def make(path: Path, size: int, *, cluster_size: int = 64 * K, backing: Path | None = None) -> Path:
    name, fmt = (None, None) if backing is None else (str(backing), "qcow2")
    create_qcow2(str(path), size, cluster_size=cluster_size, backing_file=name, backing_fmt=fmt)
    return path


def prepared(
    path: Path, size: int, writes: list[tuple[int, bytes | int]], backing: Path | None = None
) -> Path:
    """A new image holding ``writes`` (``(offset, data)``, or ``(offset, n)``: write-zeroes),
    written through a graph of its own and closed, so tests reopen it as they need."""
    g = BlockGraph()
    node = g.add_blockdev(qcow2_opts(make(path, size, backing=backing), "setup"))
    for offset, data in writes:
        if isinstance(data, int):
            node.pwrite_zeroes(offset, data)
        else:
            node.pwrite(offset, data)
    assert g.close_all() == []
    return path


def qcow2_opts(path: Path, name: str, *, inject: list[Rule] | None = None) -> dict[str, Any]:
    file: dict[str, Any] = {"driver": "file", "filename": str(path)}
    if inject is not None:
        file = {"driver": "blkdebug", "image": file, "inject-error": inject}
    return {"node-name": name, "driver": "qcow2", "file": file}


@pytest.fixture
def graph() -> Iterator[BlockGraph]:
    g = BlockGraph()
    yield g
    g.close_all()


def null_node(graph: BlockGraph, size: int, name: str = "null") -> BlockNode:
    return graph.add_blockdev({"node-name": name, "driver": "null-co", "size": size})


def copy_all(bcs: BlockCopyState, chunk: int = 8 * M) -> int:
    done, pos = 0, 0
    while (area := bcs.next_chunk(pos, chunk)) is not None:
        done += bcs.copy(*area)
        pos = area[0] + area[1]
    return done


def qemu_map(qemu_img: str, path: Path) -> list[dict[str, Any]]:
    out = run([qemu_img, "map", "--output=json", path], check=True).stdout
    return [
        {k: e[k] for k in ("start", "length", "depth", "present", "zero", "data")}
        for e in json.loads(out)
    ]


def qemu_check(qemu_img: str, path: Path) -> dict[str, Any]:
    """``qemu-img check``; exit code 0 (required) means no corruption and no leak."""
    result: dict[str, Any] = json.loads(
        run([qemu_img, "check", "--output=json", path], check=True).stdout
    )
    return result


def seed_bits(granularity: int, size: int = 64 * M) -> GranuleBits:
    bits = GranuleBits(size, granularity)
    for offset, length in SEED_WRITES:
        bits.set_range(offset, length)
    return bits


# --------------------------------------------------------------------------- cluster size
@pytest.mark.parametrize(
    ("target_cluster", "expected"),
    [(4 * K, 64 * K), (64 * K, 64 * K), (128 * K, 128 * K), (2 * M, 2 * M)],
)
def test_job_cluster_size_is_at_least_64k(
    graph: BlockGraph, tmp_path: Path, target_cluster: int, expected: int
) -> None:
    target = graph.add_blockdev(
        qcow2_opts(make(tmp_path / "t.qcow2", 8 * M, cluster_size=target_cluster), "t")
    )
    assert job_cluster_size(target) == expected


def test_job_cluster_size_looks_through_filters(graph: BlockGraph, tmp_path: Path) -> None:
    path = make(tmp_path / "t.qcow2", 8 * M, cluster_size=256 * K)
    node = graph.add_blockdev(
        {"node-name": "dbg", "driver": "blkdebug", "image": qcow2_opts(path, "t")}
    )
    assert job_cluster_size(node) == 256 * K


def test_unknown_cluster_size_without_backing_warns_and_uses_64k(
    graph: BlockGraph, tmp_path: Path
) -> None:
    """QEMU 7.2: a target without cluster information (``bdrv_get_info`` -> -ENOTSUP, as
    for raw) and without backing file gets 64 KiB and a warning, not an error."""
    raw = tmp_path / "t.raw"
    raw.write_bytes(bytes(M))
    target = graph.add_blockdev(
        {"node-name": "t", "driver": "raw", "file": {"driver": "file", "filename": str(raw)}}
    )
    warnings: list[str] = []
    assert job_cluster_size(target, warn=warnings.append) == 64 * K
    assert warnings == [
        "The target block device doesn't provide information about the block size and it "
        "doesn't have a backing file. The default block size of 65536 bytes is used. If the "
        "actual block size of the target exceeds this default, the backup may be unusable"
    ]


class _Broken(NullDriver):
    """A target whose cluster size cannot be queried (``bdrv_get_info`` fails with EIO)."""

    def __init__(self, backing: BlockDriver | None) -> None:
        super().__init__(M)
        self.backing = backing

    @property
    def cluster_size(self) -> int | None:
        raise IOFailedError("Input/output error", errno=errno.EIO)


def test_cluster_size_query_failure(graph: BlockGraph) -> None:
    with pytest.raises(ClusterSizeError) as info:
        job_cluster_size(BlockNode(_Broken(None), "t"))
    assert str(info.value) == (
        "Couldn't determine the cluster size of the target image, which has no backing file: "
        "Input/output error"
    )
    assert info.value.hint == "Aborting, since this may create an unusable destination image"
    assert info.value.errno == errno.EIO
    # With a backing file QEMU trudges on with the default.
    assert job_cluster_size(BlockNode(_Broken(null_node(graph, M)), "t2")) == 64 * K


# --------------------------------------------------------------------------- the copy set
@pytest.mark.parametrize(
    ("granularity", "cluster", "expected"),
    [(64 * K, 128 * K, 655360), (32 * K, 64 * K, 458752), (128 * K, 64 * K, 655360),
     (64 * K, 64 * K, 458752)],
)  # fmt: skip
def test_set_from_rounds_outwards_seed_numbers(
    graph: BlockGraph, granularity: int, cluster: int, expected: int
) -> None:
    bcs = BlockCopyState(
        null_node(graph, 64 * M), null_node(graph, 64 * M, "t"), cluster_size=cluster
    )
    bcs.set_from(seed_bits(granularity))
    assert bcs.remaining() == expected
    if cluster == 128 * K:
        starts = [a for a, _ in bcs.copy_bitmap.dirty_extents()]
        assert starts == [0, 16 * M, 32 * M - 128 * K]  # runs: {0}, {16M, +128k}, {32M-128k, 32M}


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 3 * M),
    gran_bits=st.integers(9, 18),
    cluster_bits=st.integers(9, 18),
    ranges=st.lists(st.tuples(st.integers(0, 3 * M), st.integers(1, 300 * K)), max_size=8),
    bits_size_delta=st.sampled_from([0, 0, 0, -4096, 70000]),
)
def test_set_from_matches_a_granule_by_granule_model(
    size: int,
    gran_bits: int,
    cluster_bits: int,
    ranges: list[tuple[int, int]],
    bits_size_delta: int,
) -> None:
    g, cs = 1 << gran_bits, 1 << cluster_bits
    bits = GranuleBits(max(0, size + bits_size_delta), g)
    for offset, length in ranges:
        bits.set_range(offset, length)
    expected = GranuleBits(size, cs)
    for start, length in bits.dirty_extents():
        expected.set_range(start, length)  # every cluster touching a dirty byte
    src = BlockNode(NullDriver(size), "s")
    bcs = BlockCopyState(src, src, cluster_size=cs)
    bcs.set_from(bits)
    assert bcs.copy_bitmap == expected


@pytest.mark.parametrize("cluster", [64 * K, 128 * K])
def test_remaining_and_next_chunk_clip_at_an_unaligned_disk_end(
    graph: BlockGraph, cluster: int
) -> None:
    """Chunks stop at the end of the disk; byte counts are whole clusters (QEMU 7.2's len
    for a full backup of a 1 MiB + 512 disk is 17 x 64 KiB)."""
    size = M + 512  # 17 clusters of 64k or 9 of 128k, the last holding 512 bytes
    whole = -(-size // cluster) * cluster
    bcs = BlockCopyState(null_node(graph, size), null_node(graph, size, "t"), cluster_size=cluster)
    assert bcs.remaining() == 0
    assert bcs.next_chunk(0, 8 * M) is None
    bcs.set_all()
    assert bcs.remaining() == whole
    assert bcs.next_chunk(0, 8 * M) == (0, size)
    assert bcs.next_chunk(0, 3 * cluster + 1) == (0, 3 * cluster)
    assert bcs.next_chunk(0, 1) == (0, cluster)  # at least one cluster
    assert bcs.next_chunk(M + 100, 8 * M) == (M, 512)  # rounded down to its cluster
    bcs.copy_bitmap.reset_range(0, M)
    assert bcs.remaining() == cluster
    bcs.copy_bitmap.set_range(cluster, 1)
    assert bcs.remaining() == 2 * cluster
    bcs.copy_bitmap.reset_range(M, 512)
    assert bcs.remaining() == cluster


# --------------------------------------------------------------------------- copying
def fill_source(node: BlockNode) -> None:
    """Data, a zero cluster, all-zero data, unallocated space and a partial last cluster."""
    rnd = random.Random(7)
    node.pwrite(0, rnd.randbytes(200 * K))
    node.pwrite_zeroes(M, 64 * K)
    node.pwrite(M + 512 * K, bytes(128 * K))  # allocated, but reads as zero
    node.pwrite(2 * M + 100, rnd.randbytes(300 * K))
    node.pwrite(node.length() - 1000, b"\xee" * 1000)


def test_full_copy_makes_an_identical_image(
    graph: BlockGraph, tmp_path: Path, qemu_img: str
) -> None:
    size = 3 * M + 512
    src = graph.add_blockdev(qcow2_opts(make(tmp_path / "s.qcow2", size), "s"))
    tpath = make(tmp_path / "t.qcow2", size)
    tgt = graph.add_blockdev(qcow2_opts(tpath, "t"))
    fill_source(src)
    progress: list[int] = []
    bcs = BlockCopyState(src, tgt, cluster_size=64 * K, on_progress=progress.append)
    bcs.set_all()
    whole = size - 512 + 64 * K  # counted in whole clusters, as QEMU 7.2 does
    assert bcs.remaining() == whole
    assert copy_all(bcs, chunk=256 * K) == whole
    assert sum(progress) == whole and bcs.remaining() == 0
    assert tgt.pread(0, size) == src.pread(0, size)
    assert bcs.copy(0, size) == 0  # nothing left
    graph.close_all()
    # Zeros (zero cluster, zero data, unallocated source) are not stored as data.
    data = [(e["start"], e["length"]) for e in qemu_map(qemu_img, tpath) if e["data"]]
    assert data == [(0, 256 * K), (2 * M, 320 * K), (3 * M - 64 * K, 64 * K + 512)]
    qemu_check(qemu_img, tpath)
    run([qemu_img, "compare", tmp_path / "s.qcow2", tpath], check=True)


def test_incremental_copy_writes_only_the_copy_set(
    graph: BlockGraph, tmp_path: Path, qemu_img: str
) -> None:
    size = 4 * M
    src = graph.add_blockdev(qcow2_opts(make(tmp_path / "s.qcow2", size), "s"))
    tpath = make(tmp_path / "t.qcow2", size, cluster_size=128 * K)
    tgt = graph.add_blockdev(qcow2_opts(tpath, "t"))
    src.pwrite(0, random.Random(1).randbytes(size))
    dirty = GranuleBits(size, 64 * K)
    dirty.set_range(64 * K, 1)  # -> job cluster [0, 128k)
    dirty.set_range(M + 200 * K, 64 * K)  # granules 19, 20 -> [1M+128k, 1M+384k)
    bcs = BlockCopyState(src, tgt, cluster_size=job_cluster_size(tgt))
    bcs.set_from(dirty)
    assert bcs.remaining() == 3 * 128 * K
    assert bcs.copy(0, size) == 3 * 128 * K
    for lo, hi in ((0, 128 * K), (M + 128 * K, M + 384 * K)):
        assert tgt.pread(lo, hi - lo) == src.pread(lo, hi - lo)
    graph.close_all()
    present = [(e["start"], e["length"]) for e in qemu_map(qemu_img, tpath) if e["present"]]
    assert present == [(0, 128 * K), (M + 128 * K, 256 * K)]
    qemu_check(qemu_img, tpath)


def test_zeros_hide_the_targets_backing_file(
    graph: BlockGraph, tmp_path: Path, qemu_img: str
) -> None:
    """Spec 6.4: zero ranges become zero clusters, never unallocated ones."""
    size = 2 * M
    base = prepared(tmp_path / "base.qcow2", size, [(0, b"\xaa" * size)])
    spath = prepared(
        tmp_path / "s.qcow2",
        size,
        [(0, 64 * K), (64 * K, bytes(64 * K)), (192 * K, b"\x11" * 64 * K)],
    )  # a zero cluster, data reading as zero, unallocated space, data, unallocated space
    src = graph.add_blockdev(qcow2_opts(spath, "s"))
    tpath = make(tmp_path / "t.qcow2", size, backing=base)
    tgt = graph.add_blockdev(qcow2_opts(tpath, "t"))
    bcs = BlockCopyState(src, tgt, cluster_size=64 * K)
    bcs.set_all()
    assert bcs.copy(0, size) == size
    assert tgt.pread(0, size) == src.pread(0, size)
    graph.close_all()
    assert qemu_map(qemu_img, tpath) == [
        {"start": 0, "length": 192 * K, "depth": 0, "present": True, "zero": True, "data": False},
        {"start": 192 * K, "length": 64 * K, "depth": 0, "present": True, "zero": False,
         "data": True},
        {"start": 256 * K, "length": size - 256 * K, "depth": 0, "present": True, "zero": True,
         "data": False},
    ]  # fmt: skip
    qemu_check(qemu_img, tpath)


def test_skip_unallocated_copies_only_the_top_layer(
    graph: BlockGraph, tmp_path: Path, qemu_img: str
) -> None:
    size = M
    base = prepared(tmp_path / "base.qcow2", size, [(0, b"\xaa" * size)])
    top: list[tuple[int, bytes | int]] = [(64 * K + 10, b"\xbb" * 100), (256 * K, 64 * K)]
    src = graph.add_blockdev(qcow2_opts(prepared(tmp_path / "s.qcow2", size, top, base), "s"))
    tpath = make(tmp_path / "t.qcow2", size, backing=base)
    tgt = graph.add_blockdev(qcow2_opts(tpath, "t"))
    done: list[int] = []
    skipped: list[int] = []
    bcs = BlockCopyState(src, tgt, cluster_size=64 * K, skip_unallocated=True)
    bcs.on_progress, bcs.on_skip = done.append, skipped.append
    bcs.set_all()
    assert bcs.copy(0, size) == size
    assert (sum(done), sum(skipped), bcs.remaining()) == (128 * K, size - 128 * K, 0)
    assert tgt.pread(0, size) == src.pread(0, size)
    graph.close_all()
    present = [
        (e["start"], e["length"], e["zero"]) for e in qemu_map(qemu_img, tpath) if e["depth"] == 0
    ]
    assert present == [(64 * K, 64 * K, False), (256 * K, 64 * K, True)]


def test_compressed_copy(graph: BlockGraph, tmp_path: Path, qemu_img: str) -> None:
    size = M + 512
    src = graph.add_blockdev(qcow2_opts(make(tmp_path / "s.qcow2", size), "s"))
    tpath = make(tmp_path / "t.qcow2", size)
    tgt = graph.add_blockdev(qcow2_opts(tpath, "t"))
    src.pwrite(0, b"compressible " * 20000)  # ~254k
    src.pwrite(512 * K, random.Random(3).randbytes(64 * K))  # stays uncompressed
    src.pwrite(M, b"\x42" * 512)  # the partial last cluster
    bcs = BlockCopyState(src, tgt, cluster_size=128 * K, compress=True)  # 2 writes per cluster
    bcs.set_all()
    assert bcs.copy(0, size) == 9 * 128 * K  # whole clusters, the partial last one too
    assert tgt.pread(0, size) == src.pread(0, size)
    assert [tgt.block_status(off, 64 * K).compressed for off in (0, 192 * K, 512 * K, M)] == [
        True, True, False, True,
    ]  # fmt: skip
    graph.close_all()
    check = qemu_check(qemu_img, tpath)
    assert check["compressed-clusters"] == 6


# --------------------------------------------------------------------------- errors
def test_read_error_leaves_the_cluster_dirty_and_a_retry_succeeds(
    graph: BlockGraph, tmp_path: Path
) -> None:
    size = 4 * M
    spath = prepared(tmp_path / "s.qcow2", size, [(0, b"\x01" * M), (2 * M, b"\x02" * M)])
    probe = BlockGraph()  # fail only the read of guest [2M, 3M): find its host sector
    host = probe.add_blockdev(qcow2_opts(spath, "probe")).block_status(2 * M, 512).host_offset
    probe.close_all()
    assert host is not None
    rule = {"event": "read_aio", "errno": errno.EIO, "sector": host // 512, "once": True}
    src = graph.add_blockdev(qcow2_opts(spath, "s", inject=[rule]))
    tgt = graph.add_blockdev(qcow2_opts(make(tmp_path / "t.qcow2", size), "t"))
    progress: list[int] = []
    bcs = BlockCopyState(src, tgt, cluster_size=64 * K, on_progress=progress.append)
    bcs.set_all()
    with pytest.raises(CopyError) as info:
        bcs.copy(0, size)
    error = info.value
    assert (error.operation, error.errno, error.offset, error.error_is_read) == (
        "read", errno.EIO, 2 * M, True,
    )  # fmt: skip
    # [0, 1M) data and [1M, 2M) zeros made it; the failed read's clusters did not.
    assert sum(progress) == 2 * M and bcs.remaining() == 2 * M
    assert bcs.copy_bitmap.next_dirty(0) == 2 * M
    assert bcs.copy(0, size) == 2 * M
    assert tgt.pread(0, size) == src.pread(0, size)


def test_write_error_is_reported_as_such(graph: BlockGraph, tmp_path: Path) -> None:
    size = M
    src = graph.add_blockdev(qcow2_opts(make(tmp_path / "s.qcow2", size), "s"))
    src.pwrite(0, b"\x05" * size)
    rule = {"event": "write_aio", "errno": errno.ENOSPC, "once": True}
    tgt = graph.add_blockdev(qcow2_opts(make(tmp_path / "t.qcow2", size), "t", inject=[rule]))
    bcs = BlockCopyState(src, tgt, cluster_size=64 * K)
    bcs.set_all()
    with pytest.raises(CopyError) as info:
        bcs.copy(0, size)
    assert (info.value.operation, info.value.errno) == ("write", errno.ENOSPC)
    assert bcs.remaining() == size
    assert bcs.copy(0, size) == size
    assert tgt.pread(0, size) == src.pread(0, size)


# --------------------------------------------------------------------------- copy-before-write
@pytest.fixture
def pair(graph: BlockGraph, tmp_path: Path) -> tuple[BlockNode, BlockNode]:
    size = M + 512
    src = graph.add_blockdev(qcow2_opts(make(tmp_path / "s.qcow2", size), "s"))
    tgt = graph.add_blockdev(qcow2_opts(make(tmp_path / "t.qcow2", size), "t"))
    src.pwrite(0, b"\x0a" * size)
    return src, tgt


def test_cbw_saves_only_dirty_clusters_the_write_touches(pair: tuple[BlockNode, BlockNode]) -> None:
    src, tgt = pair
    bcs = BlockCopyState(src, tgt, cluster_size=64 * K)
    bcs.copy_bitmap.set_range(0, 128 * K)
    bcs.copy_bitmap.set_range(M, 512)  # the partial last cluster
    cbw = CopyBeforeWrite(src, bcs)
    cbw.attach()
    cbw.attach()
    assert cbw.attached and len(src.before_write) == 1
    src.pwrite(500 * K, b"\xff" * 10)  # not in the set: nothing copied
    assert cbw.copied == 0 and not tgt.block_status(0, M).allocated
    src.pwrite(64 * K - 1, b"\xff\xff")  # straddles clusters 0 and 1: both saved
    assert cbw.copied == 128 * K and bcs.remaining() == 64 * K  # counted whole
    src.discard(M, 512)  # discard counts as a write
    assert cbw.copied == 192 * K and bcs.remaining() == 0
    cbw.detach()
    cbw.detach()
    assert src.before_write == []
    assert tgt.pread(0, 128 * K) == b"\x0a" * 128 * K
    assert tgt.pread(M, 512) == b"\x0a" * 512
    assert src.pread(64 * K - 1, 2) == b"\xff\xff"


def test_cbw_failure_breaks_the_guest_write(graph: BlockGraph, tmp_path: Path) -> None:
    size = M
    spath = prepared(tmp_path / "s.qcow2", size, [(0, b"\x0b" * size)])
    rule = {"event": "read_aio", "errno": errno.EIO, "once": True}
    src = graph.add_blockdev(qcow2_opts(spath, "s", inject=[rule]))
    tgt = graph.add_blockdev(qcow2_opts(make(tmp_path / "t.qcow2", size), "t"))
    bcs = BlockCopyState(src, tgt, cluster_size=64 * K)
    bcs.set_all()
    CopyBeforeWrite(src, bcs).attach()
    with pytest.raises(CopyError):
        src.pwrite(100 * K, b"\xcc" * 100)
    assert src.pread(100 * K, 100) == b"\x0b" * 100  # the guest's data was not written
    assert bcs.remaining() == size
    src.pwrite(100 * K, b"\xcc" * 100)  # the rule fired once: now it works
    assert bcs.remaining() == size - 64 * K
    assert tgt.pread(64 * K, 64 * K) == b"\x0b" * 64 * K


def test_cbw_break_snapshot_lets_the_guest_write(graph: BlockGraph, tmp_path: Path) -> None:
    size = M
    src = graph.add_blockdev(qcow2_opts(make(tmp_path / "s.qcow2", size), "s"))
    rule = {"event": "write_aio", "errno": errno.EIO}
    tgt = graph.add_blockdev(qcow2_opts(make(tmp_path / "t.qcow2", size), "t", inject=[rule]))
    src.pwrite(0, b"\x01" * size)
    bcs = BlockCopyState(src, tgt, cluster_size=64 * K)
    bcs.set_all()
    cbw = CopyBeforeWrite(src, bcs, on_cbw_error="break-snapshot")
    cbw.attach()
    src.pwrite(0, b"\x02" * 10)
    src.pwrite(M - 10, b"\x02" * 10)
    assert cbw.snapshot_error is not None and cbw.snapshot_error.operation == "write"
    assert src.pread(0, 10) == src.pread(M - 10, 10) == b"\x02" * 10
    assert bcs.remaining() == size  # no further copies were tried


# --------------------------------------------------------------------------- the property
OFFSETS = st.integers(0, 700 * K)
LENGTHS = st.integers(1, 200 * K)
GUEST_OP = st.tuples(
    st.sampled_from(["write", "zero", "discard"]), OFFSETS, LENGTHS, st.integers(1, 255)
)
COPY_OP = st.tuples(st.just("copy"), st.sampled_from([64 * K, 128 * K, 256 * K]))


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    clusters=st.integers(2, 10),
    tail=st.sampled_from([0, 512, 1536, 32 * K]),
    job_cluster=st.sampled_from([64 * K, 128 * K]),
    granularity=st.sampled_from([0, 32 * K, 64 * K, 128 * K]),  # 0: the whole disk
    dirty=st.lists(st.tuples(OFFSETS, LENGTHS), max_size=4),
    content=st.lists(GUEST_OP, max_size=5),
    ops=st.lists(st.one_of(COPY_OP, GUEST_OP), max_size=24),
)
def test_point_in_time_under_any_interleaving(
    clusters: int,
    tail: int,
    job_cluster: int,
    granularity: int,
    dirty: list[tuple[int, int]],
    content: list[tuple[str, int, int, int]],
    ops: list[tuple[Any, ...]],
) -> None:
    """Copy chunks and guest writes in any order: at the end the target holds, on the copy
    set, exactly what the source held when the set was defined, and nothing elsewhere."""
    size = clusters * 64 * K + tail

    def guest(node: BlockNode, kind: str, offset: int, length: int, pattern: int) -> None:
        offset = min(offset, size - 1)
        length = min(length, size - offset)
        if kind == "write":
            node.pwrite(offset, bytes([pattern]) * length)
        elif kind == "zero":
            node.pwrite_zeroes(offset, length)
        else:
            node.discard(offset, length)

    with tempfile.TemporaryDirectory() as tmp:
        graph = BlockGraph()
        try:
            src = graph.add_blockdev(qcow2_opts(make(Path(tmp, "s.qcow2"), size), "s"))
            tgt = graph.add_blockdev(qcow2_opts(make(Path(tmp, "t.qcow2"), size), "t"))
            # Every 8-byte word holds its own offset: a byte in the wrong place shows.
            src.pwrite(0, np.arange(size // 8, dtype="<u8").tobytes() + bytes(size % 8))
            for op in content:
                guest(src, *op)
            progress: list[int] = []
            bcs = BlockCopyState(src, tgt, cluster_size=job_cluster, on_progress=progress.append)
            model = GranuleBits(size, job_cluster)
            if granularity:
                bits = GranuleBits(size, granularity)
                for offset, length in dirty:
                    bits.set_range(offset, length)
                bcs.set_from(bits)
                for start, length in bits.dirty_extents():
                    model.set_range(start, length)
            else:
                bcs.set_all()
                model.set_all()
            assert bcs.copy_bitmap == model
            snapshot = src.pread(0, size)
            total = bcs.remaining()
            cbw = CopyBeforeWrite(src, bcs)
            cbw.attach()
            pos = 0
            for op in ops:
                if op[0] != "copy":
                    guest(src, *op)
                    continue
                area = bcs.next_chunk(pos, op[1]) or bcs.next_chunk(0, op[1])
                if area is not None:
                    bcs.copy(*area)
                    pos = area[0] + area[1]
            copy_all(bcs)
            cbw.detach()
            assert bcs.remaining() == 0 and sum(progress) == total
            for start, length in model.dirty_extents():
                assert tgt.pread(start, length) == snapshot[start : start + length]
            pos = 0
            while (clean := model.next_clean(pos)) is not None:
                end = model.next_dirty(clean) or size
                ext = tgt.block_status(clean, end - clean)
                assert not ext.allocated and ext.length == end - clean
                pos = end
        finally:
            graph.close_all()
