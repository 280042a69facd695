"""Incremental backup scenarios, each run on bitbackd and on real QEMU 7.2.

The stories are iotest 124's (spec section 10) plus bitmap-mode, cancel and quit. Every one is
told the same way: build the disk offline with the other backend's tool set (real
``qemu-img``/``qemu-io`` for bitbackd, ``bitback-img``/``bitback-io`` for QEMU), create the
backup targets with both tool sets in turn (:class:`MixedTools`), start the process under test
with the harness command line of spec section 1 (the ``qemu.qmp`` client), drive it over QMP
and HMP ``qemu-io``, and check

* each reply (and each error class);
* each job's events, in order (:data:`helpers.backup.SUCCESS` and friends, spec 4.2), that
  every job ends with ``JOB_STATUS_CHANGE null`` and that nothing is pending after it, nor
  any job left (spec 4.3);
* ``len`` and ``offset`` of the completion events (section 10's values), the bitmaps' fields
  and counts (and, where it tells more, their ``x-debug-block-dirty-bitmap-sha256`` against
  an independent model);
* at the end, with the process gone: every incremental read through its chain equals the full
  reference backup taken right after it, the newest equals the disk, by real ``qemu-img
  compare`` and by ``bitback-img compare``, and real ``qemu-img check`` finds every target
  and disk clean.

Assertions state QEMU 7.2's behaviour. Where QEMU 7.2 answers in another shape than the
seed-era one bitbackd keeps (spec 12), :class:`helpers.backup.BackupVM` is the one place that
says so. A scenario where bitbackd is known to differ runs on bitbackd as a strict xfail whose
reason names the fault.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from helpers.backup import (
    CANCELLED,
    FAILED,
    FULL_LEN,
    SUCCESS,
    BackupVM,
    Chain,
    Tools,
    dirty_granules,
    find,
    model_sha256,
    trace,
    verify_chains,
)
from helpers.imagetools import create, info_json
from helpers.procs import run
from helpers.seedsetup import WRITES_1, WRITES_2, make_seed_image
from helpers.vm import BACKENDS, drive_args

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(90)]

KiB, MiB = 1 << 10, 1 << 20

# drive1: drive0's geometry (so the same lens and counts) with bytes of its own.
DRIVE1_SETUP = (("0x21", "0", "512"), ("0x6e", "1M", "32k"), ("0xb7", "32M", "124k"))
DRIVE1_WRITES = (("0xc3", "0", "512"), ("0x3c", "16M", "256k"), ("0x5a", "32736k", "64k"))

# blkdebug scripts (spec 7.3). The backup's first data read after the guest's flush fails once.
FAIL_AFTER_FLUSH = {
    "set-state": [{"event": "flush_to_disk", "state": 1, "new_state": 2}],
    "inject-error": [{"event": "read_aio", "errno": 5, "state": 2,
                      "immediately": False, "once": True}],
}
# Flush, then the read of device_add's geometry probe, then the backup's read, which fails.
FAIL_AFTER_FLUSH_AND_PROBE = {
    "set-state": [{"event": "flush_to_disk", "state": 1, "new_state": 2},
                  {"event": "read_aio", "state": 2, "new_state": 3}],
    "inject-error": [{"event": "read_aio", "errno": 5, "state": 3,
                      "immediately": False, "once": True}],
}


def backends(bug: str | None = None) -> list[Any]:
    """Both backends; with ``bug``, bitbackd's run is a strict xfail for that reason."""
    if bug is None:
        return list(BACKENDS)
    return [pytest.param("bitback", marks=pytest.mark.xfail(strict=True, reason=bug)), "qemu"]


# ------------------------------------------------------------------------------ fixtures


class MixedTools(Tools):
    """Image steps taken in turn by real ``qemu-img`` and by ``bitback-img``, so that every
    scenario has each tool set create targets the other one (and both backends) then use.
    Comparisons and checks still run with both (:class:`Tools`)."""

    _turn: Iterator[int]

    def __init__(self, qemu_img: str, bitback_img: list[str], first: int) -> None:
        super().__init__(qemu_img, bitback_img)
        object.__setattr__(self, "_turn", itertools.count(first))

    def image_tool(self) -> list[str]:
        """The tool set for the next image step."""
        return [self.qemu_img] if next(self._turn) % 2 == 0 else list(self.bitback_img)

    def create(self, path: Path, size: str | int = "64M", **options: Any) -> Path:
        create(self.image_tool(), path, size, **options)
        return path


