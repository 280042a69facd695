"""The two processes a random program runs on, and what is compared between them.

A :class:`Twin` is one bitbackd and one QEMU 7.2, started with the harness command line and
the ``-drive`` nodes of a group of programs, each in a directory of its own holding the same
file names (``<DIR>`` stands for either). :meth:`Twin.both` runs a function on both sides at
once, each side on its own thread, which owns that side's QMP connection. A :class:`Side`
keeps every event its process sent.

What is compared (by :mod:`helpers.program_runner`) is shaped here: :func:`normalize` for
replies and output, :func:`observe` for the state after a step, :func:`job_summary` for a
job's events; :func:`guest_view` reads an image through its chain.

Normalizations - the one place they are listed for this test; each is for a reason of QEMU's:

* paths become ``<DIR>`` and automatic node names ``#block<N>`` (:func:`normalize`);
* ``paused`` + ``running`` pairs are folded out of a job's statuses (:func:`job_summary`):
  QEMU 7.2 drains the graph when it inserts its backup filter, in every ``transaction`` and
  in ``block_resize``, which pauses and resumes a running job; bitbackd has no drain. User
  pauses are still seen in ``query-block-jobs`` (``paused``).
* ``waiting`` right before ``aborting`` is dropped (:func:`job_summary`): a member of a
  grouped transaction that had finished copying before another member failed; which came
  first is timing.
* ``offset`` of a failed or cancelled job, and of a running one, is dropped (:func:`job_summary`,
  :func:`observe`): QEMU copies in parallel chunks of up to 1 MiB shaped by block status
  (even by holes in the image file); bitbackd copies one run at a time, one cluster per step
  under a rate limit. ``busy`` of a running job says whether it sleeps at that instant, and
  its ``status`` lags behind a ``block-job-pause`` in QEMU (a sleeping job parks when its
  rate-limit sleep is cut short, after the reply); ``paused`` is compared.
* bitbackd's seed-era ``status`` of a bitmap is checked against ``busy`` and ``recording``,
  then dropped (QEMU 7.2 has none); anonymous bitmaps (QEMU lists a running backup's) are
  left out (:func:`observe`).
* what a process prints on its stdout and stderr is compared only as HMP ``qemu-io``
  output; messages a QMP command makes it print are skipped (QEMU's ``Formatting ...`` for
  a target that drive-backup creates, flush failures when a node is deleted).
* at ``quit`` (:meth:`Twin.quit`), bitbackd may exit 1 where QEMU prints "Failed to flush"
  and exits 0 (README, exit codes).
* two more live in the runner: a slow backup stays slow only when QEMU's first chunk cannot
  finish it (:meth:`~helpers.program_runner.ProgramRun.slow_ok`), and bitmaps whose bits
  QEMU's timing decided are compared for everything but count and digest
  (:meth:`~helpers.program_runner.ProgramRun.check_state`, :mod:`helpers.program_model`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bitback.block.chain import open_chain, read, virtual_size
from bitback.tools.img.create import create_image
from helpers.backup import BackupVM, Tools, job_of
from helpers.procs import run
from helpers.programs import NodeSpec, Program
from helpers.vm import BACKENDS

__all__ = [
    "BACKENDS",
    "JOB_TIMEOUT",
    "Divergence",
    "Side",
    "Twin",
    "differ",
    "dump",
    "first_difference",
    "guest_view",
    "job_of",
    "job_summary",
    "make_image",
    "normalize",
    "observe",
    "outcome",
]

T = TypeVar("T")
Event = dict[str, Any]
JOB_TIMEOUT = float(os.environ.get("BITBACK_RANDOM_JOB_TIMEOUT", "60"))
_AUTO_NODE = re.compile(r"#block\d+")


class Divergence(AssertionError):
    """bitbackd and QEMU 7.2 (or QEMU and the model) disagree. ``category`` names what was
    compared (reply, output, state, job, image, model, crash); ``step`` is the index of the
    step, -1 before the first and ``len(steps)`` at the end."""

    def __init__(self, category: str, step: int, message: str) -> None:
        super().__init__(f"[{category}] step {step}: {message}")
        self.category = category
        self.step = step
        self.message = message


def dump(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def differ(what: str, got: dict[str, Any]) -> str:
    return (f"{what}\n--- bitbackd ---\n{json.dumps(got['bitback'], indent=1, sort_keys=True)}"
            f"\n--- QEMU 7.2 ---\n{json.dumps(got['qemu'], indent=1, sort_keys=True)}")


# ------------------------------------------------------------------------------ images


def make_image(tools: Tools, creator: str, path: Path, size: int, cluster: int,
               backing: str | None = None) -> str:
    """Create a qcow2 image with ``creator``'s tool; returns the command, for the log.
    ``backing`` is a name relative to the image's directory (``-u``: not opened)."""
    argv = ["create", "-f", "qcow2", "-o", f"cluster_size={cluster}"]
    if backing is not None:
        argv += ["-b", backing, "-F", "qcow2", "-u"]
    argv += [str(path), str(size)]
    if creator == "qemu-img":
        run([tools.qemu_img, *argv], check=True)
    elif creator == "bitback-img":
        run([*tools.bitback_img, *argv], check=True)
    else:
        create_image(str(path), "qcow2", size, options=f"cluster_size={cluster}",
                     backing=backing, backing_fmt="qcow2" if backing else None,
                     unsafe=True, quiet=True)
    tool = "bitback-img" if creator == "bitback" else creator
    return f"$ {tool} {' '.join(argv[:-2])} <DIR>/{path.name} {size}"


