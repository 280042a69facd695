"""bitbackd's command line: argv in, a typed :class:`DaemonConfig` out, no I/O.

Two spellings are accepted together, so harnesses written for either program work unchanged:

* the emulator's (``qemu-system-x86_64``): ``-opt value`` or ``--opt value``; options that only
  concern a guest (``-display``, ``-accel``, ``-S``...) are accepted and recorded in
  :attr:`DaemonConfig.ignored`, because bitbackd runs no guest;
* the storage daemon's (``qemu-storage-daemon``): ``--opt value`` or ``--opt=value``.

:func:`parse_args` works in three passes, like QEMU: (1) option names and arguments, so an
unknown option is reported before anything else; (2) each option's value, in argv order, with
QemuOpts-level duplicate ``id`` checks; (3) cross-references, in QEMU's creation order: drive
names and slots, then monitors (their chardev must exist), then devices (their drive must
exist). Errors are :class:`CommandLineError` with QEMU 7.2's text behind the option as typed::

    -drive if=virtio,file=x,format=qcow2,bogus=1: Block format 'qcow2' does not support the \
option 'bogus'

and, for what QEMU has but bitbackd refuses (other chardev backends, ``if=ide``, ``-mon`` in
readline mode...), a sentence of bitbackd's own in the same shape.

The caller prints ``bitbackd: <message>`` and exits 1; it prints each of
:attr:`DaemonConfig.warnings` the same way and carries on. Specs keep their ``origin`` (the
option as typed) so that errors found later, such as a missing image, can be reported in the
same shape (``-drive ...: Could not open ...``).

Differences from QEMU, on purpose: long options are not abbreviated (getopt would take
``--blockd``); ``-monitor``/``--monitor`` always means the storage daemon's QMP monitor;
``-qmp PATH`` with a plain path listens on ``PATH``; help requests inside option values
(``-chardev help``) are refused instead of printing lists; both spellings check an option's
value when they reach it (the emulator only checks syntax before ``-h`` takes effect).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from bitback.errors import InvalidArgumentError

from . import qemuopts as qo
from .qemuopts import JsonValue, OptionError

__all__ = [
    "HELP_TEXT",
    "BlockdevSpec",
    "CacheOptions",
    "ChardevSocket",
    "CommandLineError",
    "DaemonConfig",
    "DeviceSpec",
    "DriveSpec",
    "MonitorSpec",
    "check_format_options",
    "parse_args",
]


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


HELP_TEXT = """\
Usage: bitbackd [options]
bitback storage daemon: QEMU's block layer, QMP and incremental backup, without a guest.

  -h, --help             display this help and exit
  -V, --version          output version information and exit

  --blockdev [driver=]<driver>[,node-name=<N>][,<driver options>...]
  --blockdev '{"driver": ..., ...}'
                         add a block node, as QMP blockdev-add
  --chardev socket,id=<id>,path=<path>[,server=on|off][,wait=on|off]
                         a UNIX socket to serve (server=on) or connect to
  --monitor [chardev=]<id>[,mode=control][,pretty=on|off]
  -mon chardev=<id>,mode=control[,pretty=on|off]
                         a QMP monitor on a chardev
  --qmp <path>           a QMP monitor listening on <path>
  -qmp unix:<path>[,server=on|off][,wait=on|off] | chardev:<id>
                         QEMU's spelling of the same (also -qmp-pretty)
  -drive if=virtio|none,file=<file>[,format=qcow2|raw][,id=<id>][,node-name=<N>]
         [,read-only=on|off][,cache=<mode>][,aio=threads|native|io_uring]
         [,discard=ignore|unmap][,detect-zeroes=off|on|unmap]
         [,werror=<action>][,rerror=<action>][,<format options>...]
                         an image with a named BlockBackend (",," in a value is a comma)
  -device virtio-blk[-pci|-device],drive=<id>[,id=<id>]
                         a guest device for a drive (recorded; there is no guest)
  --pidfile <path>       write the process ID to <path> after startup

Accepted and ignored, because bitbackd runs no guest:
  -nodefaults -no-user-config -S -nographic -enable-kvm -display -vga -accel
  -machine/-M -m -smp -cpu -name -serial