def _backend_of(request: pytest.FixtureRequest) -> str:
    callspec = getattr(request.node, "callspec", None)
    return str(callspec.params.get("backend", "bitback")) if callspec else "bitback"


@pytest.fixture
def tools(request: pytest.FixtureRequest, qemu_img: str, bitback_img: list[str]) -> Tools:
    """bitbackd's scenarios start with bitback-img, QEMU's with qemu-img."""
    return MixedTools(qemu_img, bitback_img, first=1 if _backend_of(request) == "bitback" else 0)


@pytest.fixture
def launch(qemu_system: str) -> Iterator[Callable[..., BackupVM]]:
    """Start a process under test; any still alive at teardown is killed."""
    started: list[BackupVM] = []

    def start(backend: str, args: Sequence[str] = ()) -> BackupVM:
        vm = BackupVM(backend, list(args))
        started.append(vm)
        vm.launch()
        return vm

    yield start
    for vm in started:
        vm.__exit__(None, None, None)


@pytest.fixture
def disk(request: pytest.FixtureRequest, tmp_path: Path, qemu_img: str, qemu_io: str,
         bitback_img: list[str], bitback_io: list[str]) -> Path:
    """The seed's drive0: 64M, 0x41 at 0, 0xd5 at 1M, 0xdc at 32M, written offline by the
    *other* tool set: QEMU's for bitbackd, bitback's for QEMU."""
    if _backend_of(request) == "qemu":
        return make_seed_image(bitback_img, bitback_io, tmp_path / "drive0.qcow2")
    return make_seed_image([qemu_img], [qemu_io], tmp_path / "drive0.qcow2")


# ------------------------------------------------------------------------------ steps


def anchor_chain(vm: BackupVM, disk: Path, drive: str = "drive0",
                 bitmap: str = "bitmap0") -> Chain:
    """A full backup of ``drive`` (len = the whole disk) to start a chain on."""
    chain = Chain(disk.parent, drive, bitmap, disk, disk.parent / f"{drive}.full.backup.qcow2")
    done = vm.full_backup(drive, chain.anchor)
    assert done["len"] == FULL_LEN, done
    return chain


def add_bitmap(vm: BackupVM, node: str, name: str = "bitmap0", **args: Any) -> None:
    assert vm.ok("block-dirty-bitmap-add", node=node, name=name, **args) == {}


def incremental_args(chain: Chain, target: Path, **extra: Any) -> dict[str, Any]:
    """The seed's incremental drive-backup arguments for ``chain`` into ``target``."""
    return {"job_id": chain.drive, "device": chain.drive, "sync": "incremental",
            "bitmap": chain.bitmap, "format": "qcow2", "target": str(target),
            "mode": "existing", **extra}


def incremental(vm: BackupVM, tools: Tools, chain: Chain, size: str = "64M") -> dict[str, Any]:
    """An incremental backup on top of the chain that must succeed, then its reference;
    returns the incremental's BLOCK_JOB_COMPLETED data."""
    target = chain.new_target(tools, size)
    done = vm.backup(**incremental_args(chain, target))
    vm.full_backup(chain.drive, chain.reference())
    return done


def blkdebug_node(path: Path, script: dict[str, Any], node: str = "drive0") -> dict[str, Any]:
    """blockdev-add arguments: qcow2 node ``node`` over blkdebug (``script``) over the file."""
    return {"node_name": node, "driver": "qcow2",
            "file": {"driver": "blkdebug",
                     "image": {"driver": "file", "filename": str(path)}, **script}}


def backup_action(chain: Chain, target: Path) -> dict[str, Any]:
    """A transaction action: the seed's incremental drive-backup of ``chain``."""
    data = {key.replace("_", "-"): value for key, value in incremental_args(chain, target).items()}
    return {"type": "drive-backup", "data": data}


def granule_count(*batches: Sequence[tuple[str, str, str]], granularity: int = 64 * KiB) -> int:
    """Dirty bytes after ``batches`` of writes, per the set model (spec 5.2)."""
    granules: set[int] = set()
    for batch in batches:
        granules |= dirty_granules(batch, granularity)
    return len(granules) * granularity


def quit_ok(vm: BackupVM) -> None:
    """The harness's shutdown: ``quit`` and exit status 0."""
    _, code = vm.quit()
    assert code == 0, f"{vm.backend}: exit {code}\n{vm.printed()}"


# ------------------------------------------------------------------------------ 1, 2: chains

