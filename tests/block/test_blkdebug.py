"""blkdebug fault injection and the generic node layer, in process, over real image files.

Most tests build the seed's stack with :meth:`BlockGraph.add_blockdev` (a qcow2 node over a
blkdebug node over a file node, options shaped as QMP's ``blockdev-add`` passes them; a few put
raw on top instead) and drive the format node directly: no daemon, no QMP. The blkdebug node
is instrumented so a test sees what crossed the format -> blkdebug link (events, with the state
each one found) and which requests went on to the file below.

Expected behaviour is QEMU 7.2's (spec 7.1-7.3). Where a docstring says "qemu-io 7.2 shows",
the same rules and requests were run through real ``qemu-io -t writeback`` on a
``json:{"driver": "qcow2", "file": {"driver": "blkdebug", ...}}`` filename with the same
result.

The image (``image`` fixture) is the seed's drive before any bitmap exists (spec 5.2)::

    guest  0     64k        1M    1M+64k     4M   4M+64k      8M       32M      32M+124k
           |0x41 |  ....    |0xd5 |   ....   |zero|   ....    |unalloc.|0xdc ... |  ....
                                              ^ a ZERO-flag cluster (write-zeroes)
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bitback.bitmaps import DirtyBitmap
from bitback.block.dirty_bitmaps import add_bitmap
from bitback.block.drivers.blkdebug import BlkdebugDriver
from bitback.block.drivers.qcow2.create import create_qcow2
from bitback.block.graph import BlockGraph
from bitback.block.node import BlockNode
from bitback.errors import BitbackError, IOFailedError
from helpers.procs import run

KiB = 1 << 10
MiB = 1 << 20
CLUSTER = 64 * KiB
DISK = 64 * MiB

# What the seed's setUp writes before the bitmap exists: (pattern, offset, length).
SEED_DATA = ((0x41, 0, 64 * KiB), (0xD5, 1 * MiB, 64 * KiB), (0xDC, 32 * MiB, 124 * KiB))
# The seed's first batch of guest writes (spec 5.2): 7 granules of 64 KiB.
SEED_WRITES = ((0xAB, 0, 512), (0xFE, 16 * MiB, 256 * KiB), (0x64, 32736 * KiB, 64 * KiB))
ZERO_CLUSTER = 4 * MiB  # a ZERO-flag cluster inside the first L2 table
UNALLOCATED = 8 * MiB  # never written; its L2 table (the first) exists

Rule = dict[str, Any]


def set_state(event: str, state: int, new_state: int) -> Rule:
    return {"event": event, "state": state, "new_state": new_state}


def blkdebug_options(
    path: Path | str,
    *,
    set_states: Sequence[Rule] = (),
    inject: Sequence[Rule] = (),
    driver: str = "qcow2",
    name: str = "drive0",
    read_only: bool = False,
) -> dict[str, Any]:
    """``blockdev-add`` arguments of the seed's stack (spec 3.1)."""
    opts: dict[str, Any] = {
        "node-name": name,
        "driver": driver,
        "file": {
            "driver": "blkdebug",
            "image": {"driver": "file", "filename": str(path)},
            "set-state": list(set_states),
            "inject-error": list(inject),
        },
    }
    if read_only:
        opts["read-only"] = True
    return opts


def outcome(action: Callable[[], object]) -> str:
    """``"ok"``, or the errno name of the IOFailedError the action raised (``"EIO"``)."""
    try:
        action()
    except IOFailedError as exc:
        return errno.errorcode.get(exc.errno, f"errno {exc.errno}")
    return "ok"


@dataclass
class Stack:
    """A format node over an instrumented blkdebug node over a file node.

    ``events``: ``(event, state found)`` for every event raised on the blkdebug link, in
    order. ``requests``: ``(kind, offset, length)`` for every request that passed blkdebug
    and reached the file node (``flush`` has offset and length 0).
    """

    graph: BlockGraph
    node: BlockNode
    link: BlockNode
    blkdebug: BlkdebugDriver
    events: list[tuple[str, int]] = field(default_factory=list)
    requests: list[tuple[str, int, int]] = field(default_factory=list)

    def read(self, offset: int, length: int = 512) -> str:
        return outcome(lambda: self.node.pread(offset, length))

    def write(self, offset: int, data: bytes) -> str:
        return outcome(lambda: self.node.pwrite(offset, data))

    def flush(self) -> str:
        return outcome(self.node.flush)

    def names(self) -> list[str]:
        """Event names only, minus the flush_to_os every flush raises."""
        return [e for e, _ in self.events if e != "flush_to_os"]

    def data_reads(self) -> list[tuple[int, int]]:
        """Reads that reached the file, as (host offset, length)."""
        return [(o, n) for kind, o, n in self.requests if kind == "read"]

    def reset(self) -> None:
        self.events.clear()
        self.requests.clear()


