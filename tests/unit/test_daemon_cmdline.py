"""bitbackd's command line: QemuOpts, keyval and JSON syntax, and argv to DaemonConfig.

Expected error texts were measured on QEMU 7.2.22 (qemu-system-x86_64, qemu-storage-daemon),
except in the rows marked "bitbackd's own": things QEMU accepts and bitbackd refuses. Error
rows give the command line and the reason; the location is the last option unless given.
"""

from __future__ import annotations

import shlex

import pytest

from bitback.daemon import cmdline
from bitback.daemon.cmdline import (
    HELP_TEXT,
    CacheOptions,
    ChardevSocket,
    CommandLineError,
    DaemonConfig,
    DeviceSpec,
    MonitorSpec,
    check_format_options,
    parse_args,
)
from bitback.daemon.qemuopts import (
    JsonValue,
    OptionError,
    OptType,
    keyval_parse,
    parse_bool,
    parse_dict_option,
    parse_json_object,
    parse_number,
    parse_qemu_opts,
    qemu_opts_id,
)
from bitback.errors import InvalidArgumentError


def parse(cmd: str) -> DaemonConfig:
    return parse_args(shlex.split(cmd))


def last_option(cmd: str) -> str:
    words = shlex.split(cmd)
    start = max(i for i, w in enumerate(words) if w.startswith("-"))
    return " ".join(words[start:])


def check_error(cmd: str, reason: str, at: str | None = None) -> None:
    """``cmd`` fails with ``reason`` located at ``at`` (default: its last option)."""
    with pytest.raises(CommandLineError) as info:
        parse(cmd)
    assert (info.value.reason, info.value.location) == (reason, at or last_option(cmd))


def option_error(func: object, *args: object) -> str:
    with pytest.raises(OptionError) as info:
        func(*args)  # type: ignore[operator]
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# QemuOpts


@pytest.mark.parametrize(
    ("text", "implied", "items"),
    [
        ("socket,id=m,path=/tmp/s", "backend", [("backend", "socket"), ("path", "/tmp/s")]),
        ("backend=socket,path=/a,,b", "backend", [("backend", "socket"), ("path", "/a,b")]),
        ("socket,,id=m,path=x", "backend", [("backend", "socket,id=m"), ("path", "x")]),
        (",id=m", "backend", [("backend", "")]),
        ("socket,path=/x,,", "backend", [("backend", "socket"), ("path", "/x,")]),
        ("socket,path=/x,,,", "backend", [("backend", "socket"), ("path", "/x,")]),
        ("socket,path=/x,", "backend", [("backend", "socket"), ("path", "/x")]),
        (
            "socket,server,nowait",
            "backend",
            [("backend", "socket"), ("server", "on"), ("wait", "off")],
        ),
        ("file=/a,,b,,,,c,format=raw", None, [("file", "/a,b,,c"), ("format", "raw")]),
        ("/img,format=raw", None, [("/img", "on"), ("format", "raw")]),
        ("if=none,if=virtio", None, [("if", "none"), ("if", "virtio")]),
    ],
)
def test_qemu_opts_items(text: str, implied: str | None, items: list[tuple[str, str]]) -> None:
    assert list(parse_qemu_opts(text, implied=implied).items) == items


def test_qemu_opts_short_booleans_warn_like_qemu() -> None:
    got = parse_qemu_opts("socket,server,nowait,nodelay", implied="backend")
    assert got.warnings == (
        "short-form boolean option 'server' deprecated\nPlease use server=on instead",
        "short-form boolean option 'nowait' deprecated\nPlease use wait=off instead",
        "short-form boolean option 'nodelay' deprecated\nPlease use nodelay=on instead",
    )
    assert parse_qemu_opts("server,nowait", warn_flags=False).warnings == ()


@pytest.mark.parametrize(
    ("text", "desc", "message"),
    [
        ("path=/x,socket", {"path": "str"}, "Invalid parameter 'socket'"),
        ("path=/x,=x", {"path": "str"}, "Invalid parameter ''"),
        ("server=maybe", {"server": "bool"}, "Parameter 'server' expects 'on' or 'off'"),
        ("to=x", {"to": "number"}, "Parameter 'to' expects a number"),
    ],
)
def test_qemu_opts_errors(text: str, desc: dict[str, OptType], message: str) -> None:
    with pytest.raises(OptionError) as info:
        parse_qemu_opts(text, desc=desc)
    assert str(info.value) == message


def test_qemu_opts_help_stops_when_allowed() -> None:
    desc: dict[str, OptType] = {"backend": "str"}
    got = parse_qemu_opts("socket,help,bogus=1", implied="backend", desc=desc, allow_help=True)
    assert got.help and got.items == (("backend", "socket"),)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("socket,id=m,path=x", "m"), ("socket,id=m,id=n", "m"), ("socket,path=x", None)],
)
def test_qemu_opts_id_is_the_first(text: str, expected: str | None) -> None:
    assert qemu_opts_id(text) == expected


@pytest.mark.parametrize("text", ["socket,id=", "socket,id=1x", "socket,id=m,,x", "id=a b"])
def test_qemu_opts_id_must_be_an_identifier(text: str) -> None:
    assert option_error(qemu_opts_id, text) == "Parameter 'id' expects an identifier"


