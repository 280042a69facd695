"""QMP command handlers, by domain. Importing this package registers all of them."""

from __future__ import annotations

from bitback.qmp.commands import bitmaps, block, jobs, misc, transaction

__all__ = ["bitmaps", "block", "jobs", "misc", "transaction"]
