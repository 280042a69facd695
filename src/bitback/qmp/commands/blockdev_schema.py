"""``BlockdevOptions``: the argument schema of ``blockdev-add`` (and of ``-blockdev``).

Transcribed from QEMU 7.2's ``qapi/block-core.json`` for the drivers bitbackd implements:
file, raw, qcow2, blkdebug and null-co. The ``driver`` enum lists every QEMU driver, so an
unknown name gets QEMU's enum error; a QEMU driver that bitbackd lacks is refused by name
(:func:`unsupported_driver`) before validation, rather than with a confusing complaint about
one of its members. Members that are accepted but have no effect here: ``cache``,
``detect-zeroes``, ``auto-read-only``, ``force-share``, file ``aio``/``locking``, the qcow2
cache sizes and ``pass-discard-*``.
"""

from __future__ import annotations

from typing import Any

from bitback.block.drivers.blkdebug import EVENTS, IOTYPES
from bitback.block.graph import DRIVERS
from bitback.errors import UnsupportedFeatureError
from bitback.qmp.schema import (
    ANY,
    BOOL,
    INT,
    NULL,
    STR,
    UINT64,
    Alternate,
    Enum,
    ListOf,
    Member,
    Struct,
    Union,
)

__all__ = [
    "BLOCKDEV_OPTIONS",
    "BLOCKDEV_REF",
    "QEMU_DRIVERS",
    "refuse_unsupported_driver",
    "unsupported_driver",
]

QEMU_DRIVERS = (
    "blkdebug", "blklogwrites", "blkverify", "blkreplay", "bochs", "cloop", "compress",
    "copy-before-write", "copy-on-read", "dmg", "file", "ftp", "ftps", "gluster", "host_cdrom",
    "host_device", "http", "https", "iscsi", "luks", "nbd", "nfs", "null-aio", "null-co",
    "nvme", "parallels", "preallocate", "qcow2", "qcow", "qed", "quorum", "raw", "rbd",
    "replication", "snapshot-access", "ssh", "throttle", "vdi", "vhdx", "vmdk", "vpc", "vvfat",
)  # fmt: skip


def _opt(name: str, t: Any) -> Member:
    return Member(name, t, optional=True)


# BlockdevRef is recursive (a child is options or a node name); its object branch is filled
# in once BLOCKDEV_OPTIONS exists, below.
BLOCKDEV_REF = Alternate("BlockdevRef", [STR])
BLOCKDEV_REF_OR_NULL = Alternate("BlockdevRefOrNull", [STR, NULL])

_CACHE = Struct("BlockdevCacheOptions", [_opt("direct", BOOL), _opt("no-flush", BOOL)])

_BASE = [
    Member("driver", Enum("BlockdevDriver", QEMU_DRIVERS)),
    _opt("node-name", STR),
    _opt("discard", Enum("BlockdevDiscardOptions", ["ignore", "unmap"])),
    _opt("cache", _CACHE),
    _opt("read-only", BOOL),
    _opt("auto-read-only", BOOL),
    _opt("force-share", BOOL),
    _opt("detect-zeroes", Enum("BlockdevDetectZeroesOptions", ["off", "on", "unmap"])),
]

_FILE = Struct(
    "BlockdevOptionsFile",
    [
        Member("filename", STR),
        _opt("pr-manager", STR),
        _opt("locking", Enum("OnOffAuto", ["auto", "on", "off"])),
        _opt("aio", Enum("BlockdevAioOptions", ["threads", "native", "io_uring"])),
        _opt("aio-max-batch", INT),
        _opt("drop-cache", BOOL),
        _opt("x-check-cache-dropped", BOOL),
    ],
)

_NULL = Struct(
    "BlockdevOptionsNull",
    [_opt("size", INT), _opt("latency-ns", UINT64), _opt("read-zeroes", BOOL)],
)

_RAW = Struct(
    "BlockdevOptionsRaw", [Member("file", BLOCKDEV_REF), _opt("offset", INT), _opt("size", INT)]
)

_QCOW2 = Struct(
    "BlockdevOptionsQcow2",
    [
        Member("file", BLOCKDEV_REF),
        _opt("backing", BLOCKDEV_REF_OR_NULL),
        _opt("lazy-refcounts", BOOL),
        _opt("pass-discard-request", BOOL),
        _opt("pass-discard-snapshot", BOOL),
        _opt("pass-discard-other", BOOL),
        _opt("overlap-check", ANY),
        _opt("cache-size", INT),
        _opt("l2-cache-size", INT),
        _opt("l2-cache-entry-size", INT),
        _opt("refcount-cache-size", INT),
        _opt("cache-clean-interval", INT),
        _opt("encrypt", ANY),
        _opt("data-file", BLOCKDEV_REF),
    ],
)

_EVENT = Enum("BlkdebugEvent", EVENTS)
_INJECT = Struct(
    "BlkdebugInjectErrorOptions",
    [
        Member("event", _EVENT),
        _opt("state", INT),
        _opt("iotype", Enum("BlkdebugIOType", IOTYPES)),
        _opt("errno", INT),
        _opt("sector", INT),
        _opt("once", BOOL),
        _opt("immediately", BOOL),
    ],
)
_SET_STATE = Struct(
    "BlkdebugSetStateOptions",
    [Member("event", _EVENT), _opt("state", INT), Member("new_state", INT)],
)
_PERMS = Enum("BlockPermission", ["consistent-read", "write", "write-unchanged", "resize"])
_BLKDEBUG = Struct(
    "BlockdevOptionsBlkdebug",
    [
        Member("image", BLOCKDEV_REF),
        _opt("config", STR),
        _opt("align", INT),
        _opt("max-transfer", INT),
        _opt("opt-write-zero", INT),
        _opt("max-write-zero", INT),
        _opt("opt-discard", INT),
        _opt("max-discard", INT),
        _opt("inject-error", ListOf(_INJECT)),
        _opt("set-state", ListOf(_SET_STATE)),
        _opt("take-child-perms", ListOf(_PERMS)),
        _opt("unshare-child-perms", ListOf(_PERMS)),
    ],
)

BLOCKDEV_OPTIONS = Union(
    "BlockdevOptions",
    _BASE,
    "driver",
    {"file": _FILE, "null-co": _NULL, "raw": _RAW, "qcow2": _QCOW2, "blkdebug": _BLKDEBUG},
)

object.__setattr__(BLOCKDEV_REF, "branches", (BLOCKDEV_OPTIONS, STR))
object.__setattr__(BLOCKDEV_REF_OR_NULL, "branches", (BLOCKDEV_OPTIONS, STR, NULL))

_CHILD_KEYS = ("file", "image", "backing", "data-file")


def unsupported_driver(options: object) -> str | None:
    """The first QEMU driver in an options tree that bitbackd does not implement."""
    if not isinstance(options, dict):
        return None
    driver = options.get("driver")
    if isinstance(driver, str) and driver in QEMU_DRIVERS and driver not in DRIVERS:
        return driver
    for key in _CHILD_KEYS:
        found = unsupported_driver(options.get(key))
        if found is not None:
            return found
    return None


def refuse_unsupported_driver(options: dict[str, Any]) -> None:
    """Raise a clear error when the options name a QEMU driver bitbackd lacks."""
    driver = unsupported_driver(options)
    if driver is not None:
        raise UnsupportedFeatureError(f"Driver '{driver}' is not supported by bitbackd")
