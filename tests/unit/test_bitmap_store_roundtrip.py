"""Persistent bitmaps survive store and load exactly: a hypothesis round trip through the
Python API, with real ``qemu-img check`` as the referee of every image.

An example is a fresh qcow2 image - clusters of 512 B, 64 KiB or 2 MiB; a virtual size from
512 B to 4 TiB, a multiple of 512 and mostly of no granularity (512-byte clusters stop at
4 GiB, where their L1 table reaches 1 MiB) - and one to three bitmaps: granularity 512 B to
2 GiB (at most ``MAX_GRANULES`` granules), enabled or not, a name of any printable characters
(sometimes 1023 bytes, the most QEMU stores), and data clusters chosen among all-zero,
all-one, random and sparse ones (:func:`helpers.bitmap_data.random_bits`), so that the store
writes table shortcuts as well as data, and the last, partly used data cluster takes every
kind. Then:

1. open read-write, ``driver.persistent.add`` every bitmap, close (the store);
2. open read-only: the same names, granularities and enabled flags, bits equal
   (``GranuleBits`` equality), no entry IN_USE; real ``qemu-img check`` exits 0 and
   ``qemu-img info`` lists the bitmaps with ``auto`` exactly for the enabled ones;
3. for about half the examples: open read-write again (IN_USE set in place), write through
   the driver, which marks the enabled bitmaps, close (the old tables and data are freed and
   new ones written), and check 2 again with the marks added.

``BITBACK_BITMAP_STORE_EXAMPLES`` sets the number of examples (default 40, about 5 s);
the run is derandomized, so a failure repeats.
"""

from __future__ import annotations

import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from bitback.bitmaps import DirtyBitmap, GranuleBits
from bitback.block.drivers.qcow2.create import create_qcow2
from bitback.block.drivers.qcow2.driver import Qcow2Driver
from bitback.block.open import open_image
from helpers.bitmap_data import KINDS, random_bits
from helpers.imagetools import check_image, info_json

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
EXAMPLES = int(os.environ.get("BITBACK_BITMAP_STORE_EXAMPLES", "40"))
MAX_GRANULES = 1 << 20  # 128 KiB of bitmap data per bitmap
LARGEST = {512: 4 * GiB, 64 * KiB: 4 * TiB, 2 * MiB: 4 * TiB}  # virtual size by cluster size


@dataclass(frozen=True)
class BitmapSpec:
    name: str
    granularity: int
    enabled: bool
    kinds: tuple[str, ...]
    seed: int


@dataclass(frozen=True)
class Example:
    cluster_size: int
    size: int
    bitmaps: tuple[BitmapSpec, ...]
    write: tuple[int, int] | None  # (offset, length) of the write in the rewrite round


NAME_CHARS = st.characters(exclude_categories=("Cs", "Cc"))
NAMES = st.one_of(st.text(NAME_CHARS, min_size=1, max_size=12),
                  st.just("b" * 1023), st.just("\u00e9" * 511 + "x"))


