"""The image steps of the seed (iotest 124), with bitback's and QEMU's tools mixed freely.

The seed's tests build images with ``qemu-img create`` (64M, overlays with ``-b``/``-F``, a
128 KiB-cluster target), write its patterns with ``qemu-io``, run backups in a VM, rebase
with ``qemu-img rebase -u`` and check the results with ``qemu-img compare``
(``check_backups``; spec sections 8 and 10). Here the backup jobs are played by the io tool:
a full backup writes every non-zero run of the drive into a fresh image, an incremental one
writes the whole dirty clusters (at the job's cluster size) into an overlay of the previous
backup, zeros included, as a backup job does (spec 6.4). The job lengths this gives are
the ones QEMU 7.2 reports (458752, 1507328, 655360, 65536), which the tests assert too.

Every step (create, write, truncate, rebase, compare) is run by bitback's tool or by QEMU's
according to a *plan*: all bitback, all QEMU, "bitback creates and rebases, QEMU writes and
compares", the reverse, and two plans that alternate tools call by call. Over the plans of
``test_incremental_simple`` and ``test_larger_cluster_target``, each image sees all four
combinations of tools for every pair of roles (creator, writer, rebaser, comparer); this was
counted from the step log (``Steps.log``).

Whatever the plan, the results must be the seed's: every incremental equals its reference
and the last one equals the drive; an incremental compared with a drive that moved on reports
the same mismatch offset with both tools; and real ``qemu-img check`` finds every image clean.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from helpers.imagetools import check_image, compare, create, io_argv
from helpers.model import DiskModel, Truncate, Write, WriteZeroes
from helpers.procs import run

pytestmark = pytest.mark.qemu

KiB, MiB = 1 << 10, 1 << 20
GRANULARITY = 64 * KiB

# The seed's patterns: (pattern, offset, length) as it writes them with qemu-io.
SETUP_DRIVE0 = (("0x41", "0", "512"), ("0xd5", "1M", "32k"), ("0xdc", "32M", "124k"))
SETUP_DRIVE1 = (("0x14", "0", "512"), ("0x5d", "1M", "32k"), ("0xcd", "32M", "124k"))
WRITES_1 = (("0xab", "0", "512"), ("0xfe", "16M", "256k"), ("0x64", "32736k", "64k"))
WRITES_2 = (("0x9a", "0", "512"), ("0x55", "8M", "352k"), ("0x78", "15872k", "1M"))
WRITES_DRIVE1 = (("0xba", "0", "512"), ("0xef", "16M", "256k"), ("0x46", "32736k", "64k"))

_UNITS = {"": 1, "k": KiB, "M": MiB}


def _size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([kM]?)", text)
    assert m, text
    return int(m.group(1)) * _UNITS[m.group(2)]


# name -> which tool runs each kind of step; "alt" alternates call by call.
PLANS: dict[str, dict[str, str]] = {
    "bitback": dict.fromkeys(("create", "write", "rebase", "compare"), "bitback"),
    "qemu": dict.fromkeys(("create", "write", "rebase", "compare"), "qemu"),
    "bitback-creates-rebases": {"create": "bitback", "write": "qemu", "rebase": "bitback",
                                "compare": "qemu"},
    "qemu-creates-rebases": {"create": "qemu", "write": "bitback", "rebase": "qemu",
                             "compare": "bitback"},
    "alternate-bitback-first": dict.fromkeys(("create", "write", "rebase", "compare"), "alt0"),
    "alternate-qemu-first": dict.fromkeys(("create", "write", "rebase", "compare"), "alt1"),
}


@dataclass
class Steps:
    """Runs the seed's image steps with the tools a plan picks, and tracks guest contents."""

    plan: dict[str, str]
    dir: Path
    qemu_img: str
    qemu_io: str
    bitback_img: list[str]
    bitback_io: list[str]
    models: dict[str, DiskModel] = field(default_factory=dict)
    # image -> the ranges a backup wrote into it (its own clusters, for rebase)
    written: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    _calls: int = 0

    def _tool(self, kind: str) -> str:
        choice = self.plan[kind]
        if choice.startswith("alt"):
            choice = ("bitback", "qemu")[(self._calls + int(choice[3])) % 2]
        self._calls += 1
        return choice

    def _img(self, kind: str) -> tuple[str, list[str]]:
        who = self._tool(kind)
        return who, (self.bitback_img if who == "bitback" else [self.qemu_img])

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.qcow2"

    def create(self, name: str, size: str = "64M", *, parent: str | None = None,
               cluster_size: str | None = None) -> None:
        """``img_create``: ``create -f qcow2 [-o cluster_size=] IMG SIZE [-b P -F qcow2]``."""
        who, tool = self._img("create")
        self.log.append(f"{who}: create {name} {size} parent={parent} cluster={cluster_size}")
        # Relative backing names, as the seed's paths are all in one directory.
        create(tool, f"{name}.qcow2", size, cluster_size=cluster_size,
               backing=None if parent is None else f"{parent}.qcow2", cwd=self.dir)
        cs = _size(cluster_size) if cluster_size else 64 * KiB
        base = None if parent is None else self.models[parent].buffer()
        self.models[name] = DiskModel(_size(size), cs, backing=base)

    def io(self, name: str, cmds: list[str]) -> None:
        """One io tool run with every command; the model follows."""
        if not cmds:
            return
        who = self._tool("write")
        tool = self.bitback_io if who == "bitback" else [self.qemu_io]
        self.log.append(f"{who}: io {name} {len(cmds)} commands")
        run([*tool, "-f", "qcow2", *io_argv(cmds), self.path(name).name], check=True,
            cwd=self.dir)
        model = self.models[name]
        for cmd in cmds:
            parts = cmd.split()
            if parts[0] == "truncate":
                assert model.apply(Truncate(_size(parts[1])))
            elif parts[1] == "-z":
                assert model.apply(WriteZeroes(int(parts[2]), int(parts[3])))
            else:
                assert model.apply(Write(int(parts[3]), int(parts[4]), int(parts[2], 0)))

    def write_patterns(self, name: str, patterns: Iterable[tuple[str, str, str]]) -> None:
        """``io_write_patterns`` / ``hmp_io_writes``: ``write -P p off len`` each."""
        self.io(name, [f"write -P {p} {_size(o)} {_size(n)}" for p, o, n in patterns])

    def rebase(self, name: str, parent: str) -> None:
        """``rebase -f qcow2 -u -b PARENT -F qcow2 IMG``: the header changes, data does not."""
        who, tool = self._img("rebase")
        self.log.append(f"{who}: rebase -u {name} onto {parent}")
        run([*tool, "rebase", "-f", "qcow2", "-u", "-b", f"{parent}.qcow2", "-F", "qcow2",
             f"{name}.qcow2"], check=True, cwd=self.dir)
        # Unallocated clusters now show the new parent: rebuild the model from the image's
        # own clusters (what was written into it) over the parent's content.
        old = self.models[name]
        self.models[name] = _rebased(old, self.models[parent].buffer(), self.written[name])

    def compare(self, a: str, b: str) -> bool:
        """``iotests.compare_images``: True for exit 0, False for 1, anything else fails."""
        who, tool = self._img("compare")
        code, out = compare(tool, f"{a}.qcow2", f"{b}.qcow2", cwd=self.dir)
        self.log.append(f"{who}: compare {a} {b} -> {code}")
        assert code in (0, 1), f"{who} compare {a} {b}: exit {code}: {out}"
        return code == 0

    # -- backups played by the io tool ------------------------------------------------------
    def full_backup(self, drive: str, target: str, *, cluster_size: str | None = None,
                    existing: bool = False) -> None:
        """``drive-backup sync=full``: a new image holding every non-zero run of the drive."""
        if not existing:
            self.create(target, str(self.models[drive].size), cluster_size=cluster_size)
        content = self.models[drive].buffer()
        self.written[target] = [(0, len(content))]
        self.io(target, _copy_commands(content, [(0, len(content))], zeros=False))

    def incremental(self, drive: str, target: str, dirty: list[tuple[int, int]],
                    *, parent: str | None, size: str | None = None,
                    cluster_size: str | None = None) -> int:
        """``sync=incremental``: the dirty clusters, zeros included; returns the job's len."""
        drive_model = self.models[drive]
        self.create(target, size or str(drive_model.size), parent=parent,
                    cluster_size=cluster_size)
        self.written[target] = dirty
        self.io(target, _copy_commands(drive_model.buffer(), dirty, zeros=True))
        return sum(hi - lo for lo, hi in dirty)

    def check_all(self) -> None:
        for name in self.models:
            check_image(self.qemu_img, self.path(name))