@pytest.mark.parametrize(
    ("text", "value"),
    [("on", True), ("yes", True), ("true", True), ("y", True), ("off", False), ("n", False)],
)
def test_parse_bool(text: str, value: bool) -> None:
    assert parse_bool("x", text) is value


@pytest.mark.parametrize(
    ("text", "value"), [("12", 12), ("0x10", 16), ("010", 8), ("-1", 2**64 - 1)]
)
def test_parse_number(text: str, value: int) -> None:
    assert parse_number("index", text) == value


def test_parse_number_errors() -> None:
    assert option_error(parse_number, "index", "x") == "Parameter 'index' expects a number"
    too_large = f"Value '{2**64}' is too large for parameter 'index'"
    assert option_error(parse_number, "index", str(2**64)) == too_large


# ---------------------------------------------------------------------------------------------
# keyval


@pytest.mark.parametrize(
    ("text", "tree"),
    [
        ("file,filename=/x", {"driver": "file", "filename": "/x"}),
        ("file,filename=/no,,exist", {"driver": "file", "filename": "/no,exist"}),
        ("driver=file,,filename=/x", {"driver": "file,filename=/x"}),
        (
            "driver=raw,file.driver=file,file.filename=/x",
            {"driver": "raw", "file": {"driver": "file", "filename": "/x"}},
        ),
        ("driver=a,x.0=p,x.1=q", {"driver": "a", "x": ["p", "q"]}),
        ("driver=a,x.1=q,x.0=p", {"driver": "a", "x": ["p", "q"]}),
        ("driver=a,x.0.b=2,x.1=3", {"driver": "a", "x": [{"b": "2"}, "3"]}),
        ("driver=a,driver=b", {"driver": "b"}),
        ("driver=a,__com.redhat_x=1", {"driver": "a", "__com.redhat_x": "1"}),
        ("driver=a,", {"driver": "a"}),
        ("", {}),
    ],
)
def test_keyval(text: str, tree: dict[str, JsonValue]) -> None:
    assert keyval_parse(text, "driver") == tree


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("driver=file,a=1,a.b=2", "Parameters 'a.*' used inconsistently"),
        ("driver=file,a.b=2,a=1", "Parameters 'a.*' used inconsistently"),
        ("a.b.c=1,a.b=2", "Parameters 'a.b.*' used inconsistently"),
        ("a.0=2,a.x=3", "Parameters 'a.*' used inconsistently"),
        ("a.1=2", "Parameter 'a.0' missing"),
        ("a.0=x,a.1=y,a.5=z", "Parameter 'a.2' missing"),
        ("a..b=2", "Invalid parameter 'a..b'"),
        ("driver=file,a", "Expected '=' after parameter 'a'"),
        ("=1", "Invalid parameter ''"),
        (",", "Invalid parameter ''"),
        ("1=1", "Invalid parameter '1'"),
        ("a.=1", "Invalid parameter 'a.'"),
        (".a=1", "Invalid parameter '.a'"),
        ("a.1b=1", "Invalid parameter 'a.1b'"),
        ("_x=1", "Invalid parameter '_x'"),
        ("a b=1", "Invalid parameter 'a b'"),
        ("fi,,le,filename=/x", "Invalid parameter ''"),
        ("a" * 128 + "=1", f"Parameter '{'a' * 128}' is too long"),
        ("x." + "a" * 128 + "=1", f"Parameter fragment '{'a' * 128}' is too long"),
        ("help", "Help is not available for this option"),
        ("driver=file,help", "Help is not available for this option"),
    ],
)
def test_keyval_errors(text: str, message: str) -> None:
    assert option_error(keyval_parse, text, "driver") == message


def test_keyval_fragment_of_127_is_fine() -> None:
    assert keyval_parse("a" * 127 + "=1") == {"a" * 127: "1"}


# ---------------------------------------------------------------------------------------------
# JSON


@pytest.mark.parametrize(
    ("text", "value"),
    [
        (
            '{"a": [], "b": {}, "c": [1, [2, {"d": null}]], "e": true}',
            {"a": [], "b": {}, "c": [1, [2, {"d": None}]], "e": True},
        ),
        ("{'a': 'it\\'s', 'b': \"q\"}", {"a": "it's", "b": "q"}),
        (
            '{"a": "\\u00e9\\n\\/", "b": "\\ud83d\\ude00", "c": "\\u0000"}',
            {"a": "\u00e9\n/", "b": "\U0001f600", "c": "\0"},
        ),
        (
            '{"a": -0, "b": 1.5, "c": 18446744073709551615, "d": 18446744073709551616}',
            {"a": 0, "b": 1.5, "c": 2**64 - 1, "d": float(2**64)},
        ),
        ('{"a": 1e999} \t', {"a": float("inf")}),
    ],
)
def test_json(text: str, value: dict[str, JsonValue]) -> None:
    assert parse_json_object(text) == value


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"driver":"file","filename":"/x"', "premature EOI"),
        ('{"a": 12', "premature EOI"),
        ("{", "premature EOI"),
        ("{bad}", "invalid keyword 'bad'"),
        ('{"a": tru}', "invalid keyword 'tru'"),
        ('{"a" 1}', "missing : in object pair"),
        ('{"a": }', "expecting value"),
        ('{"a": 1,}', "expecting value"),
        ("{,}", "expecting value"),
        ('{"a": [{]}', "expecting value"),
        ("{1: 2}", "key is not a string in object"),
        ('{"a": 1 "b": 2}', "expected separator in dict"),
        ('{"a":[1 2]}', "expected separator in list"),
        ('{"a":0e5}', "expected separator in dict"),
        ('{"a": "x\\q"}', "invalid escape sequence in string"),
        ('{"a":"\\u12"}', '\\u12" is not a valid Unicode character'),
        ('{"a":"\\ud800\\u0041"}', "\\ud800 is not a valid Unicode character"),
        ('{"a":"\\uFFFE"}', "\\uFFFE is not a valid Unicode character"),
        ('{"a": 01}', "stray '01'"),
        ('{"a":-01}', "stray '-01'"),
        ('{"a": -}', "stray '-}'"),
        ('{"a": 1.}', "stray '1.}'"),
        ('{"a": 1e}', "stray '1e}'"),
        ('{"a": NaN}', "stray 'N'"),
        ('{"a": %d}', "stray '%'"),
        ('{"a": "abc', "stray '\"abc'"),
        ('{"a": "tab\tx"}', "stray '\"tab\t'"),
        ('{"a" 1, N}', "stray 'N'"),
        ('{"a": [1, 2], "a": 3}', "duplicate key"),
        ('{"a": {"b": 1, "b": 2}}', "duplicate key"),
    ],
)
def test_json_parse_errors(text: str, message: str) -> None:
    assert option_error(parse_json_object, text) == f"JSON parse error, {message}"