@st.composite
def examples(draw: st.DrawFn) -> Example:
    cluster_size = draw(st.sampled_from(sorted(LARGEST)), label="cluster size")
    per_cluster = cluster_size * 8  # granules that one data cluster describes
    first: int | None = None
    if draw(st.booleans(), label="size from the first bitmap's data clusters"):
        # Whole data clusters and a remainder that ends on, just before or just after a
        # 64-bit word of bitmap (QEMU loads whole words), or anywhere.
        full = draw(st.integers(0, min(4, MAX_GRANULES // per_cluster)), label="full clusters")
        rest = st.sampled_from([0, 1, 63, 64, 65]) | st.integers(0, per_cluster - 1)
        granules = max(1, full * per_cluster + min(draw(rest, label="more granules"),
                                                   MAX_GRANULES))
        top = min(31, (LARGEST[cluster_size] // granules).bit_length() - 1)
        first = 1 << draw(st.integers(9, top), label="granularity bits")
        tail = 512 * draw(st.integers(1, first // 512), label="sectors in the last granule")
        size = (granules - 1) * first + tail
    else:
        ranges = [(512, 64 * KiB), (64 * KiB, 256 * MiB), (256 * MiB, LARGEST[cluster_size])]
        if cluster_size > 512:
            ranges.append((1 * TiB + 512, 4 * TiB))
        low, high = draw(st.sampled_from(ranges))
        size = 512 * draw(st.integers(low // 512, high // 512), label="sectors")
    names = draw(st.lists(NAMES, min_size=1, max_size=3, unique=True), label="names")
    # The smallest granularity that keeps a bitmap within MAX_GRANULES; the finest ones are
    # favoured, as they give many data clusters.
    min_bits = max(9, (-(-size // MAX_GRANULES) - 1).bit_length())
    granularity_bits = st.one_of(st.just(min_bits), st.integers(min_bits, min(min_bits + 4, 31)),
                                 st.integers(min_bits, 31))
    bitmaps = tuple(
        BitmapSpec(
            name,
            first if first is not None and i == 0 else
            1 << draw(granularity_bits, label=f"granularity bits of {name!r}"),
            draw(st.booleans(), label="enabled"),
            tuple(draw(st.lists(st.sampled_from(KINDS), min_size=1, max_size=4),
                       label="cluster kinds")),
            draw(st.integers(0, 2**32 - 1), label="seed"),
        )
        for i, name in enumerate(names)
    )
    write = None
    if draw(st.booleans(), label="rewrite"):
        offset = draw(st.integers(0, size - 1), label="write offset")
        length = draw(st.integers(1, min(size - offset, 2 * MiB)), label="write length")
        write = (offset, length)
    return Example(cluster_size, size, bitmaps, write)


def expected_bits(ex: Example) -> dict[str, GranuleBits]:
    return {
        spec.name: random_bits(random.Random(spec.seed), ex.size, spec.granularity,
                               ex.cluster_size, spec.kinds)
        for spec in ex.bitmaps
    }


def open_qcow2(path: Path, *, read_only: bool) -> Qcow2Driver:
    drv = open_image(str(path), "qcow2", read_only=read_only)
    assert isinstance(drv, Qcow2Driver)
    return drv


def verify(ex: Example, path: Path, want: dict[str, GranuleBits], qemu_img: str) -> None:
    """The image holds exactly ``want`` (by name), as bitback and qemu-img see it."""
    drv = open_qcow2(path, read_only=True)
    try:
        loaded = {bm.name: bm for bm in drv.persistent.bitmaps}
        assert set(loaded) == set(want)
        assert not any(entry.in_use for entry in drv.persistent.entries)
        for spec in ex.bitmaps:
            got = loaded[spec.name]
            assert (got.granularity, got.enabled, got.persistent, got.inconsistent) == (
                spec.granularity, spec.enabled, True, False), spec.name
            assert got.bits == want[spec.name], spec.name
    finally:
        drv.close()
    check_image(qemu_img, path)
    listed = info_json([qemu_img], path)["format-specific"]["data"]["bitmaps"]
    assert {bm["name"]: (bm["granularity"], bm["flags"]) for bm in listed} == {
        spec.name: (spec.granularity, ["auto"] if spec.enabled else []) for spec in ex.bitmaps}


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(ex=examples())
def test_bitmaps_survive_store_and_load(ex: Example, qemu_img: str) -> None:
    note(f"{ex}")
    want = expected_bits(ex)
    with tempfile.TemporaryDirectory(prefix="bitmap-rt-") as tmp:
        path = Path(tmp) / "rt.qcow2"
        create_qcow2(str(path), ex.size, cluster_size=ex.cluster_size)
        drv = open_qcow2(path, read_only=False)
        try:
            for spec in ex.bitmaps:
                drv.persistent.check_new(spec.name, spec.granularity, "rt")
                bitmap = DirtyBitmap(ex.size, spec.granularity, spec.name,
                                     enabled=spec.enabled, persistent=True)
                bitmap.bits = want[spec.name].copy()
                drv.persistent.add(bitmap)
        finally:
            drv.close()
        verify(ex, path, want, qemu_img)

        if ex.write is None:
            return
        offset, length = ex.write
        drv = open_qcow2(path, read_only=False)
        try:
            assert all(entry.in_use for entry in drv.persistent.entries)
            drv.pwrite(offset, b"\x5a" * length)
        finally:
            drv.close()
        for spec in ex.bitmaps:
            if spec.enabled:
                want[spec.name].set_range(offset, length)
        verify(ex, path, want, qemu_img)
