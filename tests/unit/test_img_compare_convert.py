"""bitback-img compare and convert: semantics, messages, exit codes, allocation of the output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitback.block.chain import iter_map, open_chain, read
from bitback.tools.img.cli import main
from bitback.tools.img.compare import first_difference, first_nonzero_sector
from helpers.imgrun import Img, qcow2

MiB = 1 << 20




def raw(path: Path, size: int, *writes: tuple[int, bytes]) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in writes:
            f.seek(offset)
            f.write(data)
    return path


def test_buffer_helpers() -> None:
    a, b = bytearray(4096), bytearray(4096)
    assert first_difference(a, b, 4096) is None
    b[1000] = 1
    assert first_difference(a, b, 4096) == 512
    assert first_difference(a, b, 1000) is None
    assert first_nonzero_sector(b, 4096) == 512
    assert first_nonzero_sector(a, 4096) is None


def test_compare_identical_through_chains_and_formats(img: Img, tmp_path: Path) -> None:
    qcow2(tmp_path / "base.qcow2", 4 * MiB, (0, b"\x01" * MiB))
    qcow2(tmp_path / "top.qcow2", 4 * MiB, (MiB, b"\x02" * 4096), backing="base.qcow2")
    raw(tmp_path / "flat.raw", 4 * MiB, (0, b"\x01" * MiB), (MiB, b"\x02" * 4096))
    assert img("compare", "top.qcow2", "flat.raw") == (0, "Images are identical.\n", "")
    assert img("compare", "-q", "top.qcow2", "flat.raw") == (0, "", "")
    rc, out, _ = img("compare", "-s", "top.qcow2", "flat.raw")
    assert rc == 1 and out.startswith("Strict mode: Offset ") and "block status mismatch!" in out


def test_compare_reports_first_differing_sector(img: Img, tmp_path: Path) -> None:
    raw(tmp_path / "a.raw", MiB)
    raw(tmp_path / "b.raw", MiB, (1000, b"\x05"))
    assert img("compare", "a.raw", "b.raw") == (1, "Content mismatch at offset 512!\n", "")
    qcow2(tmp_path / "c.qcow2", MiB, (70000, b"\x05"))
    assert img("compare", "a.raw", "c.qcow2") == (1, "Content mismatch at offset 69632!\n", "")


def test_compare_size_mismatch(img: Img, tmp_path: Path) -> None:
    raw(tmp_path / "small.raw", MiB)
    raw(tmp_path / "big.raw", 2 * MiB)
    expected = "Warning: Image size mismatch!\nImages are identical.\n"
    assert img("compare", "small.raw", "big.raw") == (0, expected, "")
    assert img("compare", "big.raw", "small.raw") == (0, expected, "")
    assert img("compare", "-s", "big.raw", "small.raw") == (
        1,
        "Strict mode: Image size mismatch!\n",
        "",
    )
    raw(tmp_path / "big.raw", 2 * MiB, (MiB + 4096, b"\x01"))
    assert img("compare", "small.raw", "big.raw") == (
        1,
        "Warning: Image size mismatch!\nContent mismatch at offset 1052672!\n",
        "",
    )


def test_compare_exit_codes(img: Img, tmp_path: Path) -> None:
    raw(tmp_path / "a.raw", 512)
    rc, out, err = img("compare", "a.raw", "gone")
    assert (rc, out) == (2, "")
    assert (
        err == "bitback-img: Could not open 'gone': Could not open 'gone': "
        "No such file or directory\n"
    )
    rc, _, err = img("compare", "a.raw")
    assert rc == 1 and err.startswith("bitback-img: Expecting two image file names (try")
    assert img("compare", "-T", "foo", "a.raw", "a.raw")[0:1] == (2,)


def test_convert_keeps_holes_and_zeros_unallocated(img: Img, tmp_path: Path) -> None:
    data = bytearray(4 * MiB)
    data[0:4096] = b"\x01" * 4096
    data[2 * MiB : 2 * MiB + 100] = b"\x02" * 100
    raw(tmp_path / "src.raw", 4 * MiB, (0, bytes(data[: 3 * MiB])))  # zeros written as data
    assert img("convert", "-O", "qcow2", "src.raw", "out.qcow2") == (0, "", "")
    with open_chain(str(tmp_path / "out.qcow2")) as node:
        assert read(node, 0, 4 * MiB) == bytes(data)
        present = [(e.start, e.length) for e in iter_map(node) if e.present]
    # only the 4 KiB blocks with data were written, each allocating one 64 KiB cluster
    assert present == [(0, 65536), (2 * MiB, 65536)]
    assert img("compare", "src.raw", "out.qcow2")[0] == 0


def test_convert_with_backing_stores_only_the_top(img: Img, tmp_path: Path) -> None:
    qcow2(tmp_path / "base.qcow2", 2 * MiB, (0, b"\x01" * MiB))
    qcow2(tmp_path / "top.qcow2", 2 * MiB, (64 << 10, b"\x02" * 4096), backing="base.qcow2")
    rc, _, err = img("convert", "-O", "qcow2", "-B", "base.qcow2", "top.qcow2", "o.qcow2")
    assert (rc, err) == (1, "bitback-img: Use of backing file requires explicit backing format\n")
    assert (
        img("convert", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", "top.qcow2", "o.qcow2")[0]
        == 0
    )
    with open_chain(str(tmp_path / "o.qcow2")) as node:
        assert [(e.start, e.length) for e in iter_map(node) if e.depth == 0 and e.present] == [
            (64 << 10, 64 << 10)
        ]
    assert img("compare", "top.qcow2", "o.qcow2")[0] == 0


def test_convert_compressed_and_concatenated(img: Img, tmp_path: Path) -> None:
    raw(tmp_path / "a.raw", MiB, (0, b"abc" * 1000))
    qcow2(tmp_path / "b.qcow2", MiB, (4096, b"\x07" * 8192))
    assert img("convert", "-c", "-O", "qcow2", "a.raw", "b.qcow2", "o.qcow2") == (0, "", "")
    _, out, _ = img("map", "--output=json", "o.qcow2")
    entries = json.loads(out)
    assert entries[0]["data"] and "offset" not in entries[0]  # compressed: no offset
    with open_chain(str(tmp_path / "o.qcow2")) as node:
        assert node.length() == 2 * MiB
        assert read(node, 0, 3000) == b"abc" * 1000
        assert read(node, MiB + 4096, 8192) == b"\x07" * 8192


def test_convert_into_existing_target(img: Img, tmp_path: Path) -> None:
    raw(tmp_path / "s.raw", MiB, (0, b"\x01" * 512))
    qcow2(tmp_path / "t.qcow2", 2 * MiB, (0, b"\xff" * (2 * MiB)))
    assert img("convert", "-n", "-O", "qcow2", "s.raw", "t.qcow2") == (0, "", "")
    with open_chain(str(tmp_path / "t.qcow2")) as node:
        assert read(node, 0, MiB) == b"\x01" * 512 + bytes(MiB - 512)  # old data zeroed
        assert read(node, MiB, 16) == b"\xff" * 16  # past the source: untouched
    qcow2(tmp_path / "small.qcow2", 4096)
    assert img("convert", "-n", "-O", "qcow2", "s.raw", "small.qcow2")[2] == (
        "bitback-img: output file is smaller than input file\n"
    )


@pytest.mark.parametrize(
    ("args", "err"),
    [
        (["-O", "qcow2"], "Must specify image file name"),
        (["-O", "foo", "a.raw", "x"], "Unknown file format 'foo'"),
        (["-c", "a.raw", "x.raw"], "Compression not supported for this file format"),
        (
            ["-n", "-o", "cluster_size=4k", "a.raw", "a.raw"],
            "-o has no effect when skipping image creation",
        ),
        (
            ["-O", "raw", "-B", "a.raw", "-F", "raw", "a.raw", "x.raw"],
            "Backing file not supported for file format 'raw'",
        ),
        (
            ["-S", "1000", "a.raw", "x.raw"],
            "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up "
            "to 16777216. Select 0 to disable sparse detection (fully allocates output).",
        ),
    ],
)
def test_convert_errors(img: Img, tmp_path: Path, args: list[str], err: str) -> None:
    raw(tmp_path / "a.raw", 4096)
    rc, _, stderr = img("convert", *args)
    assert (rc, stderr) == (1, f"bitback-img: {err}\n")


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(st.integers(0, (2 * MiB) // 512 - 1), st.integers(1, 300), st.integers(0, 3)),
        max_size=10,
    ),
    st.sampled_from(["0", "4k", "64k"]),
)
def test_convert_round_trips_any_content(
    tmp_path_factory: pytest.TempPathFactory, writes: list[tuple[int, int, int]], sparse: str
) -> None:
    tmp = tmp_path_factory.mktemp("conv")
    size = 2 * MiB
    model = bytearray(size)
    for sector, count, value in writes:
        start = sector * 512
        end = min(size, start + count * 97)
        model[start:end] = bytes([value]) * (end - start)
    raw(tmp / "s.raw", size, (0, bytes(model)))
    assert (
        main(
            ["convert", "-q", "-S", sparse, "-O", "qcow2", str(tmp / "s.raw"), str(tmp / "o.qcow2")]
        )
        == 0
    )
    assert main(["compare", "-q", str(tmp / "s.raw"), str(tmp / "o.qcow2")]) == 0
    with open_chain(str(tmp / "o.qcow2")) as node:
        assert read(node, 0, size) == bytes(model)
