#!/usr/bin/env python3
"""Dirty-bitmap cost: bitbackd's memory against QEMU 7.2's, and bitback's marking speed.

Part 1, memory (both tools, same run, same inputs). Each process is started the way the test
harness starts it (``tests/helpers/vm.py``: client-mode chardev, ``qemu.qmp`` legacy client,
``-nodefaults -display none -accel tcg -S``) with one ``-drive if=virtio,id=drive0``; after each
stage the harness reads ``VmHWM`` (peak resident set) and ``VmRSS`` from ``/proc/PID/status``.

=============  ==========================================================================
process        stages
=============  ==========================================================================
``1g``         a 1 GiB qcow2 drive, no bitmap: ``idle``
``1t``         a 1 TiB (virtual) qcow2 drive, no bitmap: ``idle``, ``writes``
``1t+bitmap``  the same: ``idle``, ``bitmap`` (after ``block-dirty-bitmap-add``, granularity
               64 KiB: 2**24 granules), ``writes``, ``sha256`` (after
               ``x-debug-block-dirty-bitmap-sha256``)
=============  ==========================================================================

``writes`` is ``--writes`` HMP ``qemu-io drive0 "write -P .. OFF LEN"`` commands of
``--write-size`` bytes at distinct seeded random offsets over the whole 1 TiB (default
1024 x 64 KiB = 64 MiB, one granule and one new cluster each, and nearly always a new L2 table).
The 1 TiB images are fresh from ``bitback-img create -f qcow2 X 1T`` for every process.

What the bitmap costs is the difference between processes doing the same work with and without
it: ``bitmap`` - ``idle`` within ``1t+bitmap`` (the allocation), ``writes`` of ``1t+bitmap`` -
``writes`` of ``1t`` (the bitmap once written to; the L2 tables the writes load cost both
processes the same), and ``sha256`` - ``writes`` within ``1t+bitmap`` (the serialization QMP's
debug hash needs). QEMU's absolute figures include an emulator (TCG, machine, ROMs) that
bitbackd does not have; only the deltas compare like with like. Peaks of different processes
differ by a few hundred KiB of noise.

Reading the deltas: a bitback bitmap is a ``bitarray`` of one bit per granule, resident in full
from ``block-dirty-bitmap-add`` on (2 MiB for 2**24 granules), and the debug hash serializes a
copy of it. QEMU's HBitmap is allocated zeroed (calloc), so its pages become resident only as
writes dirty them, and the hash reads its last level in place (untouched pages map the shared
zero page). Both end near 2 MiB once writes have touched most of the bitmap.

Verification: both tools' bitmaps must report the expected ``count`` and the *same*
``sha256`` (QEMU's HBitmap serialization), and real ``qemu-img check`` / ``compare`` must find
the two written images clean and identical.

Part 2, marking speed (bitback, in process): ``DirtyBitmap.mark`` of a 64 KiB, 1 GiB and 1 TiB
write on a 1 TiB bitmap at 64 KiB granularity, next to a per-granule Python loop marking the
same 1 GiB; and ``GranuleBits.dirty_extents`` over 100,000 extents of 1 granule and of 64
granules (same time: one Python step per extent, none per granule); plus ``sha256`` of the
whole 1 TiB bitmap.

Usage: ``python bench/bitmap_memory.py [--runs 1] [--writes 1024] [--write-size 64k]``
(``--no-qemu`` measures bitbackd only). Results: a table on stdout and
``bench/results/<UTC timestamp>-bitmap-memory.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bitback.bitmaps import DirtyBitmap, GranuleBits
from helpers.vm import VM, drive_args

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
SEED = 0xB17BAC
GRANULARITY = 64 * KiB
RESULTS_DIR = Path(__file__).resolve().parent / "results"

Memory = dict[str, int]  # {"hwm": bytes, "rss": bytes}


def parse_size(text: str) -> int:
    """``64k``, ``1M`` or a byte count; a positive multiple of 512."""
    text = text.strip().lower().removesuffix("b").removesuffix("i")
    unit = {"k": KiB, "m": MiB, "g": GiB}.get(text[-1:], 1)
    number = text[:-1] if unit != 1 else text
    try:
        size = int(number) * unit
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if size <= 0 or size % 512:
        raise argparse.ArgumentTypeError(f"size must be a positive multiple of 512: {text!r}")
    return size


def mib(n: float) -> str:
    return f"{n / MiB:.1f}"


def memory(pid: int) -> Memory:
    """Peak and current resident set of ``pid``, in bytes."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                fields[key] = int(value.split()[0]) * KiB
    return {"hwm": fields["VmHWM"], "rss": fields["VmRSS"]}