def instrument(graph: BlockGraph, node: BlockNode) -> Stack:
    link = next(child for role, child in node.children() if role == "file")
    assert isinstance(link, BlockNode)
    blk = link.driver
    assert isinstance(blk, BlkdebugDriver)
    stack = Stack(graph, node, link, blk)
    raise_event = blk.debug_event

    def record_event(event: str) -> None:
        stack.events.append((event, blk.state))
        raise_event(event)

    setattr(blk, "debug_event", record_event)  # noqa: B010 - instance-level spy
    below = blk.image
    pread, readinto, pwrite, flush = below.pread, below.readinto, below.pwrite, below.flush

    def spy_pread(offset: int, length: int) -> bytes:
        stack.requests.append(("read", offset, length))
        return pread(offset, length)

    def spy_readinto(offset: int, dest: memoryview) -> None:
        stack.requests.append(("read", offset, len(dest)))
        readinto(offset, dest)

    def spy_pwrite(offset: int, data: bytes | bytearray | memoryview) -> None:
        stack.requests.append(("write", offset, len(memoryview(data).cast("B"))))
        pwrite(offset, data)

    def spy_flush() -> None:
        stack.requests.append(("flush", 0, 0))
        flush()

    for name, spy in (
        ("pread", spy_pread),
        ("readinto", spy_readinto),
        ("pwrite", spy_pwrite),
        ("flush", spy_flush),
    ):
        setattr(below, name, spy)
    return stack


OpenStack = Callable[..., Stack]


def write_seed_image(path: Path) -> None:
    create_qcow2(str(path), DISK)
    graph = BlockGraph()
    node = graph.add_blockdev(
        {"node-name": "setup", "driver": "qcow2", "file": {"driver": "file", "filename": str(path)}}
    )
    for pattern, offset, length in SEED_DATA:
        node.pwrite(offset, bytes([pattern]) * length)
    node.pwrite_zeroes(ZERO_CLUSTER, CLUSTER)
    assert graph.close_all() == []


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """The seed's drive0 image (see the module docstring)."""
    path = tmp_path / "drive0.qcow2"
    write_seed_image(path)
    return path


@pytest.fixture
def open_stack(image: Path) -> Iterator[OpenStack]:
    """``open_stack(set_states=..., inject=..., path=...)``: an instrumented stack; every
    stack is closed at teardown."""
    graphs: list[BlockGraph] = []

    def factory(path: Path | None = None, **kwargs: Any) -> Stack:
        graph = BlockGraph()
        graphs.append(graph)
        node = graph.add_blockdev(blkdebug_options(path or image, **kwargs))
        return instrument(graph, node)

    yield factory
    for graph in graphs:
        graph.close_all()


def host_offset(node: BlockNode, guest: int) -> int:
    ext = node.block_status(guest, 512)
    assert ext.host_offset is not None, f"guest offset {guest} is not stored as data"
    return ext.host_offset


# --------------------------------------------------------------------------- 7.1 rules


def test_state_starts_at_one(open_stack: OpenStack) -> None:
    """A fresh blkdebug node is in state 1, and opening the qcow2 image above it loads no L2
    table (a rule on ``l2_load`` has not fired)."""
    s = open_stack(set_states=[set_state("l2_load", 0, 7)])
    assert s.blkdebug.state == 1
    assert [event for event, _ in s.events if event != "reftable_load"] == []


def test_opening_qcow2_raises_reftable_load(open_stack: OpenStack) -> None:
    """The refcount table is read at open, announced as ``reftable_load``."""
    s = open_stack(
        set_states=[set_state("reftable_load", 1, 2)],
        inject=[{"event": "read_aio", "state": 2, "once": True}],
    )
    assert s.blkdebug.state == 2
    assert s.read(0) == "EIO"


def test_rules_see_the_state_before_the_event(open_stack: OpenStack) -> None:
    """QEMU 7.2 check (spec 7.1): ``read_aio 1->2``, ``read_aio 2->3`` and a once-inject at
    state 2: the 1st read passes, the 2nd fails, the 3rd passes. Both set-state rules never
    fire on one event: each read moves the state by exactly one step."""
    s = open_stack(
        set_states=[set_state("read_aio", 1, 2), set_state("read_aio", 2, 3)],
        inject=[{"event": "read_aio", "state": 2, "once": True}],
    )
    trace = [(s.read(0), s.blkdebug.state) for _ in range(3)]
    assert trace == [("ok", 2), ("EIO", 3), ("ok", 3)]
    assert [state for event, state in s.events if event == "read_aio"] == [1, 2, 3]


