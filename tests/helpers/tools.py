"""Where the tools under test and the reference tools live.

The reference tools are QEMU 7.2's ``qemu-img``, ``qemu-io`` and ``qemu-system-x86_64``, found
on ``PATH`` or named by ``QEMU_IMG`` / ``QEMU_IO`` / ``QEMU_SYSTEM``; tests of persistent
bitmaps also use ``qemu-nbd``, ``qemu-storage-daemon`` and libnbd's ``nbdinfo`` (``QEMU_NBD`` /
``QEMU_STORAGE_DAEMON`` / ``NBDINFO``). Our own tools are the console scripts installed next
to the running interpreter (the project's virtualenv), or, when the project is not installed
that way, ``python -m`` of their CLI modules.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

__all__ = [
    "QEMU_TOOLS",
    "bitback_argv",
    "find_reference_tool",
    "in_ci",
    "missing_tool_message",
    "require_reference_tool",
]

# Fixture/tool name -> (program, environment override, Debian package)
QEMU_TOOLS: dict[str, tuple[str, str, str]] = {
    "qemu_img": ("qemu-img", "QEMU_IMG", "qemu-utils"),
    "qemu_io": ("qemu-io", "QEMU_IO", "qemu-utils"),
    "qemu_system": ("qemu-system-x86_64", "QEMU_SYSTEM", "qemu-system-x86"),
    "qemu_nbd": ("qemu-nbd", "QEMU_NBD", "qemu-utils"),
    "qemu_storage_daemon": ("qemu-storage-daemon", "QEMU_STORAGE_DAEMON", "qemu-system-common"),
    "nbdinfo": ("nbdinfo", "NBDINFO", "libnbd-bin"),  # libnbd's, reads qemu-nbd's bitmaps
}

_CLI_MODULES = {
    "bitback-img": "bitback.tools.img.cli",
    "bitback-io": "bitback.tools.io.cli",
    "bitbackd": "bitback.daemon",
}


def in_ci() -> bool:
    """True on CI (``CI=true``), where a missing reference tool is a failure, not a skip."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def find_reference_tool(key: str) -> str | None:
    """The path of a QEMU reference tool, or None when it is not installed."""
    program, env_var, _ = QEMU_TOOLS[key]
    override = os.environ.get(env_var)
    if override:
        return shutil.which(override)
    return shutil.which(program)


def missing_tool_message(key: str) -> str:
    program, env_var, package = QEMU_TOOLS[key]
    return (
        f"{program} (QEMU 7.2 reference tool) not found on PATH nor via ${env_var}; "
        f"install Debian's {package} package ('make test' does so when run as root)"
    )


def require_reference_tool(key: str) -> str:
    """The tool's path; skip the test when it is missing, or fail it when ``CI=true``."""
    path = find_reference_tool(key)
    if path is None:
        if in_ci():
            pytest.fail(f"CI=true and {missing_tool_message(key)}", pytrace=False)
        pytest.skip(missing_tool_message(key))
    return path


def bitback_argv(script: str) -> list[str]:
    """argv prefix that runs one of our console scripts (``bitback-img``, ``bitback-io``)."""
    candidate = Path(sys.executable).parent / script
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return [str(candidate)]
    return [sys.executable, "-m", _CLI_MODULES[script]]
