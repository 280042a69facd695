"""The human monitor subset behind ``human-monitor-command``: ``qemu-io`` only.

QEMU parses an HMP line by the command's argument template; ``qemu-io`` takes an optional
``-d`` flag (the name is a qdev id), a block device or node name, and one string, usually the
qemu-io command in double quotes. Strings follow the monitor's rules: a double-quoted string
knows the escapes ``\\n \\r \\\\ \\' \\"``; an unquoted one ends at white space. Problems are
reported as the monitor reports them, as *output text* of a successful command (QEMU 7.2:
``unknown command: 'x'``, ``qemu-io: extraneous characters at the end of line``).

This module only parses; running the command belongs to the caller, which owns the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["HmpParseError", "QemuIoRequest", "parse_hmp"]

_MAX_STRING = 1023  # the monitor's argument buffer holds 1024 bytes with the terminator


class HmpParseError(Exception):
    """The line cannot be run; ``str(exc)`` is the monitor's text (without line end)."""


@dataclass(frozen=True, slots=True)
class QemuIoRequest:
    """``qemu-io [-d] NAME COMMAND``."""

    qdev: bool
    name: str
    command: str


def _skip_space(line: str, pos: int) -> int:
    while pos < len(line) and line[pos].isspace():
        pos += 1
    return pos


def _get_str(line: str, pos: int) -> tuple[str, int] | None:
    """One monitor string starting at ``pos`` (after spaces); ``None`` if there is none or it
    is malformed."""
    pos = _skip_space(line, pos)
    if pos >= len(line):
        return None
    out: list[str] = []
    if line[pos] == '"':
        pos += 1
        while pos < len(line) and line[pos] != '"':
            ch = line[pos]
            if ch == "\\":
                if pos + 1 >= len(line):
                    return None
                esc = line[pos + 1]
                pos += 2
                mapped = {"n": "\n", "r": "\r", "\\": "\\", "'": "'", '"': '"'}.get(esc)
                if mapped is None:
                    return None
                out.append(mapped)
            else:
                out.append(ch)
                pos += 1
        if pos >= len(line):
            return None  # unterminated string
        pos += 1
    else:
        start = pos
        while pos < len(line) and not line[pos].isspace():
            pos += 1
        out.append(line[start:pos])
    return "".join(out)[:_MAX_STRING], pos


def parse_hmp(line: str) -> QemuIoRequest | None:
    """Parse one HMP command line. ``None`` for an empty line (QEMU prints nothing);
    :class:`HmpParseError` for an unknown command or malformed arguments."""
    pos = _skip_space(line, 0)
    start = pos
    while pos < len(line) and not line[pos].isspace():
        pos += 1
    name = line[start:pos]
    if not name:
        return None
    if name != "qemu-io":
        raise HmpParseError(f"unknown command: '{name}'")
    qdev = False
    pos = _skip_space(line, pos)
    if line.startswith("-", pos):
        flag = line[pos + 1 : pos + 2]
        if flag != "d":
            raise HmpParseError(f"qemu-io: unsupported option -{flag}")
        qdev = True
        pos += 2
    device = _get_str(line, pos)
    if device is None:
        raise HmpParseError("qemu-io: block device name expected")
    name, pos = device
    command = _get_str(line, pos)
    if command is None:
        raise HmpParseError("qemu-io: string expected")
    text, pos = command
    if _skip_space(line, pos) < len(line):
        raise HmpParseError("qemu-io: extraneous characters at the end of line")
    return QemuIoRequest(qdev=qdev, name=name, command=text)
