"""bitback's qcow2 checker against real ``qemu-img check`` (QEMU 7.2) on the same images.

Images come from the real tools (qemu-io writes, ``convert -c``, ``snapshot -c``, refcount
widths 1/2/64, compat=0.10, 512-byte and 2 MiB clusters, persistent bitmaps, preallocation,
lazy refcounts, backing files, zstd) and are then damaged at the byte level
(:mod:`helpers.qcow2_raw`). For each image and each mode (check, ``-r leaks``, ``-r all``)
the same copy is handed to both and we compare, exactly:

* stdout (our :meth:`CheckResult.human`), the stderr lines (our ``messages``, without
  qemu-img's final ``Check failed`` line, which is our ``error_line``) and the exit code;
* the ``--output=json`` text (filename aside), of the check and of the repair run;
* after a repair: the repaired files byte for byte (QEMU punches holes where it frees
  clusters; so do we), and real ``qemu-img check`` of our repaired copy.

Known, deliberate differences are listed in ``DIFFERENT`` with the reason.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from bitback.block.drivers.qcow2.check import Repair, check_qcow2
from helpers.procs import run
from helpers.qcow2_raw import COPIED, Raw

pytestmark = pytest.mark.qemu

Builder = Callable[[Path, str, str], None]

# -- source images, made by the real tools ---------------------------------------------------


def _img(qemu_img: str, path: Path, size: str, *options: str) -> None:
    opts = ["-o", ",".join(options)] if options else []
    run([qemu_img, "create", "-f", "qcow2", *opts, str(path), size], check=True)


def _io(qemu_io: str, path: Path, *commands: str) -> None:
    argv = [qemu_io, "-f", "qcow2"]
    for command in commands:
        argv += ["-c", command]
    run([*argv, str(path)], check=True)


def _written(qemu_img: str, qemu_io: str, path: Path, *options: str) -> None:
    _img(qemu_img, path, "16M", *options)
    _io(qemu_io, path, "write -P 0x11 0 3M", "write 5M 100k", "write -z 8M 1M",
        "write -P 0x22 12M 64k", "discard 12M 64k")


def _compressed(qemu_img: str, qemu_io: str, path: Path, *options: str) -> None:
    src = path.with_suffix(".src")
    _written(qemu_img, qemu_io, src)
    run([qemu_img, "convert", "-O", "qcow2", "-c", *(["-o", ",".join(options)] if options
                                                     else []), str(src), str(path)], check=True)


def _snapshots(qemu_img: str, qemu_io: str, path: Path, *options: str) -> None:
    _written(qemu_img, qemu_io, path, *options)
    run([qemu_img, "snapshot", "-c", "s1", str(path)], check=True)
    _io(qemu_io, path, "write -P 0x33 1M 1M")
    run([qemu_img, "snapshot", "-c", "s2", str(path)], check=True)
    _io(qemu_io, path, "write -P 0x44 0 64k")


def _bitmaps(qemu_img: str, qemu_io: str, path: Path) -> None:
    _img(qemu_img, path, "64M")
    run([qemu_img, "bitmap", "--add", str(path), "b0"], check=True)
    run([qemu_img, "bitmap", "--add", "-g", "512k", str(path), "b1"], check=True)
    _io(qemu_io, path, "write 0 10M")
    run([qemu_img, "bitmap", "--add", "--disable", str(path), "b2"], check=True)


def _overlay(qemu_img: str, qemu_io: str, path: Path) -> None:
    base = path.with_suffix(".base")
    _written(qemu_img, qemu_io, base)
    run([qemu_img, "create", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(path)],
        check=True)
    _io(qemu_io, path, "write 0 10k", "write -P 0x55 6M 200k")


SOURCES: dict[str, Callable[[str, str, Path], None]] = {
    "fresh": lambda qi, qo, p: _img(qi, p, "64M"),
    "written": lambda qi, qo, p: _written(qi, qo, p),
    "compressed": lambda qi, qo, p: _compressed(qi, qo, p),
    "compressed512": lambda qi, qo, p: _compressed(qi, qo, p, "cluster_size=512"),
    "zstd": lambda qi, qo, p: _compressed(qi, qo, p, "compression_type=zstd"),
    "snapshots": lambda qi, qo, p: _snapshots(qi, qo, p),
    "refcount1": lambda qi, qo, p: _written(qi, qo, p, "refcount_bits=1"),
    "refcount2": lambda qi, qo, p: _snapshots(qi, qo, p, "refcount_bits=2"),
    "refcount64": lambda qi, qo, p: _snapshots(qi, qo, p, "refcount_bits=64"),
    "compat010": lambda qi, qo, p: _snapshots(qi, qo, p, "compat=0.10"),
    "cluster512": lambda qi, qo, p: _written(qi, qo, p, "cluster_size=512"),
    "cluster2m": lambda qi, qo, p: _written(qi, qo, p, "cluster_size=2M"),
    "bitmaps": lambda qi, qo, p: _bitmaps(qi, qo, p),
    "prealloc_metadata": lambda qi, qo, p: _img(qi, p, "16M", "preallocation=metadata"),
    "prealloc_full": lambda qi, qo, p: _img(qi, p, "4M", "preallocation=full",
                                            "cluster_size=4k"),
    "lazy": lambda qi, qo, p: _written(qi, qo, p, "lazy_refcounts=on"),
    "overlay": lambda qi, qo, p: _overlay(qi, qo, p),
}

# -- damage ------------------------------------------------------------------------------------


def _host(raw: Raw, k: int) -> int:
    """Host cluster of the k-th allocated entry of the first L2 table."""
    return (raw.first_data_entries()[k][1] & 0x00FF_FFFF_FFFF_FE00) >> raw.cluster_bits


def _bump(raw: Raw, cluster: int) -> None:
    raw.set_refcount(cluster, raw.refcount(cluster) + 1)


def _set_entry(raw: Raw, k: int, change: Callable[[int], int]) -> None:
    offset, value = raw.first_data_entries()[k]
    raw.put64(offset, change(value))


def _share_first(raw: Raw, copies: int) -> None:
    """Point entries 1..copies at the first entry's cluster (without COPIED)."""
    first = raw.first_data_entries()[0][1]
    for k in range(1, copies + 1):
        _set_entry(raw, k, lambda v: first & ~COPIED)


