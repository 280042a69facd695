"""Images made by real qemu-img 7.2 / qemu-io: bitback reads them, describes them and writes them.

Each case is built once per module by QEMU's own tools: cluster sizes 512 B, 64 KiB and
2 MiB; a backing chain of depth 3 with relative backing names (one in a sub-directory, one
``../``) used from an unrelated working directory; ``convert -c`` images compressed with zlib
and with zstd (including clusters QEMU stored uncompressed because they did not shrink);
zero clusters from ``write -z`` with and without ``-u``; refcount widths of 1 and 64 bits;
compat 0.10 (qcow2 v2); and an image with an internal snapshot (``qemu-img snapshot -c``)
followed by more writes, so that some clusters are shared with the snapshot.

For every case the tests prove:

* bitback reads what QEMU reads: ``open_image(...).pread`` over the whole image and
  ``bitback-img convert -O raw`` both equal ``qemu-img convert -O raw``;
* ``bitback-img info --output=json`` agrees with ``qemu-img info --output=json`` on the
  virtual size, cluster size, format, backing file name and format, and the qcow2 compat
  level and refcount width;
* bitback writes into them correctly: after a few ``bitback-io`` writes (partial clusters
  over compressed, zero and snapshot-shared clusters, write -z, discard) real ``qemu-img
  check`` is clean, QEMU reads the model's content, and an internal snapshot still reads
  what it read before (its shared clusters were copied, not overwritten).
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bitback.block.open import open_image
from helpers.imagetools import (
    check_image,
    compare,
    create,
    info_json,
    io_argv,
    read_raw,
    strip_timing,
)
from helpers.model import Discard, DiskModel, Op, Write, WriteZeroes, commands, first_difference
from helpers.procs import run

pytestmark = pytest.mark.qemu

KiB, MiB = 1 << 10, 1 << 20
TOP = "img.qcow2"


@dataclass(frozen=True)
class Case:
    """One image built by QEMU's tools: its top file, the cwd to use it from, its geometry."""

    root: Path  # directory holding every file of the case (copied whole for write tests)
    top: Path
    cluster_size: int
    snapshot: str | None = None


@dataclass(frozen=True)
class Tools:
    qemu_img: str
    qemu_io: str

    def img(self, *args: str | Path, cwd: Path | None = None) -> None:
        run([self.qemu_img, *map(str, args)], check=True, cwd=cwd)

    def io(self, path: Path, cmds: list[str], cwd: Path | None = None) -> None:
        run([self.qemu_io, "-f", "qcow2", *io_argv(cmds), str(path)], check=True, cwd=cwd)


def _patterns(size: int, cluster_size: int, seed: int) -> list[str]:
    """Writes with distinct patterns: whole clusters, partial ones, unaligned pieces."""
    rng = random.Random(seed)
    cmds = [f"write -P 0x41 0 {min(size, 3 * cluster_size + 1000)}"]
    for i in range(12):
        offset = rng.randrange(0, size - 1)
        length = min(size - offset, rng.choice([1, 300, 512, cluster_size, 3 * cluster_size + 7,
                                                rng.randrange(1, 2 * MiB)]))
        cmds.append(f"write -P 0x{0x50 + i:02x} {offset} {length}")
    cmds.append(f"write -P 0x99 {size - 1536} 1536")
    return cmds


def _plain(cluster_size: int, size: int, *, compat: str | None = None,
           refcount_bits: int | None = None) -> Callable[[Tools, Path], Case]:
    def build(t: Tools, root: Path) -> Case:
        top = root / TOP
        create([t.qemu_img], top, size, cluster_size=cluster_size, compat=compat,
               refcount_bits=refcount_bits)
        cmds = _patterns(size, cluster_size, seed=cluster_size)
        # Zero clusters, kept (-z) and unmapped (-z -u), over data and over nothing.
        cmds += [f"write -z {cluster_size} {2 * cluster_size}",
                 f"write -z -u {size // 2} {3 * cluster_size + 512}",
                 f"write -z {size - 4 * cluster_size} {cluster_size}"]
        t.io(top, cmds)
        return Case(root, top, cluster_size)
    return build


