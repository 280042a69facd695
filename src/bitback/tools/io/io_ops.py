"""The data movement behind the io commands, on the BlockDriver interface only.

Reads and writes go in :data:`CHUNK`-sized requests so that ``write 0 2G`` does not build a
2 GiB Python buffer (qemu-io itself does allocate the full buffer; we choose bounded memory).
The whole range is checked against the image length first, so a request that reaches past the
end fails with EIO before anything is written, exactly as QEMU's single request would. No loop
here runs per sector or per cluster: one driver call per chunk, and pattern checks use
``bytes.count``, which runs in C.

Worked example, ``write -P 0xab 100M 130M`` with 64 MiB chunks::

    offset 100M          164M          228M   230M
           |-- 64 MiB ----|-- 64 MiB ----|-2M-|
    three pwrite calls reusing one 64 MiB buffer of 0xab (the last one a 2 MiB view of it)
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from bitback.block.driver import BlockDriver
from bitback.errors import IOFailedError

from .table import CommandContext

__all__ = [
    "CHUNK",
    "ReadResult",
    "Verify",
    "allocation",
    "check_range",
    "do_pread",
    "do_pwrite",
    "do_write_compressed",
    "load_source_file",
    "vm_state_offset",
]

CHUNK = 64 << 20  # 64 MiB: bounded memory, and still one request for every seed-sized I/O


def check_range(driver: BlockDriver, offset: int, count: int) -> None:
    """Refuse a request past the end of the image with EIO, as QEMU's request check does."""
    if offset < 0 or count < 0 or offset + count > driver.length():
        raise IOFailedError(
            f"request {offset}+{count} is beyond the end of {driver.filename}",
            errno=errno.EIO,
            path=driver.filename,
        )


@dataclass(frozen=True, slots=True)
class Verify:
    """``read -P pattern [-s start] [-l count]``: bytes ``[start, start+count)`` of the data
    read (offsets relative to the request) must all equal ``pattern``."""

    pattern: int
    start: int
    count: int


@dataclass(frozen=True, slots=True)
class ReadResult:
    """What a read produced: I/O time (verification excluded), verdict, kept data."""

    elapsed_ns: int
    matched: bool
    data: bytes | None


def do_pread(
    driver: BlockDriver, offset: int, count: int, verify: Verify | None, *, keep: bool
) -> ReadResult:
    """Read ``count`` bytes at ``offset`` chunk by chunk, checking ``verify`` as they come.

    ``keep``: return the data too (for ``-v``; a dump is only sensible for small reads, so it
    is the one case where the whole range is held in memory). Driver errors propagate.
    """
    check_range(driver, offset, count)
    pattern = b"" if verify is None else bytes([verify.pattern])
    matched = True
    kept: list[bytes] = []
    elapsed = 0
    pos = 0
    while True:
        n = min(CHUNK, count - pos)
        t0 = time.monotonic_ns()
        chunk = driver.pread(offset + pos, n)
        elapsed += time.monotonic_ns() - t0
        if verify is not None and matched:
            lo = max(pos, verify.start)
            hi = min(pos + n, verify.start + verify.count)
            if lo < hi and chunk.count(pattern, lo - pos, hi - pos) != hi - lo:
                matched = False
        if keep:
            kept.append(chunk)
        pos += n
        if pos >= count:
            break
    return ReadResult(elapsed, matched, b"".join(kept) if keep else None)