def test_an_armed_rule_stays_armed_until_an_inject_rule_matches_again(
    open_stack: OpenStack,
) -> None:
    """The same rules with ``once: false``: after the 2nd read armed the rule, the 3rd and 4th
    read raise read_aio in state 3, where no inject rule matches, so the active list is left
    alone and they fail too (qemu-io 7.2 shows ok, EIO, EIO, EIO)."""
    s = open_stack(
        set_states=[set_state("read_aio", 1, 2), set_state("read_aio", 2, 3)],
        inject=[{"event": "read_aio", "state": 2, "once": False}],
    )
    assert [s.read(0) for _ in range(4)] == ["ok", "EIO", "EIO", "EIO"]


def test_state_zero_or_absent_matches_any_state(open_stack: OpenStack) -> None:
    """``state`` 0 or absent means any state, for set-state and inject rules alike."""
    s = open_stack(
        set_states=[set_state("read_aio", 0, 5)],
        inject=[{"event": "flush_to_os", "once": True}, {"event": "read_aio", "state": 0}],
    )
    assert s.read(0) == "EIO"  # armed in state 1
    assert s.blkdebug.state == 5
    assert s.read(0) == "EIO"  # re-armed in state 5
    assert s.blkdebug.state == 5


def test_once_true_fires_once_and_is_gone_for_good(open_stack: OpenStack) -> None:
    """``once: true``: the first matching request fails; the rule is removed, so later events
    do not re-arm it."""
    s = open_stack(inject=[{"event": "read_aio", "once": True}])
    assert [s.read(0) for _ in range(4)] == ["EIO", "ok", "ok", "ok"]
    assert [e for e, _ in s.events].count("read_aio") == 4


def test_once_false_keeps_failing(open_stack: OpenStack) -> None:
    """``once: false`` (the default): every read of allocated data fails (spec 7.1)."""
    s = open_stack(inject=[{"event": "read_aio"}])
    assert [s.read(off) for off in (0, 1 * MiB, 32 * MiB, 0)] == ["EIO"] * 4
    assert len(s.data_reads()) == 1  # only the L2 table load went through


@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC, errno.EPERM, errno.EDQUOT])
def test_errno_is_honoured(open_stack: OpenStack, err: int) -> None:
    """The request fails with the rule's errno; the message is ``strerror(errno)``, as
    qemu-io prints it (``read failed: No space left on device``)."""
    s = open_stack(inject=[{"event": "read_aio", "errno": err, "once": True}])
    with pytest.raises(IOFailedError) as info:
        s.node.pread(0, 512)
    assert info.value.errno == err
    assert str(info.value) == os.strerror(err)


def test_default_errno_is_eio(open_stack: OpenStack) -> None:
    """Without ``errno`` the rule injects EIO (5)."""
    s = open_stack(inject=[{"event": "read_aio"}])
    with pytest.raises(IOFailedError) as info:
        s.node.pread(0, 512)
    assert info.value.errno == errno.EIO
    assert str(info.value) == "Input/output error"


def test_sector_limits_the_rule_to_requests_covering_it(open_stack: OpenStack) -> None:
    """``sector`` is a 512-byte sector of the blkdebug node, i.e. of the image *file*: a rule
    for the second sector of guest cluster 0's host cluster fails only reads covering that
    sector (qemu-io 7.2: ``read 0 512`` ok, ``read 512 512`` fails, ``read 8M 512`` ok)."""
    probe = open_stack(name="probe", read_only=True)
    sector = host_offset(probe.node, 0) // 512 + 1
    s = open_stack(inject=[{"event": "read_aio", "sector": sector}])
    assert s.read(0) == "ok"
    assert s.read(512) == "EIO"
    assert s.read(0, 1024) == "EIO"
    assert s.read(1 * MiB) == "ok"  # another host cluster
    assert s.read(1024) == "ok"


def test_iotype_write_fails_writes_only(open_stack: OpenStack) -> None:
    """An armed rule with ``iotype: write`` lets reads through and fails the next data
    write; the failed write did not reach the file."""
    s = open_stack(inject=[{"event": "read_aio", "iotype": "write", "once": True}])
    assert s.read(0) == "ok"  # arms the rule
    assert s.read(0) == "ok"
    s.requests.clear()
    assert s.write(0, b"\x99" * 512) == "EIO"  # cluster 0 is allocated: written in place
    assert not [r for r in s.requests if r[0] == "write"]
    assert s.write(0, b"\x99" * 512) == "ok"
    assert s.node.pread(0, 512) == b"\x99" * 512


