"""bitbackd speaks QMP as QEMU 7.2 does, over real UNIX sockets, to raw and library clients.

The daemon runs as a subprocess serving ``--qmp SOCK``. The tests of spec section 2's table
(one per row) talk raw JSON through :class:`helpers.qmpraw.RawQMP`; then framing (several
messages per write, one message over many writes, ``\\r\\n``), the ``qemu.qmp`` library (its
async ``QMPClient``, the sync ``legacy.QEMUMonitorProtocol`` and ``qmp_shell``), and several
clients at once. Expected texts are QEMU 7.2's, measured on this machine
(``/tmp/qemu72-probe/SUMMARY.md`` and the measurements cited in the tests).

Several clients on one listening socket is where bitbackd differs from QEMU on purpose: a
QEMU socket chardev serves one client at a time, bitbackd serves all of them
(``bitback/daemon/server.py``), each with its own negotiation; events go to every negotiated
client.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import EventListener, ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

from helpers.procs import run
from helpers.qmpraw import DaemonPool, RawQMP, Running, error_of, is_event

pytestmark = pytest.mark.timeout(60)

NEGOTIATE_FIRST = "Expecting capabilities negotiation with 'qmp_capabilities'"
ALREADY_NEGOTIATED = "Capabilities negotiation is already complete, command ignored"


# -- fixtures ------------------------------------------------------------------------------


class Served:
    """The module's daemon: one ``--qmp`` socket, a 64 MiB qcow2 image as ``drive0``."""

    def __init__(self, daemon: Running, sock: str) -> None:
        self.daemon = daemon
        self.sock = sock

    def client(self, *, negotiate: bool = True) -> RawQMP:
        qmp = RawQMP.connect(self.sock)
        if negotiate:
            qmp.negotiate()
        return qmp


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, bitback_img: list[str]) -> Iterator[Served]:
    image = tmp_path_factory.mktemp("proto") / "disk.qcow2"
    run([*bitback_img, "create", "-f", "qcow2", image, "64M"], check=True)
    with DaemonPool() as pool:
        daemon, sock = pool.serve("-drive", f"if=virtio,id=drive0,file={image},format=qcow2")
        yield Served(daemon, sock)
        assert "Traceback" not in daemon.stderr, daemon.stderr


@pytest.fixture
def pool() -> Iterator[DaemonPool]:
    with DaemonPool() as daemons:
        yield daemons


@pytest.fixture
def qmp(served: Served) -> Iterator[RawQMP]:
    """A negotiated raw client of the module's daemon."""
    with served.client() as client:
        yield client


def plug_device(qmp: RawQMP, tag: str) -> str:
    """Add a null-co node and a virtio-blk device on it; returns the device id."""
    node, dev = f"null-{tag}", f"dev-{tag}"
    qmp.ok("blockdev-add", {"driver": "null-co", "node-name": node, "size": 1 << 20})
    qmp.ok("device_add", {"driver": "virtio-blk", "id": dev, "drive": node})
    return dev


def unplug_events(dev: str) -> list[dict[str, Any]]:
    """The ``data`` of the DEVICE_DELETED events of unplugging virtio-blk device ``dev``:
    its virtio backend first, then the device itself (the order QEMU sends them in once
    a guest has let the device go; under -S QEMU 7.2 never completes the unplug)."""
    path = f"/machine/peripheral/{dev}"
    return [{"path": f"{path}/virtio-backend"}, {"device": dev, "path": path}]


def assert_event_framing(event: dict[str, Any], before: float, after: float) -> None:
    """``{"event": NAME, "data": {...}, "timestamp": {"seconds": S, "microseconds": US}}``
    with a timestamp between ``before`` and ``after`` (wall clock, 1 s of slack)."""
    assert set(event) == {"event", "data", "timestamp"}, event
    assert isinstance(event["event"], str) and isinstance(event["data"], dict)
    stamp = event["timestamp"]
    assert set(stamp) == {"seconds", "microseconds"}, stamp
    assert all(type(v) is int for v in stamp.values()), stamp
    assert 0 <= stamp["microseconds"] < 1_000_000, stamp
    when = stamp["seconds"] + stamp["microseconds"] / 1e6
    assert before - 1 <= when <= after + 1, (before, when, after)


