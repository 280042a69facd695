"""``bench/bitmap_persistence.py`` still runs: the smallest case it has, both tools, verified.

A smoke test like ``test_dev_scripts.py::test_bench_harness_smoke`` for ``bench/run.py``: one
1 GiB disk, no data image, the ``half`` bitmap (and the ``none`` baseline), one timed run per
tool - about 7 s. The benchmark itself is run by hand (``bench/README.md``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from helpers.procs import run

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.qemu
def test_bitmap_persistence_bench_smoke(
    qemu_img: str, qemu_io: str, qemu_system: str, tmp_path: Path
) -> None:
    out = tmp_path / "result.json"
    env = {"QEMU_IMG": qemu_img, "QEMU_IO": qemu_io, "QEMU_SYSTEM": qemu_system}
    argv: list[str | Path] = [
        sys.executable, ROOT / "bench" / "bitmap_persistence.py",
        "--size", "1G", "--data", "0", "--bitmap", "half", "--runs", "1",
        "--workdir", tmp_path, "--out", out,
    ]  # fmt: skip
    res = run(argv, env=env, timeout=300, check=True)
    report = json.loads(out.read_text())
    got = {(r["phase"], r["bitmap"]) for r in report["results"]}
    assert got == {(p, b) for p in ("open", "store", "close") for b in ("none", "half")}
    for r in report["results"]:
        assert r["verified"], r
        assert len(r["bitback"]["times_s"]) == len(r["qemu"]["times_s"]) == 1
        assert r["ratio_qemu_over_bitback"] > 0
    assert "QEMU/bitback" in res.stdout