"""

# ---------------------------------------------------------------------------------------------
# Pass 1: option names and arguments


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


_IGNORED_FLAGS = _words("nodefaults no-user-config S nographic enable-kvm")
_IGNORED_ARGS = _words("display vga accel machine M m smp cpu name serial")
_REFUSED_FLAGS = _words("daemonize")  # qemu-storage-daemon options bitbackd lacks
_REFUSED_ARGS = _words("export nbd-server object trace T")
_REFUSED = _REFUSED_FLAGS | _REFUSED_ARGS
_FLAGS = _IGNORED_FLAGS | _REFUSED_FLAGS | _words("h help V version")
_WITH_ARG = _IGNORED_ARGS | _REFUSED_ARGS
_WITH_ARG |= _words("chardev mon monitor qmp qmp-pretty drive blockdev device pidfile")


def _split_argv(argv: list[str]) -> list[tuple[str, str, str]]:
    """``(name, value, location)`` per option (value ``""`` for flags).

    Raises at the first unknown option or missing argument, with the emulator's text for
    ``-opt`` and getopt's (as qemu-storage-daemon prints it) for ``--opt``.
    """
    out: list[tuple[str, str, str]] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        i += 1
        if word == "--":  # what follows is operands, and bitbackd takes none
            if i < len(argv):
                raise CommandLineError("Unexpected argument", location=argv[i])
            break
        if word == "-":
            raise CommandLineError("invalid option", location=word)
        if not word.startswith("-"):
            raise CommandLineError("Unexpected argument", location=word)
        long = word.startswith("--")
        name, value = word[2 if long else 1 :], None
        if long and "=" in name:
            name, value = name.split("=", 1)
        if name in _FLAGS:
            if value is not None:
                raise CommandLineError(f"option '--{name}' doesn't allow an argument")
            out.append((name, "", word))
        elif name in _WITH_ARG:
            location = word
            if value is None:
                if i >= len(argv):
                    if long:
                        raise CommandLineError(f"option '{word}' requires an argument")
                    raise CommandLineError("requires an argument", location=word)
                value = argv[i]
                i += 1
                location = f"{word} {value}"
            out.append((name, value, location))
        elif long:
            raise CommandLineError(f"unrecognized option '{word}'")
        else:
            raise CommandLineError("invalid option", location=word)
    return out


# ---------------------------------------------------------------------------------------------
# Pass 2: option values

_CHARDEV_DESC: dict[str, qo.OptType] = {
    **dict.fromkeys(_words("backend path host port fd localaddr localport tls-creds"), "str"),
    **dict.fromkeys(_words("tls-authz name size chardev logfile"), "str"),
    **dict.fromkeys(_words("to reconnect width height cols rows debug"), "number"),
    **dict.fromkeys(_words("ipv4 ipv6 wait server delay nodelay telnet tn3270 websocket"), "bool"),
    **dict.fromkeys(_words("mux signal append logappend mouse clipboard tight abstract"), "bool"),
}
_QEMU_CHAR_BACKENDS = _words(
    "pty udp memory file stdio ringbuf null parallel pipe mux serial vc tty parport "
    "spicevmc spiceport braille msmouse wctablet testdev qemu-vdagent dbus"
)
_MON_DESC: dict[str, qo.OptType] = {"mode": "str", "chardev": "str", "pretty": "bool"}
# -qmp values that QEMU reads as a chardev spec (qemu_chr_parse_compat); others are our paths
_QMP_COMPAT = re.compile(r"[a-z0-9]+:|(stdio|pty|null|vc|none|msmouse|wctablet|braille)$")


class _Builder:
    """What passes 2 and 3 accumulate: specs, and the ids each QemuOpts list has seen."""

    def __init__(self) -> None:
        self.chardevs: list[ChardevSocket] = []
        self.monitors: list[tuple[MonitorSpec, str | None]] = []  # with the mode as given
        self.drives: list[tuple[DriveSpec, dict[str, int]]] = []  # with index/bus/unit
        self.blockdevs: list[BlockdevSpec] = []
        self.devices: list[DeviceSpec] = []
        self.ids: dict[str, set[str]] = {k: set() for k in ("chardev", "mon", "drive", "device")}
        self.warnings: list[str] = []
        self.ignored: list[str] = []
        self.pidfile: str | None = None
        self.qmp_index = 0

    def claim_id(self, text: str, list_name: str) -> str | None:
        """The QemuOpts ``id`` of ``text``, refused if malformed or already used in the list."""
        opt_id = qo.qemu_opts_id(text)
        if opt_id is not None:
            self._claim(opt_id, list_name)
        return opt_id

    def _claim(self, opt_id: str, list_name: str) -> None:
        if opt_id in self.ids[list_name]:
            raise OptionError(f"Duplicate ID '{opt_id}' for {list_name}")
        self.ids[list_name].add(opt_id)

    def opts(
        self,
        text: str,
        loc: str,
        implied: str | None = None,
        desc: Mapping[str, qo.OptType] | None = None,
        compat: bool = False,
    ) -> dict[str, str]:
        """QemuOpts items of ``text`` as a dict (the last of a name wins); keeps the warnings.

        ``compat`` parses as ``qemu_opts_do_parse`` does for ``-qmp unix:...``: no deprecation
        warnings, and ``help`` is an ordinary item.
        """
        got = qo.parse_qemu_opts(
            text,
            implied=implied,
            desc=desc,
            allow_help=desc is not None and not compat,
            warn_flags=not compat,
        )
        self.warnings += [f"{loc}: warning: {w}" for w in got.warnings]
        if got.help:
            raise OptionError("Help is not available for this option")
        return dict(got.items)

    def chardev(self, text: str, loc: str) -> None:
        chardev_id = self.claim_id(text, "chardev")
        opts = self.opts(text, loc, "backend", _CHARDEV_DESC)
        self.chardevs.append(_socket_chardev(chardev_id, opts, loc))

    def mon(self, text: str, loc: str) -> None:
        mon_id = self.claim_id(text, "mon")
        opts = self.opts(text, loc, "chardev", _MON_DESC)
        mode = opts.get("mode")
        if mode not in (None, "readline", "control"):
            raise OptionError(f"Parameter 'mode' does not accept value '{mode}'")
        if "chardev" not in opts:
            raise OptionError("Parameter 'chardev' is missing")
        pretty = qo.parse_bool("pretty", opts.get("pretty", "off"))
        self.monitors.append((MonitorSpec(opts["chardev"], pretty, mon_id, loc), mode))

    def monitor(self, text: str, loc: str) -> None:
        got = _visit_monitor(*qo.parse_dict_option(text, "chardev"))
        mon_id = got.get("id")
        spec = MonitorSpec(
            str(got["chardev"]),
            got.get("pretty") is True,
            mon_id if isinstance(mon_id, str) else None,
            loc,
        )
        self.monitors.append((spec, str(got.get("mode", "control"))))

    def qmp(self, text: str, loc: str, pretty: bool = False) -> None:
        label = f"compat_monitor{self.qmp_index}"
        self.qmp_index += 1
        if text.startswith("chardev:"):
            label = text[len("chardev:") :]
        elif text.startswith("unix:"):
            opts = {"backend": "socket"} | self.opts(text[5:], loc, "path", _CHARDEV_DESC, True)
            self._claim(label, "chardev")
            self.chardevs.append(_socket_chardev(label, opts, loc))
        elif _QMP_COMPAT.match(text):
            raise OptionError("bitbackd supports only unix:<path> and chardev:<id> for -qmp")
        else:  # bitbackd's plain form: listen on this path
            opts = {"backend": "socket", "path": text, "server": "on", "wait": "off"}
            self._claim(label, "chardev")
            self.chardevs.append(_socket_chardev(label, opts, loc))
        self._claim(label, "mon")
        self.monitors.append((MonitorSpec(label, pretty, label, loc), "control"))

    def drive(self, text: str, loc: str) -> None:
        drive_id = self.claim_id(text, "drive")
        self.drives.append(_drive(drive_id, self.opts(text, loc), loc))

    def blockdev(self, text: str, loc: str) -> None:
        tree, keyval = qo.parse_dict_option(text, "driver")
        self.blockdevs.append(BlockdevSpec(tree, keyval, loc))

    def device(self, text: str, loc: str) -> None:
        device_id = self.claim_id(text, "device")
        self.devices.append(_device(device_id, self.opts(text, loc, "driver"), loc))


def _socket_chardev(chardev_id: str | None, opts: dict[str, str], loc: str) -> ChardevSocket:
    """Check a chardev's options, in QEMU's order of checks, and keep a UNIX socket's."""
    backend = opts.get("backend")
    if backend in ("help", "?"):
        raise OptionError("Help is not available for this option")
    if chardev_id is None:
        raise OptionError("chardev: no id specified")
    if backend is None:
        raise OptionError(f'chardev: "{chardev_id}" missing backend')
    if backend != "socket":
        if backend in _QEMU_CHAR_BACKENDS:
            raise OptionError(f"bitbackd supports only socket chardevs, not '{backend}'")
        raise OptionError(f"'{backend}' is not a valid char driver name")
    if sum(k in opts for k in ("path", "fd", "host")) > 1:
        raise OptionError("None or one of 'path', 'fd' or 'host' option required.")
    if "host" in opts and "port" not in opts:
        raise OptionError("chardev: socket: no port given")
    if not opts.get("path"):
        raise OptionError("bitbackd supports only UNIX socket chardevs: give path=<socket>")
    for key in opts:
        if key not in ("backend", "path", "server", "wait"):
            raise OptionError(f"bitbackd does not support the chardev option '{key}'")
    server = qo.parse_bool("server", opts.get("server", "off"))
    if not server and "wait" in opts:
        raise OptionError("'wait' option is incompatible with socket in client connect mode")
    return ChardevSocket(
        chardev_id, opts["path"], server, qo.parse_bool("wait", opts.get("wait", "on")), loc
    )