# -- spec section 2, one test per row ------------------------------------------------------


def test_greeting_is_the_first_message(served: Served) -> None:
    """The server speaks first, with QEMU 7.2's greeting shape and the ``oob`` capability."""
    with served.client(negotiate=False) as qmp:
        greeting = qmp.greeting
    assert list(greeting) == ["QMP"], greeting
    body = greeting["QMP"]
    assert set(body) == {"version", "capabilities"}, body
    assert body["capabilities"] == ["oob"]
    version = body["version"]
    assert set(version) == {"qemu", "package"}, version
    assert isinstance(version["package"], str)
    qemu = version["qemu"]
    assert set(qemu) == {"major", "minor", "micro"}, qemu
    assert (qemu["major"], qemu["minor"]) == (7, 2)
    assert type(qemu["micro"]) is int and qemu["micro"] >= 0


@pytest.mark.parametrize("command", ["query-status", "query-version", "no-such-command", "quit"])
def test_commands_before_negotiation_are_refused(served: Served, command: str) -> None:
    """Before ``qmp_capabilities`` every command, known or not (even ``quit``), is refused
    with CommandNotFound and QEMU's text, and the id is still echoed."""
    with served.client(negotiate=False) as qmp:
        reply = qmp.command(command, id="early")
        assert reply["id"] == "early"
        assert error_of(reply) == ("CommandNotFound", NEGOTIATE_FIRST)
        qmp.negotiate()  # the refusal did not negotiate, nor break the session
        assert qmp.ok("query-status")["status"] == "prelaunch"
    assert served.daemon.alive()


def test_qmp_capabilities_returns_empty_object(served: Served) -> None:
    """``{"execute": "qmp_capabilities"}`` answers exactly ``{"return": {}}\\r\\n``."""
    with served.client(negotiate=False) as qmp:
        start = len(qmp.received)
        qmp.send(b'{"execute": "qmp_capabilities"}')
        assert qmp.recv() == {"return": {}}
        assert bytes(qmp.received[start:]) == b'{"return": {}}\r\n'


def test_qmp_capabilities_enable_oob(served: Served) -> None:
    """Enabling the offered ``oob`` capability is accepted (what ``qemu.qmp`` sends)."""
    with served.client(negotiate=False) as qmp:
        assert qmp.command("qmp_capabilities", {"enable": ["oob"]}) == {"return": {}}


@pytest.mark.parametrize(
    ("arguments", "desc"),
    [
        ({"enable": ["bogus"]}, "Parameter 'null' does not accept value 'bogus'"),
        ({"enable": "oob"}, "Invalid parameter type for 'enable', expected: array"),
        ({"bogus": 1}, "Parameter 'bogus' is unexpected"),
    ],
    ids=["unknown-capability", "not-a-list", "unexpected"],
)
def test_qmp_capabilities_argument_errors(
    served: Served, arguments: dict[str, Any], desc: str
) -> None:
    """Bad ``qmp_capabilities`` arguments get QEMU 7.2's texts (its odd ``'null'``
    included) and leave the client unnegotiated, free to try again."""
    with served.client(negotiate=False) as qmp:
        assert error_of(qmp.command("qmp_capabilities", arguments)) == ("GenericError", desc)
        assert error_of(qmp.command("query-status"))[1] == NEGOTIATE_FIRST
        qmp.negotiate()


def test_exec_oob(served: Served) -> None:
    """With ``oob`` enabled, ``exec-oob`` is understood, and refused as QEMU 7.2 refuses it
    for commands that cannot run out of band, or do not exist."""
    with served.client(negotiate=False) as qmp:
        assert qmp.command("qmp_capabilities", {"enable": ["oob"]}) == {"return": {}}
        qmp.send(b'{"exec-oob": "query-status", "id": "o1"}')
        assert qmp.recv() == {
            "id": "o1",
            "error": {
                "class": "GenericError",
                "desc": "The command query-status does not support OOB",
            },
        }
        qmp.send(b'{"exec-oob": "x-oob-test"}')
        assert error_of(qmp.recv()) == (
            "CommandNotFound",
            "The command x-oob-test has not been found",
        )
        assert qmp.ok("query-status")["status"] == "prelaunch"