def test_iotype_flush_fails_the_flush_only(open_stack: OpenStack) -> None:
    """``iotype: flush``: reads and writes pass; the first flush that reaches blkdebug fails
    and, once the rule is gone, the retried flush reaches the file."""
    s = open_stack(inject=[{"event": "read_aio", "iotype": "flush", "once": True}])
    assert s.read(0) == "ok"  # arms the rule
    assert s.write(0, b"\x77" * 512) == "ok"
    assert s.read(0) == "ok"
    assert s.flush() == "EIO"
    assert ("flush", 0, 0) not in s.requests
    assert s.flush() == "ok"  # the failed flush left the node unflushed
    assert ("flush", 0, 0) in s.requests


def test_rules_ignore_block_status_unless_asked(open_stack: OpenStack) -> None:
    """Default iotypes are read, write, write-zeroes, discard and flush: not block-status.
    ``iotype: block-status`` fails block-status queries of the blkdebug node."""
    s = open_stack(inject=[{"event": "read_aio"}])
    assert s.read(0) == "EIO"  # armed, once=false
    assert s.link.block_status(0, 512).length > 0
    t = open_stack(name="bs", inject=[{"event": "read_aio", "iotype": "block-status"}])
    assert t.read(0) == "ok"
    with pytest.raises(IOFailedError):
        t.link.block_status(0, 512)


def test_first_matching_inject_rule_replaces_the_active_ones(open_stack: OpenStack) -> None:
    """An event that arms an inject rule first drops every active rule; an event that arms
    none leaves them active. Rule A (write) is armed by flush_to_os, rule B (flush) by
    read_aio: after a read, writes pass again."""
    s = open_stack(
        inject=[
            {"event": "flush_to_os", "iotype": "write"},
            {"event": "read_aio", "iotype": "flush"},
        ]
    )
    assert s.flush() == "ok"  # flush_to_os arms A; nothing was written, no flush request
    assert s.write(0, b"\x01" * 512) == "EIO"  # the L2 load (a read) passed; the data did not
    assert s.names() == ["l2_load", "write_aio"]
    assert s.read(0) == "ok"  # read_aio arms B, dropping A
    assert s.write(0, b"\x02" * 512) == "ok"
    # The next flush raises flush_to_os first, which re-arms A and drops B: the flush
    # request that follows passes (A is for writes), and writes fail again.
    assert s.flush() == "ok"
    assert ("flush", 0, 0) in s.requests
    assert s.write(0, b"\x03" * 512) == "EIO"


# --------------------------------------------------------------------------- 7.2 events


def test_unallocated_and_zero_clusters_raise_nothing(open_stack: OpenStack) -> None:
    """Reads of unallocated clusters and of ZERO clusters (no backing file) are served by the
    qcow2 node itself: no read_aio, no request through blkdebug (spec 7.2, 7.2 check
    ``read 8M 512`` did not consume the rule)."""
    s = open_stack(inject=[{"event": "read_aio", "once": True}])
    s.node.block_status(0, 512)  # loads the (only) L2 table: no read_aio, and no data read
    assert s.names() == ["l2_load"]
    s.reset()
    assert s.read(UNALLOCATED, 512) == "ok"
    assert s.read(ZERO_CLUSTER, CLUSTER) == "ok"
    assert s.read(40 * MiB, 1 * MiB) == "ok"
    assert "read_aio" not in s.names()
    assert s.data_reads() == []
    assert s.node.pread(ZERO_CLUSTER, 512) == bytes(512)
    assert s.read(0) == "EIO"  # the rule was still waiting for the first data read


def test_armed_rule_fails_allocated_reads_but_not_unallocated_ones(
    open_stack: OpenStack,
) -> None:
    """With a ``once: false`` rule armed, every read of allocated data fails while reads of
    unallocated or zero clusters succeed, because they never reach blkdebug (spec 7.1)."""
    s = open_stack(inject=[{"event": "read_aio"}])
    assert s.read(0) == "EIO"
    assert s.read(UNALLOCATED) == "ok"
    assert s.read(ZERO_CLUSTER) == "ok"
    assert s.read(32 * MiB) == "EIO"
    assert s.read(1 * MiB - 512, 512) == "ok"  # the hole right before allocated 1M
    assert s.read(1 * MiB - 512, 1024) == "EIO"  # and across its end


def test_metadata_is_read_before_read_aio(open_stack: OpenStack) -> None:
    """On a fresh open the first data read loads its L2 table (``l2_load`` and a read through
    blkdebug), *then* raises read_aio right before the data read: the armed once-rule hits the
    data read, not the metadata (spec 7.2)."""
    s = open_stack(inject=[{"event": "read_aio", "once": True}])
    assert s.read(0) == "EIO"
    assert s.names() == ["l2_load", "read_aio"]
    (l2_read,) = s.data_reads()
    assert l2_read[1] == CLUSTER  # the L2 table went through; the data read did not
    data_host = host_offset(s.node, 0)
    assert l2_read[0] != data_host
    s.reset()
    assert s.read(0) == "ok"
    assert s.names() == ["read_aio"]  # L2 table cached now
    assert s.data_reads() == [(data_host, 512)]


