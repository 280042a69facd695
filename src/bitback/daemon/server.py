"""QMP over UNIX sockets: listeners, outgoing connections, and one session per client.

Each session owns its stream the asyncio way: a reader loop feeds bytes to the sans-I/O
:class:`~bitback.qmp.protocol.ServerConnection` and runs the commands it yields; a writer
task drains the session's queue, so replies and events leave in the order they were queued.
Commands of all clients run one at a time (a daemon-wide lock), in arrival order per client,
as QEMU's monitor does. Events go to every client that completed negotiation.

Unlike a QEMU socket chardev, which serves one client at a time, a listening monitor here
accepts any number of concurrent clients (each gets its own greeting and negotiation).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from bitback.qmp.errors import QMPError, to_qmp_error
from bitback.qmp.protocol import Command, ServerConnection, encode_event

__all__ = ["QMPServer", "Session"]

log = logging.getLogger("bitbackd")

Executor = Callable[[Command], Awaitable[object]]

_READ_CHUNK = 1 << 16
# A client that sends requests but never reads the replies stops being read once this much
# output waits for it, so junk it floods in cannot grow the daemon without bound. Events
# still queue (QEMU's monitor buffers them the same way).
_MAX_PENDING_OUTPUT = 4 << 20


class Session:
    """One QMP client connection."""

    def __init__(
        self,
        server: QMPServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        name: str,
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.name = name
        self.conn = ServerConnection(command_exists=server.command_exists)
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._writer_task: asyncio.Task[None] | None = None
        self._pending = 0  # bytes queued and not yet handed to the transport
        self._closed = False
        self._drained = asyncio.Event()

    @property
    def negotiated(self) -> bool:
        return self.conn.negotiated

    def send(self, data: bytes) -> None:
        if self._closed:
            return
        self._pending += len(data)
        self._queue.put_nowait(data)

    async def _write_loop(self) -> None:
        while True:
            data = await self._queue.get()
            if data is None:
                break
            try:
                self.writer.write(data)
                await self.writer.drain()
            except (ConnectionError, OSError):
                break
            finally:
                self._pending -= len(data)
                if self._pending <= _MAX_PENDING_OUTPUT:
                    self._drained.set()
        # The connection is gone (or closing): nothing will drain any more, so a reader
        # waiting for room must not wait for ever.
        self._closed = True
        self._drained.set()

    async def _backpressure(self) -> None:
        """Wait while too much output is queued for this client."""
        while self._pending > _MAX_PENDING_OUTPUT and not self._closed:
            self._drained.clear()
            await self._drained.wait()

    async def run(self) -> None:
        self._writer_task = asyncio.create_task(self._write_loop())
        v = self.server.version
        self.send(self.conn.greeting((v.major, v.minor, v.micro), v.package))
        try:
            while True:
                await self._backpressure()
                try:
                    data = await self.reader.read(_READ_CHUNK)
                except (ConnectionError, OSError):
                    break
                if not data:
                    break
                for item in self.conn.receive(data):
                    if isinstance(item, bytes):
                        self.send(item)
                        continue
                    self.send(await self.server.execute(self, item))
                    if self.server.quitting:
                        # Stop reading, but stay connected: the shutdown's events (jobs
                        # cancelled by quit) still go out; QMPServer.close() ends us.
                        return
        finally:
            if not self.server.quitting:
                self.server.sessions.discard(self)
                await self._close()

    async def _drain_queue(self) -> None:
        self._queue.put_nowait(None)
        if self._writer_task is not None:
            with contextlib.suppress(Exception):
                await self._writer_task

    async def _close(self) -> None:
        await self._drain_queue()
        with contextlib.suppress(Exception):
            self.writer.close()
            await self.writer.wait_closed()


class QMPServer:
    """All QMP sessions of the daemon, and the one place commands are executed."""

    def __init__(
        self, executor: Executor, version: Any, command_exists: Callable[[str], bool]
    ) -> None:
        self._executor = executor
        self.command_exists = command_exists
        self.version = version
        self.sessions: set[Session] = set()
        self._lock = asyncio.Lock()
        self._servers: list[asyncio.AbstractServer] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._counter = 0
        self.quitting = False
        self.first_client = asyncio.Event()

    # -- sessions -------------------------------------------------------------------------
    def _start(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Session:
        self._counter += 1
        session = Session(self, reader, writer, f"client{self._counter}")
        self.sessions.add(session)
        task = asyncio.create_task(session.run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.first_client.set()
        return session

    async def listen(self, path: str) -> None:
        """Accept clients on a UNIX socket at ``path`` (an old socket file is replaced)."""
        with contextlib.suppress(FileNotFoundError):
            if os.path.exists(path) and not os.path.isdir(path):
                os.unlink(path)

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if self.quitting:
                writer.close()
                return
            self._start(reader, writer)

        self._servers.append(await asyncio.start_unix_server(accept, path=path))

    async def connect(self, path: str) -> None:
        """Connect to a listening client at ``path`` (a chardev without ``server=on``)."""
        reader, writer = await asyncio.open_unix_connection(path)
        self._start(reader, writer)

    # -- commands and events ----------------------------------------------------------------
    async def execute(self, session: Session, cmd: Command) -> bytes:
        """Run one command (one at a time across all clients) and encode its reply."""
        async with self._lock:
            try:
                value = await self._executor(cmd)
            except QMPError as exc:
                return session.conn.error_reply(cmd, exc)
            except Exception as exc:  # the edge: every error becomes a reply
                err = to_qmp_error(exc)
                if not isinstance(exc, QMPError) and err.error_class == "GenericError":
                    from bitback.errors import BitbackError

                    if not isinstance(exc, BitbackError):
                        log.exception("command %s failed unexpectedly", cmd.name)
                return session.conn.error_reply(cmd, err)
            return session.conn.reply(cmd, value)

    def broadcast(self, name: str, data: dict[str, Any], when: float) -> None:
        seconds = int(when)
        micro = int((when - seconds) * 1_000_000)
        message = encode_event(name, data, seconds, micro)
        for session in list(self.sessions):
            if session.negotiated:
                session.send(message)

    async def close(self) -> None:
        """Stop listening and end every session (after their queued output is written)."""
        self.quitting = True
        for srv in self._servers:
            srv.close()
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await srv.wait_closed()
        for session in list(self.sessions):
            await session._close()
        self.sessions.clear()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
