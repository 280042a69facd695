"""Fixtures shared by the whole suite: reference tools, our tools, and the test helpers.

* ``qemu_img``, ``qemu_io``, ``qemu_system``: paths of QEMU's tools. When one is missing the
  test is skipped, except on CI (``CI=true``), where it fails: CI must test against QEMU.
* ``bitback_img``, ``bitback_io``: argv prefixes for our tools, e.g.
  ``run([*bitback_img, "create", "-f", "qcow2", path, "64M"], check=True)``. Every fixture
  here is session-scoped, so hypothesis tests may use them too.
* ``helpers.procs.run``: the subprocess helper (timeout, captured text); ``helpers`` is
  importable from every test module because this file puts ``tests/`` on ``sys.path``.

Markers (``qemu``, ``slow``) are registered in pyproject.toml.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:  # also under --import-mode=importlib, which adds nothing
    sys.path.insert(0, _TESTS)

from helpers.tools import (  # noqa: E402
    QEMU_TOOLS,
    bitback_argv,
    find_reference_tool,
    in_ci,
    require_reference_tool,
)


@pytest.fixture(scope="session")
def qemu_img() -> str:
    """Path of QEMU's ``qemu-img``."""
    return require_reference_tool("qemu_img")


@pytest.fixture(scope="session")
def qemu_io() -> str:
    """Path of QEMU's ``qemu-io``."""
    return require_reference_tool("qemu_io")


@pytest.fixture(scope="session")
def qemu_system() -> str:
    """Path of QEMU's ``qemu-system-x86_64``."""
    return require_reference_tool("qemu_system")


# Session-scoped, so that hypothesis tests (@given) may use them; the lists are shared:
# build new argv lists from them (``[*bitback_img, ...]``), never modify them in place.
@pytest.fixture(scope="session")
def bitback_img() -> list[str]:
    """argv prefix running ``bitback-img``."""
    return bitback_argv("bitback-img")


@pytest.fixture(scope="session")
def bitback_io() -> list[str]:
    """argv prefix running ``bitback-io``."""
    return bitback_argv("bitback-io")


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Say up front which reference tools this run tests against."""
    lines = [f"CI mode: {'yes (missing QEMU tools fail)' if in_ci() else 'no'}"]
    for key, (program, _, _) in QEMU_TOOLS.items():
        path = find_reference_tool(key)
        if path is None:
            fate = "fail" if in_ci() else "are skipped"
            lines.append(f"{program}: missing (tests needing it {fate})")
            continue
        try:
            out = subprocess.run(
                [path, "--version"], capture_output=True, text=True, timeout=10, check=False
            ).stdout
            version = out.splitlines()[0] if out else "version unknown"
        except (OSError, subprocess.SubprocessError):
            version = "does not run"
        lines.append(f"{program}: {path} ({version})")
    return lines
