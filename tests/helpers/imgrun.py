"""Running ``bitback-img`` in-process, and small image builders, for the tool's unit tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from bitback.block.drivers.qcow2.create import create_qcow2
from bitback.block.open import open_image

__all__ = ["Img", "Result", "qcow2"]

Result = tuple[int, str, str]
"""(exit code, stdout, stderr) of one in-process ``bitback-img`` run."""
Img = Callable[..., Result]


def qcow2(path: Path, size: int, *writes: tuple[int, bytes], backing: str | None = None) -> Path:
    """A new qcow2 image (64 KiB clusters) at ``path`` holding ``writes``."""
    create_qcow2(str(path), size, backing_file=backing, backing_fmt="qcow2" if backing else None)
    with open_image(str(path), read_only=False, backing=False) as node:
        for offset, data in writes:
            node.pwrite(offset, data)
    return path