def test_second_qmp_capabilities_is_refused(qmp: RawQMP) -> None:
    """A second negotiation is refused with CommandNotFound and QEMU's text, twice over,
    and the session keeps working."""
    for _ in range(2):
        reply = qmp.command("qmp_capabilities")
        assert error_of(reply) == ("CommandNotFound", ALREADY_NEGOTIATED)
    assert qmp.ok("query-status")["running"] is False


@pytest.mark.parametrize(
    "request_id",
    ["abc", 7, 1.5, -3, None, {"x": [1, 2]}, [1, "a"], "", {"nested": {"deep": [True, None]}}],
    ids=["string", "int", "float", "negative", "null", "object", "list", "empty", "nested"],
)
def test_id_is_echoed(qmp: RawQMP, request_id: Any) -> None:
    """Any JSON ``id`` comes back unchanged, on success and on error replies (QEMU 7.2
    echoes strings, numbers, objects, lists and null alike)."""
    reply = qmp.command("query-status", id=request_id)
    assert "return" in reply and "id" in reply, reply
    assert reply["id"] == request_id and type(reply["id"]) is type(request_id)
    reply = qmp.command("no-such-command", id=request_id)
    assert reply["id"] == request_id and type(reply["id"]) is type(request_id)
    assert error_of(reply)[0] == "CommandNotFound"


def test_no_id_no_id_in_reply(qmp: RawQMP) -> None:
    """Without ``id`` in the request, neither success nor error replies carry one."""
    assert "id" not in qmp.command("query-status")
    assert "id" not in qmp.command("no-such-command")


def test_arguments_may_be_absent(qmp: RawQMP) -> None:
    """``arguments`` may be left out or given as ``{}``: the same reply either way."""
    absent = qmp.command("query-status")
    empty = qmp.command("query-status", {})
    assert (
        absent
        == empty
        == {"return": {"status": "prelaunch", "singlestep": False, "running": False}}
    )


def test_success_reply(qmp: RawQMP) -> None:
    """A command without data answers ``{"return": {}}``; one with data, ``{"return": V}``,
    with nothing else in the reply."""
    assert qmp.command("block-dirty-bitmap-add", {"node": "drive0", "name": "ok1"}) == {
        "return": {}
    }
    version = qmp.command("query-version")
    assert set(version) == {"return"}
    assert version["return"]["qemu"]["major"] == 7
    assert qmp.command("block-dirty-bitmap-remove", {"node": "drive0", "name": "ok1"}) == {
        "return": {}
    }


def test_failure_reply_shape(qmp: RawQMP) -> None:
    """A failure is ``{"error": {"class": CLASS, "desc": TEXT}}`` and nothing more."""
    reply = qmp.command("block-dirty-bitmap-add", {"node": "nosuch", "name": "x"})
    assert reply == {
        "error": {
            "class": "GenericError",
            "desc": "Cannot find device='nosuch' nor node-name='nosuch'",
        }
    }


@pytest.mark.parametrize("name", ["no-such-command", "drive-backup-x", "query_status", "QUIT"])
def test_unknown_command(qmp: RawQMP, name: str) -> None:
    """An unknown name (also a wrong spelling of a known one) is CommandNotFound,
    ``The command X has not been found``."""
    reply = qmp.command(name)
    assert error_of(reply) == ("CommandNotFound", f"The command {name} has not been found")


