"""Persistent bitmaps written by bitback-io and bitback-img, read back by QEMU's NBD server.

The same guest writes go to twin images through real ``qemu-io`` and through ``bitback-io``;
each bitmap is then exported by real ``qemu-nbd -B NAME`` and read with ``nbdinfo
--map=qemu:dirty-bitmap:NAME``: QEMU's own view of what bitback stored. Enabled bitmaps must
record exactly the granules QEMU's record (writes, write-zeroes, discards, vectored and
asynchronous writes), disabled ones nothing; ``bitback-img bitmap`` merges and clears and
``bitback-img convert --bitmaps`` must leave the same bits as qemu-img's.

``qemu-nbd`` and ``nbdinfo`` (libnbd-bin) are needed; like the QEMU fixtures, their absence
skips these tests, except with ``CI=true``, where it fails them.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from helpers.procs import run
from helpers.tools import in_ci

pytestmark = pytest.mark.qemu

WRITES = ("write 1M 64k", "write -z 3M 128k", "discard 5M 64k", "write 7M 512",
          "aio_write 6M 4k", "aio_flush", "writev 2M 4k 4k", "write 0 1")


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found on PATH (Debian package {package})"
        if in_ci():
            pytest.fail(f"CI=true and {message}", pytrace=False)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def qemu_nbd() -> str:
    return _tool("qemu-nbd", "qemu-utils")


@pytest.fixture(scope="module")
def nbdinfo() -> str:
    return _tool("nbdinfo", "libnbd-bin")


def dirty_map(qemu_nbd: str, nbdinfo: str, image: Path, bitmap: str) -> str:
    """``nbdinfo --map`` of ``qemu:dirty-bitmap:BITMAP`` as real qemu-nbd exports it.

    The socket lives in a short private directory: ``sun_path`` holds 107 bytes, fewer than
    pytest's temporary paths may take.
    """
    with tempfile.TemporaryDirectory(prefix="bbnbd", dir="/tmp") as short:
        return _dirty_map(qemu_nbd, nbdinfo, image, bitmap, Path(short) / "s")


def _dirty_map(qemu_nbd: str, nbdinfo: str, image: Path, bitmap: str, sock: Path) -> str:
    server = subprocess.Popen(
        [qemu_nbd, "-r", "-f", "qcow2", "-B", bitmap, f"--socket={sock}", str(image)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            if server.poll() is not None or time.monotonic() > deadline:
                out, err = server.communicate(timeout=5)
                raise AssertionError(f"qemu-nbd did not start: {out}{err}")
            time.sleep(0.02)
        res = run([nbdinfo, f"--map=qemu:dirty-bitmap:{bitmap}", f"nbd+unix:///?socket={sock}"],
                  check=True, timeout=30)
        return res.stdout
    finally:
        try:
            server.wait(timeout=10)  # qemu-nbd leaves after its only client
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _io(tool: Sequence[str], image: Path, commands: Sequence[str]) -> None:
    argv = [*tool]
    for command in commands:
        argv += ["-c", command]
    run([*argv, str(image)], check=True)


@pytest.fixture
def twins(tmp_path: Path, qemu_img: str) -> tuple[Path, Path]:
    """q.qcow2 and b.qcow2: 8 MiB, bitmaps b (enabled), d (disabled), g (1 MiB granules)."""
    out = (tmp_path / "q.qcow2", tmp_path / "b.qcow2")
    for image in out:
        run([qemu_img, "create", "-q", "-f", "qcow2", image, "8M"], check=True)
        for args in (["b"], ["--disable", "d"], ["-g", "1M", "g"]):
            run([qemu_img, "bitmap", "--add", image, *args[:-1], args[-1]], check=True)
    return out


def test_bitback_io_marks_enabled_bitmaps_as_qemu_io(
    twins: tuple[Path, Path], qemu_io: str, bitback_io: list[str], qemu_img: str,
    qemu_nbd: str, nbdinfo: str,
) -> None:
    q, b = twins
    _io([qemu_io], q, WRITES)
    _io(bitback_io, b, WRITES)
    assert run([qemu_img, "check", b]).returncode == 0
    for name in ("b", "d", "g"):
        assert dirty_map(qemu_nbd, nbdinfo, b, name) == dirty_map(qemu_nbd, nbdinfo, q, name)
    assert "dirty" in dirty_map(qemu_nbd, nbdinfo, b, "b")
    assert "dirty" not in dirty_map(qemu_nbd, nbdinfo, b, "d")


def test_bitback_img_bitmap_and_convert_leave_qemus_bits(
    twins: tuple[Path, Path], qemu_io: str, qemu_img: str, bitback_img: list[str],
    qemu_nbd: str, nbdinfo: str,
) -> None:
    q, b = twins
    for image in twins:
        _io([qemu_io], image, WRITES)
    steps = (
        ["bitmap", "--add", "-g", "128k", "m"],
        ["bitmap", "--merge", "b", "--merge", "g", "--disable", "m"],
        ["bitmap", "--clear", "--enable", "d"],
    )
    for step in steps:
        run([qemu_img, *step[:-1], q, step[-1]], check=True)
        run([*bitback_img, *step[:-1], b, step[-1]], check=True)
    run([qemu_img, "convert", "--bitmaps", "-O", "qcow2", q, q.with_suffix(".c")], check=True)
    run([*bitback_img, "convert", "--bitmaps", "-O", "qcow2", b, b.with_suffix(".c")],
        check=True)
    for image in (b, b.with_suffix(".c")):
        assert run([qemu_img, "check", image]).returncode == 0
    for name in ("b", "d", "g", "m"):
        expected = dirty_map(qemu_nbd, nbdinfo, q, name)
        assert dirty_map(qemu_nbd, nbdinfo, b, name) == expected, name
        assert dirty_map(qemu_nbd, nbdinfo, b.with_suffix(".c"), name) == expected, name
