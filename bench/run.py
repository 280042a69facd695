#!/usr/bin/env python3
"""Benchmarks: bitback's tools against QEMU 7.2's on the same machine, in the same run.

Each case runs one bitback command and the equivalent QEMU command on identical inputs: one
untimed warm-up each, then ``--runs`` timed runs each, interleaved (bitback, QEMU, QEMU,
bitback, ...) so that drift in the machine's state hits both alike. Every run starts from a
fresh target; before each timed run the harness calls ``sync`` (outside the timing) so one run's
dirty pages are not written back during the next. Page caches are never dropped.

Reported per case: median, min and max wall time of each tool, and the ratio
``QEMU_time / bitback_time`` (1.0 = parity, 0.5 = bitback takes twice as long). Results go to
``bench/results/<timestamp>.json`` and a table on stdout. After the timed runs the outputs of
both tools are checked with real ``qemu-img compare`` / ``check``; a case whose bitback output is
wrong is reported as such, since its time means nothing.

Cases (``--size`` scales every one; default 1G):

convert     ``bitback-img convert -O qcow2`` vs ``qemu-img convert -O qcow2`` of a qcow2 image
            of virtual size 2*SIZE holding SIZE bytes of random (incompressible) data: 3/4 in
            large extents (1-64 MiB), 1/4 as scattered 64 KiB clusters written later, so they
            sit after the extents in the file. Built once per invocation with real qemu-img
            from a seed.
seq-write   SIZE of 1 MiB sequential writes (``write -P``) into a fresh qcow2 image of SIZE,
            one ``bitback-io`` process vs one ``qemu-io`` process, all commands given as ``-c``
            arguments (``--io-mode stdin`` feeds them as a script to interactive mode instead).
rand-write  SIZE of 64 KiB writes at distinct, seeded random 64 KiB-aligned offsets into a
            fresh qcow2 image of 2*SIZE: every write allocates a cluster, in random order.

Usage: ``python bench/run.py [--runs 5] [--case NAME ...] [--size 1G]``, or ``make bench``.
``BITBACK_IMG`` / ``BITBACK_IO`` replace our tools' commands (``BITBACK_IMG=qemu-img`` checks the
harness itself: ratios near 1.0); ``QEMU_IMG`` / ``QEMU_IO`` name other QEMU binaries.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
SEED = 0xB17BAC
TOOLS = ("bitback", "qemu")
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_size(text: str) -> int:
    """``1G``, ``256M``, ``64k`` or a byte count; a whole number of MiB."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)[iI]?[bB]?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    unit = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1 << 40}[m.group(2).lower()]
    size = int(m.group(1)) * unit
    if size <= 0 or size % MiB:
        raise argparse.ArgumentTypeError(f"size must be a positive whole number of MiB: {text!r}")
    return size