ARGUMENT_ERRORS = [
    (
        "block-dirty-bitmap-add",
        {"node": "drive0", "name": "zz", "bogus": 1},
        "Parameter 'bogus' is unexpected",
    ),
    ("block-dirty-bitmap-add", {"node": "drive0"}, "Parameter 'name' is missing"),
    ("block-dirty-bitmap-add", {"name": "x"}, "Parameter 'node' is missing"),
    (
        "block-dirty-bitmap-add",
        {"node": "drive0", "name": "g", "granularity": "x"},
        "Parameter 'granularity' expects uint64",
    ),
    (
        "block-dirty-bitmap-add",
        {"node": "drive0", "name": "g", "granularity": 2**32},
        "Parameter 'granularity' expects uint32_t",
    ),
    (
        "blockdev-add",
        {"driver": "bogus", "node-name": "n1"},
        "Parameter 'driver' does not accept value 'bogus'",
    ),
    (
        "blockdev-add",
        {"driver": "null-co", "node-name": "n1", "discard": "bogus"},
        "Parameter 'discard' does not accept value 'bogus'",
    ),
]


@pytest.mark.parametrize(
    ("command", "arguments", "desc"),
    ARGUMENT_ERRORS,
    ids=["unexpected", "missing-name", "missing-node", "uint64", "uint32", "driver-enum",
         "discard-enum"],
)  # fmt: skip
def test_argument_errors(qmp: RawQMP, command: str, arguments: dict[str, Any], desc: str) -> None:
    """Argument validation errors are GenericError with QEMU 7.2's exact texts (the enum
    case uses blockdev-add's ``driver`` and ``discard``, measured on 7.2, in place of
    drive-backup's ``sync``)."""
    assert error_of(qmp.command(command, arguments)) == ("GenericError", desc)


def test_event_framing(qmp: RawQMP) -> None:
    """Events are ``{"event", "data", "timestamp": {"seconds", "microseconds"}}``, stamped
    with the wall-clock time: device_del's two DEVICE_DELETED events, in QEMU's order."""
    dev = plug_device(qmp, "ev")
    before = time.time()
    assert qmp.command("device_del", {"id": dev}) == {"return": {}}
    while len(qmp.events) < 2:
        message = qmp.recv()
        assert is_event(message), message
        qmp.events.append(message)
    after = time.time()
    for event in qmp.events:
        assert_event_framing(event, before, after)
    assert [e["event"] for e in qmp.events] == ["DEVICE_DELETED", "DEVICE_DELETED"]
    assert [e["data"] for e in qmp.events] == unplug_events(dev)


# -- framing --------------------------------------------------------------------------------


def test_several_messages_in_one_write(qmp: RawQMP) -> None:
    """Messages written back to back in one send() are all answered, in order, whatever
    the whitespace (or lack of it) between them."""
    qmp.send(
        b'{"execute": "query-status", "id": 1}{"execute": "no-such", "id": 2}'
        b' \n\t{"execute": "query-version", "id": 3}\r\n'
        b'{"execute":"block-dirty-bitmap-add","arguments":{"node":"drive0","name":"m"},"id":4}'
        b'{"execute":"block-dirty-bitmap-remove","arguments":{"node":"drive0","name":"m"},"id":5}'
    )
    replies = [qmp.recv_reply() for _ in range(5)]
    assert [r["id"] for r in replies] == [1, 2, 3, 4, 5]
    assert ["return" in r for r in replies] == [True, False, True, True, True]


def test_one_message_byte_by_byte(qmp: RawQMP) -> None:
    """A message sent one byte per write is answered once, when its last byte arrives."""
    message = b'{"execute": "query-status", "arguments": {}, "id": "slow"}'
    for i in range(len(message) - 1):
        qmp.send(message[i : i + 1])
    qmp.expect_nothing(0.2)
    qmp.send(message[-1:])
    assert qmp.recv()["id"] == "slow"


def test_message_split_across_arbitrary_writes(qmp: RawQMP) -> None:
    """Messages cut at every kind of place (inside strings, numbers, keywords, between
    messages) are reassembled."""
    data = (
        b'{"execute": "query-status", "id": 12345}'
        b'{"execute": "query-status", "id": {"k": [true, false, null, -1.25e2]}}'
    )
    for cut in (1, 7, 13, 29, 36, len(data) - 5):
        qmp.send(data[:cut])
        qmp.send(data[cut:])
        assert qmp.recv()["id"] == 12345
        assert qmp.recv()["id"] == {"k": [True, False, None, -125.0]}


