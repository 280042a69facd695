"""bitback-img: the qemu-img 7.2 subset (create, info, check, compare, convert, rebase,
commit, resize, map) over bitback's block drivers. Entry point: :func:`cli.main`."""

from __future__ import annotations
