"""The data-path io commands: read, readv, aio_read, write, writev, aio_write, discard.

Each follows its qemu-io 7.2 counterpart step by step (options, operand checks, conversions,
the request, verification, report), because the order of the checks decides which message a
bad command line gets. ``aio_*`` run synchronously: they report as soon as they finish and,
like qemu-io's, count as successful once "submitted" even if the I/O then fails.
"""

from __future__ import annotations

import errno
import time

from bitback.block.driver import BlockDriver
from bitback.errors import IOFailedError

from .cmdutil import (
    IO_ERRORS,
    dump,
    flush_after_write,
    iovec,
    num,
    options,
    pattern_arg,
    report,
    sector_aligned,
    usage,
)
from .io_ops import (
    Verify,
    check_range,
    do_pread,
    do_pwrite,
    do_write_compressed,
    load_source_file,
)
from .parsing import BDRV_REQUEST_MAX_BYTES, GetOpt
from .report import io_report
from .table import CommandContext, report_failure

__all__ = [
    "aio_read_f",
    "aio_write_f",
    "discard_f",
    "read_f",
    "readv_f",
    "write_f",
    "writev_f",
]


def offset_and_count(operands: list[str], ctx: CommandContext) -> tuple[int, int] | None:
    """``OFFSET LENGTH`` operands as qemu-io parses them, errors printed; ``None`` on error."""
    offset = num(operands[0], ctx)
    if offset is None:
        return None
    count = num(operands[1], ctx)
    if count is None:
        return None
    if count > BDRV_REQUEST_MAX_BYTES:
        ctx.print(f"length cannot exceed {BDRV_REQUEST_MAX_BYTES}, given {operands[1]}")
        return None
    return offset, count

def read_f(driver: BlockDriver | None, argv: list[str], ctx: CommandContext) -> bool:
    """``read [-bCqpv] [-P pattern [-s off] [-l len]] off len``: read, verify, dump, report."""
    assert driver is not None
    machine = quiet = verbose = vmstate = False
    pattern: int | None = None
    p_offset = p_count = 0
    l_given = s_given = False
    opts = GetOpt(argv, "bCl:pP:qs:v")
    for opt, arg in options(opts, ctx, "read"):
        if opt == "?":
            return False
        if opt == "b":
            vmstate = True
        elif opt == "C":
            machine = True
        elif opt == "l":
            l_given = True
            value = num(arg, ctx)
            if value is None:
                return False
            p_count = value
        elif opt == "P":
            pattern = pattern_arg(arg or "", ctx)
            if pattern is None:
                return False
        elif opt == "q":
            quiet = True
        elif opt == "s":
            s_given = True
            value = num(arg, ctx)
            if value is None:
                return False
            p_offset = value
        elif opt == "v":
            verbose = True
    if len(opts.operands) != 2:
        return usage(ctx, "read")
    span = offset_and_count(opts.operands, ctx)
    if span is None:
        return False
    offset, count = span
    if pattern is None and (l_given or s_given):
        return usage(ctx, "read")
    if not l_given:
        p_count = count - p_offset
    if p_count < 0 or p_count + p_offset > count:
        ctx.print("pattern verification range exceeds end of read data")
        return False
    if vmstate and not sector_aligned(offset, count, ctx):
        return False
    verify = None if pattern is None else Verify(pattern, p_offset, p_count)
    try:
        if vmstate:
            raise IOFailedError("no VM state", errno=errno.ENOTSUP)
        result = do_pread(driver, offset, count, verify, keep=verbose and not quiet)
    except IO_ERRORS as exc:
        report_failure(ctx, "read", exc)
        return False
    ok = True
    if verify is not None and not result.matched:
        ctx.print(
            f"Pattern verification failed at offset {offset + p_offset}, {p_count} bytes"
        )
        ok = False
    if quiet:
        return ok
    dump(ctx, result.data, offset)
    report(ctx, io_report("read", result.elapsed_ns, offset, count, count, machine=machine))
    return ok


