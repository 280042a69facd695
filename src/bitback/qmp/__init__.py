"""QMP, the QEMU Machine Protocol, as bitbackd speaks it (QEMU 7.2's dialect, byte for byte).

Layers, bottom to top:

* :mod:`~bitback.qmp.errors` - :class:`QMPError` and the one translation of bitback's
  exceptions into QMP error classes;
* :mod:`~bitback.qmp.schema` - QAPI-style argument types and the validator that answers
  with QEMU's texts;
* :mod:`~bitback.qmp.jsonstream` - QEMU's JSON message splitter and parser;
* :mod:`~bitback.qmp.protocol` - the sans-I/O connection: greeting, negotiation, framing
  errors, reply and event encoding;
* the command registry, the commands by domain, and the asyncio server, which only moves
  bytes.
"""

from __future__ import annotations

from bitback.qmp.errors import QMPError, to_qmp_error
from bitback.qmp.protocol import Command, ServerConnection, encode_event
from bitback.qmp.schema import validate_arguments

__all__ = [
    "Command",
    "QMPError",
    "ServerConnection",
    "encode_event",
    "to_qmp_error",
    "validate_arguments",
]
