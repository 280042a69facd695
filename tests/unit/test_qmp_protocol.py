"""The sans-I/O QMP core against transcripts of QEMU 7.2.22 (``qemu-system-x86_64 -qmp
unix:...``, raw socket, replies copied verbatim). Each row is one measured exchange: the
chunks a client wrote and every line QEMU answered, in order. Commands that reach dispatch
are answered by a stand-in for QEMU's ``query-name`` / ``query-status``."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitback.qmp.errors import command_not_found
from bitback.qmp.jsonstream import MAX_TOKEN_SIZE
from bitback.qmp.protocol import Command, ServerConnection, encode_event, encode_message

NEG = b'{"execute":"qmp_capabilities"}'
OK = '{"return": {}}'
STATUS = '{"return": {"status": "prelaunch", "singlestep": false, "running": false}}'
# QAPI order (running, singlestep, status); the encoder must print QEMU's QDict order.
RESULTS: dict[str, Any] = {
    "query-name": {},
    "query-status": {"running": False, "singlestep": False, "status": "prelaunch"},
}


def err(desc: str, cls: str = "GenericError") -> str:
    return '{"error": {"class": "%s", "desc": "%s"}}' % (cls, desc)  # noqa: UP031


def status_id(id_json: str) -> str:
    return STATUS[:-1] + f', "id": {id_json}}}'


def exchange(chunks: list[bytes], conn: ServerConnection | None = None) -> list[str]:
    """Feed ``chunks``; every reply line, commands answered as QEMU would."""
    conn = conn or ServerConnection()
    out: list[bytes] = []
    for chunk in chunks:
        for item in conn.receive(chunk):
            if isinstance(item, bytes):
                out.append(item)
            elif item.name in RESULTS:
                out.append(conn.reply(item, RESULTS[item.name]))
            else:
                out.append(conn.error_reply(item, command_not_found(item.name)))
    assert all(line.endswith(b"\r\n") and line.count(b"\r\n") == 1 for line in out)
    return [line[:-2].decode("ascii") for line in out]


QS = b'{"execute":"query-status", "id": %s}'
EXPECTING = err("JSON parse error, expecting value")
NOT_OBJECT = err("QMP input must be a JSON object")

FRAMING = [
    ("two-in-one-chunk", [NEG + b' {"execute":"query-status"}\r\n{"execute":"query-name"}'],
     [OK, STATUS, OK]),
    ("split-anywhere", [NEG, b'{"exec', b'ute": "query-', b'status"}'], [OK, STATUS]),
    ("whitespace", [NEG, b'\t\r\n {"execute":"query-name"}\r\n\r\n\t'
                    b'{"execute":"query-name", "id": "\\"{}\\""}'],
     [OK, OK, '{"return": {}, "id": "\\"{}\\""}']),
    ("missing-value", [NEG, b'{"execute": }\n'], [OK, EXPECTING]),
    ("missing-colon", [NEG, b'{"execute" "x"}\n'],
     [OK, err("JSON parse error, missing : in object pair")]),
    ("trailing-comma", [NEG, b'{"execute": "x",}\n', b"[1,]\n", b"{,}\n"],
     [OK, EXPECTING, EXPECTING, EXPECTING]),
    ("no-separator", [NEG, b'{"a":1 "b":2}\n', b'{"a":1]', b'["a"}'],
     [OK, err("JSON parse error, expected separator in dict"),
      err("JSON parse error, expected separator in dict"),
      err("JSON parse error, expected separator in list")]),
    ("bad-keyword", [NEG, b"tru\n", QS % b"nan"],
     [OK, err("JSON parse error, invalid keyword 'tru'"),
      err("JSON parse error, invalid keyword 'nan'")]),
    ("lone-closers", [NEG, b"}\n", b"]\n"], [OK, EXPECTING, EXPECTING]),
    ("brackets-mismatched", [NEG, b"[}", b"]", b'{"execute":"query-name"}', b"[}]\n", b"{]}\n"],
     [OK, EXPECTING, EXPECTING, OK] + [EXPECTING] * 4),
    ("key-not-string", [NEG, b'{{"a":1}:2}'],
     [OK, err("JSON parse error, key is not a string in object")]),
    ("not-an-object", [NEG, b"[]\n", b'"str"\n', b"null true\n"], [OK] + [NOT_OBJECT] * 4),
    ("number-needs-lookahead", [NEG, b"3", b"\n"], [OK, NOT_OBJECT]),
    ("duplicate-key", [NEG, b'{"execute":"query-status","execute":"query-status"}'],
     [OK, err("JSON parse error, duplicate key")]),
    ("first-error-wins", [NEG, b'{"a":"\\q", "b": tru}'],
     [OK, err("JSON parse error, invalid escape sequence in string")]),
    ("stray-then-resync", [NEG, b'{"execute": @}\n', b'{"execute":"query-status"}'],
     [OK, err("JSON parse error, stray '@'"), EXPECTING, STATUS]),
    ("stray-0xff", [NEG, b'\xff{"execute":"query-status"}'],
     [OK, err("JSON parse error, stray '\\uFFFD'"), STATUS]),
    ("stray-control-in-string", [NEG, b'{"execute": "a\x01"}\n', b'{"execute":"query-status"}'],
     [OK, err("JSON parse error, stray '\\\"a\\u0001'"), EXPECTING, STATUS]),
    ("stray-control-top", [NEG, b'\x04{"execute":"query-status"}'],
     [OK, err("JSON parse error, stray '\\u0004'"), STATUS]),
    ("stray-nul", [NEG, b'{"execute":\x00"query-status"}\n{"execute":"query-name"}'],
     [OK, err("JSON parse error, stray ''"), EXPECTING, OK]),
    ("bad-numbers", [NEG, QS % b"01", QS % b"1.", QS % b"-", QS % b"1e", QS % b"True"],
     [OK, err("JSON parse error, stray '01'"), EXPECTING, err("JSON parse error, stray '1.}'"),
      err("JSON parse error, stray '-}'"), err("JSON parse error, stray '1e}'"),
      err("JSON parse error, stray 'T'"), EXPECTING]),
    ("single-quotes", [b"{'execute': 'qmp_capabilities'}",
                       b"{'execute': 'query-status', 'id': 'it''s'}",
                       b"{'execute': 'query-status', 'id': 'a\"b\\'c'}"],
     [OK, err("JSON parse error, expected separator in dict"), status_id('"a\\"b\'c"')]),
]  # fmt: skip

SHAPE = [
    ("execute-not-string", [NEG, b'{"execute": 1}', b'{"execute": 1, "id": 5}'],
     [OK, err("QMP input member 'execute' must be a string"),
      '{"id": 5, "error": {"class": "GenericError", "desc": '
      "\"QMP input member 'execute' must be a string\"}}"]),
    ("lacks-execute", [NEG, b"{}", b'{"id": "x"}', b'{"arguments": {}}'],
     [OK, err("QMP input lacks member 'execute'"),
      '{"id": "x", "error": {"class": "GenericError", "desc": '
      '"QMP input lacks member \'execute\'"}}',
      err("QMP input lacks member 'execute'")]),
    ("arguments-not-object", [NEG, b'{"execute":"query-status","arguments":[]}',
                              b'{"execute":"query-status","arguments":null, "id": [1]}'],
     [OK, err("QMP input member 'arguments' must be an object"),
      '{"id": [1], "error": {"class": "GenericError", "desc": '
      "\"QMP input member 'arguments' must be an object\"}}"]),
    ("unexpected-member", [NEG, b'{"execute":"query-status","foo":1}'],
     [OK, err("QMP input member 'foo' is unexpected")]),
    ("exec-oob-without-capability", [NEG, b'{"execute":"query-status","exec-oob":"query-status"}',
                                     b'{"exec-oob":"query-status"}'],
     [OK] + [err("QMP input member 'exec-oob' is unexpected")] * 2),
    # qmp_dispatch_check_obj walks the QDict in hash order: the first fault in that order wins.
    ("first-fault-in-qdict-order", [NEG, b'{"execute":1,"arguments":[],"foo":1,"zzz":2,"id":3}',
                                    b'{"foo":1,"arguments":[]}', b'{"arguments":[],"bar":1}'],
     [OK, '{"id": 3, "error": {"class": "GenericError", "desc": '
      "\"QMP input member 'execute' must be a string\"}}",
      err("QMP input member 'arguments' must be an object"),
      err("QMP input member 'bar' is unexpected")]),
]  # fmt: skip

NEGOTIATION = [
    ("before-negotiation", [b'{"execute": "query-status"}', b'{"execute":"query-status","id":7}',
                            b'{"execute":"nope"}', b'{"execute": 1}', b"[]",
                            b'{"execute":"qmp_capabilities","arguments":[]}'],
     [err("Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound"),
      '{"id": 7, "error": {"class": "CommandNotFound", "desc": '
      "\"Expecting capabilities negotiation with 'qmp_capabilities'\"}}",
      err("Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound"),
      err("QMP input member 'execute' must be a string"), NOT_OBJECT,
      err("QMP input member 'arguments' must be an object")]),
    ("negotiate-twice", [NEG, NEG],
     [OK, err("Capabilities negotiation is already complete, command ignored", "CommandNotFound")]),
    ("capability-arguments", [
        b'{"execute":"qmp_capabilities","arguments":{"enable":"oob"}}',
        b'{"execute":"qmp_capabilities","arguments":{"enable":["bogus"]}}',
        b'{"execute":"qmp_capabilities","arguments":{"bogus":1}}',
        b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"], "bogus":1}}',
        b'{"execute":"qmp_capabilities","arguments":{"enable":null}}',
        b'{"execute":"qmp_capabilities","arguments":{"enable":[1]}}',
        b'{"execute":"qmp_capabilities","arguments":{"enable":[]}, "id": 1}',
        # after negotiation arguments are still checked first
        b'{"execute":"qmp_capabilities","arguments":{"enable":["bogus"]}}',
        b'{"execute":"qmp_capabilities","arguments":{"bogus": 1}}',
        b'{"execute":"qmp_capabilities","arguments":{"enable": ["oob"]}}'],
     [err("Invalid parameter type for 'enable', expected: array"),
      err("Parameter 'null' does not accept value 'bogus'"),
      err("Parameter 'bogus' is unexpected"), err("Parameter 'bogus' is unexpected"),
      err("Invalid parameter type for 'enable', expected: array"),
      err("Invalid parameter type for 'enable[0]', expected: string"),
      '{"return": {}, "id": 1}',
      err("Parameter 'null' does not accept value 'bogus'"),
      err("Parameter 'bogus' is unexpected"),
      err("Capabilities negotiation is already complete, command ignored", "CommandNotFound")]),
    ("unexpected-member-before-negotiation",
     [b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"foo":1}'],
     [err("QMP input member 'foo' is unexpected")]),
    ("oob", [b'{"execute":"qmp_capabilities","arguments":{"enable":["oob","oob"]}}',
             b'{"exec-oob":"query-status"}', b'{"exec-oob":"nope"}',
             b'{"exec-oob":"query-status","execute":"query-status"}',
             b'{"execute":"query-status","exec-oob":"query-status"}', b'{"exec-oob":1}',
             b'{"exec-oob":"qmp_capabilities"}', b'{"execute":"query-status"}'],
     [OK, err("The command query-status does not support OOB"),
      err("The command nope has not been found", "CommandNotFound"),
      err("QMP input member 'execute' clashes with 'exec-oob'"),
      err("QMP input member 'execute' clashes with 'exec-oob'"),
      err("QMP input member 'exec-oob' must be a string"),
      err("The command qmp_capabilities does not support OOB"), STATUS]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [pytest.param(c, e, id=i) for i, c, e in FRAMING + SHAPE + NEGOTIATION],
)
def test_qemu_transcripts(chunks: list[bytes], expected: list[str]) -> None:
    conn = ServerConnection(command_exists=RESULTS.__contains__)
    assert exchange(chunks, conn) == expected


def test_greeting_is_qemus() -> None:
    greeting = ServerConnection().greeting((7, 2, 22), "Debian 1:7.2+dfsg-7+deb12u18+b3")
    assert greeting == (
        b'{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, '
        b'"package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}\r\n'
    )
    assert b'"capabilities": []' in ServerConnection(offer_oob=False).greeting((7, 2, 0), "")


def test_oob_not_offered_cannot_be_enabled() -> None:
    conn = ServerConnection(offer_oob=False)
    enable = b'{"execute":"qmp_capabilities","arguments":{"enable":["oob","oob"]}}'
    assert exchange([enable], conn) == [err("Capability oob, oob not available")]
    assert not conn.negotiated


def test_commands_carry_id_and_arguments() -> None:
    conn = ServerConnection()
    conn.receive(NEG)
    items = conn.receive(b'{"execute": "x", "arguments": {"a": [1]}, "id": null}{"execute": "y"}')
    assert items == [Command("x", {"a": [1]}, None, True), Command("y", {}, None, False)]
    first, second = (i for i in items if isinstance(i, Command))
    assert conn.reply(first, []) == b'{"return": [], "id": null}\r\n'
    assert conn.reply(second, "") == b'{"return": ""}\r\n'


def test_exec_oob_without_lookup_is_left_to_the_dispatcher() -> None:
    conn = ServerConnection()
    conn.receive(b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}')
    assert conn.oob_enabled
    assert conn.receive(b'{"exec-oob": "migrate-pause", "id": 1}') == [
        Command("migrate-pause", {}, 1, True, oob=True)
    ]


ENCODING = [
    # id values come back re-encoded by QEMU: QDict order, %.17g doubles, escapes.
    (b'{"b": 1, "a": [1, "x"]}', '{"a": [1, "x"], "b": 1}'),
    (b"18446744073709551615", "18446744073709551615"),
    (b"18446744073709551616", "1.8446744073709552e+19"),
    (b"-9223372036854775808", "-9223372036854775808"),
    (b"-9223372036854775809", "-9.2233720368547758e+18"),
    (b"1.5", "1.5"), (b"1.0", "1"), (b"1e2", "100"), (b"-0", "0"), (b"-0.0", "-0"),
    (b"1e400", "inf"), (b"0.1", "0.10000000000000001"), (b"1E-5", "1.0000000000000001e-05"),
    (b"123456789.123456789", "123456789.12345679"),
    (b'"\\u0073\\/\\\'\\b"', '"s/\'\\b"'),
    (b'"a\\u0000b"', '"a\\u0000b"'), (b'"a\xc0\x80b"', '"a\\u0000b"'),
    (b'"\\uD83D\\uDE00 \xc3\xa9 \xf0\x9f\x98\x80 \\u00e9"',
     '"\\uD83D\\uDE00 \\u00E9 \\uD83D\\uDE00 \\u00E9"'),
]  # fmt: skip


@pytest.mark.parametrize(("id_json", "echoed"), ENCODING)
def test_id_echo_encoding(id_json: bytes, echoed: str) -> None:
    assert exchange([NEG, QS % id_json]) == [OK, status_id(echoed)]


BAD_STRINGS = [
    (b'"\\q"', "invalid escape sequence in string"),
    (b'"\\u12"', '\\\\u12\\" is not a valid Unicode character'),
    (b'"\\uD800"', "\\\\uD800 is not a valid Unicode character"),
    (b'"\\uD800\\u0041"', "\\\\uD800 is not a valid Unicode character"),
    (b'"\\uDC00"', "\\\\uDC00 is not a valid Unicode character"),
    (b'"\\uFFFF"', "\\\\uFFFF is not a valid Unicode character"),
    (b'"\xc3"', "invalid UTF-8 sequence in string"),
    (b'"\xef\xbf\xbf"', "invalid UTF-8 sequence in string"),  # U+FFFF, a noncharacter
    (b'"\xc1\x81"', "invalid UTF-8 sequence in string"),  # overlong
    (b'"\xed\xa0\x80"', "invalid UTF-8 sequence in string"),  # a surrogate
    (b'"\xef\xb7\x90"', "invalid UTF-8 sequence in string"),  # U+FDD0
]


@pytest.mark.parametrize(("id_json", "desc"), BAD_STRINGS)
def test_bad_strings(id_json: bytes, desc: str) -> None:
    assert exchange([NEG, QS % id_json]) == [OK, err(f"JSON parse error, {desc}")]


def test_event_encoding() -> None:
    # measured: {"timestamp": {...}, "event": "SHUTDOWN", "data": {...}}; no "data" for STOP
    shutdown = encode_event("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"}, 17, 5)
    assert shutdown == (
        b'{"timestamp": {"seconds": 17, "microseconds": 5}, "event": "SHUTDOWN", '
        b'"data": {"guest": false, "reason": "host-qmp-quit"}}\r\n'
    )
    assert encode_event("STOP", None, 1, 2) == (
        b'{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}\r\n'
    )
    conn = ServerConnection()
    assert conn.event("STOP", None, 1, 2) is None  # QEMU sends events only after negotiation
    conn.receive(NEG)
    assert conn.event("STOP", None, 1, 2) == encode_event("STOP", None, 1, 2)
    assert (
        encode_message({"return": [{"a": 1}], "id": "x"})
        == b'{"return": [{"a": 1}], "id": "x"}\r\n'
    )


def test_nesting_limit() -> None:
    ok = [NEG, b"{" + b'"execute":"query-name","id":' + b"[" * 1023 + b"]" * 1023 + b"}"]
    assert exchange(ok) == [OK, '{"return": {}, "id": ' + "[" * 1023 + "]" * 1023 + "}"]
    # The 1025th opening bracket fails the message; each of the 1025 closers that follow is
    # then a message of its own (QEMU 7.2 sends all 1026 errors).
    deep = [NEG, b"[" * 1025 + b"]" * 1025 + b"\n", b'{"execute":"query-name"}']
    replies = exchange(deep)
    assert replies == [OK, err("JSON nesting depth limit exceeded")] + [EXPECTING] * 1025 + [OK]


@pytest.mark.slow
def test_token_count_limit() -> None:
    def message(n: int) -> bytes:  # 8 + 2n + 1 tokens
        return b'{"execute":"query-name","id":[' + b"1," * (n - 1) + b"1]}"

    # 2 Mi tokens fit; the 2 Mi + 1st fails the message. Measured with the limit hit on the
    # last token (nothing left over) and two tokens before it (two more errors).
    tail = b'{"execute":"query-name"}'
    assert exchange([NEG, message(1048572), tail]) == [
        OK, err("JSON token count limit exceeded"), OK,
    ]  # fmt: skip
    assert exchange([NEG, message(1048573), tail]) == [
        OK, err("JSON token count limit exceeded"), EXPECTING, EXPECTING, OK,
    ]  # fmt: skip


def _feed_big(
    conn: ServerConnection, head: bytes, filler: bytes, tail: bytes
) -> tuple[list[Any], list[int]]:
    """Feed head + 65 MiB of filler (in 1 MiB chunks) + tail; replies and buffer sizes."""
    items: list[Any] = list(conn.receive(head))
    sizes = [conn.buffered]
    chunk = filler * ((1 << 20) // len(filler))
    for _ in range(65):
        items += conn.receive(chunk)
        sizes.append(conn.buffered)
    items += conn.receive(tail)
    sizes.append(conn.buffered)
    return items, sizes


def test_oversized_message_one_error_bounded_memory() -> None:
    """A 65 MiB message whose tokens pass 64 MiB at its last token: one error, nothing
    held after it, and the connection goes on. Whitespace between tokens is free, so the
    string is 64 MiB - 32 and 1 MiB of blanks precedes the closing brace."""
    conn = ServerConnection()
    conn.receive(NEG)
    items = conn.receive(b'{"execute":"query-name","id":"')
    mib = b"x" * (1 << 20)
    for _ in range(63):
        items += conn.receive(mib)
    items += conn.receive(mib[32:] + b'"')  # the string token is 64 MiB - 30 long
    assert items == [] and conn.buffered == MAX_TOKEN_SIZE - 1  # QEMU's budget, all but 1
    for _ in range(65):
        items += conn.receive(b" " * (1 << 20))
        assert conn.buffered == MAX_TOKEN_SIZE - 1  # blanks are not kept
    items += conn.receive(b"}")
    assert items == [err("JSON token size limit exceeded").encode() + b"\r\n"]
    assert conn.buffered == 0
    assert conn.receive(b'{"execute":"query-name"}') == [Command("query-name", {})]


@pytest.mark.parametrize(
    ("filler", "expected"),
    [
        # measured on QEMU 7.2 (14 minutes at its byte-at-a-time reading): the string token
        # is cut at 64 MiB + 1 and lexing restarts inside it.
        (b"A", [err("JSON token size limit exceeded"), err("JSON parse error, stray 'A'"),
                EXPECTING, OK]),
        # QEMU formats parser messages into 1024 bytes: the keyword is cut after 1006 'a'.
        (b"a", [err("JSON token size limit exceeded"),
                err("JSON parse error, invalid keyword '" + "a" * 1006),
                err("JSON parse error, stray '\\\"}\\n'"), OK]),
    ],
)  # fmt: skip
def test_oversized_string_is_cut_like_qemu(filler: bytes, expected: list[str]) -> None:
    conn = ServerConnection()
    conn.receive(NEG)
    head = b'{"execute":"query-name","id":"'
    items, sizes = _feed_big(conn, head, filler, b'"}\n{"execute":"query-name"}')
    assert max(sizes) <= MAX_TOKEN_SIZE
    assert sizes[-1] == 0 and sizes[-2] <= 1 << 20  # the rest is discarded or re-lexed
    replies = [(conn.reply(i, {}) if isinstance(i, Command) else i)[:-2].decode() for i in items]
    assert replies == expected


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_chunking_does_not_matter(data: st.DataObject) -> None:
    stream = b"".join(c for _, chunks, _ in FRAMING + SHAPE for c in chunks)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert exchange(pieces) == exchange([stream])