def _rebased(old: DiskModel, parent: memoryview, written: list[tuple[int, int]]
             ) -> DiskModel:
    new = DiskModel(old.size, old.cluster_size, backing=parent)
    for lo, hi in written:
        new.data[lo:hi] = old.data[lo:hi]
    return new


def dirty_clusters(patterns: Iterable[tuple[str, str, str]], granularity: int
                   ) -> list[tuple[int, int]]:
    """The ranges a dirty bitmap (and the job copying at ``granularity``) covers."""
    marked: set[int] = set()
    for _, o, n in patterns:
        off, length = _size(o), _size(n)
        marked.update(range(off // granularity, -(-(off + length) // granularity)))
    out: list[tuple[int, int]] = []
    for c in sorted(marked):
        lo = c * granularity
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], lo + granularity)
        else:
            out.append((lo, lo + granularity))
    return out


def _runs(data: np.ndarray[Any, np.dtype[np.uint8]], lo: int, hi: int
          ) -> list[tuple[int, int, int]]:
    """Maximal constant runs ``(start, end, value)`` of ``data[lo:hi]``. Constant 1 MiB
    blocks are taken whole, so a mostly empty 64 MiB drive costs little."""
    runs: list[tuple[int, int, int]] = []
    for start in range(lo, hi, MiB):
        block = data[start : min(hi, start + MiB)]
        if block.min() == block.max():
            cuts = [0, len(block)]
        else:
            cuts = [0, *(np.flatnonzero(np.diff(block)) + 1).tolist(), len(block)]
        for a, b in itertools.pairwise(cuts):
            value = int(block[a])
            if runs and runs[-1][1] == start + a and runs[-1][2] == value:
                runs[-1] = (runs[-1][0], start + b, value)
            else:
                runs.append((start + a, start + b, value))
    return runs


