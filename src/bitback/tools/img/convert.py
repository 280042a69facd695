"""``bitback-img convert``: copy images into a new (or existing) image (``qemu-img convert``).

The copy walks the sources by block status, as QEMU's ``convert_iteration_sectors`` does,
so the target is allocated where qemu-img would allocate it:

* ranges that read as zeros are skipped on a fresh target (it reads zeros already) and
  written as zeroes (unmapping) on an existing one (``-n``);
* data ranges are read in chunks of up to 2 MiB; inside a chunk, runs of at least
  ``-S`` bytes of zeros (4 KiB by default) are treated as zeros too, with QEMU's alignment
  rules (``is_allocated_sectors_min``), so holes stay holes;
* with a backing file for the target (``-B``), only what the source allocates above its own
  backing file is copied; the rest is left unallocated so the target's backing shows
  through (qemu-img assumes the two backing files hold the same data);
* ``-c`` writes whole clusters through the driver's ``write_compressed``; an all-zero
  cluster is not written;
* ``--bitmaps`` copies the source's persistent bitmaps once the data is there
  (:func:`bitback.tools.img.bitmap.copy_bitmaps`), after checking, in qemu-img's order, that
  there is one source, that it can hold bitmaps and (without ``--skip-broken-bitmaps``) that
  none is inconsistent, and that the target can store them.

Sizes are in 512-byte sectors internally, as in QEMU: every source counts with its size
rounded up to a sector, and the target is created with the sum.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np
import numpy.typing as npt

from bitback.block.chain import readinto, status_above, virtual_size
from bitback.block.driver import BlockDriver
from bitback.block.open import ignore_flushes
from bitback.errors import BitbackError, ImageFormatError, InvalidArgumentError
from bitback.tools.img.bitmap import check_source_bitmaps, check_target_bitmaps, copy_bitmaps
from bitback.tools.img.create import (
    has_help_option,
    make_qcow2,
    option_help,
    parse_create_options,
    write_raw,
)
from bitback.tools.img.images import check_cache, open_img
from bitback.tools.img.options import (
    HelpRequested,
    OptSpec,
    cvtnum,
    getopt,
    valid_option_list,
)
from bitback.tools.img.progress import Progress

__all__ = ["ConvertPlan", "img_convert", "run_convert"]

SECTOR = 512
BUF_SECTORS = (2 << 20) // SECTOR
MAX_BUF_SECTORS = 32768
REQUEST_MAX_SECTORS = 0x7FFFFFFF >> 9

SPEC = OptSpec(
    "hf:O:B:CcF:o:S:pt:T:qnm:WUr:",
    {
        "help": (False, "h"),
        "target-is-zero": (False, "target-is-zero"),
        "bitmaps": (False, "bitmaps"),
        "skip-broken-bitmaps": (False, "skip-broken-bitmaps"),
    },
)


def _why(exc: BitbackError) -> str:
    """qemu-img's strerror text, plus the driver's diagnosis when the image is damaged."""
    text = os.strerror(exc.errno)
    return f"{text} ({exc})" if isinstance(exc, ImageFormatError) else text


Flags = npt.NDArray[np.bool_]
Cuts = npt.NDArray[np.intp]


class Kind(Enum):
    DATA = 0
    ZERO = 1
    BACKING = 2


@dataclass
class ConvertPlan:
    """What to copy where, decided before the copy starts."""

    sources: Sequence[BlockDriver]
    target: BlockDriver
    target_has_backing: bool = False
    target_is_new: bool = True
    has_zero_init: bool = False
    compressed: bool = False
    min_sparse: int = 8  # sectors of zeros that make a hole (-S / 512)


class _Copy:
    """QEMU's ``ImgConvertState`` and its copy loop, sequential (writes stay in order)."""

    def __init__(self, plan: ConvertPlan) -> None:
        self.plan = plan
        self.src_sectors = [virtual_size(s) // SECTOR for s in plan.sources]
        self.src_align = [max(1, (s.cluster_size or SECTOR) // SECTOR) for s in plan.sources]
        self.total = sum(self.src_sectors)
        target = plan.target
        self.target_backing_sectors = -1
        if plan.target_has_backing and plan.target_is_new and target.backing is not None:
            self.target_backing_sectors = virtual_size(target.backing) // SECTOR
        cluster = target.cluster_size or 0
        self.cluster_sectors = cluster // SECTOR
        self.buf_sectors = BUF_SECTORS
        if plan.compressed:
            if self.cluster_sectors <= 0 or self.cluster_sectors > self.buf_sectors:
                raise InvalidArgumentError("invalid cluster size")
            self.buf_sectors = self.cluster_sectors
        pow2 = 1 << (plan.min_sparse.bit_length() - 1) if plan.min_sparse else 0
        self.alignment = max(pow2, 1)
        self.buf = bytearray(self.buf_sectors * SECTOR)
        self.next_status = 0
        self.status = Kind.DATA

    # -- deciding -------------------------------------------------------------------------
    def _part(self, sector: int) -> tuple[int, int]:
        """(source index, first sector of that source) holding ``sector``."""
        start = 0
        for i, count in enumerate(self.src_sectors):
            if sector - start < count:
                return i, start
            start += count
        raise AssertionError("sector past the end of the sources")

    def iteration(self, sector: int) -> int:
        """``convert_iteration_sectors``: how many sectors from ``sector`` share one
        status (left in ``self.status``)."""
        plan = self.plan
        cur, cur_start = self._part(sector)
        n = min(self.total - sector, REQUEST_MAX_SECTORS)
        post_backing_zero = False
        if self.target_backing_sectors >= 0:
            if sector >= self.target_backing_sectors:
                post_backing_zero = True
            elif sector + n > self.target_backing_sectors:
                n = self.target_backing_sectors - sector
        if self.next_status <= sector:
            src = plan.sources[cur]
            base = src.backing if plan.target_has_backing else None
            offset = (sector - cur_start) * SECTOR
            try:
                st = status_above(src, base, offset, n * SECTOR)
            except BitbackError as exc:
                raise BitbackError(
                    f"error while reading block status at offset {offset}: {_why(exc)}"
                ) from exc
            n = -(-st.length // SECTOR)
            tail = (sector - cur_start + n) % self.src_align[cur]
            if n > tail:
                n -= tail
            if st.zero:
                self.status = Kind.BACKING if post_backing_zero else Kind.ZERO
            elif st.data:
                self.status = Kind.DATA
            else:
                self.status = Kind.BACKING if plan.target_has_backing else Kind.DATA
            self.next_status = sector + n
        n = min(n, self.next_status - sector)
        if self.status is Kind.DATA:
            n = min(n, self.buf_sectors)
        if plan.compressed:
            if n < self.cluster_sectors:
                n = min(self.cluster_sectors, self.total - sector)
                self.status = Kind.DATA
            else:
                n -= n % self.cluster_sectors
        return n

    # -- copying ----------------------------------------------------------------------------
    def _read(self, sector: int, count: int) -> None:
        pos = 0
        while count > 0:
            cur, cur_start = self._part(sector)
            n = min(count, self.src_sectors[cur] - (sector - cur_start))
            view = memoryview(self.buf)[pos * SECTOR : (pos + n) * SECTOR]
            readinto(self.plan.sources[cur], (sector - cur_start) * SECTOR, view)
            sector += n
            count -= n
            pos += n

    def _zero_flags(self, count: int) -> tuple[Flags, Cuts]:
        """Per-sector "all zeros" flags of the buffer and the indices where they change."""
        # 64-bit words: an eighth of the elements to reduce (SECTOR is a multiple of 8).
        arr = np.frombuffer(self.buf, np.uint64, count * SECTOR // 8).reshape(count, SECTOR // 8)
        zero: Flags = np.logical_not(arr.any(axis=1))
        cuts: Cuts = np.flatnonzero(zero[1:] != zero[:-1]) + 1
        return zero, cuts

    def _allocated(self, zero: Flags, cuts: Cuts, i: int, n: int, sector: int) -> tuple[bool, int]:
        """``is_allocated_sectors`` on the flags from index ``i`` (``n`` sectors)."""
        if n <= 0:
            return False, 0
        is_zero = bool(zero[i])
        k = int(np.searchsorted(cuts, i, side="right"))
        run = min((int(cuts[k]) if k < len(cuts) else len(zero)) - i, n)
        if run == n:
            return not is_zero, n
        tail = (sector + run) & (self.alignment - 1)
        if tail:
            if is_zero and run <= tail:
                is_zero = False
            if not is_zero:
                run = min(run + self.alignment - tail, n)
            else:
                run -= tail
        return not is_zero, run

    def _allocated_min(
        self, zero: Flags, cuts: Cuts, i: int, n: int, sector: int
    ) -> tuple[bool, int]:
        """``is_allocated_sectors_min``: short zero runs inside data count as data."""
        least = min(self.plan.min_sparse, n)
        used, pnum = self._allocated(zero, cuts, i, n, sector)
        if not used:
            return False, pnum
        num_used = checked = pnum
        i, n, sector = i + pnum, n - pnum, sector + pnum
        while n > 0:
            data, pnum = self._allocated(zero, cuts, i, n, sector)
            i, n, sector = i + pnum, n - pnum, sector + pnum
            checked += pnum
            if data:
                num_used = checked
            elif pnum >= least:
                break
        return True, num_used

    def _plan_writes(
        self, sector: int, count: int, kind: Kind, index: int, flags: tuple[Flags, Cuts] | None
    ) -> list[tuple[int, int, bool]]:
        """``convert_co_write``'s decisions for one run: ``(sector, count, is_data)`` writes
        (zeros when not data). ``index`` is where the run starts in the buffer."""
        plan = self.plan
        ops: list[tuple[int, int, bool]] = []
        i = 0
        while i < count:
            n = count - i
            write_data = False
            if kind is Kind.BACKING:
                pass
            elif kind is Kind.DATA:
                if not plan.min_sparse:
                    write_data = True
                elif plan.compressed:
                    assert flags is not None
                    write_data = not bool(flags[0][index + i : index + i + n].all())
                else:
                    assert flags is not None
                    write_data, n = self._allocated_min(
                        flags[0], flags[1], index + i, n, sector + i
                    )
            if write_data or (kind is not Kind.BACKING and not plan.has_zero_init):
                ops.append((sector + i, n, write_data))
            i += n
        return ops

    def _apply(self, ops: list[tuple[int, int, bool]], buf_sector: int) -> None:
        """Carry out planned writes, adjacent ones of a kind as one request (the result is
        the same as QEMU's separate requests; the driver sees fewer, larger ones)."""
        target, compressed = self.plan.target, self.plan.compressed
        merged: list[tuple[int, int, bool]] = []
        for op in ops:
            if (
                merged
                and not compressed
                and merged[-1][2] == op[2]
                and merged[-1][0] + merged[-1][1] == op[0]
            ):
                merged[-1] = (merged[-1][0], merged[-1][1] + op[1], op[2])
            else:
                merged.append(op)
        for start, n, is_data in merged:
            if is_data:
                i = start - buf_sector
                view = memoryview(self.buf)[i * SECTOR : (i + n) * SECTOR]
                if compressed:
                    getattr(target, "write_compressed")(start * SECTOR, view)  # noqa: B009
                else:
                    target.pwrite(start * SECTOR, view)
            else:
                target.pwrite_zeroes(start * SECTOR, n * SECTOR, may_unmap=True)

    def allocated_sectors(self) -> int:
        """The dry run QEMU makes for its progress meter: sectors that will be written."""
        done = sector = 0
        while sector < self.total:
            n = self.iteration(sector)
            if self.status is Kind.DATA or (not self.plan.min_sparse and self.status is Kind.ZERO):
                done += n
            sector += n
        self.next_status = 0
        return done

    def _batch(self, sector: int, n: int) -> list[tuple[int, int]]:
        """Consecutive data runs from ``sector`` that fit in the buffer together.

        QEMU reads and writes each run on its own; reading several short runs (a fragmented
        image has one per cluster) with one request is the same copy, far cheaper here.
        Probing the next run leaves the iteration state as the next call expects it.
        """
        runs = [(sector, n)]
        end = sector + n
        if self.plan.compressed:
            return runs
        while end < self.total and end - sector < self.buf_sectors:
            m = self.iteration(end)
            if self.status is not Kind.DATA or end - sector + m > self.buf_sectors:
                break
            runs.append((end, m))
            end += m
        return runs

    def run(self, progress: Progress) -> None:
        allocated = self.allocated_sectors() if progress.enabled else 0
        done = sector = 0
        while sector < self.total:
            n = self.iteration(sector)
            kind = self.status
            if not self.plan.min_sparse and kind is Kind.ZERO:
                n = min(n, self.buf_sectors)
            runs = self._batch(sector, n) if kind is Kind.DATA else [(sector, n)]
            count = runs[-1][0] + runs[-1][1] - sector
            if kind is Kind.DATA:
                try:
                    self._read(sector, count)
                except BitbackError as exc:
                    raise BitbackError(
                        f"error while reading at byte {sector * SECTOR}: {_why(exc)}"
                    ) from exc
            elif not self.plan.min_sparse and kind is Kind.ZERO:
                kind = Kind.DATA
                memoryview(self.buf)[: n * SECTOR] = bytes(n * SECTOR)
            flags = self._zero_flags(count) if kind is Kind.DATA and self.plan.min_sparse else None
            ops: list[tuple[int, int, bool]] = []
            for start, m in runs:
                if kind is Kind.DATA:
                    done += m
                    progress.print(100.0 * done / max(allocated, 1), 0)
                ops += self._plan_writes(start, m, kind, start - sector, flags)
            try:
                self._apply(ops, sector)
            except BitbackError as exc:
                raise BitbackError(
                    f"error while writing at byte {sector * SECTOR}: {os.strerror(exc.errno)}"
                ) from exc
            sector += count
        self.plan.target.flush()


def run_convert(plan: ConvertPlan, progress: Progress | None = None) -> None:
    """Copy ``plan.sources`` (concatenated) into ``plan.target``."""
    _Copy(plan).run(progress if progress is not None else Progress(False, 1.0))


@dataclass
class _Args:
    fmt: str | None = None
    out_fmt: str | None = None
    out_base: str | None = None
    base_fmt: str | None = None
    options: str | None = None
    compressed: bool = False
    min_sparse: int = 8
    progress: bool = False
    quiet: bool = False
    skip_create: bool = False
    target_is_zero: bool = False
    cache: str | None = None
    src_cache: str | None = None
    bitmaps: bool = False
    skip_broken: bool = False


def _parse(argv: list[str]) -> tuple[_Args, list[str]]:
    opts, operands = getopt(argv, SPEC)
    a = _Args()
    for key, value in opts:
        if key == "h":
            raise HelpRequested
        if key == "f":
            a.fmt = value
        elif key == "O":
            a.out_fmt = value
        elif key == "B":
            a.out_base = value
        elif key == "F":
            a.base_fmt = value
        elif key == "c":
            a.compressed = True
        elif key == "o":
            assert value is not None
            if not valid_option_list(value):
                raise InvalidArgumentError(f"Invalid option list: {value}")
            a.options = value if a.options is None else f"{a.options},{value}"
        elif key == "S":
            assert value is not None
            size = cvtnum("buffer size for sparse output", value)
            if size % SECTOR or size // SECTOR > MAX_BUF_SECTORS:
                raise InvalidArgumentError(
                    "Invalid buffer size for sparse output specified. Valid sizes are "
                    f"multiples of {SECTOR} up to {MAX_BUF_SECTORS * SECTOR}. Select 0 to "
                    "disable sparse detection (fully allocates output)."
                )
            a.min_sparse = size // SECTOR
        elif key == "p":
            a.progress = True
        elif key == "q":
            a.quiet = True
        elif key == "n":
            a.skip_create = True
        elif key == "t":
            a.cache = value
        elif key == "T":
            a.src_cache = value
        elif key == "m":
            assert value is not None
            cvtnum("number of coroutines", value, lo=1, hi=16)  # bitback copies in order
        elif key == "r":
            assert value is not None
            cvtnum("rate limit", value)  # accepted; bitback does not throttle
        elif key == "target-is-zero":
            a.target_is_zero = True
        elif key == "bitmaps":
            a.bitmaps = True
        elif key == "skip-broken-bitmaps":
            a.skip_broken = True
        # -C (copy offloading), -W (out-of-order writes), -U: accepted, no effect here
    return a, operands


def img_convert(argv: list[str]) -> int:
    """``convert [--bitmaps [--skip-broken-bitmaps]] [-f fmt] [-O fmt] [-o opts]
    [-B backing [-F fmt]] [-c] [-S size] [-n] [-p] [-q] SRC... DST``."""
    a, operands = _parse(argv)
    if a.skip_broken and not a.bitmaps:
        raise InvalidArgumentError("Use of --skip-broken-bitmaps requires --bitmaps")
    out_fmt = a.out_fmt or "raw"
    if a.skip_create and a.options:
        raise InvalidArgumentError("-o has no effect when skipping image creation")
    if a.target_is_zero and not a.skip_create:
        raise InvalidArgumentError("--target-is-zero requires use of -n flag")
    out_filename = operands[-1] if len(operands) >= 2 else None
    if a.options and has_help_option(a.options):
        return option_help(out_filename, out_fmt)
    if len(operands) < 2:
        raise InvalidArgumentError("Must specify image file name")
    check_cache(a.src_cache, source=True)
    assert out_filename is not None
    meter = Progress(a.progress and not a.quiet, 1.0)
    sources: list[BlockDriver] = []
    try:
        meter.print(0, 100)
        for name in operands[:-1]:
            sources.append(open_img(name, a.fmt))
        total = sum(virtual_size(s) for s in sources)
        backing = _create_target(a, out_fmt, out_filename, total, sources)
        check_cache(a.cache)
        with open_img(out_filename, out_fmt, read_only=False) as target:
            if (a.cache or "unsafe") == "unsafe":  # qemu-img convert's default cache mode
                ignore_flushes(target)
            if a.bitmaps:
                check_target_bitmaps(target)
            if a.compressed and getattr(target, "write_compressed", None) is None:
                raise InvalidArgumentError("Compression not supported for this file format")
            if a.skip_create and virtual_size(target) < total:
                raise InvalidArgumentError("output file is smaller than input file")
            plan = ConvertPlan(
                sources=sources,
                target=target,
                target_has_backing=backing is not None,
                target_is_new=not a.skip_create,
                has_zero_init=a.target_is_zero
                or (not a.skip_create and a.min_sparse > 0 and backing is None),
                compressed=a.compressed,
                min_sparse=a.min_sparse,
            )
            run_convert(plan, meter)
            if a.bitmaps:
                copy_bitmaps(sources[0], target, a.skip_broken)
        meter.print(100, 0)
    finally:
        for node in sources:
            node.close()
        meter.end()
    return 0


def _create_target(
    a: _Args, out_fmt: str, filename: str, total: int, sources: Sequence[BlockDriver]
) -> str | None:
    """Create the target unless ``-n``; returns the target's backing file name, if any.

    ``--bitmaps``'s checks of the source come right before the creation, as in qemu-img.
    """
    nsrc = len(sources)
    out_base = a.out_base
    if not a.skip_create:
        opts = parse_create_options(out_fmt, a.options)
        opts.set("size", str(total))
        if out_base is not None:
            if "backing_file" not in opts.types:
                raise InvalidArgumentError(
                    f"Backing file not supported for file format '{out_fmt}'"
                )
            opts.set("backing_file", out_base)
        if a.base_fmt is not None:
            if "backing_fmt" not in opts.types:
                raise InvalidArgumentError(
                    f"Backing file format not supported for file format '{out_fmt}'"
                )
            opts.set("backing_fmt", a.base_fmt)
        param = opts.get("backing_file")
        out_base = param if param is not None else out_base
        if a.target_is_zero and out_base:
            raise InvalidArgumentError(
                "Cannot use --target-is-zero when the destination image has a backing file"
            )
        if nsrc > 1 and out_base:
            raise InvalidArgumentError(
                "Having a backing file for the target makes no sense when concatenating "
                "multiple input images"
            )
        if param is not None and opts.get("backing_fmt") is None:
            raise InvalidArgumentError("Use of backing file requires explicit backing format")
        if a.compressed and out_fmt != "qcow2":
            raise InvalidArgumentError("Compression not supported for this file format")
        if a.compressed and (opts.get("preallocation") or "off") != "off":
            raise InvalidArgumentError(
                "Compression and preallocation not supported at the same time"
            )
        if a.bitmaps:
            check_source_bitmaps(sources, a.skip_broken)
        try:
            if out_fmt == "qcow2":
                make_qcow2(filename, total, opts)
            else:
                if (opts.get("preallocation") or "off") != "off":
                    raise InvalidArgumentError(
                        f"Preallocation mode '{opts.get('preallocation')}' is not supported"
                    )
                write_raw(filename, total)
        except BitbackError as exc:
            raise InvalidArgumentError(
                f"{filename}: error while converting {out_fmt}: {exc}"
            ) from exc
        return out_base
    if nsrc > 1 and out_base:
        raise InvalidArgumentError(
            "Having a backing file for the target makes no sense when concatenating "
            "multiple input images"
        )
    if a.bitmaps:
        check_source_bitmaps(sources, a.skip_broken)
    return out_base