@pytest.mark.parametrize("text", ['{"a":1} x', '{"a": 1}}', '{"a":1}{', '{"a": 1} N'])
def test_json_takes_one_value(text: str) -> None:
    assert option_error(parse_json_object, text) == "Expecting at most one JSON value"


@pytest.mark.parametrize(
    ("text", "message"),
    [  # argv as Python decodes it (surrogateescape); QEMU prints the bytes quoted as they are
        ("{\u00e9}", "JSON parse error, stray '\udcc3'"),  # only the first byte is a token
        ('{"a":"\udcfe"}', "JSON parse error, stray '\"\udcfe'"),  # 0xFE ends a string
        ('{"a":"\udc80"}', "JSON parse error, invalid UTF-8 sequence in string"),
        ('{"a":"\ufdd0"}', "JSON parse error, invalid UTF-8 sequence in string"),
        ('{"a":"\\u[\ufffe"}', "JSON parse error, \\u[\ufffe is not a valid Unicode character"),
        ('{"a":1}\udcff', "Expecting at most one JSON value"),
    ],
)
def test_json_judges_argv_bytes(text: str, message: str) -> None:
    assert option_error(parse_json_object, text) == message


def test_json_modified_utf8_nul() -> None:
    assert parse_json_object('{"a":"\udcc0\udc80"}') == {"a": "\0"}  # bytes C0 80


def test_json_nesting_limit_is_1024() -> None:
    assert parse_json_object('{"a":' + "[" * 1023 + "]" * 1023 + "}")["a"]
    deep = '{"a":' + "[" * 1024 + "]" * 1024 + "}"
    assert option_error(parse_json_object, deep) == "JSON nesting depth limit exceeded"


def test_dict_option_picks_json_only_on_a_leading_brace() -> None:
    assert parse_dict_option('{"driver": "file"}', "driver") == ({"driver": "file"}, False)
    text = ' {"driver":"file"}'
    assert parse_dict_option(text, "driver") == ({"driver": text}, True)


SEED_BLOCKDEV_JSON = (
    '{"driver": "qcow2", "node-name": "drive1", "file": {"driver": "blkdebug",'
    ' "image": {"driver": "file", "filename": "/abs/drive1,x.qcow2"},'
    ' "set-state": [{"event": "flush_to_disk", "state": "1", "new_state": "2"}],'
    ' "inject-error": [{"event": "read_aio", "errno": "5", "state": "2", "once": "on"}]}}'
)
SEED_BLOCKDEV_KEYVAL = (
    "driver=qcow2,node-name=drive1,file.driver=blkdebug,file.image.driver=file,"
    "file.image.filename=/abs/drive1,,x.qcow2,file.set-state.0.event=flush_to_disk,"
    "file.set-state.0.state=1,file.set-state.0.new_state=2,file.inject-error.0.event=read_aio,"
    "file.inject-error.0.errno=5,file.inject-error.0.state=2,file.inject-error.0.once=on"
)


def test_blockdev_json_and_dotted_give_the_same_tree() -> None:
    as_json = parse("-blockdev " + shlex.quote(SEED_BLOCKDEV_JSON)).blockdevs[0]
    as_keyval = parse("--blockdev " + shlex.quote(SEED_BLOCKDEV_KEYVAL)).blockdevs[0]
    assert as_json.options == as_keyval.options
    assert (as_json.keyval, as_keyval.keyval) == (False, True)


def _stringify(value: JsonValue) -> JsonValue:
    """What keyval would have given for a JSON tree (QEMU's own JSON-to-keyval rendering)."""
    if isinstance(value, dict):
        return {k: _stringify(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_stringify(v) for v in value]
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value) if isinstance(value, int) else value