# granularity -> (count after the 1st batch, after the 2nd, len of inc1, len of inc2):
# 64 KiB job clusters round 32 KiB granules up and split 128 KiB ones (spec 6.2, 10).
CHAIN_CASES = {
    "64k-default": (None, 458752, 1507328, 458752, 1507328),
    "32k": (32768, 360448, 1441792, 458752, 1507328),
    "128k": (131072, 655360, 1572864, 655360, 1572864),
}


@pytest.mark.parametrize("case", list(CHAIN_CASES))
@pytest.mark.parametrize("backend", backends())
def test_incremental_chain(backend: str, case: str, disk: Path, tools: Tools,
                           launch: Callable[..., BackupVM]) -> None:
    """Three incrementals on a full anchor: a hollow one (nothing written: len 0), one after
    an overwrite / a new segment / a partial overlap, one after three more such writes. Each
    copies exactly the job clusters its bitmap's granules touch, leaves the bitmap empty,
    and with its chain equals the reference full backup taken right after it."""
    granularity, count1, count2, len1, len2 = CHAIN_CASES[case]
    g = granularity or 65536
    vm = launch(backend, drive_args(disk))
    chain = anchor_chain(vm, disk)
    extra: dict[str, Any] = {"granularity": granularity} if granularity else {}
    add_bitmap(vm, "drive0", **extra)
    vm.expect_bitmap("drive0", "bitmap0", count=0, granularity=g)

    assert incremental(vm, tools, chain) == {
        "type": "backup", "device": "drive0", "len": 0, "offset": 0, "speed": 0}

    vm.write("drive0", WRITES_1)
    vm.expect_bitmap("drive0", "bitmap0", count=count1, granularity=g)
    assert count1 == granule_count(WRITES_1, granularity=g)
    assert incremental(vm, tools, chain)["len"] == len1
    vm.expect_bitmap("drive0", "bitmap0", count=0, granularity=g)

    vm.write("drive0", WRITES_2)
    vm.expect_bitmap("drive0", "bitmap0", count=count2, granularity=g)
    assert count2 == granule_count(WRITES_2, granularity=g)
    assert incremental(vm, tools, chain)["len"] == len2
    vm.expect_bitmap("drive0", "bitmap0", count=0, granularity=g)

    quit_ok(vm)
    verify_chains(tools, [chain])


# ------------------------------------------------------------------------------ 3


@pytest.mark.parametrize("backend", backends())
def test_larger_cluster_target(backend: str, disk: Path, tools: Tools,
                               launch: Callable[..., BackupVM]) -> None:
    """Targets with 128 KiB clusters: the job copies whole 128 KiB clusters (len 655360 for
    granules that need 7 x 64 KiB), so an incremental made without a backing file and
    rebased onto the anchor afterwards still reads correctly. Without ``job-id`` the job is
    named after the device; ``mode=existing`` keeps the target's cluster size."""
    vm = launch(backend, drive_args(disk))
    anchor = tools.create(disk.parent / "drive0.full.backup.qcow2", cluster_size="128k")
    chain = Chain(disk.parent, "drive0", "bitmap0", disk, anchor)
    done = vm.backup(job_id=None, device="drive0", sync="full", format="qcow2",
                     target=str(anchor), mode="existing")
    assert done["len"] == FULL_LEN

    add_bitmap(vm, "drive0")
    vm.write("drive0", WRITES_1)
    # The seed's check: the only bitmap, its count, granularity, status, persistence.
    vm.expect_bitmap("drive0", "bitmap0", count=458752)
    if backend == "bitback":
        seed_view = vm.ok("query-block")[0]["dirty-bitmaps"]
        assert [bm["name"] for bm in seed_view] == ["bitmap0"]

    target = chain.new_target(tools, backed=False, cluster_size="128k")
    args = incremental_args(chain, target)
    del args["job_id"]
    done = vm.backup(job_id=None, **args)
    assert done["len"] == 655360
    vm.full_backup("drive0", chain.reference())

    # The rebase runs while the process is up: the job must have let go of the target.
    rebase_tool = tools.image_tool() if isinstance(tools, MixedTools) else [tools.qemu_img]
    run([*rebase_tool, "rebase", "-f", "qcow2", "-u", "-b", str(anchor), "-F", "qcow2",
         str(target)], check=True)
    info = info_json([tools.qemu_img], target)
    assert (info["cluster-size"], info["backing-filename"]) == (131072, str(anchor))
    quit_ok(vm)
    verify_chains(tools, [chain])


