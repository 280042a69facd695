"""BlockGraph (options -> nodes, lookup, blockdev-del, close_all) and the dirty-bitmap
operations of :mod:`bitback.block.dirty_bitmaps`, in process, over real image files.

Messages are QEMU 7.2's, as the probe of a real ``qemu-system-x86_64`` recorded them
(``blockdev-add`` / ``blockdev-del`` / ``block-dirty-bitmap-*`` replies); where a test says
"7.2 says", that is the reply text. Options are the already-validated dictionaries the QMP
layer hands to :meth:`BlockGraph.add_blockdev`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bitback.bitmaps import BitmapBusyError, DirtyBitmap, GranularityError
from bitback.block.dirty_bitmaps import (
    add_bitmap,
    clear_bitmap,
    find_bitmap,
    merge_bitmaps,
    remove_bitmap,
    set_bitmap_enabled,
)
from bitback.block.drivers.blkdebug import BlkdebugDriver
from bitback.block.drivers.qcow2.create import create_qcow2
from bitback.block.graph import BlockBackend, BlockGraph, GraphError, check_node_name
from bitback.block.node import BlockNode
from bitback.errors import (
    BitbackError,
    ImageFormatError,
    InvalidArgumentError,
    IOFailedError,
    NotFoundError,
    ReadOnlyError,
    UnsupportedFeatureError,
)
from helpers.procs import run

KiB = 1 << 10
MiB = 1 << 20
CLUSTER = 64 * KiB
DISK = 64 * MiB


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def file_opts(path: Path | str, **extra: Any) -> dict[str, Any]:
    return {"driver": "file", "filename": str(path), **extra}


def qcow2_opts(path: Path | str, name: str | None = "n", **extra: Any) -> dict[str, Any]:
    opts: dict[str, Any] = {"driver": "qcow2", "file": file_opts(path), **extra}
    if name is not None:
        opts["node-name"] = name
    return opts


def make_qcow2(path: Path, size: int = DISK, **kwargs: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    create_qcow2(str(path), size, **kwargs)
    return path


def fill(path: Path, offset: int, pattern: int, length: int = CLUSTER) -> None:
    """Write whole clusters into ``path`` alone (its backing file, if any, is not opened)."""
    graph = BlockGraph()
    node = graph.add_blockdev(qcow2_opts(path, "fill", backing=None))
    node.pwrite(offset, bytes([pattern]) * length)
    assert graph.close_all() == []


@pytest.fixture
def graph() -> Iterator[BlockGraph]:
    """An empty graph, closed at teardown."""
    g = BlockGraph()
    yield g
    g.close_all()


@pytest.fixture
def img(tmp_path: Path) -> Path:
    """An empty 64 MiB qcow2 image."""
    return make_qcow2(tmp_path / "img.qcow2")


def add_drive(graph: BlockGraph, path: Path, device: str = "drive0") -> BlockNode:
    """What ``-drive id=DEVICE,file=PATH,format=qcow2`` builds: auto-named nodes not owned
    by the monitor, under a named backend."""
    opts = qcow2_opts(path, None)
    root = graph.add_blockdev(opts, monitor_owned=False)
    graph.add_backend(BlockBackend(device, root))
    return root


# --------------------------------------------------------------------------- lookup


def test_lookup_tries_the_device_name_first(graph: BlockGraph, img: Path, tmp_path: Path) -> None:
    """``bdrv_lookup_bs``: a device name resolves to its backend's root node and wins over a
    node name given alongside; an unknown device falls through to the node name."""
    root = add_drive(graph, img)
    other = graph.add_blockdev(qcow2_opts(make_qcow2(tmp_path / "b.qcow2"), "n1"))
    assert root.auto_named and root.node_name.startswith("#block")
    assert graph.lookup("drive0", None) is root
    assert graph.lookup("drive0", "n1") is root
    assert graph.lookup("nosuch", "n1") is other
    assert graph.lookup(None, root.node_name) is root
    assert graph.lookup_name("drive0") is root
    assert graph.lookup_name("n1") is other
    assert graph.lookup_name(root.node_name) is root


def test_anonymous_backends_are_not_found_by_an_empty_name(graph: BlockGraph) -> None:
    """A backend without a name (``device_add`` on a bare node) is never a lookup match."""
    node = graph.add_blockdev({"node-name": "n1", "driver": "null-co"})
    graph.add_backend(BlockBackend("", node))
    assert graph.backend("") is None
    assert graph.lookup("", "n1") is node
    with pytest.raises(NotFoundError, match=r"^Cannot find device='' nor node-name=''$"):
        graph.lookup("", None)


@pytest.mark.parametrize(
    ("device", "node_name", "message"),
    [
        ("x", "y", "Cannot find device='x' nor node-name='y'"),
        (None, "nosuch", "Cannot find device='' nor node-name='nosuch'"),
        ("nosuch", None, "Cannot find device='nosuch' nor node-name=''"),
        (None, None, "Cannot find device='' nor node-name=''"),
    ],
)
def test_lookup_errors_use_qemus_text(
    graph: BlockGraph, device: str | None, node_name: str | None, message: str
) -> None:
    """7.2 says ``Cannot find device='X' nor node-name='Y'``, an absent name printed as
    empty (block_resize probe)."""
    with pytest.raises(NotFoundError) as info:
        graph.lookup(device, node_name)
    assert str(info.value) == message


def test_lookup_name_error_repeats_the_name(graph: BlockGraph) -> None:
    """The bitmap commands' ``node`` argument is tried as both: 7.2 says
    ``Cannot find device='nosuch' nor node-name='nosuch'``."""
    with pytest.raises(NotFoundError) as info:
        graph.lookup_name("nosuch")
    assert str(info.value) == "Cannot find device='nosuch' nor node-name='nosuch'"


# --------------------------------------------------------------------------- node names


@pytest.mark.parametrize("name", ["1abc", "a b", "#x", "", "-a", "_a", ".a", "a/b", "a\u00e9"])
def test_invalid_node_names_are_refused(graph: BlockGraph, name: str) -> None:
    """A node name starts with a letter and holds letters, digits, ``-``, ``.`` and ``_``
    (``id_wellformed``); 7.2 says ``Invalid node-name: '1abc'``."""
    with pytest.raises(GraphError) as info:
        graph.add_blockdev({"node-name": name, "driver": "null-co"})
    assert str(info.value) == f"Invalid node-name: '{name}'"
    assert graph.nodes == {}


@pytest.mark.parametrize("name", ["a", "A9", "a-b.c_d", "x" * 31])
def test_valid_node_names_are_accepted(graph: BlockGraph, name: str) -> None:
    """Up to 31 characters (7.2 accepted 31 ``a``s)."""
    node = graph.add_blockdev({"node-name": name, "driver": "null-co"})
    assert graph.nodes[name] is node and not node.auto_named
    check_node_name(name)


@pytest.mark.parametrize("length", [32, 40])
def test_node_names_of_32_characters_or_more_are_too_long(graph: BlockGraph, length: int) -> None:
    """7.2 says ``Node name too long`` for 32 and 40 characters."""
    with pytest.raises(GraphError) as info:
        graph.add_blockdev({"node-name": "a" * length, "driver": "null-co"})
    assert str(info.value) == "Node name too long"


def test_child_node_names_are_checked_too(graph: BlockGraph, img: Path) -> None:
    """Names given to children in the same options are validated like the root's, and a
    refused child leaves nothing behind."""
    with pytest.raises(GraphError, match=r"^Invalid node-name: '1bad'$"):
        graph.add_blockdev(qcow2_opts(img, "ok", file=file_opts(img, **{"node-name": "1bad"})))
    assert graph.nodes == {}


def test_duplicate_node_names_are_refused(graph: BlockGraph, img: Path) -> None:
    """7.2 says ``Duplicate nodes with node-name='drive1'``; the first node is untouched."""
    first = graph.add_blockdev(qcow2_opts(img, "x"))
    with pytest.raises(GraphError) as info:
        graph.add_blockdev({"node-name": "x", "driver": "null-co"})
    assert str(info.value) == "Duplicate nodes with node-name='x'"
    assert graph.nodes["x"] is first and not first.closed


def test_duplicate_sibling_names_in_one_tree_are_refused(
    graph: BlockGraph, img: Path, tmp_path: Path
) -> None:
    """Two children of one ``blockdev-add`` with the same name: the second is refused and
    the whole add is undone. The second one is in the backing subtree, so QEMU's
    ``Could not open backing file: `` prefix comes first."""
    other = make_qcow2(tmp_path / "other.qcow2")
    opts = qcow2_opts(
        img,
        "top",
        file=file_opts(img, **{"node-name": "f"}),
        backing=qcow2_opts(other, None, file=file_opts(other, **{"node-name": "f"})),
    )
    with pytest.raises(
        GraphError, match=r"^Could not open backing file: Duplicate nodes with node-name='f'$"
    ):
        graph.add_blockdev(opts)
    assert graph.nodes == {}


def test_a_parent_named_like_its_child_is_refused(graph: BlockGraph, img: Path) -> None:
    """``{"node-name": "x", "file": {"node-name": "x", ...}}`` fails as a duplicate and
    leaves no node and no open file behind."""
    before = open_fds()
    with pytest.raises(GraphError, match=r"^Duplicate nodes with node-name='x'$"):
        graph.add_blockdev(qcow2_opts(img, "x", file=file_opts(img, **{"node-name": "x"})))
    assert graph.nodes == {}
    assert open_fds() == before


def test_node_name_equal_to_a_device_name_is_refused(graph: BlockGraph, img: Path) -> None:
    """7.2 says ``node-name=drive0 is conflicting with a device id``."""
    add_drive(graph, img)
    with pytest.raises(GraphError) as info:
        graph.add_blockdev({"node-name": "drive0", "driver": "null-co"})
    assert str(info.value) == "node-name=drive0 is conflicting with a device id"


# --------------------------------------------------------------------------- references


def test_child_by_reference_is_shared_and_blocks_its_deletion(graph: BlockGraph, img: Path) -> None:
    """``"file": "file4"`` makes an existing node the child (one more reference); while the
    parent lives, blockdev-del of the child is refused and changes nothing; after the parent
    is deleted the child stays open (its own reference) until deleted itself (7.2 probe,
    Case 4)."""
    before = open_fds()
    file4 = graph.add_blockdev(file_opts(img, **{"node-name": "file4"}))
    fmt4 = graph.add_blockdev({"node-name": "fmt4", "driver": "qcow2", "file": "file4"})
    assert fmt4.children() == [("file", file4)]
    assert file4.refs == 2
    assert graph.parents_of(file4) == ["fmt4"]
    with pytest.raises(GraphError, match="in use"):
        graph.delete_blockdev("file4")
    assert graph.nodes["file4"] is file4 and not file4.closed
    fmt4.pwrite(0, b"\x5a" * 512)
    graph.delete_blockdev("fmt4")
    assert fmt4.closed and "fmt4" not in graph.nodes
    assert not file4.closed and file4.refs == 1
    graph.delete_blockdev("file4")
    assert file4.closed and graph.nodes == {}
    assert open_fds() == before


def test_deleting_a_referenced_node_uses_qemus_text(graph: BlockGraph, img: Path) -> None:
    """7.2: ``blockdev-del file4`` while ``fmt4`` uses it as ``file`` ->
    ``Block device file4 is in use``."""
    graph.add_blockdev(file_opts(img, **{"node-name": "file4"}))
    graph.add_blockdev({"node-name": "fmt4", "driver": "qcow2", "file": "file4"})
    with pytest.raises(GraphError) as info:
        graph.delete_blockdev("file4")
    assert str(info.value) == "Block device file4 is in use"


# --------------------------------------------------------------------------- blockdev-del


def test_delete_unknown_or_device_names(graph: BlockGraph, img: Path) -> None:
    """blockdev-del takes node names only: 7.2 says
    ``Failed to find node with node-name='nosuch'`` and the same for a device name."""
    add_drive(graph, img)
    for name in ("nosuch", "drive0"):
        with pytest.raises(NotFoundError) as info:
            graph.delete_blockdev(name)
        assert str(info.value) == f"Failed to find node with node-name='{name}'"


def test_delete_refuses_nodes_the_monitor_does_not_own(graph: BlockGraph, img: Path) -> None:
    """Children created inside a blockdev-add, and a ``-drive``'s file node, are not the
    monitor's: 7.2 says ``Node #block064 is not owned by the monitor``."""
    top = graph.add_blockdev(
        {"node-name": "d1", "driver": "qcow2",
         "file": {"driver": "blkdebug", "image": file_opts(img)}}
    )  # fmt: skip
    root = add_drive(graph, make_qcow2(img.with_name("drive0.qcow2")))
    inner = [n for n in graph.nodes.values() if n is not top and n is not root]
    assert len(inner) == 3  # blkdebug + file of d1, file of drive0
    for node in inner:
        with pytest.raises(GraphError) as info:
            graph.delete_blockdev(node.node_name)
        assert str(info.value) == f"Node {node.node_name} is not owned by the monitor"
        assert not node.closed


