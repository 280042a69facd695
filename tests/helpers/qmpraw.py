"""A raw-socket QMP client for tests, and a launcher for bitbackd serving listening sockets.

:class:`RawQMP` speaks QMP the hard way: it sends exactly the bytes a test gives it and
decodes what comes back with an incremental JSON decoder, never relying on line structure
(spec section 2), while keeping every byte received (:attr:`RawQMP.received`) so that a test
can check the framing itself::

    with RawQMP.connect(sock) as qmp:
        assert "QMP" in qmp.greeting
        qmp.negotiate()
        qmp.send(b'{"execute": "query-status", "id": 1}')
        reply = qmp.recv()                          # the next message, events included
        qmp.command("query-status")                 # next non-event message; events are kept
        replies = qmp.exchange(b"not json")         # everything the junk caused, in order

:class:`DaemonPool` starts ``bitbackd`` processes with listening monitors (``--qmp PATH``),
waits for their sockets with a deadline, and kills whatever is still running when the pool
closes, so a failing test never leaves a daemon behind. Socket paths live in a short private
directory: ``sun_path`` holds only 107 bytes, less than pytest's ``tmp_path`` may need.
"""

from __future__ import annotations

import codecs
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from helpers.tools import bitback_argv

__all__ = [
    "DEFAULT_TIMEOUT",
    "DaemonPool",
    "QMPTimeout",
    "RawQMP",
    "Running",
    "error_of",
    "is_event",
    "wait_for_socket",
]

DEFAULT_TIMEOUT = 10.0
SEND_TIMEOUT = 60.0

Message = dict[str, Any]


class QMPTimeout(AssertionError):
    """No complete message arrived in time (an assertion failure, with what did arrive)."""


def is_event(message: Message) -> bool:
    """Whether ``message`` is an asynchronous event rather than a reply."""
    return "event" in message


