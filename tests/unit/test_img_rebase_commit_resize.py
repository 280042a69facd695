"""bitback-img rebase, commit and resize: the guest's view is kept (or changed as asked)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bitback.block.chain import iter_map, open_chain, read
from bitback.block.open import open_image
from bitback.tools.img.rebase import differing_runs
from helpers.imgrun import Img, qcow2

MiB = 1 << 20
CS = 65536




def guest(path: Path) -> bytes:
    with open_chain(str(path)) as node:
        return read(node, 0, node.length())


def backing_name(path: Path) -> str | None:
    with open_image(str(path), backing=False) as node:
        name: str | None = getattr(node, "header").backing_file  # noqa: B009
        return name


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """old.qcow2, new.qcow2 (different content) and top.qcow2 over old.qcow2 (4 MiB each)."""
    qcow2(tmp_path / "old.qcow2", 4 * MiB, (0, b"\x01" * (2 * MiB)))
    qcow2(tmp_path / "new.qcow2", 4 * MiB, (0, b"\x01" * MiB), (3 * MiB, b"\x05" * CS))
    qcow2(tmp_path / "top.qcow2", 4 * MiB, (CS, b"\x02" * CS), backing="old.qcow2")
    return tmp_path


def test_differing_runs() -> None:
    a, b = bytearray(4096), bytearray(4096)
    assert differing_runs(a, b, 4096) == []
    b[0] = b[1500] = b[4095] = 1
    assert differing_runs(a, b, 4096) == [(0, 512), (1024, 512), (3584, 512)]
    assert differing_runs(a, b, 1000) == [(0, 512)]


def test_safe_rebase_keeps_guest_view(img: Img, images: Path) -> None:
    before = guest(images / "top.qcow2")
    assert img("rebase", "-b", "new.qcow2", "-F", "qcow2", "top.qcow2") == (0, "", "")
    assert backing_name(images / "top.qcow2") == "new.qcow2"
    assert guest(images / "top.qcow2") == before
    assert img("compare", "-q", "top.qcow2", "old.qcow2")[0] == 1  # top's own cluster differs


def test_rebase_onto_nothing_flattens(img: Img, images: Path) -> None:
    before = guest(images / "top.qcow2")
    assert img("rebase", "-b", "", "top.qcow2") == (0, "", "")
    assert backing_name(images / "top.qcow2") is None
    assert guest(images / "top.qcow2") == before


def test_unsafe_rebase_rewrites_only_the_header(img: Img, images: Path) -> None:
    assert img("rebase", "-u", "-b", "gone.qcow2", "-F", "qcow2", "top.qcow2") == (0, "", "")
    assert backing_name(images / "top.qcow2") == "gone.qcow2"
    with open_chain(str(images / "top.qcow2"), backing=False) as node:
        assert [(e.start, e.length) for e in iter_map(node) if e.present] == [(CS, CS)]
    assert img("rebase", "-u", "top.qcow2") == (0, "", "")  # -u without -b drops the backing
    assert backing_name(images / "top.qcow2") is None


@pytest.mark.parametrize(
    ("args", "err"),
    [
        (
            ["top.qcow2"],
            "Must specify backing file (-b) or use unsafe mode (-u) "
            "(try 'bitback-img --help' for more information)",
        ),
        (
            ["-b", "new.qcow2", "top.qcow2"],
            "Could not change the backing file to 'new.qcow2': backing format must be specified",
        ),
        (
            ["-b", "gone.qcow2", "-F", "qcow2", "top.qcow2"],
            "Could not open new backing file 'gone.qcow2': Could not open 'gone.qcow2': "
            "No such file or directory",
        ),
        (["-u", "-b", "x", "-F", "foo", "top.qcow2"], "Invalid format name: 'foo'"),
    ],
)
def test_rebase_errors_leave_the_image_alone(
    img: Img, images: Path, args: list[str], err: str
) -> None:
    before = (images / "top.qcow2").read_bytes()
    rc, _, stderr = img("rebase", *args)
    assert (rc, stderr) == (1, f"bitback-img: {err}\n")
    assert (images / "top.qcow2").read_bytes() == before


def test_commit_writes_into_backing_and_empties(img: Img, images: Path) -> None:
    before = guest(images / "top.qcow2")
    assert img("commit", "top.qcow2") == (0, "Image committed.\n", "")
    assert guest(images / "old.qcow2") == before
    assert guest(images / "top.qcow2") == before
    with open_chain(str(images / "top.qcow2"), backing=False) as node:
        assert not any(e.present for e in iter_map(node))


def test_commit_drop_and_base(img: Img, images: Path) -> None:
    qcow2(images / "upper.qcow2", 4 * MiB, (3 * MiB, b"\x09" * 512), backing="top.qcow2")
    before = guest(images / "upper.qcow2")
    assert img("commit", "-b", "old.qcow2", "upper.qcow2") == (0, "Image committed.\n", "")
    assert guest(images / "old.qcow2") == before
    with open_chain(str(images / "upper.qcow2"), backing=False) as node:  # -b implies -d
        assert any(e.present for e in iter_map(node))
    assert img("commit", "-b", "nope", "upper.qcow2")[2] == (
        "bitback-img: Did not find 'nope' in the backing chain of 'upper.qcow2'\n"
    )
    assert img("commit", "old.qcow2")[2] == "bitback-img: Image does not have a backing file\n"


def test_commit_grows_a_smaller_base(img: Img, tmp_path: Path) -> None:
    qcow2(tmp_path / "b.qcow2", MiB, (0, b"\x01" * 512))
    qcow2(tmp_path / "t.qcow2", 2 * MiB, (MiB + 512, b"\x02" * 512), backing="b.qcow2")
    before = guest(tmp_path / "t.qcow2")
    assert img("commit", "-q", "t.qcow2") == (0, "", "")
    assert guest(tmp_path / "b.qcow2") == before


def test_resize(img: Img, tmp_path: Path) -> None:
    qcow2(tmp_path / "a.qcow2", 4 * MiB, (0, b"\x01" * (3 * MiB)))
    assert img("resize", "a.qcow2", "+1M") == (0, "Image resized.\n", "")
    rc, _, err = img("resize", "a.qcow2", "-1M")
    assert rc == 1 and err == (
        "bitback-img: Use the --shrink option to perform a shrink operation.\n"
        "bitback-img: warning: Shrinking an image will delete all data beyond the shrunken "
        "image's end. Before performing such an operation, make sure there is no important "
        "data there.\n"
    )
    assert img("resize", "--shrink", "a.qcow2", "1M") == (0, "Image resized.\n", "")
    assert guest(tmp_path / "a.qcow2") == b"\x01" * MiB
    assert img("resize", "--shrink", "a.qcow2", "1000")[2] == (
        "bitback-img: The new size must be a multiple of 512\n"
    )
    assert img("resize", "a.qcow2", "-10M")[2] == "bitback-img: New image size must be positive\n"
    assert img("resize", "a.qcow2")[2].startswith("bitback-img: Not enough arguments (try")
    assert img("resize", "a.qcow2", "1M", "2M")[2].startswith(
        "bitback-img: Expecting image file name and size (try"
    )
    (tmp_path / "r.raw").write_bytes(bytes(4096))
    assert img("resize", "-q", "-f", "raw", "--shrink", "r.raw", "1000") == (0, "", "")
    assert (tmp_path / "r.raw").stat().st_size == 1000
