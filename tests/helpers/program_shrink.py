"""Shrinking a diverging random program, and the report a failing test prints.

:func:`shrink` reruns smaller versions of a program - each on a fresh twin, so that nothing
of the original run carries over - and keeps one whenever it still diverges in the same
category: first the program cut right after the diverging step, then ddmin-style removal of
halves, quarters, ... down to single steps, within a time budget. :func:`report` then says
``seed=N`` on its first line, and gives the divergence and the minimal program as the
commands that were sent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from helpers.backup import Tools
from helpers.program_runner import run_programs
from helpers.program_twin import Divergence
from helpers.programs import Program, Step

__all__ = ["Failure", "report", "shrink"]


@dataclass
class Failure:
    program: Program
    divergence: Divergence
    log: list[str]
    command_line: str = ""


def _diverges(program: Program, category: str, workdir: Path, tools: Tools,
              steer_known: bool) -> Failure | None:
    found = run_programs([program], workdir, tools, steer_known=steer_known)
    if found is None or found[1].category != category:
        return None
    return Failure(found[0], found[1], found[2], found[3])


def shrink(failure: Failure, workdir: Path, tools: Tools, *, budget: float,
           steer_known: bool = True) -> tuple[Failure, int]:
    """The smallest version of ``failure.program`` found within ``budget`` seconds that
    still diverges the same way (the original if none does, e.g. a timing accident), and
    how many candidates were run."""
    deadline = time.monotonic() + budget
    category = failure.divergence.category
    best = failure
    runs = 0

    def attempt(steps: list[Step]) -> bool:
        nonlocal best, runs
        if time.monotonic() > deadline:
            return False
        runs += 1
        found = _diverges(best.program.with_steps(steps), category, workdir, tools,
                          steer_known)
        if found is not None:
            best = found
        return found is not None

    # A divergence found during the program needs nothing after its step.
    cut = failure.divergence.step + 1
    if 0 <= cut < len(failure.program.steps):
        attempt(list(failure.program.steps[:cut]))
    parts = 2
    while len(best.program.steps) > 1 and time.monotonic() < deadline:
        steps = list(best.program.steps)
        size = max(1, -(-len(steps) // parts))
        for start in range(0, len(steps), size):
            if attempt(steps[:start] + steps[start + size:]):
                parts = max(2, parts - 1)
                break
        else:
            if size == 1:
                break
            parts = min(len(steps), parts * 2)
    return best, runs


def report(original: Failure, minimal: Failure, runs: int, seconds: float) -> str:
    """The failure message: ``seed=N`` first, then how to see it again."""
    div = minimal.divergence
    lines = [
        f"seed={original.program.seed}: bitbackd and QEMU 7.2 diverge ({div.category}) at "
        f"step {div.step} of a program of {len(minimal.program.steps)} steps (shrunk from "
        f"{len(original.program.steps)} in {runs} reruns, {seconds:.0f} s)",
        "",
        str(div),
        "",
        "Run this program again: BITBACK_RANDOM_SEEDS="
        f"{original.program.seed} pytest tests/interop/test_random_programs.py -k seeds",
        "",
        "Both processes were started with the harness command line and:",
        f"  {minimal.command_line or '(no -drive)'}",
        "Nodes: " + "; ".join(f"{n.name} ({n.kind}, {n.size} bytes, {n.cluster}-byte clusters"
                               f"{', discard=unmap' if n.discard else ''})"
                               for n in minimal.program.nodes),
        "The minimal program, as sent to both (<DIR> is each backend's directory):",
        *minimal.log,
    ]
    if minimal is not original:
        lines += ["", f"The original divergence: {original.divergence}"]
    return "\n".join(lines)