def human(size: int) -> str:
    for unit, scale in (("G", GiB), ("M", MiB), ("K", KiB)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


# --- tools ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tools:
    bitback_img: list[str]
    bitback_io: list[str]
    qemu_img: str
    qemu_io: str

    def img(self, tool: str) -> list[str]:
        return list(self.bitback_img) if tool == "bitback" else [self.qemu_img]

    def io(self, tool: str) -> list[str]:
        return list(self.bitback_io) if tool == "bitback" else [self.qemu_io]


def _ours(script: str, module: str, override: str) -> list[str]:
    if os.environ.get(override):  # e.g. BITBACK_IMG=qemu-img to test the harness itself
        return os.environ[override].split()
    beside = Path(sys.executable).parent / script
    if beside.is_file():
        return [str(beside)]
    found = shutil.which(script)
    return [found] if found else [sys.executable, "-m", module]


def find_tools() -> Tools:
    qemu_img = shutil.which(os.environ.get("QEMU_IMG", "qemu-img"))
    qemu_io = shutil.which(os.environ.get("QEMU_IO", "qemu-io"))
    if not qemu_img or not qemu_io:
        sys.exit(
            "bench: QEMU's qemu-img and qemu-io are required (Debian: apt-get install qemu-utils)"
        )
    return Tools(
        bitback_img=_ours("bitback-img", "bitback.tools.img.cli", "BITBACK_IMG"),
        bitback_io=_ours("bitback-io", "bitback.tools.io.cli", "BITBACK_IO"),
        qemu_img=qemu_img,
        qemu_io=qemu_io,
    )


def first_line(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(
            [*argv, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"
    lines = out.stdout.splitlines()
    if out.returncode != 0 or not lines:
        return f"unknown (--version: exit {out.returncode})"
    return lines[0]


def must(argv: Sequence[str | Path], what: str) -> str:
    """Run a preparation or verification step; exit the harness if it fails."""
    res = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=3600, check=False
    )
    if res.returncode != 0:
        sys.exit(f"bench: {what} failed (exit {res.returncode}): {res.stderr.strip()}")
    return res.stdout


# --- cases ----------------------------------------------------------------------------------


@dataclass
class Case:
    """One comparison. Subclasses say how to prepare, reset, run and verify."""

    name: str
    description: str
    tools: Tools
    work: Path
    size: int
    io_mode: str
    notes: list[str] = field(default_factory=list)

    def prepare(self) -> None:
        """Build the inputs shared by every run (once per invocation)."""

    def target(self, tool: str) -> Path:
        return self.work / f"{self.name}-{tool}.qcow2"

    def reset(self, tool: str) -> None:
        """Give ``tool`` a fresh target before a run (not timed)."""
        self.target(tool).unlink(missing_ok=True)

    def command(self, tool: str) -> tuple[list[str], str | None]:
        """argv and standard input of one run of ``tool``."""
        raise NotImplementedError

    def verify(self) -> list[str]:
        """Problems with the outputs of the last runs (empty: both are right)."""
        return []

    def check_image(self, tool: str) -> list[str]:
        res = subprocess.run(
            [self.tools.qemu_img, "check", "-f", "qcow2", str(self.target(tool))],
            capture_output=True,
            text=True,
            timeout=3600,
            check=False,
        )
        if res.returncode != 0:
            return [
                f"qemu-img check of {tool}'s image: exit {res.returncode}: "
                f"{(res.stdout + res.stderr).strip()[:300]}"
            ]
        return []

    def compare(self, a: Path, b: Path, what: str) -> list[str]:
        res = subprocess.run(
            [self.tools.qemu_img, "compare", "-f", "qcow2", "-F", "qcow2", str(a), str(b)],
            capture_output=True,
            text=True,
            timeout=3600,
            check=False,
        )
        if res.returncode != 0:
            return [
                f"qemu-img compare {what}: exit {res.returncode}: "
                f"{(res.stdout + res.stderr).strip()[:300]}"
            ]
        return []


class ConvertCase(Case):
    def source(self) -> Path:
        return self.work / "convert-source.qcow2"

    def prepare(self) -> None:
        import numpy as np  # a bitback dependency; only this case needs it

        virtual = 2 * self.size
        layout = random.Random(SEED)
        data = np.random.Generator(np.random.PCG64(SEED))
        large_mib = self.size * 3 // 4 // MiB
        small_clusters = (self.size - large_mib * MiB) // (64 * KiB)

        # Large extents: lengths of 1..64 MiB (at most a quarter of SIZE) adding up to
        # large_mib, placed in order with random gaps between them.
        max_len = max(1, min(64, self.size // MiB // 4))
        lengths: list[int] = []
        while sum(lengths) < large_mib:
            lengths.append(min(layout.randint(1, max_len), large_mib - sum(lengths)))
        free_mib = virtual // MiB - large_mib
        cuts = sorted(layout.choices(range(free_mib + 1), k=len(lengths)))
        gaps = [b - a for a, b in zip([0, *cuts[:-1]], cuts, strict=True)]
        extents: list[tuple[int, int]] = []
        pos = 0
        for gap, length in zip(gaps, lengths, strict=True):
            pos += gap
            extents.append((pos * MiB, length * MiB))
            pos += length
        # Scattered 64 KiB clusters, anywhere outside the large extents.
        taken = {off // (64 * KiB) + i for off, ln in extents for i in range(ln // (64 * KiB))}
        holes = [c for c in range(virtual // (64 * KiB)) if c not in taken]
        small = sorted(layout.sample(holes, small_clusters))

        big_raw, small_raw = self.work / "convert-large.raw", self.work / "convert-small.raw"
        for raw, pieces in (
            (big_raw, extents),
            (small_raw, [(c * 64 * KiB, 64 * KiB) for c in small]),
        ):
            with open(raw, "wb") as f:
                f.truncate(virtual)
                for off, length in pieces:
                    for done in range(0, length, 16 * MiB):
                        chunk = min(16 * MiB, length - done)
                        os.pwrite(f.fileno(), data.bytes(chunk), off + done)
        # The large extents become the image; the scattered clusters are committed into it
        # from an overlay, so they are allocated after the extents, as later guest writes are.
        src, overlay = self.source(), self.work / "convert-overlay.qcow2"
        qi = self.tools.qemu_img
        must([qi, "convert", "-f", "raw", "-O", "qcow2", big_raw, src], "building the source")
        must([qi, "convert", "-f", "raw", "-O", "qcow2", small_raw, overlay], "building overlay")
        must(
            [qi, "rebase", "-u", "-f", "qcow2", "-b", src.name, "-F", "qcow2", overlay],
            "rebasing the overlay",
        )
        must([qi, "commit", "-f", "qcow2", overlay], "committing the overlay")
        for p in (big_raw, small_raw, overlay):
            p.unlink()
        must([qi, "check", "-f", "qcow2", src], "checking the source")
        mapping = json.loads(must([qi, "map", "--output=json", "-f", "qcow2", src], "map"))
        data_bytes = sum(e["length"] for e in mapping if e.get("data"))
        self.notes.append(
            f"source: virtual {human(virtual)}, {human(data_bytes)} data in "
            f"{len(extents)} large extents + {len(small)} scattered 64K clusters, "
            f"{src.stat().st_size // MiB} MiB file"
        )

    def command(self, tool: str) -> tuple[list[str], str | None]:
        argv = [*self.tools.img(tool), "convert", "-f", "qcow2", "-O", "qcow2"]
        return [*argv, str(self.source()), str(self.target(tool))], None

    def verify(self) -> list[str]:
        problems: list[str] = []
        for tool in TOOLS:
            problems += self.compare(self.source(), self.target(tool), f"source vs {tool}'s copy")
            problems += self.check_image(tool)
        return problems


class WriteCase(Case):
    """Many ``write -P`` commands in one io-tool process into a fresh image."""

    virtual: int = 0
    commands: list[str]

    def reset(self, tool: str) -> None:
        super().reset(tool)
        # Both tools start from the same image, made by qemu-img (creation is not timed).
        must(
            [
                self.tools.qemu_img,
                "create",
                "-q",
                "-f",
                "qcow2",
                self.target(tool),
                str(self.virtual),
            ],
            "creating a target",
        )

    def command(self, tool: str) -> tuple[list[str], str | None]:
        argv = [*self.tools.io(tool), "-f", "qcow2"]
        if self.io_mode == "stdin":
            return [*argv, str(self.target(tool))], "\n".join([*self.commands, "quit", ""])
        for cmd in self.commands:
            argv += ["-c", cmd]
        return [*argv, str(self.target(tool))], None

    def verify(self) -> list[str]:
        problems = self.compare(self.target("qemu"), self.target("bitback"), "qemu vs bitback")
        for tool in TOOLS:
            problems += self.check_image(tool)
        return problems


class SeqWriteCase(WriteCase):
    def prepare(self) -> None:
        self.virtual = self.size
        n = self.size // MiB
        self.commands = [f"write -P 0x{i % 255 + 1:02x} {i * MiB} 1M" for i in range(n)]
        self.notes.append(
            f"{n} writes of 1M into a {human(self.virtual)} image, io-mode {self.io_mode}"
        )


class RandWriteCase(WriteCase):
    def prepare(self) -> None:
        self.virtual = 2 * self.size
        n = self.size // (64 * KiB)
        slots = random.Random(SEED + 1).sample(range(self.virtual // (64 * KiB)), n)
        self.commands = [
            f"write -P 0x{i % 255 + 1:02x} {slot * 64 * KiB} 64k" for i, slot in enumerate(slots)
        ]
        self.notes.append(
            f"{n} writes of 64k at distinct random offsets into a "
            f"{human(self.virtual)} image, io-mode {self.io_mode}"
        )


CASES: dict[str, tuple[type[Case], str]] = {
    "convert": (ConvertCase, "convert -O qcow2 of a 2*SIZE image holding SIZE of random data"),
    "seq-write": (SeqWriteCase, "SIZE of 1 MiB sequential writes through the io tool"),
    "rand-write": (RandWriteCase, "SIZE of 64 KiB random writes through the io tool"),
}


# --- timing ---------------------------------------------------------------------------------


@dataclass
class Series:
    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    error: str | None = None

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "times_s": [round(t, 4) for t in self.times],
            "cpu_s": [round(t, 4) for t in self.cpu],
            "error": self.error,
        }
        if self.times:
            out |= {
                "median_s": round(statistics.median(self.times), 4),
                "min_s": round(min(self.times), 4),
                "max_s": round(max(self.times), 4),
            }
        return out


def run_once(case: Case, tool: str, timeout: float) -> tuple[float, float]:
    """Reset the target, run one command; return (wall, cpu) seconds or raise RuntimeError."""
    case.reset(tool)
    argv, stdin = case.command(tool)
    os.sync()
    before = os.times()
    start = time.perf_counter()
    try:
        res = subprocess.run(
            argv,
            input=stdin,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"timed out after {timeout:g} s") from None
    wall = time.perf_counter() - start
    after = os.times()
    if res.returncode != 0:
        tail = " | ".join(res.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"exit {res.returncode}: {tail}")
    cpu = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    return wall, cpu


def bench_case(case: Case, runs: int, timeout: float) -> dict[str, Any]:
    print(f"[{case.name}] preparing ...", flush=True)
    t0 = time.perf_counter()
    case.prepare()
    print(
        f"[{case.name}] prepared in {time.perf_counter() - t0:.1f} s; {'; '.join(case.notes)}",
        flush=True,
    )
    series = {tool: Series() for tool in TOOLS}

    def attempt(tool: str, timed: bool) -> None:
        s = series[tool]
        if s.error:
            return
        try:
            wall, cpu = run_once(case, tool, timeout)
        except RuntimeError as exc:
            s.error = str(exc)
            print(f"[{case.name}] {tool}: FAILED: {exc}", flush=True)
            return
        if timed:
            s.times.append(wall)
            s.cpu.append(cpu)
        print(
            f"[{case.name}] {tool:8s} {'run' if timed else 'warm-up'} "
            f"{wall:8.3f} s (cpu {cpu:.3f} s)",
            flush=True,
        )

    for tool in TOOLS:
        attempt(tool, timed=False)
    for i in range(runs):
        for tool in TOOLS if i % 2 == 0 else TOOLS[::-1]:
            attempt(tool, timed=True)

    problems = case.verify() if not any(s.error for s in series.values()) else []
    for p in problems:
        print(f"[{case.name}] VERIFY: {p}", flush=True)
    b, q = series["bitback"], series["qemu"]
    ratio = statistics.median(q.times) / statistics.median(b.times) if b.times and q.times else None
    return {
        "name": case.name,
        "description": case.description,
        "notes": case.notes,
        "bitback": b.summary(),
        "qemu": q.summary(),
        "ratio_qemu_over_bitback": None if ratio is None else round(ratio, 4),
        "verified": not problems and not b.error and not q.error,
        "problems": problems,
    }


def print_table(results: list[dict[str, Any]]) -> None:
    def cell(s: dict[str, Any]) -> str:
        if s.get("error"):
            return "FAILED"
        if "median_s" not in s:
            return "-"
        return f"{s['median_s']:.3f} ({s['min_s']:.3f}-{s['max_s']:.3f})"

    header = (
        "case",
        "bitback s median (min-max)",
        "QEMU s median (min-max)",
        "QEMU/bitback",
        "output",
    )
    rows = [header]
    for r in results:
        ratio = r["ratio_qemu_over_bitback"]
        rows.append(
            (
                r["name"],
                cell(r["bitback"]),
                cell(r["qemu"]),
                "-" if ratio is None else f"{ratio:.3f}",
                "verified" if r["verified"] else "NOT VERIFIED",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for n, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Benchmark bitback against QEMU 7.2 (median of N runs after a warm-up)."
    )
    parser.add_argument("--runs", type=int, default=5, help="timed runs per tool (default 5)")
    parser.add_argument(
        "--case",
        action="append",
        choices=sorted(CASES),
        dest="cases",
        help="run only this case (repeatable; default: all)",
    )
    parser.add_argument(
        "--size",
        type=parse_size,
        default=GiB,
        help="data written per case, e.g. 64M for a smoke run (default 1G)",
    )
    parser.add_argument(
        "--io-mode",
        choices=("args", "stdin"),
        default="args",
        help="io commands as -c arguments (default) or a script on stdin",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        help="seconds one run may take before it counts as failed",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where to put the images (default: a new temporary directory)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the images afterwards")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON file to write (default: bench/results/<timestamp>.json)",
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    tools = find_tools()
    names = args.cases or list(CASES)
    need = 4 * args.size if "convert" in names else 2 * args.size
    base = args.workdir or Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(base).free
    if free < need + GiB // 4:
        sys.exit(f"bench: {base} has {free // MiB} MiB free; need about {need // MiB} MiB")
    work = Path(tempfile.mkdtemp(prefix="bitback-bench-", dir=base))

    started = dt.datetime.now(dt.UTC)
    report: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "settings": {
            "runs": args.runs,
            "size": args.size,
            "seed": SEED,
            "io_mode": args.io_mode,
            "warmup_runs": 1,
            "caches_dropped": False,
            "sync_before_each_run": True,
        },
        "host": {
            "platform": platform.platform(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "workdir": str(work),
        },
        "versions": {
            "bitback-img": first_line(tools.bitback_img),
            "bitback-io": first_line(tools.bitback_io),
            "qemu-img": first_line([tools.qemu_img]),
            "qemu-io": first_line([tools.qemu_io]),
        },
        "cases": [],
    }
    print(f"bench: size {human(args.size)}, {args.runs} runs + 1 warm-up per tool, in {work}")
    try:
        for name in names:
            cls, description = CASES[name]
            case = cls(
                name=name,
                description=description,
                tools=tools,
                work=work,
                size=args.size,
                io_mode=args.io_mode,
            )
            report["cases"].append(bench_case(case, args.runs, args.timeout))
            for tool in TOOLS:
                case.target(tool).unlink(missing_ok=True)
    finally:
        if args.keep:
            print(f"bench: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    out = args.out or RESULTS_DIR / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print_table(report["cases"])
    print(f"\nratio = QEMU median / bitback median (1.0 = parity); results: {out}")
    return 0 if all(c["verified"] for c in report["cases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
