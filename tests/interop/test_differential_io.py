"""Random io programs on twin images: bitback-io + bitback-img against qemu-io + qemu-img 7.2.

The property: for any sequence of up to 25 ``write`` / ``write -z [-u]`` / ``discard`` /
``truncate`` commands, over cluster sizes 512 B, 4 KiB, 64 KiB and 2 MiB, qcow2 v3 and (one
example in four) v2, with or without a backing file (made by real qemu-img and qemu-io),
running the program with ``bitback-io`` on an image made by ``bitback-img create`` and with
real ``qemu-io`` on a twin made by real ``qemu-img create`` with the same options gives:

* the same exit status and the same output (timing lines aside);
* an image that real ``qemu-img check`` finds clean (exit 0);
* images that real ``qemu-img compare`` and ``bitback-img compare`` both call identical;
* guest contents, read through QEMU (``qemu-img convert -O raw``) for both images and through
  bitback (``bitback-img convert -O raw``) for ours, equal to the bytearray model of
  :mod:`helpers.model` (which states QEMU's semantics, e.g. what discard and growth expose).

Image sizes are multiples of 512 but not necessarily of the cluster size, so the partial
last cluster and the "shrink, then grow exposes old data" behaviour of QEMU are covered.
Every example costs about a dozen process starts; ``BITBACK_DIFF_EXAMPLES`` sets how many
examples run (default 40, about 1-2 minutes on 2 cores). Hypothesis prints the falsifying
program; the notes give the exact shell commands to replay it.
"""

from __future__ import annotations

import os
import shlex
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from helpers.imagetools import (
    check_image,
    compare,
    create,
    create_argv,
    io_argv,
    read_raw,
    strip_timing,
)
from helpers.model import (
    Discard,
    DiskModel,
    Op,
    Truncate,
    Write,
    WriteZeroes,
    commands,
    first_difference,
)
from helpers.procs import run

pytestmark = pytest.mark.qemu

KiB, MiB = 1 << 10, 1 << 20
CLUSTER_SIZES = (512, 4 * KiB, 64 * KiB, 2 * MiB)
# Largest virtual size drawn per cluster size: small enough that an example stays cheap.
MAX_SIZE = {512: 4 * MiB, 4 * KiB: 8 * MiB, 64 * KiB: 16 * MiB, 2 * MiB: 32 * MiB}
MAX_OPS = 25
EXAMPLES = int(os.environ.get("BITBACK_DIFF_EXAMPLES", "40"))


class BackingImage:
    """A backing file made by real qemu-img + qemu-io, and what it reads as.

    Not a dataclass: Hypothesis prints the fixtures of a failing example field by field, and
    ``content`` is megabytes long.
    """

    __slots__ = ("content", "name", "path")

    def __init__(self, name: str, path: str, content: bytes) -> None:
        self.name, self.path, self.content = name, path, content

    def __repr__(self) -> str:
        return f"BackingImage({self.name!r}, {self.path!r}, <{len(self.content)} bytes>)"


# name -> (virtual size, cluster size): shorter than most overlays, in between, longer than all.
BACKING_SHAPES = {
    "short": (MiB + 512, 512),
    "middle": (5 * MiB + 1536, 64 * KiB),
    "long": (40 * MiB, 64 * KiB),
}