def test_single_quoted_strings(qmp: RawQMP) -> None:
    """QEMU's JSON parser takes single-quoted strings (with ``\\'`` escapes); so does
    bitbackd's."""
    qmp.send(b"{'execute': 'query-status', 'id': 'it\\'s'}")
    assert qmp.recv()["id"] == "it's"


def test_replies_end_with_crlf(served: Served) -> None:
    """Every message the server writes (greeting, replies, errors, events) is one line
    ended by ``\\r\\n`` (QEMU's framing), with no bare ``\\n`` anywhere."""
    with served.client(negotiate=False) as qmp:
        qmp.command("query-status")
        qmp.negotiate()
        qmp.command("query-status", id="x")
        qmp.command("no-such-command")
        qmp.exchange(b"not json")
        dev = plug_device(qmp, "crlf")
        qmp.command("device_del", {"id": dev})
        data = bytes(qmp.received)
    assert data.endswith(b"\r\n")
    lines = data.split(b"\r\n")[:-1]
    assert len(lines) >= 12
    for line in lines:
        assert b"\n" not in line and b"\r" not in line, line
        assert isinstance(json.loads(line), dict)


EXACT_REPLIES = [
    (
        b'{"execute": "no-such", "id": 5}',
        b'{"id": 5, "error": {"class": "CommandNotFound", '
        b'"desc": "The command no-such has not been found"}}\r\n',
    ),
    (
        b'{"execute": "query-status"}',
        b'{"return": {"status": "prelaunch", "singlestep": false, "running": false}}\r\n',
    ),
    (
        b'{"execute": "query-status", "id": null}',
        b'{"return": {"status": "prelaunch", "singlestep": false, "running": false}, '
        b'"id": null}\r\n',
    ),
    (
        b'{"execute": "qmp_capabilities"}',
        b'{"error": {"class": "CommandNotFound", '
        b'"desc": "Capabilities negotiation is already complete, command ignored"}}\r\n',
    ),
    (
        b'{"execute": "\xc3\xa9t\xc3\xa9", "id": "\xe2\x82\xac"}',
        b'{"id": "\\u20AC", "error": {"class": "CommandNotFound", '
        b'"desc": "The command \\u00E9t\\u00E9 has not been found"}}\r\n',
    ),
    (
        b"[]",
        b'{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}\r\n',
    ),
]


@pytest.mark.parametrize(
    ("request_bytes", "expected"),
    EXACT_REPLIES,
    ids=["error-with-id", "query-status", "null-id", "renegotiate", "non-ascii", "not-an-object"],
)
def test_exact_bytes_of_replies(qmp: RawQMP, request_bytes: bytes, expected: bytes) -> None:
    """Replies whose bytes QEMU 7.2 was measured to send (SUMMARY.md and probes on this
    machine) are byte-identical: compact JSON with ``", "`` and ``": "``, members in QEMU's
    QDict order (``"id"`` first in an error, last in a success), non-ASCII characters as
    ``\\uXXXX`` escapes with upper-case hex."""
    start = len(qmp.received)
    qmp.send(request_bytes)
    qmp.recv()
    assert bytes(qmp.received[start:]) == expected


# -- the qemu.qmp library ----------------------------------------------------------------


