"""``-drive`` and ``-device`` option values: QEMU 7.2's checks and texts, no I/O.

:func:`parse_drive` and :func:`parse_device` check one option's keys (pass 2 of
:func:`.cmdline.parse_args`); naming anonymous drives and attaching devices to drives needs
the whole command line and stays in :mod:`.cmdline`. Errors are :class:`~.qemuopts.OptionError`
(the caller adds the option as typed) or, for :func:`check_format_options`,
:class:`~.specs.CommandLineError`.
"""

from __future__ import annotations

from collections.abc import Mapping

from . import qemuopts as qo
from .qemuopts import OptionError
from .specs import CacheOptions, CommandLineError, DeviceSpec, DriveSpec, words

__all__ = ["check_format_options", "parse_device", "parse_drive"]

_IF_NAMES = words("ide scsi floppy pflash mtd sd virtio xen none")
_QEMU_FORMATS = words(
    "blkdebug blklogwrites blkreplay blkverify bochs cloop compress copy-before-write "
    "copy-on-read dmg file ftp ftps gluster host_cdrom host_device http https iscsi iser luks "
    "nbd nfs null-aio null-co nvme parallels preallocate qcow qed quorum rbd replication "
    "snapshot-access ssh throttle vdi vhdx vmdk vpc vvfat"
)
_DRIVE_KEYS = words(
    "if index bus unit file format driver node-name read-only auto-read-only force-share cache "
    "cache.direct cache.no-flush cache.writeback aio discard detect-zeroes werror rerror"
)
_DRIVE_REFUSED = ("media", "snapshot", "copy-on-read", "group", "throttling.", "bps", "iops")
_DRIVE_BOOLS = "read-only auto-read-only force-share cache.direct cache.no-flush cache.writeback"
_CACHE_MODES = {  # cache=MODE -> (direct, no-flush, writeback), as bdrv_parse_cache_mode
    "none": (True, False, True),
    "off": (True, False, True),
    "directsync": (True, False, False),
    "writeback": (False, False, True),
    "unsafe": (False, True, True),
    "writethrough": (False, False, False),
}
_DISCARD = {"off": "ignore", "ignore": "ignore", "on": "unmap", "unmap": "unmap"}
_FORMAT_OPTIONS: dict[str, tuple[frozenset[str], tuple[str, ...]]] = {  # names, prefixes
    "qcow2": (
        words(
            "lazy-refcounts pass-discard-request pass-discard-snapshot pass-discard-other "
            "overlap-check cache-size l2-cache-size l2-cache-entry-size refcount-cache-size "
            "cache-clean-interval data-file backing"
        ),
        ("overlap-check.", "encrypt.", "file.", "backing.", "data-file."),
    ),
    "raw": (frozenset({"offset", "size"}), ("file.",)),
}


def _format_option_error(fmt: str, options: Mapping[str, str]) -> OptionError | None:
    names, prefixes = _FORMAT_OPTIONS.get(fmt, (frozenset(), ()))
    for key in options:
        if key not in names and not key.startswith(prefixes):
            return OptionError(f"Block format '{fmt}' does not support the option '{key}'")
    return None


def check_format_options(drive: DriveSpec, fmt: str) -> None:
    """Refuse ``drive.format_options`` that format ``fmt`` does not take (QEMU's text).

    :func:`parse_args` does this itself when ``format=`` is given; a caller that probed the
    format of a drive without one calls it with the probed name.
    """
    err = _format_option_error(fmt, drive.format_options)
    if err is not None:
        raise CommandLineError(err.message, location=drive.origin) from err


def _c_int(number: int) -> int:
    """A uint64 option value stored into a C ``int``, as blockdev.c does with index/bus/unit."""
    number &= 0xFFFFFFFF
    return number - 2**32 if number >= 2**31 else number