def _backing_writes(size: int) -> list[str]:
    """Distinct patterns spread over the image: big runs, odd-sized and unaligned pieces."""
    cmds = []
    step = max(size // 24, 4096)
    for i, offset in enumerate(range(0, size, step)):
        offset += (i * 7919) % 4096
        length = min(step // 2 + i * 97, size - offset)
        if length > 0:
            cmds.append(f"write -P 0x{0x10 + i:02x} {offset} {length}")
    cmds.append(f"write -P 0xee {size - 700} 700")
    return cmds


@pytest.fixture(scope="module")
def backings(
    qemu_img: str, qemu_io: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, BackingImage]:
    """The backing files, made once per module by real qemu-img and qemu-io."""
    root = tmp_path_factory.mktemp("backing")
    out = {}
    for name, (size, cluster) in BACKING_SHAPES.items():
        path = root / f"{name}.qcow2"
        create([qemu_img], path, size, cluster_size=cluster)
        run([qemu_io, "-f", "qcow2", *io_argv(_backing_writes(size)), str(path)], check=True)
        content = read_raw([qemu_img], path, scratch=root)
        assert len(content) == size
        out[name] = BackingImage(name, str(path), content)
    return out


@dataclass(frozen=True)
class ImageOptions:
    """The ``create`` options both twins get."""

    cluster_size: int
    backing: str | None
    compat: str

    def kwargs(self) -> dict[str, Any]:
        return {"cluster_size": self.cluster_size, "backing": self.backing,
                "compat": self.compat}


@dataclass(frozen=True)
class Program:
    """One example: image geometry, optional backing file, and the io commands."""

    cluster_size: int
    size: int
    backing: str | None
    ops: tuple[Op, ...]
    compat: str = "1.1"

    @property
    def version(self) -> int:
        return 2 if self.compat == "0.10" else 3

    def __repr__(self) -> str:
        lines = "".join(f"\n    {op!r}," for op in self.ops)
        return (
            f"Program(cluster_size={self.cluster_size}, size={self.size}, "
            f"backing={self.backing!r}, ops=({lines}\n), compat={self.compat!r})"
        )


@st.composite
def image_sizes(draw: st.DrawFn, cluster_size: int) -> int:
    """Multiples of 512 up to the cluster size's limit, often near a cluster boundary."""
    limit = MAX_SIZE[cluster_size]
    how = draw(st.sampled_from(["clusters", "near", "any"]))
    if how == "any":
        return 512 * draw(st.integers(1, limit // 512))
    clusters = draw(st.integers(1, limit // cluster_size))
    size = clusters * cluster_size
    if how == "near" and cluster_size > 512:
        size += 512 * draw(st.sampled_from([-2, -1, 1, 2]))
    return max(512, min(size, limit))


@st.composite
def ranges(draw: st.DrawFn, size: int, cluster_size: int) -> tuple[int, int]:
    """(offset, length) inside an image of ``size`` bytes, rarely one reaching past its end.

    Offsets are cluster boundaries, sector boundaries or any byte; lengths are small, whole
    clusters, up to the end of the image, or anything.
    """
    cs = cluster_size
    where = draw(st.sampled_from(["cluster", "sector", "byte"]))
    if where == "cluster":
        offset = draw(st.integers(0, (size - 1) // cs)) * cs
    elif where == "sector":
        offset = draw(st.integers(0, (size - 1) // 512)) * 512
    else:
        offset = draw(st.integers(0, size - 1))
    room = size - offset
    how = draw(st.sampled_from(["small", "clusters", "to-end", "any", "past-end"]))
    if how == "small":
        length = draw(st.integers(1, min(room, 3 * 512)))
    elif how == "clusters":
        length = min(room, cs * draw(st.integers(1, 4)))
    elif how == "to-end":
        length = room
    elif how == "any":
        length = draw(st.integers(1, min(room, 4 * MiB)))
    else:
        length = room + draw(st.integers(1, 4096))
    return offset, length


def _v2_growth_fails(old: int, new: int, cluster_size: int, backing_length: int) -> bool:
    """QEMU 7.2 cannot grow a v2 image past its last cluster over a longer backing file."""
    return backing_length > old and new > -(-old // cluster_size) * cluster_size


@st.composite
def programs(draw: st.DrawFn) -> Program:
    """Geometry, backing file, compat level, then up to MAX_OPS commands that follow the
    image's size as truncates change it."""
    cs = draw(st.sampled_from(CLUSTER_SIZES))
    size = draw(image_sizes(cs))
    backing = draw(st.sampled_from([None, *BACKING_SHAPES]))
    compat = draw(st.sampled_from(["1.1", "1.1", "1.1", "0.10"]))
    ops: list[Op] = []
    current = size
    for _ in range(draw(st.integers(1, MAX_OPS))):
        kind = draw(st.sampled_from(["write", "write", "write", "zero", "discard", "truncate"]))
        if kind == "truncate":
            new = draw(image_sizes(cs))
            if compat == "0.10" and backing is not None and _v2_growth_fails(
                current, new, cs, BACKING_SHAPES[backing][0]
            ):
                new = -(-current // cs) * cs  # see test_v2_growth_over_a_longer_backing_file
            if new != current:
                current = new
                ops.append(Truncate(current))
            continue
        offset, length = draw(ranges(current, cs))
        if kind == "write":
            ops.append(Write(offset, length, draw(st.integers(0, 255))))
        elif kind == "zero":
            ops.append(WriteZeroes(offset, length, unmap=draw(st.booleans())))
        else:
            ops.append(Discard(offset, length))
    return Program(cs, size, backing, tuple(ops), compat)


def _check_equal(what: str, actual: bytes, expected: bytes) -> None:
    at = first_difference(actual, expected)
    assert at is None, (
        f"{what}: first difference at offset {at} (got {len(actual)} bytes, "
        f"model has {len(expected)}): got {actual[at : at + 16].hex()} "
        f"expected {expected[at : at + 16].hex()}"
    )


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("diff")


# One pytest test runs every example: its timeout grows with their number.
@pytest.mark.timeout(max(300, 20 * EXAMPLES))
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    # bitback_img / bitback_io are function-scoped only to hand out fresh lists; they are
    # never mutated here, so sharing them between examples is safe.
    suppress_health_check=[
        HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture,
    ],
)
@given(program=programs())
def test_random_io_programs_match_qemu_and_the_model(
    program: Program,
    qemu_img: str,
    qemu_io: str,
    bitback_img: list[str],
    bitback_io: list[str],
    backings: dict[str, BackingImage],
    scratch: Path,
) -> None:
    """bitback-io on a bitback-img image == qemu-io on a qemu-img twin == the model."""
    backing = None if program.backing is None else backings[program.backing]
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        ours, theirs = Path(tmp, "ours.qcow2"), Path(tmp, "theirs.qcow2")
        options = ImageOptions(program.cluster_size, None if backing is None else backing.path,
                               program.compat)
        cmds = io_argv(commands(program.ops))
        note("replay:\n" + "\n".join(
            shlex.join(argv) for argv in (
                ["bitback-img", *create_argv(ours, program.size, **options.kwargs())],
                ["bitback-io", "-f", "qcow2", *cmds, str(ours)],
                ["qemu-img", *create_argv(theirs, program.size, **options.kwargs())],
                ["qemu-io", "-f", "qcow2", *cmds, str(theirs)],
            )
        ))
        create(bitback_img, ours, program.size, **options.kwargs())
        create([qemu_img], theirs, program.size, **options.kwargs())

        model = DiskModel(program.size, program.cluster_size,
                          None if backing is None else backing.content, version=program.version)
        all_ok = model.apply_all(program.ops)

        q = run([qemu_io, "-f", "qcow2", *cmds, str(theirs)])
        b = run([*bitback_io, "-f", "qcow2", *cmds, str(ours)])
        assert q.returncode == (0 if all_ok else 1), f"model disagrees with qemu-io:\n{q.stdout}"
        assert b.returncode == q.returncode, f"bitback-io:\n{b.stdout}{b.stderr}"
        assert strip_timing(b.stdout) == strip_timing(q.stdout)
        assert strip_timing(b.stderr) == strip_timing(q.stderr)

        check_image(qemu_img, ours)
        code, out = compare([qemu_img], ours, theirs)
        assert code == 0, f"qemu-img compare: {out}"
        code, out = compare(bitback_img, ours, theirs)
        assert code == 0, f"bitback-img compare: {out}"

        expected = model.view()
        _check_equal("qemu-io's image read by qemu-img (model check)",
                     read_raw([qemu_img], theirs, scratch=tmp), expected)
        _check_equal("our image read by qemu-img", read_raw([qemu_img], ours, scratch=tmp),
                     expected)
        _check_equal("our image read by bitback-img", read_raw(bitback_img, ours, scratch=tmp),
                     expected)


@pytest.mark.parametrize(
    "program",
    [
        # Shrink, then grow without a backing file: the old data of the partial last cluster
        # comes back (QEMU 7.2 behaviour the model encodes).
        Program(4 * KiB, 20 * KiB, None,
                (Write(0, 20 * KiB, 0x41), Truncate(17 * KiB), Truncate(20 * KiB))),
        # ... but with a backing file longer than the old size, growth writes zeros.
        Program(4 * KiB, 20 * KiB, "middle",
                (Write(16 * KiB, 512, 0x41), Truncate(17 * KiB), Truncate(24 * KiB))),
        # Growth to inside the same cluster, then past the backing end: the stale tail past
        # the zeroed part shows again.
        Program(4 * KiB, MiB + 4 * KiB, "short",
                (Write(MiB, 4 * KiB, 0x42), Truncate(MiB), Truncate(MiB + 1024),
                 Truncate(MiB + 4 * KiB))),
        # write -z reaching the end of the image zeroes the whole partial last cluster.
        Program(4 * KiB, 20 * KiB, None,
                (Write(0, 20 * KiB, 0x41), Truncate(18 * KiB), WriteZeroes(16 * KiB, 2 * KiB),
                 Truncate(20 * KiB))),
        # Discard leaves partial clusters alone and zeroes whole ones over a backing file.
        Program(64 * KiB, 4 * MiB, "long",
                (Write(0, 300 * KiB, 0x33), Discard(1000, 200 * KiB), Discard(3 * MiB, 70000))),
        # Version 2: discard deallocates (zeros) without a backing file, is ignored with one.
        Program(64 * KiB, MiB, None, (Write(0, MiB, 0x21), Discard(1000, 300 * KiB)), "0.10"),
        Program(64 * KiB, MiB, "long", (Write(0, MiB, 0x21), Discard(1000, 300 * KiB)), "0.10"),
        # Version 2 over a longer backing file: growing inside the last cluster works, past it
        # QEMU fails ("Failed to zero out new clusters") and the size stays.
        Program(4 * KiB, 10 * KiB, "short",
                (Truncate(12 * KiB), Truncate(16 * KiB), Write(12 * KiB, 1, 0x55)), "0.10"),
        # Requests past the end fail and change nothing.
        Program(512, 8 * KiB, None, (Write(4 * KiB, 8 * KiB, 0x11), Discard(0, 9 * KiB))),
    ],
    ids=["shrink-grow-stale", "grow-over-backing", "grow-twice", "zero-to-end", "discard",
         "v2-discard", "v2-discard-over-backing", "v2-growth-over-backing", "past-end"],
)
def test_model_agrees_with_qemu_on_known_cases(
    program: Program,
    qemu_img: str,
    qemu_io: str,
    backings: dict[str, BackingImage],
    tmp_path: Path,
) -> None:
    """The model's subtle rules are QEMU's: each case runs on real qemu-io only."""
    backing = None if program.backing is None else backings[program.backing]
    img = tmp_path / "theirs.qcow2"
    create([qemu_img], img, program.size, cluster_size=program.cluster_size,
           backing=None if backing is None else backing.path, compat=program.compat)
    model = DiskModel(program.size, program.cluster_size,
                      None if backing is None else backing.content, version=program.version)
    ok = model.apply_all(program.ops)
    res = run([qemu_io, "-f", "qcow2", *io_argv(commands(program.ops)), str(img)])
    assert res.returncode == (0 if ok else 1), res.stdout
    _check_equal("qemu-io's image", read_raw([qemu_img], img, scratch=tmp_path), model.view())


def test_v2_growth_over_a_longer_backing_file(
    qemu_img: str, qemu_io: str, bitback_io: list[str], backings: dict[str, BackingImage],
    tmp_path: Path,
) -> None:
    """bitback-io's truncate fails where qemu-io's does (the property test steers clear).

    A v2 image cannot hold zero clusters, so QEMU cannot zero the new area over a backing file
    longer than the old size (``bdrv_co_truncate`` asks for BDRV_REQ_ZERO_WRITE) and refuses.
    """
    cmds = io_argv(["truncate 12k", "truncate 16k", "length", "write -P 0x55 12k 1"])
    results = []
    for name, tool in (("theirs", [qemu_io]), ("ours", bitback_io)):
        img = tmp_path / f"{name}.qcow2"
        create([qemu_img], img, 10 * KiB, cluster_size=4 * KiB, compat="0.10",
               backing=backings["short"].path)
        results.append(run([*tool, "-f", "qcow2", *cmds, str(img)]))
    theirs, ours = results
    assert theirs.returncode == 1
    assert "Failed to zero out new clusters: Operation not supported" in theirs.stderr
    assert ours.returncode == theirs.returncode
    assert strip_timing(ours.stdout) == strip_timing(theirs.stdout)
    assert strip_timing(ours.stderr) == strip_timing(theirs.stderr)
