"""Typed results of bitbackd's command line: what :func:`.cmdline.parse_args` returns.

Plain data, no parsing: the specs are shared by the option parsers (:mod:`.cmdline`,
:mod:`.drive_options`) and by the daemon that acts on them (:mod:`.main`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from bitback.errors import InvalidArgumentError

from .qemuopts import JsonValue

__all__ = [
    "BlockdevSpec",
    "CacheOptions",
    "ChardevSocket",
    "CommandLineError",
    "DaemonConfig",
    "DeviceSpec",
    "DriveSpec",
    "MonitorSpec",
    "words",
]


def words(text: str) -> frozenset[str]:
    """A set of option or key names written as one space-separated string."""
    return frozenset(text.split())


class CommandLineError(InvalidArgumentError):
    """A command line bitbackd refuses. ``message`` is ``"<location>: <reason>"``, one line.

    ``location`` is the option as typed (``-drive if=scsi,file=x``), or ``None`` for errors that
    QEMU reports without one (``unrecognized option '--bogus'``).
    """

    def __init__(self, reason: str, *, location: str | None = None) -> None:
        super().__init__(f"{location}: {reason}" if location else reason)
        self.reason = reason
        self.location = location


@dataclass(frozen=True, slots=True)
class ChardevSocket:
    """A UNIX socket chardev. ``server``: listen (else connect to ``path``); ``wait``: a
    listening socket blocks startup until its first client connects (QEMU's default)."""

    id: str
    path: str
    server: bool
    wait: bool
    origin: str


@dataclass(frozen=True, slots=True)
class MonitorSpec:
    """A QMP monitor on chardev ``chardev``; ``pretty`` indents replies."""

    chardev: str
    pretty: bool
    id: str | None
    origin: str


@dataclass(frozen=True, slots=True)
class CacheOptions:
    """``cache.*`` after folding ``cache=MODE`` in (explicit ``cache.X`` keys win)."""

    direct: bool = False
    no_flush: bool = False
    writeback: bool = True


@dataclass(frozen=True, slots=True)
class DriveSpec:
    """One ``-drive``: a named BlockBackend ``id`` over a format node on ``file``.

    ``interface`` is ``"virtio"`` (a guest device is attached implicitly: see
    :attr:`DeviceSpec.implicit`) or ``"none"``. ``file`` is ``None`` for an empty drive and
    ``format`` ``None`` when the image must be probed; then :func:`check_format_options` must
    be called on ``format_options`` once the format is known. ``format_options`` holds the keys
    for the format and protocol drivers (``lazy-refcounts``, ``file.locking``...), as strings;
    ``options`` every key as given (last one wins).
    """

    id: str
    interface: str
    file: str | None
    format: str | None
    node_name: str | None
    read_only: bool
    auto_read_only: bool
    force_share: bool
    cache: CacheOptions
    aio: str
    discard: str
    detect_zeroes: str
    werror: str
    rerror: str
    format_options: Mapping[str, str]
    options: Mapping[str, str]
    origin: str


@dataclass(frozen=True, slots=True)
class BlockdevSpec:
    """One ``-blockdev``: ``options`` has the shape of QMP ``blockdev-add`` arguments.

    With ``keyval`` every leaf is a string and the consumer converts while validating, as
    QEMU's keyval visitor does (``"65536"`` for an int, ``"on"`` for a bool)."""

    options: dict[str, JsonValue]
    keyval: bool
    origin: str


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """A virtio-blk guest device on ``drive`` (a drive id or a ``-blockdev`` node-name).

    ``driver`` is QEMU's canonical type name. ``implicit`` devices come from ``if=virtio``
    drives; they follow the explicit ones, as in QEMU. ``properties`` are recorded only."""

    driver: str
    drive: str
    id: str | None
    properties: Mapping[str, str]
    implicit: bool
    origin: str


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """Everything the command line asked for, checked for consistency but not yet acted on."""

    chardevs: tuple[ChardevSocket, ...] = ()
    monitors: tuple[MonitorSpec, ...] = ()
    drives: tuple[DriveSpec, ...] = ()
    blockdevs: tuple[BlockdevSpec, ...] = ()
    devices: tuple[DeviceSpec, ...] = ()
    pidfile: str | None = None
    ignored: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    show_help: bool = False
    show_version: bool = False