def _dirty_with_zero_refcount(raw: Raw) -> None:
    """Lazy refcounts: the dirty bit set and a refcount not yet written."""
    raw.put64(72, 1)
    raw.set_refcount(_host(raw, 1), 0)


def _bitmap_data_cluster(raw: Raw) -> int:
    """The first data cluster of the first bitmap (extension: u32 nb, u32 0, u64 size, u64
    directory offset; directory entry: u64 table offset ...)."""
    ext_at = 112  # header extensions: {u32 type, u32 length, data padded to 8}
    while raw.header_u32(ext_at) != 0x23852875:
        assert raw.header_u32(ext_at) != 0, "no bitmaps extension"
        ext_at += 8 + (raw.header_u32(ext_at + 4) + 7) // 8 * 8
    table = raw.u64(raw.u64(ext_at + 8 + 16))
    return (raw.u64(table) & 0x00FF_FFFF_FFFF_FE00) >> raw.cluster_bits


def _compressed_host(raw: Raw, k: int) -> int:
    value = raw.first_data_entries()[k][1]
    return (value & ((1 << (62 - (raw.cluster_bits - 8))) - 1)) >> raw.cluster_bits


DAMAGE: dict[str, tuple[str, Callable[[Raw], None]]] = {
    "clean": ("written", lambda r: None),
    "leak": ("written", lambda r: r.set_refcount(_host(r, 2), 2)),
    "leak_free_cluster": ("written", lambda r: r.set_refcount(r.end_cluster - 1, 3)),
    "refcount_zero": ("written", lambda r: r.set_refcount(_host(r, 3), 0)),
    "copied_cleared": ("written", lambda r: _set_entry(r, 1, lambda v: v & ~COPIED)),
    "l1_copied_cleared": ("written", lambda r: r.put64(r.l1_offset, r.u64(r.l1_offset)
                                                       & ~COPIED)),
    "l2_entry_past_eof": ("written", lambda r: _set_entry(r, 3, lambda v: COPIED | 1 << 33)),
    "l2_entry_unaligned": ("written", lambda r: _set_entry(r, 3, lambda v: v + 512)),
    "prealloc_unaligned": ("written", lambda r: _set_entry(r, 3, lambda v: (v + 512) | 1)),
    "l2_reserved_bit": ("written", lambda r: _set_entry(r, 3, lambda v: v | 2)),
    "l1_reserved_bit": ("written", lambda r: r.put64(r.l1_offset, r.u64(r.l1_offset) | 4)),
    "refblock_twice": ("written", lambda r: r.put64(r.reftable + 8, r.u64(r.reftable))),
    "snapshot_refcount_low": ("snapshots", lambda r: r.set_refcount(_host(r, 5), 1)),
    "snapshot_refcount_zero": ("snapshots", lambda r: r.set_refcount(_host(r, 5), 0)),
    "snapshot_leak": ("snapshots", lambda r: _bump(r, _host(r, 5))),
    "snapshot_copied_set": ("snapshots", lambda r: _set_entry(r, 5, lambda v: v | COPIED)),
    "snapshot_l1_unaligned": ("snapshots", lambda r: r.put64(
        r.u64(64), r.u64(r.u64(64)) + 512)),
    "compressed_copied": ("compressed", lambda r: _set_entry(r, 3, lambda v: v | COPIED)),
    "compressed_leak": ("compressed", lambda r: r.set_refcount(_compressed_host(r, 3), 5)),
    "compressed_zero": ("compressed", lambda r: r.set_refcount(_compressed_host(r, 3), 0)),
    "refcount1_overflow": ("refcount1", lambda r: _set_entry(
        r, 1, lambda v: r.first_data_entries()[0][1])),
    "refcount2_overflow": ("refcount2", lambda r: _share_first(r, 4)),
    "refcount64_leak": ("refcount64", lambda r: r.set_refcount(_host(r, 2), 7)),
    "compat010_leak": ("compat010", lambda r: _bump(r, _host(r, 2))),
    "compat010_copied": ("compat010", lambda r: _set_entry(r, 0, lambda v: v & ~COPIED)),
    "cluster512_zero": ("cluster512", lambda r: r.set_refcount(_host(r, 20), 0)),
    "cluster2m_leak": ("cluster2m", lambda r: r.set_refcount(_host(r, 1), 2)),
    "bitmap_data_leak": ("bitmaps", lambda r: r.set_refcount(_bitmap_data_cluster(r), 9)),
    "bitmap_data_zero": ("bitmaps", lambda r: r.set_refcount(_bitmap_data_cluster(r), 0)),
    "bitmaps_ignored": ("bitmaps", lambda r: r.put64(88, 0)),
    "lazy_dirty": ("lazy", lambda r: _dirty_with_zero_refcount(r)),
    "corrupt_bit": ("written", lambda r: r.put64(72, 2)),
    "refblock_unaligned": ("fresh", lambda r: r.put64(r.reftable, r.u64(r.reftable) + 4096)),
    "reftable_reserved_bit": ("fresh", lambda r: r.put64(r.reftable, r.u64(r.reftable) + 1)),
}