def bitback_img() -> list[str]:
    beside = Path(sys.executable).parent / "bitback-img"
    if beside.is_file():
        return [str(beside)]
    return [sys.executable, "-m", "bitback.tools.img.cli"]


def must(argv: Sequence[str | Path], what: str) -> str:
    res = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=3600, check=False
    )
    if res.returncode != 0:
        sys.exit(f"bench: {what} failed (exit {res.returncode}): {res.stderr.strip()}")
    return res.stdout


def version(argv: Sequence[str]) -> str:
    try:
        res = subprocess.run(
            [*argv, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except OSError as exc:
        return f"unknown ({exc})"
    lines = res.stdout.splitlines()
    return lines[0] if lines else f"unknown (exit {res.returncode})"


# --- part 1: memory ---------------------------------------------------------------------


def plan_writes(count: int, size: int) -> list[tuple[int, int]]:
    """(pattern, offset) of ``count`` writes of ``size`` bytes at distinct random offsets
    aligned to ``size``, spread over the whole 1 TiB."""
    slots = random.Random(SEED).sample(range(TiB // size), count)
    return [(i % 255 + 1, slot * size) for i, slot in enumerate(slots)]


def dirty_granules(writes: list[tuple[int, int]], size: int) -> int:
    return len(
        {
            g
            for _, off in writes
            for g in range(off // GRANULARITY, (off + size - 1) // GRANULARITY + 1)
        }
    )


class Profiler:
    """Runs the three processes of one tool and records memory after each stage."""

    def __init__(self, tool: str, work: Path, writes: list[tuple[int, int]], size: int) -> None:
        self.tool = tool
        self.work = work
        self.writes = writes
        self.size = size
        self.notes: dict[str, Any] = {}

    def image(self, name: str, virtual: str) -> Path:
        path = self.work / f"{self.tool}-{name}.qcow2"
        path.unlink(missing_ok=True)
        must([*bitback_img(), "create", "-q", "-f", "qcow2", path, virtual], "creating an image")
        return path

    def write_all(self, vm: VM) -> float:
        start = time.perf_counter()
        for pattern, offset in self.writes:
            out = vm.qemu_io("drive0", f"write -P 0x{pattern:02x} {offset} {self.size}")
            if "failed" in out or "Error" in out:  # QEMU prints nothing here on success
                raise RuntimeError(f"{self.tool}: write at {offset} failed: {out.strip()}")
        return time.perf_counter() - start

    def run(self) -> dict[str, dict[str, Memory]]:
        result: dict[str, dict[str, Memory]] = {}
        with VM(self.tool, drive_args(self.image("1g", "1G"))) as vm:
            assert vm.proc is not None
            vm.ok("query-block")
            result["1g"] = {"idle": memory(vm.proc.pid)}
            vm.shutdown()
        with VM(self.tool, drive_args(self.image("1t", "1T"))) as vm:
            assert vm.proc is not None
            vm.ok("query-block")
            stages = {"idle": memory(vm.proc.pid)}
            self.notes["writes_s_no_bitmap"] = round(self.write_all(vm), 3)
            stages["writes"] = memory(vm.proc.pid)
            result["1t"] = stages
            vm.shutdown()
        written = self.image("1t-bitmap", "1T")
        with VM(self.tool, drive_args(written)) as vm:
            assert vm.proc is not None
            vm.ok("query-block")
            stages = {"idle": memory(vm.proc.pid)}
            vm.ok("block-dirty-bitmap-add", node="drive0", name="bitmap0", granularity=GRANULARITY)
            stages["bitmap"] = memory(vm.proc.pid)
            self.notes["writes_s_bitmap"] = round(self.write_all(vm), 3)
            stages["writes"] = memory(vm.proc.pid)
            self.notes["count"] = vm.bitmap_info("drive0", "bitmap0")["count"]
            reply = vm.ok("x-debug-block-dirty-bitmap-sha256", node="drive0", name="bitmap0")
            self.notes["sha256"] = reply["sha256"]
            stages["sha256"] = memory(vm.proc.pid)
            result["1t+bitmap"] = stages
            code = vm.shutdown()
            if code != 0:
                raise RuntimeError(f"{self.tool} exited {code} on quit: {vm.stderr.strip()}")
        self.notes["image"] = str(written)
        return result


def deltas(m: dict[str, dict[str, Memory]]) -> dict[str, Memory]:
    """Growth attributable to the bitmap, in bytes, of the peak (``hwm``) and of the current
    resident set (``rss``); see the module docstring. ``sha256`` is a transient: only its
    ``hwm`` says something (and only when it exceeds the earlier peak)."""
    b, c = m["1t+bitmap"], m["1t"]
    pairs = {
        "add": (b["bitmap"], b["idle"]),
        "writes": (b["writes"], c["writes"]),
        "sha256": (b["sha256"], b["writes"]),
    }
    return {k: {f: x[f] - y[f] for f in ("hwm", "rss")} for k, (x, y) in pairs.items()}


def median_memory(runs: list[dict[str, dict[str, Memory]]]) -> dict[str, dict[str, Memory]]:
    first = runs[0]
    return {
        proc: {
            stage: {
                key: int(statistics.median(r[proc][stage][key] for r in runs))
                for key in first[proc][stage]
            }
            for stage in first[proc]
        }
        for proc in first
    }


# --- part 2: marking speed -----------------------------------------------------------------


def best_of(
    fn: Callable[[], object], repeat: int, prepare: Callable[[], object] | None = None
) -> float:
    """Median seconds of ``repeat`` calls of ``fn`` (``prepare`` runs untimed before each)."""
    times = []
    for _ in range(repeat):
        if prepare is not None:
            prepare()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def count_extents(bits: GranuleBits) -> int:
    return sum(1 for _ in bits.dirty_extents())


def timings() -> dict[str, float]:
    """Seconds per operation on a 1 TiB bitmap at 64 KiB granularity (2**24 granules)."""
    rng = random.Random(SEED)
    bitmap = DirtyBitmap(TiB, GRANULARITY, "bench")
    out: dict[str, float] = {}
    for label, length in (("mark_64k", 64 * KiB), ("mark_1g", GiB), ("mark_1t", TiB)):
        offset = rng.randrange(0, TiB - length + 1) // GRANULARITY * GRANULARITY
        out[label] = best_of(
            functools.partial(bitmap.mark, offset, length),
            repeat=51 if length < TiB else 11,
            prepare=bitmap.bits.clear,
        )
    # The same 1 GiB with one Python step per granule, the cost the design avoids.
    raw = bitmap.bits._bits  # the bitarray itself, for the naive reference loop only
    first = rng.randrange(0, (TiB - GiB) // GRANULARITY)

    def per_granule() -> None:
        for i in range(first, first + GiB // GRANULARITY):
            raw[i] = 1

    out["mark_1g_python_loop"] = best_of(per_granule, repeat=11, prepare=bitmap.bits.clear)

    extents = 100_000
    stride = (TiB // GRANULARITY) // extents  # 167 granules apart
    for label, width in (("extents_100k_x1", 1), ("extents_100k_x64", 64)):
        bits = GranuleBits(TiB, GRANULARITY)
        for i in range(extents):
            bits.set_range(i * stride * GRANULARITY, width * GRANULARITY)
        found = count_extents(bits)
        if found != extents:
            raise RuntimeError(f"dirty_extents found {found} extents, expected {extents}")
        out[label] = best_of(functools.partial(count_extents, bits), repeat=5)
    full = GranuleBits(TiB, GRANULARITY)
    full.set_all()
    out["sha256_1t"] = best_of(full.sha256, repeat=11)
    return out


# --- report ----------------------------------------------------------------------------------


def print_tables(report: dict[str, Any]) -> None:
    rows: list[tuple[str, ...]] = [("tool", "process", "stage", "VmHWM MiB", "VmRSS MiB")]
    for tool, procs in report["memory"].items():
        for proc, stages in procs.items():
            for stage, m in stages.items():
                rows.append((tool, proc, stage, mib(m["hwm"]), mib(m["rss"])))
    table(rows)
    print()
    rows = [("bitmap's share, MiB (peak / current)", "add", "after writes", "sha256 (peak)")]
    for tool, d in report["bitmap_deltas"].items():
        add, wr = d["add"], d["writes"]
        rows.append((tool, f"{mib(add['hwm'])} / {mib(add['rss'])}",
                     f"{mib(wr['hwm'])} / {mib(wr['rss'])}", mib(d["sha256"]["hwm"])))  # fmt: skip
    table(rows)
    print()
    t = report["timings_s"]
    rows = [("in-process, 1 TiB bitmap, 64 KiB granules", "time")]
    for key, label in (
        ("mark_64k", "mark 64 KiB write (1 granule)"),
        ("mark_1g", "mark 1 GiB write (16384 granules)"),
        ("mark_1t", "mark 1 TiB write (16777216 granules)"),
        ("mark_1g_python_loop", "1 GiB, one Python step per granule (reference)"),
        ("extents_100k_x1", "dirty_extents: 100k extents of 1 granule"),
        ("extents_100k_x64", "dirty_extents: 100k extents of 64 granules"),
        ("sha256_1t", "sha256 of the whole bitmap"),
    ):
        v = t[key]
        rows.append((label, f"{v * 1e6:.1f} us" if v < 1e-3 else f"{v * 1e3:.1f} ms"))
    table(rows)


def table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def verify(profiles: dict[str, Profiler], expected_count: int) -> list[str]:
    problems = []
    for tool, p in profiles.items():
        if p.notes.get("count") != expected_count:
            problems.append(
                f"{tool}: bitmap count {p.notes.get('count')}, expected {expected_count}"
            )
    qemu_img = shutil.which(os.environ.get("QEMU_IMG", "qemu-img"))
    if qemu_img is None:
        return [*problems, "qemu-img not found: images not checked"]
    for tool, p in profiles.items():
        res = subprocess.run([qemu_img, "check", p.notes["image"]], capture_output=True,
                             text=True, timeout=3600, check=False)  # fmt: skip
        if res.returncode != 0:
            problems.append(f"qemu-img check of {tool}'s image: exit {res.returncode}")
    if len(profiles) == 2:
        b, q = profiles["bitback"].notes, profiles["qemu"].notes
        if b["sha256"] != q["sha256"]:
            problems.append(f"sha256 differs: bitback {b['sha256']}, qemu {q['sha256']}")
        res = subprocess.run([qemu_img, "compare", b["image"], q["image"]], capture_output=True,
                             text=True, timeout=3600, check=False)  # fmt: skip
        if res.returncode != 0:
            problems.append(f"qemu-img compare bitback vs qemu: exit {res.returncode}")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=1, help="processes per tool (median)")
    parser.add_argument("--writes", type=int, default=1024, help="HMP writes (default 1024)")
    parser.add_argument("--write-size", type=parse_size, default=64 * KiB,
                        help="bytes per write (default 64k)")  # fmt: skip
    parser.add_argument("--no-qemu", action="store_true", help="measure bitbackd only")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the images afterwards")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.writes < 1:
        parser.error("--runs and --writes must be at least 1")

    tools = ["bitback"]
    qemu_system = shutil.which(os.environ.get("QEMU_SYSTEM", "qemu-system-x86_64"))
    if not args.no_qemu:
        if qemu_system is None:
            sys.exit("bench: qemu-system-x86_64 not found (or pass --no-qemu)")
        tools.append("qemu")
    writes = plan_writes(args.writes, args.write_size)
    expected = dirty_granules(writes, args.write_size) * GRANULARITY
    base = args.workdir or Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bitback-bench-bitmap-", dir=base))
    started = dt.datetime.now(dt.UTC)
    print(f"bench: {args.writes} writes of {args.write_size} B over 1 TiB, "
          f"{args.runs} run(s) per tool, in {work}", flush=True)  # fmt: skip
    report: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "settings": {
            "runs": args.runs,
            "writes": args.writes,
            "write_size": args.write_size,
            "granularity": GRANULARITY,
            "seed": SEED,
            "expected_count": expected,
        },
        "host": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "versions": {
            "bitbackd": version([str(Path(sys.executable).parent / "bitbackd")]),
            "qemu-system-x86_64": version([qemu_system]) if qemu_system else None,
        },
        "memory": {},
        "bitmap_deltas": {},
        "notes": {},
    }
    profiles: dict[str, Profiler] = {}
    try:
        for tool in tools:
            runs = []
            for i in range(args.runs):
                profiles[tool] = Profiler(tool, work, writes, args.write_size)
                print(f"[memory] {tool} run {i + 1} ...", flush=True)
                runs.append(profiles[tool].run())
            report["memory"][tool] = median_memory(runs)
            report["bitmap_deltas"][tool] = {
                k: {f: int(statistics.median(deltas(r)[k][f] for r in runs)) for f in v}
                for k, v in deltas(runs[0]).items()
            }
            report["notes"][tool] = {k: v for k, v in profiles[tool].notes.items() if k != "image"}
        problems = verify(profiles, expected)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("[timings] in process ...", flush=True)
    report["timings_s"] = {k: round(v, 9) for k, v in timings().items()}
    report["verified"] = not problems
    report["problems"] = problems

    out = args.out or RESULTS_DIR / f"{started.strftime('%Y%m%dT%H%M%SZ')}-bitmap-memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print_tables(report)
    for tool, notes in report["notes"].items():
        print(f"{tool}: {args.writes} HMP writes took {notes['writes_s_no_bitmap']} s without "
              f"the bitmap, {notes['writes_s_bitmap']} s with it; count {notes['count']}, "
              f"sha256 {notes['sha256'][:16]}...")  # fmt: skip
    for p in problems:
        print(f"VERIFY: {p}")
    print(f"\nQEMU's absolute figures include its emulator; compare the deltas. results: {out}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
