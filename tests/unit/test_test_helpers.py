"""The shared test helpers behave as the rest of the suite relies on."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from helpers.procs import ProcessFailed, run
from helpers.tools import bitback_argv, find_reference_tool, in_ci, require_reference_tool

PY = sys.executable


def test_run_captures_text_and_exit_code() -> None:
    res = run([PY, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"])
    assert (res.returncode, res.stdout, res.stderr) == (3, "out\n", "err\n")


def test_run_check_reports_command_and_output() -> None:
    with pytest.raises(ProcessFailed) as info:
        run([PY, "-c", "import sys; print('said this'); sys.exit(2)"], check=True)
    message = str(info.value)
    assert "expected exit code 0" in message
    assert "exit code 2" in message
    assert "said this" in message


def test_run_expect_accepts_that_code_only() -> None:
    run([PY, "-c", "raise SystemExit(4)"], expect=4)
    with pytest.raises(ProcessFailed):
        run([PY, "-c", "raise SystemExit(0)"], expect=4)


def test_run_kills_a_process_that_outlives_its_timeout() -> None:
    with pytest.raises(ProcessFailed, match=r"longer than 0\.5 s"):
        run([PY, "-c", "import time; print('started', flush=True); time.sleep(30)"], timeout=0.5)


def test_run_adds_env_and_feeds_stdin(tmp_path: Path) -> None:
    code = "import os, sys; print(os.environ['BB_X'], sys.stdin.read(), os.getcwd())"
    res = run([PY, "-c", code], env={"BB_X": "x"}, input="in", cwd=tmp_path, check=True)
    assert res.stdout.split() == ["x", "in", str(tmp_path)]


def test_run_gives_empty_stdin_by_default() -> None:
    res = run([PY, "-c", "import sys; print(repr(sys.stdin.read()))"], timeout=30, check=True)
    assert res.stdout.strip() == "''"


@pytest.mark.parametrize("value, expected", [("true", True), ("1", True), ("", False)])
def test_in_ci(monkeypatch: pytest.MonkeyPatch, value: str, expected: bool) -> None:
    monkeypatch.setenv("CI", value)
    assert in_ci() is expected


def test_missing_reference_tool_skips_locally(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QEMU_IMG", "/nonexistent/qemu-img")
    monkeypatch.delenv("CI", raising=False)
    assert find_reference_tool("qemu_img") is None
    with pytest.raises(pytest.skip.Exception, match="qemu-utils"):
        require_reference_tool("qemu_img")


def test_missing_reference_tool_fails_on_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QEMU_IO", "/nonexistent/qemu-io")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_reference_tool("qemu_io")


def test_bitback_argv_prefers_the_venv_script() -> None:
    argv = bitback_argv("bitback-img")
    beside = Path(sys.executable).parent / "bitback-img"
    if beside.exists():
        assert argv == [str(beside)]
    else:
        assert argv == [sys.executable, "-m", "bitback.tools.img.cli"]


def test_fixtures_are_argv_prefixes(bitback_img: list[str], bitback_io: list[str]) -> None:
    assert bitback_img == bitback_argv("bitback-img")
    assert bitback_io[-1].endswith(("bitback-io", "bitback.tools.io.cli"))
