"""Driving an io tool (bitback-io or qemu-io) interactively: commands on stdin, reports read
as they come, and the process killed at a moment of the test's choosing.

In interactive mode both tools print the prompt ``qemu-io> `` (no newline) before reading
each command, and a command's report lines after it completes; a reader thread collects the
lines so that the test never blocks on a full pipe. Prompts are stripped, as are the timing
lines that follow each report, leaving one *report line* per command that reports (``write``
and ``write -z``: ``wrote N/N bytes at offset O``; ``discard``: ``discard N/N ...``; ``length``:
the size). ``flush`` prints nothing: a reporting command sent after it proves it completed.
"""

from __future__ import annotations

import contextlib
import queue
import re
import signal
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

__all__ = ["PROMPT", "IoProcess", "report_line"]

PROMPT = "qemu-io> "
_TIMING_RE = re.compile(r"^.*, \d+ ops; .*\(.*/sec and .* ops/sec\)$")


def report_line(raw: str) -> str | None:
    """The report in one output line: prompts stripped; None for timing or empty lines."""
    line = raw.rstrip("\n")
    while line.startswith(PROMPT):
        line = line[len(PROMPT) :]
    if not line.strip() or _TIMING_RE.match(line):
        return None
    return line


class IoProcess:
    """One interactive io tool process on one image."""

    def __init__(self, argv: Sequence[str], *, stderr_path: Path) -> None:
        self._stderr = open(stderr_path, "wb")  # noqa: SIM115 - closed in wait()/kill()
        self.proc = subprocess.Popen(
            list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
            text=True, bufsize=1,
        )
        self.reports: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = report_line(raw)
            if line is not None:
                self.reports.put(line)
        self.reports.put(None)  # end of output

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def next_report(self, timeout: float) -> str | None:
        """The next report line; None once the process has ended and everything was read."""
        return self.reports.get(timeout=timeout)

    def kill(self) -> list[str]:
        """SIGKILL the process; return the report lines it printed before dying."""
        self.proc.send_signal(signal.SIGKILL)
        return self._finish()

    def close(self, timeout: float = 60) -> list[str]:
        """End input and wait for a normal exit; return the remaining report lines."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=timeout)
        return self._finish()

    def _finish(self) -> list[str]:
        self.proc.wait(timeout=60)
        self._reader.join(timeout=60)
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        self._stderr.close()
        rest = []
        while True:
            line = self.reports.get_nowait() if not self.reports.empty() else None
            if line is None:
                break
            rest.append(line)
        return rest
