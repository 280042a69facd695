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
Python objects. See :mod:`.repair` for the order in which repairs write.
"""

from __future__ import annotations

import errno
import os
from copy import copy
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from bitback.block.drivers.qcow2.check_image import CheckImage, StoredRefcounts, read_snapshots
from bitback.block.drivers.qcow2.check_scan import (
    CheckFailed,
    ClusterCounts,
    Counters,
    Messages,
    ReferenceScan,
    c_hex,
)
from bitback.block.drivers.qcow2.repair import (
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
_BATCH_BYTES = 8 << 20


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The outcome of a check, shaped like ``qemu-img check`` (fields mirror its JSON).

    ``messages`` are the lines qemu-img prints on stderr, in order: those of the check (and,
    after a repair, those of the double check, starting at index ``recheck_from``).
    ``failure`` is the strerror text when the check could not complete (qemu-img then prints
    ``Check failed: <failure>`` and no summary); ``supported`` is false for formats without
    checks (exit code 63).
    """

    filename: str
    check_errors: int = 0
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    messages: list[str] = field(default_factory=list)
    format: str = "qcow2"
    failure: str | None = None
    recheck_from: int | None = None
    supported: bool = True

    @classmethod
    def unsupported(cls, filename: str, format: str) -> CheckResult:
        """The result for a format that has no consistency check (raw): exit code 63."""
        return cls(filename=filename, format=format, supported=False)

    @property
    def exit_code(self) -> int:
        """qemu-img's: 0 clean, 1 check failed, 2 corruptions, 3 leaks only, 63 unsupported."""
        if not self.supported:
            return 63
        if self.failure is not None or self.check_errors:
            return 1
        if self.corruptions:
            return 2
        return 3 if self.leaks else 0

    @property
    def error_line(self) -> str | None:
        """What the tool reports as its error (after ``<prog>: ``), if anything."""
        if not self.supported:
            return "This image format does not support checks"
        if self.failure is not None:
            return f"Check failed: {self.failure}"
        return "Check failed" if self.check_errors else None

    def to_json(self) -> dict[str, Any]:
        """qemu-img's ``--output=json`` object: optional keys only when non-zero, in its order."""
        values: dict[str, Any] = {
            "filename": self.filename,
            "format": self.format,
            "check-errors": self.check_errors,
        }
        optional = {
            "image-end-offset": self.image_end_offset,
            "corruptions": self.corruptions,
            "leaks": self.leaks,
            "corruptions-fixed": self.corruptions_fixed,
            "leaks-fixed": self.leaks_fixed,
            "total-clusters": self.total_clusters,
            "allocated-clusters": self.allocated_clusters,
            "fragmented-clusters": self.fragmented_clusters,
            "compressed-clusters": self.compressed_clusters,
        }
        values.update((k, v) for k, v in optional.items() if v)
        # QEMU prints a QDict, whose iteration order is that of its hash buckets.
        return {k: values[k] for k in sorted(values, key=_qdict_bucket)}

    def json_text(self) -> str:
        """qemu-img's pretty-printed JSON text, byte for byte (with the final newline)."""
        items = [f"    {_json_str(k)}: {_json_value(v)}" for k, v in self.to_json().items()]
        return "{\n" + ",\n".join(items) + "\n}\n"

    def human(self) -> str:
        """qemu-img's human output (its stdout), after the messages."""
        out = []
        if self.corruptions_fixed or self.leaks_fixed:
            out.append(
                "The following inconsistencies were found and repaired:\n\n"
                f"    {self.leaks_fixed} leaked clusters\n"
                f"    {self.corruptions_fixed} corruptions\n\n"
                "Double checking the fixed image now...\n"
            )
        if self.failure is not None or not self.supported:
            return "".join(out)
        if not (self.corruptions or self.leaks or self.check_errors):
            out.append("No errors were found on the image.\n")
        if self.corruptions:
            out.append(
                f"\n{self.corruptions} errors were found on the image.\n"
                "Data may be corrupted, or further writes to the image may corrupt it.\n"
            )
        if self.leaks:
            out.append(
                f"\n{self.leaks} leaked clusters were found on the image.\n"
                "This means waste of disk space, but no harm to data.\n"
            )
        if self.check_errors:
            out.append(f"\n{self.check_errors} internal errors have occurred during the check.\n")
        if self.total_clusters and self.allocated_clusters:
            alloc = self.allocated_clusters
            out.append(
                f"{alloc}/{self.total_clusters} = {alloc * 100.0 / self.total_clusters:0.2f}% "
                f"allocated, {self.fragmented_clusters * 100.0 / alloc:0.2f}% fragmented, "
                f"{self.compressed_clusters * 100.0 / alloc:0.2f}% compressed clusters\n"
            )
        if self.image_end_offset:
            out.append(f"Image end offset: {self.image_end_offset}\n")
        return "".join(out)

    def transcript(self) -> str:
        """stderr and stdout interleaved as on a terminal (``2>&1``), without the error line."""
        split = len(self.messages) if self.recheck_from is None else self.recheck_from
        text = "".join(m + "\n" for m in self.messages[:split])
        human = self.human()
        marker = "Double checking the fixed image now...\n"
        if marker in human:
            head, tail = human.split(marker, 1)
            text += head + marker
            human = tail
        text += "".join(m + "\n" for m in self.messages[split:])
        return text + human


