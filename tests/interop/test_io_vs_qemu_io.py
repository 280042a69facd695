"""bitback-io against real qemu-io 7.2: the same scripts on twin images, the same output.

Each case runs one command line through ``qemu-io`` and through ``bitback-io``, each on its own
copy of an image made by real ``qemu-img`` (raw, and qcow2 read and written by bitback's qcow2
driver), in twin directories so that both see the same relative file name. It then requires:

* the same exit status;
* the same stdout and stderr, after filtering only what varies by nature: the timing and rate
  numbers of the report lines, and the program name that prefixes ``error_report`` lines;
* images with the same guest-visible content (``qemu-img compare``), and for qcow2 an image
  that ``qemu-img check`` finds clean.

Known, deliberate differences are left out of the scripts and listed in the tool's report:
``help`` without arguments lists only the commands bitback implements; an ``aio_*`` request
prints its result at once (qemu-io prints it when the request completes, which may be after
later commands, so the scripts follow each with ``aio_flush``); a bad option on the command
line prints one line, not qemu-io's usage; ``read -b``/``write -b`` (VM state) fail with
ENOTSUP, where QEMU's qcow2 reads and writes its VM state area.

The ``qemu_io``/``qemu_img`` fixtures (tests/conftest.py) skip these tests when QEMU is missing,
except on CI (``CI=true``), where they fail.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from helpers.procs import run

pytestmark = pytest.mark.qemu

IMAGE = "disk.img"

_REPORT_RE = re.compile(r"^(.*, \d+ ops; ).*\(.*/sec and .* ops/sec\)$")
_MACHINE_RE = re.compile(r"^(\d+,\d+),\d+:\d\d:\d\d\.\d\d,[-\w.]+,[-\w.]+$")
_PROG_RE = re.compile(r"^(?:\S*/)?(qemu-io|bitback-io)(:|> )", re.MULTILINE)


def normalize(text: str) -> str:
    """Filter only the run-dependent parts: times and rates, and the program's name."""
    lines = []
    for line in _PROG_RE.sub(r"PROG\2", text).splitlines():
        line = _REPORT_RE.sub(r"\1TIME", line)
        line = _MACHINE_RE.sub(r"\1,TIME", line)
        lines.append(line)
    return "\n".join(lines)


def make_twins(tmp_path: Path, qemu_img: str, fmt: str, size: str, *extra: str) -> list[Path]:
    """Two identical images, ``q/disk.img`` for qemu-io and ``b/disk.img`` for bitback-io."""
    dirs = [tmp_path / "q", tmp_path / "b"]
    for d in dirs:
        d.mkdir()
        run([qemu_img, "create", "-f", fmt, *extra, str(d / IMAGE), size], check=True)
    return dirs


def run_both(
    qemu_io: str, bitback_io: list[str], dirs: list[Path], args: list[str], stdin: str | None
) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    q = run([qemu_io, *args], cwd=dirs[0], input=stdin)
    b = run([*bitback_io, *args], cwd=dirs[1], input=stdin)
    return q, b


def assert_same(
    q: subprocess.CompletedProcess[str], b: subprocess.CompletedProcess[str]
) -> None:
    assert normalize(b.stdout) == normalize(q.stdout)
    assert normalize(b.stderr) == normalize(q.stderr)
    assert b.returncode == q.returncode


def assert_same_images(qemu_img: str, fmt: str, dirs: list[Path]) -> None:
    a, b = (str(d / IMAGE) for d in dirs)
    res = run([qemu_img, "compare", "-f", fmt, "-F", fmt, a, b])
    assert res.returncode == 0, res.stdout + res.stderr
    if fmt == "qcow2":
        run([qemu_img, "check", "-f", "qcow2", b], check=True)


def commands(*lines: str) -> list[str]:
    return [arg for line in lines for arg in ("-c", line)]