def test_blockdev_keyval_leaves_are_the_strings_of_json_scalars() -> None:
    typed = SEED_BLOCKDEV_JSON.replace('"1"', "1").replace('"2"', "2").replace('"5"', "5")
    as_json = parse_json_object(typed.replace('"on"', "true"))
    assert '"errno": 5' in typed and isinstance(as_json["file"], dict)
    assert _stringify(as_json) == keyval_parse(SEED_BLOCKDEV_KEYVAL, "driver")


# ---------------------------------------------------------------------------------------------
# parse_args: the harness command line and the emulator's spelling

SEED_DRIVE = "-drive if=virtio,id=drive0,file=/abs/d0,,x.qcow2,format=qcow2"
SEED = (
    "-nodefaults -display none -accel tcg -S -chardev socket,id=mon,path=/tmp/h/mon.sock "
    f"-mon chardev=mon,mode=control {SEED_DRIVE}"
)


def test_seed_command_line() -> None:
    config = parse(SEED)
    assert config.ignored == ("-nodefaults", "-display none", "-accel tcg", "-S")
    origin = "-chardev socket,id=mon,path=/tmp/h/mon.sock"
    assert config.chardevs == (ChardevSocket("mon", "/tmp/h/mon.sock", False, True, origin),)
    assert config.monitors == (MonitorSpec("mon", False, None, "-mon chardev=mon,mode=control"),)
    (drive,) = config.drives
    assert (drive.id, drive.interface, drive.origin) == ("drive0", "virtio", SEED_DRIVE)
    assert (drive.file, drive.format, drive.node_name) == ("/abs/d0,x.qcow2", "qcow2", None)
    assert (drive.read_only, drive.cache, drive.aio) == (False, CacheOptions(), "threads")
    assert (drive.discard, drive.detect_zeroes) == ("ignore", "off")
    assert (drive.werror, drive.rerror) == ("enospc", "report")
    assert drive.options == {"if": "virtio", "file": "/abs/d0,x.qcow2", "format": "qcow2"}
    assert config.devices == (DeviceSpec("virtio-blk-pci", "drive0", None, {}, True, SEED_DRIVE),)
    assert (config.blockdevs, config.pidfile, config.warnings) == ((), None, ())
    assert not config.show_help and not config.show_version


def test_double_dash_spelling_is_the_same() -> None:
    doubled = " ".join("-" + w if w.startswith("-") else w for w in SEED.split())
    assert parse(doubled).drives[0].id == "drive0"


@pytest.mark.parametrize(
    "option",
    [
        "-nodefaults", "-no-user-config", "-S", "-nographic", "-enable-kvm", "-display none",
        "-vga none", "-accel qtest", "-machine pc,accel=tcg", "-M q35", "-m 512", "-smp 2",
        "-cpu max", "-name vm", "-serial none", "--display=none",
    ],
)  # fmt: skip
def test_guest_options_are_ignored_and_recorded(option: str) -> None:
    assert parse(option).ignored == (option,)


# ---------------------------------------------------------------------------------------------
# chardevs, monitors, -qmp


@pytest.mark.parametrize(
    ("value", "server", "wait"),
    [
        ("socket,id=c,path=/s", False, True),
        ("socket,id=c,path=/s,server=on", True, True),
        ("socket,id=c,path=/s,server=on,wait=off", True, False),
        ("socket,id=c,path=/s,server=yes,wait=no", True, False),
        ("backend=socket,id=c,path=/s,server,nowait", True, False),
        ("socket,id=c,path=/s,server=off,server=on", True, True),  # the last one wins
    ],
)
def test_chardev_socket(value: str, server: bool, wait: bool) -> None:
    (chardev,) = parse("-chardev " + value).chardevs
    assert (chardev.id, chardev.path, chardev.server, chardev.wait) == ("c", "/s", server, wait)


def test_chardev_flags_warn() -> None:
    config = parse("-chardev socket,id=c,path=/s,server,nowait")
    assert config.warnings[0] == (
        "-chardev socket,id=c,path=/s,server,nowait: warning: short-form boolean option "
        "'server' deprecated\nPlease use server=on instead"
    )


@pytest.mark.parametrize(
    ("cmd", "reason"),
    [
        ("-chardev socket,path=/s", "chardev: no id specified"),
        ("-chardev id=m,path=/s", 'chardev: "m" missing backend'),
        ("-chardev bogus,id=m", "'bogus' is not a valid char driver name"),
        ("-chardev socket,,id=m,path=/s", "'socket,id=m' is not a valid char driver name"),
        ("-chardev socket,id=m,path=/s,bogus=1", "Invalid parameter 'bogus'"),
        ("-chardev socket,id=m,path=/s,server=bad", "Parameter 'server' expects 'on' or 'off'"),
        (
            "-chardev socket,id=m,path=/s,wait=off",
            "'wait' option is incompatible with socket in client connect mode",
        ),
        (
            "-chardev socket,id=m,path=/s,server=on,wait=off,server=off",
            "'wait' option is incompatible with socket in client connect mode",
        ),
        (
            "-chardev socket,id=m,path=/s,host=h",
            "None or one of 'path', 'fd' or 'host' option required.",
        ),
        ("-chardev socket,id=m,host=h", "chardev: socket: no port given"),
        ("-chardev socket,id=1x,path=/s", "Parameter 'id' expects an identifier"),
        (
            "-chardev socket,id=m,path=/a -chardev socket,id=m,path=/b",
            "Duplicate ID 'm' for chardev",
        ),
        ("-chardev path=/s,socket,id=m", "Invalid parameter 'socket'"),
        # bitbackd's own refusals
        ("-chardev file,id=m,path=/f", "bitbackd supports only socket chardevs, not 'file'"),
        (
            "-chardev socket,id=m,host=h,port=1",
            "bitbackd supports only UNIX socket chardevs: give path=<socket>",
        ),
        (
            "-chardev socket,id=m,path=/s,telnet=on",
            "bitbackd does not support the chardev option 'telnet'",
        ),
        ("-chardev help", "Help is not available for this option"),
    ],
)
def test_chardev_errors(cmd: str, reason: str) -> None:
    check_error(cmd, reason)


