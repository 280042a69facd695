"""Persistent dirty bitmaps in qcow2 images, between bitback and QEMU 7.2.

Every scenario is checked against a model, a set of dirty granules per bitmap (a request
marks every granule it touches, clipped to the disk, of every enabled bitmap; a resize keeps
the granules that start before the new end), and against what QEMU itself reads from the
image: ``qemu-img info`` (names, granularities, flags), ``qemu-img check``, the dirty extents
real ``qemu-nbd -B NAME`` exports (read with libnbd's ``nbdinfo --map``) and
``x-debug-block-dirty-bitmap-sha256`` from ``qemu-storage-daemon`` or ``qemu-system-x86_64``.

1. **QEMU writes, bitback reads**: bitmaps made by ``qemu-img bitmap`` (several
   granularities, some disabled, one disabled half way) and marked by ``qemu-io``; bitmaps
   added over QMP to ``qemu-storage-daemon`` and marked through its NBD export. bitback's
   Python API and bitbackd (harness command line) read the same bits.
2. **bitback writes, QEMU reads**: bitbackd adds persistent bitmaps, writes through HMP
   ``qemu-io`` and closes the image by ``quit``, SIGTERM or ``blockdev-del``; QEMU 7.2 runs
   the same steps on a twin image, and both images must read alike. ``bitback-io`` marks an
   image's enabled bitmaps as ``qemu-io`` does. Bitmaps written through the Python API with
   random bits, all-zero and all-one data clusters (table shortcuts) hash alike in QEMU.
   ``quit`` during a backup stores the bitmap with the job's bits given back, as QEMU does.
3. **Crashes and resizes**: SIGKILL leaves bitmaps IN_USE; bitbackd and QEMU then answer
   alike (inconsistent in ``query-block``, backups, merges and ``block_resize`` refused,
   ``block-dirty-bitmap-remove`` allowed). Resizing keeps persistent bitmaps valid.
4. **The store path under SIGKILL**: a process storing many bitmaps is killed at random
   moments; the image is never corrupt and holds the old bitmaps, none, or all the new ones
   with the right bits (``BITBACK_BITMAP_CRASH_ROUNDS``, default 6; ``BITBACK_BITMAP_CRASH_SEED``).
"""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bitback.bitmaps import DirtyBitmap, GranuleBits
from bitback.block.drivers.qcow2.driver import Qcow2Driver
from bitback.block.open import open_image
from bitback.formats.qcow2.bitmaps import TABLE_ALL_ONES, decode_table
from helpers.bitmap_data import random_bits, seeded_bitmaps
from helpers.bitmap_servers import NbdBitmaps, StorageDaemon, merge_runs
from helpers.imagetools import CHECK_CLEAN, CHECK_LEAKS, check_image, info_json
from helpers.procs import run
from helpers.seedsetup import HarnessVM, granule_sha256, seed_status
from helpers.tools import require_reference_tool
from helpers.vm import BACKENDS, drive_args

pytestmark = pytest.mark.qemu

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
Run = tuple[int, int]


@pytest.fixture(scope="module")
def qemu_nbd() -> str:
    return require_reference_tool("qemu_nbd")


@pytest.fixture(scope="module")
def nbdinfo() -> str:
    return require_reference_tool("nbdinfo")


@pytest.fixture(scope="module")
def qsd() -> str:
    return require_reference_tool("qemu_storage_daemon")


# ------------------------------------------------------------------------------ the model


@dataclass
class ModelBitmap:
    name: str
    granularity: int
    enabled: bool = True
    dirty: set[int] = field(default_factory=set)


