"""``bitback-img commit``: fold an image's changes into its backing file (``qemu-img commit``).

Everything some layer above the base allocates - the image itself and, with ``-b`` naming a
deeper image, the images in between - is written into the base: data copied as read through
the chain, zero ranges as (unmapping) write-zeroes. The base grows first if it is smaller.
As QEMU's commit job (a mirror) copies whole granules of its dirty bitmap, ranges are
widened to the base's cluster size (4 KiB..64 KiB, 64 KiB when unknown). Then, unless ``-d``
(or ``-b``, which implies it), the image is emptied so it shows its backing file again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from bitback.block.chain import (
    backing_chain,
    find_backing,
    is_allocated_above,
    read,
    status_above,
    virtual_size,
)
from bitback.block.driver import BlockDriver
from bitback.errors import BitbackError
from bitback.tools.img.images import check_cache, open_img
from bitback.tools.img.options import HelpRequested, OptSpec, UsageError, cvtnum, getopt
from bitback.tools.img.progress import Progress

__all__ = ["allocated_runs", "commit", "img_commit"]

CHUNK = 2 << 20

SPEC = OptSpec("hf:t:b:dpqr:", {"help": (False, "h")})


def granularity(base: BlockDriver) -> int:
    """The commit job's copy unit for ``base`` (``bdrv_get_default_bitmap_granularity``)."""
    cs = base.cluster_size
    return 65536 if cs is None else min(65536, max(4096, cs))


def allocated_runs(
    top: BlockDriver, base: BlockDriver, gran: int, end: int
) -> Iterator[tuple[int, int]]:
    """Ranges allocated above ``base``, widened to ``gran`` and merged, up to ``end``."""
    pending: tuple[int, int] | None = None
    pos = 0
    while pos < end:
        allocated, n = is_allocated_above(top, base, pos, end - pos)
        if allocated:
            lo = pos // gran * gran
            hi = min(end, -(-(pos + n) // gran) * gran)
            if pending is not None and lo <= pending[1]:
                pending = (pending[0], max(pending[1], hi))
            else:
                if pending is not None:
                    yield pending
                pending = (lo, hi)
        pos += n
    if pending is not None:
        yield pending


def commit(
    top: BlockDriver, base: BlockDriver, *, on_progress: Callable[[float], None] | None = None
) -> None:
    """Write what ``top`` allocates above ``base`` into ``base`` (both opened, base
    writable). Does not empty ``top``."""
    end = virtual_size(top)
    if virtual_size(base) < end:
        base.truncate(end)
    gran = granularity(base)
    runs = list(allocated_runs(top, base, gran, end))
    total = sum(hi - lo for lo, hi in runs) or 1
    done = 0
    for lo, hi in runs:
        pos = lo
        while pos < hi:
            st = status_above(top, None, pos, min(hi - pos, CHUNK))
            n = st.length - st.length % gran if st.length >= gran else min(gran, hi - pos)
            n = min(n, hi - pos, CHUNK)
            if st.zero and st.length >= n:
                base.pwrite_zeroes(pos, n, may_unmap=True)
            else:
                base.pwrite(pos, read(top, pos, n))
            pos += n
            done += n
            if on_progress is not None:
                on_progress(100.0 * done / total)
    base.flush()


def img_commit(argv: list[str]) -> int:
    """``commit [-f fmt] [-t cache] [-b base] [-d] [-p] [-q] FILE``."""
    opts, operands = getopt(argv, SPEC)
    fmt: str | None = None
    base_name: str | None = None
    drop = progress = quiet = False
    cache: str | None = None
    for key, value in opts:
        if key == "h":
            raise HelpRequested
        assert value is not None or key in "dpq"
        if key == "f":
            fmt = value
        elif key == "t":
            cache = value
        elif key == "b":
            base_name = value
            drop = True  # -b implies -d
        elif key == "d":
            drop = True
        elif key == "p":
            progress = True
        elif key == "q":
            quiet = True
        elif key == "r":
            assert value is not None
            cvtnum("rate limit", value)  # checked like qemu-img; bitback does not throttle
    if len(operands) != 1:
        raise UsageError("Expecting one image file name")
    filename = operands[0]
    check_cache(cache)
    # Find the base first, to know which layer must be opened writable. The image is
    # opened writable already, as qemu-img opens it (a probed raw image warns here).
    with open_img(filename, fmt, read_only=False) as probe:
        depth = _base_depth(probe, filename, base_name)
    meter = Progress(progress and not quiet, 1.0)
    try:
        meter.print(0, 100)
        with open_img(filename, fmt, read_only=False, writable={depth}) as top:
            base = backing_chain(top)[depth]
            commit(top, base, on_progress=lambda pct: meter.print(pct, 0))
            if not drop:
                make_empty = getattr(top, "make_empty", None)
                if make_empty is not None:  # formats without it keep their data (ENOTSUP)
                    make_empty()
            meter.print(100, 0)
    finally:
        meter.end()
    if not quiet:
        print("Image committed.")
    return 0


def _base_depth(top: BlockDriver, filename: str, base_name: str | None) -> int:
    chain = backing_chain(top)
    if base_name is None:
        if top.backing is None:
            raise BitbackError("Image does not have a backing file")
        return 1
    found = find_backing(top, base_name)
    if found is None:
        raise BitbackError(f"Did not find '{base_name}' in the backing chain of '{filename}'")
    return chain.index(found)