class RawQMP:
    """One client connection to a QMP server, driven with raw bytes.

    Messages are decoded in arrival order; :meth:`recv` returns them one at a time, events
    included. :meth:`command` and :meth:`exchange` set events aside in :attr:`events`.
    """

    _ids = itertools.count(1)

    def __init__(self, sock: socket.socket, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.sock = sock
        self.timeout = timeout
        self.received = bytearray()
        self.events: list[Message] = []
        self.greeting: Message = {}
        self.eof = False
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._json = json.JSONDecoder()
        self._text = ""

    # -- connection ---------------------------------------------------------------------
    @classmethod
    def connect(
        cls,
        path: str | os.PathLike[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        greeting: bool = True,
        retry: float = 0.0,
    ) -> RawQMP:
        """Connect to the UNIX socket ``path``; read the greeting unless ``greeting=False``.

        ``retry`` seconds: keep trying while the socket is missing or refuses (a server
        that has bound its socket but not yet called listen() refuses connections)."""
        deadline = time.monotonic() + retry
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(os.fspath(path))
                break
            except (ConnectionRefusedError, FileNotFoundError):
                sock.close()
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)
            except BaseException:
                sock.close()
                raise
        client = cls(sock, timeout=timeout)
        if greeting:
            client.greeting = client.recv()
        return client

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawQMP:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- sending ------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        """Send ``data`` exactly as given (the whole of it, however long)."""
        self.sock.settimeout(SEND_TIMEOUT)  # a big message may take the server a while
        try:
            self.sock.sendall(data)
        finally:
            self.sock.settimeout(self.timeout)

    def send_json(self, obj: object) -> None:
        self.send(json.dumps(obj).encode())

    @classmethod
    def new_id(cls, prefix: str = "t") -> str:
        """An ``id`` no other request of this test process uses."""
        return f"{prefix}-{next(cls._ids)}"

    # -- receiving ------------------------------------------------------------------------
    def _pop_message(self) -> Message | None:
        text = self._text.lstrip(" \t\r\n")
        if not text:
            self._text = ""
            return None
        try:
            value, end = self._json.raw_decode(text)
        except json.JSONDecodeError:
            self._text = text
            return None  # incomplete so far (garbage shows up as a timeout, with the text)
        self._text = text[end:]
        if not isinstance(value, dict):
            raise AssertionError(f"the server sent a non-object message: {value!r}")
        return value

    def _fill(self, deadline: float) -> bool:
        """Read more bytes; False on EOF. Raises :class:`QMPTimeout` past ``deadline``."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise QMPTimeout(self._timeout_text())
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(1 << 16)
        except TimeoutError:
            raise QMPTimeout(self._timeout_text()) from None
        except ConnectionResetError:
            data = b""
        finally:
            self.sock.settimeout(self.timeout)
        if not data:
            self.eof = True
            return False
        self.received += data
        self._text += self._decoder.decode(data)
        return True

    def _timeout_text(self) -> str:
        pending = self._text[:500]
        return f"no complete QMP message within the timeout; pending text: {pending!r}"

    def recv(self, timeout: float | None = None) -> Message:
        """The next message (reply or event). Fails on EOF or after ``timeout`` seconds."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            message = self._pop_message()
            if message is not None:
                return message
            if self.eof or not self._fill(deadline):
                raise AssertionError(
                    f"connection closed by the server; pending text: {self._text[:500]!r}"
                )

    def recv_reply(self, timeout: float | None = None) -> Message:
        """The next message that is not an event; events met on the way go to ``events``."""
        while True:
            message = self.recv(timeout)
            if not is_event(message):
                return message
            self.events.append(message)

    def expect_nothing(self, seconds: float) -> None:
        """Assert that no message arrives within ``seconds``."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            message = self._pop_message()
            if message is not None:
                raise AssertionError(f"unexpected message: {message}")
            try:
                if not self._fill(deadline):
                    return
            except QMPTimeout:
                break
        message = self._pop_message()
        if message is not None:
            raise AssertionError(f"unexpected message: {message}")

    def wait_eof(self, timeout: float | None = None) -> list[Message]:
        """Read until the server closes the connection; returns the messages read meanwhile."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        messages: list[Message] = []
        while True:
            message = self._pop_message()
            if message is not None:
                messages.append(message)
                continue
            if self.eof or not self._fill(deadline):
                return messages

    # -- requests -----------------------------------------------------------------------
    def command(self, name: str, arguments: dict[str, Any] | None = None, **extra: Any) -> Message:
        """Send ``{"execute": name, "arguments": arguments, **extra}``; return its reply."""
        request: dict[str, Any] = {"execute": name}
        if arguments is not None:
            request["arguments"] = arguments
        request.update(extra)
        self.send_json(request)
        return self.recv_reply()

    def ok(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run a command that must succeed; return its ``return`` value."""
        reply = self.command(name, arguments)
        assert "return" in reply, f"{name} {arguments}: {reply}"
        return reply["return"]

    def negotiate(self) -> None:
        reply = self.command("qmp_capabilities")
        assert reply == {"return": {}}, reply

    def exchange(self, data: bytes, timeout: float | None = None) -> list[Message]:
        """Send ``data``, then a marker request, and return every non-event message that
        came before the marker's reply (events go to ``events``).

        Whatever ``data`` makes the server say, however many replies, is collected; the
        marker (``query-status`` with a fresh ``id``) must still be answered, with success on
        a negotiated connection. Input that leaves a string open would swallow the marker:
        do not send such input through here.
        """
        marker = self.new_id("sync")
        self.send(data)
        self.send_json({"execute": "query-status", "id": marker})
        replies: list[Message] = []
        while True:
            reply = self.recv_reply(timeout)
            if reply.get("id") == marker:
                return replies
            replies.append(reply)


def error_of(reply: Message) -> tuple[str, str]:
    """``(class, desc)`` of an error reply; fails when ``reply`` is not exactly one."""
    assert set(reply) <= {"error", "id"}, reply
    error = reply["error"]
    assert set(error) == {"class", "desc"}, reply
    return error["class"], error["desc"]


def wait_for_socket(
    path: str | os.PathLike[str],
    proc: subprocess.Popen[bytes] | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    describe: str = "",
    probe: bool = True,
) -> None:
    """Wait until a UNIX socket at ``path`` accepts connections (probing with one that is
    closed at once), or with ``probe=False`` merely exists (a server waiting for its first
    client must not get a probe as that client). Fails if ``proc`` exits first or the
    deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(
                f"the process exited with {proc.returncode} before {path} was ready {describe}"
            )
        if os.path.exists(path) and not probe:
            return
        if os.path.exists(path):
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                conn.connect(os.fspath(path))
                return
            except OSError:
                pass
            finally:
                conn.close()
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} not ready after {timeout:g} s {describe}")
        time.sleep(0.02)


class Running:
    """One bitbackd process started by a :class:`DaemonPool`."""

    def __init__(self, proc: subprocess.Popen[bytes], argv: list[str], stderr: Path) -> None:
        self.proc = proc
        self.argv = argv
        self.stderr_path = stderr

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def stderr(self) -> str:
        """What the daemon wrote to stderr so far."""
        return self.stderr_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        """The exit status; fails (after killing it) if the process outlives ``timeout``."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"bitbackd did not exit within {timeout:g} s; stderr:\n{self.stderr}"
            ) from None

    def signal(self, signum: signal.Signals) -> None:
        self.proc.send_signal(signum)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)

    def memory_kib(self, field: str = "VmRSS") -> int:
        """A memory figure of ``/proc/PID/status`` in KiB: ``VmRSS`` (resident now) or
        ``VmHWM`` (the peak resident size so far)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
        raise AssertionError(f"no {field} for process {self.pid}")


class DaemonPool:
    """Starts bitbackd processes and guarantees they are gone when the pool closes."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="bbq-"))
        self.running: list[Running] = []
        self._n = itertools.count()

    def path(self, name: str) -> str:
        """A path in the pool's short private directory (for sockets and pid files)."""
        return str(self.dir / name)

    def start(
        self, args: Sequence[str], *, wait_for: Sequence[str] = (), probe: bool = True
    ) -> Running:
        """Run ``bitbackd ARGS``; wait until every socket in ``wait_for`` accepts clients
        (or, with ``probe=False``, exists: see :func:`wait_for_socket`)."""
        n = next(self._n)
        stderr = self.dir / f"stderr-{n}.txt"
        argv = [*bitback_argv("bitbackd"), *args]
        with open(stderr, "wb") as err:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err
            )
        daemon = Running(proc, argv, stderr)
        self.running.append(daemon)
        for path in wait_for:
            try:
                wait_for_socket(path, proc, describe=f"(stderr: {daemon.stderr!r})", probe=probe)
            except AssertionError:
                daemon.kill()
                raise
        return daemon

    def serve(self, *extra: str, name: str = "qmp.sock") -> tuple[Running, str]:
        """bitbackd with one listening monitor (``--qmp PATH``) and ``extra`` arguments;
        returns the process and the socket path, once the socket accepts clients."""
        sock = self.path(name)
        return self.start(["--qmp", sock, *extra], wait_for=[sock]), sock

    def close(self) -> None:
        for daemon in self.running:
            daemon.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> DaemonPool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
