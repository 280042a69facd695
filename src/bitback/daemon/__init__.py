"""bitbackd, the storage daemon: command line, configuration and (later) the server itself.

Layering inside this package, bottom to top: :mod:`.qemuopts` reads QEMU's option-string
syntaxes, :mod:`.cmdline` turns an argv into a typed :class:`~.cmdline.DaemonConfig`. Neither
does any I/O; building the block graph and serving QMP happen above them.
"""

from __future__ import annotations

__all__: list[str] = []
