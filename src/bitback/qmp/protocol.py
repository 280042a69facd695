"""The QMP protocol core, without I/O: bytes in, commands and reply bytes out.

One :class:`ServerConnection` per client, used the h11 way::

    conn = ServerConnection()
    send(conn.greeting((7, 2, 22), "bitback"))
    for item in conn.receive(data):          # as many times as data arrives
        if isinstance(item, bytes):
            send(item)                        # a reply the core produced itself
        else:
            try:
                send(conn.reply(item, run(item)))
            except Exception as exc:
                send(conn.error_reply(item, to_qmp_error(exc)))

The core behaves as QEMU 7.2's monitor (``monitor/qmp.c``, ``qapi/qmp-dispatch.c``):

* framing: :class:`~bitback.qmp.jsonstream.JSONStreamer` splits the byte stream into JSON
  values exactly where QEMU's JSON streamer does, with its errors and its recovery;
* a value that is not an object, or an object with a wrong shape, gets QEMU's error reply;
  ``id`` is echoed whenever the request was an object that had one (never for JSON errors);
* until ``qmp_capabilities`` succeeds every command is refused with ``CommandNotFound`` /
  ``Expecting capabilities negotiation with 'qmp_capabilities'``; ``qmp_capabilities``
  (with its ``enable`` argument) is handled here, as is a second, refused, negotiation;
* ``exec-oob`` is accepted only once the client enabled the ``oob`` capability.

Replies are encoded as QEMU encodes them: compact JSON with ``", "`` and ``": "``, objects in
QDict hash order (``{"id": 1, "error": ...}``, ``{"return": ..., "id": 1}``, ``{"timestamp":
..., "event": ..., "data": ...}``), non-ASCII escaped, each message ended by ``\\r\\n``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from bitback.qjson import qdict_order, quote
from bitback.qmp.errors import (
    ErrorClass,
    QMPError,
    command_not_found,
    generic,
    oob_not_supported,
)
from bitback.qmp.jsonstream import JSONStreamer, ParseError
from bitback.qmp.schema import Enum, ListOf, Member, Struct, validate_arguments

__all__ = [
    "Command",
    "ServerConnection",
    "encode_event",
    "encode_message",
]

#: ``qmp_capabilities``'s arguments (``qapi/control.json``).
QMP_CAPABILITIES_ARGS = Struct(
    "q_obj_qmp_capabilities-arg",
    [Member("enable", ListOf(Enum("QMPCapability", ["oob"])), optional=True)],
)

_NEGOTIATE_FIRST = "Expecting capabilities negotiation with 'qmp_capabilities'"
_ALREADY_NEGOTIATED = "Capabilities negotiation is already complete, command ignored"
_NOT_OBJECT = generic("QMP input must be a JSON object")


@dataclass(frozen=True, slots=True)
class Command:
    """A well-formed request to dispatch: ``{"execute": name, "arguments": {...}, "id": id}``.

    ``arguments`` is the raw JSON object (``{}`` when absent); validating it against the
    command's schema is the dispatcher's job, because QEMU looks the command up first.
    ``has_id`` tells an absent ``id`` from ``"id": null``. ``oob`` marks ``exec-oob``.
    """

    name: str
    arguments: dict[str, Any]
    id: Any = None
    has_id: bool = False
    oob: bool = False


# -- encoding ----------------------------------------------------------------------------------


def _encode(obj: object) -> str:
    """Compact JSON text of ``obj``; iterative, since a client's ``id`` may nest 1023 deep."""
    out: list[str] = []
    todo: list[tuple[bool, Any]] = [(False, obj)]  # (is literal output, payload), LIFO
    while todo:
        literal, item = todo.pop()
        if literal:
            out.append(item)
        elif item is True or item is False:
            out.append("true" if item else "false")
        elif item is None:
            out.append("null")
        elif isinstance(item, int):
            out.append(str(item))
        elif isinstance(item, float):
            out.append("%.17g" % item)  # noqa: UP031 - C's %.17g, as json-writer.c prints it
        elif isinstance(item, str):
            out.append(quote(item))
        elif isinstance(item, dict):
            out.append("{")
            todo.append((True, "}"))
            for n, key in reversed(list(enumerate(qdict_order(item)))):
                todo.append((False, item[key]))
                todo.append((True, (", " if n else "") + quote(key) + ": "))
        elif isinstance(item, (list, tuple)):
            out.append("[")
            todo.append((True, "]"))
            for n, elem in reversed(list(enumerate(item))):
                todo.append((False, elem))
                if n:
                    todo.append((True, ", "))
        else:
            raise TypeError(f"cannot encode {type(item).__name__} as QMP JSON")
    return "".join(out)


