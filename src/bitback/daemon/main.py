"""bitbackd: the storage daemon. Parse the command line, build the graph, serve QMP, quit.

Life of the process:

1. parse argv (:mod:`bitback.daemon.cmdline`); a refused command line prints one line and
   exits 1;
2. open ``-blockdev`` nodes, ``-drive`` backends and ``-device`` front ends, in QEMU's order,
   on the I/O thread; a failure prints ``bitbackd: <option as typed>: <reason>`` and exits 1;
3. start the monitors: listening sockets (``server=on``; ``wait=on`` holds start-up until the
   first client connects) and outgoing connections (a chardev without ``server=on``: the
   harness listens and bitbackd connects);
4. serve until ``quit`` or SIGTERM/SIGINT, then flush and close every image and exit 0.
   Losing a client connection does not end the daemon (as in QEMU).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from typing import Any

from bitback.block.driver import BlockDriver
from bitback.block.graph import BlockBackend, BlockGraph
from bitback.block.iothread import IOThread
from bitback.block.open import probe_format
from bitback.daemon.cmdline import (
    HELP_TEXT,
    BlockdevSpec,
    CommandLineError,
    DaemonConfig,
    DeviceSpec,
    DriveSpec,
    parse_args,
)
from bitback.daemon.server import QMPServer
from bitback.errors import BitbackError
from bitback.qmp import commands as _commands  # noqa: F401 - registers every command
from bitback.qmp.commands.block import attach_device, open_blockdev
from bitback.qmp.commands.blockdev_schema import BLOCKDEV_OPTIONS, refuse_unsupported_driver
from bitback.qmp.context import QMPContext, Version
from bitback.qmp.errors import QMPError
from bitback.qmp.protocol import Command
from bitback.qmp.registry import REGISTRY
from bitback.qmp.schema import validate_arguments
from bitback.tools.io.commands import COMMAND_TABLE, run_captured

__all__ = ["main", "run"]

PROG = "bitbackd"
log = logging.getLogger(PROG)


class StartupError(Exception):
    """A configured object could not be created; the message is the one line to print."""


def _run_qemu_io(node: BlockDriver, line: str, discard: bool, write_conflict: str | None) -> str:
    """HMP ``qemu-io``: one line of the shared command table, output captured. A command
    that needs write permission fails with ``write_conflict`` when one is given (qemu-io
    asks for the permission before it parses the command's arguments)."""
    if write_conflict is not None:
        words = line.split()
        command = COMMAND_TABLE.find(words[0]) if words else None
        if command is not None and command.writes:
            return write_conflict + "\n"
    return run_captured(node, line, discard=discard)[1]


def _drive_options(spec: DriveSpec) -> dict[str, Any]:
    """``-drive`` keys as keyval-style blockdev options for the format node."""
    assert spec.file is not None
    fmt = spec.format
    if fmt is None:
        from bitback.block.drivers.file import FileDriver

        with FileDriver(spec.file, read_only=True) as probe:
            fmt = probe_format(probe)
    opts: dict[str, Any] = {
        "driver": fmt,
        "file": {"driver": "file", "filename": spec.file},
        "read-only": "on" if spec.read_only else "off",
        "discard": spec.discard,
    }
    if spec.node_name is not None:
        opts["node-name"] = spec.node_name
    for key, value in spec.format_options.items():
        where = opts
        *parents, leaf = key.split(".")
        for part in parents:
            where = where.setdefault(part, {})
        where[leaf] = value
    return opts


class Daemon:
    """One bitbackd process: graph, I/O thread, QMP server."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.graph = BlockGraph()
        self.io = IOThread()
        self.version = Version()
        self._quit = asyncio.Event()
        self.server = QMPServer(
            self._execute, self.version, lambda name: REGISTRY.get(name) is not None
        )
        self.ctx = QMPContext(
            graph=self.graph,
            io=self.io,
            emit_event=self.server.broadcast,
            request_quit=self.request_quit,
            run_qemu_io=_run_qemu_io,
            version=self.version,
        )

    async def _execute(self, cmd: Command) -> object:
        return await REGISTRY.dispatch(self.ctx, cmd.name, cmd.arguments)

    def request_quit(self, reason: str) -> None:
        log.debug("shutting down: %s", reason)
        self.server.quitting = True
        self._quit.set()

    # -- start-up ---------------------------------------------------------------------------
    def _open_blockdev(self, spec: BlockdevSpec) -> None:
        try:
            refuse_unsupported_driver(spec.options)
            opts = validate_arguments(BLOCKDEV_OPTIONS, spec.options, keyval=spec.keyval)
            open_blockdev(self.graph, opts)
        except (BitbackError, QMPError) as exc:
            raise StartupError(f"{spec.origin}: {_text(exc)}") from exc

    def _open_drive(self, spec: DriveSpec) -> None:
        if spec.file is None:
            raise StartupError(f"{spec.origin}: drives without a medium are not supported")
        if os.path.isdir(spec.file):
            # QEMU's -drive wording (blockdev-add says "Could not open ...: Is a directory").
            raise StartupError(
                f"{spec.origin}: 'file' driver requires '{spec.file}' to be a regular file"
            )
        try:
            opts = validate_arguments(BLOCKDEV_OPTIONS, _drive_options(spec), keyval=True)
            node = self.graph.add_blockdev(opts, monitor_owned=False)
            self.graph.add_backend(BlockBackend(spec.id, node, options=dict(spec.options)))
        except (BitbackError, QMPError) as exc:
            raise StartupError(f"{spec.origin}: {_text(exc)}") from exc

    def _attach(self, spec: DeviceSpec) -> None:
        try:
            attach_device(self.graph, spec.driver, spec.id, spec.drive)
        except BitbackError as exc:
            raise StartupError(f"{spec.origin}: {exc}") from exc
        if spec.implicit:
            backend = self.graph.backend(spec.drive)
            if backend is not None:
                backend.auto_attached = True

    def build_graph(self) -> None:
        """Create every configured node, backend and device (on the I/O thread)."""
        for blockdev in self.config.blockdevs:
            self._open_blockdev(blockdev)
        for drive in self.config.drives:
            self._open_drive(drive)
        for device in self.config.devices:
            self._attach(device)

    async def _start_monitors(self) -> None:
        chardevs = {c.id: c for c in self.config.chardevs}
        waits = []
        for monitor in self.config.monitors:
            chardev = chardevs[monitor.chardev]
            if chardev.server:
                try:
                    await self.server.listen(chardev.path)
                except OSError as exc:
                    raise StartupError(
                        f"{chardev.origin}: Failed to bind socket to {chardev.path}: "
                        f"{os.strerror(exc.errno or 0)}"
                    ) from exc
                if chardev.wait:
                    waits.append(chardev.path)
            else:
                try:
                    await self.server.connect(chardev.path)
                except OSError as exc:
                    raise StartupError(
                        f"{chardev.origin}: Failed to connect to '{chardev.path}': "
                        f"{os.strerror(exc.errno or 0)}"
                    ) from exc
        if waits:
            log.info("waiting for a client on %s", ", ".join(waits))
            await self.server.first_client.wait()

    # -- running ------------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        try:
            await self.io.run(self.build_graph)
            await self._start_monitors()
        except StartupError as exc:
            print(f"{PROG}: {exc}", file=sys.stderr)
            await self._shutdown()
            return 1
        if self.config.pidfile:
            try:
                with open(self.config.pidfile, "w", encoding="ascii") as f:
                    f.write(f"{os.getpid()}\n")
            except OSError as exc:
                print(
                    f"{PROG}: cannot create PID file: Could not create "
                    f"'{self.config.pidfile}': {os.strerror(exc.errno or 0)}",
                    file=sys.stderr,
                )
                await self._shutdown()
                return 1
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(signum, self._on_signal)
        await self._quit.wait()
        status = await self._shutdown()
        if self.config.pidfile:
            with contextlib.suppress(OSError):
                os.unlink(self.config.pidfile)
        return status

    def _on_signal(self) -> None:
        if not self._quit.is_set():
            self.ctx.emit("SHUTDOWN", {"guest": False, "reason": "host-signal"})
            self.request_quit("signal")

    async def _shutdown(self) -> int:
        """Cancel running jobs (their events still reach the clients), close clients, then
        flush and close every image. Exit status 0 unless an image could not be flushed
        (data the user believed written may be lost: say so)."""
        await self.ctx.jobs.cancel_all()
        await self.server.close()
        failures = await self.io.run(self.graph.close_all)
        self.io.shutdown()
        for exc in failures:
            print(f"{PROG}: closing image: {exc}", file=sys.stderr)
        return 1 if failures else 0


def _text(exc: BaseException) -> str:
    return exc.desc if isinstance(exc, QMPError) else str(exc)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``bitbackd``."""
    args = sys.argv[1:] if argv is None else argv
    try:
        config = parse_args(args)
    except CommandLineError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    if config.show_help:
        print(HELP_TEXT, end="")
        return 0
    if config.show_version:
        v = Version()
        print(f"{PROG} (bitback), QMP compatible with QEMU {v.major}.{v.minor}.{v.micro}")
        return 0
    logging.basicConfig(
        level=logging.DEBUG if os.environ.get("BITBACKD_DEBUG") else logging.WARNING,
        format=f"{PROG}: %(message)s",
    )
    for warning in config.warnings:
        print(f"{PROG}: {warning}", file=sys.stderr)
    for ignored in config.ignored:
        log.debug("ignored (no guest runs here): %s", ignored)

    async def run() -> int:
        return await Daemon(config).run()

    try:
        return asyncio.run(run())
    except KeyboardInterrupt:
        return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
