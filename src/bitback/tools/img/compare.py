"""``bitback-img compare``: are two images the same for the guest? (``qemu-img compare``)

Both images are read through their backing chains. The walk goes by block status runs: a
range that reads as zeros in both is skipped without reading; a range allocated in both is
read from both in chunks of up to 2 MiB and compared with one ``memcmp``-speed equality; a
range allocated in only one must read as zeros there. If the sizes differ, the common part
must match and the rest of the larger image must read as zeros (``Warning: Image size
mismatch!``). A difference is reported at the start of the first differing 512-byte sector.

``-s`` (strict) also fails on a size difference or on any block-status difference (the
allocation flags, data/zero, "has an offset" and end-of-file flags QEMU compares).

Exit codes: 0 identical, 1 different, 2 an image cannot be opened, 3 block status failed,
4 read error.
"""

from __future__ import annotations

import os

import numpy as np

from bitback.block.chain import AboveStatus, readinto, status_above, virtual_size
from bitback.block.driver import BlockDriver
from bitback.errors import BitbackError
from bitback.tools.img.images import check_cache, open_img, report
from bitback.tools.img.options import HelpRequested, OptSpec, UsageError, getopt
from bitback.tools.img.progress import Progress

__all__ = [
    "EXIT_DIFFERENT",
    "EXIT_IDENTICAL",
    "EXIT_OPEN",
    "EXIT_READ",
    "EXIT_STATUS",
    "IO_BUF_SIZE",
    "first_difference",
    "first_nonzero_sector",
    "img_compare",
]

EXIT_IDENTICAL, EXIT_DIFFERENT, EXIT_OPEN, EXIT_STATUS, EXIT_READ = 0, 1, 2, 3, 4
IO_BUF_SIZE = 2 << 20
SECTOR = 512

SPEC = OptSpec(
    "hf:F:T:pqsU",
    {"help": (False, "h"), "force-share": (False, "U")},
)


def first_difference(a: bytearray, b: bytearray, n: int) -> int | None:
    """Offset of the first differing 512-byte sector in ``a[:n]`` / ``b[:n]``, or None."""
    if n == len(a) == len(b):
        if a == b:
            return None
    elif memoryview(a)[:n].tobytes() == memoryview(b)[:n].tobytes():
        return None
    diff = np.frombuffer(a, np.uint8, n) != np.frombuffer(b, np.uint8, n)
    return int(np.argmax(diff)) // SECTOR * SECTOR


def first_nonzero_sector(buf: bytearray, n: int) -> int | None:
    """Offset of the first 512-byte sector of ``buf[:n]`` holding a non-zero byte."""
    arr = np.frombuffer(buf, np.uint8, n)
    if not arr.any():
        return None
    return int(np.argmax(arr != 0)) // SECTOR * SECTOR