def test_delete_refuses_a_node_attached_to_a_device(graph: BlockGraph, img: Path) -> None:
    """A blockdev-add'ed node under a backend (``device_add drive=drive1``): 7.2 says
    ``Node drive1 is in use``."""
    node = graph.add_blockdev(qcow2_opts(img, "drive1"))
    graph.add_backend(BlockBackend("", node, qdev="/machine/peripheral/device1"))
    with pytest.raises(GraphError) as info:
        graph.delete_blockdev("drive1")
    assert str(info.value) == "Node drive1 is in use"
    assert not node.closed


def test_delete_of_a_drive_root_says_in_use(graph: BlockGraph, img: Path) -> None:
    """7.2: ``blockdev-del`` of a ``-drive``'s qcow2 node -> ``Node #block197 is in use``."""
    root = add_drive(graph, img)
    with pytest.raises(GraphError) as info:
        graph.delete_blockdev(root.node_name)
    assert str(info.value) == f"Node {root.node_name} is in use"


def test_delete_closes_the_whole_tree(graph: BlockGraph, img: Path) -> None:
    """blockdev-del of a qcow2-over-blkdebug-over-file tree closes and forgets all three
    nodes and the file descriptor."""
    before = open_fds()
    node = graph.add_blockdev(
        {"node-name": "drive1", "driver": "qcow2",
         "file": {"driver": "blkdebug", "image": file_opts(img)}}
    )  # fmt: skip
    assert len(graph.nodes) == 3 and open_fds() == before + 1
    link = node.children()[0][1]
    assert isinstance(link, BlockNode) and isinstance(link.driver, BlkdebugDriver)
    graph.delete_blockdev("drive1")
    assert graph.nodes == {} and graph.monitor_owned == {}
    assert node.closed and link.closed
    assert open_fds() == before