def _vector_read(
    driver: BlockDriver, argv: list[str], ctx: CommandContext, name: str, optstring: str
) -> bool:
    """readv and aio_read: read the sum of several lengths at one offset."""
    aio = name == "aio_read"
    machine = quiet = verbose = False
    pattern: int | None = None
    opts = GetOpt(argv, optstring)
    for opt, arg in options(opts, ctx, name):
        if opt == "?":
            return False
        if opt == "C":
            machine = True
        elif opt == "P":
            pattern = pattern_arg(arg or "", ctx)
            if pattern is None:
                return False
        elif opt == "i":
            ctx.print("injecting invalid read request")
            return True
        elif opt == "q":
            quiet = True
        elif opt == "v":
            verbose = True
    if len(opts.operands) < 2:
        return usage(ctx, name)
    offset = num(opts.operands[0], ctx)
    if offset is None:
        return False
    sizes = iovec(opts.operands[1:], ctx)
    if sizes is None:
        return False
    size = sum(sizes)
    verify = None if pattern is None else Verify(pattern, 0, size)
    try:
        result = do_pread(driver, offset, size, verify, keep=verbose and not quiet)
    except IO_ERRORS as exc:
        report_failure(ctx, "readv", exc)
        return aio  # an aio request "succeeded" once submitted
    ok = True
    if verify is not None and not result.matched:
        ctx.print(f"Pattern verification failed at offset {offset}, {size} bytes")
        ok = aio
    if quiet:
        return ok
    dump(ctx, result.data, offset)
    report(ctx, io_report("read", result.elapsed_ns, offset, size, size, machine=machine))
    return ok


def readv_f(driver: BlockDriver | None, argv: list[str], ctx: CommandContext) -> bool:
    """``readv [-Cqv] [-P pattern] off len [len..]``: one read of the lengths' sum."""
    assert driver is not None
    return _vector_read(driver, argv, ctx, "readv", "CP:qv")


def aio_read_f(driver: BlockDriver | None, argv: list[str], ctx: CommandContext) -> bool:
    """``aio_read [-Ciqv] [-P pattern] off len [len..]``: like readv; fails only on bad
    arguments (an I/O error or mismatch is printed, as when qemu-io's request completes)."""
    assert driver is not None
    return _vector_read(driver, argv, ctx, "aio_read", "CP:iqv")


def write_f(driver: BlockDriver | None, argv: list[str], ctx: CommandContext) -> bool:
    """``write [-bcCfnpquz] [-P pattern | -s file] off len``: pattern, file, zero or compressed
    write of one range; flushed afterwards with ``-f`` or write-through caching."""
    assert driver is not None
    machine = quiet = vmstate = compressed = fua = no_fallback = unmap = zero = False
    pattern_given = False
    pattern = 0xCD
    source_file: str | None = None
    opts = GetOpt(argv, "bcCfnpP:qs:uz")
    for opt, arg in options(opts, ctx, "write"):
        if opt == "?":
            return False
        if opt == "P":
            pattern_given = True
            value = pattern_arg(arg or "", ctx)
            if value is None:
                return False
            pattern = value
        elif opt == "s":
            source_file = arg
        else:
            vmstate |= opt == "b"
            compressed |= opt == "c"
            machine |= opt == "C"
            fua |= opt == "f"
            no_fallback |= opt == "n"
            quiet |= opt == "q"
            unmap |= opt == "u"
            zero |= opt == "z"
    if len(opts.operands) != 2:
        return usage(ctx, "write")
    conflict = None
    if vmstate and zero:
        conflict = "-b and -z cannot be specified at the same time"
    elif fua and (vmstate or compressed):
        conflict = "-f and -b or -c cannot be specified at the same time"
    elif no_fallback and not zero:
        conflict = "-n requires -z to be specified"
    elif unmap and not zero:
        conflict = "-u requires -z to be specified"
    elif zero + pattern_given + (source_file is not None) > 1:
        conflict = "Only one of -z, -P, and -s can be specified at the same time"
    if conflict:
        ctx.print(conflict)
        return False
    offset = num(opts.operands[0], ctx)
    if offset is None:
        return False
    count = num(opts.operands[1], ctx)
    if count is None:
        return False
    if count > BDRV_REQUEST_MAX_BYTES and not no_fallback:
        ctx.print(
            f"length cannot exceed {BDRV_REQUEST_MAX_BYTES} without -n, "
            f"given {opts.operands[1]}"
        )
        return False
    if (vmstate or compressed) and not sector_aligned(offset, count, ctx):
        return False
    source = bytes([pattern])
    if source_file is not None:
        loaded = load_source_file(source_file, count, ctx)
        if loaded is None:
            return False
        source = loaded
    start = time.monotonic_ns()
    try:
        if vmstate:
            raise IOFailedError("no VM state", errno=errno.ENOTSUP)
        if zero:
            driver.pwrite_zeroes(offset, count, may_unmap=unmap)
        elif compressed:
            do_write_compressed(driver, offset, count, source)
        else:
            do_pwrite(driver, offset, count, source)
        flush_after_write(driver, ctx, fua)
    except IO_ERRORS as exc:
        report_failure(ctx, "write", exc)
        return False
    elapsed = time.monotonic_ns() - start
    if not quiet:
        report(ctx, io_report("wrote", elapsed, offset, count, count, machine=machine))
    return True