def _visit_monitor(tree: dict[str, JsonValue], keyval: bool) -> dict[str, JsonValue]:
    """Check ``--monitor`` as QAPI's MonitorOptions visitor: id, mode, pretty, chardev."""
    got: dict[str, JsonValue] = {}
    for name, kind in (("id", "str"), ("mode", "enum"), ("pretty", "bool"), ("chardev", "str")):
        if name not in tree:
            if name == "chardev":
                raise OptionError("Parameter 'chardev' is missing")
            continue
        value = tree[name]
        if kind == "bool" and not keyval:
            if not isinstance(value, bool):
                raise OptionError(f"Invalid parameter type for '{name}', expected: boolean")
        elif not isinstance(value, str):
            raise OptionError(f"Invalid parameter type for '{name}', expected: string")
        elif kind == "bool":
            value = qo.parse_bool(name, value)
        elif kind == "enum" and value not in ("readline", "control"):
            raise OptionError(f"Parameter '{name}' does not accept value '{value}'")
        got[name] = value
    for name in tree:
        if name not in got:
            raise OptionError(f"Parameter '{name}' is unexpected")
    return got


_IF_NAMES = _words("ide scsi floppy pflash mtd sd virtio xen none")
_QEMU_FORMATS = _words(
    "blkdebug blklogwrites blkreplay blkverify bochs cloop compress copy-before-write "
    "copy-on-read dmg file ftp ftps gluster host_cdrom host_device http https iscsi iser luks "
    "nbd nfs null-aio null-co nvme parallels preallocate qcow qed quorum rbd replication "
    "snapshot-access ssh throttle vdi vhdx vmdk vpc vvfat"
)
_DRIVE_KEYS = _words(
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
        _words(
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


def _drive(
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
_DEVICE_PROPERTIES = _words(
    "drive serial bootindex share-rw write-cache logical_block_size physical_block_size "
    "discard write-zeroes num-queues queue-size iothread bus addr"
)


def _device(device_id: str | None, opts: dict[str, str], loc: str) -> DeviceSpec:
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


# ---------------------------------------------------------------------------------------------
# Pass 3: cross-references


def _name_drives(b: _Builder) -> list[DriveSpec]:
    """Give anonymous drives QEMU's names (``virtio0``, ``none1``: interface and unit)."""
    taken: set[tuple[str, int, int]] = set()
    names: set[str] = set()
    out: list[DriveSpec] = []
    for spec, naming in b.drives:
        index, bus, unit = naming.get("index", -1), naming.get("bus", 0), naming.get("unit", -1)
        if index >= 0:
            if bus != 0 or unit != -1:
                raise CommandLineError(
                    "index cannot be used with bus and unit", location=spec.origin
                )
            unit = index  # virtio and none have no per-bus limit: the index is the unit
        if unit < 0:
            unit = 0
            while (spec.interface, bus, unit) in taken:
                unit += 1
        elif (spec.interface, bus, unit) in taken:
            raise CommandLineError(
                f"drive with bus={bus}, unit={unit} (index={index}) exists", location=spec.origin
            )
        taken.add((spec.interface, bus, unit))
        name = spec.id or f"{spec.interface}{unit}"
        if name in names:
            raise CommandLineError(f"Device with id '{name}' already exists", location=spec.origin)
        names.add(name)
        out.append(dataclasses.replace(spec, id=name))
    return out


def _check_monitors(b: _Builder) -> None:
    chardevs = {c.id for c in b.chardevs}
    in_use: set[str] = set()
    for spec, mode in b.monitors:
        if spec.chardev not in chardevs:
            raise CommandLineError(f'chardev "{spec.chardev}" not found', location=spec.origin)
        if spec.chardev in in_use:
            raise CommandLineError(f"Device '{spec.chardev}' is in use", location=spec.origin)
        in_use.add(spec.chardev)
        if mode != "control":  # -mon defaults to readline, the human monitor
            raise CommandLineError("Only QMP is supported", location=spec.origin)


def _attach_devices(b: _Builder, drives: list[DriveSpec]) -> list[DeviceSpec]:
    """Explicit devices, then one implicit device per ``if=virtio`` drive, each on a drive."""
    by_id = {d.id: d for d in drives}
    nodes = {b.options.get("node-name") for b in b.blockdevs}
    implicit = [
        DeviceSpec("virtio-blk-pci", d.id, None, {}, True, d.origin)
        for d in drives
        if d.interface == "virtio"
    ]
    attached: set[str] = set()
    for dev in [*b.devices, *implicit]:
        drive = by_id.get(dev.drive)
        if drive is None and dev.drive not in nodes:
            raise CommandLineError(
                f"Property 'virtio-blk-device.drive' can't find value '{dev.drive}'",
                location=dev.origin,
            )
        if drive is not None and dev.drive in attached:
            reason = f"Drive '{dev.drive}' is already in use by another device"
            if drive.interface != "none":
                reason = (
                    f"Drive '{dev.drive}' is already in use because it has been automatically "
                    "connected to another device (did you need 'if=none' in the drive options?)"
                )
            raise CommandLineError(reason, location=dev.origin)
        attached.add(dev.drive)
        if drive is not None and drive.file is None:
            raise CommandLineError("Device needs media, but drive is empty", location=dev.origin)
    return [*b.devices, *implicit]


def _config(b: _Builder, **extra: bool) -> DaemonConfig:
    return DaemonConfig(
        chardevs=tuple(b.chardevs),
        monitors=tuple(m for m, _ in b.monitors),
        drives=tuple(d for d, _ in b.drives),
        blockdevs=tuple(b.blockdevs),
        devices=tuple(b.devices),
        pidfile=b.pidfile,
        ignored=tuple(b.ignored),
        warnings=tuple(b.warnings),
        **extra,
    )


def parse_args(argv: list[str]) -> DaemonConfig:
    """Parse bitbackd's arguments (without the program name) into a checked configuration.

    ``--help`` or ``--version`` stops the parse where it appears, like QEMU: the result has
    ``show_help``/``show_version`` set and is not cross-checked. Raises
    :class:`CommandLineError` for anything refused.
    """
    b = _Builder()
    handlers: dict[str, Callable[[str, str], None]] = {
        "chardev": b.chardev,
        "mon": b.mon,
        "monitor": b.monitor,
        "qmp": b.qmp,
        "qmp-pretty": lambda text, loc: b.qmp(text, loc, pretty=True),
        "drive": b.drive,
        "blockdev": b.blockdev,
        "device": b.device,
    }
    for name, value, loc in _split_argv(argv):
        if name in ("h", "help", "V", "version"):
            return _config(
                b, show_help=name in ("h", "help"), show_version=name in ("V", "version")
            )
        if name in _REFUSED:
            raise CommandLineError("not supported by bitbackd", location=loc)
        if name in _IGNORED_FLAGS or name in _IGNORED_ARGS:
            b.ignored.append(loc)
        elif name == "pidfile":
            b.pidfile = value
        else:
            try:
                handlers[name](value, loc)
            except OptionError as exc:
                raise CommandLineError(exc.message, location=loc) from exc
    drives = _name_drives(b)
    _check_monitors(b)
    devices = _attach_devices(b, drives)
    config = _config(b)
    return dataclasses.replace(config, drives=tuple(drives), devices=tuple(devices))
