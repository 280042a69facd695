"""Running a random program (:mod:`helpers.programs`) on bitbackd and QEMU 7.2 in lockstep.

:class:`ProgramRun` sends every step to both sides of a :class:`~helpers.program_twin.Twin`
and, after every step, requires

* the same reply from both: ``return`` value, or error class *and* text; for HMP
  ``qemu-io``, the same output;
* the same state (:func:`~helpers.program_twin.observe`): each node's virtual size and named
  bitmaps, newest first (name, count, granularity, recording, busy, persistent, and the
  ``x-debug-block-dirty-bitmap-sha256`` digest of every non-empty one), and the jobs in
  ``query-block-jobs``;
* for every job that ended, the same events (:func:`~helpers.program_twin.job_summary`):
  statuses in order, its BLOCK_JOB_ERRORs, its completion event's type, len, speed and
  error, and offset == len when it succeeded; in a grouped transaction, the order the jobs
  ended in;
* that QEMU agrees with :class:`~helpers.program_model.Model` (sizes, the bitmaps it knows,
  job lens) - a check of the harness and model rather than of bitback.

At the end of a program every successful backup is read through its chain on both sides and
compared (in process, with bitback's chain reader; the newest of each node with real
``qemu-img compare`` too); a full backup must equal the modelled disk at its start, a failed
backup's target must pass ``qemu-img check``, and each disk must equal the other backend's
and the model's (``debug`` nodes when they are deleted, drives once the twin has quit).
What is normalized, and why, is listed in :mod:`helpers.program_twin`.

Steering. Some steps cannot be compared and are changed or left out, always with a line in
the log (the reproduction shows it):

* QEMU 7.2 bugs (measured): a transaction whose ``block-dirty-bitmap-enable`` fails crashes
  it (SIGSEGV), so does a failed one that clears or merges a bitmap and then backs up with it
  in bitmap-mode ``always`` (use after free), and a grouped one of several backups that fails
  hangs it (:meth:`ProgramRun.steer_transaction`); a transaction that backs a drive up by
  node name and again by device name aborts it (:meth:`ProgramRun.source`).
* bitbackd's known divergences (:data:`helpers.programs.KNOWN_DIVERGENCES`, each with a
  strict-xfail reproduction in ``tests/interop/test_random_programs.py``), unless
  ``BITBACK_RANDOM_KNOWN=1`` (:meth:`ProgramRun.steer`).
"""

from __future__ import annotations

import contextlib
import shutil
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpers.backup import Tools
from helpers.procs import run
from helpers.program_model import FIRST_CHUNK, MJob, Model
from helpers.program_twin import (
    BACKENDS,
    Divergence,
    Side,
    Twin,
    differ,
    dump,
    first_difference,
    guest_view,
    job_of,
    job_summary,
    make_image,
    normalize,
    observe,
    outcome,
)
from helpers.programs import (
    Abort,
    Action,
    Backup,
    BitmapCmd,
    Flush,
    Io,
    JobVerb,
    Merge,
    NodeSpec,
    Program,
    Resize,
    Step,
    Txn,
    known_divergences_allowed,
)

__all__ = ["Found", "ProgramRun", "run_programs"]

# ------------------------------------------------------------------------------ one program


@dataclass
class TargetRec:
    file: str  # name in both directories
    node: str
    job: str
    backing: str | None
    ok: bool = False
    comparable: bool = True
    snapshot: bytes | None = None


