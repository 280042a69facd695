"""Running tools as subprocesses from tests: always with a timeout, always capturing text.

``run`` is the one way tests start a short-lived process (bitback-img, qemu-img, ...)::

    from helpers.procs import run

    res = run([*bitback_img, "info", path], check=True)
    assert "file format: qcow2" in res.stdout

A process that outlives its timeout is killed and the test fails with the command, the timeout
and whatever it printed so far, instead of hanging the suite. ``check=True`` turns a non-zero
exit into a test failure that shows the exit code, stdout and stderr.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence

__all__ = ["DEFAULT_TIMEOUT", "ProcessFailed", "describe", "run"]

# Long enough for a tool working on a few hundred MiB on a loaded 2-core CI machine; tests that
# do more pass their own timeout.
DEFAULT_TIMEOUT = 120.0

Arg = str | os.PathLike[str]


class ProcessFailed(AssertionError):
    """A subprocess exited with an unexpected code or ran out of time.

    An ``AssertionError`` so that pytest reports it as a test failure with this message.
    """


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def describe(
    argv: Sequence[Arg],
    returncode: int | None,
    stdout: str | bytes | None,
    stderr: str | bytes | None,
) -> str:
    """A readable account of one process run, for failure messages."""
    cmd = shlex.join(os.fspath(a) for a in argv)
    status = "timed out" if returncode is None else f"exit code {returncode}"
    return (
        f"command: {cmd}\n{status}\n"
        f"--- stdout ---\n{_text(stdout)}--- stderr ---\n{_text(stderr)}--- end ---"
    )


def run(
    argv: Sequence[Arg],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = False,
    expect: int | None = None,
    input: str | None = None,
    cwd: Arg | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to completion and return its exit code, stdout and stderr as text.

    ``env`` holds variables *added to* (or overriding) the current environment. Standard input
    is ``input`` or, without it, empty (never the terminal, so a tool waiting for input ends
    instead of hanging). ``check=True`` requires exit code 0; ``expect=N`` requires N. Either
    failure raises :class:`ProcessFailed`, as does running past ``timeout`` seconds (the process
    is killed first).
    """
    args = [os.fspath(a) for a in argv]
    full_env = None if env is None else {**os.environ, **env}
    try:
        res = subprocess.run(
            args,
            input=input if input is not None else "",
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
            env=full_env,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ProcessFailed(
            f"process ran longer than {timeout:g} s and was killed\n"
            + describe(args, None, exc.stdout, exc.stderr)
        ) from None
    wanted = 0 if check else expect
    if wanted is not None and res.returncode != wanted:
        raise ProcessFailed(
            f"expected exit code {wanted}\n"
            + describe(args, res.returncode, res.stdout, res.stderr)
        )
    return res