@dataclass
class Model:
    """The disk size and the bitmaps (by name) that an image must hold."""

    size: int
    bitmaps: dict[str, ModelBitmap] = field(default_factory=dict)

    def add(self, name: str, granularity: int, enabled: bool = True) -> None:
        self.bitmaps[name] = ModelBitmap(name, granularity, enabled)

    def write(self, offset: int, length: int) -> None:
        end = min(offset + length, self.size)
        if offset >= end:
            return
        for bm in self.bitmaps.values():
            if bm.enabled:
                g = bm.granularity
                bm.dirty.update(range(offset // g, (end - 1) // g + 1))

    def resize(self, size: int) -> None:
        self.size = size
        for bm in self.bitmaps.values():
            limit = -(-size // bm.granularity)
            bm.dirty = {i for i in bm.dirty if i < limit}

    def runs(self, name: str) -> list[Run]:
        """Dirty byte runs, clipped to the disk, as NBD and ``dirty_extents`` report them."""
        bm = self.bitmaps[name]
        g = bm.granularity
        return merge_runs((i * g, min((i + 1) * g, self.size) - i * g) for i in bm.dirty)

    def sha256(self, name: str) -> str:
        bm = self.bitmaps[name]
        return granule_sha256(self.size, bm.granularity, bm.dirty)

    def info(self) -> dict[str, tuple[int, list[str]]]:
        """What ``qemu-img info`` must list: name -> (granularity, flags)."""
        return {bm.name: (bm.granularity, ["auto"] if bm.enabled else [])
                for bm in self.bitmaps.values()}


@dataclass(frozen=True)
class Io:
    """One qemu-io request: ``write -P``, ``write -z`` or (standalone tools only) discard."""

    verb: str
    offset: int
    length: int

    def command(self) -> str:
        verb = {"write": "write -P 0x5c", "zero": "write -z", "discard": "discard"}[self.verb]
        return f"{verb} {self.offset} {self.length}"


def apply(model: Model, ios: Iterable[Io]) -> list[str]:
    """The qemu-io commands, with the model marked as they mark."""
    commands = []
    for io in ios:
        model.write(io.offset, io.length)
        commands.append(io.command())
    return commands


def io_args(commands: Iterable[str]) -> list[str]:
    out: list[str] = []
    for command in commands:
        out += ["-c", command]
    return out


def hmp_io(vm: HarnessVM, node: str, commands: Iterable[str]) -> None:
    """HMP ``qemu-io`` writes that must all succeed. The report is the last line: QEMU may
    print other things first (``Formatting ...`` when a backup creates its target)."""
    for command in commands:
        out = vm.io(node, command)
        assert out.splitlines()[-1].startswith("wrote "), (vm.backend, command, out)


def image_bitmaps(qemu_img: str, image: Path, *, force_share: bool = False
                  ) -> list[dict[str, Any]]:
    """``qemu-img info``'s bitmap list, in its order ([] when there is none).
    ``force_share`` (``-U``) reads an image that a running QEMU holds locked."""
    if force_share:
        res = run([qemu_img, "info", "-U", "--output=json", image], check=True)
        data = json.loads(res.stdout)
    else:
        data = info_json([qemu_img], image)
    return list(data["format-specific"]["data"].get("bitmaps", []))


def listed(bitmaps: list[dict[str, Any]]) -> dict[str, tuple[int, list[str]]]:
    return {bm["name"]: (bm["granularity"], bm["flags"]) for bm in bitmaps}


def assert_qemu_reads(model: Model, image: Path, qemu_img: str, qemu_nbd: str,
                      nbdinfo: str) -> list[dict[str, Any]]:
    """Real QEMU sees the model in ``image``: info, check, and the dirty extents over NBD.
    Returns ``qemu-img info``'s bitmap list."""
    bitmaps = image_bitmaps(qemu_img, image)
    assert listed(bitmaps) == model.info(), bitmaps
    assert info_json([qemu_img], image)["virtual-size"] == model.size
    check_image(qemu_img, image)
    with NbdBitmaps(qemu_nbd, nbdinfo, image, model.bitmaps) as nbd:
        for name in model.bitmaps:
            assert nbd.dirty(name) == model.runs(name), name
    return bitmaps


def assert_bitback_reads(model: Model, image: Path) -> None:
    """bitback's Python API (read-only open) loads exactly the model's bitmaps."""
    drv = open_image(str(image), "qcow2", read_only=True)
    try:
        assert isinstance(drv, Qcow2Driver)
        loaded = {bm.name: bm for bm in drv.persistent.bitmaps}
        assert sorted(loaded, key=str) == sorted(model.bitmaps)
        for name, want in model.bitmaps.items():
            got = loaded[name]
            assert (got.granularity, got.enabled, got.persistent, got.inconsistent) == (
                want.granularity, want.enabled, True, False), name
            assert list(got.bits.dirty_extents()) == model.runs(name), name
    finally:
        drv.close()


def bitmaps_72(backend: str, entry: dict[str, Any]) -> list[dict[str, Any]]:
    """A query-block entry's bitmaps in QEMU 7.2's shape, inconsistent ones included (which
    :func:`helpers.seedsetup.device_bitmaps` does not expect): bitbackd's seed-era copies must
    agree, and its ``status`` must say ``inconsistent`` for them."""
    listed_ = list(entry["inserted"].get("dirty-bitmaps", []))
    if backend == "qemu":
        assert "dirty-bitmaps" not in entry and all("status" not in bm for bm in listed_)
        return listed_
    assert entry.get("dirty-bitmaps", []) == listed_, entry
    out = []
    for bm in listed_:
        status = "inconsistent" if bm.get("inconsistent") else seed_status(bm)
        assert bm["status"] == status, bm
        out.append({k: v for k, v in bm.items() if k != "status"})
    return out


def bitbackd_view(image: Path) -> dict[str, tuple[dict[str, Any], str]]:
    """What bitbackd (harness command line) shows of ``image``'s bitmaps: query-block's
    entry (7.2 shape) and the digest, by name. The daemon quits cleanly."""
    with HarnessVM("bitback", drive_args(image)) as vm:
        entry = vm.ok("query-block")[0]
        out = {}
        for bm in bitmaps_72("bitback", entry):
            digest = vm.ok("x-debug-block-dirty-bitmap-sha256", node="drive0", name=bm["name"])
            out[bm["name"]] = (bm, digest["sha256"])
        assert vm.shutdown() == 0, vm.printed()
    return out


def assert_bitbackd_reads(model: Model, image: Path, qemu_digests: dict[str, str]) -> None:
    view = bitbackd_view(image)
    assert sorted(view) == sorted(model.bitmaps)
    for name, bm in model.bitmaps.items():
        info, digest = view[name]
        assert info == {"name": name, "recording": bm.enabled, "persistent": True,
                        "busy": False, "granularity": bm.granularity,
                        "count": len(bm.dirty) * bm.granularity}, info
        assert digest == model.sha256(name) == qemu_digests[name], name


# ------------------------------------------------------------------ 1. QEMU writes, bitback reads


@pytest.mark.parametrize("cluster_size", [512, 64 * KiB])
def test_qemu_img_bitmaps_read_by_bitback(tmp_path: Path, qemu_img: str, qemu_io: str,
                                          qemu_nbd: str, nbdinfo: str, qsd: str,
                                          cluster_size: int) -> None:
    """qemu-img bitmap --add (512 B .. 2 GiB, default, disabled), qemu-io writes, one bitmap
    disabled between two rounds of writes: bitback's API and bitbackd read the bits QEMU
    exports over NBD and hashes in qemu-storage-daemon."""
    size = 40 * MiB + 1536  # a multiple of no granularity above 512
    img = tmp_path / "q.qcow2"
    run([qemu_img, "create", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", img,
         str(size)], check=True)
    model = Model(size)
    for name, granularity, disabled in [("g512", 512, False), ("g1m", MiB, False),
                                        ("g2g", 2 * GiB, False), ("off", 64 * KiB, True),
                                        ("half", 4 * KiB, False), ("dflt", None, False)]:
        argv = [qemu_img, "bitmap", "--add"]
        if granularity is not None:
            argv += ["-g", str(granularity)]
        if disabled:
            argv.append("--disable")
        run([*argv, img, name], check=True)
        model.add(name, granularity or 0, not disabled)
    model.bitmaps["dflt"].granularity = listed(image_bitmaps(qemu_img, img))["dflt"][0]

    first = apply(model, [Io("write", 0, 512), Io("write", 1 * MiB + 512, 3000),
                          Io("zero", 8 * MiB, 64 * KiB), Io("discard", 12 * MiB, 1 * MiB),
                          Io("write", 4 * MiB, 2 * MiB), Io("write", size - 4096, 4096)])
    run([qemu_io, "-f", "qcow2", *io_args(first), img], check=True)
    run([qemu_img, "bitmap", "--disable", img, "half"], check=True)
    model.bitmaps["half"].enabled = False
    second = apply(model, [Io("write", 20 * MiB + 100, 10), Io("zero", 33 * MiB, 3 * MiB),
                           Io("write", size - 1, 1)])
    run([qemu_io, "-f", "qcow2", *io_args(second), img], check=True)

    assert_qemu_reads(model, img, qemu_img, qemu_nbd, nbdinfo)
    assert_bitback_reads(model, img)
    with StorageDaemon(qsd, {"n0": img}, read_only=True) as daemon:
        digests = {name: daemon.sha256("n0", name) for name in model.bitmaps}
    assert_bitbackd_reads(model, img, digests)
    # bitbackd wrote them back at quit (new tables and data, the old ones freed): QEMU still
    # reads the same.
    assert_qemu_reads(model, img, qemu_img, qemu_nbd, nbdinfo)


def test_storage_daemon_bitmaps_read_by_bitback(tmp_path: Path, qemu_img: str, qemu_io: str,
                                                qsd: str, qemu_nbd: str, nbdinfo: str) -> None:
    """Persistent bitmaps added over QMP to qemu-storage-daemon, marked by qemu-io through its
    NBD export, stored by ``quit``: bitback reads the bits QEMU hashed before quitting. A
    bitmap that was not persistent stays out of the image."""
    size = 24 * MiB + 512
    img = tmp_path / "qsd.qcow2"
    run([qemu_img, "create", "-f", "qcow2", img, str(size)], check=True)
    model = Model(size)
    with StorageDaemon(qsd, {"n0": img}, export="n0") as daemon:
        for name, granularity, disabled in [("q16k", 16 * KiB, False), ("q512", 512, False),
                                            ("qoff", 1 * MiB, True)]:
            daemon.qmp.ok("block-dirty-bitmap-add", {
                "node": "n0", "name": name, "persistent": True, "granularity": granularity,
                "disabled": disabled})
            model.add(name, granularity, not disabled)
        daemon.qmp.ok("block-dirty-bitmap-add", {"node": "n0", "name": "transient"})
        first = apply(model, [Io("write", 3 * MiB, 20 * KiB), Io("write", 777 * 512, 1000),
                              Io("zero", 10 * MiB, 5 * MiB)])
        run([qemu_io, "-f", "raw", *io_args(first), daemon.nbd_uri()], check=True)
        daemon.qmp.ok("block-dirty-bitmap-disable", {"node": "n0", "name": "q512"})
        model.bitmaps["q512"].enabled = False
        second = apply(model, [Io("write", size - 512, 512), Io("write", 16 * MiB, 64 * KiB)])
        run([qemu_io, "-f", "raw", *io_args(second), daemon.nbd_uri()], check=True)
        digests = {name: daemon.sha256("n0", name) for name in model.bitmaps}
        assert daemon.quit() == 0, daemon.stderr

    assert_qemu_reads(model, img, qemu_img, qemu_nbd, nbdinfo)
    assert_bitback_reads(model, img)
    assert_bitbackd_reads(model, img, digests)


# ------------------------------------------------------------------ 2. bitback writes, QEMU reads


# name, granularity (None: the node's default), disabled from the start
WRITER_BITMAPS = [("dflt", None, False), ("g512", 512, False), ("g2g", 2 * GiB, False),
                  ("off", 1 * MiB, True), ("half", 4 * KiB, False)]


def writer_scenario(backend: str, image: Path, ending: str, qemu_img: str) -> Model:
    """Add persistent bitmaps (and one that is not), write through HMP qemu-io, disable one
    half way, and close the image by ``ending``: quit, SIGTERM or blockdev-del (of a node
    made by blockdev-add), then quit. Returns the model of what the image must hold."""
    size = info_json([qemu_img], image)["virtual-size"]
    model = Model(size)
    args = [] if ending == "blockdev-del" else drive_args(image)
    with HarnessVM(backend, args) as vm:
        node = "drive0"
        if ending == "blockdev-del":
            node = "n0"
            vm.ok("blockdev-add", driver="qcow2", node_name=node,
                  file={"driver": "file", "filename": str(image)})
        for name, granularity, disabled in WRITER_BITMAPS:
            args_: dict[str, Any] = {"node": node, "name": name, "persistent": True}
            if granularity is not None:
                args_["granularity"] = granularity
            if disabled:
                args_["disabled"] = True
            vm.ok("block-dirty-bitmap-add", **args_)
        vm.ok("block-dirty-bitmap-add", node=node, name="transient", granularity=512)
        for name, _, disabled in WRITER_BITMAPS:
            granularity = vm.bitmap_info(node, name)["granularity"]
            model.add(name, granularity, not disabled)

        # 4M..6M fills a whole data cluster of g512 when clusters are 512 bytes: all ones.
        hmp_io(vm, node, apply(model, [Io("write", 0, 512), Io("write", 4 * MiB, 2 * MiB),
                                       Io("write", 1 * MiB + 512, 3000),
                                       Io("write", size - 4096, 4096)]))
        vm.ok("block-dirty-bitmap-disable", node=node, name="half")
        model.bitmaps["half"].enabled = False
        hmp_io(vm, node, apply(model, [Io("zero", 8 * MiB, 64 * KiB),
                                       Io("write", 20 * MiB + 100, 10)]))

        assert vm.proc is not None
        if ending == "sigterm":
            vm.proc.send_signal(signal.SIGTERM)
            assert vm.proc.wait(60) == 0, (backend, vm.printed())
        elif ending == "blockdev-del":
            vm.ok("blockdev-del", node_name=node)
            # Stored at once: the image says so while the process still runs.
            bitmaps = image_bitmaps(qemu_img, image)
            assert listed(bitmaps) == model.info(), (backend, bitmaps)
            assert vm.shutdown() == 0, (backend, vm.printed())
        else:
            assert vm.shutdown() == 0, (backend, vm.printed())
    return model


@pytest.mark.parametrize("ending, cluster_size", [
    ("quit", 64 * KiB), ("sigterm", 512), ("blockdev-del", 2 * MiB), ("quit", 512)])
def test_bitbackd_bitmaps_read_by_qemu(tmp_path: Path, qemu_img: str, qemu_nbd: str,
                                       nbdinfo: str, qemu_system: str, ending: str,
                                       cluster_size: int) -> None:
    """bitbackd stores persistent bitmaps as QEMU 7.2 does on the same steps: same list (order,
    granularities, flags: ``auto`` exactly for enabled ones, never ``in-use``), a clean
    check, and the dirty extents the writes imply, exported by real qemu-nbd."""
    size = 24 * MiB + 3584
    images = {}
    for backend in BACKENDS:
        images[backend] = tmp_path / f"{backend}.qcow2"
        run([qemu_img, "create", "-f", "qcow2", "-o", f"cluster_size={cluster_size}",
             images[backend], str(size)], check=True)
    models = {backend: writer_scenario(backend, images[backend], ending, qemu_img)
              for backend in BACKENDS}
    assert models["bitback"] == models["qemu"]
    lists = {backend: assert_qemu_reads(models[backend], images[backend], qemu_img, qemu_nbd,
                                        nbdinfo) for backend in BACKENDS}
    assert lists["bitback"] == lists["qemu"]
    if cluster_size == 512:
        # The 2 MiB write must have been stored as an all-ones table entry, not data.
        drv = open_image(str(images["bitback"]), "qcow2", read_only=True)
        try:
            assert isinstance(drv, Qcow2Driver)
            entry = next(e for e in drv.persistent.entries if e.name == "g512")
            table = decode_table(drv.file.pread(entry.table_offset, entry.table_size * 8))
            assert int(table[(4 * MiB // 512) // (512 * 8)]) == TABLE_ALL_ONES
        finally:
            drv.close()


def test_bitback_io_marks_persistent_bitmaps(tmp_path: Path, qemu_img: str, qemu_io: str,
                                             bitback_io: list[str], qemu_nbd: str,
                                             nbdinfo: str) -> None:
    """``bitback-io`` on an image with an enabled and a disabled persistent bitmap marks the
    enabled one (writes, zero writes and discards) exactly as ``qemu-io`` does."""
    size = 32 * MiB
    model = Model(size)
    model.add("e", 4 * KiB)
    model.add("d", 4 * KiB, enabled=False)
    model.add("coarse", 1 * MiB)
    commands = apply(model, [Io("write", 5 * MiB, 10 * KiB), Io("zero", 9 * MiB, 4 * KiB),
                             Io("discard", 20 * MiB, 64 * KiB), Io("write", 1000, 100),
                             Io("write", size - 512, 512)])
    for tool, name in (([qemu_io], "qemu"), (bitback_io, "bitback")):
        img = tmp_path / f"{name}.qcow2"
        run([qemu_img, "create", "-f", "qcow2", img, str(size)], check=True)
        run([qemu_img, "bitmap", "--add", "-g", "4k", img, "e"], check=True)
        run([qemu_img, "bitmap", "--add", "-g", "4k", "--disable", img, "d"], check=True)
        run([qemu_img, "bitmap", "--add", "-g", "1M", img, "coarse"], check=True)
        run([*tool, "-f", "qcow2", *io_args(commands), img], check=True)
        assert_qemu_reads(model, img, qemu_img, qemu_nbd, nbdinfo)


def test_api_bitmaps_hash_alike_in_qemu(tmp_path: Path, qemu_img: str, qsd: str) -> None:
    """Bitmaps stored through the Python API - random bits, all-zero and all-one data
    clusters (table shortcuts), the last data cluster partly used, disks over 1 TiB - are
    loaded by qemu-storage-daemon with the same digests; qemu-img check is clean."""
    rnd = random.Random(6)
    cases = [  # cluster size, disk size, [(name, granularity, enabled, kinds)]
        (512, 6 * MiB + 512, [("a", 512, True, ["ones", "zero", "random"]),
                              ("b", 4 * KiB, False, ["random"])]),
        (64 * KiB, 2 * TiB + 1536, [("big", 1 * MiB, True, ["random", "ones", "zero"]),
                                    ("ones", 64 * MiB, False, ["ones"])]),
        (2 * MiB, 3 * TiB - 512, [("g2g", 2 * GiB, True, ["random"])]),
    ]
    images: dict[str, Path] = {}
    expected: dict[tuple[str, str], str] = {}
    for index, (cluster_size, size, specs) in enumerate(cases):
        node = f"n{index}"
        img = images[node] = tmp_path / f"{node}.qcow2"
        run([qemu_img, "create", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", img,
             str(size)], check=True)
        drv = open_image(str(img), "qcow2")
        assert isinstance(drv, Qcow2Driver)
        try:
            for name, granularity, enabled, kinds in specs:
                bitmap = DirtyBitmap(size, granularity, name, enabled=enabled, persistent=True)
                bitmap.bits = random_bits(rnd, size, granularity, cluster_size, kinds)
                drv.persistent.add(bitmap)
                expected[node, name] = bitmap.bits.sha256()
        finally:
            drv.close()
        check_image(qemu_img, img)
        assert listed(image_bitmaps(qemu_img, img)) == {
            name: (g, ["auto"] if enabled else []) for name, g, enabled, _ in specs}
    with StorageDaemon(qsd, images, read_only=True) as daemon:
        got = {key: daemon.sha256(*key) for key in expected}
    assert got == expected


def test_no_dirty_granules_past_the_end_for_qemu(tmp_path: Path, qemu_img: str, qsd: str,
                                                 qemu_nbd: str, nbdinfo: str) -> None:
    """A last data cluster with every granule set, but only a few granules in it, must not
    reach QEMU as an all-ones table entry: QEMU 7.2 loads those in whole 64-bit words, so
    the granules past the end of the disk would be set too, and dirty for real once QEMU
    grows the disk. bitback wrote such an entry until this test found it; QEMU itself never
    writes all-ones entries."""
    size = 6 * MiB + 512  # at 512 B granules: 3 data clusters of 4096 granules, then 1 granule
    img = tmp_path / "tail.qcow2"
    run([qemu_img, "create", "-f", "qcow2", "-o", "cluster_size=512", img, str(size)],
        check=True)
    drv = open_image(str(img), "qcow2")
    assert isinstance(drv, Qcow2Driver)
    try:
        bitmap = DirtyBitmap(size, 512, "tail", persistent=True)
        bitmap.bits.set_range(0, 2 * MiB)  # data cluster 0: all ones, a shortcut is right
        bitmap.bits.set_range(6 * MiB, 512)  # data cluster 3: its only granule
        drv.persistent.add(bitmap)
    finally:
        drv.close()
    with StorageDaemon(qsd, {"n0": img}) as daemon:
        assert daemon.sha256("n0", "tail") == granule_sha256(size, 512, [*range(4096), 12288])
        daemon.qmp.ok("block_resize", {"node-name": "n0", "size": 8 * MiB})
        assert daemon.quit() == 0, daemon.stderr
    with NbdBitmaps(qemu_nbd, nbdinfo, img, ["tail"]) as nbd:
        assert nbd.dirty("tail") == [(0, 2 * MiB), (6 * MiB, 512)]


def test_quit_during_backup_gives_the_bits_back(tmp_path: Path, qemu_img: str, qemu_nbd: str,
                                                nbdinfo: str, qemu_system: str) -> None:
    """``quit`` while an incremental backup holds a persistent bitmap cancels the job, which
    gives the bitmap its bits back (plus the writes made meanwhile) before it is stored,
    on bitbackd as on QEMU."""
    size = 16 * MiB
    model = Model(size)
    model.add("p", 64 * KiB)
    # Three separate dirty areas: at 1 byte/s the job copies (at most) the first one, then
    # waits far longer than the test, on QEMU as on bitbackd.
    first = apply(model, [Io("write", 1 * MiB, 1 * MiB), Io("write", 4 * MiB, 512 * KiB),
                          Io("write", 10 * MiB, 64 * KiB)])
    during = apply(model, [Io("write", 5 * MiB, 64 * KiB)])
    for backend in BACKENDS:
        img = tmp_path / f"{backend}.qcow2"
        run([qemu_img, "create", "-f", "qcow2", img, str(size)], check=True)
        with HarnessVM(backend, drive_args(img)) as vm:
            vm.ok("block-dirty-bitmap-add", node="drive0", name="p", persistent=True)
            hmp_io(vm, "drive0", first)
            vm.ok("drive-backup", device="drive0", target=str(tmp_path / f"{backend}-inc.qcow2"),
                  format="qcow2", sync="incremental", bitmap="p", speed=1)
            hmp_io(vm, "drive0", during)
            jobs = vm.ok("query-block-jobs")
            assert [job["device"] for job in jobs] == ["drive0"], jobs  # still running
            assert vm.shutdown() == 0, vm.printed()
        assert_qemu_reads(model, img, qemu_img, qemu_nbd, nbdinfo)


def test_persistent_add_and_remove_answer_as_qemu(tmp_path: Path, qemu_img: str, qemu_io: str,
                                                  qemu_nbd: str, nbdinfo: str,
                                                  qemu_system: str) -> None:
    """What may be made persistent and what a remove does, on bitbackd as on QEMU 7.2: the
    same refusals (bitmap too large for a 4 TiB disk at 512 B, qcow2 v2, a name already
    stored or over 1023 bytes); a remove takes the bitmap off the disk at once, while a
    remove in an aborted transaction leaves it there and stores it again at the end."""
    answers: dict[str, list[Any]] = {}
    for backend in BACKENDS:
        log = answers.setdefault(backend, [])
        img, big, v2 = (tmp_path / f"{backend}-{n}.qcow2" for n in ("img", "big", "v2"))
        run([qemu_img, "create", "-f", "qcow2", img, "16M"], check=True)
        run([qemu_img, "create", "-f", "qcow2", big, "4T"], check=True)
        run([qemu_img, "create", "-f", "qcow2", "-o", "compat=0.10", v2, "16M"], check=True)
        for name in ("p", "r"):
            run([qemu_img, "bitmap", "--add", img, name], check=True)
        run([qemu_io, "-f", "qcow2", "-c", "write 1M 64k", img], check=True)
        args = [*drive_args(img), "-drive", f"if=none,id=big,file={big},format=qcow2",
                "-drive", f"if=none,id=v2,file={v2},format=qcow2"]
        with HarnessVM(backend, args) as vm:
            for node, name, granularity in [("big", "x", 512), ("big", "x", 1024),
                                            ("v2", "x", None), ("drive0", "p", None),
                                            ("drive0", "n" * 1024, None)]:
                extra = {} if granularity is None else {"granularity": granularity}
                log.append(vm.qmp("block-dirty-bitmap-add", node=node, name=name,
                                  persistent=True, **extra))
            log.append(vm.qmp("transaction", actions=[
                {"type": "block-dirty-bitmap-remove", "data": {"node": "drive0", "name": "p"}},
                {"type": "abort", "data": {}}]))
            log.append(image_bitmaps(qemu_img, img, force_share=True))  # p went, r in use
            log.append(vm.qmp("block-dirty-bitmap-remove", node="drive0", name="r"))
            log.append(image_bitmaps(qemu_img, img, force_share=True))
            hmp_io(vm, "drive0", ["write 2M 64k"])
            assert vm.shutdown() == 0, vm.printed()
        log.append(image_bitmaps(qemu_img, img))
        check_image(qemu_img, img)
        with NbdBitmaps(qemu_nbd, nbdinfo, img, ["p"]) as nbd:
            log.append(nbd.dirty("p"))
    bitback = answers["bitback"]
    assert bitback[-3:] == [[], [{"flags": ["auto"], "name": "p", "granularity": 65536}],
                            [(1 * MiB, 64 * KiB), (2 * MiB, 64 * KiB)]]
    for mine, theirs in zip(bitback, answers["qemu"], strict=True):
        assert mine == theirs


# ------------------------------------------------------------------ 3. crashes and resizes


def test_sigkill_leaves_bitmaps_inconsistent(tmp_path: Path, qemu_img: str,
                                             qemu_system: str) -> None:
    """bitbackd killed while persistent bitmaps are open leaves them IN_USE. On the next open
    bitbackd and QEMU 7.2 (on a copy, same -drive line) agree on every answer: the bitmaps
    are inconsistent, incremental backups, merges from and into them and block_resize are
    refused, remove works; then the image is clean."""
    img = tmp_path / "bitback.qcow2"
    run([qemu_img, "create", "-f", "qcow2", img, "32M"], check=True)
    run([qemu_img, "bitmap", "--add", img, "p"], check=True)
    run([qemu_img, "bitmap", "--add", "-g", "4k", img, "q"], check=True)
    with HarnessVM("bitback", drive_args(img)) as vm:
        hmp_io(vm, "drive0", ["write -P 0x11 1M 64k"])
        vm.kill()
        assert vm.exitcode == -signal.SIGKILL
    bitmaps = image_bitmaps(qemu_img, img)
    assert [(bm["name"], bm["flags"]) for bm in bitmaps] == [
        ("p", ["in-use", "auto"]), ("q", ["in-use", "auto"])]
    check_image(qemu_img, img, allowed=(CHECK_CLEAN, CHECK_LEAKS))
    twin = tmp_path / "qemu.qcow2"
    shutil.copyfile(img, twin)

    answers: dict[str, list[Any]] = {}
    for backend, image in (("bitback", img), ("qemu", twin)):
        log: list[Any] = answers.setdefault(backend, [])
        with HarnessVM(backend, drive_args(image)) as vm:
            log.append(bitmaps_72(backend, vm.ok("query-block")[0]))

            def ask(cmd: str, log: list[Any] = log, vm: HarnessVM = vm, **kw: Any) -> None:
                reply = vm.qmp(cmd, **kw)
                log.append((cmd, reply.get("error", "ok")))

            ask("x-debug-block-dirty-bitmap-sha256", node="drive0", name="p")
            ask("drive-backup", device="drive0", sync="incremental", bitmap="p",
                format="qcow2", target=str(tmp_path / f"{backend}-inc.qcow2"))
            ask("drive-backup", device="drive0", sync="full", bitmap="q", bitmap_mode="never",
                format="qcow2", target=str(tmp_path / f"{backend}-full.qcow2"))
            ask("block-dirty-bitmap-add", node="drive0", name="t")
            ask("block-dirty-bitmap-merge", node="drive0", target="t", bitmaps=["p"])
            ask("block-dirty-bitmap-merge", node="drive0", target="q", bitmaps=["t"])
            ask("block-dirty-bitmap-clear", node="drive0", name="p")
            ask("block-dirty-bitmap-enable", node="drive0", name="q")
            ask("block_resize", device="drive0", size=48 * MiB)
            ask("block-dirty-bitmap-remove", node="drive0", name="p")
            ask("block_resize", device="drive0", size=48 * MiB)
            ask("block-dirty-bitmap-remove", node="drive0", name="q")
            ask("block_resize", device="drive0", size=48 * MiB)
            log.append(bitmaps_72(backend, vm.ok("query-block")[0]))
            assert vm.shutdown() == 0, vm.printed()
        assert image_bitmaps(qemu_img, image) == []
        check_image(qemu_img, image)
    bitback, qemu = answers["bitback"], answers["qemu"]
    assert bitback[0] == [
        {"name": "q", "recording": False, "persistent": True, "busy": False,
         "granularity": 4096, "count": 0, "inconsistent": True},
        {"name": "p", "recording": False, "persistent": True, "busy": False,
         "granularity": 65536, "count": 0, "inconsistent": True}]

    def refused(name: str) -> dict[str, str]:
        return {"class": "GenericError",
                "desc": f"Bitmap '{name}' is inconsistent and cannot be used"}

    assert bitback[2] == ("drive-backup", refused("p"))
    assert bitback[5] == ("block-dirty-bitmap-merge", refused("p"))
    # QEMU names the first bad bitmap of the directory (p), not the newest in memory (q).
    assert bitback[9] == ("block_resize", refused("p"))
    assert bitback[10:14] == [("block-dirty-bitmap-remove", "ok"), ("block_resize", refused("q")),
                              ("block-dirty-bitmap-remove", "ok"), ("block_resize", "ok")]
    for mine, theirs in zip(bitback, qemu, strict=True):
        assert mine == theirs


def test_resize_keeps_persistent_bitmaps(tmp_path: Path, qemu_img: str, qemu_nbd: str,
                                         nbdinfo: str, qemu_system: str) -> None:
    """Bitmaps stored by one session, loaded by the next, which adds one more, writes, grows
    the disk, writes past the old end and shrinks it again: after quit the image is clean and
    lists all four with the bits the model says, on bitbackd as on QEMU."""
    size = 16 * MiB
    grown, shrunk = 40 * MiB + 512, 28 * MiB + 3584
    for backend in BACKENDS:
        model = Model(size)
        img = tmp_path / f"{backend}.qcow2"
        run([qemu_img, "create", "-f", "qcow2", img, str(size)], check=True)
        with HarnessVM(backend, drive_args(img)) as vm:
            for name, granularity, disabled in [("a", 64 * KiB, False), ("b", 512, False),
                                                ("d", 1 * MiB, True)]:
                vm.ok("block-dirty-bitmap-add", node="drive0", name=name, persistent=True,
                      granularity=granularity, disabled=disabled)
                model.add(name, granularity, not disabled)
            hmp_io(vm, "drive0", apply(model, [Io("write", 3 * MiB, 100 * KiB),
                                               Io("write", size - 512, 512)]))
            vm.ok("block-dirty-bitmap-enable", node="drive0", name="d")
            model.bitmaps["d"].enabled = True
            assert vm.shutdown() == 0, vm.printed()
        with HarnessVM(backend, drive_args(img)) as vm:
            vm.ok("block-dirty-bitmap-add", node="drive0", name="c", persistent=True,
                  granularity=4096)
            model.add("c", 4096)
            hmp_io(vm, "drive0", apply(model, [Io("write", 6 * MiB, 8 * KiB)]))
            vm.ok("block_resize", device="drive0", size=grown)
            model.resize(grown)
            hmp_io(vm, "drive0", apply(model, [Io("write", 30 * MiB - 512, 2 * MiB),
                                               Io("write", grown - 1024, 1024)]))
            vm.ok("block_resize", device="drive0", size=shrunk)
            model.resize(shrunk)
            assert vm.shutdown() == 0, vm.printed()
        assert_qemu_reads(model, img, qemu_img, qemu_nbd, nbdinfo)
        if backend == "bitback":
            assert_bitback_reads(model, img)


# ------------------------------------------------------------------ 4. the store path, killed

CRASH_ROUNDS = int(os.environ.get("BITBACK_BITMAP_CRASH_ROUNDS", "6"))
CRASH_SEED = int(os.environ.get("BITBACK_BITMAP_CRASH_SEED", "20261127"))
CRASH_SIZE = 8 * MiB + 512
CRASH_BITMAPS = 40

# Opens the image read-write (its bitmaps go IN_USE in place), adds CRASH_BITMAPS seeded
# bitmaps and closes it (the store); says "ready" just before opening (everything imported)
# and "stored" at the end.
STORER = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[4])
    from bitback.bitmaps import DirtyBitmap
    from bitback.block.drivers.qcow2.driver import Qcow2Driver
    from bitback.block.open import open_image
    from helpers.bitmap_data import seeded_bitmaps
    path, seed, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    size, cluster_size = int(sys.argv[5]), int(sys.argv[6])
    bitmaps = list(seeded_bitmaps(seed, count, size, cluster_size))
    print("ready", flush=True)
    drv = open_image(path, "qcow2")
    for name, granularity, bits in bitmaps:
        bitmap = DirtyBitmap(size, granularity, name, persistent=True)
        bitmap.bits = bits
        drv.persistent.add(bitmap)
    drv.close()
    print("stored", flush=True)
""")


def crash_bits(seed: int) -> list[tuple[str, int, GranuleBits]]:
    return list(seeded_bitmaps(seed, CRASH_BITMAPS, CRASH_SIZE, 512))


def test_store_survives_sigkill(tmp_path: Path, qemu_img: str, qemu_io: str) -> None:
    """A process storing 40 bitmaps (512-byte clusters: hundreds of data clusters) killed at
    random moments: qemu-img check finds no corruption (leaks allowed), and the image holds
    the two old bitmaps (IN_USE or not), or none (killed while the bitmaps extension was
    being marked in use), or the old ones and every new one with its exact bits."""
    rnd = random.Random(CRASH_SEED)
    tests_dir = str(Path(__file__).resolve().parents[1])

    def storer(path: Path, seed: int) -> list[str]:
        return [sys.executable, "-c", STORER, str(path), str(seed), str(CRASH_BITMAPS),
                tests_dir, str(CRASH_SIZE), "512"]

    def fresh(path: Path) -> None:
        run([qemu_img, "create", "-f", "qcow2", "-o", "cluster_size=512", path,
             str(CRASH_SIZE)], check=True)
        run([qemu_img, "bitmap", "--add", "-g", "4k", path, "old1"], check=True)
        run([qemu_io, "-f", "qcow2", "-c", "write 1M 64k", path], check=True)
        run([qemu_img, "bitmap", "--add", "--disable", path, "old2"], check=True)

    def start(path: Path, seed: int) -> subprocess.Popen[str]:
        proc = subprocess.Popen(storer(path, seed), stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        assert proc.stdout is not None
        if proc.stdout.readline() != "ready\n":
            proc.kill()
            proc.wait(30)
            raise AssertionError(f"the storer failed to start: {shlex.join(storer(path, seed))}")
        return proc

    # How long opening and storing take here, to spread the kills over it.
    calib = tmp_path / "calib.qcow2"
    fresh(calib)
    proc = start(calib, 1)
    began = time.monotonic()
    assert proc.stdout is not None and proc.stdout.readline() == "stored\n"
    span = time.monotonic() - began
    assert proc.wait(30) == 0
    for round_ in range(CRASH_ROUNDS):
        seed = rnd.randrange(1 << 30)
        img = tmp_path / f"crash{round_}.qcow2"
        fresh(img)
        proc = start(img, seed)
        try:
            time.sleep(rnd.uniform(0, span))
        finally:
            proc.kill()
            proc.wait(30)
        where = f"round {round_}, seed {seed} (BITBACK_BITMAP_CRASH_SEED={CRASH_SEED})"
        check_image(qemu_img, img, allowed=(CHECK_CLEAN, CHECK_LEAKS))
        bitmaps = listed(image_bitmaps(qemu_img, img))
        names = set(bitmaps)
        new = {name for name, _, _ in crash_bits(seed)}
        assert names in ({"old1", "old2"}, set(), {"old1", "old2"} | new), (where, bitmaps)
        if names == {"old1", "old2"}:
            flags = {tuple(f for f in bitmaps[n][1] if f == "in-use") for n in names}
            assert len(flags) == 1, (where, bitmaps)  # all marked in use, or none
        if names >= new:
            assert all("in-use" not in bitmaps[n][1] for n in names), (where, bitmaps)
            drv = open_image(str(img), "qcow2", read_only=True)
            try:
                assert isinstance(drv, Qcow2Driver)
                loaded = {bm.name: bm for bm in drv.persistent.bitmaps}
                for name, _, bits in crash_bits(seed):
                    assert loaded[name].bits == bits, (where, name)
                old = loaded["old1"]
                assert list(old.bits.dirty_extents()) == [(1 * MiB, 64 * KiB)], where
            finally:
                drv.close()
