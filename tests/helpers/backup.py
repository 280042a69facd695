"""Driving backup jobs the way iotest 124 does, on bitbackd and on QEMU 7.2 alike.

* :class:`BackupVM`: a :class:`~helpers.seedsetup.HarnessVM` with the backup verbs (start a
  ``drive-backup``, wait for jobs to end, read a bitmap, quit) and **the one place** that knows
  how QEMU 7.2's replies differ from the seed-era shape bitbackd keeps (see its docstring).
* :func:`trace`: one job's events as a short list of labels, so that a scenario can state the
  exact sequence it expects (spec 4.2).
* :class:`Chain`: an anchor (full backup), the incremental backups stacked on it and the
  reference full backup taken right after each; :func:`verify_chains` checks them at the end
  with real ``qemu-img`` and with ``bitback-img`` (spec 6.5).

The expected sequences, with ``JSC x`` written as ``x`` (spec 4.2)::

    SUCCESS    created running waiting pending COMPLETED concluded null
    FAILED     created running ERROR read report aborting COMPLETED error concluded null
    CANCELLED  created running aborting CANCELLED concluded null
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers.imagetools import CHECK_CLEAN, check_image, compare, create, strip_timing
from helpers.seedsetup import HarnessVM, granule_sha256

__all__ = [
    "CANCELLED",
    "FAILED",
    "FULL_LEN",
    "SUCCESS",
    "BackupVM",
    "Chain",
    "Tools",
    "dirty_granules",
    "find",
    "model_sha256",
    "parse_size",
    "trace",
    "verify_chains",
]

KiB, MiB = 1 << 10, 1 << 20
FULL_LEN = 64 * MiB  # the seed's disk, and the len of every full backup of it

SUCCESS = ["created", "running", "waiting", "pending", "COMPLETED", "concluded", "null"]
FAILED = ["created", "running", "ERROR read report", "aborting", "COMPLETED error",
          "concluded", "null"]
CANCELLED = ["created", "running", "aborting", "CANCELLED", "concluded", "null"]

# How long a job may take before a test gives up on it (64 MiB copies take ~0.1 s).
JOB_TIMEOUT = 60.0
# How long "no further event" is waited for: an event already sent arrives well within it.
QUIET_WINDOW = 0.1

Event = dict[str, Any]


# ------------------------------------------------------------------------------ sizes, models


def parse_size(text: str | int) -> int:
    """``"512"``, ``"64k"``, ``"32736k"``, ``"1M"`` -> bytes (the io tool's suffixes)."""
    if isinstance(text, int):
        return text
    units = {"k": KiB, "K": KiB, "m": MiB, "M": MiB}
    if text[-1] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)


