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

from . import qemuopts as qo
from .drive_options import check_format_options, parse_device, parse_drive
from .qemuopts import JsonValue, OptionError
from .specs import (
    BlockdevSpec,
    CacheOptions,
    ChardevSocket,
    CommandLineError,
    DaemonConfig,
    DeviceSpec,
    DriveSpec,
    MonitorSpec,
    words,
)

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


_IGNORED_FLAGS = words("nodefaults no-user-config S nographic enable-kvm")
_IGNORED_ARGS = words("display vga accel machine M m smp cpu name serial")
_REFUSED_FLAGS = words("daemonize")  # qemu-storage-daemon options bitbackd lacks
_REFUSED_ARGS = words("export nbd-server object trace T")
_REFUSED = _REFUSED_FLAGS | _REFUSED_ARGS
_FLAGS = _IGNORED_FLAGS | _REFUSED_FLAGS | words("h help V version")
_WITH_ARG = _IGNORED_ARGS | _REFUSED_ARGS
_WITH_ARG |= words("chardev mon monitor qmp qmp-pretty drive blockdev device pidfile")


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
    **dict.fromkeys(words("backend path host port fd localaddr localport tls-creds"), "str"),
    **dict.fromkeys(words("tls-authz name size chardev logfile"), "str"),
    **dict.fromkeys(words("to reconnect width height cols rows debug"), "number"),
    **dict.fromkeys(words("ipv4 ipv6 wait server delay nodelay telnet tn3270 websocket"), "bool"),
    **dict.fromkeys(words("mux signal append logappend mouse clipboard tight abstract"), "bool"),
}
_QEMU_CHAR_BACKENDS = words(
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
        self.drives.append(parse_drive(drive_id, self.opts(text, loc), loc))

    def blockdev(self, text: str, loc: str) -> None:
        tree, keyval = qo.parse_dict_option(text, "driver")
        self.blockdevs.append(BlockdevSpec(tree, keyval, loc))

    def device(self, text: str, loc: str) -> None:
        device_id = self.claim_id(text, "device")
        self.devices.append(parse_device(device_id, self.opts(text, loc, "driver"), loc))


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
