"""The qcow2 consistency checker and repairer behind ``bitback-img check``.

``check_qcow2(path, repair=None | "leaks" | "all")`` works on the image file itself and gives
a :class:`CheckResult` whose counters, messages, human text, JSON and exit code are those of
QEMU 7.2's ``qemu-img check`` on the same image. A check is QEMU's sequence::

    1. count references          (check_scan: every table, every cluster, in QEMU's order)
    2. compare with stored refcounts -> "Leaked cluster" / "ERROR cluster" lines
    3. repair: fix refcounts in place, or rebuild the refcount structure when it is broken
    4. check OFLAG_COPIED on the active L1/L2 tables (repairable)
    5. after any repair: check again, read-only, and report that second result

The comparison and the COPIED check are vectorised over numpy arrays; only mismatches become
Python objects. The pieces::

    check.py         this file: the passes, the comparison, OFLAG_COPIED
    check_image.py   the file: open-time validation, zero-filled reads, stored refcounts
    check_scan.py    step 1, the expected refcounts
    check_result.py  CheckResult and qemu-img's renderings of it
    repair.py        the writes of steps 3 and 4, in an order that is safe at every instant
"""

from __future__ import annotations

import errno
import os
from copy import copy
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from bitback.block.drivers.qcow2.check_image import (
    INCOMPAT_FIELD_OFFSET,
    CheckImage,
    Snapshot,
    StoredRefcounts,
    read_snapshots,
)
from bitback.block.drivers.qcow2.check_result import CheckResult
from bitback.block.drivers.qcow2.check_scan import (
    CheckFailed,
    ClusterCounts,
    Counters,
    Messages,
    ReferenceScan,
    c_hex,
)
from bitback.block.drivers.qcow2.repair import (
    OverlapGuard,
    apply_refcount_updates,
    drop_bitmaps_extension,
    mark_clean,
    rebuild_refcount_structure,
    write_entries,
)
from bitback.errors import InvalidArgumentError
from bitback.formats.qcow2.entries import COPIED, L1_OFFSET_MASK, L2_OFFSET_MASK, ClusterKind
from bitback.formats.qcow2.entries import classify as classify_entries
from bitback.formats.qcow2.header import EXT_BITMAPS, INCOMPAT_CORRUPT

__all__ = ["CheckResult", "check_qcow2"]

Repair = Literal["leaks", "all"]

_INT_MAX = 0x7FFF_FFFF
_BATCH_BYTES = 4 << 20


# -- the check ------------------------------------------------------------------------------


def check_qcow2(path: str, *, repair: Repair | None = None) -> CheckResult:
    """Check (and optionally repair) the qcow2 image at ``path``, as ``qemu-img check [-r]``.

    ``repair="leaks"`` lowers refcounts that are too high; ``"all"`` also raises refcounts
    that are too low, fixes COPIED flags and rebuilds broken refcount structures. After any
    repair the image is checked again and that result is returned, with the fixed counts.
    Raises :class:`ImageFormatError` / :class:`UnsupportedFeatureError` (one-line message)
    when the image cannot be opened at all, as qemu-img's "Could not open" does.
    """
    if repair not in (None, "leaks", "all"):
        raise InvalidArgumentError(f"Unknown option for -r: {repair!r}")
    with CheckImage(path, writable=repair is not None) as img:
        session = _Session(img)
        first = session.run_pass(fix_leaks=repair is not None, fix_errors=repair == "all")
        _join_unterminated(first.lines, len(img.warnings))
        if first.failure is not None or not (first.res.corruptions_fixed or first.res.leaks_fixed):
            return first.result(path)
        second = session.run_pass(fix_leaks=False, fix_errors=False)
        second.res.corruptions_fixed = first.res.corruptions_fixed
        second.res.leaks_fixed = first.res.leaks_fixed
        return replace(
            second.result(path),
            messages=first.lines + second.lines,
            recheck_from=len(first.lines),
        )


def _join_unterminated(lines: list[str], warnings: int) -> None:
    """QEMU prints its last open warning without a newline: the next line continues it."""
    if warnings and len(lines) > warnings and lines[warnings - 1].startswith("Some clusters"):
        lines[warnings - 1 : warnings + 1] = [lines[warnings - 1] + lines[warnings]]


