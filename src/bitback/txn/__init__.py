"""Transactions: several steps that happen all together or not at all.

* :mod:`bitback.txn.transaction` - :class:`Transaction`, the generic mechanism: every step
  registers its undo (and its commit and clean-up) before it acts; on failure the undos run
  newest first, on success the commits run in order, and the clean-ups always run.
* :mod:`bitback.txn.actions` - the actions QMP's ``transaction`` offers (dirty-bitmap steps,
  backups, ``abort``), written against plain argument dictionaries.
"""

from __future__ import annotations

from bitback.txn.transaction import Transaction

__all__ = ["Transaction"]