def guest_view(path: Path) -> bytes:
    """What a guest reads from ``path`` through its chain (bitback's reader)."""
    node = open_chain(str(path))
    try:
        return read(node, 0, virtual_size(node))
    finally:
        node.close()


def first_difference(a: bytes, b: bytes) -> str:
    if len(a) != len(b):
        return f"sizes {len(a)} and {len(b)}"
    index = next(i for i in range(len(a)) if a[i] != b[i])
    return f"first difference at byte {index} (0x{a[index]:02x} / 0x{b[index]:02x})"


# ------------------------------------------------------------------------------ normalizing


def normalize(value: Any, workdir: Path) -> Any:
    """Paths of the backend's directory become ``<DIR>``, automatic node names
    ``#block<N>``."""
    text = _AUTO_NODE.sub("#block<N>", json.dumps(value).replace(str(workdir), "<DIR>"))
    return json.loads(text)


def job_summary(events: Iterable[Event], job: str) -> dict[str, Any]:
    """One job's events as compared between the backends (see the module docstring)."""
    statuses: list[str] = []
    errors: list[dict[str, Any]] = []
    end: dict[str, Any] | None = None
    for e in events:
        if job_of(e) != job:
            continue
        name, data = e["event"], e["data"]
        if name == "JOB_STATUS_CHANGE":
            statuses.append(data["status"])
        elif name == "BLOCK_JOB_ERROR":
            errors.append(dict(data))
            statuses.append(f"ERROR {data['operation']} {data['action']}")
        elif name in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
            end = {"event": name, **data}
            statuses.append(name)
    folded: list[str] = []
    for status in statuses:
        if status == "running" and folded and folded[-1] == "paused":
            folded.pop()  # a drain (QEMU) or a pause the user ended
            continue
        if status == "aborting" and folded and folded[-1] == "waiting":
            folded.pop()  # finished copying before its group failed: timing
        folded.append(status)
    if end is not None:
        if "error" in end or end["event"] == "BLOCK_JOB_CANCELLED":
            end.pop("offset", None)
        elif end.get("offset") != end.get("len"):
            end["offset-is-not-len"] = True
        else:
            end.pop("offset")
    return {"statuses": folded, "errors": errors, "end": end}


def outcome(summary: dict[str, Any]) -> str:
    end = summary["end"]
    if end is None:
        return "aborted"  # created in a transaction that failed
    if end["event"] == "BLOCK_JOB_CANCELLED":
        return "cancelled"
    return "failed" if "error" in end else "completed"


