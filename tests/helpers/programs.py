"""Random programs for the bitbackd-vs-QEMU differential test: what a program is, and how a
seed makes one.

A :class:`Program` is plain data: two nodes (:class:`NodeSpec`) and a list of steps, each a
frozen dataclass below. :func:`generate` builds one from ``random.Random(seed)`` alone, so a
seed names a program for good; :mod:`helpers.program_runner` runs it on both backends.

The two nodes of a program are of two kinds:

* ``drive``: a ``-drive if=none,id=dK?,node-name=nK?`` given on the command line. QEMU 7.2
  gives it a named BlockBackend, so HMP ``qemu-io dK?`` writes through the backend - and,
  while a backup runs, through its copy-before-write filter. This is the only way QEMU
  accepts guest writes during a backup.
* ``debug``: a qcow2 node over blkdebug over the file, added by ``blockdev-add`` at the start
  of the program (``blkdebug`` cannot be spelt in bitbackd's ``-drive``) and deleted at its
  end; its rules (:class:`Rule`) make some backups fail. HMP ``qemu-io nK?`` makes a
  temporary backend over the node, which QEMU 7.2 refuses while a backup holds the node
  (a permission conflict; bitbackd lets the write through). That divergence is a known
  bitbackd bug: the generator produces such writes only when ``known_divergences`` is set
  (``BITBACK_RANDOM_KNOWN=1``), see :data:`KNOWN_DIVERGENCES`.

QMP addresses a node by its node name: during a backup, QEMU 7.2 resolves a *device* name to
the filter node above the source (``Dirty bitmap 'x' not found``, an artefact of 7.2 the spec
tells us not to copy), so the device name is used only while no job holds the node.

Jobs: a backup started with ``speed=1`` (a *slow* backup) copies one chunk and then sleeps,
so guest writes, bitmap commands and job verbs can run against it; it ends with
:class:`JobVerb` ``finish`` (``block-job-set-speed 0``, then the job's end is awaited) or
``cancel``. Every other backup is awaited by its own step.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "KNOWN_DIVERGENCES",
    "Abort",
    "Backup",
    "BitmapCmd",
    "Flush",
    "Io",
    "JobVerb",
    "Merge",
    "NodeSpec",
    "Program",
    "Resize",
    "Rule",
    "Step",
    "Target",
    "Txn",
    "generate",
    "known_divergences_allowed",
]

KiB, MiB = 1 << 10, 1 << 20

# Divergences found by this test and not fixed yet (bitbackd bugs outside the code this test
# may change). The generator avoids them unless asked; each has a strict-xfail reproduction
# in tests/interop/test_random_programs.py.
KNOWN_DIVERGENCES = {
    "node-write-during-backup": (
        "HMP qemu-io by node name on the source of a running backup: QEMU 7.2 refuses "
        "(Permission conflict ... unshared by node '#blockN' (uses node 'n' as 'file' "
        "child)), bitbackd writes through copy-before-write"
    ),
    "resize-during-backup-text": (
        "block_resize of a running backup's source, refused by both with GenericError but "
        "other texts: by node name QEMU 7.2 says 'Permission conflict on node 'n': "
        "permissions 'resize' are both required by an unnamed block device (uses node 'n' "
        "as 'root' child) and unshared by node '#blockN' (uses node 'n' as 'file' child).' "
        "(sync=none: 'Device '(null)' is in use'), by device name 'Device 'd' is in use'; "
        "bitbackd says 'Node 'n' is busy: block device is in use by block job: backup' "
        "(sync=none: the permission conflict with the target as 'backing' parent)"
    ),
    "second-backup-of-a-source": (
        "drive-backup of a node that a running backup (or an earlier action of the same "
        "transaction) already reads, addressed by node name: QEMU 7.2 accepts it (its op "
        "blocker sits on the first job's filter node, not on the source) and runs both; "
        "bitbackd refuses 'Node 'd' is busy: block device is in use by block job: backup'. "
        "Steered around by addressing a drive by its device name (both refuse) and by "
        "leaving out such a backup of a blockdev-add node"
    ),
    "resize-with-failing-writes": (
        "block_resize of a qcow2 node whose writes fail (an armed blkdebug rule): QEMU 7.2 "
        "fails 'Failed to update the image size: Input/output error' even for the same size "
        "(bitbackd: {}), a grow fails but leaves the new size (bitbackd: 'Input/output "
        "error', old size), a shrink fails 'Failed to discard unused refblocks: ...'"
    ),
    "discard-during-backup": (
        "HMP qemu-io discard through the device of a discard=unmap drive that a backup "
        "reads: QEMU 7.2 drops it (its backup filter node is opened without "
        "BDRV_O_UNMAP: no bitmap marked, no data discarded), bitbackd discards and marks"
    ),
}


def known_divergences_allowed() -> bool:
    """``BITBACK_RANDOM_KNOWN=1``: do not steer around :data:`KNOWN_DIVERGENCES`."""
    return os.environ.get("BITBACK_RANDOM_KNOWN", "") not in ("", "0")

SIZES = (2 * MiB, 3 * MiB, 4 * MiB, 4 * MiB + 512, 5 * MiB + 40 * KiB + 512, 6 * MiB, 8 * MiB)
SOURCE_CLUSTERS = (64 * KiB,) * 6 + (4 * KiB, 32 * KiB, 128 * KiB)
GRANULARITIES = (None, None, 512, 4 * KiB, 32 * KiB, 64 * KiB, 64 * KiB, 128 * KiB, 1 * MiB)
BAD_GRANULARITIES = (0, 256, 64000, 1 << 32)
NAMES = ("b0", "b1", "b2", "b3")
# Who makes an image: real qemu-img, bitback's create in process, or (rarely: it costs a
# Python start-up) the bitback-img command.
CREATORS = ("qemu-img",) * 5 + ("bitback",) * 14 + ("bitback-img",)
PATTERNS = tuple(range(0x11, 0xFF, 7))


# ------------------------------------------------------------------------------ nodes


@dataclass(frozen=True)
class Rule:
    """One blkdebug rule: ``inject-error`` (``new_state`` None) or ``set-state``."""

    event: str
    state: int | None = None
    new_state: int | None = None
    errno: int | None = None
    sector: int | None = None
    once: bool | None = None
    immediately: bool | None = None
    iotype: str | None = None

    def qmp(self) -> dict[str, Any]:
        out: dict[str, Any] = {"event": self.event}
        for key, value in (("state", self.state), ("new_state", self.new_state),
                           ("errno", self.errno), ("sector", self.sector),
                           ("once", self.once), ("immediately", self.immediately),
                           ("iotype", self.iotype)):
            if value is not None:
                out[key] = value
        return out


@dataclass(frozen=True)
class NodeSpec:
    """One node of a program. ``name`` is its node name; a ``drive`` also has a device
    (backend) name, :attr:`device`, which HMP ``qemu-io`` uses."""

    name: str
    kind: str  # "drive" or "debug"
    size: int
    cluster: int  # the qcow2 cluster size of its image
    discard: bool  # discard=unmap (else QEMU's default, ignore)
    creator: str  # who makes the image: qemu-img, bitback (in process) or bitback-img
    rules: tuple[Rule, ...] = ()

    @property
    def device(self) -> str | None:
        return "d" + self.name[1:] if self.kind == "drive" else None

    @property
    def writes_may_fail(self) -> bool:
        """Once armed, may a rule fail writes and flushes too (not only the read right after
        its event)? A rule that is not ``once``, or waits for a request at its sector (maybe
        a metadata write), may; such a node may be impossible to flush, so to close
        cleanly."""
        return any(r.new_state is None and r.iotype is None and (not r.once or r.sector is not None)
                   for r in self.rules)

    @property
    def hmp(self) -> str:
        """The name HMP ``qemu-io`` is given."""
        return self.device or self.name

    def blockdev_add(self, path: str) -> dict[str, Any]:
        """``blockdev-add`` arguments of a ``debug`` node over the image at ``path``."""
        blkdebug: dict[str, Any] = {"driver": "blkdebug",
                                    "image": {"driver": "file", "filename": path}}
        injects = [r.qmp() for r in self.rules if r.new_state is None]
        states = [r.qmp() for r in self.rules if r.new_state is not None]
        if injects:
            blkdebug["inject-error"] = injects
        if states:
            blkdebug["set-state"] = states
        args: dict[str, Any] = {"node-name": self.name, "driver": "qcow2", "file": blkdebug}
        if self.discard:
            args["discard"] = "unmap"
        return args

    def drive_option(self, path: str) -> str:
        """The ``-drive`` option of a ``drive`` node (commas in the path doubled)."""
        opt = (f"if=none,id={self.device},node-name={self.name},format=qcow2,"
               f"file={path.replace(',', ',,')}")
        return opt + (",discard=unmap" if self.discard else "")


# ------------------------------------------------------------------------------ steps


@dataclass(frozen=True)
class Io:
    """HMP ``qemu-io``: ``write -P`` / ``write -z`` / ``write -z -u`` / ``discard``."""

    node: str
    op: str  # write, zero, zero-unmap, discard
    offset: int
    length: int
    pattern: int = 0x5A

    def command(self) -> str:
        verb = {"write": f"write -P 0x{self.pattern:02x}", "zero": "write -z",
                "zero-unmap": "write -z -u", "discard": "discard"}[self.op]
        return f"{verb} {self.offset} {self.length}"


@dataclass(frozen=True)
class Flush:
    """HMP ``qemu-io NODE "flush"`` (blkdebug's ``flush_to_disk`` event)."""

    node: str


@dataclass(frozen=True)
class BitmapCmd:
    """``block-dirty-bitmap-{add,remove,clear,enable,disable}``."""

    cmd: str
    node: str
    name: str
    granularity: int | None = None  # add only
    disabled: bool | None = None  # add only
    by_device: bool = False  # address a drive by its device name


@dataclass(frozen=True)
class Merge:
    """``block-dirty-bitmap-merge``; a source is ``(None, name)`` (a plain name, on the
    target's node) or ``(node, name)``."""

    node: str
    target: str
    sources: tuple[tuple[str | None, str], ...]


@dataclass(frozen=True)
class Resize:
    node: str
    size: int
    by_device: bool = False


@dataclass(frozen=True)
class Target:
    """Where a backup writes. ``new``: ``drive-backup`` creates it (``absolute-paths``);
    ``fresh``: an existing image without backing file; ``chain``: an existing image backed
    by the newest good backup of the node (a fresh one if there is none); ``wrong-size``: an
    existing image 1 MiB larger than the disk (refused)."""

    kind: str
    cluster: int = 64 * KiB
    creator: str = "bitback"


@dataclass(frozen=True)
class Backup:
    """``drive-backup`` (alone, or as a transaction action)."""

    job: str
    node: str
    sync: str  # full, incremental, bitmap, top, none
    target: Target
    bitmap: str | None = None
    mode: str | None = None  # bitmap-mode
    speed: int = 0  # 1: a slow backup, see the module docstring
    on_source_error: str | None = None
    by_device: bool = False


@dataclass(frozen=True)
class Abort:
    """The ``abort`` transaction action."""


Action = Backup | BitmapCmd | Merge | Abort


@dataclass(frozen=True)
class Txn:
    """``transaction``; ``grouped`` sets ``completion-mode`` (None: no properties)."""

    actions: tuple[Action, ...]
    grouped: bool | None = None


@dataclass(frozen=True)
class JobVerb:
    """``cancel``: block-job-cancel, then await the end; ``finish``: block-job-set-speed 0,
    then await the end; ``pause`` / ``resume``: block-job-pause / -resume."""

    verb: str
    job: str


Step = Io | Flush | BitmapCmd | Merge | Resize | Backup | Txn | JobVerb


@dataclass(frozen=True)
class Program:
    seed: int
    nodes: tuple[NodeSpec, ...]
    steps: tuple[Step, ...]

    def node(self, name: str) -> NodeSpec:
        return next(n for n in self.nodes if n.name == name)

    def with_steps(self, steps: list[Step] | tuple[Step, ...]) -> Program:
        return Program(self.seed, self.nodes, tuple(steps))


# ------------------------------------------------------------------------------ generating


@dataclass
class _Gen:
    """What the generator believes while it writes a program (outcomes are guessed: a
    backup may in fact fail, a name may in fact be taken; the runner finds out)."""

    rng: random.Random
    nodes: dict[str, NodeSpec]
    known: bool
    sizes: dict[str, int] = field(default_factory=dict)
    bitmaps: dict[str, dict[str, int]] = field(default_factory=dict)  # node -> name -> gran
    slow: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # job -> node, bm
    paused: set[str] = field(default_factory=set)
    jobs: int = 0

    def pick(self, options: dict[str, float]) -> str:
        keys = [k for k, w in options.items() if w > 0]
        return self.rng.choices(keys, [options[k] for k in keys])[0]

    def node(self) -> str:
        return self.rng.choice(list(self.nodes))

    def busy(self, node: str) -> bool:
        return any(n == node for n, _ in self.slow.values())

    def name(self, node: str) -> str:
        """Mostly a bitmap the node has, sometimes any name (it may not exist)."""
        have = list(self.bitmaps[node])
        if have and self.rng.random() < 0.85:
            return self.rng.choice(have)
        return self.rng.choice(NAMES)

    def by_device(self, node: str) -> bool:
        return (self.nodes[node].kind == "drive" and not self.busy(node)
                and self.rng.random() < 0.25)

    def job_id(self) -> str:
        self.jobs += 1
        return f"j{self.jobs}"


def _rules(rng: random.Random, cluster: int) -> tuple[Rule, ...]:
    """A blkdebug script that fails data reads: nothing; a rule for ``once`` (the data read
    right after its ``read_aio`` fails), maybe only after the first flush that follows a
    write, or only for a read covering one host sector; or one that fails every request
    for good once armed (writes too, on both backends whatever their metadata needs).

    Rules that could hit metadata I/O are not made: when qcow2 metadata is read or written
    differs by design (docs/architecture.md: bitback writes it back at flush and keeps its
    tables cached; QEMU also flushes refcounts when it allocates an L2 table, and reloads L2
    tables after a resize), so such a rule would fail other requests on either side. Sector
    rules are therefore given only to 64 KiB-cluster images, whose one L2 table sits at
    sector 512, at sectors of the data clusters after it; rules that fail everything, only
    to images with clusters of 64 KiB or more, where one L2 table and one refcount block
    cover the disk (so no metadata cluster is allocated once data was read).
    """
    shape = rng.choice(["none", "once", "once", "always", "sector", "after-flush"])
    errno = rng.choice([None, None, 5, 28])
    immediately = rng.choice([None, False, True])
    if (shape == "sector" and cluster != 64 * KiB) or (shape == "always" and cluster < 64 * KiB):
        shape = "once"
    if shape == "none":
        return ()
    if shape == "once":
        return (Rule("read_aio", errno=errno, once=True, immediately=immediately),)
    if shape == "always":
        return (Rule("read_aio", errno=errno, immediately=immediately),)
    if shape == "sector":
        sector = rng.choice([640, 768, 900, 1024, 1500, 2048, 4000])
        return (Rule("read_aio", errno=errno, sector=sector, once=True, iotype="read"),)
    return (Rule("flush_to_disk", state=1, new_state=2),
            Rule("read_aio", state=2, errno=errno, once=True))


def _nodes(rng: random.Random, index: int) -> tuple[NodeSpec, ...]:
    out = []
    for letter in "ab":
        kind = "drive" if rng.random() < 0.6 else "debug"
        cluster = rng.choice(SOURCE_CLUSTERS)
        out.append(NodeSpec(
            name=f"n{index}{letter}", kind=kind, size=rng.choice(SIZES), cluster=cluster,
            discard=rng.random() < 0.4, creator=rng.choice(CREATORS),
            rules=_rules(rng, cluster) if kind == "debug" else ()))
    return tuple(out)


def _range(g: _Gen, node: str) -> tuple[int, int]:
    """``(offset, length)``: aligned or not, near granule and cluster edges, at the end of
    the disk, sometimes across it."""
    rng, size = g.rng, g.sizes[node]
    shape = rng.choice(["clusters", "clusters", "small", "unaligned", "end", "large", "past"])
    unit = rng.choice([512, 4 * KiB, 64 * KiB, 128 * KiB])
    if shape == "clusters":
        return rng.randrange(0, max(1, size // unit)) * unit, unit * rng.randint(1, 6)
    if shape == "small":
        return rng.randrange(0, size // 512) * 512 + rng.choice([0, 1, 511]), rng.randint(1, 700)
    if shape == "unaligned":
        return rng.randrange(0, size), rng.randint(1, 200 * KiB)
    if shape == "end":
        length = rng.choice([1, 512, 4096, 65536, 70000, 300 * KiB])
        return max(0, size - length), min(size, length)
    if shape == "large":
        return rng.randrange(0, size // 2), rng.randint(512 * KiB, 2 * MiB + 4096)
    return max(0, size - rng.choice([0, 512, 4096])), rng.choice([512, 4096, 65536])


def _io(g: _Gen) -> Io | None:
    nodes = [n for n in g.nodes if g.known or not g.busy(n) or g.nodes[n].kind == "drive"]
    if not nodes:
        return None
    node = g.rng.choice(nodes)
    op = g.rng.choice(["write"] * 5 + ["zero", "zero-unmap", "discard"])
    offset, length = _range(g, node)
    return Io(node, op, offset, min(length, 4 * MiB), g.rng.choice(PATTERNS))


def _bitmap(g: _Gen) -> BitmapCmd | Merge:
    rng, node = g.rng, g.node()
    cmd = g.pick({"add": 4 if len(g.bitmaps[node]) < 3 else 1, "remove": 1, "clear": 1.5,
                  "enable": 1, "disable": 1, "merge": 2.5})
    if cmd == "merge":
        sources: list[tuple[str | None, str]] = []
        for _ in range(rng.choice([1, 1, 2, 3])):
            other = g.node() if rng.random() < 0.2 else node
            sources.append((None if other == node and rng.random() < 0.6 else other,
                            g.name(other)))
        return Merge(node, g.name(node), tuple(sources))
    if cmd == "add":
        name = rng.choice([n for n in NAMES if n not in g.bitmaps[node]] or list(NAMES))
        if rng.random() < 0.08:
            name = g.name(node)  # maybe taken
        gran = rng.choice(GRANULARITIES)
        if rng.random() < 0.05:
            gran = rng.choice(BAD_GRANULARITIES)
        disabled = rng.choice([None, None, None, False, True])
        if gran is None or gran in GRANULARITIES:
            g.bitmaps[node].setdefault(name, gran or 64 * KiB)
        return BitmapCmd("add", node, name, gran, disabled, g.by_device(node))
    name = g.name(node)
    if cmd == "remove":
        g.bitmaps[node].pop(name, None)
    return BitmapCmd(cmd, node, name, by_device=g.by_device(node))


def _resize(g: _Gen) -> Resize:
    rng, node = g.rng, g.node()
    size = g.sizes[node]
    new = rng.choice([size + rng.choice([-1, 1]) * rng.choice([512, 64 * KiB, 1 * MiB]),
                      rng.randrange(1 * MiB, 9 * MiB, 512), rng.choice(SIZES)])
    if rng.random() < 0.05:
        new = size + 100  # not a multiple of 512: refused
    new = max(512 * KiB, new)
    if not g.busy(node) and new % 512 == 0:
        g.sizes[node] = new
    return Resize(node, new, g.by_device(node))


def _backup(g: _Gen, *, slow_ok: bool, in_txn: bool = False) -> Backup:
    rng = g.rng
    idle = [n for n in g.nodes if not g.busy(n)]
    node = rng.choice(idle) if idle and rng.random() < 0.9 else g.node()
    sync = g.pick({"full": 3, "incremental": 4, "bitmap": 3, "top": 0.4,
                   "none": 0.5 if slow_ok else 0})
    bitmap = mode = None
    if sync in ("incremental", "bitmap") or (sync == "full" and rng.random() < 0.25):
        bitmap = g.name(node)
        if sync == "bitmap" or sync == "full":
            mode = rng.choice(["on-success", "on-success", "always", "never"])
        elif rng.random() < 0.1:
            mode = "on-success"
    if rng.random() < 0.04:  # an argument error: no bitmap, or a mode incremental refuses
        bitmap, mode = (None, None) if rng.random() < 0.5 else (bitmap or "b0", "never")
    kind = g.pick({"new": 2, "fresh": 1, "chain": 5 if sync != "full" else 1,
                   "wrong-size": 0.15})
    target = Target(kind, rng.choice([64 * KiB] * 4 + [128 * KiB, 32 * KiB]),
                    rng.choice(CREATORS))
    speed = 1 if slow_ok and (sync == "none" or rng.random() < 0.35) else 0
    policy = None
    rules = g.nodes[node].rules
    once = bool(rules) and all(r.once or r.new_state is not None for r in rules)
    if once and rng.random() < 0.4:  # stop (resumed by the runner) or ignore: retried
        policy = rng.choice(["stop", "ignore", "enospc"])
    job = g.job_id()
    step = Backup(job, node, sync, target, bitmap, mode, speed, policy,
                  g.by_device(node) and not in_txn)
    if speed and not in_txn:
        g.slow[job] = (node, bitmap)
    return step


def _txn(g: _Gen) -> Txn:
    rng = g.rng
    actions: list[Action] = []
    for _ in range(rng.randint(1, 4)):
        kind = g.pick({"backup": 3, "bitmap": 3, "abort": 0.2})
        if kind == "backup":
            actions.append(_backup(g, slow_ok=False, in_txn=True))
        elif kind == "bitmap":
            actions.append(_bitmap(g))
        else:
            actions.append(Abort())
    grouped = rng.choice([None, None, False, True, True])
    return Txn(tuple(actions), grouped)


def _job_verb(g: _Gen) -> JobVerb:
    rng = g.rng
    job = rng.choice(list(g.slow))
    verb = g.pick({"finish": 3, "cancel": 2, "pause": 0 if job in g.paused else 0.7,
                   "resume": 1.5 if job in g.paused else 0.1})
    if verb in ("finish", "cancel"):
        del g.slow[job]
        g.paused.discard(job)
    elif verb == "pause":
        g.paused.add(job)
    else:
        g.paused.discard(job)
    if rng.random() < 0.03:
        job = "nosuchjob"
    return JobVerb(verb, job)


def _step(g: _Gen) -> Step | None:
    live = bool(g.slow)
    kind = g.pick({
        "io": 40 if live else 28, "flush": 3, "bitmap": 12 if live else 16, "resize": 3,
        "backup": 4 if live else 14, "txn": 2 if live else 6, "verb": 18 if live else 0.3,
    })
    if kind == "io":
        return _io(g)
    if kind == "flush":
        node = g.node()
        return Flush(node) if g.known or not g.busy(node) or g.nodes[node].kind == "drive" \
            else None
    if kind == "bitmap":
        return _bitmap(g)
    if kind == "resize":
        return _resize(g)
    if kind == "backup":
        return _backup(g, slow_ok=len(g.slow) < 2)
    if kind == "txn":
        return _txn(g)
    if not g.slow:
        return JobVerb(g.rng.choice(["cancel", "finish"]), "nosuchjob")
    return _job_verb(g)


def generate(seed: int, *, index: int = 0, known_divergences: bool = False) -> Program:
    """The program of ``seed``; its nodes are named ``n<index>a`` and ``n<index>b``."""
    rng = random.Random(seed)
    nodes = _nodes(rng, index)
    g = _Gen(rng, {n.name: n for n in nodes}, known_divergences)
    g.sizes = {n.name: n.size for n in nodes}
    g.bitmaps = {n.name: {} for n in nodes}
    steps: list[Step] = []
    # Most programs start like a backup plan: a bitmap, some data, an anchor.
    for _ in range(rng.choice([0, 1, 1, 2])):
        steps.append(_bitmap(g))
    for _ in range(rng.randint(0, 3)):
        io = _io(g)
        if io is not None:
            steps.append(io)
    if rng.random() < 0.5:
        node = g.node()
        steps.append(Backup(g.job_id(), node, "full", Target("new")))
    length = rng.randint(8, 30)
    while len(steps) < length:
        step = _step(g)
        if step is not None:
            steps.append(step)
    return Program(seed, nodes, tuple(steps))