SCRIPTS: dict[str, list[str]] = {
    "seed": ["write -P0xab 0 512", "write 0 512", "flush", "write -P 0x41 1000 3b",
             "read -v 990 30", "write 0 1.5k"],
    "read-write": ["write 0 512", "write -P 0x41 512 1k", "read -v 0 40", "read -P 0x41 512 1k",
                   "read -P 0x42 512 1k", "r -P 0xcd -s 8 -l 4 0 16", "w -q 2k 100",
                   "read -qv 0 16", "read 0 0", "write 1M 0", "read -p 0 1"],
    "past-end": ["write 2M 512", "read 0 2M", "discard 2M 1", "write 1M 1", "read 1048575 2",
                 "write 2M 0"],
    "sizes": ["write 0 1.1k", "write 0 0x10k", "write 0 1.999k", "write 0 010",
              "write 0 abc", "write 0 1.1", "write 0 1e3", "write 0 8E", "write 0 .5k",
              "write 0 99999999999999999999", "read 0 3G", "read 0 2147483137",
              "write 0 5.k", "write 0 1kB"],
    "arguments": ["write -P 0x1234 0 512", "write -P 256 0 1", "write 0 -1", "read 0 512 -P",
                  "read -x 0 1", "read -s 1 0 16", "read -P 0xcd -l 20 0 16", "write -P 0x41",
                  "nosuch 0", "read 0", "map 1", "flush x", "info x", "help nosuch",
                  "write -u 0 1", "write -n 0 1", "write -z -P 1 0 1", "write -bz 0 512",
                  "write -cf 0 512", "write -b 1 512", "write -c 0 512"],
    "zero-discard-map": ["write -P 7 0 256k", "write -z 64k 64k", "write -z -u 128k 64k",
                         "discard 192k 64k", "read -P 7 0 64k", "read -P 0 64k 192k", "map",
                         "alloc 0", "alloc 60k 8k", "alloc 2M", "alloc 1000k 1M", "d -q 0 1"],
    "vectors": ["writev -P 5 0 512 1k", "readv -P 5 -v 0 512 1k", "readv -P 6 0 512",
                "readv 0 512 1k x", "readv 0 3G", "writev -q 1M 1"],
    # qemu-io prints an aio request's result when it completes: aio_flush makes that "now".
    "aio": ["aio_write -P 9 4k 1k 1k", "aio_flush", "aio_read -P 9 4k 2k", "aio_flush",
            "aio_read -P 1 -v 4k 32", "aio_flush", "aio_write -z 8k 4k", "aio_flush",
            "aio_read 2M 1", "aio_flush", "aio_write 2M 1", "aio_flush", "aio_read -i 0 1",
            "aio_write -i", "aio_write -z 0 1 1", "aio_write -u 0 1", "aio_read -q 0 1",
            "aio_flush", "read -P 0 8k 4k"],
    "machine": ["read -C 0 512", "write -C 0 1", "discard -C 0 512", "writev -C 0 512",
                "aio_write -C 0 1"],
    "image": ["length", "l", "info", "i", "truncate 2M", "length", "truncate 512k", "length",
              "truncate -m bogus 1M", "truncate -x 1M", "truncate abc", "map"],
    "help": ["help read", "help r", "help readv", "help write", "help writev",
             "help aio_read", "help aio_write", "help discard", "help map", "help sleep",
             "help alloc", "help truncate", "help flush", "help ?", "help q", "help c",
             "sleep 1", "sleep abc", "sleep -1"],
    "quit": ["write 0 1", "quit", "write 0 2"],
    "close": ["close", "read 0 1", "length"],
}


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_command_script(
    tmp_path: Path, qemu_io: str, qemu_img: str, bitback_io: list[str], fmt: str, script: str
) -> None:
    dirs = make_twins(tmp_path, qemu_img, fmt, "1M")
    q, b = run_both(qemu_io, bitback_io, dirs, ["-f", fmt, *commands(*SCRIPTS[script]), IMAGE],
                    None)
    assert_same(q, b)
    assert_same_images(qemu_img, fmt, dirs)