# ------------------------------------------------------------------------------ 4


@pytest.mark.parametrize("backend", backends())
def test_transaction_synchronises_bitmaps(backend: str, disk: Path, tools: Tools,
                                          launch: Callable[..., BackupVM]) -> None:
    """A transaction clears two bitmaps (one dirty, one empty) and starts a full backup at
    the same instant, so both bitmaps then describe exactly the changes since that backup:
    incrementals from either, on the one anchor, equal the disk."""
    vm = launch(backend, drive_args(disk))
    add_bitmap(vm, "drive0", "bitmap0")
    vm.write("drive0", WRITES_1)
    add_bitmap(vm, "drive0", "bitmap1")
    vm.expect_bitmap("drive0", "bitmap0", count=458752)
    vm.expect_bitmap("drive0", "bitmap1", count=0)

    anchor = disk.parent / "drive0.full.backup.qcow2"
    reply = vm.qmp("transaction", actions=[
        {"type": "block-dirty-bitmap-clear", "data": {"node": "drive0", "name": "bitmap0"}},
        {"type": "block-dirty-bitmap-clear", "data": {"node": "drive0", "name": "bitmap1"}},
        {"type": "drive-backup", "data": {"job-id": "drive0", "device": "drive0",
                                          "target": str(anchor), "sync": "full",
                                          "format": "qcow2"}},
    ])
    assert reply == {"return": {}}
    # The job is gone as soon as its completion event is read (spec 4.3, wait_until_completed).
    events = vm.wait_event("BLOCK_JOB_COMPLETED")
    assert vm.ok("query-block-jobs") == []
    assert {e["data"]["id"] for e in events if e["event"] == "JOB_STATUS_CHANGE"} == {"drive0"}
    events += vm.wait_jobs("drive0")
    assert trace(events, "drive0") == SUCCESS
    assert find(events, "BLOCK_JOB_COMPLETED", "drive0")["data"]["len"] == FULL_LEN
    vm.expect_bitmap("drive0", "bitmap0", count=0)
    vm.expect_bitmap("drive0", "bitmap1", count=0)

    vm.write("drive0", WRITES_2)
    chains = [Chain(disk.parent, "drive0", name, disk, anchor) for name in ("bitmap0", "bitmap1")]
    for chain in chains:
        vm.expect_bitmap("drive0", chain.bitmap, count=1507328)
        assert vm.sha256("drive0", chain.bitmap) == model_sha256(dirty_granules(WRITES_2))
    for chain in chains:
        assert incremental(vm, tools, chain)["len"] == 1507328
    quit_ok(vm)
    verify_chains(tools, chains)


# ------------------------------------------------------------------------------ 5, 6