# --------------------------------------------------------------------------- backing chains


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    """top.qcow2 -> sub/mid.qcow2 -> base.qcow2, every backing name relative to the image
    naming it (``sub/mid.qcow2`` in top, ``../base.qcow2`` in mid). Data: 0x11 at 0 in base,
    0x22 at 1M in mid, 0x33 at 2M in top."""
    base = make_qcow2(tmp_path / "base.qcow2")
    mid = make_qcow2(
        tmp_path / "sub" / "mid.qcow2", backing_file="../base.qcow2", backing_fmt="qcow2"
    )
    top = make_qcow2(tmp_path / "top.qcow2", backing_file="sub/mid.qcow2", backing_fmt="qcow2")
    fill(base, 0, 0x11)
    fill(mid, 1 * MiB, 0x22)
    fill(top, 2 * MiB, 0x33)
    return top


def test_backing_chain_from_the_header_opens_every_level(graph: BlockGraph, chain: Path) -> None:
    """A qcow2 node opens the backing chain its header names: a format node and a file node
    per level, auto-named, read-only below the top, relative names resolved against the
    directory of the image naming them."""
    top = graph.add_blockdev(qcow2_opts(chain, "top"))
    assert len(graph.nodes) == 6
    formats = {os.path.realpath(n.filename): n for n in graph.nodes.values() if n.drv == "qcow2"}
    files = {os.path.realpath(n.filename): n for n in graph.nodes.values() if n.drv == "file"}
    names = {os.path.realpath(chain.parent / p) for p in
             ("top.qcow2", "sub/mid.qcow2", "base.qcow2")}  # fmt: skip
    assert set(formats) == set(files) == names
    real_top = os.path.realpath(chain)
    assert formats[real_top] is top and not top.read_only
    assert not files[real_top].read_only
    for path in names - {real_top}:
        assert formats[path].read_only and files[path].read_only
        assert formats[path].auto_named and formats[path].node_name.startswith("#block")
        with pytest.raises(ReadOnlyError):
            formats[path].pwrite(0, b"x")
    assert top.pread(2 * MiB, 512) == b"\x33" * 512