@pytest.mark.parametrize(
    "args",
    [
        ["-r", "-f", "{fmt}", "-c", "write -P 0x1ff 0 512", "-c", "writev 0 512", "-c",
         "aio_write 0 1", "-c", "truncate 2M", "-c", "discard 0 1", "-c", "flush", "-c",
         "read 0 1", IMAGE],
        ["-c", "read 0 512"],
        ["-f", "{fmt}", "-c", "read 0 512"],
        ["-f", "nosuch", "-c", "read 0 512", IMAGE],
        ["-f", "{fmt}", "-c", "read 0 512", "nosuch.img"],
        ["-f", "{fmt}", "-c", "read 0 512", "."],
        ["-f", "{fmt}", "-t", "nosuch", "-c", "read 0 512", IMAGE],
        ["-f", "{fmt}", "-d", "nosuch", "-c", "read 0 512", IMAGE],
        ["-f", "{fmt}", "--bogus", IMAGE],
        ["-f", "{fmt}", "-n", "-c", "write 0 4k", IMAGE],
        ["-f", "{fmt}", "-t", "writeback", "--cmd=write 0 4k", "--read", "-c", "flush", IMAGE],
        ["-f", "{fmt}", "-d", "ignore", "-c", "write 0 64k", "-c", "discard 0 64k", "-c",
         "read -P 0xcd 0 64k", IMAGE],
        ["-f", "{fmt}", "-c", "", "-c", "   ", "-c", "write\t0 1", IMAGE],
    ],
    ids=["read-only", "no-image", "no-image-fmt", "bad-format", "missing-file", "directory",
         "bad-cache", "bad-discard", "bad-long-option", "nocache", "writeback",
         "discard-ignore", "blank-and-tab"],
)
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_command_line(
    tmp_path: Path, qemu_io: str, qemu_img: str, bitback_io: list[str], fmt: str,
    args: list[str]
) -> None:
    dirs = make_twins(tmp_path, qemu_img, fmt, "1M")
    q, b = run_both(qemu_io, bitback_io, dirs, [a.replace("{fmt}", fmt) for a in args], None)
    if "--bogus" in args:
        # qemu-io adds its whole usage text on stdout; the error line itself must match.
        assert normalize(b.stderr) == normalize(q.stderr)
        assert b.returncode == q.returncode == 1
        return
    assert_same(q, b)
    assert_same_images(qemu_img, fmt, dirs)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_interactive(
    tmp_path: Path, qemu_io: str, qemu_img: str, bitback_io: list[str], fmt: str
) -> None:
    dirs = make_twins(tmp_path, qemu_img, fmt, "1M")
    script = "write 0 512\nread -P 1 0 512\n\n  help   flush  \nquit\nread 0 1\n"
    q, b = run_both(qemu_io, bitback_io, dirs, ["-f", fmt, IMAGE], script)
    assert_same(q, b)
    q, b = run_both(qemu_io, bitback_io, dirs, ["-f", fmt, IMAGE], "write -P 3 0 1\nread 0 1")
    assert_same(q, b)
    assert_same_images(qemu_img, fmt, dirs)


def test_probed_raw_warns(
    tmp_path: Path, qemu_io: str, qemu_img: str, bitback_io: list[str]
) -> None:
    dirs = make_twins(tmp_path, qemu_img, "raw", "1M")
    q, b = run_both(qemu_io, bitback_io, dirs, ["-c", "info", "-c", "length", IMAGE], None)
    assert_same(q, b)


def test_qcow2_geometry_and_truncate(
    tmp_path: Path, qemu_io: str, qemu_img: str, bitback_io: list[str]
) -> None:
    dirs = make_twins(tmp_path, qemu_img, "qcow2", "1G", "-o", "cluster_size=128k")
    script = ["info", "map", "write 1023M 1M", "write 512M 4k", "map", "truncate 2G", "info",
              "truncate 512M", "truncate 1000", "length", "write -c 0 128k", "write -c 512 512",
              "write -c -P 0x11 128k 256k", "read -P 0x11 128k 256k", "map"]
    q, b = run_both(qemu_io, bitback_io, dirs, ["-f", "qcow2", *commands(*script), IMAGE], None)
    assert_same(q, b)
    assert_same_images(qemu_img, "qcow2", dirs)


def test_qcow2_backing_chain(
    tmp_path: Path, qemu_io: str, qemu_img: str, bitback_io: list[str]
) -> None:
    dirs = [tmp_path / "q", tmp_path / "b"]
    for d in dirs:
        d.mkdir()
        base = str(d / "base.qcow2")
        run([qemu_img, "create", "-f", "qcow2", base, "64M"], check=True)
        run([qemu_io, "-f", "qcow2", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 10M 64k",
             base], check=True)
        run([qemu_img, "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
             str(d / IMAGE)], check=True)
    script = ["map", "read -P 0x11 0 1M", "write -P 0x33 512k 4k", "read -P 0x22 10M 64k",
              "discard 10M 64k", "read -P 0 10M 64k", "write -z 0 64k", "alloc 0 2M", "map",
              "read -P 0x11 64k 64k", "write 64M 1", "info"]
    q, b = run_both(qemu_io, bitback_io, dirs, ["-f", "qcow2", *commands(*script), IMAGE], None)
    assert_same(q, b)
    assert_same_images(qemu_img, "qcow2", dirs)
