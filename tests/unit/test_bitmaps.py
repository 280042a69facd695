"""Dirty bitmaps against a trivial model: a Python set of dirty granule indices.

The model never slices or searches: a granule is touched by a byte range when their byte
intervals overlap, a byte is dirty when its granule is in the set, and the SHA-256 reference
packs the set into little-endian 64-bit words by hand. The literal digests were read from
QEMU 7.2 (``x-debug-block-dirty-bitmap-sha256`` over a null-co node written with HMP
``qemu-io``), so ``GranuleBits.sha256`` is pinned to the real thing, not only to the model.
"""

from __future__ import annotations

import hashlib
import struct
import time
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from bitback.bitmaps import (
    BitmapBusyError,
    BitmapInconsistentError,
    BitmapReadOnlyError,
    BitmapStateError,
    BitmapStatus,
    DirtyBitmap,
    GranularityError,
    GranuleBits,
    check_granularity,
    default_granularity,
    granules_for,
)
from bitback.errors import InvalidArgumentError

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# ------------------------------------------------------------------------------- the model


@dataclass
class Model:
    """Dirty granule indices of a disk of ``size`` bytes at granularity ``g``."""

    size: int
    g: int
    dirty: set[int] = field(default_factory=set)

    @property
    def n(self) -> int:
        return (self.size + self.g - 1) // self.g

    def granule_bytes(self, i: int) -> tuple[int, int]:
        """Bytes of the disk granule ``i`` covers (the last one stops at the disk end)."""
        return i * self.g, min((i + 1) * self.g, self.size)

    def touched(self, offset: int, length: int) -> set[int]:
        """Granules whose bytes on the disk overlap ``[offset, offset+length)``."""
        hits: set[int] = set()
        if length <= 0:
            return hits
        for i in range(self.n):
            lo, hi = self.granule_bytes(i)
            if lo < offset + length and offset < hi:
                hits.add(i)
        return hits

    def set(self, offset: int, length: int) -> None:
        self.dirty |= self.touched(offset, length)

    def reset(self, offset: int, length: int) -> None:
        self.dirty -= self.touched(offset, length)

    def resize(self, new_size: int) -> None:
        self.size = new_size
        self.dirty = {i for i in self.dirty if i * self.g < new_size}

    def merge(self, other: Model) -> None:
        for j in other.dirty:
            lo, hi = other.granule_bytes(j)
            self.set(lo, hi - lo)

    def is_dirty_byte(self, b: int) -> bool:
        return b // self.g in self.dirty

    def extents(self, offset: int = 0, end: int | None = None) -> list[tuple[int, int]]:
        stop = self.size if end is None else min(end, self.size)
        runs: list[tuple[int, int]] = []
        for i in sorted(self.dirty):
            lo, hi = self.granule_bytes(i)
            lo, hi = max(lo, offset), min(hi, stop)
            if lo >= hi:
                continue
            if runs and runs[-1][0] + runs[-1][1] == lo:
                runs[-1] = (runs[-1][0], hi - runs[-1][0])
            else:
                runs.append((lo, hi - lo))
        return runs

    def first(self, dirty: bool, offset: int, end: int | None) -> int | None:
        stop = self.size if end is None else min(end, self.size)
        for i in range(self.n):
            if (i in self.dirty) != dirty:
                continue
            lo, hi = self.granule_bytes(i)
            lo, hi = max(lo, offset), min(hi, stop)
            if lo < hi:
                return lo
        return None

    def words(self) -> bytes:
        """QEMU's HBitmap last level: max(1, ceil(n/64)) little-endian 64-bit words."""
        nwords = max(1, (self.n + 63) // 64)
        values = [0] * nwords
        for i in self.dirty:
            values[i // 64] |= 1 << (i % 64)
        return struct.pack(f"<{nwords}Q", *values)


# ------------------------------------------------------------------------------- strategies

GRANULARITIES = [1, 8, 512, 4096, 65536]


@st.composite
def geometry(draw: st.DrawFn, granularities: list[int] = GRANULARITIES) -> tuple[int, int]:
    """(size, granularity): up to ~3 words of granules, often not a multiple of g."""
    g = draw(st.sampled_from(granularities))
    granules = draw(st.integers(0, 200))
    tail = draw(st.sampled_from([0, 1, g // 2, g - 1]))
    return granules * g + tail, g


def byte_pos(g: int, size: int) -> st.SearchStrategy[int]:
    """An offset, half the time granule-aligned, sometimes past the end of the disk."""
    top = size + 2 * g
    return st.one_of(st.integers(0, top // g).map(lambda k: k * g), st.integers(0, top))


def byte_len(g: int) -> st.SearchStrategy[int]:
    return st.one_of(
        st.integers(0, 4).map(lambda k: k * g), st.integers(0, 80 * g), st.just(1 << 62)
    )


def check_all(bits: GranuleBits, model: Model) -> None:
    assert (bits.size, bits.granularity, len(bits)) == (model.size, model.g, model.n)
    assert bits.granules() == len(model.dirty)
    assert bits.count() == len(model.dirty) * model.g
    assert bits.empty() == (not model.dirty)
    assert list(bits.dirty_extents()) == model.extents()
    assert bits.to_bytes() == model.words()
    assert bits.sha256() == hashlib.sha256(model.words()).hexdigest()


# ------------------------------------------------------------------------------- state machine


class GranuleBitsMachine(RuleBasedStateMachine):
    """Random set/reset/clear/resize/merge sequences; every query compared to the model."""

    bits: GranuleBits
    model: Model

    @initialize(geo=geometry())
    def start(self, geo: tuple[int, int]) -> None:
        size, g = geo
        self.bits = GranuleBits(size, g)
        self.model = Model(size, g)

    @rule(data=st.data())
    def set_range(self, data: st.DataObject) -> None:
        offset = data.draw(byte_pos(self.model.g, self.model.size))
        length = data.draw(byte_len(self.model.g))
        self.bits.set_range(offset, length)
        self.model.set(offset, length)

    @rule(data=st.data())
    def reset_range(self, data: st.DataObject) -> None:
        offset = data.draw(byte_pos(self.model.g, self.model.size))
        length = data.draw(byte_len(self.model.g))
        self.bits.reset_range(offset, length)
        self.model.reset(offset, length)

    @rule()
    def clear(self) -> None:
        self.bits.clear()
        self.model.dirty.clear()

    @rule()
    def set_all(self) -> None:
        self.bits.set_all()
        self.model.dirty = set(range(self.model.n))

    @rule(data=st.data())
    def resize(self, data: st.DataObject) -> None:
        g = self.model.g
        new_size = data.draw(st.one_of(st.integers(0, 200 * g), byte_pos(g, self.model.size)))
        self.bits.resize(new_size)
        self.model.resize(new_size)

    @rule(data=st.data())
    def merge(self, data: st.DataObject) -> None:
        same = data.draw(st.booleans())
        size, g = data.draw(geometry([self.model.g] if same else GRANULARITIES))
        other, other_model = GranuleBits(size, g), Model(size, g)
        for _ in range(data.draw(st.integers(0, 4))):
            offset, length = data.draw(byte_pos(g, size)), data.draw(byte_len(g))
            other.set_range(offset, length)
            other_model.set(offset, length)
        before = other.copy()
        self.bits.merge(other)
        self.model.merge(other_model)
        assert other == before  # the source is left alone

    @rule()
    def copy_and_assign(self) -> None:
        twin = self.bits.copy()
        assert twin == self.bits
        twin.set_all()
        twin.assign(self.bits)
        assert twin == self.bits
        if len(twin):
            twin.clear()
            assert twin.empty()  # independent storage
            assert self.bits.granules() == len(self.model.dirty)

    @rule()
    def bytes_round_trip(self) -> None:
        data = self.bits.to_bytes()
        assert GranuleBits.from_bytes(data, self.bits.size, self.bits.granularity) == self.bits

    @rule(data=st.data())
    def queries(self, data: st.DataObject) -> None:
        g, size = self.model.g, self.model.size
        offset = data.draw(byte_pos(g, size))
        end = data.draw(st.one_of(st.none(), byte_pos(g, size)))
        assert self.bits.next_dirty(offset, end) == self.model.first(True, offset, end)
        assert self.bits.next_clean(offset, end) == self.model.first(False, offset, end)
        extents = self.model.extents(offset, end)
        assert list(self.bits.dirty_extents(offset, end)) == extents
        assert self.bits.next_dirty_area(offset, end) == (extents[0] if extents else None)
        max_length = data.draw(st.integers(1, 5 * g))
        expected = (extents[0][0], min(extents[0][1], max_length)) if extents else None
        assert self.bits.next_dirty_area(offset, end, max_length) == expected
        if offset < size:
            assert self.bits.get(offset) == self.model.is_dirty_byte(offset)

    @invariant()
    def agrees_with_model(self) -> None:
        if hasattr(self, "bits"):
            check_all(self.bits, self.model)


TestGranuleBitsMachine = GranuleBitsMachine.TestCase
TestGranuleBitsMachine.settings = settings(max_examples=40, stateful_step_count=20, deadline=None)


# ------------------------------------------------------------------------------- examples


SEED_WRITES = [(0, 512), (16 * MiB, 256 * KiB), (32736 * KiB, 64 * KiB)]


@pytest.mark.parametrize(
    ("granularity", "count"), [(65536, 458752), (32768, 360448), (131072, 655360)]
)
def test_seed_counts(granularity: int, count: int) -> None:
    """Spec 5.2: the seed's three writes counted at three granularities (QEMU 7.2 measured)."""
    bitmap = DirtyBitmap(64 * MiB, granularity, "bitmap0")
    for offset, length in SEED_WRITES:
        bitmap.mark(offset, length)
    assert bitmap.count() == count


def test_seed_extents_and_second_batch() -> None:
    bits = GranuleBits(64 * MiB, 65536)
    for offset, length in SEED_WRITES:
        bits.set_range(offset, length)
    assert list(bits.dirty_extents()) == [
        (0, 65536),
        (16 * MiB, 4 * 65536),
        (32 * MiB - 64 * KiB, 2 * 65536),
    ]
    bits.clear()
    for offset, length in [(0, 512), (8 * MiB, 352 * KiB), (15872 * KiB, 1 * MiB)]:
        bits.set_range(offset, length)
    assert bits.count() == 1507328  # 1 + 6 + 16 granules


def test_count_is_not_clipped_to_the_disk() -> None:
    """Spec 5.2: 64 MiB + 512 B disk, 64k granules, last 512 bytes written -> 65536."""
    bits = GranuleBits(64 * MiB + 512, 65536)
    bits.set_range(64 * MiB, 512)
    assert bits.count() == 65536
    bits.set_range(0, 1)
    assert bits.count() == 2 * 65536
    assert list(bits.dirty_extents()) == [(0, 65536), (64 * MiB, 512)]


# Digests read from QEMU 7.2 (x-debug-block-dirty-bitmap-sha256) for the same writes.
QEMU_DIGESTS = [
    (64 * MiB, 65536, [], "38723a2e5e8a17aa7950dc008209944e898f69a7bd10a23c839d341e935fd5ca"),
    (
        64 * MiB,
        65536,
        SEED_WRITES,
        "b989ff83b290b7753a3d4e47a0ac769cb190bb0949f49a873eb2f67eb254a66b",
    ),
    (
        64 * MiB + 512,
        65536,
        [(64 * MiB, 512)],
        "12d40c9cc5d4f4d3b709e508d087083d9938384b326a1753325212af3e19d717",
    ),
    (512, 512, [], "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc"),
    (0, 65536, [], "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc"),
    (
        (1 << 41) + 512,
        65536,
        [(1 << 41, 512)],
        "b65afa13c02b877a387365e951c231967bc2a0497e68db1e0138f10791085b1c",
    ),
]


@pytest.mark.parametrize(("size", "granularity", "writes", "digest"), QEMU_DIGESTS)
def test_sha256_matches_qemu(
    size: int, granularity: int, writes: list[tuple[int, int]], digest: str
) -> None:
    bits = GranuleBits(size, granularity)
    for offset, length in writes:
        bits.set_range(offset, length)
    assert bits.sha256() == digest


def test_sha256_hand_computed() -> None:
    """The layout spelled out: words of 64 granules, bit i%64 of word i//64, little-endian."""
    assert GranuleBits(64 * MiB, 65536).sha256() == hashlib.sha256(bytes(128)).hexdigest()
    bits = GranuleBits(64 * MiB, 65536)
    for offset, length in SEED_WRITES:
        bits.set_range(offset, length)
    words = [0] * 16
    words[0] = 1  # granule 0
    words[4] = 0xF  # granules 256..259
    words[7] = 1 << 63  # granule 511
    words[8] = 1  # granule 512
    assert bits.to_bytes() == struct.pack("<16Q", *words)
    assert bits.sha256() == hashlib.sha256(struct.pack("<16Q", *words)).hexdigest()
    # Empty disks and disks of a few granules still hash one whole word.
    assert GranuleBits(0, 512).to_bytes() == bytes(8)
    assert len(GranuleBits(1025 * 65536, 65536).to_bytes()) == 136


def test_from_bytes_contract() -> None:
    bits = GranuleBits.from_bytes(b"\x81\xff", 10 * 512, 512)  # bits past granule 9 ignored
    assert list(bits.dirty_extents()) == [(0, 512), (7 * 512, 3 * 512)]
    with pytest.raises(InvalidArgumentError):
        GranuleBits.from_bytes(b"\x00", 9 * 512, 512)


def test_searches_never_go_below_offset() -> None:
    bits = GranuleBits(320 * KiB + 1, 65536)
    bits.set_range(64 * KiB, 128 * KiB)
    bits.set_range(320 * KiB, 1)
    assert list(bits.dirty_extents()) == [(65536, 131072), (327680, 1)]
    assert bits.next_dirty(0) == 65536
    assert bits.next_dirty(70000) == 70000
    assert bits.next_clean(70000) == 192 * KiB
    assert bits.next_clean(10) == 10
    assert bits.next_dirty(200 * KiB, 320 * KiB) is None
    assert bits.next_clean(320 * KiB) is None
    assert bits.next_dirty(bits.size) is None
    assert bits.next_dirty_area(70000, max_length=1000) == (70000, 1000)
    assert list(bits.dirty_extents(100 * KiB, 150 * KiB)) == [(100 * KiB, 50 * KiB)]


def test_reset_range_semantics() -> None:
    """Aligned resets clear what they cover; an unaligned one clears every touched granule."""
    bits = GranuleBits(4 * 65536 + 512, 65536)
    bits.set_all()
    bits.reset_range(65536, 65536)
    assert list(bits.dirty_extents()) == [(0, 65536), (2 * 65536, 2 * 65536 + 512)]
    bits.reset_range(4 * 65536, 512)  # the short last granule: aligned start, ends at the end
    assert bits.next_dirty(4 * 65536) is None
    bits.reset_range(2 * 65536 + 100, 1)
    assert list(bits.dirty_extents()) == [(0, 65536), (3 * 65536, 65536)]


def test_bad_ranges_are_refused() -> None:
    bits = GranuleBits(MiB, 65536)
    for call in (
        lambda: bits.set_range(-1, 10),
        lambda: bits.reset_range(0, -1),
        lambda: bits.next_dirty(-1),
        lambda: bits.get(MiB),
        lambda: bits.next_dirty_area(0, None, 0),
        lambda: GranuleBits(MiB, 3),
        lambda: GranuleBits(-1, 512),
        lambda: bits.assign(GranuleBits(2 * MiB, 65536)),
    ):
        with pytest.raises(InvalidArgumentError):
            call()
    bits.set_range(MiB, 1)  # wholly past the end: nothing
    bits.set_range(0, 0)
    assert bits.empty()


def test_resize_as_measured_on_qemu() -> None:
    """Spec 5.7: grow 64M -> 65M, write 64M 64k -> exactly granule 1024; shrink drops bits."""
    bits = GranuleBits(64 * MiB, 65536)
    bits.set_range(64 * MiB - 1, 1)
    bits.resize(65 * MiB)
    assert bits.count() == 65536
    bits.set_range(64 * MiB, 64 * KiB)
    assert list(bits.dirty_extents(64 * MiB)) == [(64 * MiB, 65536)]
    bits.resize(64 * MiB + 512)  # granule 1024 still starts before the end: kept
    assert bits.get(64 * MiB)
    bits.resize(64 * MiB)  # now it starts at the end: dropped
    bits.resize(65 * MiB)
    assert not bits.get(64 * MiB)
    assert bits.count() == 65536


# ------------------------------------------------------------------------------- scale


def test_large_disks_never_loop_over_granules() -> None:
    """Every operation here would take well over 10 s if it stepped through granules in Python.

    64 GiB at 512-byte granularity is 2**27 granules (16 MiB of bits); marking 60 GiB touches
    126 million of them.
    """
    started = time.monotonic()
    size = 64 * GiB
    bits = GranuleBits(size, 512)
    bits.set_range(1 * GiB + 100, 60 * GiB)
    assert bits.count() == (60 * GiB // 512 + 1) * 512
    assert bits.next_dirty(0) == 1 * GiB
    assert bits.next_clean(1 * GiB) == 61 * GiB + 512
    assert list(bits.dirty_extents()) == [(1 * GiB, 60 * GiB + 512)]
    bits.reset_range(2 * GiB, 1 * GiB)
    assert bits.next_dirty_area(1 * GiB) == (1 * GiB, 1 * GiB)
    twin = bits.copy()
    twin.resize(size + 512)
    twin.set_range(size, 512)
    bits.merge(twin)  # same granularity, one more granule in the source: clipped
    assert bits.count() == twin.count() - 512
    assert len(bits.sha256()) == 64
    bits.clear()
    assert bits.empty() and bits.next_dirty(0) is None
    assert time.monotonic() - started < 5.0


def test_two_tib_plus_a_sector() -> None:
    """2**41 + 512 bytes at 64 KiB: 2**25 + 1 granules, the last covering the final sector."""
    size = (1 << 41) + 512
    bits = DirtyBitmap(size, 65536, "big")
    assert granules_for(size, 65536) == (1 << 25) + 1
    bits.mark(size - 512, 512)
    bits.mark(1 << 40, 1 * GiB)
    assert bits.count() == 65536 + GiB
    assert list(bits.bits.dirty_extents()) == [(1 << 40, GiB), (1 << 41, 512)]
    assert bits.bits.next_clean(1 << 41) is None
    coarse = GranuleBits(size, 1 << 30)
    coarse.set_range(0, 1)
    bits.bits.merge(coarse)  # other granularity: merged by extents
    assert bits.count() == 65536 + 2 * GiB
    bits.resize(1 << 41)
    assert bits.count() == 2 * GiB


# ------------------------------------------------------------------------------- granularity


@pytest.mark.parametrize("granularity", [512, 1024, 4096, 65536, 1 << 31])
def test_granularity_accepted(granularity: int) -> None:
    check_granularity(granularity)
    assert DirtyBitmap(MiB, granularity).granularity == granularity


@pytest.mark.parametrize("granularity", [0, 1, 256, 64000, 65535, 1 << 32, -512])
def test_granularity_refused(granularity: int) -> None:
    with pytest.raises(
        GranularityError, match=r"^Granularity must be power of 2 and at least 512$"
    ):
        check_granularity(granularity)
    with pytest.raises(InvalidArgumentError):
        DirtyBitmap(MiB, granularity)


@pytest.mark.parametrize(
    ("cluster_size", "granularity"),
    [
        (None, 65536),
        (0, 65536),
        (512, 4096),
        (4096, 4096),
        (65536, 65536),
        (131072, 65536),
        (2 * MiB, 65536),
        (16384, 16384),
    ],
)
def test_default_granularity(cluster_size: int | None, granularity: int) -> None:
    assert default_granularity(cluster_size) == granularity


# ------------------------------------------------------------------------------- DirtyBitmap


def test_status_order_and_recording() -> None:
    """inconsistent > frozen > locked > disabled > active; recording follows the successor."""
    bitmap = DirtyBitmap(MiB, 65536, "b")

    def seen() -> tuple[str, bool]:
        return bitmap.status.value, bitmap.recording

    assert seen() == ("active", True)
    bitmap.enabled = False
    assert seen() == ("disabled", False)
    bitmap.busy = True
    assert seen() == ("locked", False)
    bitmap.busy = False
    bitmap.enabled = True
    bitmap.create_successor()
    assert seen() == ("frozen", True) and bitmap.frozen
    bitmap.inconsistent = True
    assert seen() == ("inconsistent", True)
    assert BitmapStatus("frozen") is BitmapStatus.FROZEN
    fresh = DirtyBitmap(MiB, 65536, "c", persistent=True)
    fresh.mark_inconsistent()
    assert (fresh.status, fresh.recording, fresh.enabled) == ("inconsistent", False, False)


def test_info_shape() -> None:
    bitmap = DirtyBitmap(64 * MiB, 65536, "bitmap0")
    for offset, length in SEED_WRITES:
        bitmap.mark(offset, length)
    info = bitmap.info()
    assert info == {
        "name": "bitmap0",
        "count": 458752,
        "granularity": 65536,
        "status": "active",
        "recording": True,
        "busy": False,
        "persistent": False,
    }
    # QEMU 7.2 printed name, recording, persistent, busy, granularity, count (QDict order).
    keys = [k for k in info if k != "status"]
    assert keys == ["name", "recording", "persistent", "busy", "granularity", "count"]
    successor = bitmap.create_successor()
    assert "name" not in successor.info()
    assert bitmap.info()["status"] == "frozen" and bitmap.info()["busy"] is True
    bitmap.inconsistent = True
    assert list(bitmap.info())[-1] == "inconsistent" and bitmap.info()["inconsistent"] is True


def test_mark_ignores_disabled_bitmaps() -> None:
    bitmap = DirtyBitmap(MiB, 65536, "b", enabled=False)
    bitmap.mark(0, MiB)
    assert bitmap.count() == 0
    bitmap.enabled = True
    bitmap.mark(0, 1)
    assert bitmap.count() == 65536


def test_check_usable_texts_and_order() -> None:
    bitmap = DirtyBitmap(MiB, 65536, "bitmap0")
    bitmap.check_usable()
    bitmap.readonly = True
    bitmap.check_usable(for_write=False)
    with pytest.raises(
        BitmapReadOnlyError, match=r"^Bitmap 'bitmap0' is readonly and cannot be modified$"
    ):
        bitmap.check_usable()
    bitmap.inconsistent = True
    with pytest.raises(BitmapInconsistentError) as excinfo:
        bitmap.check_usable(for_write=False)
    assert str(excinfo.value) == "Bitmap 'bitmap0' is inconsistent and cannot be used"
    assert excinfo.value.bitmap == "bitmap0"
    bitmap.busy = True  # busy is reported first
    with pytest.raises(BitmapBusyError) as busy:
        bitmap.check_usable()
    assert str(busy.value) == (
        "Bitmap 'bitmap0' is currently in use by another operation and cannot be used"
    )
    assert isinstance(busy.value, InvalidArgumentError)


def test_successor_protocol_errors() -> None:
    bitmap = DirtyBitmap(MiB, 65536, "b")
    with pytest.raises(BitmapStateError, match="no successor present"):
        bitmap.abdicate()
    with pytest.raises(BitmapStateError, match="none is present"):
        bitmap.reclaim()
    successor = bitmap.create_successor()
    assert (successor.name, successor.granularity, successor.size) == (None, 65536, MiB)
    with pytest.raises(BitmapBusyError, match="currently in use"):
        bitmap.create_successor()
    bitmap.busy = False  # frozen without busy cannot happen through the API; still refused
    with pytest.raises(BitmapBusyError, match="already has one"):
        bitmap.create_successor()


def test_resize_follows_successor() -> None:
    bitmap = DirtyBitmap(MiB, 65536, "b")
    successor = bitmap.create_successor()
    bitmap.resize(2 * MiB)
    assert (bitmap.size, successor.size) == (2 * MiB, 2 * MiB)


@st.composite
def writes(draw: st.DrawFn, size: int) -> list[tuple[int, int]]:
    return draw(st.lists(st.tuples(st.integers(0, size), st.integers(0, size // 4)), max_size=6))


@settings(max_examples=80, deadline=None)
@given(
    before=writes(40 * 4096),
    during=writes(40 * 4096),
    after=writes(40 * 4096),
    succeed=st.booleans(),
    enabled=st.booleans(),
)
def test_successor_protocol(
    before: list[tuple[int, int]],
    during: list[tuple[int, int]],
    after: list[tuple[int, int]],
    succeed: bool,
    enabled: bool,
) -> None:
    """Freeze, keep writing through the node, then abdicate (B := S) or reclaim (B := B | S)."""
    size, g = 40 * 4096 + 100, 4096
    bitmap = DirtyBitmap(size, g, "b", enabled=True)
    old, new = Model(size, g), Model(size, g)
    for offset, length in before:
        bitmap.mark(offset, length)
        old.set(offset, length)
    bitmap.enabled = enabled
    snapshot = bitmap.bits.copy()
    successor = bitmap.create_successor()
    assert (bitmap.busy, bitmap.frozen, bitmap.enabled) == (True, True, False)
    assert bitmap.recording == enabled == successor.enabled
    node = [bitmap, successor]  # the block layer marks every bitmap of the node
    for offset, length in during:
        for each in node:
            each.mark(offset, length)
        if enabled:
            new.set(offset, length)
    assert bitmap.bits == snapshot  # frozen: unchanged while the job runs
    returned = bitmap.abdicate() if succeed else bitmap.reclaim()
    assert returned is successor
    expected = set(new.dirty) if succeed else old.dirty | new.dirty
    assert bitmap.count() == len(expected) * g
    check_all(bitmap.bits, Model(size, g, set(expected)))
    assert (bitmap.busy, bitmap.frozen, bitmap.successor) == (False, False, None)
    assert bitmap.enabled == enabled and bitmap.status == ("active" if enabled else "disabled")
    for offset, length in after:  # recording again exactly when the successor was
        bitmap.mark(offset, length)
        if enabled:
            expected |= Model(size, g).touched(offset, length)
    assert bitmap.count() == len(expected) * g
