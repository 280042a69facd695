"""Random bitmap programs on bitbackd and on QEMU 7.2, against a set-of-granules model.

A program starts with one to three ``block-dirty-bitmap-add`` and goes on with steps, each
one of (about 4 : 4 : 1):

* an HMP ``qemu-io`` request on drive0: ``write -P``, ``write -z`` (``-u`` sometimes) or
  ``discard``, at offsets and lengths that are aligned or not, near granule boundaries, at and
  across the end of the disk;
* ``block-dirty-bitmap-add`` (granularity 512 B to 2 MiB or the default, enabled or not),
  ``-remove``, ``-clear``, ``-enable``, ``-disable`` and ``-merge`` (one to three sources,
  each by name or as ``{node, name}``, and often the coarsest bitmap into the finest), mostly
  on existing bitmaps but sometimes on any name of a small pool, so that some steps name a
  bitmap that does not exist or already does;
* ``block_resize`` (grow or shrink by a few sectors or granules, to a round size or anywhere,
  multiples of 512, sometimes to 0).

Each example launches one bitbackd and one QEMU (the harness command line of spec section 1,
with ``-drive`` and its default ``discard=ignore``) on twin images, runs the program on both in
lockstep and, after every step, requires:

* the same reply (or, for qemu-io, the same output) from both, equal to the model's;
* the same bitmaps, newest first, with the same ``count``, ``granularity``, ``recording``,
  ``busy``, ``persistent`` and ``x-debug-block-dirty-bitmap-sha256``, on both and in the
  model. The model keeps each bitmap as a set of dirty granule indices: a request marks every
  granule it touches (clipped to the disk) of every enabled bitmap, unless it fails; a
  discard is dropped (``discard=ignore``) and marks nothing; a shrink forgets granules past
  the end; a merge ORs whole source granules (clipped to the disk) into the target's
  granules; ``count`` is the number of granules times the granularity, not clipped; the
  digest is :func:`helpers.seedsetup.granule_sha256` (QEMU's HBitmap last level).

Merges always name at least one source: QEMU 7.2 crashes (SIGSEGV) on an empty ``bitmaps``
list.

Hypothesis prints the failing program step by step (``note``), in the commands to replay
by hand; ``BITBACK_BITMAP_EXAMPLES`` sets the number of examples (default 20, about 20 s).
Checked against faults planted in a copy of bitback put first on ``PYTHONPATH``: a merge into
a finer bitmap that marks one source granule per dirty run, and a write that marks one granule
short, failed it in each of three runs of 20 examples; a shrink that keeps one granule too
many, in two of three (``test_daemon_vs_qemu.py`` catches all three every time).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from helpers.procs import run
from helpers.seedsetup import HarnessVM, device_bitmaps, granule_sha256
from helpers.vm import BACKENDS, drive_args

pytestmark = pytest.mark.qemu

KiB, MiB = 1 << 10, 1 << 20
EXAMPLES = int(os.environ.get("BITBACK_BITMAP_EXAMPLES", "20"))
NAMES = ("b0", "b1", "b2", "b3")
GRANULARITIES = (None, 512, 1024, 4 * KiB, 32 * KiB, 64 * KiB, 128 * KiB, 1 * MiB, 2 * MiB)
DEFAULT_GRANULARITY = 64 * KiB  # qcow2 with 64 KiB clusters
START_SIZES = (64 * MiB, 4 * MiB + 512, 1 * MiB)
MAX_SIZE = 96 * MiB


# ------------------------------------------------------------------------------ the model


@dataclass
class ModelBitmap:
    name: str
    granularity: int
    enabled: bool
    dirty: set[int] = field(default_factory=set)


@dataclass
class Model:
    """What both processes must show: disk size and bitmaps (newest first)."""

    size: int
    bitmaps: list[ModelBitmap] = field(default_factory=list)

    def find(self, name: str) -> ModelBitmap | None:
        return next((bm for bm in self.bitmaps if bm.name == name), None)

    def mark(self, offset: int, length: int) -> None:
        end = min(offset + length, self.size)
        if offset >= end:
            return
        for bm in self.bitmaps:
            if bm.enabled:
                g = bm.granularity
                bm.dirty.update(range(offset // g, (end - 1) // g + 1))

    def resize(self, size: int) -> None:
        self.size = size
        for bm in self.bitmaps:
            limit = -(-size // bm.granularity)
            bm.dirty = {i for i in bm.dirty if i < limit}

    def merge_into(self, target: ModelBitmap, source: ModelBitmap) -> None:
        tg, sg = target.granularity, source.granularity
        for i in list(source.dirty):
            end = min((i + 1) * sg, self.size)
            target.dirty.update(range(i * sg // tg, (end - 1) // tg + 1))

    def view(self) -> list[dict[str, Any]]:
        return [{
            "name": bm.name, "count": len(bm.dirty) * bm.granularity,
            "granularity": bm.granularity, "recording": bm.enabled, "busy": False,
            "persistent": False,
            "sha256": granule_sha256(self.size, bm.granularity, bm.dirty),
        } for bm in self.bitmaps]


# ------------------------------------------------------------------------------ the steps


@dataclass(frozen=True)
class Io:
    """HMP ``qemu-io drive0 "..."``: kind is write, zero, zero-unmap or discard."""

    kind: str
    offset: int
    length: int

    def command(self) -> str:
        verb = {"write": "write -P 0x5a", "zero": "write -z", "zero-unmap": "write -z -u",
                "discard": "discard"}[self.kind]
        return f"{verb} {self.offset} {self.length}"

    def apply(self, model: Model) -> str:
        name = "discard" if self.kind == "discard" else "write"
        if self.offset + self.length > model.size:
            return f"{name} failed: Input/output error"
        if self.kind != "discard":  # discard=ignore: reported done, never reaches the node
            model.mark(self.offset, self.length)
        done = "discard" if name == "discard" else "wrote"
        return f"{done} {self.length}/{self.length} bytes at offset {self.offset}"


@dataclass(frozen=True)
class Qmp:
    """A QMP command with its arguments (top-level names as the harness spells them)."""

    cmd: str
    args: tuple[tuple[str, Any], ...]

    def kwargs(self) -> dict[str, Any]:
        return dict(self.args)

    def apply(self, model: Model) -> dict[str, Any]:
        """The reply the model expects, after changing the model as the command does."""
        kw = self.kwargs()

        def missing(name: str) -> dict[str, Any]:
            return {"error": {"class": "GenericError",
                              "desc": f"Dirty bitmap '{name}' not found"}}

        if self.cmd == "block_resize":
            model.resize(kw["size"])
            return {"return": {}}
        if self.cmd == "block-dirty-bitmap-add":
            if model.find(kw["name"]) is not None:
                return {"error": {"class": "GenericError",
                                  "desc": f"Bitmap already exists: {kw['name']}"}}
            model.bitmaps.insert(0, ModelBitmap(
                kw["name"], kw.get("granularity", DEFAULT_GRANULARITY),
                not kw.get("disabled", False)))
            return {"return": {}}
        if self.cmd == "block-dirty-bitmap-merge":
            target = model.find(kw["target"])
            if target is None:
                return missing(kw["target"])
            sources = []
            for src in kw["bitmaps"]:
                name = src if isinstance(src, str) else src["name"]
                found = model.find(name)
                if found is None:
                    return missing(name)
                sources.append(found)
            for found in sources:
                model.merge_into(target, found)
            return {"return": {}}
        bm = model.find(kw["name"])
        if bm is None:
            return missing(kw["name"])
        if self.cmd == "block-dirty-bitmap-remove":
            model.bitmaps.remove(bm)
        elif self.cmd == "block-dirty-bitmap-clear":
            bm.dirty.clear()
        else:
            bm.enabled = self.cmd == "block-dirty-bitmap-enable"
        return {"return": {}}


Step = Io | Qmp


def qmp(cmd: str, **kwargs: Any) -> Qmp:
    return Qmp(cmd, tuple(kwargs.items()))


# ------------------------------------------------------------------------------ strategies


def io_steps(size: int) -> st.SearchStrategy[Io]:
    """Requests around the interesting places of a disk of ``size`` bytes: on and next to
    granule boundaries of every size, anywhere, up to the end exactly, and across it."""
    kind = st.sampled_from(["write", "write", "zero", "zero-unmap", "discard"])
    nudge = st.sampled_from([0, 0, 0, 1, -1, 511, -512, 512, 4096, -65536, 65537])
    unit = st.sampled_from([512, 4 * KiB, 64 * KiB, 128 * KiB, 1 * MiB, 2 * MiB])
    offset = st.one_of(
        st.builds(lambda u, k, n: max(0, u * k + n), unit, st.integers(0, 48), nudge),
        st.builds(lambda n: max(0, size // 2 + n), nudge),
        st.integers(0, size + 4 * KiB),
    )
    length = st.one_of(
        st.builds(lambda u, k, n: max(0, u * k + n), unit, st.integers(1, 8), nudge),
        st.integers(0, 4 * MiB),
    )
    back = st.sampled_from([0, 1, 511, 512, 513, 4096, 65535, 65536, 65537, 1 * MiB])
    near_end = st.builds(lambda k, b, n: Io(k, max(0, size - b), n), kind, back,
                         st.sampled_from([0, 1, 2, 512, 513, 4096, 65536, 65537, 2 * MiB]))
    to_end = st.builds(lambda k, b: Io(k, max(0, size - b), min(size, b)), kind, back)
    anywhere = st.builds(Io, kind, offset, length)
    return st.one_of(anywhere, anywhere, near_end, to_end)


def resize_steps(size: int) -> st.SearchStrategy[Qmp]:
    """Mostly small moves of the end (a few sectors or granules either way), or a round size
    (a multiple of 4 MiB: whole 64-bit words of bitmap for granularities up to 64 KiB),
    sometimes a jump anywhere up to MAX_SIZE."""
    near = st.builds(lambda d, unit: max(0, size + d * unit), st.integers(-8, 8),
                     st.sampled_from([512, 64 * KiB, 1 * MiB]))
    round_size = st.builds(lambda k: k * 4 * MiB, st.integers(0, MAX_SIZE // (4 * MiB)))
    anywhere = st.builds(lambda s: 512 * s, st.integers(0, MAX_SIZE // 512))
    sizes = st.one_of(near, near, round_size, anywhere, st.sampled_from([0, 65 * MiB]))
    return sizes.map(lambda n: qmp("block_resize", device="drive0", size=n))


def add_steps(names: st.SearchStrategy[str] | None = None) -> st.SearchStrategy[Qmp]:
    """``block-dirty-bitmap-add`` of a name from ``names`` (default: the pool)."""

    def add(name: str, granularity: int | None, disabled: bool) -> Qmp:
        kwargs: dict[str, Any] = {"node": "drive0", "name": name}
        if granularity is not None:
            kwargs["granularity"] = granularity
        if disabled:
            kwargs["disabled"] = True
        return qmp("block-dirty-bitmap-add", **kwargs)

    name = st.sampled_from(NAMES) if names is None else names
    return st.builds(add, name, st.sampled_from(GRANULARITIES),
                     st.sampled_from([False, False, False, True]))


def names_for(model: Model) -> st.SearchStrategy[str]:
    """Mostly a bitmap that exists, sometimes any name of the pool (maybe missing)."""
    existing = [bm.name for bm in model.bitmaps]
    if not existing:
        return st.sampled_from(NAMES)
    return st.one_of(st.sampled_from(existing), st.sampled_from(existing), st.sampled_from(NAMES))


def bitmap_steps(model: Model) -> st.SearchStrategy[Qmp]:
    name = names_for(model)
    source = st.builds(lambda n, by_node: {"node": "drive0", "name": n} if by_node else n,
                       name, st.booleans())
    merge = st.builds(
        lambda t, srcs: qmp("block-dirty-bitmap-merge", node="drive0", target=t, bitmaps=srcs),
        name, st.lists(source, min_size=1, max_size=3))
    simple = st.builds(
        lambda verb, n: qmp(f"block-dirty-bitmap-{verb}", node="drive0", name=n),
        st.sampled_from(["remove", "clear", "enable", "disable"]), name)
    by_size = sorted(model.bitmaps, key=lambda bm: bm.granularity)
    if len(by_size) < 2 or by_size[0].granularity == by_size[-1].granularity:
        return st.one_of(add_steps(), merge, merge, simple)
    # Whole coarse granules into a finer bitmap: the case where granularities matter most.
    coarse_into_fine = st.just(qmp("block-dirty-bitmap-merge", node="drive0",
                                   target=by_size[0].name, bitmaps=[by_size[-1].name]))
    return st.one_of(add_steps(), merge, coarse_into_fine, simple)


def steps_for(model: Model) -> st.SearchStrategy[Step]:
    """Requests, bitmap commands and resizes about 4 : 4 : 1."""
    kinds: dict[str, st.SearchStrategy[Any]] = {
        "io": io_steps(model.size),
        "bitmap": bitmap_steps(model),
        "resize": resize_steps(model.size),
    }
    return st.sampled_from(["io"] * 4 + ["bitmap"] * 4 + ["resize"]).flatmap(kinds.__getitem__)


# ------------------------------------------------------------------------------ running


def observe(vm: HarnessVM) -> tuple[int, list[dict[str, Any]]]:
    """drive0's virtual size, and its bitmaps in 7.2's shape with their digests."""
    entry = vm.ok("query-block")[0]
    bitmaps = device_bitmaps(vm.backend, entry)
    for bm in bitmaps:
        bm["sha256"] = vm.ok("x-debug-block-dirty-bitmap-sha256", node="drive0",
                             name=bm["name"])["sha256"]
    return entry["inserted"]["image"]["virtual-size"], bitmaps


def perform(vm: HarnessVM, step: Step) -> Any:
    if isinstance(step, Io):
        return vm.io("drive0", step.command())
    return vm.qmp(step.cmd, **step.kwargs())


def describe(step: Step) -> str:
    if isinstance(step, Io):
        return f'qemu-io drive0 "{step.command()}"'
    return f"{step.cmd} {step.kwargs()}"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, qemu_img: str) -> dict[int, Path]:
    """One empty qcow2 image per start size, made by real qemu-img; examples copy them."""
    base = tmp_path_factory.mktemp("bitmap-diff-base")
    made = {}
    for size in START_SIZES:
        made[size] = base / f"empty-{size}.qcow2"
        run([qemu_img, "create", "-f", "qcow2", str(made[size]), str(size)], check=True)
    return made


# Generous: shrinking a failure replays many examples of about a second each.
@pytest.mark.timeout(max(900, 30 * EXAMPLES))
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                           HealthCheck.data_too_large],
)
@given(data=st.data())
def test_random_bitmap_programs_match_qemu_and_the_model(
    data: st.DataObject, images: dict[int, Path], qemu_system: str,
) -> None:
    # The whole program is drawn first (against a scratch model), so that examples that
    # Hypothesis throws away cost no process starts.
    start = data.draw(st.sampled_from(START_SIZES), label="start size")
    adds = data.draw(st.integers(1, len(NAMES) - 1), label="bitmaps to start with")
    length = data.draw(st.integers(1, 16), label="number of steps")
    scratch = Model(start)
    program: list[Step] = []
    for index in range(adds + length):
        strategy = add_steps(st.just(NAMES[index])) if index < adds else steps_for(scratch)
        program.append(data.draw(strategy, label=f"step {index}"))
        program[-1].apply(scratch)
    note("program:\n" + "\n".join(f"  {i}: {describe(step)}" for i, step in enumerate(program)))

    model = Model(start)
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=images[start].parent)))
        vms = {}
        for backend in BACKENDS:
            img = workdir / f"{backend}.qcow2"
            img.write_bytes(images[start].read_bytes())
            vms[backend] = stack.enter_context(HarnessVM(backend, drive_args(img)))
        for index, step in enumerate(program):
            want = step.apply(model)
            got = {backend: perform(vm, step) for backend, vm in vms.items()}
            where = f"step {index} ({describe(step)})"
            assert got["bitback"] == got["qemu"], (
                f"{where}: bitbackd {got['bitback']!r}, QEMU {got['qemu']!r}")
            assert got["qemu"] == want, f"{where}: QEMU {got['qemu']!r}, model {want!r}"
            seen = {backend: observe(vm) for backend, vm in vms.items()}
            assert seen["bitback"] == seen["qemu"], (
                f"after {where}:\nbitbackd {seen['bitback']}\nQEMU     {seen['qemu']}")
            expected = (model.size, model.view())
            assert seen["qemu"] == expected, (
                f"after {where}:\nQEMU  {seen['qemu']}\nmodel {expected}")
        for vm in vms.values():
            assert vm.shutdown() == 0