def test_a_rule_on_l2_load_fails_the_metadata_read(open_stack: OpenStack) -> None:
    """Metadata reads are requests through blkdebug too: a rule armed by ``l2_load`` fails the
    L2 table read itself; the table is not cached, so the next read loads it again."""
    s = open_stack(inject=[{"event": "l2_load", "once": True}])
    assert s.read(0) == "EIO"
    assert s.names() == ["l2_load"]
    assert s.data_reads() == []
    assert s.read(0) == "ok"
    assert s.names() == ["l2_load", "l2_load", "read_aio"]


def test_one_read_aio_per_contiguous_host_range(open_stack: OpenStack) -> None:
    """A read over two allocated ranges with a hole between raises read_aio once per data
    range, each right before its own file read."""
    s = open_stack()
    s.node.pread(0, 1 * MiB)  # warm the L2 cache
    s.reset()
    assert s.read(0, 1 * MiB + CLUSTER) == "ok"
    assert s.names() == ["read_aio", "read_aio"]
    assert [n for _, n in s.data_reads()] == [CLUSTER, CLUSTER]


def test_reads_from_the_backing_file_raise_read_backing_aio(
    tmp_path: Path, image: Path, open_stack: OpenStack
) -> None:
    """An overlay's unallocated clusters are read from its backing node: the overlay raises
    ``read_backing_aio`` (not read_aio) on its own blkdebug link, and a read_aio rule on that
    link does not fire."""
    top = tmp_path / "top.qcow2"
    create_qcow2(str(top), DISK, backing_file=image.name, backing_fmt="qcow2")
    s = open_stack(path=top, inject=[{"event": "read_aio", "once": True}])
    assert s.node.pread(0, 512) == b"\x41" * 512
    assert s.names() == ["read_backing_aio"]
    assert s.read(0) == "ok"


def test_flush_to_disk_only_when_written_since_the_last_flush(open_stack: OpenStack) -> None:
    """``flush`` right after open raises nothing; ``write`` + ``flush`` raises flush_to_disk
    once; a second flush raises nothing (qemu-io 7.2: write, flush, flush leaves a
    ``flush_to_disk 1->2, 2->3`` pair in state 2). flush_to_os comes with every flush."""
    s = open_stack(set_states=[set_state("flush_to_disk", 1, 2), set_state("flush_to_disk", 2, 3)])
    assert s.flush() == "ok"
    assert s.events == [("flush_to_os", 1)]
    assert s.requests == []
    assert s.write(0, b"\xab" * 512) == "ok"
    assert s.blkdebug.state == 1
    s.reset()
    assert s.flush() == "ok"
    assert s.events == [("flush_to_os", 1), ("flush_to_disk", 1)]
    assert s.requests[-1] == ("flush", 0, 0)
    assert s.blkdebug.state == 2
    s.reset()
    assert s.flush() == "ok"
    assert s.events == [("flush_to_os", 2)]
    assert s.requests == []
    assert s.blkdebug.state == 2


def test_a_failed_write_still_counts_for_flush_to_disk(open_stack: OpenStack) -> None:
    """QEMU bumps the write generation after every write request, failed or not: a flush
    after a failed write raises flush_to_disk."""
    s = open_stack(
        set_states=[set_state("flush_to_disk", 1, 2)],
        inject=[{"event": "write_aio", "once": True}],
    )
    assert s.write(0, b"\x01" * 512) == "EIO"
    assert s.flush() == "ok"
    assert s.blkdebug.state == 2


def test_read_only_nodes_are_never_flushed(open_stack: OpenStack) -> None:
    """A read-only node's flush returns at once: no event, no request (bdrv_co_flush)."""
    s = open_stack(read_only=True, set_states=[set_state("flush_to_os", 1, 2)])
    assert s.flush() == "ok"
    assert s.events == [] and s.requests == []