@pytest.mark.parametrize("race", [False, True], ids=["writes-on-both", "race"])
@pytest.mark.parametrize("backend", backends())
def test_grouped_transaction_failure(backend: str, race: bool, disk: Path, tools: Tools,
                                     qemu_io: str, launch: Callable[..., BackupVM]) -> None:
    """A grouped transaction of two incrementals where drive1's source read fails: drive1's
    job fails (one BLOCK_JOB_ERROR, COMPLETED with the error), drive0's is cancelled - even
    in the race variant, where drive0 has nothing to copy (len 0) and is done at once - and
    both bitmaps keep every bit. Re-running the same transaction then backs both drives up.
    """
    drive1 = make_seed_image([tools.qemu_img], [qemu_io], disk.parent / "drive1.qcow2",
                             patterns=DRIVE1_SETUP)
    vm = launch(backend, drive_args(disk))
    assert vm.ok("blockdev-add", **blkdebug_node(drive1, FAIL_AFTER_FLUSH, "drive1")) == {}
    add_bitmap(vm, "drive0")
    add_bitmap(vm, "drive1")
    chain0 = anchor_chain(vm, disk, "drive0")
    chain1 = anchor_chain(vm, drive1, "drive1")

    if not race:
        vm.write("drive0", WRITES_1)
    vm.write("drive1", DRIVE1_WRITES)
    len0 = 0 if race else 458752
    before = {}
    for node, count in (("drive0", len0), ("drive1", 458752)):
        vm.expect_bitmap(node, "bitmap0", count=count)
        before[node] = vm.sha256(node, "bitmap0")

    def transaction() -> list[dict[str, Any]]:
        actions = [backup_action(c, c.new_target(tools)) for c in (chain0, chain1)]
        reply = vm.qmp("transaction", actions=actions,
                       properties={"completion-mode": "grouped"})
        assert reply == {"return": {}}
        return vm.wait_jobs("drive0", "drive1")

    events = transaction()
    assert trace(events, "drive1") == FAILED, events
    # drive0 may have finished its copy (waiting for the group) before drive1 failed.
    assert trace(events, "drive0") in (CANCELLED, [*CANCELLED[:2], "waiting", *CANCELLED[2:]])
    errors = [e for e in events if e["event"] == "BLOCK_JOB_ERROR"]
    assert [e["data"] for e in errors] == [
        {"device": "drive1", "operation": "read", "action": "report"}]
    failed = find(events, "BLOCK_JOB_COMPLETED", "drive1")["data"]
    assert (failed["len"], failed["error"]) == (458752, "Input/output error")
    assert failed["offset"] < failed["len"]
    cancelled = find(events, "BLOCK_JOB_CANCELLED", "drive0")["data"]
    assert cancelled["len"] == len0 and cancelled["offset"] <= len0
    if race:
        assert cancelled["offset"] == 0
    assert events.index(errors[0]) < events.index(find(events, "BLOCK_JOB_CANCELLED", "drive0"))
    assert events[-1]["data"]["status"] == "null"
    for node, count in (("drive0", len0), ("drive1", 458752)):
        vm.expect_bitmap(node, "bitmap0", count=count)
        assert vm.sha256(node, "bitmap0") == before[node]
    chain0.drop_failed()
    chain1.drop_failed()
    if race:
        quit_ok(vm)
        for path in (*chain0.images(), *chain1.images()):
            tools.assert_clean(path)
        return

    events = transaction()
    for job in ("drive0", "drive1"):
        assert trace(events, job) == SUCCESS
        done = find(events, "BLOCK_JOB_COMPLETED", job)["data"]
        assert (done["len"], done["offset"]) == (458752, 458752)
    # Grouped completion: nobody goes on before both have finished copying (spec 4.2.4).
    labels = [(e["data"]["id"], e["data"]["status"]) for e in events
              if e["event"] == "JOB_STATUS_CHANGE"]
    last_waiting = max(labels.index((job, "waiting")) for job in ("drive0", "drive1"))
    first_pending = min(labels.index((job, "pending")) for job in ("drive0", "drive1"))
    assert last_waiting < first_pending
    for chain in (chain0, chain1):
        vm.full_backup(chain.drive, chain.reference())
    quit_ok(vm)
    verify_chains(tools, [chain0, chain1])


# ------------------------------------------------------------------------------ 7


@pytest.mark.parametrize("backend", backends())
def test_bad_bitmap_arguments(backend: str, disk: Path, launch: Callable[..., BackupVM]
                              ) -> None:
    """An incremental backup without a bitmap, or naming one that does not exist, and a
    bitmap whose granularity is not a power of two, are all refused with GenericError;
    no job starts and nothing else happens."""
    vm = launch(backend, drive_args(disk))
    target = str(disk.parent / "err.qcow2")
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("drive-backup", {"device": "drive0", "sync": "incremental", "format": "qcow2",
                          "target": target},
         "must provide a valid bitmap name for 'incremental' sync mode"),
        ("drive-backup", {"device": "drive0", "sync": "incremental", "bitmap": "unknown",
                          "format": "qcow2", "target": target},
         "Bitmap 'unknown' could not be found"),
        ("block-dirty-bitmap-add", {"node": "drive0", "name": "bitmap0", "granularity": 64000},
         "Granularity must be power of 2 and at least 512"),
    ]
    for command, args, desc in cases:
        assert vm.qmp(command, **args) == {
            "error": {"class": "GenericError", "desc": desc}}, command
        vm.assert_quiet()
    entry = vm.ok("query-block")[0]
    assert "dirty-bitmaps" not in entry["inserted"]
    quit_ok(vm)


# ------------------------------------------------------------------------------ 8