def _qdict_bucket(key: str) -> int:
    """QEMU's QDict bucket of a key (tdb_hash modulo 512 buckets)."""
    raw = key.encode()
    value = (0x238F13AF * len(raw)) & 0xFFFFFFFF
    for i, ch in enumerate(raw):
        value = (value + (ch << (i * 5 % 24))) & 0xFFFFFFFF
    return ((1103515243 * value + 12345) & 0xFFFFFFFF) % 512


def _json_value(value: Any) -> str:
    return _json_str(value) if isinstance(value, str) else str(value)


def _json_str(text: str) -> str:
    """A JSON string as QEMU writes it: non-ASCII as uppercase ``\\uXXXX`` escapes."""
    out = ['"']
    specials = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r",
                "\t": "\\t"}
    for ch in text:
        cp = ord(ch)
        if ch in specials:
            out.append(specials[ch])
        elif 0x20 <= cp < 0x7F:
            out.append(ch)
        elif cp > 0xFFFF:
            cp -= 0x10000
            out.append(f"\\u{0xD800 + (cp >> 10):04X}\\u{0xDC00 + (cp & 0x3FF):04X}")
        else:
            out.append(f"\\u{cp:04X}")
    out.append('"')
    return "".join(out)


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
        # Stored refcounts (and unreadable masks) the last comparison read, per counts chunk.
        self.windows: dict[int, tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]] = {}
        self.open_warnings = list(img.warnings)

    def run_pass(self, *, fix_leaks: bool, fix_errors: bool) -> _Pass:
        img = self.img
        h = img.header
        res = Counters()
        lines, self.open_warnings = self.open_warnings, []
        total = -(-(h.size // 512 * 512) // img.cluster_size)
        p = _Pass(res, lines, total)
        snapshots, snapshots_size = read_snapshots(img)
        if img.nb_clusters > _INT_MAX:
            res.check_errors += 1
            p.failure = errno.EFBIG
            return p
        scan = ReferenceScan(img, res, msgs := Messages(), fix_errors=fix_errors)
        try:
            scan.run(snapshots, snapshots_size, self.stored)
        except CheckFailed as exc:
            lines += msgs.lines()
            p.failure = exc.errno
            return p
        lines += msgs.lines()
        pre = copy(res)
        highest, rebuild, _ = self.compare(scan, res, lines)
        rebuild = rebuild or scan.rebuild
        if rebuild and fix_errors:
            old = copy(res)
            lines.append("Rebuilding refcount structure")
            rebuild_refcount_structure(img, self.stored, scan.counts.dense(scan.n_mem))
            res.corruptions = res.leaks = 0
            scan = ReferenceScan(img, res, msgs := Messages())
            try:
                scan.run(snapshots, snapshots_size, self.stored)
            except CheckFailed as exc:
                lines += msgs.lines()
                p.failure = exc.errno
                return p
            lines += msgs.lines()
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
                p.failure = errno.EIO
                return p
            if res.leaks or res.corruptions:
                res = p.res = pre
                highest, _, updates = self.compare(
                    scan, res, lines, fix_leaks=True, fix_errors=fix_errors
                )
                self._apply(updates)
        self.check_copied(res, lines, fix_leaks=fix_leaks, fix_errors=fix_errors)
        p.image_end_offset = (highest + 1) * img.cluster_size
        if fix_leaks and not res.check_errors and not res.corruptions:
            mark_clean(img)
        return p

    def _apply(self, updates: dict[int, int]) -> None:
        """Write refcount fixes (unlinking an ignored bitmaps extension first)."""
        if not updates:
            return
        self._drop_ignored_bitmaps()
        apply_refcount_updates(self.stored, updates)
        chunk = ClusterCounts.CHUNK
        for cluster, value in updates.items():
            self.windows[cluster // chunk][0][cluster % chunk] = value

    def _drop_ignored_bitmaps(self) -> None:
        """Before freeing the clusters of an ignored bitmaps extension, unlink it."""
        if self.img.bitmaps is None and self.img.header.extension(EXT_BITMAPS) is not None:
            drop_bitmaps_extension(self.img)

    def _signal_corruption(self, lines: list[str], block: int) -> None:
        """QEMU's qcow2_signal_corruption for an unaligned refcount block, once per open."""
        if self.signaled:
            return
        self.signaled = True
        what = (f"Refblock offset {c_hex(self.stored.block_offset(block))} unaligned "
                f"(reftable index: {c_hex(block)})")
        if self.img.writable:  # QEMU marks the image corrupt when it may write to it
            lines.append(f"qcow2: Marking image as corrupt: {what}; further corruption events "
                         "will be suppressed")
            h = self.img.header
            if h.version >= 3 and not h.incompatible_features & INCOMPAT_CORRUPT:
                write_entries(self.img, [(72, h.incompatible_features | INCOMPAT_CORRUPT)])
                self.img.header = replace(
                    h, incompatible_features=h.incompatible_features | INCOMPAT_CORRUPT
                )
        else:
            lines.append(f"qcow2: Image is corrupt: {what}; further non-fatal corruption "
                         "events will be suppressed")

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
        (a referenced cluster has refcount 0) and the refcount updates to apply.
        """
        n = scan.n_mem
        chunk = ClusterCounts.CHUNK
        self.windows = {}
        highest = 0
        odd: list[tuple[int, bool, int]] = []  # (cluster, unreadable, stored refcount)
        for w in range(-(-n // chunk)):  # one chunk of counts at a time
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
                self._signal_corruption(lines, i // self.stored.block_entries)
                lines.append(f"Can't get refcount for cluster {i}: Input/output error")
                res.check_errors += 1
                continue
            want = scan.counts.at(i)
            fixed = False
            if have == 0:
                rebuild = True  # no refcount block to fix it in, or a block QEMU distrusts
            elif have > want:
                fixed = fix_leaks
            else:
                fixed = fix_errors
            label = "Repairing" if fixed else ("ERROR" if have < want else "Leaked")
            lines.append(f"{label} cluster {i} refcount={have} reference={want}")
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

    def check_copied(
        self, res: Counters, lines: list[str], *, fix_leaks: bool, fix_errors: bool
    ) -> None:
        """COPIED must be set exactly on active L1/L2 entries whose cluster has refcount 1."""
        img = self.img
        h = img.header
        # With -r leaks QEMU repairs the flags only when the refcounts are now trustworthy.
        repair = fix_errors or (fix_leaks and not (res.check_errors or res.corruptions
                                                   or res.leaks))
        verb = "Repairing" if repair else "ERROR"
        l1 = img.read_table(h.l1_table_offset, h.l1_size)
        l2_offsets = l1 & np.uint64(L1_OFFSET_MASK)
        used = np.flatnonzero(l2_offsets)
        found: list[tuple[int, int, str]] = []
        writes: list[tuple[int, int]] = []
        batch = max(1, _BATCH_BYTES // img.cluster_size)
        for start in range(0, used.size, batch):
            idx = used[start : start + batch]
            offsets = l2_offsets[idx]
            refcounts, ok = self._lookup(offsets >> np.uint64(img.cluster_bits), lines)
            for k in self._mismatches(l1[idx], refcounts, ok):
                i, entry, rc = int(idx[k]), int(l1[idx[k]]), int(refcounts[k])
                found.append((i, -1, f"{verb} OFLAG_COPIED L2 cluster: l1_index={i} "
                                     f"l1_entry={entry:x} refcount={rc}"))
                writes.append((h.l1_table_offset + 8 * i, _fixed_copied(entry, rc)))
            inside = np.flatnonzero(offsets < np.uint64(img.file_len))
            if inside.size:
                self._check_l2_copied(idx[inside], offsets[inside], verb, found, writes, lines)
        found.sort(key=lambda item: (item[0], item[1]))
        lines.extend(text for _, _, text in found)
        if repair:
            res.corruptions_fixed += len(found)
            write_entries(img, writes)
        else:
            res.corruptions += len(found)

    def _check_l2_copied(
        self,
        l1_index: np.ndarray[Any, Any],
        l2_offsets: np.ndarray[Any, Any],
        verb: str,
        found: list[tuple[int, int, str]],
        writes: list[tuple[int, int]],
        lines: list[str],
    ) -> None:
        img = self.img
        tables = img.read_tables(l2_offsets)
        kinds = classify_entries(tables)
        rows, cols = np.nonzero((kinds == ClusterKind.NORMAL) | (kinds == ClusterKind.ZERO_ALLOC))
        entries = tables[rows, cols]
        clusters = (entries & np.uint64(L2_OFFSET_MASK)) >> np.uint64(img.cluster_bits)
        refcounts, ok = self._lookup(clusters, lines)
        for k in self._mismatches(entries, refcounts, ok):
            r, j, entry, rc = int(rows[k]), int(cols[k]), int(entries[k]), int(refcounts[k])
            found.append((int(l1_index[r]), j, f"{verb} OFLAG_COPIED data cluster: "
                                               f"l2_entry={entry:x} refcount={rc}"))
            writes.append((int(l2_offsets[r]) + 8 * j, _fixed_copied(entry, rc)))

    @staticmethod
    def _mismatches(
        entries: np.ndarray[Any, Any], refcounts: np.ndarray[Any, Any], ok: np.ndarray[Any, Any]
    ) -> list[int]:
        copied = (entries & np.uint64(COPIED)) != 0
        return [int(k) for k in np.flatnonzero(ok & ((refcounts == 1) != copied))]

    def _lookup(
        self, clusters: np.ndarray[Any, Any], lines: list[str]
    ) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        """Stored refcounts of ``clusters`` (from the compared range where possible)."""
        values = np.zeros(clusters.shape, np.uint64)
        ok = np.ones(clusters.shape, bool)
        windows = clusters >> np.uint64(ClusterCounts.CHUNK_BITS)
        rest = np.ones(clusters.shape, bool)
        for w in np.unique(windows).tolist():
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
            self._signal_corruption(lines, first // self.stored.block_entries)
        return values, ok


def _fixed_copied(entry: int, refcount: int) -> int:
    return entry | COPIED if refcount == 1 else entry & ~COPIED