def test_write_aio_fires_before_data_writes(open_stack: OpenStack) -> None:
    """``write_aio`` precedes every guest-data write: in place (allocated cluster) and into
    new clusters (after ``cluster_alloc``). Whole-cluster write-zeroes write no data and
    raise no write_aio."""
    s = open_stack()
    s.node.block_status(0, 512)  # load the L2 table
    s.reset()
    assert s.write(0, b"\x01" * 512) == "ok"  # allocated: in place
    assert s.names() == ["write_aio"]
    assert [r[0] for r in s.requests] == ["write"]
    s.reset()
    assert s.write(16 * MiB, b"\x02" * CLUSTER) == "ok"  # new cluster (same L2 table)
    names = s.names()  # cluster_alloc, refblock_load (the refcounts), write_aio
    assert names[0] == "cluster_alloc" and names[-1] == "write_aio"
    assert names.count("write_aio") == 1
    assert s.requests[-1] == ("write", host_offset(s.node, 16 * MiB), CLUSTER)
    s.reset()
    s.node.pwrite_zeroes(20 * MiB, CLUSTER)
    assert "write_aio" not in s.names()


def test_injected_write_error_fails_the_data_write(open_stack: OpenStack) -> None:
    """A ``write_aio`` rule fails the write that raised it, before any data reaches the file;
    the next write passes and reads back."""
    s = open_stack(inject=[{"event": "write_aio", "once": True}])
    assert s.write(0, b"\x55" * 512) == "EIO"
    assert not [r for r in s.requests if r[0] == "write"]
    assert s.node.pread(0, 512) == b"\x41" * 512
    assert s.write(0, b"\x56" * 512) == "ok"
    assert s.node.pread(0, 512) == b"\x56" * 512


def test_a_failed_allocating_write_leaks_nothing(
    open_stack: OpenStack, image: Path, qemu_img: str
) -> None:
    """A write into fresh clusters that blkdebug fails must not leave the clusters allocated:
    after close, real ``qemu-img check`` finds the image clean (as after the same steps in
    qemu-io 7.2)."""
    s = open_stack(inject=[{"event": "write_aio", "once": True}])
    assert s.write(16 * MiB, b"\x33" * CLUSTER) == "EIO"
    assert s.write(16 * MiB, b"\x44" * CLUSTER) == "ok"
    assert s.graph.close_all() == []
    res = run([qemu_img, "check", str(image)])
    assert res.returncode == 0, res.stdout + res.stderr


# --------------------------------------------------------------------------- 7.3 seed scripts


SEED_FLUSH_RULES = [set_state("flush_to_disk", 1, 2)]
SEED_INJECT = {"event": "read_aio", "errno": 5, "immediately": False, "once": True}


def anchor_backup(s: Stack) -> None:
    """The full (anchor) backup's source reads: the whole disk in 1 MiB requests."""
    for offset in range(0, DISK, MiB):
        s.node.pread(offset, MiB)


def hmp_writes(s: Stack, writes: Sequence[tuple[int, int, int]] = SEED_WRITES) -> None:
    """The seed's ``hmp_io_writes``: qemu-io writes, then ``flush``."""
    for pattern, offset, length in writes:
        s.node.pwrite(offset, bytes([pattern]) * length)
    s.node.flush()


def incremental_reads(s: Stack, bitmap: DirtyBitmap) -> list[tuple[int, str]]:
    """What an incremental job reads: every dirty 64 KiB cluster, in order; stops at the
    first failure, as a job with on-source-error=report (or stop) does."""
    done = []
    for start, length in bitmap.bits.dirty_extents():
        for offset in range(start, start + length, CLUSTER):
            result = s.read(offset, min(CLUSTER, start + length - offset))
            done.append((offset, result))
            if result != "ok":
                return done
    return done


def test_seed_transaction_and_incremental_failure_script(open_stack: OpenStack) -> None:
    """Spec 7.3, ``test_transaction_failure(_race)`` and ``test_incremental_failure``:
    set-state flush_to_disk 1->2; inject read_aio in state 2, EIO, once.

    The anchor backup reads at state 1 (no effect); the HMP writes and their flush move to
    state 2; the incremental job's first data read raises read_aio, which arms the rule, and
    that read fails; the retry finds the rule gone and copies everything."""
    s = open_stack(set_states=SEED_FLUSH_RULES, inject=[dict(SEED_INJECT, state=2)])
    anchor_backup(s)
    assert s.blkdebug.state == 1
    bitmap = add_bitmap(s.node, "bitmap0", granularity=CLUSTER)
    hmp_writes(s)
    assert bitmap.count() == 458752  # spec 5.2
    assert s.blkdebug.state == 2
    assert [e for e in s.events if e[0] == "flush_to_disk"] == [("flush_to_disk", 1)]
    assert incremental_reads(s, bitmap) == [(0, "EIO")]
    assert s.blkdebug.state == 2
    retry = incremental_reads(s, bitmap)
    assert [offset for offset, _ in retry] == [
        g * CLUSTER for g in (0, 256, 257, 258, 259, 511, 512)
    ]
    assert {result for _, result in retry} == {"ok"}
    # A second batch and incremental (test_incremental_failure) still passes.
    bitmap.bits.clear()
    hmp_writes(s, ((0x9A, 0, 512), (0x55, 8 * MiB, 352 * KiB), (0x78, 15872 * KiB, MiB)))
    assert bitmap.count() == 1507328
    assert {result for _, result in incremental_reads(s, bitmap)} == {"ok"}


