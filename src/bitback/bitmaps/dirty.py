"""Dirty bitmaps as QMP sees them: name, flags, status and the successor protocol.

A :class:`DirtyBitmap` wraps a :class:`~bitback.bitmaps.bits.GranuleBits` with the state QEMU's
``BdrvDirtyBitmap`` keeps (``block/dirty-bitmap.c``). It knows nothing of nodes or jobs: the
block layer calls :meth:`DirtyBitmap.mark` on every bitmap of a node after each write,
write-zeroes or performed discard, and a backup job drives the successor protocol::

    create_successor()   B frozen: disabled, busy; new anonymous S records writes instead
        ... job runs; B's bits are the job's copy set, S collects writes made meanwhile ...
    abdicate()           success: B := S (only the writes made during the job)
    reclaim()            failure or cancel: B := B | S (nothing lost)

Both end the freeze: B is recording again exactly when S was, and no longer busy. The caller
attaches the successor to the node after ``create_successor`` and detaches the one that
``abdicate``/``reclaim`` return.

Granularity rules for user bitmaps (``block-dirty-bitmap-add``) are :func:`check_granularity`
and :func:`default_granularity`.
"""

from __future__ import annotations

import errno as _errno
from enum import StrEnum

from bitback.bitmaps.bits import GranuleBits
from bitback.errors import InvalidArgumentError

__all__ = [
    "DEFAULT_GRANULARITY",
    "MAX_GRANULARITY",
    "MIN_GRANULARITY",
    "BitmapBusyError",
    "BitmapInconsistentError",
    "BitmapReadOnlyError",
    "BitmapStateError",
    "BitmapStatus",
    "DirtyBitmap",
    "GranularityError",
    "check_granularity",
    "default_granularity",
]

MIN_GRANULARITY = 512  # BDRV_SECTOR_SIZE
MAX_GRANULARITY = 1 << 31  # the largest power of two a QMP uint32 holds
DEFAULT_GRANULARITY = 65536
_MIN_DEFAULT_GRANULARITY = 4096


# ------------------------------------------------------------------------------- errors


class GranularityError(InvalidArgumentError):
    """A bitmap granularity QEMU refuses; ``granularity`` is the value asked for."""

    def __init__(self, granularity: int) -> None:
        super().__init__("Granularity must be power of 2 and at least 512")
        self.granularity = granularity


class BitmapStateError(InvalidArgumentError):
    """The bitmap's state forbids the operation; ``bitmap`` is its name (None if anonymous)."""

    def __init__(self, message: str, *, bitmap: str | None) -> None:
        super().__init__(message)
        self.bitmap = bitmap


class BitmapBusyError(BitmapStateError):
    """The bitmap is in use by an operation (a job, an export) and cannot be used."""

    errno = _errno.EBUSY


class BitmapReadOnlyError(BitmapStateError):
    """The bitmap is read-only (loaded from a read-only image) and cannot be modified."""

    errno = _errno.EACCES


class BitmapInconsistentError(BitmapStateError):
    """The bitmap was found in use on load; it can only be removed.

    ``hint`` is the extra line QEMU prints for humans (not part of the QMP error text).
    """

    hint = "Try block-dirty-bitmap-remove to delete this bitmap from disk"


# ------------------------------------------------------------------------------- granularity


def check_granularity(granularity: int) -> None:
    """Refuse a granularity that is not a power of two in ``[512, 2**31]``.

    >>> check_granularity(65536)
    >>> check_granularity(64000)
    Traceback (most recent call last):
    ...
    bitback.bitmaps.dirty.GranularityError: Granularity must be power of 2 and at least 512

    QEMU's QMP layer refuses values above 2**31 earlier, as out of uint32 range; they get the
    same message here.
    """
    if (
        granularity < MIN_GRANULARITY
        or granularity > MAX_GRANULARITY
        or granularity & (granularity - 1)
    ):
        raise GranularityError(granularity)


def default_granularity(cluster_size: int | None) -> int:
    """QEMU's ``bdrv_get_default_bitmap_granularity``: the cluster size clamped to [4k, 64k].

    A node without a cluster size (``None`` or 0) gets 64 KiB.

    >>> [default_granularity(c) for c in (None, 512, 4096, 65536, 131072, 2 << 20)]
    [65536, 4096, 4096, 65536, 65536, 65536]
    """
    if cluster_size is None or cluster_size <= 0:
        return DEFAULT_GRANULARITY
    return min(DEFAULT_GRANULARITY, max(_MIN_DEFAULT_GRANULARITY, cluster_size))


