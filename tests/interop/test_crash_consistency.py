"""Crash consistency: bitback-io killed with SIGKILL mid-workload leaves a sound image.

``bitback-io`` runs interactively (commands on a stdin pipe) on a qcow2 image with 64 KiB or
512-byte clusters, in qemu-io's default write-through cache mode and with ``-t writeback``,
with and without a backing file. It gets a long random workload: writes at random offsets and
lengths with random patterns (many partial clusters, some of several MiB so that kills land
mid-write), ``write -z [-u]``, ``discard``, and a ``flush`` every few commands followed by
``length``, whose output line proves the flush completed. Commands go out a few at a time;
each report line acknowledges the next reporting command. After a random number of
acknowledgements (and a random pause, often landing inside the next request) the process
is killed with SIGKILL. Then:

* real ``qemu-img check`` exits 0 or 3 (leaked clusters are allowed, corruption is not);
* every byte that no command after the last *durability point* touched reads exactly as the
  model says it was at that point, and every touched byte reads as either that value or the
  value one of those later commands wrote. A durability point is a completed ``flush`` and, in
  write-through mode, also an acknowledged ``write``/``write -z`` (qemu-io's write-through
  flushes after each write; a discard is not flushed, so it may be lost);
* bitback reads the crashed image exactly as QEMU does.

The next round reopens the crashed image and goes on from what it holds. ``BITBACK_CRASH_ROUNDS``
(default 8 per configuration, 32 kills in all, about a minute) sets the number of rounds;
``BITBACK_CRASH_SEED`` replays a run (the seed is in every failure message).
"""

from __future__ import annotations

import os
import random
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from bitback.block.open import open_image
from helpers.imagetools import CHECK_CLEAN, CHECK_LEAKS, check_image, create, io_argv, read_raw
from helpers.interactive import IoProcess
from helpers.model import DataOp, Discard, DiskModel, Write, WriteZeroes
from helpers.procs import run

pytestmark = pytest.mark.qemu

KiB, MiB = 1 << 10, 1 << 20
ROUNDS = int(os.environ.get("BITBACK_CRASH_ROUNDS", "8"))
WINDOW = 3  # reporting commands in flight at once
WORKLOAD = 160  # commands prepared per round (more than a round ever gets through)

FLUSH, LENGTH = "flush", "length"
Command = DataOp | str


@dataclass(frozen=True)
class Config:
    cluster_size: int
    size: int
    writeback: bool
    backing: bool
    creator: str  # "qemu" or "bitback": who creates the image


CONFIGS = {
    "64k-writethrough": Config(64 * KiB, 16 * MiB, False, False, "qemu"),
    "64k-writeback": Config(64 * KiB, 16 * MiB, True, False, "bitback"),
    "512-writethrough-backing": Config(512, 4 * MiB, False, True, "bitback"),
    "512-writeback-backing": Config(512, 4 * MiB, True, True, "qemu"),
}


def _text(cmd: Command) -> str:
    return cmd if isinstance(cmd, str) else cmd.command()


def _expected_report(cmd: Command, size: int) -> str | None:
    """The report line acknowledging ``cmd`` (None: it prints nothing)."""
    if cmd == FLUSH:
        return None
    if cmd == LENGTH:
        return f"{size // MiB} MiB"
    assert not isinstance(cmd, str)
    verb = "discard" if isinstance(cmd, Discard) else "wrote"
    return f"{verb} {cmd.length}/{cmd.length} bytes at offset {cmd.offset}"