def test_seed_incremental_pause_script(open_stack: OpenStack) -> None:
    """Spec 7.3, ``test_incremental_pause``: set-state flush_to_disk 1->2 and read_aio 2->3;
    inject read_aio in state 3, EIO, once.

    Anchor reads at state 1; HMP writes + flush -> 2; ``device_add``'s one geometry read of
    sector 0 raises read_aio in state 2 (-> 3, and the state-3 inject does not yet match);
    the job's first data read arms the rule in state 3 and fails (BLOCK_JOB_ERROR, paused);
    on resume the retry passes."""
    s = open_stack(
        set_states=[*SEED_FLUSH_RULES, set_state("read_aio", 2, 3)],
        inject=[dict(SEED_INJECT, state=3)],
    )
    anchor_backup(s)
    assert s.blkdebug.state == 1
    bitmap = add_bitmap(s.node, "bitmap0", granularity=CLUSTER)
    hmp_writes(s)
    assert s.blkdebug.state == 2
    assert s.read(0, 512) == "ok"  # device_add's geometry read
    assert s.blkdebug.state == 3
    assert incremental_reads(s, bitmap) == [(0, "EIO")]  # job pauses on the error
    resumed = incremental_reads(s, bitmap)  # block-job-resume retries the same cluster
    assert len(resumed) == 7 and {r for _, r in resumed} == {"ok"}
    assert s.blkdebug.state == 3
    assert bitmap.count() == 458752  # reads never mark


# --------------------------------------------------------------------------- QEMU divergences


def test_conflicting_set_state_rules_first_defined_wins(open_stack: OpenStack) -> None:
    """Two set-state rules for one event and state: QEMU applies the first one defined."""
    s = open_stack(
        set_states=[set_state("read_aio", 1, 2), set_state("read_aio", 1, 3)],
        inject=[{"event": "read_aio", "state": 2}],
    )
    assert [s.read(0) for _ in range(3)] == ["ok", "EIO", "EIO"]
    assert s.blkdebug.state == 2


def test_errno_zero_injects_nothing(open_stack: OpenStack) -> None:
    """``errno: 0`` matches requests but injects no error, and is never consumed."""
    s = open_stack(inject=[{"event": "read_aio", "errno": 0, "once": True}, {"event": "read_aio"}])
    assert [s.read(0) for _ in range(2)] == ["ok", "ok"]


def test_raw_format_raises_read_aio_and_write_aio(tmp_path: Path, open_stack: OpenStack) -> None:
    """raw over blkdebug: a read_aio rule fails the first read, a write_aio rule the first
    write."""
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(MiB))
    s = open_stack(
        path=disk, driver="raw", inject=[{"event": "read_aio", "once": True, "iotype": "read"}]
    )
    assert s.read(0) == "EIO"
    assert s.names() == ["read_aio"]
    w = open_stack(path=disk, driver="raw", name="w", inject=[{"event": "write_aio", "once": True}])
    assert w.write(0, b"x" * 512) == "EIO"


# --------------------------------------------------------------------------- BlockNode


def raw_stack(open_stack: OpenStack, tmp_path: Path, **kwargs: Any) -> Stack:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(MiB))
    return open_stack(path=disk, driver="raw", **kwargs)


REQUESTS: dict[str, Callable[[BlockNode, int, int], None]] = {
    "write": lambda node, off, n: node.pwrite(off, b"\xee" * n),
    "write-zeroes": lambda node, off, n: node.pwrite_zeroes(off, n),
    "discard": lambda node, off, n: node.discard(off, n),
}


@pytest.mark.parametrize("request_kind", sorted(REQUESTS))
def test_failed_requests_still_mark_every_enabled_bitmap(
    open_stack: OpenStack, tmp_path: Path, request_kind: str
) -> None:
    """Writes, write-zeroes and discards mark every enabled bitmap of the node after the
    request, even when it failed (spec 5.1, ``bdrv_co_write_req_finish``); a disabled bitmap
    records nothing. The failure here is blkdebug's: a default-iotype rule armed by the
    flush_to_os of a flush."""
    s = raw_stack(open_stack, tmp_path, inject=[{"event": "flush_to_os"}])
    coarse = add_bitmap(s.node, "coarse", granularity=CLUSTER)
    fine = add_bitmap(s.node, "fine", granularity=4096)
    off = add_bitmap(s.node, "off", granularity=4096, disabled=True)
    assert s.flush() == "ok"  # arms the rule
    gen = s.node.write_gen
    with pytest.raises(IOFailedError):
        REQUESTS[request_kind](s.node, CLUSTER + 4000, 200)
    assert list(coarse.bits.dirty_extents()) == [(CLUSTER, CLUSTER)]
    assert list(fine.bits.dirty_extents()) == [(CLUSTER, 8192)]  # 4000+200 crosses 4096
    assert off.count() == 0
    assert s.node.write_gen == gen + 1


