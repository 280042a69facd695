"""The qcow2 checker and repairer on images built with create.py and damaged by hand.

No QEMU here (tests/interop/test_check_vs_qemu.py compares with real qemu-img). Images are
made by ``create_qcow2`` and then edited with ``struct`` at the byte level by
:class:`helpers.qcow2_raw.Raw`, which hand-allocates L2 tables and data clusters the way QEMU
lays them out (appended at the end, refcount 1, COPIED set), so that every test starts from
an image QEMU finds clean.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitback.block.drivers.qcow2.check import check_qcow2
from bitback.block.drivers.qcow2.check_result import CheckResult
from bitback.block.drivers.qcow2.create import create_qcow2
from bitback.block.drivers.qcow2.repair import OverlapGuard, apply_refcount_updates
from bitback.errors import ImageFormatError
from helpers.qcow2_raw import COPIED, ZERO, Raw


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "t.qcow2"
    create_qcow2(str(path), 64 << 20)
    return path


def _with_data(path: Path, clusters: int = 4) -> list[int]:
    raw = Raw(path)
    try:
        return [raw.map_data(g) for g in range(clusters)]
    finally:
        raw.close()


def _edit(path: Path) -> Raw:
    return Raw(path)


# -- clean images -------------------------------------------------------------------------


def test_fresh_image_is_clean(image: Path) -> None:
    result = check_qcow2(str(image))
    assert result.exit_code == 0
    assert result.messages == []
    assert (result.corruptions, result.leaks, result.check_errors) == (0, 0, 0)
    assert result.image_end_offset == 4 * 65536  # header, reftable, refblock, L1
    assert result.total_clusters == 1024
    assert result.human() == "No errors were found on the image.\nImage end offset: 262144\n"


def test_image_with_data_is_clean_and_counted(image: Path) -> None:
    hosts = _with_data(image, 6)
    result = check_qcow2(str(image))
    assert result.exit_code == 0, result.messages
    assert result.allocated_clusters == 6
    assert result.fragmented_clusters == 0
    assert result.image_end_offset == (hosts[-1] + 1) * 65536
    assert "6/1024 = 0.59% allocated, 0.00% fragmented, 0.00% compressed clusters" in (
        result.human()
    )


@pytest.mark.parametrize("refcount_bits", [1, 2, 4, 8, 16, 32, 64])
def test_every_refcount_width_is_read(tmp_path: Path, refcount_bits: int) -> None:
    path = tmp_path / f"r{refcount_bits}.qcow2"
    create_qcow2(str(path), 8 << 20, refcount_bits=refcount_bits)
    hosts = _with_data(path, 3)
    assert check_qcow2(str(path)).exit_code == 0
    raw = _edit(path)
    raw.set_refcount(hosts[1], 0)  # a referenced cluster with refcount 0
    raw.close()
    result = check_qcow2(str(path))
    assert f"ERROR cluster {hosts[1]} refcount=0 reference=1" in result.messages
    assert result.exit_code == 2


def test_compat_010_image(tmp_path: Path) -> None:
    path = tmp_path / "v2.qcow2"
    create_qcow2(str(path), 8 << 20, compat="0.10")
    _with_data(path, 2)
    assert check_qcow2(str(path)).exit_code == 0


@pytest.mark.parametrize("cluster_size", [512, 2 << 20])
def test_extreme_cluster_sizes(tmp_path: Path, cluster_size: int) -> None:
    path = tmp_path / "c.qcow2"
    create_qcow2(str(path), 16 << 20, cluster_size=cluster_size)
    _with_data(path, 3)
    result = check_qcow2(str(path))
    assert result.exit_code == 0, result.messages
    assert result.allocated_clusters == 3


# -- leaks and refcount corruption ----------------------------------------------------------


def test_leaked_cluster_is_reported_and_repaired(image: Path) -> None:
    hosts = _with_data(image, 2)
    raw = _edit(image)
    raw.set_refcount(hosts[0], 2)
    raw.close()
    result = check_qcow2(str(image))
    assert result.messages == [
        f"Leaked cluster {hosts[0]} refcount=2 reference=1",
        "ERROR OFLAG_COPIED data cluster: l2_entry=8000000000050000 refcount=2",
    ]
    assert (result.leaks, result.corruptions, result.exit_code) == (1, 1, 2)
    fixed = check_qcow2(str(image), repair="leaks")
    # the leak is fixed first; with no error left, -r leaks also fixes COPIED (as QEMU)
    assert (fixed.leaks_fixed, fixed.corruptions_fixed) == (1, 0)
    assert fixed.messages[:2] == [
        f"Leaked cluster {hosts[0]} refcount=2 reference=1",
        f"Repairing cluster {hosts[0]} refcount=2 reference=1",
    ]
    assert fixed.exit_code == 0
    assert "The following inconsistencies were found and repaired:" in fixed.human()
    raw = _edit(image)
    assert raw.refcount(hosts[0]) == 1
    raw.close()


def test_leak_past_used_clusters_counts_for_image_end(image: Path) -> None:
    hosts = _with_data(image, 1)
    raw = _edit(image)
    raw.set_refcount(hosts[0] + 3, 1)  # nothing there, but inside the file? extend it
    os.truncate(image, (hosts[0] + 4) * 65536)
    raw.close()
    result = check_qcow2(str(image))
    assert result.messages == [f"Leaked cluster {hosts[0] + 3} refcount=1 reference=0"]
    assert result.exit_code == 3
    assert result.image_end_offset == (hosts[0] + 4) * 65536
    assert result.human().startswith("\n1 leaked clusters were found on the image.\n")


def test_refcount_too_low_needs_repair_all(image: Path) -> None:
    hosts = _with_data(image, 2)
    raw = _edit(image)
    # a second reference to host cluster 0 from guest cluster 5, refcount left at 1
    raw.put64(raw.entry_offset(5), hosts[0] * 65536)
    raw.close()
    result = check_qcow2(str(image))
    assert f"ERROR cluster {hosts[0]} refcount=1 reference=2" in result.messages
    assert check_qcow2(str(image), repair="leaks").exit_code == 2  # leaks mode leaves it
    fixed = check_qcow2(str(image), repair="all")
    assert fixed.exit_code == 0, fixed.messages
    assert fixed.corruptions_fixed == 2  # the refcount and entry 0's COPIED flag
    raw = _edit(image)
    assert raw.refcount(hosts[0]) == 2
    assert not raw.u64(raw.entry_offset(0)) & COPIED
    raw.close()


def test_zero_refcount_needs_a_rebuild(image: Path) -> None:
    hosts = _with_data(image, 3)
    raw = _edit(image)
    raw.set_refcount(hosts[1], 0)
    raw.close()
    leaks = check_qcow2(str(image), repair="leaks")
    assert leaks.exit_code == 1
    assert leaks.failure == "Input/output error"
    assert leaks.messages[-1] == "ERROR need to rebuild refcount structures"
    assert leaks.human() == ""
    fixed = check_qcow2(str(image), repair="all")
    assert "Rebuilding refcount structure" in fixed.messages
    assert fixed.exit_code == 0, fixed.messages
    assert fixed.corruptions_fixed == 1
    # QEMU's placement: a new refcount block, then the table, after the last used cluster;
    # the old table and block (clusters 1 and 2) are freed
    raw = _edit(image)
    assert raw.reftable == (hosts[-1] + 2) * 65536
    assert raw.refcount(1) == raw.refcount(2) == 0
    raw.close()
    again = check_qcow2(str(image))
    assert again.exit_code == 0
    assert again.image_end_offset == (hosts[-1] + 3) * 65536


def test_overflowing_refcount_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "r1.qcow2"
    create_qcow2(str(path), 8 << 20, refcount_bits=1)
    hosts = _with_data(path, 2)
    raw = _edit(path)
    raw.put64(raw.entry_offset(1), hosts[0] * 65536)  # two references, 1-bit refcounts
    raw.close()
    result = check_qcow2(str(path))
    assert result.messages[:2] == [
        f"ERROR: overflow cluster offset={hosts[0] * 65536:#x}",
        "Use qemu-img amend to increase the refcount entry width or qemu-img convert to "
        "create a clean copy if the image cannot be opened for writing",
    ]
    assert result.exit_code == 2


# -- entries ----------------------------------------------------------------------------------


def test_l2_entry_past_eof(image: Path) -> None:
    _with_data(image, 2)
    raw = _edit(image)
    raw.put64(raw.entry_offset(1), (1 << 30) | COPIED)
    raw.close()
    result = check_qcow2(str(image))
    assert result.messages[0] == (
        "ERROR: counting reference for region exceeding the end of the file by one cluster "
        "or more: offset 0x40000000 size 0x10000"
    )
    assert result.exit_code == 2


def test_cleared_copied_flag_is_repaired(image: Path) -> None:
    _with_data(image, 2)
    raw = _edit(image)
    entry = raw.u64(raw.entry_offset(1))
    raw.put64(raw.entry_offset(1), entry & ~COPIED)
    l1 = raw.u64(raw.l1_offset)
    raw.put64(raw.l1_offset, l1 & ~COPIED)
    raw.close()
    result = check_qcow2(str(image))
    assert result.messages == [
        f"ERROR OFLAG_COPIED L2 cluster: l1_index=0 l1_entry={l1 & ~COPIED:x} refcount=1",
        f"ERROR OFLAG_COPIED data cluster: l2_entry={entry & ~COPIED:x} refcount=1",
    ]
    assert result.corruptions == 2
    fixed = check_qcow2(str(image), repair="all")
    assert fixed.corruptions_fixed == 2 and fixed.exit_code == 0
    raw = _edit(image)
    assert raw.u64(raw.entry_offset(1)) == entry
    raw.close()


def test_unaligned_preallocated_cluster_becomes_zero(image: Path) -> None:
    hosts = _with_data(image, 2)
    raw = _edit(image)
    raw.put64(raw.entry_offset(1), (hosts[1] * 65536 + 512) | ZERO | COPIED)
    raw.close()
    result = check_qcow2(str(image))
    assert f"ERROR offset={hosts[1] * 65536 + 512:x}: Preallocated cluster is not properly " \
        "aligned; L2 entry corrupted." in result.messages
    fixed = check_qcow2(str(image), repair="all")
    assert fixed.messages[0].startswith("Repairing offset=")
    assert fixed.exit_code == 0, fixed.messages
    raw = _edit(image)
    assert raw.u64(raw.entry_offset(1)) == ZERO
    raw.close()


def test_compressed_clusters_share_and_straddle(image: Path) -> None:
    raw = _edit(image)
    entry0 = raw.entry_offset(0)
    a = raw.alloc()
    b = raw.alloc()
    # c0 lives inside host cluster a; c1 starts in a and ends in b: a is used twice
    raw.put64(entry0, raw.compressed_entry(a * 65536 + 1000, 2))
    raw.put64(raw.entry_offset(1), raw.compressed_entry(a * 65536 + 65536 - 700, 3))
    raw.set_refcount(a, 2)
    raw.close()
    result = check_qcow2(str(image))
    assert result.exit_code == 0, result.messages
    assert (result.allocated_clusters, result.compressed_clusters) == (2, 2)
    assert result.fragmented_clusters == 2
    raw = _edit(image)
    raw.set_refcount(b, 2)
    raw.close()
    assert check_qcow2(str(image)).messages == [f"Leaked cluster {b} refcount=2 reference=1"]


def test_reserved_bits_are_corruptions(image: Path) -> None:
    _with_data(image, 1)
    raw = _edit(image)
    entry = raw.u64(raw.entry_offset(0))
    raw.put64(raw.entry_offset(0), entry | 2)
    raw.close()
    result = check_qcow2(str(image))
    assert result.messages == [f"ERROR found l2 entry with reserved bits set: {entry | 2:x}"]


# -- refcount structure ---------------------------------------------------------------------


def test_unaligned_refcount_block_cannot_be_read(image: Path) -> None:
    raw = _edit(image)
    raw.put64(raw.reftable, 2 * 65536 + 4096)
    raw.close()
    result = check_qcow2(str(image))
    assert result.messages[0] == (
        "ERROR refcount block 0 is not cluster aligned; refcount table entry corrupted"
    )
    assert result.messages[1].startswith("qcow2: Image is corrupt: Refblock offset 0x21000")
    assert result.messages[2] == "Can't get refcount for cluster 0: Input/output error"
    assert result.check_errors == 4 and result.exit_code == 1
    assert result.error_line == "Check failed"
    fixed = check_qcow2(str(image), repair="all")  # QEMU fails here; a rebuild succeeds
    assert fixed.exit_code == 0, fixed.messages
    assert check_qcow2(str(image)).exit_code == 0


def test_refcount_block_referenced_twice(image: Path) -> None:
    raw = _edit(image)
    raw.put64(raw.reftable + 8, raw.u64(raw.reftable))
    raw.close()
    result = check_qcow2(str(image))
    assert "ERROR refcount block 1 refcount=2" in result.messages
    assert "ERROR cluster 2 refcount=1 reference=2" in result.messages
    assert check_qcow2(str(image), repair="all").exit_code == 0


# -- hostile images ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "fmt", "value", "message"),
    [
        (36, ">I", 0x7FFF_FFFF, "Active L1 table too large"),
        (56, ">I", 200, "Reference count table too large"),
        (48, ">Q", 12345, "Reference count table offset invalid"),
        (24, ">Q", 1 << 40, "L1 table is too small"),
        (40, ">Q", 3 << 62, "Active L1 table offset invalid"),
    ],
)
def test_hostile_headers_are_refused(
    image: Path, field: int, fmt: str, value: int, message: str
) -> None:
    with open(image, "r+b") as f:
        f.seek(field)
        f.write(struct.pack(fmt, value))
    with pytest.raises(ImageFormatError, match=f"^{message}$"):
        check_qcow2(str(image))


def test_huge_sparse_file_costs_nothing(image: Path) -> None:
    _with_data(image, 2)
    os.truncate(image, 4 << 40)  # 4 TiB apparent size: 64M clusters
    result = check_qcow2(str(image))
    assert result.exit_code == 0


def test_file_with_too_many_clusters_fails(tmp_path: Path) -> None:
    path = tmp_path / "s.qcow2"
    create_qcow2(str(path), 1 << 20, cluster_size=512)
    os.truncate(path, 2 << 40)
    result = check_qcow2(str(path))
    assert (result.failure, result.exit_code, result.human()) == ("File too large", 1, "")


# -- repair ordering ---------------------------------------------------------------------------


def test_refcounts_are_raised_before_any_is_lowered(image: Path) -> None:
    from bitback.block.drivers.qcow2.check_image import CheckImage, StoredRefcounts

    with CheckImage(str(image), writable=True) as img:
        stored = StoredRefcounts(img)
        writes: list[np.ndarray] = []
        real = stored.write_block

        def record(index: int, values: np.ndarray) -> None:
            writes.append(values[:6].copy())
            real(index, values)

        stored.write_block = record  # type: ignore[method-assign]
        apply_refcount_updates(stored, {1: 0, 2: 5})
    assert [w.tolist() for w in writes] == [[1, 1, 5, 1, 0, 0], [1, 0, 5, 1, 0, 0]]


def test_overlap_guard_names_metadata(image: Path) -> None:
    from bitback.block.drivers.qcow2.check_image import CheckImage, StoredRefcounts

    with CheckImage(str(image)) as img:
        guard = OverlapGuard(img, StoredRefcounts(img).reftable, [], 0)
        assert guard.overlap(100, 8) == "qcow2_header"
        assert guard.overlap(65536 + 8, 8) == "refcount table"
        assert guard.overlap(3 * 65536, 512) == "active L1 table"
        assert guard.overlap(2 * 65536, 65536) == "refcount block"
        assert guard.overlap(2 * 65536, 65536, frozenset({"refcount block"})) is None
        assert guard.overlap(4 * 65536, 65536) is None


# -- result rendering ---------------------------------------------------------------------------


def test_json_keys_follow_qemu_order() -> None:
    result = CheckResult(filename="a.qcow2", image_end_offset=262144, total_clusters=1024,
                         leaks=1, allocated_clusters=17)
    assert list(result.to_json()) == [
        "image-end-offset", "total-clusters", "check-errors", "leaks", "allocated-clusters",
        "filename", "format",
    ]
    assert result.json_text() == (
        '{\n    "image-end-offset": 262144,\n    "total-clusters": 1024,\n'
        '    "check-errors": 0,\n    "leaks": 1,\n    "allocated-clusters": 17,\n'
        '    "filename": "a.qcow2",\n    "format": "qcow2"\n}\n'
    )
    assert CheckResult(filename='d é/x"y').json_text().count('"d \\u00E9/x\\"y"') == 1


def test_human_text_shapes() -> None:
    result = CheckResult(filename="x", corruptions=2, leaks=3, check_errors=1,
                         total_clusters=10, allocated_clusters=4, fragmented_clusters=1,
                         image_end_offset=512, corruptions_fixed=1, recheck_from=0)
    assert result.human() == (
        "The following inconsistencies were found and repaired:\n\n"
        "    0 leaked clusters\n    1 corruptions\n\nDouble checking the fixed image now...\n"
        "\n2 errors were found on the image.\n"
        "Data may be corrupted, or further writes to the image may corrupt it.\n"
        "\n3 leaked clusters were found on the image.\n"
        "This means waste of disk space, but no harm to data.\n"
        "\n1 internal errors have occurred during the check.\n"
        "4/10 = 40.00% allocated, 25.00% fragmented, 0.00% compressed clusters\n"
        "Image end offset: 512\n"
    )
    assert result.exit_code == 1
    assert CheckResult.unsupported("x", "raw").exit_code == 63


# -- property: leaks always repair to a clean image ------------------------------------------


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    clusters=st.integers(min_value=1, max_value=12),
    bumps=st.lists(st.tuples(st.integers(0, 11), st.integers(1, 5)), max_size=6),
    refcount_bits=st.sampled_from([2, 8, 16, 64]),
)
def test_leak_model(
    tmp_path_factory: pytest.TempPathFactory,
    clusters: int,
    bumps: list[tuple[int, int]],
    refcount_bits: int,
) -> None:
    """Against a trivial model: each data cluster is referenced once; any excess is a leak."""
    path = tmp_path_factory.mktemp("leaks") / "p.qcow2"
    create_qcow2(str(path), 16 << 20, refcount_bits=refcount_bits)
    hosts = _with_data(path, clusters)
    expected_extra: dict[int, int] = {}
    for index, extra in bumps:
        host = hosts[index % clusters]
        expected_extra[host] = min(expected_extra.get(host, 0) + extra, (1 << refcount_bits) - 2)
    raw = _edit(path)
    for host, extra in expected_extra.items():
        raw.set_refcount(host, 1 + extra)
    raw.close()
    leaky = {h for h, e in expected_extra.items() if e}
    result = check_qcow2(str(path))
    assert result.leaks == len(leaky)
    assert result.corruptions == len(leaky)  # their COPIED flags are now wrong
    fixed = check_qcow2(str(path), repair="leaks")
    assert fixed.leaks_fixed == len(leaky)
    assert fixed.exit_code == 0
    raw = _edit(path)
    assert all(raw.refcount(h) == 1 for h in hosts)
    raw.close()