def test_qemu_qmp_async_client(served: Served) -> None:
    """``qemu.qmp.QMPClient`` connects (greeting, oob negotiation), executes commands,
    raises ExecuteError with the right class for failures, and its event listener gets
    the events of its own commands."""

    async def scenario() -> None:
        client = QMPClient("bitback-test")
        await client.connect(served.sock)
        try:
            assert client.greeting is not None
            version = client.greeting.QMP.version
            assert isinstance(version, dict) and version["qemu"]["major"] == 7
            status = await client.execute("query-status")
            assert status == {"status": "prelaunch", "singlestep": False, "running": False}
            with pytest.raises(ExecuteError) as unknown:
                await client.execute("no-such-command")
            assert unknown.value.error_class == "CommandNotFound"
            assert str(unknown.value) == "The command no-such-command has not been found"
            with pytest.raises(ExecuteError) as bad:
                await client.execute(
                    "block-dirty-bitmap-add", {"node": "drive0", "name": "a", "granularity": 64000}
                )
            assert bad.value.error_class == "GenericError"
            assert str(bad.value) == "Granularity must be power of 2 and at least 512"
            await client.execute(
                "blockdev-add", {"driver": "null-co", "node-name": "null-async", "size": 4096}
            )
            await client.execute(
                "device_add", {"driver": "virtio-blk", "id": "dev-async", "drive": "null-async"}
            )
            listener = EventListener(("DEVICE_DELETED",))
            with client.listen(listener):
                await client.execute("device_del", {"id": "dev-async"})
                got = [await asyncio.wait_for(listener.get(), 10) for _ in range(2)]
            assert [dict(e)["data"] for e in got] == unplug_events("dev-async")
        finally:
            await client.disconnect()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_qemu_qmp_legacy_client(served: Served) -> None:
    """The sync ``legacy.QEMUMonitorProtocol`` (what QEMU's machine.py uses) connects to a
    listening bitbackd, runs commands, raises ExecuteError and collects events."""
    monitor = QEMUMonitorProtocol(served.sock)
    try:
        greeting = monitor.connect(negotiate=True)
        assert greeting is not None and greeting["QMP"]["capabilities"] == ["oob"]
        monitor.settimeout(10)
        assert monitor.cmd("query-status")["status"] == "prelaunch"  # type: ignore[index]
        raw = monitor.cmd_raw("block-dirty-bitmap-add", {"node": "drive0", "name": 5})
        assert raw == {
            "error": {
                "class": "GenericError",
                "desc": "Invalid parameter type for 'name', expected: string",
            }
        }
        with pytest.raises(ExecuteError) as exc:
            monitor.cmd("block-dirty-bitmap-add", node="nosuch", name="x")
        assert exc.value.error_class == "GenericError"
        monitor.cmd("blockdev-add", **{"driver": "null-co", "node-name": "null-leg"})
        monitor.cmd("device_add", driver="virtio-blk", id="dev-leg", drive="null-leg")
        monitor.cmd("device_del", id="dev-leg")
        events: list[dict[str, Any]] = []
        deadline = time.monotonic() + 10
        while len(events) < 2 and time.monotonic() < deadline:
            events += monitor.get_events(wait=1.0)
        assert [e["data"] for e in events] == unplug_events("dev-leg")
    finally:
        monitor.close()


def test_qmp_shell(served: Served, tmp_path: Path) -> None:
    """``python -m qemu.qmp.qmp_shell SOCK`` works with commands on a pipe: its REPL reads
    stdin with input(), which needs no terminal, and prints each reply as JSON. HOME points
    at tmp_path because the shell saves its history file there."""
    env = {"HOME": str(tmp_path)}
    script = "query-status\nblock-dirty-bitmap-add node=drive0 name=shell granularity=256\n"
    res = run(
        [sys.executable, "-m", "qemu.qmp.qmp_shell", "-v", served.sock],
        input=script,
        env=env,
        timeout=30,
        check=True,
    )
    assert "Connected to QEMU 7.2." in res.stdout
    lines = res.stdout.splitlines()
    sent = [json.loads(line[7:]) for line in lines if line.startswith("(QEMU) {")]
    replies = [json.loads(line) for line in lines if line.startswith("{")]
    assert [s["execute"] for s in sent] == ["query-status", "block-dirty-bitmap-add"]
    assert replies[0] == {"return": {"status": "prelaunch", "singlestep": False, "running": False}}
    assert error_of(replies[1]) == (
        "GenericError",
        "Granularity must be power of 2 and at least 512",
    )


# -- several clients ----------------------------------------------------------------------