def test_backing_chain_from_the_header_is_linked_and_read_through(
    graph: BlockGraph, chain: Path
) -> None:
    """Reads fall through top -> mid -> base; blockdev-del of the top closes the chain."""
    before = open_fds()
    top = graph.add_blockdev(qcow2_opts(chain, "top"))
    mid = top.backing
    assert isinstance(mid, BlockNode) and mid.filename.endswith("mid.qcow2")
    assert isinstance(mid.backing, BlockNode) and mid.backing.filename.endswith("base.qcow2")
    assert graph.parents_of(mid) == ["top"]
    assert top.pread(0, 512) == b"\x11" * 512
    assert top.pread(1 * MiB, 512) == b"\x22" * 512
    assert top.pread(2 * MiB, 512) == b"\x33" * 512
    assert top.pread(3 * MiB, 512) == bytes(512)
    graph.delete_blockdev("top")
    assert graph.nodes == {} and open_fds() == before


def test_backing_by_reference(graph: BlockGraph, chain: Path, tmp_path: Path) -> None:
    """``"backing": "base"`` makes an existing node the backing file; deleting the base is
    then refused."""
    base = graph.add_blockdev(qcow2_opts(tmp_path / "base.qcow2", "base"))
    top = graph.add_blockdev(qcow2_opts(tmp_path / "sub" / "mid.qcow2", "mid", backing="base"))
    assert base.refs == 2
    assert top.backing is base
    assert top.pread(0, 512) == b"\x11" * 512
    with pytest.raises(GraphError):
        graph.delete_blockdev("base")


def test_backing_null_opens_no_backing(graph: BlockGraph, chain: Path) -> None:
    """``"backing": null`` (7.2 accepts it): the header's backing file is not opened, and
    unallocated clusters read as zeros although the backing file has data there."""
    before = open_fds()
    top = graph.add_blockdev(qcow2_opts(chain, "top", backing=None))
    assert len(graph.nodes) == 2 and open_fds() == before + 1
    assert top.backing is None
    assert top.pread(0, 512) == bytes(512)
    assert top.pread(1 * MiB, 512) == bytes(512)
    assert top.pread(2 * MiB, 512) == b"\x33" * 512


# --------------------------------------------------------------------------- null-co


def test_null_co(graph: BlockGraph) -> None:
    """null-co: 1 GiB unless ``size`` says otherwise; reads zeros, drops writes, has no
    cluster size (bitmaps default to 64 KiB granularity) and no file."""
    default = graph.add_blockdev({"node-name": "null0", "driver": "null-co"})
    sized = graph.add_blockdev({"node-name": "null1", "driver": "null-co", "size": MiB})
    assert default.length() == 1 << 30 and sized.length() == MiB
    assert (sized.drv, sized.filename, sized.cluster_size) == ("null-co", "null-co://", None)
    sized.pwrite(0, b"\xff" * 4096)
    assert sized.pread(0, 4096) == bytes(4096)
    assert sized.block_status(0, MiB).length == MiB
    assert add_bitmap(sized, "b").granularity == 65536
    with pytest.raises(IOFailedError):
        sized.pread(MiB - 512, 1024)
    zeroes = graph.add_blockdev({"node-name": "null2", "driver": "null-co", "read-zeroes": True})
    assert zeroes.block_status(0, 4096).zero
    graph.delete_blockdev("null0")
    assert default.closed and "null0" not in graph.nodes


# --------------------------------------------------------------------------- failure cleanup


def _raw(tmp_path: Path) -> Path:
    path = tmp_path / "plain.raw"
    path.write_bytes(bytes(MiB))
    return path