def do_pwrite(
    driver: BlockDriver,
    offset: int,
    count: int,
    source: bytes,
    *,
    write: Callable[[int, memoryview], None] | None = None,
    step: int | None = None,
) -> None:
    """Write ``count`` bytes at ``offset``: ``source`` repeated from its start (a one-byte
    pattern, or the contents of ``write -s FILE``), in requests of at most ``step`` bytes
    through ``write`` (default ``driver.pwrite``; ``step`` defaults to :data:`CHUNK`)."""
    check_range(driver, offset, count)
    put = driver.pwrite if write is None else write
    step = CHUNK if step is None else step
    period = len(source)
    size = min(count, step)
    # One buffer serves every request: request k starts at phase (k * step) % period in it.
    block = memoryview(source * (size // period + 2))
    pos = 0
    while True:
        n = min(step, count - pos)
        phase = pos % period
        put(offset + pos, block[phase : phase + n])
        pos += n
        if pos >= count:
            break


def do_write_compressed(driver: BlockDriver, offset: int, count: int, source: bytes) -> None:
    """``write -c``: whole clusters, each compressed on its own (one driver call per cluster,
    as QEMU splits compressed writes). Needs the driver's ``write_compressed(offset, data)``
    hook (qcow2 has it; the BlockDriver interface does not declare it): without it ENOTSUP.
    A range not made of whole clusters (a partial one is allowed only at the end of the image)
    is refused with EINVAL before anything is written, as QEMU does."""
    hook = getattr(driver, "write_compressed", None)
    cluster = driver.cluster_size or 0
    if hook is None or not cluster:
        raise IOFailedError(f"{driver.format_name}: no compressed writes", errno=errno.ENOTSUP)
    check_range(driver, offset, count)
    if offset % cluster or (count % cluster and offset + count != driver.length()):
        raise IOFailedError("compressed writes must cover whole clusters", errno=errno.EINVAL)
    do_pwrite(driver, offset, count, source, write=hook, step=cluster)


def load_source_file(path: str, count: int, ctx: CommandContext) -> bytes | None:
    """The first ``count`` bytes of ``write -s FILE`` (qemu-io repeats them to fill the
    request). Errors print qemu-io's ``perror``-style line on the error stream."""
    try:
        with open(path, "rb") as f:
            data = f.read(count)
    except OSError as exc:
        ctx.eprint(f"{path}: {os.strerror(exc.errno or errno.EIO)}")
        return None
    if not data:
        ctx.eprint(f"{path}: file is empty")
        return None
    return data


def _is_allocated(driver: BlockDriver, offset: int, count: int) -> tuple[bool, int]:
    """QEMU's ``bdrv_is_allocated`` on this node only: (allocated, bytes with that status).

    At or past the end of the image it answers (False, 0), as QEMU does.
    """
    end = min(offset + count, driver.length())
    if offset >= end:
        return False, 0
    ext = driver.block_status(offset, end - offset)
    num = min(ext.end, end) - offset
    return ext.allocated, max(num, 0)


def allocation(
    driver: BlockDriver, offset: int, count: int, *, merge: bool
) -> tuple[bool, int]:
    """Allocation status at ``offset``: (allocated, length of the run, at most ``count``).

    ``merge`` joins consecutive extents with the same status (qemu-io's ``map`` does; a driver
    may split one run into several extents, e.g. at L2 table boundaries).
    """
    allocated, num = _is_allocated(driver, offset, count)
    if not merge or num == 0:
        return allocated, num
    total = num
    while total < count:
        more_allocated, more = _is_allocated(driver, offset + total, count - total)
        if more == 0 or more_allocated != allocated:
            break
        total += more
    return allocated, total


def vm_state_offset(driver: BlockDriver) -> int:
    """Where a qcow2 image would keep VM state: the virtual size rounded up to what one L2
    table maps (512 MiB for 64 KiB clusters), as ``qcow2_get_info`` reports it.

    A driver may provide ``vm_state_offset()`` itself; otherwise formats other than qcow2
    have none (0), like QEMU's raw.
    """
    hook = getattr(driver, "vm_state_offset", None)
    if callable(hook):
        return int(hook())
    cluster = driver.cluster_size
    if driver.format_name != "qcow2" or not cluster:
        return 0
    entry_size = 16 if driver.format_specific_info().get("extended-l2") else 8
    span = cluster * (cluster // entry_size)
    return -(-driver.length() // span) * span