def _bitmaps(backend: str, info: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for bm in info.get("dirty-bitmaps", []):
        if "name" not in bm:
            continue  # QEMU 7.2 lists a running backup's anonymous bitmaps
        bm = dict(bm)
        status = bm.pop("status", None)
        if backend == "bitback":
            want = "frozen" if bm["busy"] else "active" if bm["recording"] else "disabled"
            assert status == want, f"bitbackd: seed-era status {status} for {bm}"
        else:
            assert status is None, bm
        out.append(bm)
    return out


def _jobs(listed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    dropped = ("offset", "busy", "status")  # see the module docstring
    return sorted(({k: v for k, v in job.items() if k not in dropped}
                   for job in listed), key=lambda j: str(j["device"]))


# ------------------------------------------------------------------------------ the twin


@dataclass
class Side:
    """One backend of a twin: its process, directory and the events pulled so far."""

    backend: str
    vm: BackupVM
    dir: Path
    events: list[Event] = field(default_factory=list)
    resumed: set[int] = field(default_factory=set)  # indices of stop errors resumed

    def pull(self) -> None:
        self.events += self.vm.events()

    def sub(self, value: Any) -> Any:
        """``<DIR>`` in the strings of ``value`` becomes this side's directory."""
        if isinstance(value, str):
            return value.replace("<DIR>", str(self.dir))
        if isinstance(value, dict):
            return {k: self.sub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.sub(v) for v in value]
        return value

    def ended(self, job: str) -> bool:
        return any(e["event"] == "JOB_STATUS_CHANGE" and e["data"]["id"] == job
                   and e["data"]["status"] == "null" for e in self.events)

    def created(self, job: str) -> bool:
        return any(e["event"] == "JOB_STATUS_CHANGE" and e["data"]["id"] == job
                   for e in self.events)

    def wait_ended(self, jobs: Iterable[str], log: list[str]) -> None:
        """Pull events until every one of ``jobs`` reached ``null``; a job stopped by its
        error policy is resumed (and the resume logged)."""
        assert self.vm.monitor is not None
        self.pull()
        pending = {j for j in jobs if not self.ended(j)}
        deadline = time.monotonic() + JOB_TIMEOUT
        while pending:
            self.resume_stopped(log)
            left = deadline - time.monotonic()
            if left <= 0:
                seen = [e for e in self.events if job_of(e) in pending]
                raise TimeoutError(f"{self.backend}: jobs {sorted(pending)} did not end; "
                                   f"their events: {seen}; {self.vm.ok('query-block-jobs')}")
            try:
                event = self.vm.monitor.pull_event(wait=float(min(left, 5.0)))
            except TimeoutError:
                continue
            if event is None:
                continue
            self.events.append(event)
            data = event.get("data", {})
            if event["event"] == "JOB_STATUS_CHANGE" and data["status"] == "null":
                pending.discard(data["id"])

    def resume_stopped(self, log: list[str]) -> None:
        """Resume every job its error policy stopped (each BLOCK_JOB_ERROR ``stop`` once)."""
        for index, event in enumerate(self.events):
            data = event.get("data", {})
            if (event["event"] != "BLOCK_JOB_ERROR" or data.get("action") != "stop"
                    or index in self.resumed):
                continue
            self.resumed.add(index)
            self.vm.qmp("block-job-resume", device=data["device"])
            if self.backend == "qemu":
                log.append(f"  (stopped by its error: block-job-resume {data['device']})")


class Twin:
    """bitbackd and QEMU 7.2 with the nodes of ``programs`` (drives on the command line,
    images for the ``debug`` nodes made), in ``workdir/bitback`` and ``workdir/qemu``."""

    def __init__(self, programs: Iterable[Program], workdir: Path, tools: Tools) -> None:
        self.tools = tools
        self.workdir = workdir
        self.programs = list(programs)
        # One thread per side, which owns that side's QMP connection: qemu.qmp's sync client
        # runs its own asyncio loop, one per thread.
        self.threads = {b: concurrent.futures.ThreadPoolExecutor(1) for b in BACKENDS}
        dirs = {b: workdir / b for b in BACKENDS}
        for d in dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        self.drives: list[tuple[Program, NodeSpec]] = []
        args: dict[str, list[str]] = {b: [] for b in BACKENDS}
        templates = workdir.parent / "templates"  # fresh images, made once per kind
        templates.mkdir(exist_ok=True)
        for program in self.programs:
            for node in program.nodes:
                path = dirs["bitback"] / f"{node.name}.qcow2"
                template = templates / f"{node.creator}-{node.size}-{node.cluster}.qcow2"
                if not template.exists():
                    make_image(tools, node.creator, template, node.size, node.cluster)
                shutil.copyfile(template, path)
                shutil.copyfile(path, dirs["qemu"] / path.name)
                if node.kind == "drive":
                    self.drives.append((program, node))
                    for b in BACKENDS:
                        args[b] += ["-drive", node.drive_option(str(dirs[b] / path.name))]
        vms = {b: BackupVM(b, args[b]) for b in BACKENDS}
        self.sides = {b: Side(b, vms[b], dirs[b]) for b in BACKENDS}
        self.disks: dict[str, bytes | None] = {}  # drive node -> the model's disk at the end
        try:
            self.both(lambda s: s.vm.launch())
        except BaseException:
            self.close()
            raise

    def both(self, fn: Callable[[Side], T]) -> dict[str, T]:
        """``fn`` on both sides at once; the first exception (bitback's first) is raised."""
        futures = {b: self.threads[b].submit(fn, s) for b, s in self.sides.items()}
        out = {}
        for backend, future in futures.items():
            try:
                out[backend] = future.result()
            except Exception as exc:
                exc.add_note(f"(on {backend})")
                raise
        return out

    def command_line(self) -> str:
        side = self.sides["bitback"]
        return " ".join(normalize(side.vm.args, side.dir))

    def quit(self) -> None:
        """``quit`` both; then every drive must hold the same bytes on both, and the model's
        when it knows them."""
        got = self.both(lambda s: s.vm.quit()[1])
        printed = {b: s.vm.printed() for b, s in self.sides.items()}
        # Documented (README, exit codes): bitbackd exits 1 when it could not flush an image
        # at exit; QEMU 7.2 prints "Failed to flush ..." and exits 0.
        if (got == {"bitback": 1, "qemu": 0} and "closing image" in printed["bitback"]
                and "Failed to flush" in printed["qemu"]):
            got["bitback"] = 0
        if got != {"bitback": 0, "qemu": 0}:
            raise Divergence("crash", -1, f"exit codes at quit: {got}\n"
                             f"bitbackd printed: {printed['bitback'][-2000:]}")
        for program, node in self.drives:
            views = {b: guest_view(s.dir / f"{node.name}.qcow2") for b, s in self.sides.items()}
            where = len(program.steps)
            if views["bitback"] != views["qemu"]:
                raise Divergence("image", where, f"drive {node.name} after quit: "
                                 + first_difference(views["bitback"], views["qemu"]))
            want = self.disks.get(node.name)
            if want is not None and views["qemu"] != want:
                raise Divergence("model", where, f"drive {node.name}: QEMU vs model: "
                                 + first_difference(views["qemu"], want))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.both(lambda s: s.vm.__exit__(None, None, None))
        for pool in self.threads.values():
            pool.shutdown(wait=False)


def observe(side: Side, names: list[str]) -> dict[str, Any]:
    """The compared state: per node its size and named bitmaps (with digests of the non-empty
    ones), and the jobs."""
    vm = side.vm
    nodes: dict[str, Any] = {}
    for info in vm.ok("query-named-block-nodes", flat=True):
        name = info.get("node-name")
        if name not in names:
            continue
        bitmaps = _bitmaps(side.backend, info)
        for bm in bitmaps:
            if bm["count"]:
                bm["sha256"] = vm.ok("x-debug-block-dirty-bitmap-sha256", node=name,
                                     name=bm["name"])["sha256"]
        nodes[name] = {"size": info["image"]["virtual-size"], "bitmaps": bitmaps}
    return {"nodes": nodes, "jobs": _jobs(vm.ok("query-block-jobs"))}