def _vector_write(
    driver: BlockDriver, argv: list[str], ctx: CommandContext, name: str, optstring: str
) -> bool:
    """writev and aio_write: write the sum of several lengths of the pattern at one offset."""
    aio = name == "aio_write"
    machine = quiet = fua = unmap = zero = False
    pattern = 0xCD
    opts = GetOpt(argv, optstring)
    for opt, arg in options(opts, ctx, name):
        if opt == "?":
            return False
        if opt == "P":
            value = pattern_arg(arg or "", ctx)
            if value is None:
                return False
            pattern = value
        elif opt == "i":
            ctx.print("injecting invalid write request")
            return True
        else:
            machine |= opt == "C"
            fua |= opt == "f"
            quiet |= opt == "q"
            unmap |= opt == "u"
            zero |= opt == "z"
    if len(opts.operands) < 2:
        return usage(ctx, name)
    # qemu-io 7.2 never rejects aio_write -z -P (its -P does not record that it was given).
    if zero and len(opts.operands) != 2:
        ctx.print("-z supports only a single length parameter")
        return False
    if unmap and not zero:
        ctx.print("-u requires -z to be specified")
        return False
    offset = num(opts.operands[0], ctx)
    if offset is None:
        return False
    if zero:
        count = num(opts.operands[1], ctx)
        if count is None:
            return False
        size = count
    else:
        sizes = iovec(opts.operands[1:], ctx)
        if sizes is None:
            return False
        size = sum(sizes)
    start = time.monotonic_ns()
    try:
        if zero:
            driver.pwrite_zeroes(offset, size, may_unmap=unmap)
        else:
            do_pwrite(driver, offset, size, bytes([pattern]))
        flush_after_write(driver, ctx, fua)
    except IO_ERRORS as exc:
        report_failure(ctx, name, exc)
        return aio
    elapsed = time.monotonic_ns() - start
    if not quiet:
        report(ctx, io_report("wrote", elapsed, offset, size, size, machine=machine))
    return True


def writev_f(driver: BlockDriver | None, argv: list[str], ctx: CommandContext) -> bool:
    """``writev [-Cfq] [-P pattern] off len [len..]``: one write of the lengths' sum."""
    assert driver is not None
    return _vector_write(driver, argv, ctx, "writev", "CfqP:")


def aio_write_f(driver: BlockDriver | None, argv: list[str], ctx: CommandContext) -> bool:
    """``aio_write [-Cfiquz] [-P pattern] off len [len..]``: like writev (or a zero write
    with ``-z``); fails only on bad arguments, as aio_read."""
    assert driver is not None
    return _vector_write(driver, argv, ctx, "aio_write", "CfiP:quz")


def discard_f(driver: BlockDriver | None, argv: list[str], ctx: CommandContext) -> bool:
    """``discard [-Cq] off len``: discard a range (bounds checked even when discard is off)."""
    assert driver is not None
    machine = quiet = False
    opts = GetOpt(argv, "Cq")
    for opt, _ in options(opts, ctx, "discard"):
        if opt == "?":
            return False
        machine |= opt == "C"
        quiet |= opt == "q"
    if len(opts.operands) != 2:
        return usage(ctx, "discard")
    span = offset_and_count(opts.operands, ctx)
    if span is None:
        return False
    offset, count = span
    start = time.monotonic_ns()
    try:
        check_range(driver, offset, count)
        if ctx.discard:  # QEMU checks the range even when discard=ignore drops the request
            driver.discard(offset, count)
    except IO_ERRORS as exc:
        report_failure(ctx, "discard", exc)
        return False
    elapsed = time.monotonic_ns() - start
    if not quiet:
        report(ctx, io_report("discard", elapsed, offset, count, count, machine=machine))
    return True
