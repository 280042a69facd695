#!/usr/bin/env python3
"""Persistent dirty bitmaps: bitbackd against QEMU 7.2, same machine, same run.

A persistent bitmap is loaded from the qcow2 image when the image opens and stored into it when
the image closes (``src/bitback/block/drivers/qcow2/bitmap_store.py``; QEMU:
``block/qcow2-bitmap.c``). This harness times both ends, and measures peak memory, for bitbackd
and for ``qemu-system-x86_64``. Both are started the way the test harness starts them
(``tests/helpers/vm.py``: ``-nodefaults -display none -accel tcg -S``, client-mode QMP chardev,
the ``qemu.qmp`` legacy client, one ``-drive if=virtio,id=drive0,file=IMG,format=qcow2``) and
are sent the same QMP commands, as in ``bench/backup.py``. With ``-S`` no guest code runs.

Images (built once per invocation with QEMU's own tools, never with bitback's), for every
virtual size (``--size``, default 1 GiB, 64 GiB and 1 TiB):

* **data**: ``empty`` (fresh ``qemu-img create``), or ``--data`` bytes (default 1 GiB, capped
  at the virtual size) of allocated data clusters at the start of the disk and of the file
  (``qemu-img create -o preallocation=metadata``, then ``qemu-img resize``: real clusters in
  the refcounts and L2 tables, a sparse file, so copies are cheap);
* **bitmap**: ``none``; ``few``: one 64 KiB-granularity bitmap ``pattern`` with 16 dirty
  extents of 1-16 granules at seeded random places; ``half``: the same bitmap about 50% dirty
  in about 4096 seeded runs alternating dirty/clean, each 1..2L granules long with
  L = granules / 8192 (1 GiB: runs of 1-4 granules; 1 TiB: 64 KiB-256 MiB), so every bitmap
  data cluster holds a mix (32 data clusters of 64 KiB for 1 TiB).

The pattern is made in a scratch qcow2 with 2 MiB clusters (``qemu-img bitmap --add``, then
``qemu-io -t unsafe`` ``write -z`` of every dirty run: QEMU marks the bitmap, and with 2 MiB
clusters only a couple of L2 tables are needed even for 1 TiB), and copied into the images with
``qemu-img bitmap --merge pattern -b SCRATCH``. A bitmap image is therefore the same image as
its ``none`` twin plus the bitmap's directory, table and data clusters, stored after the data.

Measurements (every run is a fresh process on a fresh ``cp --sparse=always`` copy of the image,
then ``sync``; nothing of that is timed):

* **open**: from launching the process until the harness has the reply of the first
  ``query-block`` (QMP greeting and ``qmp_capabilities`` included). The image is opened
  read-write, so both also rewrite the bitmap directory in place to flag the bitmap IN_USE
  (with flushes) before they answer. The cost of the bitmap is this time minus the same
  size's ``none`` time (same data).
* **store** (same process): ``sync``, then from sending ``quit`` until the harness has reaped
  the process (``wait4``). The loaded bitmap is written back to new clusters and its old ones
  are freed: both tools store at close whatever they loaded.
* **close**: a process on the ``none`` image of the same size and data adds a bitmap
  (``block-dirty-bitmap-add node=drive0 name=b0 granularity=65536 persistent=true``), then
  dirties it with the pattern - ``blockdev-add`` of the scratch image read-only as node
  ``src``, ``block-dirty-bitmap-merge target=b0 bitmaps=[{node: src, name: pattern}]``,
  ``blockdev-del src`` - (HMP writes of 50% of 1 TiB would take hours; the merge gives the
  same bits with the same commands in both tools), ``sync``, then the timed ``quit`` as
  above: it stores one new bitmap. ``none`` is the same process without the bitmap.
* **memory**: ``VmHWM`` (peak resident set) from ``/proc/PID/status`` right after the
  ``query-block`` of every open run, and the process's peak over its whole life, load and store
  included (``ru_maxrss`` from ``wait4``). QEMU's absolute figures include its emulator (TCG,
  machine, ROMs); compare each tool's bitmap rows with its own ``none`` row.

CPU time (user + system, all threads) is recorded per timed part: for open, the process's whole
CPU time at the reply (``/proc/PID/stat``, 10 ms ticks); for store and close, ``wait4``'s total
minus ``/proc/PID/stat`` before ``quit``.

Method as in the other benches: one untimed warm-up run per tool and case, then ``--runs`` timed
runs (default 5) interleaved (bitback, QEMU, QEMU, bitback, ...); median, min and max;
**ratio = QEMU median / bitback median** (1.0 = parity, 0.5 = bitback takes twice as long).
Page caches are never dropped. The 1-minute load average before and after each case is recorded.
bitbackd runs with its bytecode cached (``PYTHONPYCACHEPREFIX`` in the work directory, filled by
the first warm-up; ``PYTHONDONTWRITEBYTECODE`` is dropped for the children), as an installed
program does: compiling every module on every start would add about 0.25 s to each open.

Verification: the warm-up open run of each tool must load the bitmap with the expected
``count`` and the expected ``x-debug-block-dirty-bitmap-sha256`` (computed in process from the
pattern), every timed run must report the expected count, and after the timed runs each tool's
last image must pass real ``qemu-img check``, list exactly the expected bitmap without
``in-use``, and give the expected count and sha256 when real QEMU opens it read-only.

``--profile`` adds an in-process cProfile of bitback's open (bitmap load and IN_USE marking)
and close (bitmap store) on the largest size's bitmap images, with unprofiled timings.

Usage: ``python bench/bitmap_persistence.py [--runs 5] [--size 1G --size 64G --size 1T]
[--data 1G] [--profile]``; ``--quick`` is a smoke run (1 GiB and 1 TiB, 256 MiB of data, one
timed run: about a minute). The default run takes about 8 minutes and needs little disk space
(the data files are sparse). Results: tables on stdout and
``bench/results/<UTC timestamp>-bitmap-persistence.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime as dt
import io
import json
import os
import platform
import pstats
import random
import re
import select
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bitback.bitmaps import GranuleBits
from helpers.vm import VM, drive_args, emulator_argv

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
SEED = 0xB17BAC
TOOLS = ("bitback", "qemu")
BITMAPS = ("none", "few", "half")
GRANULARITY = 64 * KiB
PATTERN = "pattern"  # the bitmap's name in the prepared images
NEW = "b0"  # the bitmap the close runs add
FEW_EXTENTS = 16
HALF_RUNS = 4096  # about this many dirty runs in the ``half`` pattern, whatever the size
SCRATCH_CLUSTER = 2 * MiB
DEFAULT_SIZES = (GiB, 64 * GiB, TiB)
QUICK_SIZES = (GiB, TiB)
RESULTS_DIR = Path(__file__).resolve().parent / "results"
TICK = os.sysconf("SC_CLK_TCK")


def parse_size(text: str) -> int:
    """``1G``, ``64G``, ``1T``, ``256M`` or a byte count; a whole number of MiB (0 allowed)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)[iI]?[bB]?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    unit = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": TiB}[m.group(2).lower()]
    size = int(m.group(1)) * unit
    if size % MiB:
        raise argparse.ArgumentTypeError(f"size must be a whole number of MiB: {text!r}")
    return size