# (image, mode) -> why our result legitimately differs from qemu-img's. Modes: "check",
# "leaks", "all"; "after" means only the state after the repair differs.
DIFFERENT: dict[tuple[str, str], str] = {
    ("refblock_unaligned", "all"): "QEMU marks the image corrupt and gives up; we rebuild",
    ("reftable_reserved_bit", "all"): "QEMU's rebuild trips its own overlap check; ours "
                                      "avoids the old refcount structure and succeeds",
    ("bitmap_data_leak", "after"): "QEMU rewrites the bitmaps when it closes the image",
    ("bitmap_data_zero", "after"): "QEMU rewrites the bitmaps when it closes the image",
    ("bitmaps", "after"): "QEMU rewrites the bitmaps when it closes the image",
    ("bitmaps_ignored", "after"): "QEMU re-encodes the whole header on a read-write open",
    ("lazy_dirty", "after"): "QEMU clears the dirty bit on close even when the repair failed",
}

# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {}


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("check_vs_qemu")


def _source(name: str, qemu_img: str, qemu_io: str, image_dir: Path,
            sources: dict[str, Path]) -> Path:
    if name not in sources:
        path = image_dir / f"{name}.qcow2"
        SOURCES[name](qemu_img, qemu_io, path)
        sources[name] = path
    return sources[name]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copy(src, dst)
    for base in src.parent.glob("*.base"):  # overlays name their backing file relatively
        if not (dst.parent / base.name).exists():
            shutil.copy(base, dst.parent / base.name)
    return dst


