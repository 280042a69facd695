"""The io tool: qemu-io's command language over bitback's block drivers.

Modules, bottom to top:

* :mod:`.parsing` - qemu-io's argument syntax (sizes, pattern bytes, getopt, word splitting);
* :mod:`.report` - its output shapes (sizes, timings, hex dumps, info dumps);
* :mod:`.table` - command records, the context commands write to, the dispatcher;
* :mod:`.io_ops` - chunked reads and writes, allocation queries, on the BlockDriver interface;
* :mod:`.cmdutil` - what the command functions share (conversions with qemu-io's errors);
* :mod:`.rw` - the data-path commands (read, write, their vector and aio forms, discard);
* :mod:`.helptext` - the extended help texts;
* :mod:`.commands` - the command table itself (shared with the daemon's HMP ``qemu-io``) and
  the image-wide commands (flush, truncate, length, info, map, alloc, help, sleep);
* :mod:`.cli` - the ``bitback-io`` program (options, image opening, ``-c`` and interactive).

Running one command against a driver and capturing its output, as HMP will::

    ok, text = run_captured(driver, "write -P 0xab 0 512")
"""

from __future__ import annotations

from .commands import COMMAND_TABLE, COMMANDS, run_captured
from .table import Command, CommandContext, CommandTable

__all__ = [
    "COMMANDS",
    "COMMAND_TABLE",
    "Command",
    "CommandContext",
    "CommandTable",
    "run_captured",
]