C = "-chardev socket,id=m,path=/s,server=on,wait=off "


MON_JSON = '\'{"chardev": "m", "pretty": true, "id": "x"}\''


@pytest.mark.parametrize(
    ("cmd", "pretty", "mon_id"),
    [
        (C + "-mon chardev=m,mode=control", False, None),
        (C + "-mon m,mode=control,pretty=on,id=q", True, "q"),
        ("-mon chardev=m,mode=control " + C, False, None),  # -mon may come first, as in QEMU
        (C + "--monitor m", False, None),
        (C + "--monitor=chardev=m,pretty=on", True, None),
        (C + "--monitor " + MON_JSON, True, "x"),
    ],
)
def test_monitors(cmd: str, pretty: bool, mon_id: str | None) -> None:
    (got,) = parse(cmd).monitors
    assert (got.chardev, got.pretty, got.id) == ("m", pretty, mon_id)
    words = shlex.split(cmd)
    assert got.origin in {*words, *(" ".join(words[i : i + 2]) for i in range(len(words)))}


@pytest.mark.parametrize(
    ("cmd", "reason"),
    [
        ("-mon chardev=nosuch,mode=control", 'chardev "nosuch" not found'),
        ("-mon nosuch", 'chardev "nosuch" not found'),
        ("-mon chardev=m,mode=bogus", "Parameter 'mode' does not accept value 'bogus'"),
        ("-mon chardev=m,bogus=1", "Invalid parameter 'bogus'"),
        ("-mon mode=control", "Parameter 'chardev' is missing"),
        ("-mon chardev=m,pretty=maybe", "Parameter 'pretty' expects 'on' or 'off'"),
        ("-mon chardev=m,mode=control,id=1x", "Parameter 'id' expects an identifier"),
        (C + "-mon m,mode=control,id=x -mon m,mode=control,id=x", "Duplicate ID 'x' for mon"),
        (C + "-mon m,mode=control -mon chardev=m,mode=control", "Device 'm' is in use"),
        (C + "-mon m,mode=readline", "Only QMP is supported"),
        (C + "-mon m", "Only QMP is supported"),  # -mon defaults to the human monitor
        (C + "--monitor chardev=m,bogus=1", "Parameter 'bogus' is unexpected"),
        (C + "--monitor chardev=m,pretty=maybe", "Parameter 'pretty' expects 'on' or 'off'"),
        (C + "--monitor chardev=m,mode=readline", "Only QMP is supported"),
        (C + "--monitor m,pretty", "Expected '=' after parameter 'pretty'"),
        ("--monitor mode=control", "Parameter 'chardev' is missing"),
        ("--monitor nosuch,mode=readline", 'chardev "nosuch" not found'),
        ("--monitor help", "Help is not available for this option"),
        (
            '--monitor \'{"chardev": "m", "pretty": "on"}\'',
            "Invalid parameter type for 'pretty', expected: boolean",
        ),
    ],
)
def test_monitor_errors(cmd: str, reason: str) -> None:
    check_error(cmd, reason)


@pytest.mark.parametrize(
    ("value", "server", "wait"),
    [
        ("unix:/q,server=on,wait=off", True, False),
        ("unix:/q,server,nowait", True, False),
        ("unix:/q", False, True),
        ("unix:path=/q,server=on", True, True),
        ("unix:/q,id=ignored,server=on", True, True),
        ("/q", True, False),  # bitbackd's plain form: listen on the path
    ],
)
def test_qmp_forms(value: str, server: bool, wait: bool) -> None:
    config = parse("-qmp " + value)
    (chardev,) = config.chardevs
    assert (chardev.id, chardev.path) == ("compat_monitor0", "/q")
    assert (chardev.server, chardev.wait) == (server, wait)
    label = "compat_monitor0"
    assert config.monitors == (MonitorSpec(label, False, label, "-qmp " + value),)
    assert config.warnings == ()  # QEMU does not warn about short booleans in -qmp


def test_qmp_numbering_pretty_and_chardev_form() -> None:
    config = parse(C + "-qmp chardev:m -qmp-pretty unix:/q2,server=on,wait=off --qmp /q3")
    assert [c.id for c in config.chardevs] == ["m", "compat_monitor1", "compat_monitor2"]
    monitors = [(m.chardev, m.pretty) for m in config.monitors]
    assert monitors == [("m", False), ("compat_monitor1", True), ("compat_monitor2", False)]


QMP_ONLY_UNIX = "bitbackd supports only unix:<path> and chardev:<id> for -qmp"