# -- the comparison -----------------------------------------------------------------------------


def _qemu_check(qemu_img: str, path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run([qemu_img, "check", *args, str(path)])


def _compare(
    qemu_img: str, original: Path, work: Path, name: str, mode: str
) -> subprocess.CompletedProcess[str]:
    """Run both on copies of ``original``; assert the same output; qemu-img's process."""
    repair: Repair | None = {"check": None, "leaks": "leaks", "all": "all"}[mode]
    r_args = ["-r", repair] if repair else []
    q_path = _copy(original, work / "q.qcow2")
    b_path = _copy(original, work / "b.qcow2")
    qemu = _qemu_check(qemu_img, q_path, *r_args)
    ours = check_qcow2(str(b_path), repair=repair)
    # Our tool names itself where qemu-img does (warnings and the advice to run check -r).
    q_err = [line.replace("qemu-img: warning", "bitback-img: warning")
             .replace("run 'qemu-img check", "run 'bitback-img check")
             for line in qemu.stderr.splitlines()
             if not line.startswith("qemu-img: Check failed")]
    if (name, mode) in DIFFERENT:
        return qemu
    assert ours.messages == q_err
    assert ours.human() == qemu.stdout
    assert ours.exit_code == qemu.returncode
    assert ours.error_line == next((line.removeprefix("qemu-img: ") for line in
                                    qemu.stderr.splitlines()
                                    if line.startswith("qemu-img: Check failed")), None)
    # JSON of the same run (on fresh copies)
    qj = _qemu_check(qemu_img, _copy(original, work / "qj.qcow2"), "--output=json", *r_args)
    bj = check_qcow2(str(_copy(original, work / "bj.qcow2")), repair=repair)
    if qemu.stdout:
        assert bj.json_text().replace(str(work / "bj.qcow2"), "X") == qj.stdout.replace(
            str(work / "qj.qcow2"), "X")
    if repair and (name, "after") not in DIFFERENT:
        assert b_path.read_bytes() == q_path.read_bytes(), "repaired images differ"
    if repair:
        after = _qemu_check(qemu_img, b_path)
        assert after.returncode == _qemu_check(qemu_img, q_path).returncode, after.stderr
    return qemu


@pytest.mark.parametrize("mode", ["check", "leaks", "all"])
@pytest.mark.parametrize("name", sorted(SOURCES))
def test_source_images(
    qemu_img: str, qemu_io: str, image_dir: Path, sources: dict[str, Path], tmp_path: Path,
    name: str, mode: str,
) -> None:
    """Images as the real tools make them: clean, and identical after a no-op repair."""
    original = _source(name, qemu_img, qemu_io, image_dir, sources)
    _compare(qemu_img, original, tmp_path, name, mode)


@pytest.mark.parametrize("mode", ["check", "leaks", "all"])
@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_damaged_images(
    qemu_img: str, qemu_io: str, image_dir: Path, sources: dict[str, Path], tmp_path: Path,
    name: str, mode: str,
) -> None:
    source_name, damage = DAMAGE[name]
    original = _copy(_source(source_name, qemu_img, qemu_io, image_dir, sources),
                     tmp_path / "damaged.qcow2")
    with Raw(original) as raw:
        damage(raw)
    qemu = _compare(qemu_img, original, tmp_path, name, mode)
    if mode == "check" and name not in ("clean", "corrupt_bit"):
        assert qemu.returncode != 0, "the damage should be visible to qemu-img"


@pytest.mark.parametrize("name", ["refblock_unaligned", "reftable_reserved_bit"])
def test_we_repair_what_qemu_cannot(
    qemu_img: str, qemu_io: str, image_dir: Path, sources: dict[str, Path], tmp_path: Path,
    name: str,
) -> None:
    source_name, damage = DAMAGE[name]
    path = _copy(_source(source_name, qemu_img, qemu_io, image_dir, sources),
                 tmp_path / "x.qcow2")
    with Raw(path) as raw:
        damage(raw)
    result = check_qcow2(str(path), repair="all")
    assert "Rebuilding refcount structure" in result.messages
    assert result.exit_code == 0
    after = _qemu_check(qemu_img, path)
    assert after.returncode == 0, after.stderr
    assert after.stdout.startswith("No errors were found on the image.")