class ProgramRun:
    """One program on a twin (see the module docstring). :meth:`run` raises
    :class:`Divergence`; :attr:`log` holds every command sent, for the reproduction."""

    def __init__(self, twin: Twin, program: Program, *, steer_known: bool = True) -> None:
        self.twin = twin
        self.program = program
        self.steer_known = steer_known
        self.model = Model(program.nodes)
        self.log: list[str] = []
        self.index = -1
        self.targets: dict[str, TargetRec] = {}  # by job id
        self.tops: dict[str, str | None] = {n.name: None for n in program.nodes}
        self.slow: dict[str, Backup] = {}  # running slow backups
        self.paused: set[str] = set()  # jobs paused by block-job-pause
        self.unleashed: set[str] = set()  # paused jobs set to speed 0 (or cancelled)
        self.steered: dict[str, int] = {}  # known divergence -> times steered around

    # -- plumbing ---------------------------------------------------------------------------
    def fail(self, category: str, message: str) -> Divergence:
        return Divergence(category, self.index, message)

    def qmp(self, cmd: str, args: dict[str, Any], *, texts_differ: str | None = None
            ) -> dict[str, Any]:
        """Send ``cmd`` to both (``<DIR>`` in ``args`` becomes each side's directory); the
        replies must agree - but for the texts of errors of one class when ``texts_differ``
        names a known divergence; returns the normalized reply (QEMU's)."""
        self.log.append(f"  {cmd} {dump(args)}")

        def send(side: Side) -> Any:
            assert side.vm.monitor is not None
            reply = side.vm.monitor.cmd_raw(cmd, side.sub(args))
            side.vm.skip_printed()  # not compared: see helpers.program_twin
            side.pull()
            return normalize(reply, side.dir)

        got = self.twin.both(send)
        if got["bitback"] != got["qemu"]:
            errors = [got[b].get("error", {}).get("class") for b in BACKENDS]
            if not (texts_differ and errors[0] and errors[0] == errors[1]
                    and self.steer(texts_differ)):
                raise self.fail("reply", differ(f"{cmd} {dump(args)}", got))
        return dict(got["qemu"])

    def hmp(self, node: NodeSpec, command: str) -> str:
        self.log.append(f'  human-monitor-command qemu-io {node.hmp} "{command}"')

        def send(side: Side) -> str:
            out = side.vm.io_output(node.hmp, command)
            side.pull()
            return str(normalize(out, side.dir))

        got = self.twin.both(send)
        if got["bitback"] != got["qemu"]:
            raise self.fail("output", differ(f"qemu-io {node.hmp} {command!r}", got))
        return got["qemu"]

    def steer(self, known: str) -> bool:
        """Steer around a known divergence (``programs.KNOWN_DIVERGENCES``) unless
        ``BITBACK_RANDOM_KNOWN`` asks to see it; logged, and counted in :attr:`steered`."""
        if not self.steer_known or known_divergences_allowed():
            return False
        self.log.append(f"  (known divergence {known}: steered around)")
        self.steered[known] = self.steered.get(known, 0) + 1
        return True

    def addr(self, name: str, by_device: bool, busy: set[str] | None = None) -> str:
        """A drive's device name when asked for and no backup holds the node (nor, in a
        transaction, an earlier action: ``busy``); else the node name. QEMU 7.2 resolves a
        device name to the backup's filter node: a bitmap command then misses the bitmap or
        even adds one to the filter (spec 3.3: an artefact not to copy)."""
        spec = self.program.node(name)
        held = self.model.nodes[name].job is not None or name in (busy or set())
        return spec.device if by_device and spec.device and not held else name

    # -- running ----------------------------------------------------------------------------
    def run(self) -> None:
        for side in self.twin.sides.values():
            side.events, side.resumed = [], set()
        self.index = -1
        for node in self.program.nodes:
            if node.kind == "debug":
                self.log.append(f"# node {node.name}: blockdev-add")
                self.qmp("blockdev-add", node.blockdev_add(f"<DIR>/{node.name}.qcow2"))
        self.check_state()
        for index, step in enumerate(self.program.steps):
            self.index = index
            self.log.append(f"# step {index}: {step}")
            self.execute(step)
            self.settle_ended()
            self.check_state()
        self.index = len(self.program.steps)
        self.finish()

    def execute(self, step: Step) -> None:
        if isinstance(step, (Io, Flush)):
            self.guest(step)
        elif isinstance(step, BitmapCmd):
            if "return" in self.qmp(*self.bitmap_args(step)):
                self.model.bitmap_cmd(step)
        elif isinstance(step, Merge):
            if "return" in self.qmp(*self.merge_args(step)):
                self.model.merge(step)
        elif isinstance(step, Resize):
            spec = self.program.node(step.node)
            if spec.writes_may_fail and self.steer("resize-with-failing-writes"):
                return
            key = "device" if self.addr(step.node, step.by_device) != step.node else "node-name"
            args = {key: self.addr(step.node, step.by_device), "size": step.size}
            held = self.model.nodes[step.node].job is not None
            reply = self.qmp("block_resize", args,
                             texts_differ="resize-during-backup-text" if held else None)
            if "return" in reply:
                self.model.resize(step.node, step.size)
        elif isinstance(step, Backup):
            self.backup(step)
        elif isinstance(step, Txn):
            self.transaction(step)
        else:
            self.job_verb(step)

    def guest(self, step: Io | Flush) -> None:
        node = self.program.node(step.node)
        if (node.kind == "debug" and self.model.nodes[node.name].job is not None
                and self.steer("node-write-during-backup")):
            return
        if isinstance(step, Flush):
            self.hmp(node, "flush")
            return
        if (step.op == "discard" and node.discard and self.model.nodes[node.name].job
                and self.steer("discard-during-backup")):
            return
        self.model.io(step, self.hmp(node, step.command()))

    def bitmap_args(self, step: BitmapCmd, busy: set[str] | None = None
                    ) -> tuple[str, dict[str, Any]]:
        args: dict[str, Any] = {"node": self.addr(step.node, step.by_device, busy),
                                "name": step.name}
        if step.granularity is not None:
            args["granularity"] = step.granularity
        if step.disabled is not None:
            args["disabled"] = step.disabled
        return f"block-dirty-bitmap-{step.cmd}", args

    def merge_args(self, step: Merge) -> tuple[str, dict[str, Any]]:
        sources = [name if node is None else {"node": node, "name": name}
                   for node, name in step.sources]
        return "block-dirty-bitmap-merge", {"node": step.node, "target": step.target,
                                            "bitmaps": sources}

    # -- backups ----------------------------------------------------------------------------
    def target_cluster(self, step: Backup) -> int:
        return 64 * 1024 if step.target.kind == "new" else step.target.cluster

    def slow_ok(self, step: Backup) -> bool:
        """May this backup run slowly (see the module docstring)?"""
        if step.speed == 0 or any(r.new_state is None for r in self.program.node(step.node).rules):
            return False
        if step.sync == "none":
            return True
        want = self.model.job_len(step, self.target_cluster(step))
        return want is not None and want > FIRST_CHUNK

    def source(self, step: Backup, busy: set[str], *, in_txn: bool = False) -> str | None:
        """How to name the backup's source; None to leave the backup out. A source that a
        backup already reads (``busy``: nodes of running backups and of earlier actions of
        the same transaction) is named by its device name, or left out if it has none or
        the backup is a transaction action (known divergence ``second-backup-of-a-source``;
        QEMU 7.2 aborts - ``bdrv_do_drained_end: Assertion `bs->quiesce_counter > 0'`` - on
        a transaction that backs a drive up by node name and then by device name)."""
        spec = self.program.node(step.node)
        if step.node not in busy or not self.steer("second-backup-of-a-source"):
            return self.addr(step.node, step.by_device)
        return None if in_txn else spec.device

    def busy_nodes(self) -> set[str]:
        return {name for name, n in self.model.nodes.items() if n.job is not None}

    def backup_args(self, step: Backup, slow: bool, device: str) -> dict[str, Any]:
        """Make the target (unless drive-backup creates it); the drive-backup arguments."""
        t = step.target
        node = self.model.nodes[step.node]
        rec = TargetRec(f"{step.node}.{step.job}.qcow2", step.node, step.job, None)
        if t.kind != "new":
            size = node.size + (1 << 20 if t.kind == "wrong-size" else 0)
            rec.backing = self.tops[step.node] if t.kind == "chain" else None
            sides = self.twin.sides
            path = sides["bitback"].dir / rec.file
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            self.log.append(make_image(self.twin.tools, t.creator, path, size, t.cluster,
                                       rec.backing))
            shutil.copyfile(path, sides["qemu"].dir / rec.file)
        self.targets[step.job] = rec
        args: dict[str, Any] = {"job-id": step.job, "device": device, "sync": step.sync,
                                "target": f"<DIR>/{rec.file}", "format": "qcow2"}
        if t.kind != "new":
            args["mode"] = "existing"
        if step.bitmap is not None:
            args["bitmap"] = step.bitmap
        if step.mode is not None:
            args["bitmap-mode"] = step.mode
        if slow:
            args["speed"] = 1
        if step.on_source_error is not None:
            args["on-source-error"] = step.on_source_error
        return args

    def started(self, step: Backup) -> None:
        """A backup was set up (its command or transaction succeeded)."""
        job = self.model.start(step, self.target_cluster(step))
        rec = self.targets[step.job]
        rec.snapshot = job.snapshot
        backing = self.targets_by_file().get(rec.backing) if rec.backing else None
        rec.comparable = not job.timing and (backing is None or backing.comparable)

    def targets_by_file(self) -> dict[str, TargetRec]:
        return {t.file: t for t in self.targets.values()}

    def backup(self, step: Backup) -> None:
        slow = self.slow_ok(step)
        device = self.source(step, self.busy_nodes())
        if device is None:
            return
        reply = self.qmp("drive-backup", self.backup_args(step, slow, device))
        if "return" not in reply:
            return
        self.started(step)
        if slow or step.sync == "none":  # sync=none copies only ahead of guest writes: it
            self.slow[step.job] = step    # runs until cancelled, whatever its speed
        else:
            self.await_jobs([step.job])

    def transaction(self, step: Txn) -> None:
        step = self.steer_transaction(step)
        actions: list[dict[str, Any]] = []
        busy = self.busy_nodes()
        for action in step.actions:
            if isinstance(action, Backup):
                device = self.source(action, busy, in_txn=True)
                assert device is not None  # steer_transaction dropped the others
                busy.add(action.node)
                actions.append({"type": "drive-backup",
                                "data": self.backup_args(action, False, device)})
            else:
                actions.append(self.action(action, busy))
        args: dict[str, Any] = {"actions": actions}
        if step.grouped is not None:
            args["properties"] = {"completion-mode": "grouped" if step.grouped else "individual"}
        reply = self.qmp("transaction", args)
        jobs = [a.job for a in step.actions if isinstance(a, Backup)]
        if "return" in reply:
            for action in step.actions:
                if isinstance(action, BitmapCmd):
                    self.model.bitmap_cmd(action)
                elif isinstance(action, Merge):
                    self.model.merge(action)
                elif isinstance(action, Backup):
                    self.started(action)
        else:
            for action in step.actions:
                if isinstance(action, Backup) and action.mode == "always":
                    self.model.aborted_always(action)
        created = [j for j in jobs if any(s.created(j) for s in self.twin.sides.values())]
        self.await_jobs(created, grouped=bool(step.grouped) and "return" in reply)

    def steer_transaction(self, step: Txn) -> Txn:
        """The transaction as it can be sent to both. Backups of a node some backup already
        reads are left out (known divergence ``second-backup-of-a-source``), then three
        QEMU 7.2 bugs (measured) are kept out of reach, each with a line in the log:

        * QEMU calls the abort of the action that failed too, and the abort of a
          ``block-dirty-bitmap-enable`` disables a NULL bitmap when the bitmap was not found
          (or the action refused ``completion-mode: grouped``): SIGSEGV. Such an action is
          left out.
        * A backup with bitmap-mode ``always`` aborted in a failed transaction hands its
          bitmap's name to the successor and frees the old bitmap; an earlier clear, merge,
          enable or disable of that bitmap then restores into freed memory (SIGSEGV, or
          ``munmap_chunk(): invalid pointer``). Such an earlier action is left out when the
          transaction may fail.
        * A grouped transaction that fails after it created two or more jobs hangs QEMU (the
          monitor never answers); it is sent with ``completion-mode: individual`` instead.

        Whether an action fails is predicted with the model (:meth:`fails`), cautiously.
        """
        busy = self.busy_nodes()
        kept: list[Action] = []
        for action in step.actions:
            if isinstance(action, Backup):
                if self.source(action, busy, in_txn=True) is None:
                    continue
                busy.add(action.node)
            kept.append(action)
        fails = self.fails(kept, step.grouped)
        enables = [a for a, f in zip(kept, fails, strict=True)
                   if isinstance(a, BitmapCmd) and a.cmd == "enable" and f]
        if enables:
            self.log.append("  (left out a failing block-dirty-bitmap-enable action: "
                            "QEMU 7.2 crashes on its abort)")
            kept = [a for a in kept if a not in enables]
            fails = self.fails(kept, step.grouped)
        if any(fails):
            always = {(a.node, a.bitmap) for a in kept
                      if isinstance(a, Backup) and a.mode == "always" and a.bitmap}
            undone = [a for i, a in enumerate(kept) if self.restores(a) in always
                      and any(isinstance(b, Backup) and (b.node, b.bitmap) == self.restores(a)
                              for b in kept[i + 1:])]
            if undone:
                self.log.append("  (left out a bitmap action before an aborted bitmap-mode "
                                "always backup of that bitmap: QEMU 7.2 then uses freed "
                                "memory)")
                kept = [a for a in kept if a not in undone]
                fails = self.fails(kept, step.grouped)
        grouped = step.grouped
        if grouped and any(fails) and sum(isinstance(a, Backup) for a in kept) > 1:
            self.log.append("  (completion-mode individual: QEMU 7.2 hangs when a grouped "
                            "transaction of several backups fails)")
            grouped = False
        return Txn(tuple(kept), grouped)

    @staticmethod
    def restores(action: Action) -> tuple[str, str] | None:
        """The bitmap whose bits the action's abort puts back, if any."""
        if isinstance(action, BitmapCmd) and action.cmd in ("clear", "enable", "disable"):
            return action.node, action.name
        if isinstance(action, Merge):
            return action.node, action.target
        return None

    def fails(self, actions: list[Action], grouped: bool | None) -> list[bool]:
        """Which actions would fail in prepare, walking them in order on the model's state
        (cautious: True where unsure). Used only to keep QEMU's bugs out of reach."""
        names = {n: {bm.name for bm in m.bitmaps()} for n, m in self.model.nodes.items()}
        held = {n: {bm.name for bm in m.bitmaps() if bm.job is not None}
                for n, m in self.model.nodes.items()}
        sizes = {n: m.size for n, m in self.model.nodes.items()}
        out: list[bool] = []
        for action in actions:
            if isinstance(action, Abort):
                out.append(True)
            elif isinstance(action, Backup):
                out.append(not self.prepares(action, names, held))
                if not out[-1] and action.bitmap:
                    held[action.node].add(action.bitmap)
            elif isinstance(action, Merge):
                target_ok = action.target in names[action.node] - held[action.node]
                sources_ok = all(
                    name in names[node or action.node]
                    and sizes[node or action.node] == sizes[action.node]
                    for node, name in action.sources)
                out.append(bool(grouped) or not (target_ok and sources_ok))
            else:
                usable = names[action.node] - held[action.node]
                if action.cmd == "add":
                    gran = action.granularity
                    bad = gran is not None and (gran < 512 or gran > 1 << 31
                                                or gran & (gran - 1) != 0)
                    out.append(bool(grouped) or bad or action.name in names[action.node])
                    if not out[-1]:
                        names[action.node].add(action.name)
                else:
                    out.append(bool(grouped) or action.name not in usable)
                    if not out[-1] and action.cmd == "remove":
                        held[action.node].add(action.name)  # busy until the commit
        return out

    def prepares(self, step: Backup, names: dict[str, set[str]],
                 held: dict[str, set[str]]) -> bool:
        """Would this backup pass QEMU's checks (on the given bitmaps; cautious)?"""
        if step.target.kind == "wrong-size" or self.model.nodes[step.node].job is not None:
            return False
        if step.sync in ("incremental", "bitmap") and step.bitmap is None:
            return False
        if step.sync == "incremental" and step.mode not in (None, "on-success"):
            return False
        if step.bitmap is None:
            return step.mode is None
        if step.bitmap not in names[step.node] - held[step.node] or step.sync == "none":
            return False
        if step.sync != "incremental" and step.mode is None:
            return False
        return not (step.mode == "never" and step.sync != "bitmap")

    def action(self, action: Action, busy: set[str]) -> dict[str, Any]:
        if isinstance(action, Abort):
            return {"type": "abort", "data": {}}
        assert not isinstance(action, Backup)
        cmd, args = (self.bitmap_args(action, busy) if isinstance(action, BitmapCmd)
                     else self.merge_args(action))
        return {"type": cmd, "data": args}

    def job_verb(self, step: JobVerb) -> None:
        job = step.job
        if step.verb in ("pause", "resume"):
            if "return" in self.qmp(f"block-job-{step.verb}", {"device": job}):
                if step.verb == "pause":
                    self.paused.add(job)
                else:
                    self.paused.discard(job)
                    if job in self.unleashed:  # finished or cancelled while paused
                        self.await_jobs([job])
            return
        backup = self.slow.get(job)
        if step.verb == "finish" and (backup is None or backup.sync != "none"):
            ok = "return" in self.qmp("block-job-set-speed", {"device": job, "speed": 0})
        else:  # cancel; and a sync=none backup, which only ends when cancelled
            ok = "return" in self.qmp("block-job-cancel", {"device": job})
        if ok and job not in self.paused:  # a paused job goes on only when resumed
            self.await_jobs([job])
        elif ok:
            self.unleashed.add(job)

    # -- job ends ---------------------------------------------------------------------------
    def await_jobs(self, jobs: list[str], *, grouped: bool = False) -> None:
        """Wait on both sides for ``jobs`` to end, then compare how they ended."""
        if not jobs:
            return
        log = self.log
        try:
            self.twin.both(lambda s: s.wait_ended(jobs, log))
        except TimeoutError as exc:
            raise self.fail("job", str(exc)) from exc
        for job in jobs:
            self.job_ended(job)
        if grouped:
            got = {b: [job_of(e) for e in s.events
                       if e["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
                       and job_of(e) in jobs] for b, s in self.twin.sides.items()}
            if got["bitback"] != got["qemu"]:
                raise self.fail("job", differ("order of the grouped jobs' ends", got))

    def job_ended(self, job: str) -> None:
        got = {b: job_summary(s.events, job) for b, s in self.twin.sides.items()}
        running = self.model.jobs.get(job)
        if running is not None and running.timing:  # its copy set: QEMU's timing
            for summary in got.values():
                if summary["end"] is not None:
                    summary["end"]["len"] = "timing"
        if got["bitback"] != got["qemu"]:
            raise self.fail("job", differ(f"events of job {job}", got))
        self.slow.pop(job, None)
        if job not in self.model.jobs:
            return
        result = outcome(got["qemu"])
        mjob: MJob = self.model.end(job, result)
        end = got["qemu"]["end"]
        if end is not None and mjob.len is not None and not mjob.timing \
                and end["len"] != mjob.len:
            raise self.fail("model", f"job {job}: QEMU len {end['len']}, model {mjob.len}")
        rec = self.targets[job]
        rec.ok = result == "completed"
        if rec.ok:
            self.tops[rec.node] = rec.file

    def settle_ended(self) -> None:
        """A running job that ended by itself on either side must end on the other too."""
        self.twin.both(lambda s: s.pull())
        done = [j for j in self.model.jobs
                if any(s.ended(j) for s in self.twin.sides.values())]
        self.await_jobs(done)

    # -- state ------------------------------------------------------------------------------
    def check_state(self) -> None:
        names = [n.name for n in self.program.nodes]
        got = self.twin.both(lambda s: observe(s, names))
        for name in names:  # bitmaps whose bits QEMU's timing decided
            timing = self.model.timing(name)
            for seen in got.values():
                for bm in seen["nodes"].get(name, {}).get("bitmaps", []):
                    if bm["name"] in timing:
                        bm["count"] = bm["sha256"] = "timing"
        if got["bitback"] != got["qemu"]:
            raise self.fail("state", differ("state after the step", got))
        for name in names:
            seen = got["qemu"]["nodes"].get(name)
            if seen is None:
                continue  # a debug node before blockdev-add
            if seen["size"] != self.model.nodes[name].size:
                raise self.fail("model", f"{name}: size {seen['size']}, model "
                                f"{self.model.nodes[name].size}")
            want = self.model.expect(name)
            listed = seen["bitmaps"]
            if not self.model.nodes[name].order_known:
                want = sorted(want, key=lambda bm: str(bm["name"]))
                listed = sorted(listed, key=lambda bm: str(bm["name"]))
            have = [{k: bm.get(k) if want[i].get(k) is not None else None for k in want[i]}
                    for i, bm in enumerate(listed[:len(want)])]
            if len(listed) != len(want) or have != want:
                raise self.fail("model", f"{name}: QEMU {seen['bitmaps']}\nmodel {want}")

    # -- the end ----------------------------------------------------------------------------
    def finish(self) -> None:
        self.log.append("# end of the program")
        for job, step in list(self.slow.items()):
            if job in self.paused:
                self.job_verb(JobVerb("resume", job))
            verb = "cancel" if step.sync == "none" else "finish"
            self.job_verb(JobVerb(verb, job))
        self.settle_ended()
        if self.model.jobs:
            raise self.fail("job", f"jobs still running at the end: {sorted(self.model.jobs)}")
        for node in self.program.nodes:
            if node.kind == "debug":
                self.qmp("blockdev-del", {"node-name": node.name})
                if not node.writes_may_fail:  # else its metadata may not have been written
                    self.compare_disk(node)
            else:  # compared once the twin has quit
                disk = self.model.nodes[node.name].disk
                self.twin.disks[node.name] = bytes(disk) if disk is not None else None
        self.compare_targets()

    def compare_disk(self, node: NodeSpec) -> None:
        views = {b: guest_view(s.dir / f"{node.name}.qcow2") for b, s in self.twin.sides.items()}
        if views["bitback"] != views["qemu"]:
            raise self.fail("image", f"disk {node.name}: "
                            + first_difference(views["bitback"], views["qemu"]))
        want = self.model.nodes[node.name].disk
        if want is not None and views["qemu"] != bytes(want):
            raise self.fail("model", f"disk {node.name}: QEMU vs model: "
                            + first_difference(views["qemu"], bytes(want)))

    def compare_targets(self) -> None:
        sides = self.twin.sides
        for rec in self.targets.values():
            paths = {b: s.dir / rec.file for b, s in sides.items()}
            if not all(p.exists() for p in paths.values()):
                continue  # the backup was refused before its target was made
            if not rec.ok:
                res = run([self.twin.tools.qemu_img, "check", "-q", str(paths["bitback"])])
                if res.returncode != 0:
                    raise self.fail("image", f"failed backup {rec.file} (bitbackd) does not "
                                    f"check clean: {res.stdout}{res.stderr}")
                continue
            if not rec.comparable:
                continue
            views = {b: guest_view(p) for b, p in paths.items()}
            if views["bitback"] != views["qemu"]:
                raise self.fail("image", f"backup {rec.file} (through its chain): "
                                + first_difference(views["bitback"], views["qemu"]))
            if rec.snapshot is not None and views["qemu"] != rec.snapshot:
                raise self.fail("model", f"full backup {rec.file} vs the disk at its start: "
                                + first_difference(views["qemu"], rec.snapshot))
        by_file = self.targets_by_file()
        for node, top in self.tops.items():
            newest = by_file.get(top) if top else None
            if newest is None or not newest.comparable:
                continue
            res = run([self.twin.tools.qemu_img, "compare", "-f", "qcow2", "-F", "qcow2",
                       str(sides["bitback"].dir / newest.file),
                       str(sides["qemu"].dir / newest.file)])
            if res.returncode != 0:
                raise self.fail("image", f"qemu-img compare of {node}'s newest backup "
                                f"{newest.file}: exit {res.returncode}: {res.stdout}{res.stderr}")


# ------------------------------------------------------------------------------ groups


Found = tuple[Program, Divergence, list[str], str]


def run_programs(programs: list[Program], workdir: Path, tools: Tools, *,
                 steer_known: bool = True, steered: dict[str, int] | None = None
                 ) -> Found | None:
    """Run ``programs`` on one twin, one after the other; None if all agreed, else the
    first that diverged, how, its log and the twin's command line. A crash of either
    process counts as a divergence. ``steered`` adds up the known divergences avoided."""
    if workdir.exists():
        shutil.rmtree(workdir)
    twin = Twin(programs, workdir, tools)
    cmdline = twin.command_line()
    current: ProgramRun | None = None
    logs: dict[int, list[str]] = {}
    try:
        for program in programs:
            current = ProgramRun(twin, program, steer_known=steer_known)
            logs[id(program)] = current.log
            current.run()
            for key, count in current.steered.items():
                if steered is not None:
                    steered[key] = steered.get(key, 0) + count
        current = None
        twin.quit()
    except Divergence as exc:
        failed = current.program if current is not None else _owner(programs, exc)
        return failed, exc, logs.get(id(failed), []), cmdline
    except Exception as exc:  # a crash, a dead socket, a harness assertion
        where = current.index if current is not None else -1
        failed = current.program if current is not None else programs[-1]
        detail = "".join(traceback.format_exception(exc, limit=-4)).strip()
        for side in twin.sides.values():
            if side.vm.proc is not None and side.vm.proc.poll() is not None:
                detail += (f"\n{side.backend} exited with {side.vm.proc.returncode}; it "
                           f"printed:\n{side.vm.printed()[-1500:]}")
        return (failed, Divergence("crash", where, detail),
                current.log if current else [], cmdline)
    finally:
        twin.close()
    shutil.rmtree(workdir, ignore_errors=True)
    return None


def _owner(programs: list[Program], exc: Divergence) -> Program:
    """The program a divergence found at quit belongs to: the one its message names a node
    of, else the last one."""
    for program in programs:
        if any(n.name in exc.message for n in program.nodes):
            return program
    return programs[-1]
