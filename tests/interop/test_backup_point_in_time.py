"""Point in time (spec 6.1): a backup equals the disk as it was when its job started, whatever
the guest writes while the job runs - for ``sync=full``, ``incremental`` and ``bitmap``.

One example is one *scenario*, run on one bitbackd (or, for the deterministic case at the
end, on QEMU 7.2 too), launched with the harness command line and ``-drive`` of spec 1:

1. **Image.** A fresh qcow2 of 16-64 MiB (sometimes not a whole number of 64 KiB clusters),
   made by real ``qemu-img convert`` from a raw file holding random bytes at random places,
   then given a few offline ``qemu-io`` writes (``write -P``, ``write -z``) so it holds data,
   zero clusters and unallocated clusters.
2. **Before the job.** Bitmap ``b0`` (granularity 32 KiB, 64 KiB or 128 KiB). ``full``: added
   at launch. ``incremental`` / ``bitmap``: added in one ``transaction`` with a full *anchor*
   backup (speed 0, waited for), then an empty incremental target is made with ``qemu-img
   create -b anchor -F qcow2`` (64 KiB or 128 KiB clusters). Then random HMP writes, which
   for the incremental modes always include two *guard* writes of 1 MiB, one in the first
   quarter of the disk and one in the last, so the copy set needs at least two steps of
   QEMU's block-copy (1 MiB each) and the window below cannot close by itself.
3. **The oracle.** HMP ``qemu-io drive0 "flush"``, then a byte copy of the source file: that
   copy *is* the disk at job start (real QEMU's flush writes its qcow2 metadata caches too).
4. **The job.** ``drive-backup`` with a low initial ``speed`` (1 B/s, 1 KiB/s or 64 KiB/s):
   the first chunk is copied at once and the next is due only seconds later, so the job is
   still running when the program starts (asserted with ``query-block-jobs``). ``full``
   creates its target (``absolute-paths``), optionally with ``bitmap: b0`` and bitmap-mode
   ``on-success`` / ``always``; the incremental modes fill the existing target (``bitmap``
   with bitmap-mode ``on-success``, ``always`` or ``never``).
5. **The program** (printed with ``note``): HMP writes - ``write -P``, ``write -z``,
   ``write -z -u``; cluster aligned, partial, unaligned to the byte, up to 2 MiB long, and
   ending at the last byte of the disk - interleaved with ``block-job-set-speed`` (1 B/s to
   256 KiB/s), ``block-job-pause`` / ``-resume`` and short sleeps, so writes land on clusters
   the job has not copied yet, has copied, or is copying.
6. **Release.** ``block-job-set-speed 0`` and, if paused, ``block-job-resume``; wait for the
   job's ``JOB_STATUS_CHANGE null``.

Required afterwards:

* exactly one ``BLOCK_JOB_COMPLETED`` for the job, without ``error``, ``offset == len``, and
  ``len`` as QEMU 7.2 reports it (the job clusters of the disk for ``full``; for the
  incremental modes the job clusters touching a granule that was dirty at job start; a
  partial last cluster counts whole);
  no ``BLOCK_JOB_ERROR``;
* **the target equals the oracle** (``qemu-img compare``; an incremental target through its
  backing chain, i.e. on top of the anchor), and ``qemu-img check`` finds it clean;
* ``b0``'s ``count`` matches a set-of-granules model: the granules touched by the writes made
  after the job started, plus those of the writes before it when the job did not take ``b0``
  or bitmap-mode is ``never`` (spec 5.5); ``b0`` is no longer busy;
* after ``quit``, the source equals the oracle with the program's writes replayed on it by
  real offline ``qemu-io``: copy-before-write delayed the guest's writes but lost none.

A write made while the copy-before-write filter is gone (the job ended early because the
guest's own writes made it copy its last clusters) proves less but must still pass; the
note says how many writes were made while the job was listed. ``BITBACK_PIT_EXAMPLES`` sets the
examples per mode (default 12: about 40 s for the module on 2 busy cores).

The same property, one fixed program in incremental mode, runs against QEMU 7.2 as well
(:func:`test_fixed_program_on_both`): if QEMU failed it, the oracle or the harness would be
wrong, not bitback.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from helpers.procs import run
from helpers.seedsetup import HarnessVM
from helpers.vm import drive_args

pytestmark = pytest.mark.qemu

KiB, MiB = 1 << 10, 1 << 20
EXAMPLES = int(os.environ.get("BITBACK_PIT_EXAMPLES", "12"))
MODES = ("full", "incremental", "bitmap")
JOB = "job0"
GRANULARITIES = (32 * KiB, 64 * KiB, 128 * KiB)
START_SPEEDS = (1, 1 * KiB, 64 * KiB)
WINDOW_SPEEDS = (1, 4 * KiB, 64 * KiB, 256 * KiB)
SLEEPS_MS = (0, 5, 20, 50)
EVENT_TIMEOUT = 60.0


# ------------------------------------------------------------------------------ the program


@dataclass(frozen=True)
class Write:
    """HMP ``write -P PATTERN OFFSET LENGTH``."""

    offset: int
    length: int
    pattern: int

    def command(self) -> str:
        return f"write -P 0x{self.pattern:02x} {self.offset} {self.length}"


@dataclass(frozen=True)
class Zero:
    """HMP ``write -z [-u] OFFSET LENGTH``."""

    offset: int
    length: int
    unmap: bool

    def command(self) -> str:
        return f"write -z{' -u' if self.unmap else ''} {self.offset} {self.length}"


GuestOp = Write | Zero


@dataclass(frozen=True)
class SetSpeed:
    speed: int


@dataclass(frozen=True)
class Pause:
    pass


@dataclass(frozen=True)
class Resume:
    pass


@dataclass(frozen=True)
class Sleep:
    ms: int


Step = GuestOp | SetSpeed | Pause | Resume | Sleep


@dataclass(frozen=True)
class Extent:
    """Random bytes (from ``seed``) at ``[offset, offset+length)`` of the initial image."""

    offset: int
    length: int
    seed: int


@dataclass(frozen=True)
class Scenario:
    mode: str  # full, incremental or bitmap
    size: int
    granularity: int
    extents: tuple[Extent, ...]
    offline: tuple[GuestOp, ...]  # qemu-io on the image before launch (no bitmap sees them)
    pre: tuple[GuestOp, ...]  # HMP writes after b0 exists, before the job
    target_cluster: int  # incremental target's cluster size (full: the default 64 KiB)
    use_bitmap: bool  # full: does the job take b0?
    bitmap_mode: str | None
    start_speed: int
    steps: tuple[Step, ...]

    def describe(self) -> str:
        lines = [
            f"mode {self.mode}, size {self.size}, b0 granularity {self.granularity}, "
            f"target cluster {self.target_cluster}, job bitmap "
            f"{'b0 ' + str(self.bitmap_mode) if self.use_bitmap else 'none'}, "
            f"start speed {self.start_speed}",
            "image extents: " + ", ".join(f"[{e.offset}+{e.length})" for e in self.extents),
            "offline: " + "; ".join(op.command() for op in self.offline),
            "before the job: " + "; ".join(op.command() for op in self.pre),
            "during the job:",
        ]
        lines += [f"  {i}: {describe_step(s)}" for i, s in enumerate(self.steps)]
        return "\n".join(lines)


def describe_step(step: Step) -> str:
    if isinstance(step, (Write, Zero)):
        return f'qemu-io drive0 "{step.command()}"'
    if isinstance(step, SetSpeed):
        return f"block-job-set-speed {step.speed}"
    if isinstance(step, Sleep):
        return f"sleep {step.ms} ms"
    return "block-job-pause" if isinstance(step, Pause) else "block-job-resume"


# ------------------------------------------------------------------------------ strategies


@st.composite
def byte_ranges(draw: st.DrawFn, size: int) -> tuple[int, int]:
    """``(offset, length)`` inside a disk of ``size`` bytes, of one of five shapes."""
    cs = 64 * KiB
    clusters = size // cs
    shape = draw(st.sampled_from(["clusters", "partial", "unaligned", "end", "large"]))
    if shape == "clusters":
        offset = draw(st.integers(0, clusters - 1)) * cs
        length = draw(st.integers(1, 4)) * cs
    elif shape == "partial":  # inside one cluster, usually near one of its edges
        offset = draw(st.integers(0, clusters - 1)) * cs + draw(st.integers(0, cs // 512 - 1)) * 512
        length = draw(st.integers(1, cs - offset % cs))
    elif shape == "unaligned":
        offset = draw(st.integers(0, size - 1))
        length = draw(st.integers(1, 96 * KiB))
    elif shape == "end":  # ends at the last byte of the disk
        length = draw(st.integers(1, 160 * KiB))
        return size - length, length
    else:
        offset = draw(st.integers(0, size - 1))
        length = draw(st.integers(256 * KiB, 2 * MiB))
    return offset, max(1, min(length, size - offset))


@st.composite
def guest_ops(draw: st.DrawFn, size: int) -> GuestOp:
    offset, length = draw(byte_ranges(size))
    if draw(st.integers(0, 3)) == 0:
        return Zero(offset, length, draw(st.booleans()))
    return Write(offset, length, draw(st.integers(1, 255)))


@st.composite
def scenarios(draw: st.DrawFn, mode: str) -> Scenario:
    clusters = draw(st.integers(256, 1023), label="64 KiB clusters")
    tail = draw(st.sampled_from([0, 0, 512, 4 * KiB, 40 * KiB + 512]), label="tail")
    size = clusters * 64 * KiB + tail
    extents = tuple(
        Extent(offset, min(length, size - offset), seed)
        for offset, length, seed in draw(
            st.lists(
                st.tuples(
                    st.integers(0, size - 1),
                    st.integers(1, 4 * MiB),
                    st.integers(0, 2**32 - 1),
                ),
                min_size=1,
                max_size=6,
            ),
            label="random-data extents",
        )
    )
    offline = tuple(draw(st.lists(guest_ops(size), max_size=4), label="offline writes"))
    pre = draw(st.lists(guest_ops(size), max_size=5), label="writes before the job")
    if mode != "full":
        quarter = size // 4
        guards = draw(
            st.tuples(st.integers(0, quarter - MiB), st.integers(3 * quarter, size - MiB)),
            label="guard writes",
        )
        pre = [Write(guards[0], MiB, 0x6A), *pre, Write(guards[1], MiB, 0x6B)]
    use_bitmap = mode != "full" or draw(st.booleans(), label="full takes b0")
    if mode == "incremental":
        bitmap_mode: str | None = "on-success"
    elif mode == "bitmap":
        bitmap_mode = draw(st.sampled_from(["on-success", "always", "never"]))
    else:
        bitmap_mode = draw(st.sampled_from(["on-success", "always"])) if use_bitmap else None

    steps: list[Step] = []
    paused = False
    for kind in draw(st.lists(st.integers(0, 9), min_size=1, max_size=18), label="step kinds"):
        if kind <= 5:
            steps.append(draw(guest_ops(size)))
        elif kind == 6:
            steps.append(SetSpeed(draw(st.sampled_from(WINDOW_SPEEDS))))
        elif kind == 7:
            steps.append(Resume() if paused else Pause())
            paused = not paused
        else:
            steps.append(Sleep(draw(st.sampled_from(SLEEPS_MS))))
    if not any(isinstance(s, (Write, Zero)) for s in steps):
        steps.append(draw(guest_ops(size)))
    return Scenario(
        mode=mode,
        size=size,
        granularity=draw(st.sampled_from(GRANULARITIES), label="granularity"),
        extents=extents,
        offline=offline,
        pre=tuple(pre),
        target_cluster=64 * KiB if mode == "full" else draw(st.sampled_from([64 * KiB, 128 * KiB])),
        use_bitmap=use_bitmap,
        bitmap_mode=bitmap_mode,
        start_speed=draw(st.sampled_from(START_SPEEDS), label="start speed"),
        steps=tuple(steps),
    )


# ------------------------------------------------------------------------------ the models


def granules(op: GuestOp, granularity: int) -> set[int]:
    """Bitmap granules a request marks (spec 5.1; every request here lies inside the disk)."""
    return set(range(op.offset // granularity, (op.offset + op.length - 1) // granularity + 1))


def expected_len(scenario: Scenario, dirty: set[int]) -> int:
    """``len`` of the job: every job cluster of the disk for ``full``; else the job
    clusters touching a dirty granule. QEMU 7.2 counts a partial last cluster whole (its len
    is the copy bitmap's dirty count; spec 6.3 says "clipped", measured otherwise)."""
    size = scenario.size
    cs = max(64 * KiB, scenario.target_cluster)
    if scenario.mode == "full":
        return -(-size // cs) * cs
    g = scenario.granularity
    clusters: set[int] = set()
    for i in dirty:
        lo, hi = i * g, min((i + 1) * g, size)
        if lo < hi:
            clusters.update(range(lo // cs, (hi - 1) // cs + 1))
    return len(clusters) * cs


def expected_count(scenario: Scenario) -> int:
    """``b0``'s count after the job (spec 5.5): the writes after the job started, plus the
    earlier ones when the job left ``b0`` alone or bitmap-mode is ``never``."""
    g = scenario.granularity
    dirty: set[int] = set()
    for step in scenario.steps:
        if isinstance(step, (Write, Zero)):
            dirty |= granules(step, g)
    if not scenario.use_bitmap or scenario.bitmap_mode == "never":
        for op in scenario.pre:
            dirty |= granules(op, g)
    return len(dirty) * g


# ------------------------------------------------------------------------------ running one


@dataclass
class Outcome:
    """What a run saw, for ``note`` and for the deterministic test."""

    writes_during_job: int = 0  # guest writes after which the job was still listed
    events: list[dict[str, Any]] = field(default_factory=list)


def build_image(scenario: Scenario, path: Path, qemu_img: str, qemu_io: str) -> None:
    """Random extents through real ``qemu-img convert``, then offline real ``qemu-io``."""
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as f:
        f.truncate(scenario.size)
        for e in scenario.extents:
            os.pwrite(f.fileno(), random.Random(e.seed).randbytes(e.length), e.offset)
    run([qemu_img, "convert", "-f", "raw", "-O", "qcow2", raw, path], check=True)
    raw.unlink()
    if scenario.offline:
        argv: list[str] = [qemu_io, "-f", "qcow2"]
        for op in scenario.offline:
            argv += ["-c", op.command()]
        run([*argv, str(path)], check=True)


def hmp(vm: HarnessVM, op: GuestOp) -> None:
    """One guest write through HMP; it must succeed. (QEMU's stdout may also hold the
    ``Formatting ...`` line of a target it created since the last command.)"""
    out = vm.io("drive0", op.command())
    lines = [line for line in out.splitlines() if not line.startswith("Formatting '")]
    assert lines == [f"wrote {op.length}/{op.length} bytes at offset {op.offset}"], (
        f"{vm.backend}: {op.command()}: {out!r}"
    )


def wait_null(vm: HarnessVM, job: str, into: list[dict[str, Any]]) -> None:
    """Collect events into ``into`` until ``JOB_STATUS_CHANGE null`` of ``job``."""
    deadline = time.monotonic() + EVENT_TIMEOUT
    while True:
        assert vm.monitor is not None
        left = deadline - time.monotonic()
        assert left > 0, f"{vm.backend}: no null event for {job}; got {into}"
        event = vm.monitor.pull_event(wait=left)
        assert event is not None
        into.append(event)
        data = event.get("data", {})
        if event["event"] == "JOB_STATUS_CHANGE" and data == {"id": job, "status": "null"}:
            return


def job_of(event: dict[str, Any]) -> str | None:
    """The job an event is about (``id`` in JOB_STATUS_CHANGE, ``device`` in BLOCK_JOB_*)."""
    data = event.get("data", {})
    job = data.get("id", data.get("device"))
    return None if job is None else str(job)


def job_listed(vm: HarnessVM) -> dict[str, Any] | None:
    jobs = [j for j in vm.ok("query-block-jobs") if j["device"] == JOB]
    return jobs[0] if jobs else None


def job_verb(vm: HarnessVM, cmd: str, **kwargs: Any) -> bool:
    """Run a job verb; False when the job is already gone (it may finish early when the
    guest's writes made it copy its last clusters)."""
    reply = vm.qmp(cmd, device=JOB, **kwargs)
    if "return" in reply:
        return True
    assert reply["error"]["class"] == "DeviceNotActive", f"{vm.backend}: {cmd}: {reply}"
    assert job_listed(vm) is None, f"{vm.backend}: {cmd}: {reply}"
    return False


def run_scenario(
    backend: str, scenario: Scenario, work: Path, qemu_img: str, qemu_io: str
) -> Outcome:
    """Run one scenario on ``backend`` and check every requirement of the module docstring."""
    out = Outcome()
    src, snap = work / "src.qcow2", work / "snap.qcow2"
    anchor, target = work / "anchor.qcow2", work / "target.qcow2"
    build_image(scenario, src, qemu_img, qemu_io)
    dirty_at_start: set[int] = set()
    with HarnessVM(backend, drive_args(src)) as vm:
        add = {"node": "drive0", "name": "b0", "granularity": scenario.granularity}
        if scenario.mode == "full":
            vm.ok("block-dirty-bitmap-add", **add)
        else:
            actions = [
                {"type": "block-dirty-bitmap-add", "data": add},
                {
                    "type": "drive-backup",
                    "data": {
                        "job-id": "anchor",
                        "device": "drive0",
                        "sync": "full",
                        "target": str(anchor),
                        "format": "qcow2",
                    },
                },
            ]
            vm.ok("transaction", actions=actions)
            anchor_events: list[dict[str, Any]] = []
            wait_null(vm, "anchor", anchor_events)
            done = [e for e in anchor_events if e["event"] == "BLOCK_JOB_COMPLETED"]
            assert len(done) == 1 and "error" not in done[0]["data"], anchor_events
            cluster = f"cluster_size={scenario.target_cluster}"
            run(
                [
                    qemu_img,
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    cluster,
                    "-b",
                    str(anchor),
                    "-F",
                    "qcow2",
                    str(target),
                ],
                check=True,
            )
        for op in scenario.pre:
            hmp(vm, op)
            dirty_at_start |= granules(op, scenario.granularity)

        # The oracle: the disk at job start, flushed and copied byte for byte.
        assert vm.io("drive0", "flush") == "", backend
        shutil.copyfile(src, snap)

        args: dict[str, Any] = {
            "job-id": JOB,
            "device": "drive0",
            "sync": scenario.mode,
            "format": "qcow2",
            "target": str(target),
            "speed": scenario.start_speed,
        }
        if scenario.mode != "full":
            args["mode"] = "existing"
        if scenario.use_bitmap and scenario.mode != "incremental":
            args |= {"bitmap": "b0", "bitmap-mode": scenario.bitmap_mode}
        elif scenario.mode == "incremental":
            args["bitmap"] = "b0"
        vm.ok("drive-backup", **args)
        first = job_listed(vm)
        assert first is not None and first["offset"] < first["len"], (
            f"{backend}: the job must still be running when the program starts: {first}"
        )

        alive, paused = True, False
        for step in scenario.steps:
            if isinstance(step, (Write, Zero)):
                hmp(vm, step)
                if alive:
                    alive = job_listed(vm) is not None
                    out.writes_during_job += alive
            elif isinstance(step, Sleep):
                time.sleep(step.ms / 1000)
            elif not alive:
                continue
            elif isinstance(step, SetSpeed):
                alive = job_verb(vm, "block-job-set-speed", speed=step.speed)
            elif isinstance(step, Pause):
                alive = job_verb(vm, "block-job-pause")
                paused = alive
            else:
                alive = job_verb(vm, "block-job-resume")
                paused = False
        if alive:
            alive = job_verb(vm, "block-job-set-speed", speed=0)
        if alive and paused:
            job_verb(vm, "block-job-resume")
        # Events of the whole job: those already queued, then up to its null.
        assert vm.monitor is not None
        out.events = [e for e in vm.events() if job_of(e) == JOB]
        if not any(
            e["event"] == "JOB_STATUS_CHANGE" and e["data"]["status"] == "null" for e in out.events
        ):
            wait_null(vm, JOB, out.events)

        completed = [e["data"] for e in out.events if e["event"] == "BLOCK_JOB_COMPLETED"]
        assert len(completed) == 1, f"{backend}: {out.events}"
        done_event = completed[0]
        assert "error" not in done_event, f"{backend}: {done_event}"
        assert not [e for e in out.events if e["event"] == "BLOCK_JOB_ERROR"], out.events
        want_len = expected_len(scenario, dirty_at_start)
        assert (done_event["len"], done_event["offset"]) == (want_len, want_len), (
            f"{backend}: completed with {done_event}, expected len = offset = {want_len}"
        )
        assert vm.ok("query-block-jobs") == [], backend

        info = vm.bitmap_info("drive0", "b0")
        assert (info["count"], info["busy"], info["recording"]) == (
            expected_count(scenario),
            False,
            True,
        ), f"{backend}: b0 after the job: {info}"
        assert vm.shutdown() == 0, f"{backend}: {vm.stderr}"

    # The backup is the disk at job start.
    compared = run([qemu_img, "compare", "-f", "qcow2", "-F", "qcow2", str(snap), str(target)])
    assert compared.returncode == 0, (
        f"{backend}: target differs from the disk at job start: {compared.stdout}{compared.stderr}"
    )
    run([qemu_img, "check", "-q", str(target)], check=True)
    # No guest write was lost: the oracle plus the program, replayed offline, is the source.
    replay = [qemu_io, "-f", "qcow2"]
    for step in scenario.steps:
        if isinstance(step, (Write, Zero)):
            replay += ["-c", step.command()]
    run([*replay, str(snap)], check=True)
    compared = run([qemu_img, "compare", "-f", "qcow2", "-F", "qcow2", str(snap), str(src)])
    assert compared.returncode == 0, (
        f"{backend}: source differs from the replayed writes: {compared.stdout}{compared.stderr}"
    )
    run([qemu_img, "check", "-q", str(src)], check=True)
    return out


# ------------------------------------------------------------------------------ the tests


@pytest.mark.timeout(max(600, 40 * EXAMPLES))
@pytest.mark.parametrize("mode", MODES)
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)
@given(data=st.data())
def test_backup_is_the_disk_at_job_start(
    mode: str,
    data: st.DataObject,
    qemu_img: str,
    qemu_io: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    scenario = data.draw(scenarios(mode), label="scenario")
    note(scenario.describe())
    work = tmp_path_factory.mktemp(f"pit-{mode}")
    try:
        out = run_scenario("bitback", scenario, work, qemu_img, qemu_io)
        note(f"{out.writes_during_job} guest writes made while the job was listed")
    finally:
        shutil.rmtree(work, ignore_errors=True)


FIXED = Scenario(
    mode="incremental",
    size=32 * MiB + 512,
    granularity=64 * KiB,
    extents=(
        Extent(0, 3 * MiB + 7, 1),
        Extent(10 * MiB - 100, 2 * MiB, 2),
        Extent(31 * MiB, MiB + 512, 3),
    ),
    offline=(Zero(MiB, 128 * KiB, False), Write(20 * MiB, 256 * KiB, 0x31)),
    pre=(
        Write(2 * MiB, MiB, 0x6A),
        Write(16 * MiB + 4096, 100, 0x41),
        Zero(10 * MiB, 192 * KiB, True),
        Write(28 * MiB, MiB, 0x6B),
    ),
    target_cluster=64 * KiB,
    use_bitmap=True,
    bitmap_mode="on-success",
    start_speed=1,
    steps=(
        Write(2 * MiB + 4096, 512, 0x77),  # inside a dirty cluster not copied yet
        Write(20 * MiB + 100, 70000, 0x78),  # clean clusters: nothing to copy first
        Pause(),
        Zero(28 * MiB + 64 * KiB, 128 * KiB, False),  # the second guard, while paused
        SetSpeed(4 * KiB),
        Resume(),
        Sleep(20),
        Write(32 * MiB + 512 - 3000, 3000, 0x79),  # the last bytes of the disk
        Zero(10 * MiB + 1000, 5000, True),  # a cluster the pre-job write-zeroes dirtied
        Write(16 * MiB, 64 * KiB, 0x7A),
    ),
)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["qemu", "bitback"])
def test_fixed_program_on_both(
    backend: str, qemu_img: str, qemu_io: str, qemu_system: str, tmp_path: Path
) -> None:
    """One incremental scenario on QEMU 7.2 and on bitbackd: QEMU passing shows the oracle
    (flush + copy) and the harness are sound; every program write lands while the job runs."""
    out = run_scenario(backend, FIXED, tmp_path, qemu_img, qemu_io)
    writes = sum(isinstance(s, (Write, Zero)) for s in FIXED.steps)
    assert out.writes_during_job == writes, f"{backend}: {out.writes_during_job} of {writes}"