FAILING_ADDS: dict[str, tuple[Callable[[Path], dict[str, Any]], type[BitbackError]]] = {
    "missing file": (lambda d: qcow2_opts(d / "nosuch.qcow2", "t"), NotFoundError),
    "not qcow2": (lambda d: qcow2_opts(_raw(d), "t"), ImageFormatError),
    "not qcow2 under blkdebug": (
        lambda d: {"node-name": "t", "driver": "qcow2",
                   "file": {"driver": "blkdebug", "image": file_opts(_raw(d))}},
        ImageFormatError,
    ),
    "missing backing file": (
        lambda d: qcow2_opts(
            make_qcow2(d / "t.qcow2", backing_file="gone.qcow2", backing_fmt="qcow2"), "t"
        ),
        BitbackError,
    ),
    "missing file deep in the chain": (
        lambda d: qcow2_opts(
            make_qcow2(
                d / "t.qcow2",
                backing_file=str(make_qcow2(d / "m.qcow2", backing_file="gone.qcow2",
                                            backing_fmt="qcow2")),
                backing_fmt="qcow2",
            ),
            "t",
        ),
        BitbackError,
    ),
    "unknown backing reference": (
        lambda d: qcow2_opts(make_qcow2(d / "t.qcow2"), "t", backing="nosuch"), NotFoundError
    ),
    "unknown reference after a shared child": (
        lambda d: {"node-name": "t", "driver": "qcow2", "file": "shared", "backing": "nosuch"},
        NotFoundError,
    ),
    "bad name deep in the tree": (
        lambda d: qcow2_opts(
            make_qcow2(d / "t.qcow2"), "t",
            backing=qcow2_opts(make_qcow2(d / "b.qcow2"), "9lives"),
        ),
        GraphError,
    ),
    "unsupported blkdebug option": (
        lambda d: {"node-name": "t", "driver": "raw",
                   "file": {"driver": "blkdebug", "image": file_opts(_raw(d)), "align": 4096}},
        UnsupportedFeatureError,
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(FAILING_ADDS))
def test_a_failing_add_leaves_nothing_behind(
    graph: BlockGraph, tmp_path: Path, img: Path, case: str
) -> None:
    """All or nothing: after a failed blockdev-add the graph holds exactly the nodes it held
    before, a node shared by reference is back to one reference, and every file descriptor
    the add opened is closed again."""
    build, error = FAILING_ADDS[case]
    shared = graph.add_blockdev(file_opts(img, **{"node-name": "shared"}))
    opts = build(tmp_path)
    names, fds = set(graph.nodes), open_fds()
    with pytest.raises(error):
        graph.add_blockdev(opts)
    assert set(graph.nodes) == names
    assert set(graph.monitor_owned) == {"shared"}
    assert shared.refs == 1 and not shared.closed
    assert open_fds() == fds


@pytest.mark.parametrize(
    ("case", "message"),
    [
        (
            "missing backing file",
            "Could not open backing file: Could not open '{d}/gone.qcow2': "
            "No such file or directory",
        ),
        (
            "unknown backing reference",
            "Could not open backing file: Cannot find device='nosuch' nor node-name='nosuch'",
        ),
    ],
)
def test_backing_open_errors_use_qemus_text(
    graph: BlockGraph, tmp_path: Path, case: str, message: str
) -> None:
    """7.2 replies to blockdev-add of an overlay whose backing cannot be opened."""
    with pytest.raises(BitbackError) as info:
        graph.add_blockdev(FAILING_ADDS[case][0](tmp_path))
    assert str(info.value) == message.format(d=tmp_path)


def test_unknown_file_reference_uses_qemus_text(graph: BlockGraph) -> None:
    """7.2: ``"file": "nosuch-node-ref"`` ->
    ``Cannot find device='nosuch-node-ref' nor node-name='nosuch-node-ref'``."""
    with pytest.raises(NotFoundError) as info:
        graph.add_blockdev({"node-name": "nr", "driver": "qcow2", "file": "nosuch-node-ref"})
    assert str(info.value) == (
        "Cannot find device='nosuch-node-ref' nor node-name='nosuch-node-ref'"
    )


# --------------------------------------------------------------------------- close_all


def test_close_all_flushes_and_closes_everything(
    graph: BlockGraph, tmp_path: Path, qemu_img: str
) -> None:
    """close_all (quit, SIGTERM) flushes every root through the node layer (blkdebug sees
    flush_to_disk), closes every node and file descriptor, and leaves images that reopen
    with the data written and that real ``qemu-img check`` finds clean."""
    a, b, c = (make_qcow2(tmp_path / f"{x}.qcow2") for x in "abc")
    before = open_fds()
    na = graph.add_blockdev(qcow2_opts(a, "a"))
    nb = graph.add_blockdev(
        {"node-name": "b", "driver": "qcow2",
         "file": {"driver": "blkdebug", "image": file_opts(b),
                  "set-state": [{"event": "flush_to_disk", "state": 1, "new_state": 2}]}}
    )  # fmt: skip
    nc = add_drive(graph, c)
    add_bitmap(nc, "bitmap0")
    for i, node in enumerate((na, nb, nc)):
        node.pwrite(i * MiB, bytes([0xA0 + i]) * (CLUSTER + 512))  # allocating, unflushed
    blk = nb.children()[0][1]
    assert isinstance(blk, BlockNode) and isinstance(blk.driver, BlkdebugDriver)
    assert graph.close_all() == []
    assert blk.driver.state == 2
    assert graph.nodes == {} and graph.backends == [] and graph.monitor_owned == {}
    assert na.closed and nb.closed and nc.closed
    assert open_fds() == before
    for i, path in enumerate((a, b, c)):
        reopened = BlockGraph()
        node = reopened.add_blockdev(qcow2_opts(path, "r"))
        assert node.pread(i * MiB, CLUSTER + 512) == bytes([0xA0 + i]) * (CLUSTER + 512)
        assert node.pread(i * MiB + CLUSTER + 512, 512) == bytes(512)
        assert reopened.close_all() == []
        res = run([qemu_img, "check", str(path)])
        assert res.returncode == 0, res.stdout + res.stderr


def test_close_all_collects_failures_and_closes_the_rest(
    graph: BlockGraph, tmp_path: Path, qemu_img: str
) -> None:
    """A flush failing on one image (blkdebug fails its flush request) is returned, not
    raised; every other image is still flushed and closed, and nothing stays open."""
    bad, good = make_qcow2(tmp_path / "bad.qcow2"), make_qcow2(tmp_path / "good.qcow2")
    before = open_fds()
    nbad = graph.add_blockdev(
        {"node-name": "bad", "driver": "qcow2",
         "file": {"driver": "blkdebug", "image": file_opts(bad),
                  "inject-error": [{"event": "flush_to_disk", "iotype": "flush",
                                    "errno": 28, "once": True}]}}
    )  # fmt: skip
    ngood = graph.add_blockdev(qcow2_opts(good, "good"))
    nbad.pwrite(0, b"\x01" * CLUSTER)
    ngood.pwrite(0, b"\x02" * CLUSTER)
    failures = graph.close_all()
    assert len(failures) == 1
    assert isinstance(failures[0], IOFailedError) and failures[0].errno == 28
    assert nbad.closed and ngood.closed and graph.nodes == {}
    assert open_fds() == before
    res = run([qemu_img, "check", str(good)])
    assert res.returncode == 0, res.stdout + res.stderr
    reopened = BlockGraph()
    assert reopened.add_blockdev(qcow2_opts(good, "r")).pread(0, 512) == b"\x02" * 512
    reopened.close_all()


# --------------------------------------------------------------------------- dirty bitmaps


@pytest.mark.parametrize(
    ("cluster_size", "granularity"),
    [(512, 4096), (4096, 4096), (65536, 65536), (128 * KiB, 65536), (2 * MiB, 65536)],
)
def test_default_granularity_follows_the_cluster_size(
    graph: BlockGraph, tmp_path: Path, cluster_size: int, granularity: int
) -> None:
    """The node's cluster size clamped to [4k, 64k] (7.2 measured: 512 -> 4096,
    4k -> 4096, 64k -> 65536, 128k -> 65536, 2M -> 65536)."""
    path = make_qcow2(tmp_path / "c.qcow2", 4 * MiB, cluster_size=cluster_size)
    node = graph.add_blockdev(qcow2_opts(path))
    bitmap = add_bitmap(node, "b")
    assert bitmap.granularity == granularity
    assert bitmap.size == 4 * MiB and bitmap.count() == 0 and bitmap.recording


def test_default_granularity_without_a_cluster_size(graph: BlockGraph, tmp_path: Path) -> None:
    """raw and null-co have no cluster size: 64 KiB."""
    raw = graph.add_blockdev({"node-name": "r", "driver": "raw", "file": file_opts(_raw(tmp_path))})
    assert add_bitmap(raw, "b").granularity == 65536


def test_add_bitmap_options(graph: BlockGraph, img: Path, tmp_path: Path) -> None:
    """Explicit granularity; ``disabled`` creates a bitmap that does not record; the same
    name may live on two nodes; the newest bitmap is listed first."""
    node = graph.add_blockdev(qcow2_opts(img))
    other = graph.add_blockdev(qcow2_opts(make_qcow2(tmp_path / "o.qcow2"), "o"))
    a = add_bitmap(node, "a", granularity=512)
    b = add_bitmap(node, "b", granularity=1 << 31, disabled=True)
    assert (a.granularity, b.granularity) == (512, 1 << 31)
    assert not b.enabled and not b.recording
    node.pwrite(0, b"x")
    assert a.count() == 512 and b.count() == 0
    assert add_bitmap(other, "a") is not a
    assert node.bitmaps == [b, a]


@pytest.mark.parametrize("granularity", [0, 256, 64000, 1 << 32])
def test_bad_granularity_is_refused(graph: BlockGraph, granularity: int) -> None:
    """7.2 says ``Granularity must be power of 2 and at least 512``."""
    node = graph.add_blockdev({"node-name": "n", "driver": "null-co"})
    with pytest.raises(GranularityError) as info:
        add_bitmap(node, "b", granularity=granularity)
    assert str(info.value) == "Granularity must be power of 2 and at least 512"
    assert node.bitmaps == []


def test_bitmap_name_rules(graph: BlockGraph) -> None:
    """Names: non-empty, at most 1023 *bytes* (BDRV_BITMAP_MAX_NAME_SIZE), unique per node;
    QEMU's texts."""
    node = graph.add_blockdev({"node-name": "n", "driver": "null-co"})
    with pytest.raises(InvalidArgumentError) as info:
        add_bitmap(node, "")
    assert str(info.value) == "Bitmap name cannot be empty"
    for name in ("x" * 1024, "\u00e9" * 512):  # 1024 bytes either way
        with pytest.raises(InvalidArgumentError) as info:
            add_bitmap(node, name)
        assert str(info.value) == f"Bitmap name too long: {name}"
    add_bitmap(node, "x" * 1023)
    add_bitmap(node, "\u00e9" * 511 + "x")  # 1023 bytes
    add_bitmap(node, "b")
    with pytest.raises(InvalidArgumentError) as info:
        add_bitmap(node, "b")
    assert str(info.value) == "Bitmap already exists: b"
    assert len(node.bitmaps) == 3


def test_granularity_is_checked_before_the_name(graph: BlockGraph) -> None:
    """7.2: ``add b`` twice, the second with granularity 1000 -> the granularity error."""
    node = graph.add_blockdev({"node-name": "n", "driver": "null-co"})
    add_bitmap(node, "b")
    with pytest.raises(GranularityError):
        add_bitmap(node, "b", granularity=1000)


def test_persistent_bitmaps_outlive_the_node(graph: BlockGraph, img: Path) -> None:
    """A persistent bitmap is stored when its node closes and comes back, bits and all, with
    the next open; while the node is open the image says it is in use."""
    node = graph.add_blockdev(qcow2_opts(img))
    bitmap = add_bitmap(node, "p", persistent=True, granularity=128 * 1024, label="drive0")
    add_bitmap(node, "off", persistent=True, disabled=True)
    node.pwrite(3 << 20, b"x" * 4096)
    expected = bitmap.bits.copy()
    graph.delete_blockdev("n")
    node = graph.add_blockdev(qcow2_opts(img))
    loaded = node.bitmap("p")
    assert loaded is not None and loaded.persistent and not loaded.inconsistent
    assert loaded.granularity == 128 * 1024 and loaded.bits == expected
    off = node.bitmap("off")
    assert off is not None and not off.enabled and off.count() == 0
    store = node.driver.persistent  # type: ignore[attr-defined]
    assert all(e.in_use for e in store.entries)


def test_persistent_bitmaps_need_qcow2(graph: BlockGraph, img: Path) -> None:
    """Only a qcow2 node can store bitmaps: QEMU's text for the others, nothing added."""
    node = graph.add_blockdev({"node-name": "f", "driver": "file", "filename": str(img)})
    with pytest.raises(UnsupportedFeatureError) as info:
        add_bitmap(node, "p", persistent=True, label="f")
    assert str(info.value) == "Can't store persistent bitmaps to f: Operation not supported"
    assert node.bitmaps == []


def test_find_bitmap(graph: BlockGraph, img: Path, tmp_path: Path) -> None:
    """``node`` is a device or node name; 7.2 says ``Node 'x' not found`` and
    ``Dirty bitmap 'x' not found``."""
    root = add_drive(graph, img)
    bitmap = add_bitmap(root, "bitmap0")
    assert find_bitmap(graph, "drive0", "bitmap0") == (root, bitmap)
    assert find_bitmap(graph, root.node_name, "bitmap0") == (root, bitmap)
    with pytest.raises(NotFoundError) as info:
        find_bitmap(graph, "nosuch", "bitmap0")
    assert str(info.value) == "Node 'nosuch' not found"
    with pytest.raises(NotFoundError) as info:
        find_bitmap(graph, "drive0", "nosuch")
    assert str(info.value) == "Dirty bitmap 'nosuch' not found"


@pytest.fixture
def bitmaps(graph: BlockGraph) -> tuple[BlockNode, DirtyBitmap, DirtyBitmap]:
    """A null-co node with bitmaps ``x`` (granule 0 dirty) and ``y`` (granule 1 dirty)."""
    node = graph.add_blockdev({"node-name": "n", "driver": "null-co", "size": MiB})
    x = add_bitmap(node, "x", granularity=CLUSTER)
    y = add_bitmap(node, "y", granularity=CLUSTER)
    x.bits.set_range(0, 1)
    y.bits.set_range(CLUSTER, 1)
    y.enabled = False
    return node, x, y


BUSY = "Bitmap 'x' is currently in use by another operation and cannot be used"

BUSY_OPS: dict[str, Callable[[BlockNode, DirtyBitmap, DirtyBitmap], object]] = {
    "clear": lambda node, x, y: clear_bitmap(x),
    "enable": lambda node, x, y: set_bitmap_enabled(x, True),
    "disable": lambda node, x, y: set_bitmap_enabled(x, False),
    "remove": lambda node, x, y: remove_bitmap(node, x),
    "merge into": lambda node, x, y: merge_bitmaps(x, [y]),
    "merge from": lambda node, x, y: merge_bitmaps(y, [x]),
}


@pytest.mark.parametrize("op", list(BUSY_OPS))
def test_busy_bitmaps_are_refused(
    bitmaps: tuple[BlockNode, DirtyBitmap, DirtyBitmap], op: str
) -> None:
    """A bitmap in use by a job refuses clear, enable, disable, remove and merges (as target
    or source), with QEMU's text, and nothing changes."""
    node, x, y = bitmaps
    x.busy = True
    before = (x.bits.copy(), y.bits.copy(), x.enabled, y.enabled, list(node.bitmaps))
    with pytest.raises(BitmapBusyError) as info:
        BUSY_OPS[op](node, x, y)
    assert str(info.value) == BUSY
    assert (x.bits, y.bits, x.enabled, y.enabled, node.bitmaps) == before


def test_clear_enable_disable_remove(bitmaps: tuple[BlockNode, DirtyBitmap, DirtyBitmap]) -> None:
    """clear returns the old bits (for a transaction's undo); enable/disable return the old
    state; remove detaches."""
    node, x, y = bitmaps
    old = clear_bitmap(x)
    assert x.count() == 0 and old.count() == CLUSTER
    assert set_bitmap_enabled(y, True) is False and y.enabled
    assert set_bitmap_enabled(y, False) is True and not y.enabled
    remove_bitmap(node, x)
    assert node.bitmaps == [y] and node.bitmap("x") is None


def test_read_only_and_inconsistent_bitmaps(
    bitmaps: tuple[BlockNode, DirtyBitmap, DirtyBitmap],
) -> None:
    """A read-only bitmap may be toggled but not cleared or removed; an inconsistent one may
    only be removed (QEMU's BDRV_BITMAP_ALLOW_RO / BUSY|RO checks)."""
    node, x, y = bitmaps
    x.readonly = True
    with pytest.raises(InvalidArgumentError, match=r"^Bitmap 'x' is readonly and cannot be"):
        clear_bitmap(x)
    with pytest.raises(InvalidArgumentError, match="readonly"):
        remove_bitmap(node, x)
    set_bitmap_enabled(x, False)
    x.readonly = False
    y.mark_inconsistent()
    with pytest.raises(InvalidArgumentError, match=r"^Bitmap 'y' is inconsistent and cannot"):
        clear_bitmap(y)
    remove_bitmap(node, y)
    assert node.bitmaps == [x]


def test_merge_ors_sources_and_returns_the_old_bits(
    bitmaps: tuple[BlockNode, DirtyBitmap, DirtyBitmap],
) -> None:
    """Merge ORs every source into the target (itself included, harmlessly); sources of
    another granularity are merged by byte range."""
    node, x, y = bitmaps
    fine = add_bitmap(node, "fine", granularity=4096)
    fine.bits.set_range(5 * CLUSTER + 8192, 1)
    old = merge_bitmaps(x, [y, x, fine])
    assert old.count() == CLUSTER
    assert [s for s, _ in x.bits.dirty_extents()] == [0, 5 * CLUSTER]
    assert next(x.bits.dirty_extents()) == (0, 2 * CLUSTER)
    assert y.count() == CLUSTER  # sources unchanged


def test_merge_is_all_or_nothing(
    bitmaps: tuple[BlockNode, DirtyBitmap, DirtyBitmap], graph: BlockGraph
) -> None:
    """Every source is checked before the target changes: a busy last source, or one of
    another size (from another node), leaves the target as it was. 7.2's size text."""
    node, x, y = bitmaps
    busy = add_bitmap(node, "busy", granularity=CLUSTER)
    busy.bits.set_all()
    busy.busy = True
    with pytest.raises(BitmapBusyError):
        merge_bitmaps(x, [y, busy])
    assert list(x.bits.dirty_extents()) == [(0, CLUSTER)]
    big = graph.add_blockdev({"node-name": "big", "driver": "null-co", "size": 2 * MiB})
    other = add_bitmap(big, "o", granularity=CLUSTER)
    with pytest.raises(InvalidArgumentError) as info:
        merge_bitmaps(x, [y, other])
    assert str(info.value) == (
        f"Bitmaps are of different sizes (destination size is {MiB}, source size is "
        f"{2 * MiB}) and can't be merged"
    )
    assert list(x.bits.dirty_extents()) == [(0, CLUSTER)]


def test_block_status_through_a_node_sees_the_format(graph: BlockGraph, tmp_path: Path,
                                                      qemu_img: str) -> None:
    """Format-specific block status (metadata preallocation: holes in data clusters read as
    zero, as qemu-img map shows) is the same through a graph node as on the bare driver."""
    from bitback.block.chain import node_status
    from bitback.block.open import open_image

    path = tmp_path / "prealloc.qcow2"
    run([qemu_img, "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", str(path),
         "4M"], check=True)
    node = graph.add_blockdev(qcow2_opts(path))
    with open_image(str(path), "qcow2", read_only=True) as bare:
        want = node_status(bare, 0, 4 << 20)
    got = node_status(node, 0, 4 << 20)
    assert (got.zero, got.data, got.length) == (want.zero, want.data, want.length)
    assert got.zero and got.data  # QEMU's map: "zero": true, "data": true