@pytest.mark.parametrize("backend", backends())
def test_growing_before_backup(backend: str, disk: Path, tools: Tools,
                               launch: Callable[..., BackupVM]) -> None:
    """The disk grows by 1 MiB after the bitmap exists and the write lands past the old end:
    the bitmap grows with the disk and the incremental (65M, on the 64M anchor) copies just
    that granule."""
    vm = launch(backend, drive_args(disk))
    chain = anchor_chain(vm, disk)
    add_bitmap(vm, "drive0")
    assert vm.ok("block_resize", device="drive0", size=65 * MiB) == {}
    out = vm.io("drive0", "write 64M 64k")
    assert out == f"wrote 65536/65536 bytes at offset {64 * MiB}"
    vm.expect_bitmap("drive0", "bitmap0", count=65536)
    assert vm.sha256("drive0", "bitmap0") == model_sha256({1024}, size=65 * MiB)

    assert incremental(vm, tools, chain, size="65M")["len"] == 65536
    quit_ok(vm)
    info = info_json([tools.qemu_img], chain.reference())
    assert info["virtual-size"] == 65 * MiB
    verify_chains(tools, [chain])


# ------------------------------------------------------------------------------ 9


@pytest.mark.parametrize("backend", backends())
def test_failure_then_recovery(backend: str, disk: Path, tools: Tools,
                               launch: Callable[..., BackupVM]) -> None:
    """An incremental fails on a source read error (report): the bitmap gets its bits back,
    so after more writes the next incremental copies both batches (25 granules, len
    1638400) and the chain stays exact."""
    vm = launch(backend)
    assert vm.ok("blockdev-add", **blkdebug_node(disk, FAIL_AFTER_FLUSH)) == {}
    chain = anchor_chain(vm, disk)
    add_bitmap(vm, "drive0")
    vm.write("drive0", WRITES_1)

    vm.start_backup(**incremental_args(chain, chain.new_target(tools)))
    events = vm.wait_jobs("drive0")
    assert trace(events, "drive0") == FAILED
    assert find(events, "BLOCK_JOB_ERROR", "drive0")["data"] == {
        "device": "drive0", "operation": "read", "action": "report"}
    failed = find(events, "BLOCK_JOB_COMPLETED", "drive0")["data"]
    assert (failed["len"], failed["error"]) == (458752, "Input/output error")
    assert failed["offset"] < failed["len"]
    vm.expect_bitmap("drive0", "bitmap0", count=458752)
    assert vm.sha256("drive0", "bitmap0") == model_sha256(dirty_granules(WRITES_1))
    chain.drop_failed()

    vm.write("drive0", WRITES_2)
    both = dirty_granules(WRITES_1) | dirty_granules(WRITES_2)
    assert vm.sha256("drive0", "bitmap0") == model_sha256(both)
    assert incremental(vm, tools, chain)["len"] == 1638400 == len(both) * 65536
    quit_ok(vm)
    verify_chains(tools, [chain])


# ------------------------------------------------------------------------------ 10


@pytest.mark.parametrize("backend", backends())
def test_pause_on_error_then_resume(backend: str, disk: Path, tools: Tools,
                                    launch: Callable[..., BackupVM]) -> None:
    """With ``on-source-error: stop`` a read error pauses the job (BLOCK_JOB_ERROR stop,
    io-status failed) while the bitmap stays frozen, busy and recording; resumed, the job
    retries the read and completes, leaving the bitmap empty, active and free."""
    vm = launch(backend)
    assert vm.ok("blockdev-add", **blkdebug_node(disk, FAIL_AFTER_FLUSH_AND_PROBE)) == {}
    chain = anchor_chain(vm, disk)
    add_bitmap(vm, "drive0")
    vm.write("drive0", WRITES_1)
    # The device's geometry probe is the one read the script expects before the job's.
    assert vm.ok("device_add", id="device0", drive="drive0", driver="virtio-blk") == {}
    entry = vm.ok("query-block")[0]
    assert (entry["device"], entry["qdev"]) == ("", "/machine/peripheral/device0/virtio-backend")
    vm.expect_bitmap("drive0", "bitmap0", count=458752)

    vm.start_backup(**incremental_args(chain, chain.new_target(tools),
                                       on_source_error="stop"))
    events = vm.wait_event("BLOCK_JOB_ERROR")
    assert events[-1]["data"] == {"device": "drive0", "operation": "read", "action": "stop"}
    events += vm.wait_event("JOB_STATUS_CHANGE", "paused")
    vm.expect_bitmap("drive0", "bitmap0", count=458752, busy=True, status="frozen")
    [job] = vm.ok("query-block-jobs")
    assert job["offset"] < job["len"]
    assert {k: v for k, v in job.items() if k != "offset"} == {
        "type": "backup", "device": "drive0", "len": 458752, "speed": 0, "busy": False,
        "paused": True, "ready": False, "status": "paused", "io-status": "failed",
        "auto-finalize": True, "auto-dismiss": True}

    assert vm.ok("block-job-resume", device="drive0") == {}
    events += vm.wait_jobs("drive0")
    assert trace(events, "drive0") == [
        "created", "running", "ERROR read stop", "paused", "running", "waiting", "pending",
        "COMPLETED", "concluded", "null"]
    done = find(events, "BLOCK_JOB_COMPLETED", "drive0")["data"]
    assert (done["len"], done["offset"]) == (458752, 458752)
    vm.expect_bitmap("drive0", "bitmap0", count=0)
    assert vm.qmp("block-job-resume", device="drive0") == {"error": {
        "class": "DeviceNotActive", "desc": "Block job 'drive0' not found"}}
    vm.full_backup("drive0", chain.reference())
    quit_ok(vm)
    verify_chains(tools, [chain])