def human(size: int) -> str:
    for unit, scale in (("T", TiB), ("G", GiB), ("M", MiB), ("K", KiB)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


def must(argv: Sequence[str | Path], what: str, stdin: str | None = None) -> str:
    res = subprocess.run(
        [str(a) for a in argv],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    if res.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {res.returncode}): {res.stderr.strip()}")
    return res.stdout


def cpu_seconds(pid: int) -> float:
    """User + system time of every thread of ``pid`` so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14, 15)


def memory(pid: int) -> dict[str, int]:
    """Peak (``hwm``) and current (``rss``) resident set of ``pid``, in bytes."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out["hwm" if key == "VmHWM" else "rss"] = int(value.split()[0]) * KiB
    return out


# --- patterns and images --------------------------------------------------------------------


def pattern_runs(bitmap: str, size: int) -> list[tuple[int, int]]:
    """Dirty runs of ``bitmap`` on a disk of ``size`` bytes: (first granule, granules)."""
    granules = -(-size // GRANULARITY)
    rng = random.Random(f"{SEED}-{bitmap}-{size}")
    if bitmap == "none":
        return []
    if bitmap == "few":
        # Distinct slots of 32 granules, each holding one extent of 1-16 granules, so no two
        # extents touch.
        slots = sorted(rng.sample(range(granules // 32), FEW_EXTENTS))
        return [(s * 32 + rng.randrange(16), rng.randint(1, 16)) for s in slots]
    if bitmap == "half":
        scale = max(1, granules // (2 * HALF_RUNS))
        runs: list[tuple[int, int]] = []
        pos = 0
        while True:
            pos += rng.randint(1, 2 * scale)  # clean
            if pos >= granules:
                return runs
            n = min(rng.randint(1, 2 * scale), granules - pos)
            runs.append((pos, n))
            pos += n
    raise ValueError(bitmap)


@dataclass(frozen=True)
class Expect:
    count: int  # bytes, as query-block reports
    sha256: str  # x-debug-block-dirty-bitmap-sha256


def expected(bitmap: str, size: int) -> Expect | None:
    if bitmap == "none":
        return None
    bits = GranuleBits(size, GRANULARITY)
    for first, n in pattern_runs(bitmap, size):
        bits.set_range(first * GRANULARITY, n * GRANULARITY)
    return Expect(bits.count(), bits.sha256())


@dataclass(frozen=True)
class Variant:
    size: int
    data: int  # bytes of allocated clusters at the start (0: an empty image)
    bitmap: str

    @property
    def data_label(self) -> str:
        return "empty" if not self.data else human(self.data)

    @property
    def name(self) -> str:
        return f"{human(self.size)}/{self.data_label}/{self.bitmap}"

    def without_bitmap(self) -> Variant:
        return Variant(self.size, self.data, "none")


@dataclass
class Images:
    """Prepared inputs, built on first use with QEMU's tools, and per-run copies."""

    work: Path
    qemu_img: str
    qemu_io: str
    built: dict[Any, Path] = field(default_factory=dict)

    def scratch(self, size: int, bitmap: str) -> Path:
        """A 2 MiB-cluster qcow2 whose bitmap ``pattern`` holds the pattern."""
        key = ("scratch", size, bitmap)
        if key not in self.built:
            path = self.work / f"scratch-{human(size)}-{bitmap}.qcow2"
            must(
                [
                    self.qemu_img,
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    f"cluster_size={SCRATCH_CLUSTER}",
                    path,
                    str(size),
                ],
                "creating a scratch",
            )
            must(
                [self.qemu_img, "bitmap", "--add", "-g", str(GRANULARITY), path, PATTERN],
                "adding the scratch bitmap",
            )
            script = "".join(
                f"write -z {first * GRANULARITY} {n * GRANULARITY}\n"
                for first, n in pattern_runs(bitmap, size)
            )
            must(
                [self.qemu_io, "-t", "unsafe", "-f", "qcow2", path],
                "dirtying the scratch",
                stdin=script + "quit\n",
            )
            self.built[key] = path
        return self.built[key]

    def master(self, v: Variant) -> Path:
        if v not in self.built:
            path = self.work / f"master-{human(v.size)}-{v.data_label}-{v.bitmap}.qcow2"
            if v.bitmap == "none":
                if v.data:
                    data = min(v.data, v.size)
                    must(
                        [
                            self.qemu_img,
                            "create",
                            "-q",
                            "-f",
                            "qcow2",
                            "-o",
                            "preallocation=metadata",
                            path,
                            str(data),
                        ],
                        "creating an image",
                    )
                    if v.size > data:
                        must(
                            [self.qemu_img, "resize", "-q", "-f", "qcow2", path, str(v.size)],
                            "growing an image",
                        )
                else:
                    must(
                        [self.qemu_img, "create", "-q", "-f", "qcow2", path, str(v.size)],
                        "creating an image",
                    )
            else:
                copy(self.master(v.without_bitmap()), path)
                must(
                    [self.qemu_img, "bitmap", "--add", "-g", str(GRANULARITY), path, PATTERN],
                    "adding the bitmap",
                )
                must(
                    [
                        self.qemu_img,
                        "bitmap",
                        "--merge",
                        PATTERN,
                        "-b",
                        self.scratch(v.size, v.bitmap),
                        "-F",
                        "qcow2",
                        path,
                        PATTERN,
                    ],
                    "merging the pattern",
                )
            self.built[v] = path
        return self.built[v]

    def run_copy(self, v: Variant, kind: str, tool: str) -> Path:
        """A fresh copy of ``v``'s image for one run, synced to disk."""
        path = self.work / f"run-{kind}-{tool}.qcow2"
        copy(self.master(v), path)
        os.sync()
        return path


def copy(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    must(["cp", "--sparse=always", src, dst], "copying an image")


# --- one process ----------------------------------------------------------------------------


@dataclass
class Quit:
    wall: float
    cpu: float
    maxrss: int  # bytes, the process's peak over its life


def timed_quit(vm: VM, timeout: float) -> Quit:
    """``quit``; the clock stops when the process has been reaped."""
    assert vm.proc is not None and vm.monitor is not None
    pid = vm.proc.pid
    cpu0 = cpu_seconds(pid)
    pidfd = os.pidfd_open(pid)
    try:
        start = time.perf_counter()
        reply = vm.qmp("quit")
        ready, _, _ = select.select([pidfd], [], [], timeout)
        if not ready:
            raise RuntimeError(f"{vm.backend}: still running {timeout} s after quit")
        _, status, usage = os.wait4(pid, 0)
        wall = time.perf_counter() - start
    finally:
        os.close(pidfd)
    code = os.waitstatus_to_exitcode(status)
    vm.proc.returncode = vm.exitcode = code
    if vm.proc.stderr is not None:
        vm.stderr = vm.proc.stderr.read()
    with contextlib.suppress(Exception):  # the peer is gone
        vm.monitor.close()
    if "return" not in reply or code != 0:
        raise RuntimeError(f"{vm.backend}: quit {reply}, exit {code}: {vm.stderr.strip()[-300:]}")
    return Quit(wall, usage.ru_utime + usage.ru_stime - cpu0, usage.ru_maxrss * KiB)


@dataclass
class Run:
    wall: float  # the timed part
    cpu: float
    hwm: int = 0  # VmHWM after the open (open runs) or before quit (close runs)
    rss: int = 0  # VmRSS at the same moment
    maxrss: int = 0  # peak over the process's life


def bitmap_counts(blocks: list[dict[str, Any]]) -> dict[str, int]:
    bitmaps = blocks[0]["inserted"].get("dirty-bitmaps", [])
    return {b["name"]: int(b["count"]) for b in bitmaps}


def open_run(
    images: Images, v: Variant, tool: str, timeout: float, check_sha: bool, expect: Expect | None
) -> tuple[Run, Run]:
    """One process: the timed open, then the timed store at ``quit``."""
    path = images.run_copy(v, "open", tool)
    vm = VM(tool, drive_args(path), timeout=timeout)
    try:
        start = time.perf_counter()
        vm.launch()
        blocks = vm.ok("query-block")
        wall = time.perf_counter() - start
        assert vm.proc is not None
        opened = Run(wall, cpu_seconds(vm.proc.pid), **memory(vm.proc.pid))
        counts = bitmap_counts(blocks)
        want = {} if expect is None else {PATTERN: expect.count}
        if counts != want:
            raise RuntimeError(f"{tool}: loaded bitmaps {counts}, expected {want}")
        if check_sha and expect is not None:
            sha = vm.ok("x-debug-block-dirty-bitmap-sha256", node="drive0", name=PATTERN)
            if sha["sha256"] != expect.sha256:
                raise RuntimeError(
                    f"{tool}: loaded sha256 {sha['sha256']}, expected {expect.sha256}"
                )
        os.sync()
        q = timed_quit(vm, timeout)
    finally:
        vm.__exit__()
    opened.maxrss = q.maxrss
    return opened, Run(q.wall, q.cpu, hwm=opened.hwm, rss=opened.rss, maxrss=q.maxrss)


def close_run(images: Images, v: Variant, tool: str, timeout: float, expect: Expect | None) -> Run:
    """One process on the bitmap-less image: add ``b0``, dirty it by merge, timed ``quit``."""
    path = images.run_copy(v.without_bitmap(), "close", tool)
    vm = VM(tool, drive_args(path), timeout=timeout)
    try:
        vm.launch()
        if v.bitmap != "none":
            assert expect is not None
            vm.ok(
                "blockdev-add",
                driver="qcow2",
                node_name="src",
                read_only=True,
                file={"driver": "file", "filename": str(images.scratch(v.size, v.bitmap))},
            )
            vm.ok(
                "block-dirty-bitmap-add",
                node="drive0",
                name=NEW,
                granularity=GRANULARITY,
                persistent=True,
            )
            vm.ok(
                "block-dirty-bitmap-merge",
                node="drive0",
                target=NEW,
                bitmaps=[{"node": "src", "name": PATTERN}],
            )
            vm.ok("blockdev-del", node_name="src")
            count = vm.bitmap_info("drive0", NEW)["count"]
            if count != expect.count:
                raise RuntimeError(
                    f"{tool}: b0 count {count} after the merge, expected {expect.count}"
                )
        vm.events()
        assert vm.proc is not None
        mem = memory(vm.proc.pid)
        os.sync()
        q = timed_quit(vm, timeout)
    finally:
        vm.__exit__()
    return Run(q.wall, q.cpu, maxrss=q.maxrss, **mem)


def verify_stored(
    path: Path, name: str | None, expect: Expect | None, qemu_img: str, timeout: float
) -> list[str]:
    """What a tool left behind, judged by real QEMU."""
    problems = []
    res = subprocess.run(
        [qemu_img, "check", "-q", str(path)],
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    if res.returncode != 0:
        problems.append(f"qemu-img check: exit {res.returncode}: {res.stdout.strip()}")
    info = json.loads(must([qemu_img, "info", "--output=json", path], "qemu-img info"))
    listed = info.get("format-specific", {}).get("data", {}).get("bitmaps", [])
    want = [] if name is None else [{"flags": ["auto"], "name": name, "granularity": GRANULARITY}]
    if listed != want:
        problems.append(f"bitmaps in the image: {listed}, expected {want}")
    if name is not None and expect is not None:
        spec = str(path).replace(",", ",,")
        with VM(
            "qemu",
            ["-drive", f"if=virtio,id=drive0,file={spec},format=qcow2,readonly=on"],
            timeout=timeout,
        ) as vm:
            count = vm.bitmap_info("drive0", name)["count"]
            sha = vm.ok("x-debug-block-dirty-bitmap-sha256", node="drive0", name=name)["sha256"]
            vm.shutdown()
        if (count, sha) != (expect.count, expect.sha256):
            problems.append(
                f"QEMU loads count {count} sha256 {sha[:16]}..., expected "
                f"{expect.count} {expect.sha256[:16]}..."
            )
    return problems


# --- cases ----------------------------------------------------------------------------------


def summary(rs: list[Run]) -> dict[str, Any]:
    if not rs:
        return {"times_s": []}
    walls = [r.wall for r in rs]
    return {
        "times_s": [round(w, 5) for w in walls],
        "cpu_s": [round(r.cpu, 3) for r in rs],
        "median_s": round(statistics.median(walls), 5),
        "min_s": round(min(walls), 5),
        "max_s": round(max(walls), 5),
        "cpu_median_s": round(statistics.median(r.cpu for r in rs), 3),
        "hwm_median": int(statistics.median(r.hwm for r in rs)),
        "rss_median": int(statistics.median(r.rss for r in rs)),
        "maxrss_median": int(statistics.median(r.maxrss for r in rs)),
    }


def attempt(
    images: Images,
    v: Variant,
    kind: str,
    tool: str,
    series: dict[str, dict[str, list[Run]]] | None,
    errors: dict[str, str],
    timeout: float,
    expect: Expect | None,
) -> None:
    """One run of ``kind`` (``open`` or ``close``); timed unless ``series`` is None (the
    warm-up, which also checks the loaded bitmap's sha256). A tool that failed once is not
    run again in this case."""
    if tool in errors:
        return
    try:
        if kind == "open":
            got = dict(
                zip(
                    ("open", "store"),
                    open_run(images, v, tool, timeout, series is None, expect),
                    strict=True,
                )
            )
        else:
            got = {"close": close_run(images, v, tool, timeout, expect)}
    except Exception as exc:  # reported; the other tool goes on
        errors[tool] = str(exc)
        print(f"[{v.name} {kind}] {tool}: FAILED: {exc}", flush=True)
        return
    if series is not None:
        for phase, r in got.items():
            series[phase][tool].append(r)
    print(
        f"[{v.name} {kind}] {tool:8s} {'warm-up' if series is None else 'run'} "
        + ", ".join(f"{p} {r.wall * 1e3:.1f} ms" for p, r in got.items()),
        flush=True,
    )


def bench_variant(
    v: Variant, images: Images, runs: int, timeout: float, qemu_img: str
) -> list[dict[str, Any]]:
    """The ``open``/``store`` case and the ``close`` case of one image variant."""
    expect = expected(v.bitmap, v.size)
    out = []
    for kind in ("open", "close"):
        load_before = os.getloadavg()[0]
        series: dict[str, dict[str, list[Run]]] = {
            phase: {t: [] for t in TOOLS}
            for phase in (("open", "store") if kind == "open" else ("close",))
        }
        errors: dict[str, str] = {}

        for tool in TOOLS:
            attempt(images, v, kind, tool, None, errors, timeout, expect)
        for i in range(runs):
            for tool in TOOLS if i % 2 == 0 else TOOLS[::-1]:
                attempt(images, v, kind, tool, series, errors, timeout, expect)
        problems = [f"{tool}: {e}" for tool, e in errors.items()]
        for tool in TOOLS:
            if tool in errors:
                continue
            stored = PATTERN if kind == "open" else NEW
            name = None if v.bitmap == "none" else stored
            last = images.work / f"run-{kind}-{tool}.qcow2"
            problems += [
                f"{tool}'s image: {p}" for p in verify_stored(last, name, expect, qemu_img, timeout)
            ]
        for p in problems:
            print(f"[{v.name} {kind}] VERIFY: {p}", flush=True)
        load = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        for phase, by_tool in series.items():
            b, q = summary(by_tool["bitback"]), summary(by_tool["qemu"])
            ratio = q["median_s"] / b["median_s"] if "median_s" in b and "median_s" in q else None
            out.append(
                {
                    "phase": phase,
                    "size": v.size,
                    "data": v.data,
                    "bitmap": v.bitmap,
                    "expected_count": None if expect is None else expect.count,
                    "bitback": b,
                    "qemu": q,
                    "ratio_qemu_over_bitback": None if ratio is None else round(ratio, 4),
                    "verified": not problems,
                    "problems": problems,
                    "loadavg_1min": load,
                }
            )
    return out


# --- profile --------------------------------------------------------------------------------


def profile_bitback(images: Images, variants: list[Variant]) -> str:
    """bitback's own load and store, in process: unprofiled medians, then one cProfile."""
    from bitback.block.open import open_image

    text = io.StringIO()
    for v in variants:
        src = images.master(v)
        path = images.work / "profile.qcow2"
        opens, closes = [], []
        for _ in range(3):
            copy(src, path)
            os.sync()
            t0 = time.perf_counter()
            node = open_image(str(path), "qcow2")
            t1 = time.perf_counter()
            node.close()
            closes.append(time.perf_counter() - t1)
            opens.append(t1 - t0)
        text.write(
            f"== {v.name}: in process, median of 3: open (load + IN_USE) "
            f"{statistics.median(opens) * 1e3:.1f} ms, close (store + flush) "
            f"{statistics.median(closes) * 1e3:.1f} ms\n"
        )
        copy(src, path)
        os.sync()
        prof = cProfile.Profile()
        node = prof.runcall(open_image, str(path), "qcow2")
        text.write(profile_text(prof, "open, profiled"))
        prof = cProfile.Profile()
        prof.runcall(node.close)
        text.write(profile_text(prof, "close, profiled"))
    return text.getvalue()


def profile_text(prof: cProfile.Profile, label: str, limit: int = 12) -> str:
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    total = stats.total_tt  # type: ignore[attr-defined]
    out.write(f"-- {label}: {total * 1e3:.1f} ms\n")
    stats.strip_dirs().sort_stats("cumulative").print_stats(limit)
    return out.getvalue()


# --- report ---------------------------------------------------------------------------------

PHASES = {
    "open": "open: launch -> first query-block reply (bitmap loaded, flagged IN_USE)",
    "store": "store: quit of the open processes -> reaped (the loaded bitmap written back)",
    "close": "close: quit -> reaped, after add persistent=true + merge of the pattern",
}


def print_tables(results: list[dict[str, Any]]) -> None:
    def cell(s: dict[str, Any]) -> str:
        if "median_s" not in s:
            return "FAILED"
        return f"{s['median_s'] * 1e3:.1f} ({s['min_s'] * 1e3:.1f}-{s['max_s'] * 1e3:.1f})"

    base = {(r["phase"], r["size"], r["data"]): r for r in results if r["bitmap"] == "none"}

    def cost(r: dict[str, Any]) -> str:
        b = base.get((r["phase"], r["size"], r["data"]))
        if r["bitmap"] == "none" or b is None:
            return "-"
        parts = []
        for tool in TOOLS:
            x, y = r[tool].get("median_s"), b[tool].get("median_s")
            parts.append("?" if x is None or y is None else f"{(x - y) * 1e3:+.1f}")
        return " / ".join(parts)

    for phase, title in PHASES.items():
        rows = [r for r in results if r["phase"] == phase]
        if not rows:
            continue
        print(f"\n{title}")
        table(
            [
                (
                    "size",
                    "data",
                    "bitmap",
                    "bitback ms median (min-max)",
                    "QEMU ms median (min-max)",
                    "QEMU/bitback",
                    "bitmap cost ms bitback / QEMU",
                    "CPU ms bitback / QEMU",
                    "output",
                )
            ]
            + [
                (
                    human(r["size"]),
                    human(r["data"]) if r["data"] else "empty",
                    r["bitmap"],
                    cell(r["bitback"]),
                    cell(r["qemu"]),
                    "-"
                    if r["ratio_qemu_over_bitback"] is None
                    else f"{r['ratio_qemu_over_bitback']:.3f}",
                    cost(r),
                    cpu_cell(r),
                    "verified" if r["verified"] else "NOT VERIFIED",
                )
                for r in rows
            ]
        )
    largest = max(r["size"] for r in results)
    rows = [r for r in results if r["phase"] == "open" and r["size"] == largest]
    if rows:
        print(
            f"\nmemory, {human(largest)} disk, MiB: VmRSS / VmHWM right after the open, peak "
            "over the process's life (ru_maxrss: load + store), and that peak minus the same "
            "data's 'none'"
        )
        mem_rows: list[tuple[str, ...]] = [
            (
                "data",
                "bitmap",
                "bitback RSS / HWM / life peak",
                "QEMU RSS / HWM / life peak",
                "bitmap's share of the peak, bitback / QEMU",
            )
        ]
        for r in rows:
            b = base.get(("open", r["size"], r["data"]))
            cells, shares = [], []
            for tool in TOOLS:
                s = r[tool]
                if "hwm_median" not in s:
                    cells.append("FAILED")
                    shares.append("?")
                    continue
                cells.append(
                    " / ".join(
                        f"{s[k] / MiB:.1f}" for k in ("rss_median", "hwm_median", "maxrss_median")
                    )
                )
                if r["bitmap"] == "none" or b is None or "maxrss_median" not in b[tool]:
                    shares.append("-")
                else:
                    shares.append(f"{(s['maxrss_median'] - b[tool]['maxrss_median']) / MiB:+.1f}")
            data = human(r["data"]) if r["data"] else "empty"
            mem_rows.append((data, r["bitmap"], *cells, " / ".join(shares)))
        table(mem_rows)


def cpu_cell(r: dict[str, Any]) -> str:
    b, q = r["bitback"].get("cpu_median_s"), r["qemu"].get("cpu_median_s")
    return "-" if b is None or q is None else f"{b * 1e3:.0f} / {q * 1e3:.0f}"


def table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def version(argv: Sequence[str]) -> str:
    try:
        res = subprocess.run(
            [*argv, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"
    lines = res.stdout.splitlines()
    return lines[0] if lines else f"unknown (exit {res.returncode})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--runs",
        type=int,
        default=None,
        help="timed runs per tool and case (default 5; 1 with --quick)",
    )
    parser.add_argument(
        "--size",
        type=parse_size,
        action="append",
        dest="sizes",
        help="virtual disk size (repeatable; default 1G, 64G and 1T)",
    )
    parser.add_argument(
        "--data",
        type=parse_size,
        default=None,
        help="allocated data in the 'data' images (default 1G, 256M with "
        "--quick; 0: no data images)",
    )
    parser.add_argument(
        "--bitmap",
        action="append",
        choices=BITMAPS,
        dest="bitmaps",
        help="bitmap patterns (repeatable; default all; 'none' is always run as the baseline)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 1G and 1T, --data 256M, 1 timed run"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile bitback's load and store in process (largest size)",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per QMP step")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the images afterwards")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    args = parser.parse_args(argv)
    runs = args.runs if args.runs is not None else (1 if args.quick else 5)
    sizes = sorted(set(args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)))
    data = args.data if args.data is not None else (256 * MiB if args.quick else GiB)
    if runs < 1 or min(sizes) < 64 * MiB:
        parser.error("--runs must be positive and every --size at least 64M")
    bitmaps = ["none", *sorted(set(args.bitmaps or BITMAPS) - {"none"}, key=BITMAPS.index)]

    qemu_img = shutil.which(os.environ.get("QEMU_IMG", "qemu-img"))
    qemu_io = shutil.which(os.environ.get("QEMU_IO", "qemu-io"))
    qemu_system = shutil.which(os.environ.get("QEMU_SYSTEM", "qemu-system-x86_64"))
    if qemu_img is None or qemu_io is None or qemu_system is None:
        sys.exit("bench: qemu-img, qemu-io and qemu-system-x86_64 are required")
    base = args.workdir or Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    need = 4 * min(data, max(sizes)) + 256 * MiB  # only if cp cannot keep the files sparse
    if shutil.disk_usage(base).free < need:
        sys.exit(f"bench: {base} needs about {need // MiB} MiB free")
    work = Path(tempfile.mkdtemp(prefix="bitback-bench-persist-", dir=base))
    # bitbackd is a Python program: time it with its bytecode cached, as an installed program
    # runs. PYTHONDONTWRITEBYTECODE (set in some sandboxes) would make every start compile
    # every module again (about 0.25 s); the first warm-up compiles them into the work
    # directory instead, so nothing is written into the source tree.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    started = dt.datetime.now(dt.UTC)
    report: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "settings": {
            "runs": runs,
            "sizes": sizes,
            "data": data,
            "bitmaps": bitmaps,
            "quick": args.quick,
            "granularity": GRANULARITY,
            "seed": SEED,
            "warmup_runs": 1,
            "caches_dropped": False,
            "bitbackd_bytecode": "cached (PYTHONPYCACHEPREFIX in the work directory)",
            "sync_before_each_timed_part": True,
        },
        "host": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "workdir": str(work),
        },
        "versions": {
            "bitbackd": version(emulator_argv("bitback")[:1]),
            "qemu-system-x86_64": version([qemu_system]),
            "qemu-img": version([qemu_img]),
        },
        "results": [],
    }
    datas = [0] + ([data] if data else [])
    variants = [Variant(s, d, b) for s in sizes for d in datas for b in bitmaps]
    print(
        f"bench: persistent bitmaps, sizes {', '.join(human(s) for s in sizes)}, data "
        f"{human(data) if data else 'none'}, {runs} run(s) + 1 warm-up per tool, in {work}",
        flush=True,
    )
    images = Images(work, qemu_img, qemu_io)
    profile = None
    try:
        t0 = time.perf_counter()
        for v in variants:
            images.master(v)
        print(f"bench: images prepared in {time.perf_counter() - t0:.1f} s", flush=True)
        for v in variants:
            report["results"] += bench_variant(v, images, runs, args.timeout, qemu_img)
        if args.profile:
            profile = profile_bitback(
                images, [v for v in variants if v.size == sizes[-1] and v.bitmap != "none"]
            )
            report["profile"] = profile
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    out = args.out or RESULTS_DIR / f"{started.strftime('%Y%m%dT%H%M%SZ')}-bitmap-persistence.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    if profile:
        print(profile)
    print_tables(report["results"])
    print(
        "\nratio = QEMU median / bitback median (1.0 = parity); bitmap cost = median minus the "
        f"same size and data without a bitmap; results: {out}"
    )
    return 0 if all(r["verified"] for r in report["results"]) else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
