"""``python -m bitback.daemon``: the same as the ``bitbackd`` console script."""

from __future__ import annotations

from bitback.daemon.main import run

run()