# ------------------------------------------------------------------------------ 11

# A write that only touches the cluster at 32M, the one the fault is aimed at.
WRITE_32M = (("0x33", "32M", "64k"),)


def host_offset(qemu_img: str, image: Path, guest: int) -> int:
    """Where guest offset ``guest`` of ``image`` lives in the file (``qemu-img map``)."""
    out = run([qemu_img, "map", "--output=json", "-f", "qcow2", str(image)], check=True)
    for extent in json.loads(out.stdout):
        if extent["start"] <= guest < extent["start"] + extent["length"] and extent["data"]:
            return int(extent["offset"]) + guest - int(extent["start"])
    raise AssertionError(f"guest offset {guest} of {image} is not allocated")


# mode -> (count after the successful sync, after the 2nd batch, after the failed sync,
#          len of the retry, count after the retry); spec 5.5.
MODE_CASES = {
    "always": (0, 1572864, 65536, 65536, 0),
    "never": (458752, 1638400, 1638400, 1638400, 1638400),
}


@pytest.mark.parametrize("mode", list(MODE_CASES))
@pytest.mark.parametrize("backend", backends())
def test_bitmap_sync_modes(backend: str, mode: str, disk: Path, tools: Tools,
                           launch: Callable[..., BackupVM]) -> None:
    """``sync=bitmap`` with bitmap-mode ``always`` or ``never``, succeeding and then failing
    on the last cluster it copies (blkdebug aimed at the cluster at 32M). ``always`` treats
    what reached the target as backed up, on success (empty bitmap) and on failure (only the
    failed cluster stays dirty, so the partial target stays in the chain); ``never`` keeps
    every bit either way. Counts and digests follow the granule model on both backends."""
    after_ok, after_batch, after_fail, retry_len, after_retry = MODE_CASES[mode]
    sector = host_offset(tools.qemu_img, disk, 32 * MiB) // 512
    script: dict[str, Any] = {
        "set-state": [{"event": "flush_to_disk", "state": 1, "new_state": 2}],
        "inject-error": [{"event": "read_aio", "errno": 5, "state": 2, "sector": sector,
                          "once": True}],
    }
    vm = launch(backend)
    assert vm.ok("blockdev-add", **blkdebug_node(disk, script)) == {}
    chain = anchor_chain(vm, disk)
    add_bitmap(vm, "drive0")
    dirty = dirty_granules(WRITES_1)

    def expect(count: int, granules: set[int]) -> None:
        assert count == len(granules) * 65536
        vm.expect_bitmap("drive0", "bitmap0", count=count)
        assert vm.sha256("drive0", "bitmap0") == model_sha256(granules)

    def bitmap_sync() -> dict[str, Any]:
        return {**incremental_args(chain, chain.new_target(tools)), "sync": "bitmap",
                "bitmap_mode": mode}

    # Success (no flush yet: the fault is not armed).
    vm.write("drive0", WRITES_1, flush=False)
    expect(458752, dirty)
    assert vm.backup(**bitmap_sync())["len"] == 458752
    if mode == "always":
        dirty = set()
    expect(after_ok, dirty)
    vm.full_backup("drive0", chain.reference())

    # Failure: the read of the cluster at 32M, copied last, fails once.
    vm.write("drive0", (*WRITES_2, *WRITE_32M))
    dirty |= dirty_granules((*WRITES_2, *WRITE_32M))
    expect(after_batch, dirty)
    vm.start_backup(**bitmap_sync())
    events = vm.wait_jobs("drive0")
    assert trace(events, "drive0") == FAILED
    failed = find(events, "BLOCK_JOB_COMPLETED", "drive0")["data"]
    assert (failed["len"], failed["error"]) == (after_batch, "Input/output error")
    if mode == "always":
        dirty = {512}
        assert failed["offset"] == failed["len"] - 65536
        chain.keep_partial()
    else:
        assert failed["offset"] < failed["len"]
        chain.drop_failed()
    expect(after_fail, dirty)

    # The fault fired once: the retry copies what the bitmap still holds.
    assert vm.backup(**bitmap_sync())["len"] == retry_len
    if mode == "always":
        dirty = set()
    expect(after_retry, dirty)
    vm.full_backup("drive0", chain.reference())
    quit_ok(vm)
    verify_chains(tools, [chain])


