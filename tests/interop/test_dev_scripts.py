"""The developer scripts (demo, benchmark harness, CI entry) and the placeholder tools work.

The demo and the benchmark harness are checked against QEMU's own tools put in bitback's place
(``IMG=qemu-img`` / ``BITBACK_IMG=qemu-img``): that proves the scripts' logic independently of
how far bitback's tools have come. ``test_demo_with_bitback_tools`` then runs ``make demo``'s
script on bitback itself.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from helpers.procs import run

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = [ROOT / "scripts" / n for n in ("demo.sh", "ensure-qemu.sh", "venv.sh")]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize("script", [*SCRIPTS, ROOT / ".ci" / "run"], ids=lambda p: p.name)
def test_shell_scripts_parse(script: Path) -> None:
    run(["bash", "-n", script], check=True)


@pytest.mark.qemu
def test_demo_logic_with_qemu_tools(qemu_img: str, qemu_io: str) -> None:
    env = {"IMG": qemu_img, "IO": qemu_io, "QEMU_IMG": qemu_img}
    res = run(["bash", ROOT / "scripts" / "demo.sh"], env=env, check=True)
    assert "all 10 steps succeeded" in res.stdout
    assert "Images are identical." in res.stdout


@pytest.mark.qemu
def test_demo_reports_the_failing_step(qemu_img: str) -> None:
    env = {"IMG": qemu_img, "IO": "false", "QEMU_IMG": ""}
    res = run(["bash", ROOT / "scripts" / "demo.sh"], env=env, expect=1)
    assert "FAILED at step 2" in res.stderr


@pytest.mark.qemu
def test_demo_with_bitback_tools(qemu_img: str) -> None:
    try:
        written = importlib.util.find_spec("bitback.tools.img.cli") is not None
    except ModuleNotFoundError:
        written = False
    if not written:
        pytest.skip("bitback-img is not written yet (no bitback.tools.img.cli)")
    env = {"PATH": f"{BIN}:{Path(qemu_img).parent}:/usr/bin:/bin", "QEMU_IMG": qemu_img}
    res = run(["bash", ROOT / "scripts" / "demo.sh"], env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr
    assert "all 10 steps succeeded" in res.stdout


@pytest.mark.qemu
def test_backup_demo(qemu_img: str) -> None:
    """``make demo``'s second part: a live full + incremental backup with bitbackd over
    QMP, whose incremental (through its chain) compares identical to the disk."""
    env = {"PATH": f"{BIN}:{Path(qemu_img).parent}:/usr/bin:/bin"}
    res = run([sys.executable, ROOT / "scripts" / "backup_demo.py"], env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr
    assert res.stdout.count("Images are identical.") == 2
    assert "'len': 1114112, 'offset': 1114112" in res.stdout
    assert "backup demo: done" in res.stdout


@pytest.mark.qemu
def test_bench_harness_smoke(qemu_img: str, qemu_io: str, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    env = {"BITBACK_IMG": qemu_img, "BITBACK_IO": qemu_io, "QEMU_IMG": qemu_img, "QEMU_IO": qemu_io}
    argv: list[str | Path] = [
        sys.executable,
        ROOT / "bench" / "run.py",
        "--size",
        "4M",
        "--runs",
        "1",
        "--workdir",
        tmp_path,
        "--out",
        out,
    ]
    res = run(argv, env=env, timeout=300, check=True)
    report = json.loads(out.read_text())
    assert [c["name"] for c in report["cases"]] == ["convert", "seq-write", "rand-write"]
    for case in report["cases"]:
        assert case["verified"], case
        assert len(case["bitback"]["times_s"]) == len(case["qemu"]["times_s"]) == 1
        assert case["ratio_qemu_over_bitback"] > 0
    assert "QEMU/bitback" in res.stdout


@pytest.mark.parametrize("tool", ["bitback"])
def test_unbuilt_tools_say_so_with_exit_69(tool: str) -> None:
    script = BIN / tool
    argv = (
        [str(script)]
        if script.exists()
        else [
            sys.executable,
            "-c",
            f"import sys; from bitback.tools.unavailable import {tool}_main as m; sys.exit(m())",
        ]
    )
    res = run(argv, expect=69)
    assert "not available yet" in res.stderr