def parse_drive(
    drive_id: str | None, opts: dict[str, str], loc: str
) -> tuple[DriveSpec, dict[str, int]]:
    """Check one ``-drive``'s options; the id of an anonymous drive is chosen in pass 3."""
    if "driver" in opts and "format" in opts:
        raise OptionError("Cannot specify both 'driver' and 'format'")
    if "readonly" in opts and "read-only" in opts:
        raise OptionError("'read-only' and its alias 'readonly' can't be used at the same time")
    flat = {("read-only" if k == "readonly" else k): v for k, v in opts.items()}
    bools = {k: qo.parse_bool(k, flat[k]) for k in _DRIVE_BOOLS.split() if k in flat}
    interface = flat.get("if", "ide")
    if interface not in ("virtio", "none"):
        if interface in _IF_NAMES:
            raise OptionError(
                f"if={interface} is not supported by bitbackd: use if=virtio or if=none"
            )
        raise OptionError(f"unsupported bus type '{interface}'")
    naming: dict[str, int] = {
        k: _c_int(qo.parse_number(k, flat[k])) for k in ("index", "bus", "unit") if k in flat
    }
    for key in flat:
        if key.startswith(_DRIVE_REFUSED):
            raise OptionError(f"bitbackd does not support the -drive option '{key}'")
    werror, rerror = flat.get("werror", "enospc"), flat.get("rerror", "report")
    if werror not in ("ignore", "enospc", "stop", "report"):
        raise OptionError(f"'{werror}' invalid write error action")
    if rerror not in ("ignore", "stop", "report"):
        raise OptionError(f"'{rerror}' invalid read error action")
    if flat.get("cache", "writeback") not in _CACHE_MODES:
        raise OptionError("invalid cache option")
    direct, no_flush, writeback = _CACHE_MODES[flat.get("cache", "writeback")]
    cache = CacheOptions(
        bools.get("cache.direct", direct),
        bools.get("cache.no-flush", no_flush),
        bools.get("cache.writeback", writeback),
    )
    aio = flat.get("aio", "threads")
    if aio not in ("threads", "native", "io_uring"):
        raise OptionError("invalid aio option")
    discard = _DISCARD.get(flat.get("discard", "ignore"))
    if discard is None:
        raise OptionError("Invalid discard option")
    detect_zeroes = flat.get("detect-zeroes", "off")
    if detect_zeroes not in ("off", "on", "unmap"):
        raise OptionError(f"invalid parameter value: {detect_zeroes}")
    if aio == "native" and not cache.direct:
        raise OptionError(
            "aio=native was specified, but it requires cache.direct=on, which was not specified."
        )
    read_only = bools.get("read-only", False)
    if bools.get("force-share", False) and not read_only:
        raise OptionError("force-share=on can only be used with read-only images")
    fmt = flat.get("format", flat.get("driver"))
    if fmt is not None and fmt not in _FORMAT_OPTIONS:
        if fmt in _QEMU_FORMATS:
            raise OptionError(f"bitbackd does not support the block format '{fmt}'")
        raise OptionError(f"Unknown driver '{fmt}'")
    if fmt is not None and "file" not in flat:
        raise OptionError('A block device must be specified for "file"')
    node_name = flat.get("node-name")
    if node_name is not None and not qo.id_wellformed(node_name):
        raise OptionError(f"Invalid node-name: '{node_name}'")
    if node_name is not None and len(node_name) > 31:
        raise OptionError("Node name too long")
    format_options = {k: v for k, v in flat.items() if k not in _DRIVE_KEYS}
    err = _format_option_error(fmt, format_options) if fmt is not None else None
    if err is not None:
        raise err
    spec = DriveSpec(
        drive_id or "", interface, flat.get("file"), fmt, node_name, read_only,
        bools.get("auto-read-only", False), bools.get("force-share", False), cache, aio,
        discard, detect_zeroes, werror, rerror, format_options, opts, loc,
    )  # fmt: skip
    return spec, naming


_DEVICE_DRIVERS = {
    "virtio-blk": "virtio-blk-pci",
    "virtio-blk-pci": "virtio-blk-pci",
    "virtio-blk-device": "virtio-blk-device",
}
_DEVICE_PROPERTIES = words(
    "drive serial bootindex share-rw write-cache logical_block_size physical_block_size "
    "discard write-zeroes num-queues queue-size iothread bus addr"
)


def parse_device(device_id: str | None, opts: dict[str, str], loc: str) -> DeviceSpec:
    """Check one ``-device``: a virtio-blk with a ``drive``; other properties are recorded."""
    driver = opts.pop("driver", None)
    if driver is None:
        raise OptionError("Parameter 'driver' is missing")
    if driver in ("help", "?"):
        raise OptionError("Help is not available for this option")
    canonical = _DEVICE_DRIVERS.get(driver)
    if canonical is None:
        raise OptionError(f"bitbackd supports only virtio-blk devices, not '{driver}'")
    for key in opts:
        if key not in _DEVICE_PROPERTIES:
            raise OptionError(f"Property '{canonical}.{key}' not found")
    drive = opts.pop("drive", None)
    if drive is None:
        raise OptionError("drive property not set")
    return DeviceSpec(canonical, drive, device_id, opts, False, loc)