def _range(rng: random.Random, size: int, cs: int) -> tuple[int, int]:
    how = rng.choice(["partial", "partial", "clusters", "unaligned", "large"])
    if how == "partial":  # inside one cluster, not covering it
        offset = rng.randrange(0, size // cs) * cs + rng.randrange(0, cs, 512)
        length = rng.randint(1, cs - offset % cs)
    elif how == "clusters":
        offset = rng.randrange(0, size // cs) * cs
        length = rng.randint(1, 8) * cs
    elif how == "unaligned":
        offset = rng.randrange(0, size)
        length = rng.randint(1, 64 * KiB)
    else:  # long enough that a kill often lands inside it
        offset = rng.randrange(0, size)
        length = rng.randint(MiB, 3 * MiB)
    return offset, max(1, min(length, size - offset))


def workload(rng: random.Random, size: int, cs: int) -> list[Command]:
    cmds: list[Command] = []
    until_flush = rng.randint(2, 6)
    while len(cmds) < WORKLOAD:
        if until_flush == 0:
            cmds += [FLUSH, LENGTH]
            until_flush = rng.randint(2, 6)
            continue
        until_flush -= 1
        offset, length = _range(rng, size, cs)
        kind = rng.choices(["write", "zero", "discard"], weights=[6, 2, 2])[0]
        if kind == "write":
            cmds.append(Write(offset, length, rng.randint(1, 255)))
        elif kind == "zero":
            cmds.append(WriteZeroes(offset, length, unmap=rng.random() < 0.5))
        else:
            cmds.append(Discard(offset, length))
    return cmds


@dataclass
class Outcome:
    """What one killed run got through."""

    sent: int  # commands written to stdin
    acked: int  # index + 1 of the last command known complete


def run_until_killed(argv: list[str], cmds: list[Command], size: int, rng: random.Random,
                     stderr: Path) -> Outcome:
    """Feed ``cmds`` a few at a time, SIGKILL after a random number of acknowledgements."""
    kill_after = rng.randint(1, 45)
    proc = IoProcess(argv, stderr_path=stderr)
    pending: deque[int] = deque()
    sent = acked = reports = 0

    def take(line: str | None) -> None:
        nonlocal acked, reports
        assert line is not None, f"bitback-io ended early: {stderr.read_text()}"
        index = pending.popleft()
        assert line == _expected_report(cmds[index], size), (line, _text(cmds[index]))
        acked = index + 1
        reports += 1

    try:
        while reports < kill_after:
            while sent < len(cmds) and len(pending) < WINDOW:
                proc.send(_text(cmds[sent]))
                if _expected_report(cmds[sent], size) is not None:
                    pending.append(sent)
                sent += 1
            take(proc.next_report(timeout=60))
        # Often kill at once (the next commands are running), sometimes a little later.
        time.sleep(rng.choice([0.0, rng.uniform(0, 0.005), rng.uniform(0, 0.08)]))
    finally:
        late = proc.kill()
    for line in late:  # acknowledged before it died, read after
        take(line)
    return Outcome(sent, acked)


def durable_end(cmds: list[Command], acked: int, *, writeback: bool) -> int:
    """Commands ``[0, n)`` are guaranteed on disk: ``n`` after the last durability point."""
    for i in range(acked - 1, -1, -1):
        cmd = cmds[i]
        # A flush is complete once a later command was acknowledged (its ``length`` marker).
        if cmd == FLUSH and i < acked - 1:
            return i + 1
        if not writeback and isinstance(cmd, Write | WriteZeroes):
            return i + 1
    return 0


def check_content(actual: bytes, durable: bytes, touched: list[Command], context: str) -> None:
    """Untouched bytes equal ``durable``; touched ones hold the old or a written value."""
    got = np.frombuffer(actual, dtype=np.uint8)
    want = np.frombuffer(durable, dtype=np.uint8)
    assert got.shape == want.shape, context
    ok = got == want
    for cmd in touched:
        if isinstance(cmd, str):
            continue
        lo, hi = cmd.offset, cmd.offset + cmd.length
        value = cmd.pattern if isinstance(cmd, Write) else 0
        ok[lo:hi] |= got[lo:hi] == value
    bad = np.flatnonzero(~ok)
    assert bad.size == 0, (
        f"{context}: {bad.size} bytes read wrong after the crash; first at offset {bad[0]}: "
        f"0x{got[bad[0]]:02x}, expected 0x{want[bad[0]]:02x} (or a value written after the "
        "last durability point)"
    )


def _pread_all(path: Path) -> bytes:
    with open_image(str(path), "qcow2", read_only=True) as node:
        return node.pread(0, node.length())


@pytest.mark.timeout(max(300, 20 * ROUNDS))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_sigkill_leaves_a_consistent_image(
    name: str, tmp_path: Path, qemu_img: str, qemu_io: str, bitback_img: list[str],
    bitback_io: list[str],
) -> None:
    """Repeated SIGKILLs of bitback-io never corrupt the image nor lose flushed data."""
    config = CONFIGS[name]
    seed = int(os.environ.get("BITBACK_CRASH_SEED", random.randrange(1 << 32)))
    rng = random.Random(seed)
    img = tmp_path / "disk.qcow2"
    backing = None
    if config.backing:
        base = tmp_path / "base.qcow2"
        create([qemu_img], base, config.size, cluster_size=64 * KiB)
        run([qemu_io, "-f", "qcow2", *io_argv(
            [f"write -P 0x{0x30 + i:02x} {i * 256 * KiB + 1000} {200 * KiB}" for i in range(16)]
        ), str(base)], check=True)
        backing = str(base)
    creator = bitback_img if config.creator == "bitback" else [qemu_img]
    create(creator, img, config.size, cluster_size=config.cluster_size, backing=backing)
    content = read_raw([qemu_img], img, scratch=tmp_path)

    argv = [*bitback_io, "-f", "qcow2", *(["-t", "writeback"] if config.writeback else []),
            str(img)]
    leaks = 0
    for round_no in range(ROUNDS):
        context = f"{name} seed={seed} round={round_no}"
        cmds = workload(rng, config.size, config.cluster_size)
        (tmp_path / f"round{round_no}.cmds").write_text("\n".join(map(_text, cmds)) + "\n")
        outcome = run_until_killed(argv, cmds, config.size, rng, tmp_path / "stderr.txt")
        end = durable_end(cmds, outcome.acked, writeback=config.writeback)
        model = DiskModel(config.size, config.cluster_size, backing=content)
        for cmd in cmds[:end]:
            if not isinstance(cmd, str):
                assert model.apply(cmd)
        context += f" sent={outcome.sent} acked={outcome.acked} durable={end}"

        code = check_image(qemu_img, img, allowed=(CHECK_CLEAN, CHECK_LEAKS))
        leaks += code == CHECK_LEAKS
        actual = read_raw([qemu_img], img, scratch=tmp_path)
        check_content(actual, model.view(), cmds[end : outcome.sent], context)
        assert _pread_all(img) == actual, f"{context}: bitback reads the crashed image wrongly"
        content = actual
