"""Fixtures of the unit tier."""

from __future__ import annotations

from pathlib import Path

import pytest

from bitback.tools.img.cli import main
from helpers.imgrun import Img, Result


@pytest.fixture
def img(capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Img:
    """Run ``bitback-img ARGS`` in-process in ``tmp_path``: (exit code, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> Result:
        rc = main(list(args))
        out, err = capsys.readouterr()
        return rc, out, err

    return run