class _Done(Exception):
    """Ends the comparison with an exit code (the message is already printed)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class _Comparison:
    def __init__(
        self,
        names: tuple[str, str],
        nodes: tuple[BlockDriver, BlockDriver],
        quiet: bool,
        progress: Progress,
    ) -> None:
        self.names = names
        self.nodes = nodes
        self.quiet = quiet
        self.progress = progress
        self.bufs = (bytearray(IO_BUF_SIZE), bytearray(IO_BUF_SIZE))

    def say(self, text: str) -> None:
        if not self.quiet:
            print(text)

    def differ(self, offset: int) -> _Done:
        self.say(f"Content mismatch at offset {offset}!")
        return _Done(EXIT_DIFFERENT)

    def status(self, i: int, offset: int, limit: int) -> AboveStatus:
        try:
            return status_above(self.nodes[i], None, offset, limit - offset)
        except BitbackError:
            report(f"Sector allocation test failed for {self.names[i]}")
            raise _Done(EXIT_STATUS) from None

    def read(self, i: int, offset: int, n: int) -> bytearray:
        buf = self.bufs[i]
        try:
            readinto(self.nodes[i], offset, memoryview(buf)[:n])
        except BitbackError as exc:
            report(
                f"Error while reading offset {offset} of {self.names[i]}: {os.strerror(exc.errno)}"
            )
            raise _Done(EXIT_READ) from None
        return buf

    def check_empty(self, i: int, offset: int, n: int) -> None:
        where = first_nonzero_sector(self.read(i, offset, n), n)
        if where is not None:
            raise self.differ(offset + where)

    def compare_runs(
        self,
        offset: int,
        first: int,
        total: int,
        sizes: tuple[int, int],
        strict: bool,
        base: int,
    ) -> int:
        """Compare the run at ``offset`` allocated in both images, together with the runs
        that follow it while they are allocated in both too and fit in one buffer: one read
        per image instead of one per run (a fragmented image has a run per cluster). The
        runs, the progress steps and the reported offset are QEMU's, run by run. Returns
        where the comparison goes on."""
        runs = [first]
        end = offset + first
        while end < total and end - offset < IO_BUF_SIZE:
            s1, s2 = self.status(0, end, sizes[0]), self.status(1, end, sizes[1])
            if not (s1.allocated and s2.allocated) or (s1.zero and s2.zero):
                break
            if strict and s1.flags() != s2.flags():
                break
            n = min(s1.length, s2.length, IO_BUF_SIZE)
            if end - offset + n > IO_BUF_SIZE:
                break
            runs.append(n)
            end += n
        length = end - offset
        a, b = self.read(0, offset, length), self.read(1, offset, length)
        where = first_difference(a, b, length)
        pos = offset
        for n in runs:
            if where is not None and pos + n > offset + where:
                raise self.differ(offset + where)
            pos += n
            self.progress.print(n / base * 100, 100)
        return end

    def run(self, strict: bool) -> int:
        size1, size2 = (virtual_size(n) for n in self.nodes)
        total, base = min(size1, size2), max(size1, size2)
        self.progress.print(0, 100)
        if strict and size1 != size2:
            self.say("Strict mode: Image size mismatch!")
            return EXIT_DIFFERENT
        offset = 0
        while offset < total:
            st1, st2 = self.status(0, offset, size1), self.status(1, offset, size2)
            chunk = min(st1.length, st2.length)
            if strict and st1.flags() != st2.flags():
                self.say(f"Strict mode: Offset {offset} block status mismatch!")
                return EXIT_DIFFERENT
            if st1.zero and st2.zero:
                pass
            elif st1.allocated == st2.allocated:
                if st1.allocated:
                    offset = self.compare_runs(
                        offset, min(chunk, IO_BUF_SIZE), total, (size1, size2), strict, base
                    )
                    continue
            else:
                chunk = min(chunk, IO_BUF_SIZE)
                self.check_empty(0 if st1.allocated else 1, offset, chunk)
            offset += chunk
            self.progress.print(chunk / base * 100, 100)
        if size1 != size2:
            self.say("Warning: Image size mismatch!")
            over = 0 if size1 > size2 else 1
            while offset < base:
                st = self.status(over, offset, base)
                chunk = st.length
                if st.allocated and not st.zero:
                    chunk = min(chunk, IO_BUF_SIZE)
                    self.check_empty(over, offset, chunk)
                offset += chunk
                self.progress.print(chunk / base * 100, 100)
        self.say("Images are identical.")
        return EXIT_IDENTICAL


def img_compare(argv: list[str]) -> int:
    """``compare [-f fmt] [-F fmt] [-s] [-p] [-q] IMG1 IMG2``."""
    opts, operands = getopt(argv, SPEC)
    fmt1: str | None = None
    fmt2: str | None = None
    progress = quiet = strict = False
    cache: str | None = None
    for key, value in opts:
        if key == "h":
            raise HelpRequested
        if key == "f":
            fmt1 = value
        elif key == "F":
            fmt2 = value
        elif key == "T":
            cache = value
        elif key == "p":
            progress = True
        elif key == "q":
            quiet = True
        elif key == "s":
            strict = True
    if len(operands) != 2:
        raise UsageError("Expecting two image file names")
    meter = Progress(progress and not quiet, 2.0)
    opened: list[BlockDriver] = []
    try:
        try:
            check_cache(cache, source=True)
            for name, fmt in zip(operands, (fmt1, fmt2), strict=True):
                opened.append(open_img(name, fmt))
        except BitbackError as exc:
            report(str(exc))
            return EXIT_OPEN
        job = _Comparison((operands[0], operands[1]), (opened[0], opened[1]), quiet, meter)
        try:
            return job.run(strict)
        except _Done as done:
            return done.code
    finally:
        for node in opened:
            node.close()
        meter.end()
