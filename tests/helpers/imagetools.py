"""Driving qemu-img / qemu-io and bitback-img / bitback-io the same way from tests.

Every function takes the tool as an argv prefix (``[qemu_img]`` or the ``bitback_img`` fixture),
so a test can run one step with either implementation::

    for tool in ([qemu_img], bitback_img):
        create(tool, tmp_path / "a.qcow2", 64 << 20, cluster_size=4096)

Contents are compared as raw bytes: :func:`read_raw` converts an image (through its backing
chain) to a raw file with the given tool's ``convert -O raw`` and returns the bytes.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from helpers.procs import run

__all__ = [
    "CHECK_CLEAN",
    "CHECK_CORRUPT",
    "CHECK_FAILED",
    "CHECK_LEAKS",
    "check_image",
    "compare",
    "create",
    "create_argv",
    "info_json",
    "io_argv",
    "read_raw",
    "strip_timing",
]

Tool = Sequence[str]
PathLike = str | os.PathLike[str]

# Check exit codes (qemu-img check): clean, could not check, corruption, leaks only.
CHECK_CLEAN, CHECK_FAILED, CHECK_CORRUPT, CHECK_LEAKS = 0, 1, 2, 3


def create_argv(
    path: PathLike,
    size: int | str | None,
    *,
    fmt: str = "qcow2",
    cluster_size: int | str | None = None,
    backing: str | None = None,
    backing_fmt: str | None = "qcow2",
    compat: str | None = None,
    refcount_bits: int | None = None,
    extra_options: Sequence[str] = (),
) -> list[str]:
    """``create`` arguments shared by qemu-img and bitback-img (without the program)."""
    options = [*extra_options]
    if cluster_size is not None:
        options.append(f"cluster_size={cluster_size}")
    if compat is not None:
        options.append(f"compat={compat}")
    if refcount_bits is not None:
        options.append(f"refcount_bits={refcount_bits}")
    argv = ["create", "-f", fmt]
    if options:
        argv += ["-o", ",".join(options)]
    if backing is not None:
        argv += ["-b", backing]
        if backing_fmt is not None:
            argv += ["-F", backing_fmt]
    argv.append(os.fspath(path))
    if size is not None:
        argv.append(str(size))
    return argv


def create(tool: Tool, path: PathLike, size: int | str | None, *, cwd: PathLike | None = None,
           **options: Any) -> None:
    """Create an image with ``tool`` (qemu-img or bitback-img); the run must succeed."""
    run([*tool, *create_argv(path, size, **options)], check=True, cwd=cwd)


def io_argv(commands: Iterable[str]) -> list[str]:
    """``-c CMD`` for every command, in order."""
    out: list[str] = []
    for command in commands:
        out += ["-c", command]
    return out


def read_raw(tool: Tool, path: PathLike, *, fmt: str = "qcow2", cwd: PathLike | None = None,
             scratch: PathLike | None = None) -> bytes:
    """What a guest reads from ``path`` (whole chain), via ``tool convert -O raw``."""
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        out = Path(tmp) / "out.raw"
        run([*tool, "convert", "-f", fmt, "-O", "raw", os.fspath(path), str(out)],
            check=True, cwd=cwd)
        return out.read_bytes()


def check_image(qemu_img: str, path: PathLike, *, allowed: Sequence[int] = (CHECK_CLEAN,),
                fmt: str = "qcow2") -> int:
    """Run real ``qemu-img check``; fail the test unless its exit code is in ``allowed``."""
    res = run([qemu_img, "check", "-f", fmt, os.fspath(path)])
    assert res.returncode in allowed, (
        f"qemu-img check {path}: exit {res.returncode}\n{res.stdout}{res.stderr}"
    )
    return res.returncode


def compare(tool: Tool, a: PathLike, b: PathLike, *, fmt1: str = "qcow2", fmt2: str = "qcow2",
            cwd: PathLike | None = None, strict: bool = False) -> tuple[int, str]:
    """``compare -f fmt1 -F fmt2 a b``: exit code and stdout+stderr."""
    argv = [*tool, "compare", "-f", fmt1, "-F", fmt2]
    if strict:
        argv.append("-s")
    res = run([*argv, os.fspath(a), os.fspath(b)], cwd=cwd)
    return res.returncode, res.stdout + res.stderr


def info_json(tool: Tool, path: PathLike, *, fmt: str | None = None,
              cwd: PathLike | None = None) -> dict[str, Any]:
    """``info --output=json`` parsed."""
    argv = [*tool, "info", "--output=json"]
    if fmt is not None:
        argv += ["-f", fmt]
    res = run([*argv, os.fspath(path)], check=True, cwd=cwd)
    data = json.loads(res.stdout)
    assert isinstance(data, dict)
    return data


# qemu-io's report lines: "wrote 512/512 bytes at offset 0" then a timing line
# "512 bytes, 1 ops; 00.00 sec (1.2 MiB/sec and 2400.1 ops/sec)".
_TIMING_RE = re.compile(r"^.*, \d+ ops; .*\(.*/sec and .* ops/sec\)$")
_PROG_RE = re.compile(r"^(?:\S*/)?(?:qemu-io|bitback-io): ", re.MULTILINE)


def strip_timing(text: str) -> str:
    """qemu-io output without what varies by nature: timing lines and the program name."""
    text = _PROG_RE.sub("PROG: ", text)
    return "\n".join(line for line in text.splitlines() if not _TIMING_RE.match(line))