def _copy_commands(content: memoryview, ranges: list[tuple[int, int]], *, zeros: bool
                   ) -> list[str]:
    """io commands that reproduce ``content`` over ``ranges``: one command per constant run
    (``write -P``), zero runs as ``write -z`` when ``zeros`` (over a backing file they must be
    written) or skipped (a fresh image without backing reads zeros already)."""
    data = np.frombuffer(content, dtype=np.uint8)
    cmds = []
    for lo, hi in ranges:
        for a, b, value in _runs(data, lo, min(hi, len(data))):
            if value:
                cmds.append(f"write -P 0x{value:02x} {a} {b - a}")
            elif zeros:
                cmds.append(f"write -z {a} {b - a}")
    return cmds


# The two scenarios with every kind of step run under every plan; the others (the same
# steps again, each tool process costing about half a second) under fewer.
ALL_PLANS = list(PLANS)
SOME_PLANS = ["bitback", "alternate-bitback-first", "alternate-qemu-first"]


@pytest.fixture
def steps(plan: str, tmp_path: Path, qemu_img: str, qemu_io: str, bitback_img: list[str],
          bitback_io: list[str]) -> Steps:
    return Steps(PLANS[plan], tmp_path, qemu_img, qemu_io, bitback_img, bitback_io)


def _mismatch_offset(steps: Steps, a: str, b: str) -> None:
    """Both tools find the same first difference (the seed's check on a stale backup)."""
    outs = {}
    for who, tool in (("qemu", [steps.qemu_img]), ("bitback", steps.bitback_img)):
        code, out = compare(tool, f"{a}.qcow2", f"{b}.qcow2", cwd=steps.dir)
        assert code == 1, f"{who}: {out}"
        m = re.search(r"Content mismatch at offset (\d+)!", out)
        assert m, f"{who}: {out}"
        outs[who] = int(m.group(1))
    assert outs["bitback"] == outs["qemu"]