@pytest.mark.parametrize(
    ("cmd", "reason"),
    [
        ("-qmp unix:/q,bogus=1", "Invalid parameter 'bogus'"),
        ("-qmp unix:/q,help", "Invalid parameter 'help'"),
        ("-qmp chardev:nosuch", 'chardev "nosuch" not found'),
        (C + "-qmp chardev:m -qmp chardev:m", "Duplicate ID 'm' for mon"),
        (
            "-qmp unix:/q -chardev socket,id=compat_monitor0,path=/x",
            "Duplicate ID 'compat_monitor0' for chardev",
        ),
        ("-qmp unix:", "bitbackd supports only UNIX socket chardevs: give path=<socket>"),
        ("--qmp ''", "bitbackd supports only UNIX socket chardevs: give path=<socket>"),
        ("-qmp tcp:localhost:4444,server=on", QMP_ONLY_UNIX),  # bitbackd's own
        ("-qmp stdio", QMP_ONLY_UNIX),  # bitbackd's own
    ],
)
def test_qmp_errors(cmd: str, reason: str) -> None:
    check_error(cmd, reason)


# ---------------------------------------------------------------------------------------------
# -drive


def test_drive_commas_in_file_names() -> None:
    (drive,) = parse("-drive if=none,file=/a,,b,,,,c.qcow2,format=qcow2").drives
    assert drive.file == "/a,b,,c.qcow2"


@pytest.mark.parametrize(
    ("cache", "expected"),
    [
        ("", CacheOptions(direct=False, no_flush=False, writeback=True)),
        (",cache=none", CacheOptions(direct=True, no_flush=False, writeback=True)),
        (",cache=off", CacheOptions(direct=True, no_flush=False, writeback=True)),
        (",cache=directsync", CacheOptions(direct=True, no_flush=False, writeback=False)),
        (",cache=writethrough", CacheOptions(direct=False, no_flush=False, writeback=False)),
        (",cache=unsafe", CacheOptions(direct=False, no_flush=True, writeback=True)),
        (",cache=none,cache.direct=off,cache.writeback=off", CacheOptions(False, False, False)),
        (",cache.no-flush=on", CacheOptions(direct=False, no_flush=True, writeback=True)),
    ],
)
def test_drive_cache_modes(cache: str, expected: CacheOptions) -> None:
    assert parse("-drive if=none,file=/x" + cache).drives[0].cache == expected


def test_drive_typed_options() -> None:
    (drive,) = parse(
        "-drive if=none,id=d,file=/x,format=raw,node-name=n0,readonly=on,force-share=on,"
        "auto-read-only=on,aio=native,cache=none,discard=on,detect-zeroes=unmap,"
        "werror=stop,rerror=ignore,offset=512,file.locking=off"
    ).drives
    assert (drive.node_name, drive.read_only, drive.force_share) == ("n0", True, True)
    assert (drive.auto_read_only, drive.aio) == (True, "native")
    assert (drive.discard, drive.detect_zeroes) == ("unmap", "unmap")
    assert (drive.werror, drive.rerror) == ("stop", "ignore")
    assert drive.format_options == {"offset": "512", "file.locking": "off"}
    assert drive.options["readonly"] == "on" and drive.options["file.locking"] == "off"


def test_drive_driver_is_format() -> None:
    assert parse("-drive if=none,file=/x,driver=qcow2").drives[0].format == "qcow2"


@pytest.mark.parametrize(
    ("drives", "ids"),
    [
        ("-drive if=virtio,file=/a -drive if=virtio,file=/b", ["virtio0", "virtio1"]),
        (
            "-drive if=none,file=/a -drive if=virtio,file=/b -drive if=none,file=/c",
            ["none0", "virtio0", "none1"],
        ),
        ("-drive if=virtio,file=/a,index=3 -drive if=virtio,file=/b", ["virtio3", "virtio0"]),
        ("-drive if=virtio,file=/a,unit=2", ["virtio2"]),
        ("-drive if=virtio,file=/a,bus=2", ["virtio0"]),
        ("-drive if=virtio,file=/a,index=-1", ["virtio0"]),
        ("-drive if=virtio,file=/a,index=0x1", ["virtio1"]),
        ("-drive if=virtio,file=/a,id=virtio0 -drive if=virtio,file=/b", ["virtio0", "virtio1"]),
        ("-drive if=virtio,file=/a,id=x -drive if=virtio,file=/b", ["x", "virtio1"]),
    ],
)
def test_drive_generated_ids(drives: str, ids: list[str]) -> None:
    assert [d.id for d in parse(drives).drives] == ids


D = "-drive if=virtio,file=/x,format=qcow2"
RAW = "-drive if=virtio,file=/x,format=raw"