def test_two_clients_on_one_socket(served: Served) -> None:
    """Two clients connected at once to one listening socket both get a greeting, negotiate
    independently, and are both answered, interleaved (bitbackd serves every client of a
    socket; QEMU would hold the second one until the first leaves)."""
    with served.client(negotiate=False) as one, served.client(negotiate=False) as two:
        assert one.greeting == two.greeting
        one.negotiate()
        assert error_of(two.command("query-status"))[1] == NEGOTIATE_FIRST
        two.negotiate()
        assert error_of(one.command("qmp_capabilities"))[1] == ALREADY_NEGOTIATED
        for n in range(3):
            one.send_json({"execute": "query-status", "id": f"one-{n}"})
            two.send_json({"execute": "query-status", "id": f"two-{n}"})
        assert [one.recv_reply()["id"] for _ in range(3)] == ["one-0", "one-1", "one-2"]
        assert [two.recv_reply()["id"] for _ in range(3)] == ["two-0", "two-1", "two-2"]


def test_events_go_to_every_negotiated_client_only(served: Served) -> None:
    """An event reaches every negotiated client, the one whose command caused it and the
    others, but not a client that has not negotiated (as QEMU 7.2 measured: m3 got none)."""
    with (
        served.client() as actor,
        served.client() as watcher,
        served.client(negotiate=False) as silent,
    ):
        dev = plug_device(actor, "bc")
        assert actor.command("device_del", {"id": dev}) == {"return": {}}
        for client in (actor, watcher):
            while len(client.events) < 2:
                client.events.append(client.recv())
            assert [e["event"] for e in client.events] == ["DEVICE_DELETED"] * 2
            assert [e["data"] for e in client.events] == unplug_events(dev)
        silent.expect_nothing(0.3)
        # Negotiating later does not replay old events.
        silent.negotiate()
        silent.expect_nothing(0.2)


def test_two_monitors(pool: DaemonPool) -> None:
    """``--qmp A --qmp B``: two monitors, each serving its own clients; an event caused on
    one reaches negotiated clients of both."""
    a, b = pool.path("a.sock"), pool.path("b.sock")
    daemon = pool.start(["--qmp", a, "--qmp", b], wait_for=[a, b])
    with RawQMP.connect(a) as qa, RawQMP.connect(b) as qb:
        qa.negotiate()
        qb.negotiate()
        assert qa.ok("query-status") == qb.ok("query-status")
        dev = plug_device(qb, "mm")
        assert qb.command("device_del", {"id": dev}) == {"return": {}}
        for client in (qa, qb):
            while len(client.events) < 2:
                client.events.append(client.recv())
            assert [e["data"] for e in client.events] == unplug_events(dev)
        assert qa.command("quit") == {"return": {}}
        assert qb.wait_eof()[0]["event"] == "SHUTDOWN"
    assert daemon.wait() == 0


def test_monitor_via_chardev_and_qmp_unix(pool: DaemonPool) -> None:
    """The other spellings of a listening monitor: ``--chardev socket,...,server=on,wait=off
    --monitor chardev=ID`` and ``-qmp unix:PATH,server=on,wait=off``, in one daemon."""
    a, b = pool.path("c.sock"), pool.path("u.sock")
    daemon = pool.start(
        [
            "--chardev", f"socket,id=m,path={a},server=on,wait=off", "--monitor", "chardev=m",
            "-qmp", f"unix:{b},server=on,wait=off",
        ],
        wait_for=[a, b],
    )  # fmt: skip
    for sock in (a, b):
        with RawQMP.connect(sock) as client:
            client.negotiate()
            assert client.ok("query-status")["status"] == "prelaunch"
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


def test_client_gone_mid_command_stream(served: Served) -> None:
    """A client that sends requests and disconnects without reading the replies does not
    disturb the daemon or the other clients."""
    with served.client() as other:
        rude = served.client()
        rude.send(b'{"execute": "query-status"}' * 200)
        rude.close()
        for n in range(5):
            assert other.command("query-status", id=n)["id"] == n
    assert served.daemon.alive()