@pytest.mark.parametrize("plan", ALL_PLANS)
def test_incremental_simple(steps: Steps) -> None:
    """test_incremental_simple's images: anchor, hollow inc0, inc1, inc2 and references."""
    s = steps
    s.create("drive0")
    s.write_patterns("drive0", SETUP_DRIVE0)
    s.full_backup("drive0", "full")
    # Hollow incremental (no writes yet) and its reference.
    assert s.incremental("drive0", "inc0", [], parent="full") == 0
    s.full_backup("drive0", "ref0")
    s.write_patterns("drive0", WRITES_1)
    _mismatch_offset(s, "inc0", "drive0")
    assert s.incremental("drive0", "inc1", dirty_clusters(WRITES_1, GRANULARITY),
                         parent="inc0") == 458752
    s.full_backup("drive0", "ref1")
    s.write_patterns("drive0", WRITES_2)
    assert s.incremental("drive0", "inc2", dirty_clusters(WRITES_2, GRANULARITY),
                         parent="inc1") == 1507328
    s.full_backup("drive0", "ref2")
    # check_backups
    for inc, ref in (("inc0", "ref0"), ("inc1", "ref1"), ("inc2", "ref2")):
        assert s.compare(inc, ref), s.log
    assert s.compare("inc2", "drive0"), s.log
    assert not s.compare("inc1", "drive0"), s.log
    s.check_all()


@pytest.mark.parametrize("plan", ALL_PLANS)
def test_larger_cluster_target(steps: Steps) -> None:
    """test_larger_cluster_target's images: 128k anchor and target, rebase -u, compare."""
    s = steps
    s.create("drive0")
    s.write_patterns("drive0", SETUP_DRIVE0)
    s.create("full", cluster_size="128k")
    s.full_backup("drive0", "full", existing=True)
    s.write_patterns("drive0", WRITES_1)
    assert sum(hi - lo for lo, hi in dirty_clusters(WRITES_1, GRANULARITY)) == 458752
    # The job copies in 128 KiB units: the target's cluster size wins (spec 6.2).
    job_len = s.incremental("drive0", "inc0", dirty_clusters(WRITES_1, 128 * KiB),
                            parent=None, cluster_size="128k")
    assert job_len == 655360
    s.full_backup("drive0", "ref0")
    # Without its backing file inc0 reads zeros outside the copied clusters.
    assert not s.compare("inc0", "ref0"), s.log
    s.rebase("inc0", "full")
    assert s.compare("inc0", "ref0"), s.log
    assert s.compare("inc0", "drive0"), s.log
    s.check_all()


@pytest.mark.parametrize("plan", SOME_PLANS)
def test_growing_before_backup(steps: Steps) -> None:
    """test_growing_before_backup's images: drive grown to 65M, a 65M target on a 64M anchor."""
    s = steps
    s.create("drive0")
    s.write_patterns("drive0", SETUP_DRIVE0)
    s.full_backup("drive0", "full")
    s.io("drive0", [f"truncate {65 * MiB}", f"write -P 0xcd {64 * MiB} {64 * KiB}"])
    dirty = dirty_clusters((("0xcd", "64M", "64k"),), GRANULARITY)
    assert s.incremental("drive0", "inc0", dirty, parent="full", size="65M") == 65536
    s.full_backup("drive0", "ref0")
    assert s.compare("inc0", "ref0"), s.log
    assert s.compare("inc0", "drive0"), s.log
    s.check_all()


@pytest.mark.parametrize("plan", SOME_PLANS[1:])
def test_transaction_failure_images(steps: Steps) -> None:
    """test_transaction_failure's second drive: its own patterns, anchor, one incremental."""
    s = steps
    s.create("drive1")
    s.write_patterns("drive1", SETUP_DRIVE1)
    s.full_backup("drive1", "full1")
    s.write_patterns("drive1", WRITES_DRIVE1)
    assert s.incremental("drive1", "inc1", dirty_clusters(WRITES_DRIVE1, GRANULARITY),
                         parent="full1") == 458752
    s.full_backup("drive1", "ref1")
    assert s.compare("inc1", "ref1"), s.log
    assert s.compare("inc1", "drive1"), s.log
    assert not s.compare("full1", "drive1"), s.log
    s.check_all()