def encode_message(obj: dict[str, Any]) -> bytes:
    """One QMP message as QEMU writes it: compact JSON in QDict order, then ``\\r\\n``.

    Dicts are given in the order QEMU inserts their members (QAPI order); the output order
    is the QDict's hash order, as :func:`bitback.qjson.qdict_order` computes it.

    >>> encode_message({"return": {}, "id": 1})
    b'{"return": {}, "id": 1}\\r\\n'
    """
    return (_encode(obj) + "\r\n").encode("ascii")


def encode_event(name: str, data: dict[str, Any] | None, seconds: int, microseconds: int) -> bytes:
    """An event message; ``data`` ``None`` leaves the member out (``STOP``, ``RESUME``).

    >>> encode_event("STOP", None, 1, 2)
    b'{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}\\r\\n'
    """
    msg: dict[str, Any] = {
        "event": name,
        "timestamp": {"seconds": seconds, "microseconds": microseconds},
    }
    if data is not None:
        msg["data"] = data
    return encode_message(msg)


def _response(body: dict[str, Any], has_id: bool, id_: Any) -> bytes:
    if has_id:
        body["id"] = id_
    return encode_message(body)


# -- the connection ----------------------------------------------------------------------------


class ServerConnection:
    """The server side of one QMP connection (sans I/O).

    ``offer_oob`` puts ``"oob"`` in the greeting's capabilities, as QEMU does for socket
    monitors. ``command_exists`` and ``oob_commands`` let the core answer ``exec-oob``
    itself (``The command X has not been found`` / ``does not support OOB``) and yield only
    commands that may run out of band; without ``command_exists`` every ``exec-oob`` request
    is yielded with ``oob=True`` and the dispatcher must check it
    (:func:`~bitback.qmp.errors.oob_not_supported`).
    """

    def __init__(
        self,
        *,
        offer_oob: bool = True,
        command_exists: Callable[[str], bool] | None = None,
        oob_commands: Collection[str] = (),
    ) -> None:
        self.offer_oob = offer_oob
        self._command_exists = command_exists
        self._oob_commands = frozenset(oob_commands)
        self._streamer = JSONStreamer()
        self.negotiated = False
        self.oob_enabled = False

    @property
    def buffered(self) -> int:
        """Bytes of an unfinished message held in memory (at most ~64 MiB, QEMU's limit)."""
        return self._streamer.buffered

    # -- server -> client ---------------------------------------------------------------
    def greeting(self, version: tuple[int, int, int], package: str) -> bytes:
        """The first message: ``{"QMP": {"version": {...}, "capabilities": ["oob"]}}``."""
        major, minor, micro = version
        return encode_message(
            {
                "QMP": {
                    "version": {
                        "qemu": {"major": major, "minor": minor, "micro": micro},
                        "package": package,
                    },
                    "capabilities": ["oob"] if self.offer_oob else [],
                }
            }
        )

    def reply(self, cmd: Command, value: object) -> bytes:
        """The success reply ``{"return": value}`` to ``cmd``, echoing its ``id``."""
        return _response({"return": value}, cmd.has_id, cmd.id)

    def error_reply(self, cmd: Command | None, err: QMPError) -> bytes:
        """The error reply to ``cmd`` (``None``: to input that was not a request object)."""
        if cmd is None:
            return _response({"error": err.to_dict()}, False, None)
        return _response({"error": err.to_dict()}, cmd.has_id, cmd.id)

    def event(
        self, name: str, data: dict[str, Any] | None, seconds: int, microseconds: int
    ) -> bytes | None:
        """The event message for this client, or ``None``: QEMU sends events only to clients
        that completed capabilities negotiation."""
        if not self.negotiated:
            return None
        return encode_event(name, data, seconds, microseconds)

    # -- client -> server ---------------------------------------------------------------
    def receive(self, data: bytes) -> list[Command | bytes]:
        """Feed bytes from the client; returns, in order, what to do for each complete
        message: a :class:`Command` to dispatch and answer, or reply bytes to send as is."""
        out: list[Command | bytes] = []
        for value in self._streamer.feed(data):
            out.append(self._request(value))
        return out

    def _request(self, value: object) -> Command | bytes:
        """One parsed message: a command to dispatch, or the reply bytes for it."""
        if isinstance(value, ParseError):
            return _response({"error": generic(value.desc).to_dict()}, False, None)
        if not isinstance(value, dict):
            return _response({"error": _NOT_OBJECT.to_dict()}, False, None)
        has_id, id_ = "id" in value, value.get("id")
        try:
            command = self._command(value, has_id, id_)
        except QMPError as exc:
            return _response({"error": exc.to_dict()}, has_id, id_)
        if command is None:  # qmp_capabilities succeeded
            return _response({"return": {}}, has_id, id_)
        return command

    def _command(self, request: dict[str, Any], has_id: bool, id_: Any) -> Command | None:
        """``qmp_dispatch`` up to the command lookup, in QEMU's order of checks; raises
        :class:`QMPError`. ``qmp_capabilities`` is run here (``None`` on success)."""
        self._check_request(request)
        if "execute" in request:
            name, oob = request["execute"], False
        else:
            name, oob = request["exec-oob"], True
        arguments = request.get("arguments", {})
        if not self.negotiated and name != "qmp_capabilities":
            raise QMPError(ErrorClass.COMMAND_NOT_FOUND, _NEGOTIATE_FIRST)
        if name == "qmp_capabilities":
            if oob:
                raise oob_not_supported(name)
            self._capabilities(arguments)
            return None
        if oob and self._command_exists is not None:
            if not self._command_exists(name):
                raise command_not_found(name)
            if name not in self._oob_commands:
                raise oob_not_supported(name)
        return Command(name, arguments, id_, has_id, oob)

    def _check_request(self, request: dict[str, Any]) -> None:
        """``qmp_dispatch_check_obj``: members are checked in QDict order, first fault wins."""
        exec_key: str | None = None
        for key in qdict_order(request):
            value = request[key]
            if key == "execute" or (key == "exec-oob" and self.oob_enabled):
                if not isinstance(value, str):
                    raise generic(f"QMP input member '{key}' must be a string")
                if exec_key is not None:
                    raise generic(f"QMP input member '{key}' clashes with '{exec_key}'")
                exec_key = key
            elif key == "arguments":
                if not isinstance(value, dict):
                    raise generic("QMP input member 'arguments' must be an object")
            elif key != "id":
                raise generic(f"QMP input member '{key}' is unexpected")
        if exec_key is None:
            raise generic("QMP input lacks member 'execute'")

    def _capabilities(self, arguments: dict[str, Any]) -> None:
        """``qmp_qmp_capabilities``: arguments first, then the state, then the offer."""
        args = validate_arguments(QMP_CAPABILITIES_ARGS, arguments)
        if self.negotiated:
            raise QMPError(ErrorClass.COMMAND_NOT_FOUND, _ALREADY_NEGOTIATED)
        enable: list[str] = args.get("enable", [])
        unavailable = [cap for cap in enable if not (cap == "oob" and self.offer_oob)]
        if unavailable:
            raise generic(f"Capability {', '.join(unavailable)} not available")
        self.negotiated = True
        self.oob_enabled = "oob" in enable