@pytest.mark.parametrize(
    ("cmd", "reason"),
    [
        (D + ",bogus=1", "Block format 'qcow2' does not support the option 'bogus'"),
        (RAW + ",locking=off", "Block format 'raw' does not support the option 'locking'"),
        (D + ",serial=x", "Block format 'qcow2' does not support the option 'serial'"),
        (D + ",readonly=maybe", "Parameter 'read-only' expects 'on' or 'off'"),
        (
            D + ",readonly=on,read-only=off",
            "'read-only' and its alias 'readonly' can't be used at the same time",
        ),
        (D + ",driver=qcow2", "Cannot specify both 'driver' and 'format'"),
        (D + ",cache=bogus", "invalid cache option"),
        (D + ",cache.direct=bogus", "Parameter 'cache.direct' expects 'on' or 'off'"),
        (D + ",auto-read-only=bogus", "Parameter 'auto-read-only' expects 'on' or 'off'"),
        (D + ",aio=bogus", "invalid aio option"),
        (
            D + ",aio=native",
            "aio=native was specified, but it requires cache.direct=on, which was not specified.",
        ),
        (D + ",discard=bogus", "Invalid discard option"),
        (D + ",detect-zeroes=bogus", "invalid parameter value: bogus"),
        (D + ",werror=bogus", "'bogus' invalid write error action"),
        (D + ",rerror=enospc", "'enospc' invalid read error action"),
        (D + ",force-share=on", "force-share=on can only be used with read-only images"),
        (D + ",index=x", "Parameter 'index' expects a number"),
        (D + ",node-name=1x", "Invalid node-name: '1x'"),
        (D + ",node-name=" + "a" * 32, "Node name too long"),
        (D.replace("qcow2", "bogus"), "Unknown driver 'bogus'"),
        ("-drive if=virtio,format=qcow2", 'A block device must be specified for "file"'),
        ("-drive if=bogus,file=/x", "unsupported bus type 'bogus'"),
        ("-drive if=virtio,id=1a,file=/x", "Parameter 'id' expects an identifier"),
        (
            "-drive if=virtio,id=a,file=/x -drive if=virtio,id=a,file=/y",
            "Duplicate ID 'a' for drive",
        ),
        (
            "-drive if=virtio,id=virtio1,file=/x -drive if=virtio,file=/y",
            "Device with id 'virtio1' already exists",
        ),
        (
            "-drive if=virtio,file=/x,index=2 -drive if=virtio,file=/y,index=2",
            "drive with bus=0, unit=2 (index=2) exists",
        ),
        (
            "-drive if=virtio,file=/x,index=2,bus=0 -drive if=virtio,file=/y,unit=2",
            "drive with bus=0, unit=2 (index=-1) exists",
        ),
        ("-drive if=virtio,file=/x,index=2,unit=1", "index cannot be used with bus and unit"),
        ("-drive if=virtio", "Device needs media, but drive is empty"),
        (
            "-drive if=virtio,file=/tmp/a,b.qcow2,format=qcow2",  # a short-form boolean 'b.qcow2'
            "Block format 'qcow2' does not support the option 'b.qcow2'",
        ),
        # bitbackd's own refusals
        (
            "-drive if=scsi,file=/x",
            "if=scsi is not supported by bitbackd: use if=virtio or if=none",
        ),
        ("-drive file=/x", "if=ide is not supported by bitbackd: use if=virtio or if=none"),
        (D.replace("qcow2", "vmdk"), "bitbackd does not support the block format 'vmdk'"),
        (D + ",snapshot=on", "bitbackd does not support the -drive option 'snapshot'"),
        (
            D + ",throttling.bps-total=100",
            "bitbackd does not support the -drive option 'throttling.bps-total'",
        ),
    ],
)
def test_drive_errors(cmd: str, reason: str) -> None:
    check_error(cmd, reason)


def test_probed_format_options_are_checked_by_the_caller() -> None:
    (drive,) = parse("-drive if=none,file=/x,lazy-refcounts=on,bogus=1").drives
    assert drive.format is None and drive.format_options == {"lazy-refcounts": "on", "bogus": "1"}
    with pytest.raises(CommandLineError) as info:
        check_format_options(drive, "qcow2")
    assert info.value.location == drive.origin
    assert info.value.reason == "Block format 'qcow2' does not support the option 'bogus'"
    (ok,) = parse("-drive if=none,file=/x,lazy-refcounts=on,overlap-check.main-header=off").drives
    check_format_options(ok, "qcow2")


# ---------------------------------------------------------------------------------------------
# -device


@pytest.mark.parametrize(
    ("driver", "canonical"),
    [
        ("virtio-blk", "virtio-blk-pci"),
        ("virtio-blk-pci", "virtio-blk-pci"),
        ("virtio-blk-device", "virtio-blk-device"),
        ("driver=virtio-blk", "virtio-blk-pci"),
    ],
)
def test_device(driver: str, canonical: str) -> None:
    device = f"-device {driver},drive=d0,id=dev0,serial=s1"
    config = parse(f"-drive if=none,id=d0,file=/x {device}")
    assert config.devices == (DeviceSpec(canonical, "d0", "dev0", {"serial": "s1"}, False, device),)


def test_device_on_a_blockdev_node_and_on_a_generated_drive_id() -> None:
    config = parse(
        "-blockdev driver=file,node-name=n0,filename=/x -device virtio-blk,drive=n0 "
        "-drive if=none,file=/y -device virtio-blk,drive=none0"
    )
    assert [d.drive for d in config.devices] == ["n0", "none0"]


N = "-drive if=none,id=d0,file=/x "
AUTOMATIC = (
    "Drive 'd0' is already in use because it has been automatically connected to another "
    "device (did you need 'if=none' in the drive options?)"
)


