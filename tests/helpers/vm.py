"""Launch a QMP process the way QEMU's test harnesses do, for bitbackd and real QEMU alike.

The harness listens on a UNIX socket; the process is started with
``-chardev socket,id=mon,path=SOCK -mon chardev=mon,mode=control`` and connects to it as a
client (spec section 1). The QMP side is the ``qemu.qmp`` library's sync API
(``QEMUMonitorProtocol``), the one QEMU's own ``machine.py`` uses.

``VM.qmp(cmd, **kwargs)`` turns ``_`` into ``-`` in top-level argument names, as the seed's
harness does, and returns the raw response (``{"return": ...}`` or ``{"error": ...}``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

from helpers.tools import bitback_argv, require_reference_tool

__all__ = ["BACKENDS", "VM", "drive_args", "emulator_argv"]

BACKENDS = ("bitback", "qemu")

# The emulator options a harness passes; bitbackd accepts and ignores them.
HARNESS_OPTIONS = ["-nodefaults", "-display", "none", "-accel", "tcg", "-S"]


def emulator_argv(backend: str) -> list[str]:
    """argv prefix of the process under test."""
    if backend == "bitback":
        return [*bitback_argv("bitbackd"), *HARNESS_OPTIONS]
    if backend == "qemu":
        return [require_reference_tool("qemu_system"), *HARNESS_OPTIONS]
    raise ValueError(backend)


class VM:
    """One process under test with one harness-side QMP connection."""

    def __init__(self, backend: str, args: Sequence[str] = (), *, timeout: float = 60.0) -> None:
        self.backend = backend
        self.args = list(args)
        self.timeout = timeout
        self._dir = tempfile.TemporaryDirectory(prefix="bitback-vm-")
        self.sock = os.path.join(self._dir.name, "mon.sock")
        self.proc: subprocess.Popen[str] | None = None
        self.monitor: QEMUMonitorProtocol | None = None
        self.exitcode: int | None = None
        self.stderr = ""
        self._accepted = threading.Event()

    def launch(self) -> VM:
        self.monitor = QEMUMonitorProtocol(self.sock, server=True)
        argv = [
            *emulator_argv(self.backend),
            "-chardev", f"socket,id=mon,path={self.sock}",
            "-mon", "chardev=mon,mode=control",
            *self.args,
        ]
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        watcher = threading.Thread(target=self._unblock_if_dead, daemon=True)
        watcher.start()
        try:
            self.monitor.accept(timeout=self.timeout)
        except BaseException as exc:
            died = self.proc.poll() is not None
            self.kill()
            if died:
                _, self.stderr = self.proc.communicate(timeout=30)
                self.exitcode = self.proc.returncode
                raise RuntimeError(
                    f"{self.backend} exited with status {self.exitcode} before connecting: "
                    f"{self.stderr.strip()}"
                ) from exc
            raise
        finally:
            self._accepted.set()
        self.monitor.settimeout(self.timeout)
        return self

    def _unblock_if_dead(self) -> None:
        """If the process dies before it connects, connect (and hang up) in its place, so
        that ``accept`` fails at once instead of waiting out its whole timeout."""
        assert self.proc is not None
        while not self._accepted.wait(0.05):
            if self.proc.poll() is not None:
                with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as sock:
                    sock.connect(self.sock)
                return

    def __enter__(self) -> VM:
        return self.launch()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        self._dir.cleanup()

    # -- QMP --------------------------------------------------------------------------------
    def qmp(self, cmd: str, **kwargs: Any) -> dict[str, Any]:
        assert self.monitor is not None
        args = {key.replace("_", "-"): value for key, value in kwargs.items()}
        return self.monitor.cmd_raw(cmd, args or None)

    def ok(self, cmd: str, **kwargs: Any) -> Any:
        """Run ``cmd`` and return its ``return`` value; fail loudly on an error reply."""
        reply = self.qmp(cmd, **kwargs)
        assert "return" in reply, f"{cmd} {kwargs}: {reply}"
        return reply["return"]

    def qemu_io(self, device: str, command: str) -> str:
        return str(
            self.ok("human-monitor-command", command_line=f'qemu-io {device} "{command}"')
        )

    def events(self, wait: float | bool = False) -> list[dict[str, Any]]:
        assert self.monitor is not None
        return self.monitor.get_events(wait=wait)

    def bitmap_info(self, device: str, name: str) -> dict[str, Any]:
        """A bitmap's BlockDirtyInfo, from query-block (either reply shape) or, for nodes
        without a device, query-named-block-nodes."""
        for entry in self.ok("query-block"):
            if entry["device"] == device or entry["inserted"]["node-name"] == device:
                for bitmap in entry["inserted"].get("dirty-bitmaps", []):
                    if bitmap.get("name") == name:
                        return dict(bitmap)
        for node in self.ok("query-named-block-nodes"):
            if node["node-name"] == device:
                for bitmap in node.get("dirty-bitmaps", []):
                    if bitmap.get("name") == name:
                        return dict(bitmap)
        raise KeyError(f"no bitmap {name} on {device}")

    # -- ending -----------------------------------------------------------------------------
    def shutdown(self) -> int:
        """``quit`` and wait for the exit status (0 is what the harness demands)."""
        assert self.proc is not None and self.monitor is not None
        self.qmp("quit")
        with contextlib.suppress(Exception):  # the peer may already be gone
            self.monitor.close()
        _, self.stderr = self.proc.communicate(timeout=self.timeout)
        self.exitcode = self.proc.returncode
        return self.exitcode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            _, self.stderr = self.proc.communicate(timeout=30)
            self.exitcode = self.proc.returncode
        if self.monitor is not None:
            with contextlib.suppress(Exception):
                self.monitor.close()


def drive_args(image: Path | str, drive_id: str = "drive0", fmt: str = "qcow2") -> list[str]:
    """The seed's ``-drive`` option (commas in the path escaped as QEMU wants)."""
    path = str(image).replace(",", ",,")
    return ["-drive", f"if=virtio,id={drive_id},file={path},format={fmt}"]