# ------------------------------------------------------------------------------ 12


@pytest.mark.parametrize("backend", backends())
def test_cancel_restores_bitmap(backend: str, disk: Path, tools: Tools,
                                launch: Callable[..., BackupVM]) -> None:
    """A rate-limited incremental is cancelled after more guest writes: BLOCK_JOB_CANCELLED,
    and the bitmap holds its old bits plus the writes made during the job, so the next
    incremental copies all of them."""
    vm = launch(backend, drive_args(disk))
    chain = anchor_chain(vm, disk)
    add_bitmap(vm, "drive0")
    vm.write("drive0", WRITES_1)

    vm.start_backup(**incremental_args(chain, chain.new_target(tools), speed=1))
    [job] = vm.ok("query-block-jobs")
    assert (job["device"], job["len"], job["speed"], job["status"]) == (
        "drive0", 458752, 1, "running")
    vm.expect_bitmap("drive0", "bitmap0", count=458752, busy=True, status="frozen")
    vm.write("drive0", WRITES_2)  # through copy-before-write
    vm.expect_bitmap("drive0", "bitmap0", count=458752, busy=True, status="frozen")

    assert vm.qmp("block-job-cancel", device="drive0") == {"return": {}}
    events = vm.wait_jobs("drive0")
    assert trace(events, "drive0") == CANCELLED
    cancelled = find(events, "BLOCK_JOB_CANCELLED", "drive0")["data"]
    assert (cancelled["len"], cancelled["speed"]) == (458752, 1)
    assert cancelled["offset"] < cancelled["len"]
    assert vm.qmp("block-job-cancel", device="drive0") == {"error": {
        "class": "DeviceNotActive", "desc": "Block job 'drive0' not found"}}
    both = dirty_granules(WRITES_1) | dirty_granules(WRITES_2)
    vm.expect_bitmap("drive0", "bitmap0", count=len(both) * 65536)
    assert vm.sha256("drive0", "bitmap0") == model_sha256(both)
    chain.drop_failed()

    assert incremental(vm, tools, chain)["len"] == 1638400
    quit_ok(vm)
    verify_chains(tools, [chain])


# ------------------------------------------------------------------------------ 13


def start_slow_backup(vm: BackupVM, target: Path) -> None:
    vm.start_backup(job_id="drive0", device="drive0", sync="full", format="qcow2",
                    target=str(target), speed=1)
    [job] = vm.ok("query-block-jobs")
    assert (job["status"], job["len"]) == ("running", FULL_LEN)


@pytest.mark.parametrize("backend", backends())
def test_quit_during_backup(backend: str, disk: Path, tools: Tools,
                            launch: Callable[..., BackupVM]) -> None:
    """``quit`` while a backup crawls: exit status 0, and the disk and the half-written
    target are consistent images."""
    vm = launch(backend, drive_args(disk))
    target = disk.parent / "slow.qcow2"
    start_slow_backup(vm, target)
    quit_ok(vm)
    for path in (disk, target):
        tools.assert_clean(path)


@pytest.mark.parametrize("backend", backends())
def test_quit_reports_the_cancelled_job(backend: str, disk: Path,
                                        launch: Callable[..., BackupVM]) -> None:
    """``quit`` cancels the running job and the client hears of it: SHUTDOWN, then the
    job's aborting, BLOCK_JOB_CANCELLED, concluded and null (upstream iotest 185)."""
    vm = launch(backend, drive_args(disk))
    start_slow_backup(vm, disk.parent / "slow.qcow2")
    events, code = vm.quit()
    assert code == 0
    names = [e["event"] for e in events]
    assert "SHUTDOWN" in names
    after = events[names.index("SHUTDOWN"):]
    assert trace(after, "drive0")[-4:] == ["aborting", "CANCELLED", "concluded", "null"]
    assert find(after, "BLOCK_JOB_CANCELLED", "drive0")["data"]["len"] == FULL_LEN
