"""bitback-img info, map and check on images made by create_qcow2 and written by the driver."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bitback.block.drivers.qcow2.create import create_qcow2
from bitback.block.open import open_image
from bitback.tools.img.info import size_to_str
from helpers.imgrun import Img

MiB = 1 << 20



@pytest.fixture
def chain(tmp_path: Path) -> Path:
    """base.qcow2 (64 MiB: 1 MiB of 0x01 at 0) <- top.qcow2 (0x03 at 512k..1.5M, zeroes at 4M)."""
    create_qcow2(str(tmp_path / "base.qcow2"), 64 * MiB)
    create_qcow2(
        str(tmp_path / "top.qcow2"), 64 * MiB, backing_file="base.qcow2", backing_fmt="qcow2"
    )
    with open_image(str(tmp_path / "base.qcow2"), read_only=False) as node:
        node.pwrite(0, b"\x01" * MiB)
    with open_image(str(tmp_path / "top.qcow2"), read_only=False, backing=False) as node:
        node.pwrite(512 << 10, b"\x03" * MiB)
        node.pwrite_zeroes(4 * MiB, 65536)
    return tmp_path


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (196616, "192 KiB"),
        (1384448, "1.32 MiB"),
        (67108864, "64 MiB"),
        (1000 * 1024, "0.977 MiB"),
        (1023, "0.999 KiB"),
    ],
)
def test_size_to_str(value: int, text: str) -> None:
    assert size_to_str(value) == text


def test_info_human_and_json(img: Img, chain: Path) -> None:
    rc, out, _ = img("info", "top.qcow2")
    assert rc == 0
    lines = out.splitlines()
    assert lines[:3] == [
        "image: top.qcow2",
        "file format: qcow2",
        "virtual size: 64 MiB (67108864 bytes)",
    ]
    assert lines[3].startswith("disk size: ")
    assert lines[4:] == [
        "cluster_size: 65536",
        "backing file: base.qcow2",
        "backing file format: qcow2",
        "Format specific information:",
        "    compat: 1.1",
        "    compression type: zlib",
        "    lazy refcounts: false",
        "    refcount bits: 16",
        "    corrupt: false",
        "    extended l2: false",
    ]
    rc, out, _ = img("info", "--output=json", "top.qcow2")
    data = json.loads(out)
    assert list(data) == [
        "backing-filename-format",
        "virtual-size",
        "filename",
        "cluster-size",
        "format",
        "actual-size",
        "format-specific",
        "full-backing-filename",
        "backing-filename",
        "dirty-flag",
    ]
    assert data["format-specific"] == {
        "type": "qcow2",
        "data": {
            "compat": "1.1",
            "compression-type": "zlib",
            "lazy-refcounts": False,
            "refcount-bits": 16,
            "corrupt": False,
            "extended-l2": False,
        },
    }


def test_info_backing_chain(img: Img, chain: Path) -> None:
    rc, out, _ = img("info", "--backing-chain", "--output=json", "top.qcow2")
    assert rc == 0
    assert [d["filename"] for d in json.loads(out)] == ["top.qcow2", "base.qcow2"]
    _, out, _ = img("info", "--backing-chain", "top.qcow2")
    assert out.count("image: ") == 2 and "\n\nimage: base.qcow2\n" in out


def test_info_relative_path_shows_actual_path(
    img: Img, chain: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path.parent)
    _, out, _ = img("info", f"{tmp_path.name}/top.qcow2")
    assert f"backing file: base.qcow2 (actual path: {tmp_path.name}/base.qcow2)\n" in out


def test_info_raw_and_errors(img: Img, tmp_path: Path) -> None:
    (tmp_path / "r.raw").write_bytes(bytes(4096))
    _, out, _ = img("info", "--output=json", "r.raw")
    assert list(json.loads(out)) == [
        "virtual-size",
        "filename",
        "format",
        "actual-size",
        "dirty-flag",
    ]
    assert img("info", "gone") == (
        1,
        "",
        "bitback-img: Could not open 'gone': Could not open 'gone': No such file or directory\n",
    )
    assert img("info", "-f", "qcow2", "r.raw") == (
        1,
        "",
        "bitback-img: Could not open 'r.raw': Image is not in qcow2 format\n",
    )
    assert img("info", "--output=xml", "r.raw")[2] == (
        "bitback-img: --output must be used with human or json as argument.\n"
    )


def test_map_json_and_human(img: Img, chain: Path) -> None:
    rc, out, _ = img("map", "--output=json", "top.qcow2")
    assert rc == 0 and out.startswith("[{ ") and out.endswith("}]\n")
    entries = json.loads(out)
    assert [
        (e["start"], e["length"], e["depth"], e["present"], e["zero"], e["data"]) for e in entries
    ] == [
        (0, 512 << 10, 1, True, False, True),
        (512 << 10, MiB, 0, True, False, True),
        (1536 << 10, 2560 << 10, 1, False, True, False),
        (4 * MiB, 65536, 0, True, True, False),
        (4 * MiB + 65536, 60 * MiB - 65536, 1, False, True, False),
    ]
    assert "offset" in entries[0] and "offset" not in entries[2] and "offset" not in entries[3]
    rc, out, _ = img("map", "top.qcow2")
    lines = out.splitlines()
    assert lines[0] == "Offset          Length          Mapped to       File"
    assert lines[1].startswith("0               0x80000         0x") and lines[1].endswith(
        "base.qcow2"
    )
    assert lines[2].startswith("0x80000         0x100000        0x")
    assert len(lines) == 3


def test_map_range_and_empty(img: Img, chain: Path, tmp_path: Path) -> None:
    _, out, _ = img("map", "--output=json", "--start-offset=1M", "--max-length=4k", "top.qcow2")
    assert json.loads(out) == [
        {
            "start": MiB,
            "length": 4096,
            "depth": 0,
            "present": True,
            "zero": False,
            "data": True,
            "offset": json.loads(out)[0]["offset"],
        }
    ]
    create_qcow2(str(tmp_path / "zero.qcow2"), 0)
    assert img("map", "--output=json", "zero.qcow2")[1] == (
        '[{ "start": 0, "length": 0, "depth": 0, "present": false, "zero": false, "data": false}]\n'
    )


def test_check_clean_raw_and_usage(img: Img, chain: Path, tmp_path: Path) -> None:
    rc, out, err = img("check", "base.qcow2")
    assert (rc, err) == (0, "") and out.startswith("No errors were found on the image.\n")
    rc, out, _ = img("check", "--output=json", "base.qcow2")
    assert json.loads(out)["check-errors"] == 0
    assert img("check", "-q", "base.qcow2") == (0, "", "")
    (tmp_path / "r.raw").write_bytes(bytes(512))
    assert img("check", "r.raw") == (
        63,
        "",
        "bitback-img: This image format does not support checks\n",
    )
    rc, _, err = img("check", "-r", "foo", "base.qcow2")
    assert rc == 1 and err == (
        "bitback-img: Unknown option value for -r (expecting 'leaks' or 'all'): foo "
        "(try 'bitback-img --help' for more information)\n"
    )


def test_check_needs_the_backing_chain(img: Img, tmp_path: Path) -> None:
    create_qcow2(str(tmp_path / "o.qcow2"), MiB, backing_file="gone.qcow2", backing_fmt="qcow2")
    assert img("check", "o.qcow2") == (
        1,
        "",
        "bitback-img: Could not open 'o.qcow2': Could not open backing file: "
        "Could not open 'gone.qcow2': No such file or directory\n",
    )