@dataclass
class _Pass:
    """The outcome of one run of QEMU's qcow2_co_check."""

    res: Counters
    lines: list[str]
    total_clusters: int
    image_end_offset: int = 0
    failure: int | None = None

    def result(self, path: str) -> CheckResult:
        r = self.res
        return CheckResult(
            filename=path,
            check_errors=r.check_errors,
            corruptions=r.corruptions,
            leaks=r.leaks,
            corruptions_fixed=r.corruptions_fixed,
            leaks_fixed=r.leaks_fixed,
            image_end_offset=self.image_end_offset,
            total_clusters=self.total_clusters,
            allocated_clusters=r.allocated_clusters,
            fragmented_clusters=r.fragmented_clusters,
            compressed_clusters=r.compressed_clusters,
            messages=self.lines,
            failure=None if self.failure is None else os.strerror(self.failure),
        )


class _Session:
    """One open image checked once or twice (QEMU keeps one BlockDriverState for both)."""

    def __init__(self, img: CheckImage) -> None:
        self.img = img
        self.stored = StoredRefcounts(img)
        self.signaled = False  # QEMU reports a corruption event once per open
        self.dead = False  # a write was refused: QEMU makes the image unusable, so do we
        self.guard: OverlapGuard | None = None
        # Stored refcounts (and unreadable masks) the last comparison read, per counts chunk.
        self.windows: dict[int, tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]] = {}
        self.open_warnings = list(img.warnings)

    def run_pass(self, *, fix_leaks: bool, fix_errors: bool) -> _Pass:
        """QEMU's qcow2_co_check: count, compare, repair, COPIED; never raises CheckFailed."""
        img = self.img
        res = Counters()
        lines, self.open_warnings = self.open_warnings, []
        p = _Pass(res, lines, -(-(img.header.size // 512 * 512) // img.cluster_size))
        try:
            self._run(p, fix_leaks=fix_leaks, fix_errors=fix_errors)
        except CheckFailed as exc:
            p.failure = exc.errno
        return p

    def _run(self, p: _Pass, *, fix_leaks: bool, fix_errors: bool) -> None:
        img, res, lines = self.img, p.res, p.lines
        snapshots, snapshots_size = read_snapshots(img)
        if img.nb_clusters > _INT_MAX:
            res.check_errors += 1
            raise CheckFailed(errno.EFBIG)
        if fix_leaks:
            self.guard = OverlapGuard(img, self.stored.reftable, snapshots, snapshots_size)
        scan = self._scan(snapshots, snapshots_size, res, lines, fix_errors=fix_errors)
        pre = copy(res)
        highest, rebuild, _ = self.compare(scan, res, lines)
        rebuild = rebuild or scan.rebuild
        if rebuild and fix_errors:
            old = copy(res)
            lines.append("Rebuilding refcount structure")
            rebuild_refcount_structure(
                img, self.stored, scan.counts.dense(scan.n_mem), avoid=scan.uncounted
            )
            self.guard = OverlapGuard(img, self.stored.reftable, snapshots, snapshots_size)
            res.corruptions = res.leaks = 0
            scan = self._scan(snapshots, snapshots_size, res, lines, fix_errors=False)
            fresh = Counters()  # the old structures are leaks now: free them
            highest, still_broken, updates = self.compare(scan, fresh, lines, fix_leaks=True)
            if still_broken:
                lines.append("ERROR rebuilt refcount structure is still broken")
            self._apply(updates)
            res.corruptions_fixed += max(0, old.corruptions - res.corruptions)
            res.leaks_fixed += max(0, old.leaks - res.leaks)
            res.leaks += fresh.leaks
        elif fix_leaks:
            if rebuild:
                lines.append("ERROR need to rebuild refcount structures")
                res.check_errors += 1
                raise CheckFailed(errno.EIO)
            if res.leaks or res.corruptions:
                res = p.res = pre
                highest, _, updates = self.compare(
                    scan, res, lines, fix_leaks=True, fix_errors=fix_errors
                )
                self._apply(updates)
        p.image_end_offset = (highest + 1) * img.cluster_size
        self.check_copied(res, lines, fix_leaks=fix_leaks, fix_errors=fix_errors)
        if fix_leaks and not res.check_errors and not res.corruptions:
            mark_clean(img)

    def _scan(
        self,
        snapshots: list[Snapshot],
        snapshots_size: int,
        res: Counters,
        lines: list[str],
        *,
        fix_errors: bool,
    ) -> ReferenceScan:
        msgs = Messages()
        scan = ReferenceScan(self.img, res, msgs, fix_errors=fix_errors, may_write=self.may_write)
        try:
            scan.run(snapshots, snapshots_size, self.stored)
        finally:
            lines += msgs.lines()
        return scan

    # -- writes and corruption events -------------------------------------------------------

    def may_write(
        self, offset: int, length: int, ignore: frozenset[str]
    ) -> tuple[bool, str | None]:
        """Whether a repair may write there, and the corruption line to print if it may not.

        A refused write marks the image corrupt (as QEMU does) and no later write happens.
        """
        if self.dead:
            return False, None
        name = self.guard.overlap(offset, length, ignore) if self.guard else None
        if name is None:
            return True, None
        self.dead = True
        return False, self._signal(f"Preventing invalid write on metadata (overlaps with {name})")

    def _signal(self, what: str) -> str | None:
        """QEMU's qcow2_signal_corruption: the line to print (first event only)."""
        if self.signaled:
            return None
        self.signaled = True
        if not self.img.writable:
            return (f"qcow2: Image is corrupt: {what}; further non-fatal corruption events will "
                    "be suppressed")
        h = self.img.header
        if h.version >= 3 and not h.incompatible_features & INCOMPAT_CORRUPT:
            features = h.incompatible_features | INCOMPAT_CORRUPT
            write_entries(self.img, [(INCOMPAT_FIELD_OFFSET, features)])
            self.img.header = replace(h, incompatible_features=features)
        return (f"qcow2: Marking image as corrupt: {what}; further corruption events will be "
                "suppressed")

    def _unreadable_block(self, lines: list[str], block: int) -> None:
        line = self._signal(f"Refblock offset {c_hex(self.stored.block_offset(block))} unaligned "
                            f"(reftable index: {c_hex(block)})")
        if line:
            lines.append(line)

    def _apply(self, updates: dict[int, int]) -> None:
        """Write refcount fixes (unlinking an ignored bitmaps extension first)."""
        if not updates:
            return
        if self.img.bitmaps is None and self.img.header.extension(EXT_BITMAPS) is not None:
            drop_bitmaps_extension(self.img)  # nothing may point at the clusters we free
        apply_refcount_updates(self.stored, updates)
        chunk = ClusterCounts.CHUNK
        for cluster, value in updates.items():
            self.windows[cluster // chunk][0][cluster % chunk] = value

    # -- comparison -------------------------------------------------------------------------

    def compare(
        self,
        scan: ReferenceScan,
        res: Counters,
        lines: list[str],
        *,
        fix_leaks: bool = False,
        fix_errors: bool = False,
    ) -> tuple[int, bool, dict[int, int]]:
        """Compare stored with expected refcounts (QEMU's compare_refcounts).

        Returns the highest cluster in use, whether the refcount structure must be rebuilt
        (a referenced cluster has refcount 0) and the refcount updates to apply. Only
        windows of clusters with references or refcount blocks are read.
        """
        n = scan.n_mem
        chunk = ClusterCounts.CHUNK
        self.windows = {}
        highest = 0
        odd: list[tuple[int, bool, int]] = []  # (cluster, unreadable, stored refcount)
        for w in range(-(-n // chunk)):
            lo, hi = w * chunk, min(n, (w + 1) * chunk)
            counted = scan.counts.chunks.get(w)
            if counted is None and not self.stored.any_block(lo, hi):
                continue  # nothing referenced, nothing stored: all zero
            stored, bad = self.stored.range(lo, hi)
            self.windows[w] = (stored, bad)
            referenced = (  # counts saturate at the refcount maximum: the cast is exact
                np.zeros(hi - lo, stored.dtype) if counted is None
                else counted[: hi - lo].astype(stored.dtype)
            )
            in_use = np.flatnonzero(((stored != 0) | (referenced != 0)) & ~bad)
            if in_use.size:
                highest = lo + int(in_use[-1])
            for k in np.flatnonzero(bad | (stored != referenced)).tolist():
                odd.append((lo + k, bool(bad[k]), int(stored[k])))
        rebuild = False
        updates: dict[int, int] = {}
        for i, unreadable, have in odd:
            if unreadable:
                self._unreadable_block(lines, i // self.stored.block_entries)
                lines.append(f"Can't get refcount for cluster {i}: Input/output error")
                res.check_errors += 1
                continue
            want = scan.counts.at(i)
            fixed = False
            if have == 0:
                rebuild = True  # no refcount block to fix it in, or a block QEMU distrusts
            elif have > want:  # never free what a table running past EOF still covers
                fixed = fix_leaks and not (want == 0 and scan.in_use_uncounted(i))
            else:
                fixed = fix_errors
            lines.append(f"{'Repairing' if fixed else 'ERROR' if have < want else 'Leaked'} "
                         f"cluster {i} refcount={have} reference={want}")
            if fixed:
                block = self.stored.block_offset(i // self.stored.block_entries)
                fixed, line = self.may_write(block, self.img.cluster_size, _OWN_REFBLOCK)
                if line:
                    lines.append(line)
            if fixed:
                updates[i] = want
                if have > want:
                    res.leaks_fixed += 1
                else:
                    res.corruptions_fixed += 1
            elif have < want:
                res.corruptions += 1
            else:
                res.leaks += 1
        return highest, rebuild, updates

    # -- OFLAG_COPIED -----------------------------------------------------------------------

    def check_copied(
        self, res: Counters, lines: list[str], *, fix_leaks: bool, fix_errors: bool
    ) -> None:
        """COPIED must be set exactly on active L1/L2 entries whose cluster has refcount 1.

        Mismatches are found batch by batch; their messages and fixes then go L1 entry by
        L1 entry, as QEMU's do (it stops at the first write it has to refuse).
        """
        img = self.img
        h = img.header
        # With -r leaks QEMU repairs the flags only when the refcounts are now trustworthy.
        repair = fix_errors or (fix_leaks and not (res.check_errors or res.corruptions
                                                   or res.leaks))
        verb = "Repairing" if repair else "ERROR"
        l1 = img.read_table(h.l1_table_offset, h.l1_size)
        l2_offsets = l1 & np.uint64(L1_OFFSET_MASK)
        used = np.flatnonzero(l2_offsets)
        batch = max(1, _BATCH_BYTES // img.cluster_size)
        for start in range(0, used.size, batch):
            idx = used[start : start + batch]
            offsets = l2_offsets[idx]
            found: dict[int, tuple[int | None, list[tuple[int, int, int]]]] = {}
            refcounts, ok = self._lookup(offsets >> np.uint64(img.cluster_bits), lines)
            for k in _mismatches(l1[idx], refcounts, ok):
                found[int(idx[k])] = (int(refcounts[k]), [])
            inside = np.flatnonzero(offsets < np.uint64(img.file_len))
            if inside.size:
                self._l2_mismatches(idx[inside], offsets[inside], found, lines)
            for i in sorted(found):
                l1_rc, data = found[i]
                self._copied_entry(res, lines, i, int(l1[i]), l1_rc, data, verb, repair)

    def _l2_mismatches(
        self,
        l1_index: np.ndarray[Any, Any],
        l2_offsets: np.ndarray[Any, Any],
        found: dict[int, tuple[int | None, list[tuple[int, int, int]]]],
        lines: list[str],
    ) -> None:
        """Add (entry index, entry, refcount) of each wrong data entry to ``found``."""
        tables = self.img.read_tables(l2_offsets)
        kinds = classify_entries(tables)
        rows, cols = np.nonzero((kinds == ClusterKind.NORMAL) | (kinds == ClusterKind.ZERO_ALLOC))
        entries = tables[rows, cols]
        clusters = (entries & np.uint64(L2_OFFSET_MASK)) >> np.uint64(self.img.cluster_bits)
        refcounts, ok = self._lookup(clusters, lines)
        for k in _mismatches(entries, refcounts, ok):
            i = int(l1_index[rows[k]])
            found.setdefault(i, (None, []))[1].append(
                (int(cols[k]), int(entries[k]), int(refcounts[k]))
            )

    def _copied_entry(
        self,
        res: Counters,
        lines: list[str],
        i: int,
        l1_entry: int,
        l1_refcount: int | None,
        data: list[tuple[int, int, int]],
        verb: str,
        repair: bool,
    ) -> None:
        """Report and (if ``repair``) fix the COPIED flags of one L1 entry and its L2 table."""
        h = self.img.header
        if l1_refcount is not None:
            lines.append(f"{verb} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1_entry:x} "
                         f"refcount={l1_refcount}")
            res.corruptions += 1
            if repair:  # QEMU rewrites the 512-byte sector of the L1 table holding the entry
                sector = h.l1_table_offset + 8 * (i // 64 * 64)
                self._write_or_fail(res, lines, sector, 512, _OWN_L1, None)
                write_entries(self.img, [(h.l1_table_offset + 8 * i,
                                          _fixed_copied(l1_entry, l1_refcount))])
                res.corruptions -= 1
                res.corruptions_fixed += 1
        l2_offset = l1_entry & L1_OFFSET_MASK
        for _, entry, refcount in data:
            lines.append(f"{verb} OFLAG_COPIED data cluster: l2_entry={entry:x} "
                         f"refcount={refcount}")
        res.corruptions += len(data)
        if repair and data:
            self._write_or_fail(res, lines, l2_offset, self.img.cluster_size, _OWN_L2,
                                "ERROR: Could not write L2 table; metadata overlap check failed: "
                                "Input/output error")
            write_entries(self.img, [(l2_offset + 8 * j, _fixed_copied(entry, rc))
                                     for j, entry, rc in data])
            res.corruptions -= len(data)
            res.corruptions_fixed += len(data)

    def _write_or_fail(
        self,
        res: Counters,
        lines: list[str],
        offset: int,
        length: int,
        own: frozenset[str],
        error: str | None,
    ) -> None:
        """Pass the overlap check, or count an error and fail the check like QEMU."""
        ok, line = self.may_write(offset, length, own)
        if ok:
            return
        if line:
            lines.append(line)
        if error:
            lines.append(error)
        res.check_errors += 1
        raise CheckFailed(errno.EIO)

    def _lookup(
        self, clusters: np.ndarray[Any, Any], lines: list[str]
    ) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        """Stored refcounts of ``clusters`` (from the compared windows where possible)."""
        values = np.zeros(clusters.shape, np.uint64)
        ok = np.ones(clusters.shape, bool)
        windows = clusters >> np.uint64(ClusterCounts.CHUNK_BITS)
        rest = np.ones(clusters.shape, bool)
        if not clusters.size:
            return values, ok
        low, high = int(windows.min()), int(windows.max())
        span = range(low, high + 1) if high - low < 64 else np.unique(windows).tolist()
        for w in span:
            window = self.windows.get(w)
            if window is None:
                continue
            stored, bad = window
            local = clusters - np.uint64(w * ClusterCounts.CHUNK)
            sel = (windows == w) & (local < np.uint64(stored.size))
            index = local[sel].astype(np.int64)
            values[sel] = stored[index]
            ok[sel] = ~bad[index]
            rest &= ~sel
        if bool(rest.any()):  # outside what the comparison read
            values[rest], ok[rest] = self.stored.lookup(clusters[rest])
        if not bool(ok.all()):
            first = int(clusters[np.flatnonzero(~ok)[0]])
            self._unreadable_block(lines, first // self.stored.block_entries)
        return values, ok


_OWN_REFBLOCK = frozenset({"refcount block"})
_OWN_L1 = frozenset({"active L1 table"})
_OWN_L2 = frozenset({"active L2 table"})


def _mismatches(
    entries: np.ndarray[Any, Any], refcounts: np.ndarray[Any, Any], ok: np.ndarray[Any, Any]
) -> list[int]:
    """Indices of readable entries whose COPIED flag disagrees with ``refcount == 1``."""
    copied = (entries & np.uint64(COPIED)) != 0
    return [int(k) for k in np.flatnonzero(ok & ((refcounts == 1) != copied))]


def _fixed_copied(entry: int, refcount: int) -> int:
    return entry | COPIED if refcount == 1 else entry & ~COPIED
