#!/usr/bin/env python3
"""Backup jobs: bitbackd against QEMU 7.2, same machine, same run, timed from the job's events.

Both processes are started the way the test harness starts them (``tests/helpers/vm.py``:
``-nodefaults -display none -accel tcg -S``, client-mode QMP chardev, the ``qemu.qmp`` legacy
client, one ``-drive if=virtio,id=drive0``). QEMU runs as ``qemu-system-x86_64`` rather than
``qemu-storage-daemon`` because the incremental cases dirty the disk through HMP ``qemu-io``,
which only the emulator's monitor has, and because it is the process the interop tests compare
bitbackd with; with ``-S`` no guest code runs, so its CPU time is the block layer's.

One **run** is one fresh process: launch, untimed set-up over QMP/HMP, ``sync``, then the timed
part - from sending ``drive-backup`` until the harness reads the job's ``BLOCK_JOB_COMPLETED``
(a job that ends before the reply is read is timed to the reply) - then ``JOB_STATUS_CHANGE
null``, ``quit``. Each tool gets one untimed warm-up run, then ``--runs`` timed runs,
interleaved (bitback, QEMU, QEMU, bitback, ...). Page caches are never dropped: after the
warm-up both read the source from memory. The process's CPU time (user + system, all threads,
from ``/proc/PID/stat``) over the timed part is recorded too. Reported: median, min and max,
and ``ratio = QEMU median / bitback median`` (1.0 = parity, 0.5 = bitback takes twice as long).

Cases (``--size`` SIZE, default 1G):

==============  ===========================================================================
``full``        ``drive-backup sync=full`` (new qcow2 target, ``absolute-paths``) of a qcow2
                of virtual size 2*SIZE holding SIZE of random data (``bench/run.py``'s
                ``convert`` source: 3/4 in 1-64 MiB extents, 1/4 scattered 64 KiB clusters).
``inc-1pct``    ``sync=incremental`` of the same disk with 1% of its virtual size dirty:
``inc-10pct``   bitmap ``b0`` added, then seeded HMP ``write -P`` of 64 KiB-1 MiB extents
                (64 KiB aligned, distinct) until 1% (10%) of the disk is dirty, then the
                backup into ``qemu-img create -b ANCHOR`` (ANCHOR: a ``qemu-img convert``
                copy of the source made before the case).
``flat-1G`` ..  ``sync=incremental`` with 10 MiB dirty (160 writes of 64 KiB at seeded
``flat-1T``     random places) on an otherwise empty qcow2 of virtual size 1 GiB, 16 GiB,
                256 GiB and 1 TiB. ``--flat-spread whole`` (default) spreads the writes over
                the whole disk, the workload under which QEMU 7.2 slows down with the size:
                on a large disk every write then lands in an L2 table of its own, in the
                source and in the target. ``--flat-spread first`` puts the same writes in
                the first GiB of every disk, so that nothing but the virtual size changes.
                ``flat`` in the table is each tool's 1 TiB median / 1 GiB median.
==============  ===========================================================================

Every case is verified after its timed runs: each tool's last target (through its backing
chain) must equal the source by real ``qemu-img compare`` and pass ``qemu-img check``, and
both tools' jobs must report the same ``len``. Bars of issue 4 (reported as PASS / MISS):
``full`` ratio >= 0.5; bitback's ``flat`` (1 TiB / 1 GiB) <= 2.0.

``--profile`` runs bitbackd once more per case, after the timed runs, under cProfile: the
harness signals the process (SIGUSR1 / SIGUSR2) around the same timed part, and every call on
the I/O thread and the event loop in that window is profiled. The top functions by own and by
cumulative time are printed; the ``.prof`` files stay in ``bench/results/``. The machine's
1-minute load average before and after each case is reported with it: on a busy machine
QEMU's pool of I/O threads gets a larger share of the CPUs than bitbackd's one I/O thread.

Usage: ``python bench/backup.py [--runs 5] [--size 1G] [--case full|inc|flat ...]``;
``--size 256M --runs 2 --quick`` is a smoke run of under a minute (``--quick``: the flat case on
1 GiB and 1 TiB only). Results: a table on stdout and
``bench/results/<UTC timestamp>-backup.json``.
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
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench_run  # bench/run.py: the shared source image and size helpers
from helpers.vm import HARNESS_OPTIONS, VM, drive_args, emulator_argv

BENCH = Path(__file__).resolve().parent

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
SEED = 0xB17BAC
TOOLS = ("bitback", "qemu")
JOB = "job0"
RESULTS_DIR = BENCH / "results"
FLAT_SIZES = (GiB, 16 * GiB, 256 * GiB, TiB)
FLAT_DIRTY = 10 * MiB
FLAT_WRITE = 64 * KiB
BAR_FULL_RATIO = 0.5
BAR_FLAT = 2.0
TICK = os.sysconf("SC_CLK_TCK")


def human(size: int) -> str:
    for unit, scale in (("T", TiB), ("G", GiB), ("M", MiB), ("K", KiB)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


def must(argv: Sequence[str | Path], what: str) -> str:
    res = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=3600, check=False
    )
    if res.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {res.returncode}): {res.stderr.strip()}")
    return res.stdout


def cpu_seconds(pid: int) -> float:
    """User + system time of every thread of ``pid`` so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14, 15)


