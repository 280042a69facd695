"""bitback-img create and the command-line front end (dispatch, help, usage errors)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bitback.block.open import open_image
from helpers.imgrun import Img

QCOW2_LINE = (
    "Formatting 'a.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib "
    "size=67108864 lazy_refcounts=off refcount_bits=16\n"
)


def test_create_qcow2_prints_qemu_line_and_opens(img: Img, tmp_path: Path) -> None:
    assert img("create", "-f", "qcow2", "a.qcow2", "64M") == (0, QCOW2_LINE, "")
    with open_image(str(tmp_path / "a.qcow2")) as node:
        assert node.format_name == "qcow2"
        assert node.length() == 64 << 20


def test_create_options_after_operands_and_quiet(img: Img) -> None:
    assert img("create", "a.qcow2", "64M", "-q", "-f", "qcow2") == (0, "", "")


def test_create_raw_rounds_size_and_allocates_first_block(img: Img, tmp_path: Path) -> None:
    assert img("create", "r.raw", "1000") == (0, "Formatting 'r.raw', fmt=raw size=1000\n", "")
    assert (tmp_path / "r.raw").stat().st_size == 1024


def test_create_backing_takes_size_and_needs_format(img: Img) -> None:
    img("create", "-q", "-f", "qcow2", "b.qcow2", "1M")
    rc, out, err = img("create", "-f", "qcow2", "-b", "b.qcow2", "t.qcow2")
    assert rc == 1 and out == ""
    # 7.2's hint names the probed format, without a final newline
    assert err == (
        "bitback-img: t.qcow2: Backing file specified without backing format\n"
        "Detected format of qcow2."
    )
    rc, out, _ = img("create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "t.qcow2")
    assert rc == 0
    assert "size=1048576 backing_file=b.qcow2 backing_fmt=qcow2 lazy_refcounts" in out


def test_create_missing_backing(img: Img) -> None:
    rc, _, err = img("create", "-f", "qcow2", "-b", "gone", "-F", "qcow2", "t.qcow2", "1M")
    assert (rc, err) == (
        1,
        "bitback-img: t.qcow2: Could not open 'gone': No such file or directory\n"
        "Could not open backing image.\n",
    )
    rc, _, _ = img(
        "create", "-q", "-u", "-f", "qcow2", "-b", "gone", "-F", "qcow2", "t.qcow2", "1M"
    )
    assert rc == 0


@pytest.mark.parametrize(
    ("args", "err"),
    [
        (["-f", "qcow2", "c.qcow2"], "c.qcow2: Image creation needs a size parameter"),
        (["-f", "qcow2", "-o", "foo=bar", "c.qcow2", "1G"], "c.qcow2: Invalid parameter 'foo'"),
        (
            ["-f", "qcow2", "-o", "size=1M", "c.qcow2", "2M"],
            "c.qcow2: The image size must be specified only once",
        ),
        (
            ["-f", "qcow2", "-o", "cluster_size=1000", "c.qcow2", "1M"],
            "c.qcow2: Cluster size must be a power of two between 512 and 2048k",
        ),
        (
            ["-f", "qcow2", "-o", "compat=2", "c.qcow2", "1M"],
            "c.qcow2: Parameter 'version' does not accept value '2'",
        ),
        (
            ["-f", "qcow2", "-o", "compat=0.10,refcount_bits=8", "c.qcow2", "1M"],
            "c.qcow2: Different refcount widths than 16 bits require compatibility level 1.1 or "
            "above (use version=v3 or greater)",
        ),
        (
            ["-f", "qcow2", "-F", "qcow2", "c.qcow2", "1M"],
            "c.qcow2: Backing format cannot be used without backing file",
        ),
        (
            ["-f", "raw", "-b", "x", "-F", "qcow2", "c.raw", "1M"],
            "c.raw: Backing file not supported for file format 'raw'",
        ),
        (["-f", "foo", "c", "1M"], "c: Unknown file format 'foo'"),
        (
            ["-f", "qcow2", "c.qcow2", "9E"],
            "Invalid image size specified. Must be between 0 and 9223372036854775807.",
        ),
        (
            ["-f", "qcow2", "-o", "cluster_size=64k,", "c.qcow2", "1M"],
            "Invalid option list: cluster_size=64k,",
        ),
    ],
)
def test_create_errors(img: Img, args: list[str], err: str) -> None:
    rc, _, stderr = img("create", *args)
    assert (rc, stderr) == (1, f"bitback-img: {err}\n")


def test_create_option_help(img: Img) -> None:
    rc, out, _ = img("create", "-f", "raw", "-o", "help")
    assert rc == 0
    assert out == (
        "Supported raw options:\n"
        "  size=<size>            - Virtual disk size\n\n"
        "The protocol level may support further options.\n"
        "Specify the target filename to include those options.\n"
    )


@pytest.mark.parametrize(
    ("args", "err"),
    [
        ([], "Not enough arguments"),
        (["foo"], "Command not found: foo"),
        (["create"], "Expecting image file name"),
        (["create", "-f"], "missing argument for option '-f'"),
        (["create", "-xq", "a"], "unrecognized option 'create'"),
        (["create", "a", "1M", "extra"], "Unexpected argument: extra"),
        (["-q", "info", "x"], "unrecognized option '-q'"),
    ],
)
def test_usage_errors(img: Img, args: list[str], err: str) -> None:
    rc, out, stderr = img(*args)
    assert (rc, out) == (1, "")
    assert stderr == f"bitback-img: {err} (try 'bitback-img --help' for more information)\n"


def test_help_and_version(img: Img) -> None:
    for args in (["-h"], ["--help"], ["info", "-h"], ["create", "--help"]):
        rc, out, _ = img(*args)
        assert rc == 0 and "Command syntax:" in out and "  create [-q] [-f fmt]" in out
    rc, out, _ = img("-V")
    assert rc == 0 and out.startswith("bitback-img version ")