@pytest.mark.parametrize(
    ("cmd", "reason", "at"),
    [
        (
            "-device virtio-blk,drive=nosuch",
            "Property 'virtio-blk-device.drive' can't find value 'nosuch'",
            None,
        ),
        (
            "-device virtio-blk-pci,drive=nosuch",
            "Property 'virtio-blk-device.drive' can't find value 'nosuch'",
            None,
        ),
        ("-device virtio-blk", "drive property not set", None),
        (
            N + "-device virtio-blk,drive=d0,bogus=1",
            "Property 'virtio-blk-pci.bogus' not found",
            None,
        ),
        (
            N + "-device virtio-blk-device,drive=d0,bogus=1",
            "Property 'virtio-blk-device.bogus' not found",
            None,
        ),
        (N + "-device drive=d0", "Parameter 'driver' is missing", None),
        (N + "-device virtio-blk,drive=d0,id=1x", "Parameter 'id' expects an identifier", None),
        (
            N + "-device virtio-blk,drive=d0,id=x -device virtio-blk,drive=d0,id=x",
            "Duplicate ID 'x' for device",
            None,
        ),
        (
            N + "-device virtio-blk,drive=d0 -device virtio-blk,drive=d0",
            "Drive 'd0' is already in use by another device",
            None,
        ),
        (
            "-drive if=virtio,id=d0,file=/x -device virtio-blk,drive=d0",
            AUTOMATIC,
            "-drive if=virtio,id=d0,file=/x",  # QEMU blames the drive's implicit device
        ),
        (
            "-drive if=none,id=x -device virtio-blk,drive=x",
            "Device needs media, but drive is empty",
            None,
        ),
        (  # bitbackd's own
            N + "-device scsi-hd,drive=d0",
            "bitbackd supports only virtio-blk devices, not 'scsi-hd'",
            None,
        ),
    ],
)
def test_device_errors(cmd: str, reason: str, at: str | None) -> None:
    check_error(cmd, reason, at)


# ---------------------------------------------------------------------------------------------
# storage-daemon spelling, help, version, argv-level errors


def test_storage_daemon_style() -> None:
    config = parse(
        "--chardev socket,id=m,path=/q,server=on,wait=off --monitor=m --pidfile /run/b.pid "
        "--blockdev=driver=qcow2,node-name=n0,file.driver=file,file.filename=/x "
        "--pidfile=/run/c.pid"
    )
    assert config.monitors[0].origin == "--monitor=m"
    (blockdev,) = config.blockdevs
    assert blockdev.options == {
        "driver": "qcow2",
        "node-name": "n0",
        "file": {"driver": "file", "filename": "/x"},
    }
    assert (
        blockdev.origin == "--blockdev=driver=qcow2,node-name=n0,file.driver=file,file.filename=/x"
    )
    assert config.pidfile == "/run/c.pid"  # the last one wins


@pytest.mark.parametrize(
    ("cmd", "show_help", "show_version"),
    [
        ("-h", True, False),
        ("--help", True, False),
        ("-help", True, False),
        ("-V", False, True),
        ("--version", False, True),
        ("-version", False, True),
        ("--version --help", False, True),
        ("--help --drive if=bogus", True, False),  # options after it are never looked at
    ],
)
def test_help_and_version_stop_the_parse(cmd: str, show_help: bool, show_version: bool) -> None:
    config = parse(cmd)
    assert (config.show_help, config.show_version) == (show_help, show_version)


@pytest.mark.parametrize(
    ("cmd", "reason", "at"),
    [
        ("-bogus", "invalid option", "-bogus"),
        ("-", "invalid option", "-"),
        ("-drive=if=none", "invalid option", "-drive=if=none"),
        ("-drive", "requires an argument", "-drive"),
        ("extra", "Unexpected argument", "extra"),
        ("-- --help", "Unexpected argument", "--help"),
        ("--help -bogus", "invalid option", "-bogus"),  # names are checked before anything runs
        ("-drive if=bogus -bogus", "invalid option", "-bogus"),
        ("-drive if=bogus --help", "unsupported bus type 'bogus'", "-drive if=bogus"),  # as qsd
        # getopt's texts, without a location, for the storage daemon's spelling
        ("--bogus", "unrecognized option '--bogus'", None),
        ("--bogus=x", "unrecognized option '--bogus=x'", None),
        ("--blockdev", "option '--blockdev' requires an argument", None),
        ("--pidfile", "option '--pidfile' requires an argument", None),
        ("--help=x", "option '--help' doesn't allow an argument", None),
        # bitbackd's own: storage-daemon options it does not have
        ("--export type=nbd", "not supported by bitbackd", "--export type=nbd"),
        ("--daemonize", "not supported by bitbackd", "--daemonize"),
    ],
)
def test_argv_errors(cmd: str, reason: str, at: str | None) -> None:
    with pytest.raises(CommandLineError) as info:
        parse(cmd)
    assert (info.value.reason, info.value.location) == (reason, at)
    assert str(info.value) == (f"{at}: {reason}" if at else reason)


def test_error_is_one_line_and_an_invalid_argument() -> None:
    with pytest.raises(InvalidArgumentError) as info:
        parse("-drive if=scsi,file=/x")
    assert str(info.value) == (
        "-drive if=scsi,file=/x: if=scsi is not supported by bitbackd: use if=virtio or if=none"
    )
    assert "\n" not in str(info.value)


def test_empty_command_line() -> None:
    assert parse("") == DaemonConfig()


def test_help_text_lists_every_option() -> None:
    for name in sorted((cmdline._WITH_ARG | cmdline._FLAGS) - cmdline._REFUSED):
        if name not in ("h", "V", "help", "version"):
            assert f"-{name}" in HELP_TEXT, name
    assert "ignored" in HELP_TEXT