# ------------------------------------------------------------------------------- the bitmap


class BitmapStatus(StrEnum):
    """The seed-era ``status`` member of ``BlockDirtyInfo`` (deprecated in 4.0, gone in 6.0)."""

    ACTIVE = "active"
    DISABLED = "disabled"
    FROZEN = "frozen"
    LOCKED = "locked"
    INCONSISTENT = "inconsistent"


class DirtyBitmap:
    """A named (or anonymous) dirty bitmap with QEMU's flags.

    * ``enabled``: this bitmap's own bits follow writes (QEMU's ``!disabled``).
    * ``busy``: in use by an operation; QMP may not touch it.
    * ``readonly``: loaded from a read-only image; may be read, never modified.
    * ``persistent``: stored in the qcow2 image on close.
    * ``inconsistent``: a persistent bitmap found in use on load; it can only be removed.
    * ``successor``: the anonymous bitmap recording writes while this one is frozen.

    Geometry is that of :class:`~bitback.bitmaps.bits.GranuleBits`: a 64 MiB disk at 64 KiB
    granularity has 1024 granules, and a 512-byte write at offset 0 makes ``count()`` 65536.
    """

    __slots__ = (
        "bits",
        "busy",
        "enabled",
        "inconsistent",
        "name",
        "persistent",
        "readonly",
        "successor",
    )

    def __init__(
        self,
        size: int,
        granularity: int,
        name: str | None = None,
        *,
        enabled: bool = True,
        persistent: bool = False,
    ) -> None:
        check_granularity(granularity)
        self.name = name
        self.bits = GranuleBits(size, granularity)
        self.enabled = enabled
        self.persistent = persistent
        self.inconsistent = False
        self.busy = False
        self.readonly = False
        self.successor: DirtyBitmap | None = None

    # ---------------------------------------------------------------- derived state

    @property
    def size(self) -> int:
        """Size in bytes of the disk the bitmap covers."""
        return self.bits.size

    @property
    def granularity(self) -> int:
        """Bytes per bit."""
        return self.bits.granularity

    @property
    def frozen(self) -> bool:
        """True while a successor exists (between create_successor and abdicate/reclaim)."""
        return self.successor is not None

    @property
    def recording(self) -> bool:
        """Whether writes to the node end up in this bitmap, now or when the freeze ends.

        True if enabled, or frozen with a recording successor: a bitmap frozen by a running
        backup reports ``recording: true``.
        """
        return self.enabled or (self.successor is not None and self.successor.enabled)

    @property
    def status(self) -> BitmapStatus:
        """Seed-era status: inconsistent, then frozen, then locked (busy), then disabled."""
        if self.inconsistent:
            return BitmapStatus.INCONSISTENT
        if self.successor is not None:
            return BitmapStatus.FROZEN
        if self.busy:
            return BitmapStatus.LOCKED
        if not self.enabled:
            return BitmapStatus.DISABLED
        return BitmapStatus.ACTIVE

    def count(self) -> int:
        """Dirty bytes, whole granules (spec 5.2)."""
        return self.bits.count()

    def _label(self) -> str:
        # QEMU formats a NULL name with %s, which glibc prints as "(null)".
        return self.name if self.name is not None else "(null)"

    # ---------------------------------------------------------------- recording

    def mark(self, offset: int, length: int) -> None:
        """Record a write of ``length`` bytes at ``offset``, if this bitmap is enabled.

        A frozen bitmap is disabled, so while a job holds it the write lands only in the
        successor (which the block layer marks as one more bitmap of the node).
        """
        if self.enabled:
            self.bits.set_range(offset, length)

    def mark_inconsistent(self) -> None:
        """Flag the bitmap as found in use on load; like QEMU, this also disables it."""
        self.inconsistent = True
        self.enabled = False

    def resize(self, new_size: int) -> None:
        """Follow the node to ``new_size`` bytes (the successor too, if any)."""
        self.bits.resize(new_size)
        if self.successor is not None:
            self.successor.resize(new_size)

    # ---------------------------------------------------------------- checks

    def check_usable(self, *, for_write: bool = True) -> None:
        """Refuse a busy, (when writing) read-only, or inconsistent bitmap, in that order.

        ``for_write=True`` is QEMU's ``BDRV_BITMAP_DEFAULT`` check (clear, merge into, enable,
        disable, remove, a backup whose bitmap-mode is not ``never``); ``for_write=False`` is
        ``BDRV_BITMAP_ALLOW_RO`` (the bitmap is only read: a merge source, the bitmap a backup
        copies from).
        """
        if self.busy:
            raise BitmapBusyError(
                f"Bitmap '{self._label()}' is currently in use by another operation "
                "and cannot be used",
                bitmap=self.name,
            )
        if for_write and self.readonly:
            raise BitmapReadOnlyError(
                f"Bitmap '{self._label()}' is readonly and cannot be modified", bitmap=self.name
            )
        if self.inconsistent:
            raise BitmapInconsistentError(
                f"Bitmap '{self._label()}' is inconsistent and cannot be used", bitmap=self.name
            )

    # ---------------------------------------------------------------- successor protocol

    def create_successor(self) -> DirtyBitmap:
        """Freeze this bitmap and return its new anonymous successor.

        Refused (:class:`BitmapBusyError`) when busy or already frozen. The successor has the
        same size and granularity and records iff this bitmap did; this bitmap becomes
        disabled and busy, so its bits stay as they were until :meth:`abdicate` or
        :meth:`reclaim`.
        """
        if self.busy:
            self.check_usable(for_write=False)  # raises the busy error
        if self.successor is not None:
            raise BitmapBusyError(
                "Cannot create a successor for a bitmap that already has one", bitmap=self.name
            )
        child = DirtyBitmap(self.size, self.granularity, enabled=self.enabled)
        self.enabled = False
        self.successor = child
        self.busy = True
        return child

    def _detach_successor(self, verb: str) -> DirtyBitmap:
        successor = self.successor
        if successor is None:
            message = {
                "abdicate": "Cannot relinquish control if there's no successor present",
                "reclaim": "Cannot reclaim a successor when none is present",
            }[verb]
            raise BitmapStateError(message, bitmap=self.name)
        return successor

    def _end_freeze(self, successor: DirtyBitmap) -> DirtyBitmap:
        self.enabled = successor.enabled
        self.busy = False
        self.successor = None
        return successor

    def abdicate(self) -> DirtyBitmap:
        """End the freeze after success: take the successor's bits; return the successor.

        QEMU hands this bitmap's name to the successor and frees the old bits; keeping this
        object (and its name, persistence and identity) with the successor's bits is the same
        thing seen from QMP.
        """
        successor = self._detach_successor("abdicate")
        self.bits.assign(successor.bits)
        return self._end_freeze(successor)

    def reclaim(self) -> DirtyBitmap:
        """End the freeze after failure or cancel: OR the successor in; return the successor."""
        successor = self._detach_successor("reclaim")
        self.bits.merge(successor.bits)
        return self._end_freeze(successor)

    # ---------------------------------------------------------------- reporting

    def info(self) -> dict[str, object]:
        """``BlockDirtyInfo`` as ``query-block`` shows it, keys in the order QEMU prints them.

        ``name`` only when named, ``inconsistent`` only when true, plus the seed-era
        ``status``. QEMU 7.2 serializes QDicts in hash-bucket order, not schema order; 7.2 was
        observed to print ``name, recording, persistent, busy, granularity, count``, and the
        same hash (``tdb_hash(key) % 512`` in ``qobject/qdict.c``) puts ``status`` between
        ``busy`` and ``granularity`` and ``inconsistent`` last.
        """
        info: dict[str, object] = {}
        if self.name is not None:
            info["name"] = self.name
        info["recording"] = self.recording
        info["persistent"] = self.persistent
        info["busy"] = self.busy
        info["status"] = self.status.value
        info["granularity"] = self.granularity
        info["count"] = self.count()
        if self.inconsistent:
            info["inconsistent"] = True
        return info

    def __repr__(self) -> str:
        return (
            f"DirtyBitmap(name={self.name!r}, size={self.size}, granularity={self.granularity}, "
            f"count={self.count()}, status={self.status.value})"
        )