def dirty_granules(patterns: Iterable[tuple[str, str, str]], granularity: int = 64 * KiB
                   ) -> set[int]:
    """Granules that seed-style writes ``(pattern, offset, length)`` dirty: every granule the
    byte range touches (spec 5.1). Example at 64 KiB: ``32736k 64k`` = [32M-32k, 32M+32k)
    touches granules 511 and 512."""
    out: set[int] = set()
    for _, offset, length in patterns:
        start = parse_size(offset)
        end = start + parse_size(length)
        out |= set(range(start // granularity, (end - 1) // granularity + 1))
    return out


def model_sha256(granules: Iterable[int], size: int = FULL_LEN,
                 granularity: int = 64 * KiB) -> str:
    """``x-debug-block-dirty-bitmap-sha256`` of a bitmap holding exactly ``granules``, from
    the independent model in :func:`helpers.seedsetup.granule_sha256`."""
    return granule_sha256(size, granularity, granules)


# ------------------------------------------------------------------------------ event traces


def _label(event: Event) -> str:
    name, data = event["event"], event["data"]
    if name == "JOB_STATUS_CHANGE":
        return str(data["status"])
    if name == "BLOCK_JOB_ERROR":
        return f"ERROR {data['operation']} {data['action']}"
    short = name.removeprefix("BLOCK_JOB_")
    return f"{short} error" if "error" in data else short


def job_of(event: Event) -> str | None:
    data = event.get("data", {})
    if event["event"] == "JOB_STATUS_CHANGE":
        return str(data["id"])
    if event["event"].startswith("BLOCK_JOB_"):
        return str(data["device"])
    return None


def trace(events: Sequence[Event], job_id: str) -> list[str]:
    """The labels of ``job_id``'s events, in order: a JOB_STATUS_CHANGE gives its status,
    BLOCK_JOB_COMPLETED ``COMPLETED`` (``COMPLETED error`` with an error member),
    BLOCK_JOB_CANCELLED ``CANCELLED``, BLOCK_JOB_ERROR ``ERROR <operation> <action>``.

    QEMU 7.2 drains the graph while it inserts its copy-before-write filter, which shows as
    ``running, paused, running`` right after ``created`` (spec 4.2.1, optional for us); that
    artefact is folded to one ``running``, on either backend.
    """
    labels = [_label(e) for e in events if job_of(e) == job_id]
    if labels[:4] == ["created", "running", "paused", "running"]:
        del labels[1:3]
    return labels


def find(events: Sequence[Event], name: str, job_id: str) -> Event:
    """The one event ``name`` of ``job_id`` (fails if there is none or more than one)."""
    found = [e for e in events if e["event"] == name and job_of(e) == job_id]
    assert len(found) == 1, f"{len(found)} {name} events for {job_id}: {found}"
    return found[0]


# ------------------------------------------------------------------------------ the VM


class BackupVM(HarnessVM):
    """A process under test driven like iotest 124 drives QEMU.

    This class is the one place that knows the documented differences of QEMU 7.2 from the
    seed-era behaviour bitbackd implements (spec 12 and 3.5); tests state QEMU 7.2's values
    and go through these methods:

    * **Bitmaps in query-block** (:meth:`bitmap`): QEMU 7.2 lists them only in
      ``inserted["dirty-bitmaps"]`` and without ``status``; bitbackd also lists them at the
      entry's top level (the seed's ``return[0]/dirty-bitmaps``) with ``status``. For bitbackd
      the two lists must agree and ``status`` is returned (and checked by
      :meth:`expect_bitmap`); for QEMU, ``status`` and the top-level list must be absent.
    * **The copy-before-write filter** (:meth:`bitmap`): while a backup runs, QEMU 7.2's
      query-block entry shows its filter node (``drv`` ``copy-before-write``) with anonymous
      internal bitmaps, and the source's bitmaps are only in ``query-named-block-nodes``,
      on the node below the filter. bitbackd keeps describing the source node; a filter in
      its query-block is an error.
    * **What the process prints** (:meth:`io`): QEMU 7.2 prints ``Formatting '...'`` on its
      stdout when ``drive-backup`` creates a target; those lines are not qemu-io's output.
    * **The drain artefact** of QEMU's job start is folded by :func:`trace`.
    """

    # -- output of HMP qemu-io ------------------------------------------------------------
    def io(self, device: str, command: str, *, raw: bool = False) -> str:
        text = super().io(device, command, raw=raw)
        if self.backend == "qemu":
            text = "\n".join(line for line in text.splitlines()
                             if not line.startswith("Formatting '"))
        return text

    def io_output(self, device: str, command: str) -> str:
        """Everything HMP ``qemu-io DEVICE "COMMAND"`` answered, wherever the backend put
        it, as :meth:`io` shapes it: QEMU 7.2 prints qemu-io's output on its stdout but
        returns what the monitor itself refuses (a permission conflict, an unknown device)
        as the reply; bitbackd returns both in the reply and prints nothing."""
        reply = self.qemu_io(device, command).replace("\r\n", "\n")
        printed = self._new_stdout()
        if self.backend == "qemu":
            printed = "\n".join(line for line in printed.splitlines()
                                 if not line.startswith("Formatting '"))
            text = reply + printed
        else:
            assert printed == "", f"bitbackd printed {printed!r} for qemu-io {command!r}"
            text = reply
        return strip_timing(text)

    def skip_printed(self) -> str:
        """What the process printed since the last HMP ``qemu-io`` output was read, which
        :meth:`io` and :meth:`io_output` will then not see: messages a QMP command made it
        print (QEMU's ``Formatting ...`` for a target drive-backup creates, a flush that
        failed when a node was deleted)."""
        return self._new_stdout()

    def write(self, device: str, patterns: Iterable[tuple[str, str, str]], *,
              flush: bool = True) -> None:
        """Seed-style guest writes through HMP ``qemu-io``, each checked, then a flush."""
        for pattern, offset, length in patterns:
            out = self.io(device, f"write -P{pattern} {offset} {length}")
            expect = f"wrote {parse_size(length)}/{parse_size(length)} bytes at offset " \
                     f"{parse_size(offset)}"
            assert out == expect, f"{self.backend}: write {offset} {length}: {out!r}"
        if flush:
            assert self.io(device, "flush") == "", self.backend

    # -- bitmaps ----------------------------------------------------------------------------
    def _entry(self, device: str) -> dict[str, Any] | None:
        for entry in self.ok("query-block"):
            inserted = entry.get("inserted", {})
            if device in (entry["device"], inserted.get("node-name")):
                return dict(entry)
        return None

    def _listed(self, device: str) -> list[dict[str, Any]]:
        """The device's (or node's) bitmaps, named ones only, in the reply's order."""
        entry = self._entry(device)
        nodes = None
        if entry is None:  # a node without a device (blockdev-add, no device_add yet)
            nodes = self.ok("query-named-block-nodes")
            info = next((n for n in nodes if n["node-name"] == device), None)
            assert info is not None, f"{self.backend}: no device or node {device}"
            listed = list(info.get("dirty-bitmaps", []))
        else:
            inserted = entry["inserted"]
            listed = list(inserted.get("dirty-bitmaps", []))
            if self.backend == "bitback":
                assert inserted["drv"] != "copy-before-write", entry
                top = list(entry.get("dirty-bitmaps", []))
                assert ("dirty-bitmaps" in entry) == bool(top), entry
                assert top == listed, (top, listed)
            else:
                assert "dirty-bitmaps" not in entry, entry
                if inserted["drv"] == "copy-before-write":
                    # The source is the filter's child (shown as its backing image).
                    child = inserted["image"]["backing-image"]
                    nodes = self.ok("query-named-block-nodes")
                    below = [n for n in nodes if n["drv"] == child["format"]
                             and n["file"] == child["filename"]]
                    assert len(below) == 1, below
                    listed = list(below[0].get("dirty-bitmaps", []))
        if self.backend == "qemu":
            assert all("status" not in bm for bm in listed), listed
        return [dict(bm) for bm in listed if "name" in bm]

    def bitmap(self, device: str, name: str) -> dict[str, Any]:
        """A named bitmap's BlockDirtyInfo: QEMU 7.2's members, plus the seed-era ``status``
        on bitbackd only."""
        found = [bm for bm in self._listed(device) if bm["name"] == name]
        assert len(found) == 1, f"{self.backend}: bitmap {name} on {device}: {found}"
        return found[0]

    def count(self, device: str, name: str) -> int:
        return int(self.bitmap(device, name)["count"])

    def sha256(self, node: str, name: str) -> str:
        reply = self.ok("x-debug-block-dirty-bitmap-sha256", node=node, name=name)
        return str(reply["sha256"])

    def expect_bitmap(self, device: str, name: str, *, count: int, granularity: int = 65536,
                      busy: bool = False, recording: bool = True, status: str = "active"
                      ) -> None:
        """Assert a bitmap's fields; ``status`` (seed era, spec 5.4) is checked on bitbackd
        only, QEMU 7.2 no longer has it."""
        bm = self.bitmap(device, name)
        want = {"name": name, "count": count, "granularity": granularity, "busy": busy,
                "recording": recording, "persistent": False}
        if self.backend == "bitback":
            want["status"] = status
        assert bm == want, f"{self.backend}: {bm} != {want}"

    # -- jobs -------------------------------------------------------------------------------
    def start_backup(self, **args: Any) -> None:
        """``drive-backup`` (``_`` -> ``-`` in argument names); the reply must be ``{}``."""
        reply = self.qmp("drive-backup", **args)
        assert reply == {"return": {}}, f"{self.backend}: drive-backup {args}: {reply}"

    def wait_jobs(self, *job_ids: str, timeout: float = JOB_TIMEOUT) -> list[Event]:
        """Every event up to the ``JOB_STATUS_CHANGE null`` of each of ``job_ids`` (events
        that came before the command's reply included); then nothing further may be pending
        and no job may be left (spec 4.3)."""
        assert self.monitor is not None
        pending = set(job_ids)
        events: list[Event] = []
        deadline = time.monotonic() + timeout
        while pending:
            left = deadline - time.monotonic()
            assert left > 0, f"{self.backend}: jobs {sorted(pending)} did not end: {events}"
            try:
                event = self.monitor.pull_event(wait=float(left))
            except TimeoutError:
                continue
            assert event is not None
            events.append(event)
            if event["event"] == "JOB_STATUS_CHANGE" and event["data"]["status"] == "null":
                pending.discard(event["data"]["id"])
        self.assert_quiet()
        return events

    def wait_event(self, name: str, status: str | None = None,
                   timeout: float = JOB_TIMEOUT) -> list[Event]:
        """Events up to and including the first ``name`` (with ``status``, for a
        JOB_STATUS_CHANGE)."""
        assert self.monitor is not None
        events: list[Event] = []

        def found() -> bool:
            if not events or events[-1]["event"] != name:
                return False
            return status is None or events[-1]["data"].get("status") == status

        deadline = time.monotonic() + timeout
        while not found():
            left = deadline - time.monotonic()
            assert left > 0, f"{self.backend}: no {name} {status or ''}: {events}"
            with contextlib.suppress(TimeoutError):
                event = self.monitor.pull_event(wait=float(left))
                assert event is not None
                events.append(event)
        return events

    def assert_quiet(self) -> None:
        """No event pending (none arrives within a short window) and no job left."""
        assert self.monitor is not None
        try:
            stray = self.monitor.pull_event(wait=QUIET_WINDOW)
        except TimeoutError:
            stray = None
        assert stray is None, f"{self.backend}: unexpected event {stray}"
        assert self.ok("query-block-jobs") == [], self.backend

    def backup(self, *, job_id: str | None = "drive0", **args: Any) -> dict[str, Any]:
        """A backup that must succeed: start it, wait for its end, check its events (the
        SUCCESS sequence, offset == len, type, speed) and return BLOCK_JOB_COMPLETED's
        data. ``job_id=None`` sends no job-id (the job is then named after the device)."""
        if job_id is not None:
            args["job_id"] = job_id
        self.start_backup(**args)
        name = job_id if job_id is not None else args["device"]
        events = self.wait_jobs(name)
        assert trace(events, name) == SUCCESS, f"{self.backend}: {events}"
        done = find(events, "BLOCK_JOB_COMPLETED", name)["data"]
        assert done["offset"] == done["len"], done
        assert (done["type"], done["speed"]) == ("backup", 0), done
        return dict(done)

    def full_backup(self, device: str, target: Path, **args: Any) -> dict[str, Any]:
        """A full backup into a new image (``mode=absolute-paths``) of the whole disk."""
        args.setdefault("job_id", device)
        return self.backup(device=device, sync="full", format="qcow2", target=str(target),
                           **args)

    # -- ending -----------------------------------------------------------------------------
    def quit(self) -> tuple[list[Event], int]:
        """``quit``: the events sent until the connection closed, and the exit status."""
        assert self.proc is not None and self.monitor is not None
        events = [*self.events()]
        reply = self.qmp("quit")
        assert reply == {"return": {}}, reply
        deadline = time.monotonic() + JOB_TIMEOUT
        while time.monotonic() < deadline:
            try:
                event = self.monitor.pull_event(wait=0.5)
            except Exception:  # a timeout, or the connection closing under us
                if self.proc.poll() is not None:
                    break
                continue
            if event is None:
                break
            events.append(event)
        with contextlib.suppress(Exception):  # the peer is gone; closing may say so
            self.monitor.close()
        self.proc.wait(timeout=JOB_TIMEOUT)
        self.exitcode = self.proc.returncode
        return events, self.exitcode


# ------------------------------------------------------------------------------ images


@dataclass(frozen=True)
class Tools:
    """The image tools a scenario checks with: real ``qemu-img`` and ``bitback-img``."""

    qemu_img: str
    bitback_img: list[str]

    def create(self, path: Path, size: str | int = "64M", **options: Any) -> Path:
        create([self.qemu_img], path, size, **options)
        return path

    def assert_same(self, a: Path, b: Path) -> None:
        """Guest-visible contents equal, by both ``qemu-img compare`` and
        ``bitback-img compare`` (exit 0)."""
        for tool in ([self.qemu_img], self.bitback_img):
            code, out = compare(tool, a, b)
            assert code == 0, f"{tool[-1]} compare {a.name} {b.name}: exit {code}\n{out}"

    def assert_clean(self, path: Path) -> None:
        check_image(self.qemu_img, path, allowed=(CHECK_CLEAN,))


@dataclass
class Chain:
    """One bitmap's backups of one drive, named as ``<drive>.<bitmap>.inc<N>.qcow2`` /
    ``ref<N>``: the anchor, then each incremental (its backing the previous one) with the
    reference full backup taken right after it (``None`` for a partial backup that stays in
    the chain, see :meth:`keep_partial`). A failed attempt dropped from the chain is kept
    aside: checked for consistency, never compared."""

    workdir: Path
    drive: str
    bitmap: str
    disk: Path
    anchor: Path
    backups: list[tuple[Path, Path | None]] = field(default_factory=list)
    failed: list[Path] = field(default_factory=list)
    _attempts: int = 0

    def top(self) -> Path:
        return self.backups[-1][0] if self.backups else self.anchor

    def new_target(self, tools: Tools, size: str | int = "64M", *, backed: bool = True,
                   **options: Any) -> Path:
        """Create the next incremental target on top of the chain (``mode=existing``)."""
        stem = f"{self.drive}.{self.bitmap}"
        n = self._attempts
        self._attempts += 1
        inc = self.workdir / f"{stem}.inc{n}.qcow2"
        backing = str(self.top()) if backed else None
        tools.create(inc, size, backing=backing, **options)
        self.backups.append((inc, self.workdir / f"{stem}.ref{n}.qcow2"))
        return inc

    def reference(self) -> Path:
        ref = self.backups[-1][1]
        assert ref is not None
        return ref

    def drop_failed(self) -> None:
        """The last attempt failed and its target leaves the chain."""
        inc, _ = self.backups.pop()
        self.failed.append(inc)

    def keep_partial(self) -> None:
        """The last attempt failed but what it copied counts as backed up (bitmap-mode
        ``always``): its target stays in the chain, without a reference."""
        inc, _ = self.backups.pop()
        self.backups.append((inc, None))

    def images(self) -> list[Path]:
        """Every backup target of this chain."""
        pairs = [p for pair in self.backups for p in pair if p is not None]
        return [self.anchor, *pairs, *self.failed]


def verify_chains(tools: Tools, chains: Sequence[Chain]) -> None:
    """With the process gone (spec 6.5): every incremental, read through its chain, equals
    its reference; the top of each chain equals the disk; every target and disk checks
    clean."""
    for chain in chains:
        assert chain.backups, "a chain without incrementals proves nothing"
        for inc, ref in chain.backups:
            if ref is not None:
                tools.assert_same(inc, ref)
        tools.assert_same(chain.top(), chain.disk)
    for path in {p for chain in chains for p in (*chain.images(), chain.disk)}:
        assert os.path.exists(path), path
        tools.assert_clean(path)