def _chain(t: Tools, root: Path) -> Case:
    """base (64k, 3 MiB) <- mid (4k, 6 MiB) <- top (512, 8 MiB), relative names."""
    (root / "sub").mkdir()
    (root / "top").mkdir()
    base, mid, top = root / "sub" / "base.qcow2", root / "mid.qcow2", root / "top" / TOP
    create([t.qemu_img], base, 3 * MiB, cluster_size=64 * KiB)
    t.io(base, _patterns(3 * MiB, 64 * KiB, seed=1))
    # Relative names, each created from the directory of the image naming it.
    create([t.qemu_img], "mid.qcow2", 6 * MiB, cluster_size=4 * KiB, backing="sub/base.qcow2",
           cwd=root)
    t.io(mid, _patterns(6 * MiB, 4 * KiB, seed=2)[::2])
    create([t.qemu_img], TOP, 8 * MiB, cluster_size=512, backing="../mid.qcow2",
           cwd=root / "top")
    t.io(top, [*_patterns(8 * MiB, 512, seed=3)[::3], "write -z 64k 64k", "discard 1M 256k"])
    return Case(root, top, 512)


def _compressed(compression: str, cluster_size: int) -> Callable[[Tools, Path], Case]:
    def build(t: Tools, root: Path) -> Case:
        size = 4 * MiB + 3 * cluster_size
        rng = random.Random(compression)
        data = bytearray(size)
        for i, offset in enumerate(range(0, size, size // 10)):
            data[offset : offset + size // 20] = bytes([0x20 + i]) * (size // 20)
        # Incompressible clusters: QEMU stores these uncompressed even with -c.
        noise = 5 * cluster_size
        data[MiB : MiB + noise] = rng.randbytes(noise)
        data[size - 777 :] = rng.randbytes(777)
        raw = root / "src.raw"
        raw.write_bytes(data)
        top = root / TOP
        t.img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
              f"compression_type={compression},cluster_size={cluster_size}", raw, top)
        raw.unlink()
        return Case(root, top, cluster_size)
    return build


def _snapshot(t: Tools, root: Path) -> Case:
    top = root / TOP
    size = 6 * MiB
    create([t.qemu_img], top, size, cluster_size=64 * KiB)
    t.io(top, _patterns(size, 64 * KiB, seed=7))
    t.img("snapshot", "-c", "snap1", top)
    t.io(top, ["write -P 0x77 0 100k", "write -P 0x78 2M 64k", "write -z 3M 128k",
               "discard 4M 192k"])
    return Case(root, top, 64 * KiB, snapshot="snap1")


CASES: dict[str, Callable[[Tools, Path], Case]] = {
    "cluster-512": _plain(512, 2 * MiB),
    "cluster-64k": _plain(64 * KiB, 16 * MiB),
    "cluster-2M": _plain(2 * MiB, 64 * MiB),
    "chain-depth-3": _chain,
    "compressed-zlib-4k": _compressed("zlib", 4 * KiB),
    "compressed-zstd-64k": _compressed("zstd", 64 * KiB),
    "refcount-bits-1": _plain(64 * KiB, 8 * MiB, refcount_bits=1),
    "refcount-bits-64": _plain(4 * KiB, 4 * MiB, refcount_bits=64),
    "compat-0.10": _plain(64 * KiB, 8 * MiB, compat="0.10"),
    "snapshot": _snapshot,
}


@pytest.fixture(scope="module")
def built(qemu_img: str, qemu_io: str, tmp_path_factory: pytest.TempPathFactory
          ) -> Callable[[str], Case]:
    """Build a case on first use, then hand out the same files (read-only use only)."""
    tools = Tools(qemu_img, qemu_io)
    cache: dict[str, Case] = {}

    def get(name: str) -> Case:
        if name not in cache:
            cache[name] = CASES[name](tools, tmp_path_factory.mktemp(name))
        return cache[name]
    return get


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    """An unrelated working directory: relative backing names must not resolve against it."""
    path = tmp_path / "elsewhere"
    path.mkdir()
    return path


def _assert_same(what: str, actual: bytes, expected: bytes) -> None:
    at = first_difference(actual, expected)
    assert at is None, (
        f"{what}: differs from QEMU at offset {at} (lengths {len(actual)} vs {len(expected)}): "
        f"{actual[at : at + 16].hex()} vs {expected[at : at + 16].hex()}"
    )


def _pread_all(path: Path) -> bytes:
    out = bytearray()
    with open_image(str(path), "qcow2", read_only=True) as node:
        size = node.length()
        for offset in range(0, size, 4 * MiB):
            out += node.pread(offset, min(4 * MiB, size - offset))
    return bytes(out)


@pytest.mark.parametrize("name", list(CASES))
def test_bitback_reads_what_qemu_reads(
    name: str, built: Callable[[str], Case], qemu_img: str, bitback_img: list[str],
    elsewhere: Path,
) -> None:
    """Library reads and bitback-img convert equal qemu-img convert, byte for byte."""
    case = built(name)
    expected = read_raw([qemu_img], case.top, cwd=elsewhere, scratch=elsewhere)
    _assert_same("open_image().pread", _pread_all(case.top), expected)
    _assert_same("bitback-img convert -O raw",
                 read_raw(bitback_img, case.top, cwd=elsewhere, scratch=elsewhere), expected)


INFO_KEYS = ("virtual-size", "cluster-size", "format", "backing-filename",
             "backing-filename-format")
INFO_SPECIFIC_KEYS = ("compat", "refcount-bits")


@pytest.mark.parametrize("name", list(CASES))
def test_info_json_agrees_with_qemu_img(
    name: str, built: Callable[[str], Case], qemu_img: str, bitback_img: list[str],
    elsewhere: Path,
) -> None:
    """bitback-img info --output=json matches qemu-img on the keys tools rely on."""
    case = built(name)
    theirs = info_json([qemu_img], case.top, cwd=elsewhere)
    ours = info_json(bitback_img, case.top, cwd=elsewhere)
    for key in INFO_KEYS:
        assert ours.get(key) == theirs.get(key), key
    specific_ours = ours.get("format-specific", {}).get("data", {})
    specific_theirs = theirs["format-specific"]["data"]
    for key in INFO_SPECIFIC_KEYS:
        assert specific_ours.get(key) == specific_theirs.get(key), key


def test_info_json_lists_internal_snapshots(
    built: Callable[[str], Case], qemu_img: str, bitback_img: list[str],
) -> None:
    """Like qemu-img, bitback-img info names an image's internal snapshots (id, name)."""
    case = built("snapshot")

    def names(info: dict[str, Any]) -> list[tuple[str, str]]:
        return [(snap["id"], snap["name"]) for snap in info.get("snapshots", [])]

    theirs = names(info_json([qemu_img], case.top))
    assert theirs == [("1", "snap1")]
    assert names(info_json(bitback_img, case.top)) == theirs


def _bitback_writes(size: int, cs: int, seed: int) -> list[Op]:
    """Partial and whole-cluster writes, write -z and discard, at fixed and random places."""
    rng = random.Random(seed)
    ops: list[Op] = [
        Write(cs // 2, 512, 0xA1),  # inside cluster 0 (compressed, zero or shared)
        Write(3 * cs - 100, 700, 0xA2),  # across a cluster boundary, unaligned
        Write(5 * cs, cs, 0xA3),  # one whole cluster
        WriteZeroes(cs + 512, 1024),  # partial write -z
        WriteZeroes(8 * cs, 2 * cs, unmap=True),
        Discard(10 * cs, 3 * cs),
        Write(size - 300, 300, 0xA4),  # the last bytes
    ]
    for i in range(8):
        offset = rng.randrange(0, size - 1)
        length = min(size - offset, rng.choice([1, 511, cs - 1, cs + 3, 3 * cs]))
        ops.append(Write(offset, length, 0xB0 + i))
    ops.append(WriteZeroes(size // 2 + 1000, 3000))
    return ops


@pytest.mark.parametrize("name", list(CASES))
def test_bitback_writes_into_qemu_images(
    name: str, built: Callable[[str], Case], qemu_img: str, bitback_io: list[str],
    tmp_path: Path, elsewhere: Path,
) -> None:
    """After bitback-io writes, qemu-img check is clean and QEMU reads the model's bytes."""
    source = built(name)
    root = tmp_path / "copy"
    shutil.copytree(source.root, root)
    top = root / source.top.relative_to(source.root)
    before = read_raw([qemu_img], top, cwd=elsewhere, scratch=tmp_path)
    snapshot_before = None
    if source.snapshot is not None:
        snapshot_before = _snapshot_raw(qemu_img, top, source.snapshot, tmp_path)

    ops = _bitback_writes(len(before), source.cluster_size, seed=len(name))
    model = DiskModel(len(before), source.cluster_size, backing=before)
    assert model.apply_all(ops)
    run([*bitback_io, "-f", "qcow2", *io_argv(commands(ops)), str(top)], check=True,
        cwd=elsewhere)

    check_image(qemu_img, top)
    _assert_same("content after bitback writes",
                 read_raw([qemu_img], top, cwd=elsewhere, scratch=tmp_path), model.view())
    if snapshot_before is not None:
        assert source.snapshot is not None
        _assert_same("internal snapshot after bitback writes",
                     _snapshot_raw(qemu_img, top, source.snapshot, tmp_path), snapshot_before)


def _snapshot_raw(qemu_img: str, path: Path, snapshot: str, scratch: Path) -> bytes:
    out = scratch / "snapshot.raw"
    run([qemu_img, "convert", "-f", "qcow2", "-l", f"snapshot.name={snapshot}", "-O", "raw",
         str(path), str(out)], check=True)
    data = out.read_bytes()
    out.unlink()
    return data


@pytest.mark.parametrize(
    ("compat", "commands"),
    [
        pytest.param("1.1", ["truncate 8M", "write -P 0x33 7M 100k"], id="v3-grow"),
        pytest.param("1.1", ["truncate 1M", "truncate 4M"], id="v3-shrink"),
        pytest.param("0.10", ["truncate 8M"], id="v2-grow"),
    ],
)
def test_resizing_an_image_with_snapshots_like_qemu(
    compat: str, commands: list[str], qemu_img: str, qemu_io: str, bitback_io: list[str],
    tmp_path: Path,
) -> None:
    """bitback-io's truncate on an image with an internal snapshot does what qemu-io's does:
    same exit status and messages, same content, snapshot intact, qemu-img check clean."""
    source = tmp_path / "source.qcow2"
    create([qemu_img], source, 4 * MiB, compat=compat)
    run([qemu_io, "-f", "qcow2", "-c", "write -P 0x31 0 4M", str(source)], check=True)
    run([qemu_img, "snapshot", "-c", "snap1", str(source)], check=True)
    run([qemu_io, "-f", "qcow2", "-c", "write -P 0x32 1M 64k", str(source)], check=True)
    results = {}
    for name, tool in (("theirs", [qemu_io]), ("ours", bitback_io)):
        img = tmp_path / f"{name}.qcow2"
        shutil.copyfile(source, img)
        results[name] = run([*tool, "-f", "qcow2", *io_argv(commands), str(img)])
    ours, theirs = results["ours"], results["theirs"]
    assert ours.returncode == theirs.returncode, ours.stderr + theirs.stderr
    assert strip_timing(ours.stdout) == strip_timing(theirs.stdout)
    assert strip_timing(ours.stderr) == strip_timing(theirs.stderr)
    check_image(qemu_img, tmp_path / "ours.qcow2")
    code, out = compare([qemu_img], tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2")
    assert code == 0, out
    _assert_same("snapshot after resize",
                 _snapshot_raw(qemu_img, tmp_path / "ours.qcow2", "snap1", tmp_path),
                 _snapshot_raw(qemu_img, tmp_path / "theirs.qcow2", "snap1", tmp_path))