def test_failed_qcow2_write_marks_bitmaps(open_stack: OpenStack) -> None:
    """The seed's kind of failure: a qcow2 write failed by a write_aio rule still marks the
    bitmap (QEMU's conservative marking), and the data is unchanged."""
    s = open_stack(inject=[{"event": "write_aio", "once": True}])
    bitmap = add_bitmap(s.node, "bitmap0")
    assert bitmap.granularity == CLUSTER  # default from the 64 KiB cluster size
    assert s.write(32 * MiB + 512, b"\x01" * 512) == "EIO"
    assert list(bitmap.bits.dirty_extents()) == [(32 * MiB, CLUSTER)]
    assert s.node.pread(32 * MiB, 1024) == b"\xdc" * 1024


def test_successful_requests_mark_and_reads_do_not(open_stack: OpenStack) -> None:
    """Writes, write-zeroes and discards that succeed mark all enabled bitmaps; reads never
    do; a bitmap disabled later stops recording and keeps its bits."""
    s = open_stack()
    a = add_bitmap(s.node, "a", granularity=CLUSTER)
    b = add_bitmap(s.node, "b", granularity=CLUSTER)
    s.node.pread(0, 8 * MiB)
    assert a.count() == b.count() == 0
    s.node.pwrite(0, b"\x01" * 512)
    b.enabled = False
    s.node.pwrite_zeroes(2 * MiB, CLUSTER)
    s.node.discard(32 * MiB, 2 * CLUSTER)
    assert [g for g, _ in a.bits.dirty_extents()] == [0, 2 * MiB, 32 * MiB]
    assert list(b.bits.dirty_extents()) == [(0, CLUSTER)]
    assert s.node.bitmaps == [b, a]  # newest first, as QEMU lists them


def test_truncate_resizes_bitmaps(open_stack: OpenStack) -> None:
    """Spec 5.7 (``test_growing_before_backup``): bitmap added, disk grown 64M -> 65M,
    ``write 64M 64k`` dirties granule 1024. Shrinking drops the bits past the new end."""
    s = open_stack()
    bitmap = add_bitmap(s.node, "bitmap0", granularity=CLUSTER)
    s.node.truncate(65 * MiB)
    assert bitmap.size == 65 * MiB
    s.node.pwrite(64 * MiB, b"\xcd" * CLUSTER)
    assert list(bitmap.bits.dirty_extents()) == [(64 * MiB, CLUSTER)]
    assert bitmap.count() == CLUSTER
    s.node.truncate(32 * MiB, shrink=True)
    assert bitmap.size == 32 * MiB and bitmap.count() == 0


def test_references_keep_the_node_open(open_stack: OpenStack) -> None:
    """The creator's reference plus one retain: the first close keeps the node (and the file
    below) open; the last close closes the driver and its children; closing again is a
    no-op."""
    s = open_stack()
    file_node = s.blkdebug.image
    s.node.retain()
    assert s.node.refs == 2
    s.node.close()
    assert not s.node.closed and s.node.pread(0, 512) == b"\x41" * 512
    s.node.close()
    assert s.node.closed and s.node.refs == 0
    assert s.node.driver.closed and s.link.closed and file_node.closed
    s.node.close()
    assert s.node.refs == 0


def test_node_reports_its_driver(open_stack: OpenStack, image: Path) -> None:
    """A node forwards geometry and naming to its driver: ``drv`` is the driver's name."""
    s = open_stack()
    below = s.blkdebug.image
    assert isinstance(below, BlockNode)
    assert (s.node.drv, s.link.drv, below.drv) == ("qcow2", "blkdebug", "file")
    assert s.node.length() == DISK and s.node.cluster_size == CLUSTER
    assert s.node.filename == s.link.filename == str(image)
    assert [role for role, _ in s.link.children()] == ["image"]


def test_node_errors_are_bitback_errors(open_stack: OpenStack) -> None:
    """Out-of-range requests fail with IOFailedError (EIO), a BitbackError like every other
    failure of the node layer."""
    s = open_stack()
    with pytest.raises(BitbackError) as info:
        s.node.pread(DISK - 256, 512)
    assert isinstance(info.value, IOFailedError) and info.value.errno == errno.EIO