# --- processes ----------------------------------------------------------------------------


class ProfiledVM(VM):
    """bitbackd run by this file in its ``--child-profile`` mode (see :func:`child_profile`),
    with the harness's command line."""

    def __init__(self, args: Sequence[str], prof: Path, timeout: float) -> None:
        super().__init__("bitback", args, timeout=timeout)
        self.prof = prof

    def launch(self) -> ProfiledVM:
        from qemu.qmp.legacy import QEMUMonitorProtocol

        self.monitor = QEMUMonitorProtocol(self.sock, server=True)
        argv = [
            sys.executable, __file__, "--child-profile", str(self.prof), "--",
            *HARNESS_OPTIONS,
            "-chardev", f"socket,id=mon,path={self.sock}",
            "-mon", "chardev=mon,mode=control",
            *self.args,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self.monitor.accept(timeout=self.timeout)
        self.monitor.settimeout(self.timeout)
        return self


def child_profile(out: Path, daemon_args: list[str]) -> int:
    """Run bitbackd in this process under cProfile, only between SIGUSR1 and SIGUSR2 (the
    harness sends them around the timed part): one profile of the main thread (the event
    loop) and one of every call made on the I/O thread meanwhile. Written at exit to
    ``OUT.loop.prof`` and ``OUT.io.prof``."""

    from bitback.block import iothread
    from bitback.daemon.main import main as daemon_main

    io_prof, loop_prof = cProfile.Profile(), cProfile.Profile()
    active = False
    original = iothread.IOThread.run

    async def run(self: iothread.IOThread, fn: Callable[..., Any], *a: Any, **kw: Any) -> Any:
        def profiled() -> Any:
            if not active:
                return fn(*a, **kw)
            io_prof.enable()
            try:
                return fn(*a, **kw)
            finally:
                io_prof.disable()

        return await original(self, profiled)

    def start(*_: object) -> None:
        nonlocal active
        active = True
        loop_prof.enable()

    def stop(*_: object) -> None:
        nonlocal active
        active = False
        loop_prof.disable()

    iothread.IOThread.run = run  # type: ignore[method-assign]
    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    try:
        code = daemon_main(daemon_args)
    finally:
        loop_prof.dump_stats(f"{out}.loop.prof")
        io_prof.dump_stats(f"{out}.io.prof")
    return int(code or 0)


def top_functions(path: str, limit: int = 18) -> str:
    text = io.StringIO()
    stats = pstats.Stats(path, stream=text)
    total = stats.total_tt  # type: ignore[attr-defined]
    text.write(f"== {Path(path).name}: {total:.3f} s profiled\n")
    stats.strip_dirs().sort_stats("tottime").print_stats(limit)
    stats.sort_stats("cumulative").print_stats(limit)
    return text.getvalue()


# --- cases --------------------------------------------------------------------------------


@dataclass
class Run:
    wall: float
    cpu: float
    length: int  # the job's len


@dataclass
class Case:
    """One comparison: ``prepare`` once, then for every run ``setup`` (untimed, in the
    running process) and the timed ``drive-backup``; ``verify`` at the end."""

    name: str
    work: Path
    qemu_img: str
    notes: list[str] = field(default_factory=list)

    def source(self) -> Path:
        raise NotImplementedError

    def target(self, tool: str) -> Path:
        return self.work / f"{self.name}-{tool}.qcow2"

    def prepare(self) -> None:
        """Inputs shared by all runs of both tools."""

    def setup(self, vm: VM, tool: str) -> dict[str, Any]:
        """Untimed work in the fresh process; returns the ``drive-backup`` arguments."""
        raise NotImplementedError

    def verify(self) -> list[str]:
        problems = []
        for tool in TOOLS:
            res = subprocess.run(
                [self.qemu_img, "compare", "-f", "qcow2", "-F", "qcow2",
                 str(self.source()), str(self.target(tool))],
                capture_output=True, text=True, timeout=3600, check=False,
            )  # fmt: skip
            if res.returncode != 0:
                problems.append(f"{tool}: target differs from the source: {res.stdout.strip()}")
            res = subprocess.run(
                [self.qemu_img, "check", "-q", str(self.target(tool))],
                capture_output=True, text=True, timeout=3600, check=False,
            )  # fmt: skip
            if res.returncode != 0:
                problems.append(f"{tool}: qemu-img check of the target: exit {res.returncode}")
        return problems

    def cleanup(self) -> None:
        for tool in TOOLS:
            self.target(tool).unlink(missing_ok=True)


@dataclass
class FullCase(Case):
    size: int = GiB
    built: Path | None = None

    def source(self) -> Path:
        assert self.built is not None
        return self.built

    def prepare(self) -> None:
        if self.built is None:
            self.built = build_source(self.work, self.size, self.notes)

    def setup(self, vm: VM, tool: str) -> dict[str, Any]:
        self.target(tool).unlink(missing_ok=True)
        return {"sync": "full", "target": str(self.target(tool)), "format": "qcow2"}


def build_source(work: Path, size: int, notes: list[str]) -> Path:
    """``bench/run.py``'s convert source: virtual 2*SIZE, SIZE of random data."""
    case = bench_run.ConvertCase(
        name="convert", description="", tools=bench_run.find_tools(), work=work,
        size=size, io_mode="args",
    )  # fmt: skip
    case.prepare()
    notes.extend(case.notes)
    return case.source()


@dataclass
class IncrementalCase(Case):
    """Dirty ``writes`` through HMP after adding the bitmap, then back them up. Without
    ``source_path`` the disk is ``full``'s source (built on first use)."""

    full: FullCase | None = None
    source_path: Path | None = None
    writes: list[tuple[int, int, int]] = field(default_factory=list)  # (offset, length, pattern)

    def source(self) -> Path:
        assert self.source_path is not None
        return self.source_path

    def anchor(self) -> Path:
        return self.work / f"{self.name}-anchor.qcow2"

    def prepare(self) -> None:
        if self.source_path is None:
            assert self.full is not None
            self.full.prepare()
            self.source_path = self.full.source()
            self.notes[:0] = self.full.notes[-1:]
        # The anchor holds the source as it is now; every run repeats the same writes, which
        # leave the source the same however often they are made.
        must([self.qemu_img, "convert", "-f", "qcow2", "-O", "qcow2", self.source(),
              self.anchor()], "making the anchor")  # fmt: skip

    def setup(self, vm: VM, tool: str) -> dict[str, Any]:
        vm.ok("block-dirty-bitmap-add", node="drive0", name="b0")
        for offset, length, pattern in self.writes:
            out = vm.qemu_io("drive0", f"write -P 0x{pattern:02x} {offset} {length}")
            if "error" in out.lower() or "failed" in out.lower():
                raise RuntimeError(f"{tool}: write {offset} {length}: {out.strip()}")
        vm.qemu_io("drive0", "flush")
        target = self.target(tool)
        target.unlink(missing_ok=True)
        must([self.qemu_img, "create", "-q", "-f", "qcow2", "-b", self.anchor(), "-F", "qcow2",
              target], "creating the incremental target")  # fmt: skip
        return {
            "sync": "incremental", "bitmap": "b0", "target": str(target), "format": "qcow2",
            "mode": "existing",
        }  # fmt: skip

    def cleanup(self) -> None:
        super().cleanup()
        self.anchor().unlink(missing_ok=True)


def dirty_extents(virtual: int, fraction: float, seed: int) -> list[tuple[int, int, int]]:
    """Distinct 64 KiB-aligned extents of 64 KiB-1 MiB, in seeded random places, adding up
    to ``fraction`` of ``virtual`` (rounded to 64 KiB); (offset, length, pattern)."""
    rng = random.Random(seed)
    unit = 64 * KiB
    want = round(virtual * fraction / unit)
    units = virtual // unit
    taken = bytearray(units)
    out: list[tuple[int, int, int]] = []
    have = 0
    while have < want:
        n = min(rng.randint(1, 16), want - have)
        first = rng.randrange(0, units - n + 1)
        if any(taken[first : first + n]):
            continue
        taken[first : first + n] = b"\x01" * n
        out.append((first * unit, n * unit, len(out) % 255 + 1))
        have += n
    return sorted(out)


@dataclass
class FlatCase(IncrementalCase):
    """10 MiB dirty on an empty disk of ``virtual`` bytes."""

    virtual: int = GiB
    spread: str = "whole"  # where the writes go: the whole disk, or its first GiB

    def prepare(self) -> None:
        self.source_path = self.work / f"{self.name}-source.qcow2"
        for path in (self.source_path, self.anchor()):
            path.unlink(missing_ok=True)
            must([self.qemu_img, "create", "-q", "-f", "qcow2", path, str(self.virtual)],
                 "creating an empty image")  # fmt: skip
        # "first": the same writes on every virtual size, so that only the size varies;
        # "whole": spread over the whole disk, so larger disks also touch more L2 tables.
        span = GiB if self.spread == "first" else self.virtual
        rng = random.Random(SEED if self.spread == "first" else SEED + self.virtual // GiB)
        slots = rng.sample(range(span // FLAT_WRITE), FLAT_DIRTY // FLAT_WRITE)
        self.writes = [(s * FLAT_WRITE, FLAT_WRITE, i % 255 + 1) for i, s in enumerate(slots)]
        where = "over the whole disk" if self.spread == "whole" else "in the first 1G"
        self.notes.append(
            f"{len(self.writes)} writes of 64K at random places {where} of an empty "
            f"{human(self.virtual)} qcow2"
        )

    def cleanup(self) -> None:
        super().cleanup()
        if self.source_path is not None:
            self.source_path.unlink(missing_ok=True)


# --- timing -------------------------------------------------------------------------------


def next_event(vm: VM, deadline: float) -> dict[str, Any]:
    assert vm.monitor is not None
    left = deadline - time.monotonic()
    if left <= 0:
        raise RuntimeError("timed out waiting for the job's events")
    event = vm.monitor.pull_event(wait=left)
    assert event is not None
    return dict(event)


def one_run(case: Case, tool: str, timeout: float, prof: Path | None = None) -> Run:
    """One process: set up, time ``drive-backup`` to ``BLOCK_JOB_COMPLETED``, finish."""
    args = drive_args(case.source())
    vm = VM(tool, args, timeout=timeout) if prof is None else ProfiledVM(args, prof, timeout)
    with vm:
        assert vm.proc is not None
        backup = {"job-id": JOB, "device": "drive0", **case.setup(vm, tool)}
        vm.events()  # set-up events are not the job's
        os.sync()
        deadline = time.monotonic() + timeout
        if prof is not None:
            vm.proc.send_signal(signal.SIGUSR1)
            time.sleep(0.2)  # let the handler run before the timed part
        cpu0 = cpu_seconds(vm.proc.pid)
        start = time.perf_counter()
        reply = vm.qmp("drive-backup", **backup)
        if "return" not in reply:
            raise RuntimeError(f"{tool}: drive-backup: {reply}")
        while True:
            event = next_event(vm, deadline)
            if event["event"] == "BLOCK_JOB_COMPLETED" and event["data"]["device"] == JOB:
                wall = time.perf_counter() - start
                cpu = cpu_seconds(vm.proc.pid) - cpu0
                done = event["data"]
                if prof is not None:
                    vm.proc.send_signal(signal.SIGUSR2)
                break
        if "error" in done or done["offset"] != done["len"]:
            raise RuntimeError(f"{tool}: job failed: {done}")
        while not (event["event"] == "JOB_STATUS_CHANGE" and event["data"]["status"] == "null"):
            event = next_event(vm, deadline)
        code = vm.shutdown()
        if code != 0:
            raise RuntimeError(f"{tool}: exit {code} after quit: {vm.stderr.strip()[-300:]}")
    return Run(wall=wall, cpu=cpu, length=int(done["len"]))


def bench_case(case: Case, runs: int, timeout: float, profile: bool) -> dict[str, Any]:
    print(f"[{case.name}] preparing ...", flush=True)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    case.prepare()
    print(f"[{case.name}] prepared in {time.perf_counter() - t0:.1f} s; {'; '.join(case.notes)}",
          flush=True)  # fmt: skip
    series: dict[str, list[Run]] = {tool: [] for tool in TOOLS}
    errors: dict[str, str] = {}

    def attempt(tool: str, timed: bool) -> None:
        if tool in errors:
            return
        try:
            r = one_run(case, tool, timeout)
        except Exception as exc:  # reported; the other tool goes on
            errors[tool] = str(exc)
            print(f"[{case.name}] {tool}: FAILED: {exc}", flush=True)
            return
        if timed:
            series[tool].append(r)
        print(f"[{case.name}] {tool:8s} {'run' if timed else 'warm-up'} {r.wall * 1e3:9.1f} ms "
              f"(cpu {r.cpu * 1e3:.0f} ms, len {r.length})", flush=True)  # fmt: skip

    for tool in TOOLS:
        attempt(tool, timed=False)
    for i in range(runs):
        for tool in TOOLS if i % 2 == 0 else TOOLS[::-1]:
            attempt(tool, timed=True)

    problems = [f"{tool}: {e}" for tool, e in errors.items()]
    if not errors:
        problems += case.verify()
        lengths = {tool: {r.length for r in rs} for tool, rs in series.items()}
        if lengths["bitback"] != lengths["qemu"] or len(lengths["qemu"]) != 1:
            problems.append(f"job len differs: {lengths}")
    for p in problems:
        print(f"[{case.name}] VERIFY: {p}", flush=True)

    profile_text = None
    if profile and "bitback" not in errors:
        stem = RESULTS_DIR / f"profile-{case.name}"
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        r = one_run(case, "bitback", timeout, prof=stem)
        profile_text = f"profiled run: {r.wall * 1e3:.1f} ms, cpu {r.cpu * 1e3:.0f} ms\n"
        profile_text += "".join(top_functions(f"{stem}.{t}.prof") for t in ("io", "loop"))
        print(profile_text, flush=True)

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
            "len": rs[0].length,
        }

    b, q = summary(series["bitback"]), summary(series["qemu"])
    ratio = q["median_s"] / b["median_s"] if "median_s" in b and "median_s" in q else None
    return {
        "name": case.name,
        "notes": case.notes,
        "bitback": b,
        "qemu": q,
        "ratio_qemu_over_bitback": None if ratio is None else round(ratio, 4),
        "verified": not problems,
        "problems": problems,
        # The machine's 1-minute load average before and after: QEMU's I/O threads take
        # more of a busy machine's CPUs than bitbackd's single I/O thread does.
        "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "profile": profile_text,
    }


# --- report -------------------------------------------------------------------------------


def flatness(results: list[dict[str, Any]], tool: str) -> float | None:
    by = {r["name"]: r[tool].get("median_s") for r in results}
    small, large = by.get("flat-1G"), by.get("flat-1T")
    return None if not small or not large else large / small


def bars(results: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    full = next((r for r in results if r["name"] == "full"), None)
    if full is not None and full["ratio_qemu_over_bitback"] is not None:
        ratio = full["ratio_qemu_over_bitback"]
        out["full_ratio"] = {"value": ratio, "bar": BAR_FULL_RATIO, "met": ratio >= BAR_FULL_RATIO}
    flat = flatness(results, "bitback")
    if flat is not None:
        out["flat_1t_over_1g"] = {"value": round(flat, 3), "bar": BAR_FLAT,
                                  "met": flat <= BAR_FLAT}  # fmt: skip
    return out


def print_table(results: list[dict[str, Any]], bar: dict[str, Any]) -> None:
    def cell(s: dict[str, Any]) -> str:
        if "median_s" not in s:
            return "FAILED"
        return f"{s['median_s'] * 1e3:.1f} ({s['min_s'] * 1e3:.1f}-{s['max_s'] * 1e3:.1f})"

    def cpu(r: dict[str, Any]) -> str:
        b, q = r["bitback"].get("cpu_median_s"), r["qemu"].get("cpu_median_s")
        return "-" if b is None or q is None else f"{b * 1e3:.0f} / {q * 1e3:.0f}"

    rows = [("case", "job len", "bitback ms median (min-max)", "QEMU ms median (min-max)",
             "QEMU/bitback", "CPU ms bitback / QEMU", "load", "output")]  # fmt: skip
    for r in results:
        ratio = r["ratio_qemu_over_bitback"]
        load = "-".join(f"{x:.1f}" for x in r["loadavg_1min"])
        rows.append((
            r["name"], human(r["bitback"].get("len") or r["qemu"].get("len") or 0),
            cell(r["bitback"]), cell(r["qemu"]), "-" if ratio is None else f"{ratio:.3f}",
            cpu(r), load, "verified" if r["verified"] else "NOT VERIFIED",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))
    for tool in TOOLS:
        flat = flatness(results, tool)
        if flat is not None:
            print(f"flat, {tool}: 1 TiB median / 1 GiB median = {flat:.2f}")
    for name, b in bar.items():
        print(f"bar {name}: {b['value']} (bar {b['bar']}): {'PASS' if b['met'] else 'MISS'}")


def make_cases(
    names: list[str], work: Path, size: int, quick: bool, qemu_img: str, spread: str
) -> list[Case]:
    cases: list[Case] = []
    full = FullCase(name="full", work=work, qemu_img=qemu_img, size=size)
    if "full" in names:
        cases.append(full)
    if "inc" in names:
        for pct in (1, 10):
            writes = dirty_extents(2 * size, pct / 100, SEED + pct)
            dirty = sum(length for _, length, _ in writes)
            note = f"{len(writes)} writes, {human(dirty)} dirty of {human(2 * size)}"
            cases.append(IncrementalCase(name=f"inc-{pct}pct", work=work, qemu_img=qemu_img,
                                         notes=[note], full=full, writes=writes))  # fmt: skip
    if "flat" in names:
        for virtual in (GiB, TiB) if quick else FLAT_SIZES:
            cases.append(FlatCase(name=f"flat-{human(virtual)}", work=work, qemu_img=qemu_img,
                                  virtual=virtual, spread=spread))  # fmt: skip
    return cases


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child-profile"]:
        return child_profile(Path(argv[1]), argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per tool (default 5)")
    parser.add_argument(
        "--size",
        type=bench_run.parse_size,
        default=GiB,
        help="data in the full/inc source, virtual size twice that (default 1G)",
    )
    parser.add_argument(
        "--case",
        action="append",
        choices=("full", "inc", "flat"),
        dest="cases",
        help="run only these cases (repeatable; default all)",
    )
    parser.add_argument("--quick", action="store_true", help="flat case on 1 GiB and 1 TiB only")
    parser.add_argument(
        "--flat-spread",
        choices=("whole", "first"),
        default="whole",
        help="flat case: dirty places over the whole disk (default) or in its "
        "first GiB (the same work on every size)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="one extra bitback run per case under cProfile (not timed)",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per job")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    args = parser.parse_args(argv)  # fmt: skip
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    qemu_img = shutil.which(os.environ.get("QEMU_IMG", "qemu-img"))
    qemu_system = shutil.which(os.environ.get("QEMU_SYSTEM", "qemu-system-x86_64"))
    if qemu_img is None or qemu_system is None:
        sys.exit("bench: qemu-img and qemu-system-x86_64 are required")
    names = args.cases or ["full", "inc", "flat"]
    base = args.workdir or Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    need = 4 * args.size + GiB // 2
    if shutil.disk_usage(base).free < need:
        sys.exit(f"bench: {base} needs about {need // MiB} MiB free")
    work = Path(tempfile.mkdtemp(prefix="bitback-bench-backup-", dir=base))
    started = dt.datetime.now(dt.UTC)
    report: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "settings": {
            "runs": args.runs, "size": args.size, "quick": args.quick, "seed": SEED,
            "flat_spread": args.flat_spread,
            "warmup_runs": 1, "caches_dropped": False, "sync_before_each_run": True,
            "timed": "drive-backup sent -> BLOCK_JOB_COMPLETED read",
        },
        "host": {"platform": platform.platform(), "cpus": os.cpu_count(),
                 "python": platform.python_version(), "workdir": str(work)},
        "versions": {
            "bitbackd": bench_run.first_line(emulator_argv("bitback")[:1]),
            "qemu-system-x86_64": bench_run.first_line([qemu_system]),
            "qemu-img": bench_run.first_line([qemu_img]),
        },
        "cases": [],
    }  # fmt: skip
    print(f"bench: backup jobs, size {human(args.size)}, {args.runs} runs + 1 warm-up per "
          f"tool, in {work}", flush=True)  # fmt: skip
    try:
        cases = make_cases(names, work, args.size, args.quick, qemu_img, args.flat_spread)
        for case in cases:
            report["cases"].append(bench_case(case, args.runs, args.timeout, args.profile))
            if not isinstance(case, FullCase):
                case.cleanup()
            else:
                for tool in TOOLS:
                    case.target(tool).unlink(missing_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["bars"] = bars(report["cases"])
    for tool in TOOLS:
        flat = flatness(report["cases"], tool)
        report[f"flat_1t_over_1g_{tool}"] = None if flat is None else round(flat, 3)
    out = args.out or RESULTS_DIR / f"{started.strftime('%Y%m%dT%H%M%SZ')}-backup.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print_table(report["cases"], report["bars"])
    print(f"\nratio = QEMU median / bitback median (1.0 = parity); results: {out}")
    return 0 if all(c["verified"] for c in report["cases"]) else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
