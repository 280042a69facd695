"""Bad input gets a clear error and loses nothing: hostile images and bad command lines.

The requirement: malformed images, command lines and sizes produce a one-line error naming
the problem (tools: ``PROG: message`` and a documented exit code), never a traceback, a hang,
a huge allocation or a half-written image. Each case here checks, as it applies:

* the exit code is the documented non-zero one (1 for qemu-img and qemu-io failures; never
  70, which :mod:`bitback.tools.common` reserves for internal errors, i.e. bugs);
* the error is exactly one line, prefixed ``bitback-img:`` / ``bitback-io:`` where QEMU's is
  prefixed ``qemu-img:`` / ``qemu-io:``, and matches a key phrase naming the problem;
* no ``Traceback`` anywhere in the output; every process runs under a timeout;
* after a refused write, every file of the case is byte-identical to before (the only change
  tolerated is QEMU's own reaction to corruption: the corrupt bit set in the header);
* the library layer agrees: ``open_image`` and reads/writes through the driver raise only
  :class:`~bitback.errors.BitbackError` subclasses. Those probes run in a subprocess under a
  1 GiB address-space limit, so a huge allocation fails the test instead of the test run.

Images are made by bitback's ``create_qcow2`` and damaged by :mod:`helpers.hostile`.
Command-line cases run the same arguments through real qemu-img / qemu-io (twin directories,
same relative names) and compare exit status and message shape; both outputs appear in every
assertion message. Tests that need QEMU take the ``qemu_img`` / ``qemu_io`` fixtures (skipped
when QEMU is missing, failed when ``CI=true``).
"""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import hostile as h
from helpers.procs import describe, run

TIMEOUT = 20.0
MEMORY_LIMIT = 1 << 30
EXIT_INTERNAL = 70
IMAGE = "img.qcow2"
READ = "read 0 64k"
WRITE = "write -P 0x41 0 64k"

# ------------------------------------------------------------------------------------------
# Cases: hostile images that must not open at all
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Refused:
    """An image that ``open_image`` must refuse, read-only and read-write alike.

    ``build`` damages a fresh image (or, when ``fresh`` is false, makes the files itself);
    ``phrase`` is a case-insensitive regex the one-line error must match. ``chain``: the
    damage is in the backing chain, which ``info`` opens only with ``--backing-chain`` (as
    qemu-img, whose plain ``info`` opens the image without its backing files).
    """

    id: str
    build: h.Builder
    phrase: str
    fresh: bool = True
    chain: bool = False


def field(name: str, value: int | bytes) -> h.Builder:
    def build(path: Path) -> None:
        h.set_field(path, name, value)

    return build


def incompat(bits: int, *then: tuple[str, int]) -> h.Builder:
    def build(path: Path) -> None:
        h.set_bits(path, "incompatible_features", bits)
        for name, value in then:
            h.set_field(path, name, value)

    return build


def truncated(length: int) -> h.Builder:
    def build(path: Path) -> None:
        h.truncate_to(path, length)

    return build


def directory(path: Path) -> None:
    path.mkdir()


def missing(path: Path) -> None:
    """Nothing to build: the image does not exist."""


def l1_over_refcount_table(path: Path) -> None:
    h.set_field(path, "l1_table_offset", h.read_layout(path).refcount_table_offset)


REFCOUNT_TABLE = r"(refcount|reference count) table"

REFUSED = [
    Refused("bad-magic", field("magic", b"QFI\x00"), r"not in qcow2 format"),
    Refused("version-1", field("version", 1), r"version 1"),
    Refused("version-4", field("version", 4), r"version 4"),
    Refused("cluster-bits-8", field("cluster_bits", 8), r"cluster size"),
    Refused("cluster-bits-22", field("cluster_bits", 22), r"cluster size"),
    Refused("cluster-bits-63", field("cluster_bits", 63), r"cluster size"),
    Refused("l1-size-2^31", field("l1_size", 1 << 31), r"L1 table.*too large"),
    Refused("l1-size-at-limit-past-eof", field("l1_size", 4 << 20), r"L1 table"),
    Refused("l1-too-small-for-size", field("size", 8 << 30), r"L1 table.*too small"),
    Refused("l1-offset-unaligned", field("l1_table_offset", 0x30200), r"L1 table offset"),
    Refused("l1-offset-zero", field("l1_table_offset", 0), r"L1 table"),
    Refused("l1-offset-past-eof", field("l1_table_offset", 1 << 40), r"L1 table"),
    Refused("l1-overlaps-refcount-table", l1_over_refcount_table, r"overlap"),
    Refused(
        "refcount-table-offset-unaligned",
        field("refcount_table_offset", 0x10200),
        REFCOUNT_TABLE + r" offset",
    ),
    Refused(
        "refcount-table-offset-zero",
        field("refcount_table_offset", 0),
        REFCOUNT_TABLE,
    ),
    Refused(
        "refcount-table-offset-past-eof", field("refcount_table_offset", 1 << 40), REFCOUNT_TABLE
    ),
    Refused(
        "refcount-table-clusters-huge",
        field("refcount_table_clusters", 0xFFFF_FFFF),
        REFCOUNT_TABLE + r" too large",
    ),
    Refused("refcount-order-7", field("refcount_order", 7), r"(refcount|reference count).*width"),
    Refused("unknown-incompatible-bit", incompat(1 << 20), r"incompatible feature"),
    Refused("encryption", field("crypt_method", 1), r"encryption"),
    Refused("external-data-file", incompat(h.INCOMPAT_DATA_FILE), r"data file"),
    Refused("extended-l2", incompat(h.INCOMPAT_EXTL2), r"extended L2"),
    Refused(
        "invalid-compression-type",
        incompat(h.INCOMPAT_COMPRESSION, ("compression_type", 7)),
        r"compression type",
    ),
    Refused("header-length-not-multiple-of-8", field("header_length", 106), r"header length"),
    Refused("header-length-below-104", field("header_length", 96), r"header.*(length|short)"),
    Refused("extension-past-cluster", h.extension_past_cluster, r"header extension"),
    Refused("backing-name-too-long", h.backing_name_too_long, r"backing file name too long"),
    Refused("backing-offset-past-cluster", h.backing_offset_past_cluster, r"backing file offset"),
    Refused("backing-loop-a-b-a", h.backing_loop, r"loop", fresh=False, chain=True),
    Refused("backing-self-loop", h.self_loop, r"loop", fresh=False, chain=True),
    Refused(
        "chain-of-300",
        h.chain(300),
        r"(deeper|depth|too deep).*256|256.*(deep|depth)",
        fresh=False,
        chain=True,
    ),
    Refused("virtual-size-2^62", field("size", 1 << 62), r"too (big|large)"),
    Refused("truncated-50-bytes", truncated(50), r"too short|truncated|end of (the )?file"),
    Refused("empty-file", truncated(0), r"not in qcow2 format"),
    Refused("directory", directory, r"is a directory|regular file", fresh=False),
    Refused("missing-file", missing, r"no such file", fresh=False),
]
REFUSED_IDS = [c.id for c in REFUSED]

# Cases that QEMU 7.2 also refuses to open (used to check that the builders damage what they
# claim). QEMU opens the rest: it trusts offsets it has not yet needed (the L1 and refcount
# tables are checked lazily), does not limit chain depth, implements extended L2 entries, and
# accepts a header_length that is not a multiple of 8.
QEMU_REFUSES = set(REFUSED_IDS) - {
    "l1-offset-zero",
    "l1-offset-past-eof",
    "l1-overlaps-refcount-table",
    "refcount-table-offset-zero",
    "refcount-table-offset-past-eof",
    "extended-l2",
    "header-length-not-multiple-of-8",
    "backing-loop-a-b-a",
    "backing-self-loop",
    "chain-of-300",
    "l1-size-at-limit-past-eof",
}

# ------------------------------------------------------------------------------------------
# Cases: images that open, but where some reads or writes must fail cleanly
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Damaged:
    """An image that opens; ``read_phrase`` / ``write_phrase`` say which requests must fail.

    ``None`` for a read: the read may succeed or fail, but cleanly. ``None`` for a write: the
    write must succeed, and ``write_keeps`` names the byte ranges it must leave intact.
    """

    id: str
    build: h.Builder
    read_phrase: str | None
    write_phrase: str | None
    write_length: int = 65536
    write_keeps: tuple[tuple[int, int], ...] = ()


def _past_eof(lay: h.Layout, l2: int, data: int) -> int:
    return 1 << 40


def _refcount_table(lay: h.Layout, l2: int, data: int) -> int:
    return lay.refcount_table_offset


def _l1_table(lay: h.Layout, l2: int, data: int) -> int:
    return lay.l1_table_offset


def _own_l2_table(lay: h.Layout, l2: int, data: int) -> int:
    return l2


def _header(lay: h.Layout, l2: int, data: int) -> int:
    return 0


def l1_entry(value: int) -> h.Builder:
    def build(path: Path) -> None:
        h.l1_entry(path, 0, value)

    return build


def refblock_past_eof(path: Path) -> None:
    h.refcount_table_entry(path, 0, 1 << 40)


DAMAGED = [
    Damaged("l1-entry-past-eof", l1_entry((1 << 40) | h.COPIED), r"L2 table", r"L2 table"),
    Damaged(
        "l1-entry-unaligned",
        l1_entry(0x30200 | h.COPIED),
        r"L1 entry|L2 table",
        r"L1 entry|L2 table",
    ),
    Damaged("l2-entry-past-eof", h.data_entry_to(_past_eof), None, r"past the end"),
    Damaged(
        "l2-entry-at-refcount-table", h.data_entry_to(_refcount_table), None, r"overlap|metadata"
    ),
    Damaged("l2-entry-at-l1-table", h.data_entry_to(_l1_table), None, r"overlap|metadata"),
    Damaged("l2-entry-at-own-l2-table", h.data_entry_to(_own_l2_table), None, r"overlap|metadata"),
    # Host offset 0 means "unallocated" whatever the COPIED bit says: the write must allocate
    # a new cluster, never write in place over the header.
    Damaged(
        "l2-entry-copied-offset-0", h.data_entry_to(_header), None, None, write_keeps=((0, 65536),)
    ),
    Damaged("compressed-garbage", h.compressed_garbage, r"compress", None),
    Damaged(
        "compressed-garbage-partial-write",
        h.compressed_garbage,
        r"compress",
        r"compress",
        write_length=512,
    ),
    Damaged("refcount-block-past-eof", refblock_past_eof, None, r"refcount block"),
]
DAMAGED_IDS = [c.id for c in DAMAGED]

# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------

Result = subprocess.CompletedProcess[str]


def info_chain(case: Refused) -> list[str]:
    return ["--backing-chain"] if case.chain else []


def make_case(tmp_path: Path, build: h.Builder, *, fresh: bool = True) -> Path:
    """A directory of its own holding the case's image (and any siblings); the image path."""
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    path = case_dir / IMAGE
    if fresh:
        h.fresh_qcow2(path)
    build(path)
    return path


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every regular file of a case directory, by name (case images are small)."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def _clear_corrupt_bit(data: bytes) -> bytes:
    if len(data) < 80 or data[:4] != b"QFI\xfb":
        return data
    return data[:79] + bytes([data[79] & ~h.INCOMPAT_CORRUPT]) + data[80:]


def assert_unchanged(before: dict[str, bytes], after: dict[str, bytes], context: str) -> None:
    """Files are as before; a newly set corrupt bit (QEMU's reaction) is the one exception."""
    assert sorted(after) == sorted(before), f"files appeared or vanished\n{context}"
    for name, old in before.items():
        new = after[name]
        if new == old:
            continue
        first = next(
            (i for i, (a, b) in enumerate(zip(old, new, strict=False)) if a != b),
            min(len(old), len(new)),
        )
        assert _clear_corrupt_bit(new) == _clear_corrupt_bit(old), (
            f"{name} changed after a refused request ({len(old)} -> {len(new)} bytes, "
            f"first difference at byte {first})\n{context}"
        )


def show(res: Result) -> str:
    return describe(res.args, res.returncode, res.stdout, res.stderr)


def lines_of(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def assert_no_crash(res: Result, context: str = "") -> None:
    out = res.stdout + res.stderr
    assert "Traceback" not in out, f"traceback in the output\n{show(res)}{context}"
    assert res.returncode != EXIT_INTERNAL, f"internal error (exit 70)\n{show(res)}{context}"
    assert res.returncode >= 0, f"killed by signal {-res.returncode}\n{show(res)}{context}"


def assert_one_line_error(res: Result, prog: str, phrase: str, *, code: int = 1) -> str:
    """Exit ``code``, exactly one stderr line ``PROG: ...`` matching ``phrase``; the line."""
    assert_no_crash(res)
    assert res.returncode == code, f"expected exit code {code}\n{show(res)}"
    lines = res.stderr.rstrip("\n").split("\n")
    assert len(lines) == 1 and lines[0].strip(), f"expected exactly one line on stderr\n{show(res)}"
    assert lines[0].startswith(f"{prog}: "), f"error line lacks '{prog}: '\n{show(res)}"
    assert re.search(phrase, lines[0], re.IGNORECASE), (
        f"error line does not name the problem (/{phrase}/i)\n{show(res)}"
    )
    return lines[0]


def assert_request_failed(res: Result, phrase: str) -> None:
    """A failed io request: exit 1, the problem named (stdout keeps qemu-io's ``read failed:
    <strerror>`` line; the naming line may be on stderr), at most one line on stderr."""
    assert_no_crash(res)
    assert res.returncode == 1, f"expected the request to fail with exit code 1\n{show(res)}"
    assert len(lines_of(res.stderr)) <= 1, f"more than one line on stderr\n{show(res)}"
    assert re.search(phrase, res.stdout + res.stderr, re.IGNORECASE), (
        f"the failure does not name the problem (/{phrase}/i)\n{show(res)}"
    )


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_limited(argv: list[str], *, cwd: Path | None = None) -> Result:
    """Run under a 1 GiB address-space limit and the usual timeout."""
    try:
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            cwd=cwd,
            check=False,
            stdin=subprocess.DEVNULL,
            preexec_fn=_limit_memory,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"ran longer than {TIMEOUT:g} s\n{describe(argv, None, exc.stdout, exc.stderr)}"
        )


# The library probe: opens an image with open_image, optionally reads or writes, and prints
# one JSON line saying what was raised. Run under the memory limit, in a fresh interpreter.
_PROBE = r"""
import json, sys
from bitback.errors import BitbackError
from bitback.block.open import open_image
path, fmt, mode, op, arg = sys.argv[1:6]
outcome = {"result": "ok", "stage": op}

def raised(stage, exc):
    global outcome
    if outcome["result"] == "ok":
        outcome = {"result": "raised", "stage": stage, "bitback": isinstance(exc, BitbackError),
                   "type": type(exc).__name__, "message": str(exc)}

try:
    node = open_image(path, fmt, read_only=(mode == "ro"))
except BaseException as exc:
    raised("open", exc)
else:
    try:
        if op == "read":
            outcome["data"] = node.pread(0, int(arg))[:16].hex()
        elif op == "write":
            node.pwrite(0, b"\x41" * int(arg))
            node.flush()
    except BaseException as exc:
        raised(op, exc)
    try:
        node.close()
    except BaseException as exc:
        raised("close", exc)
print(json.dumps(outcome))
"""


@dataclass(frozen=True, slots=True)
class Probe:
    result: str
    stage: str
    bitback: bool = False
    type: str = ""
    message: str = ""
    data: str = ""


def probe(path: Path, mode: str, op: str = "open", arg: int = 65536) -> Probe:
    argv = [sys.executable, "-c", _PROBE, str(path), "qcow2", mode, op, str(arg)]
    res = run_limited(argv)
    assert res.returncode == 0 and res.stdout.strip(), f"the probe itself failed\n{show(res)}"
    record = json.loads(res.stdout.strip().splitlines()[-1])
    return Probe(**record)


def assert_bitback_error(p: Probe, phrase: str, what: str) -> None:
    assert p.result == "raised", f"{what}: expected a BitbackError, got success ({p})"
    assert p.bitback, f"{what}: raised {p.type}, not a BitbackError: {p.message}"
    assert "\n" not in p.message.strip(), f"{what}: multi-line message {p.message!r}"
    assert re.search(phrase, p.message, re.IGNORECASE), (
        f"{what}: message does not name the problem (/{phrase}/i): {p.type}: {p.message}"
    )


# ------------------------------------------------------------------------------------------
# Refused images
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", REFUSED, ids=REFUSED_IDS)
@pytest.mark.parametrize("mode", ["ro", "rw"])
def test_library_refuses_to_open(case: Refused, mode: str, tmp_path: Path) -> None:
    path = make_case(tmp_path, case.build, fresh=case.fresh)
    before = snapshot(path.parent)
    assert_bitback_error(probe(path, mode), case.phrase, f"open_image({mode}) of {case.id}")
    assert_unchanged(before, snapshot(path.parent), f"open_image({mode}) of {case.id}")


@pytest.mark.parametrize("case", REFUSED, ids=REFUSED_IDS)
def test_io_refuses_to_open(case: Refused, tmp_path: Path, bitback_io: list[str]) -> None:
    path = make_case(tmp_path, case.build, fresh=case.fresh)
    before = snapshot(path.parent)
    res = run([*bitback_io, "-f", "qcow2", "-c", READ, path], timeout=TIMEOUT)
    line = assert_one_line_error(res, "bitback-io", case.phrase)
    assert "can't open device" in line, show(res)
    res = run([*bitback_io, "-f", "qcow2", "-c", WRITE, path], timeout=TIMEOUT)
    assert_one_line_error(res, "bitback-io", case.phrase)
    assert_unchanged(before, snapshot(path.parent), show(res))


@pytest.mark.parametrize("case", REFUSED, ids=REFUSED_IDS)
@pytest.mark.parametrize("command", ["info", "check", "map", "convert"])
def test_img_refuses_to_open(
    case: Refused, command: str, tmp_path: Path, bitback_img: list[str]
) -> None:
    path = make_case(tmp_path, case.build, fresh=case.fresh)
    before = snapshot(path.parent)
    target = tmp_path / "converted.qcow2"
    commands: dict[str, list[str | Path]] = {
        "info": ["info", "-f", "qcow2", *info_chain(case), path],
        "check": ["check", "-f", "qcow2", path],
        "map": ["map", "-f", "qcow2", "--output=json", path],
        "convert": ["convert", "-f", "qcow2", "-O", "qcow2", path, target],
    }
    res = run([*bitback_img, *commands[command]], timeout=TIMEOUT)
    if command == "check" and res.returncode == 2:
        # Reporting the damage as corruption (qemu-img check's exit 2) is also documented.
        assert_no_crash(res)
        assert res.stdout.strip() or res.stderr.strip(), show(res)
    else:
        assert_one_line_error(res, "bitback-img", case.phrase)
    assert not target.exists(), f"convert left a half-written target\n{show(res)}"
    assert_unchanged(before, snapshot(path.parent), show(res))


@pytest.mark.qemu
@pytest.mark.parametrize(
    "case", [c for c in REFUSED if c.id in QEMU_REFUSES], ids=lambda c: str(c.id)
)
def test_qemu_refuses_the_same_images(case: Refused, tmp_path: Path, qemu_img: str) -> None:
    """The builders damage what they claim: QEMU refuses these images too.

    ``check`` rather than ``info``: info opens an encrypted image without its key, and an
    image with an external data file without the data file.
    """
    path = make_case(tmp_path, case.build, fresh=case.fresh)
    res = run([qemu_img, "check", "-f", "qcow2", path], timeout=TIMEOUT)
    assert res.returncode == 1 and res.stderr.startswith("qemu-img: Could not open"), show(res)


# ------------------------------------------------------------------------------------------
# Images that open but fail some requests
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", DAMAGED, ids=DAMAGED_IDS)
def test_library_damaged_requests(case: Damaged, tmp_path: Path) -> None:
    path = make_case(tmp_path, case.build)
    before = snapshot(path.parent)
    p = probe(path, "ro", "read")
    if case.read_phrase is not None:
        assert_bitback_error(p, case.read_phrase, f"read of {case.id}")
    else:
        assert p.result == "ok" or p.bitback, f"read of {case.id}: {p}"
    assert_unchanged(before, snapshot(path.parent), f"read-only probe of {case.id}")

    p = probe(path, "rw", "write", case.write_length)
    if case.write_phrase is not None:
        assert_bitback_error(p, case.write_phrase, f"write to {case.id}")
        assert_unchanged(before, snapshot(path.parent), f"refused write to {case.id}: {p}")
    else:
        assert p.result == "ok", f"write to {case.id} should succeed: {p}"
        after = path.read_bytes()
        for lo, hi in case.write_keeps:
            assert after[lo:hi] == before[IMAGE][lo:hi], f"{case.id}: bytes {lo}..{hi} changed"


@pytest.mark.parametrize("case", DAMAGED, ids=DAMAGED_IDS)
def test_io_damaged_requests(case: Damaged, tmp_path: Path, bitback_io: list[str]) -> None:
    path = make_case(tmp_path, case.build)
    before = snapshot(path.parent)
    res = run([*bitback_io, "-f", "qcow2", "-r", "-c", READ, path], timeout=TIMEOUT)
    if case.read_phrase is not None:
        assert_request_failed(res, case.read_phrase)
    else:
        assert_no_crash(res)
        assert res.returncode in (0, 1), show(res)
    write = f"write -P 0x41 0 {case.write_length}"
    res = run([*bitback_io, "-f", "qcow2", "-c", write, path], timeout=TIMEOUT)
    if case.write_phrase is not None:
        assert_request_failed(res, case.write_phrase)
        assert_unchanged(before, snapshot(path.parent), show(res))
    else:
        assert_no_crash(res)
        assert res.returncode == 0, show(res)
        after = path.read_bytes()
        for lo, hi in case.write_keeps:
            assert after[lo:hi] == before[IMAGE][lo:hi], f"bytes {lo}..{hi} changed\n{show(res)}"


@pytest.mark.qemu
@pytest.mark.parametrize("case", DAMAGED, ids=DAMAGED_IDS)
def test_img_check_damaged_like_qemu(
    case: Damaged, tmp_path: Path, bitback_img: list[str], qemu_img: str
) -> None:
    """``check`` sees the damage as qemu-img check does (same exit code: 0, 2 or 3)."""
    path = make_case(tmp_path, case.build)
    before = snapshot(path.parent)
    ref = run([qemu_img, "check", "-f", "qcow2", path], timeout=TIMEOUT)
    res = run([*bitback_img, "check", "-f", "qcow2", path], timeout=TIMEOUT)
    assert_no_crash(res)
    assert res.returncode == ref.returncode, f"{show(res)}\nqemu-img:\n{show(ref)}"
    assert_unchanged(before, snapshot(path.parent), show(res))


@pytest.mark.parametrize(
    "case",
    [c for c in DAMAGED if c.read_phrase is not None],
    ids=[c.id for c in DAMAGED if c.read_phrase is not None],
)
def test_img_convert_of_unreadable_image_fails_cleanly(
    case: Damaged, tmp_path: Path, bitback_img: list[str]
) -> None:
    path = make_case(tmp_path, case.build)
    before = snapshot(path.parent)
    target = tmp_path / "converted.raw"
    res = run([*bitback_img, "convert", "-f", "qcow2", "-O", "raw", path, target], timeout=TIMEOUT)
    assert_one_line_error(res, "bitback-img", case.read_phrase or "")
    assert_unchanged(before, snapshot(path.parent), show(res))


# ------------------------------------------------------------------------------------------
# The dirty and corrupt bits
# ------------------------------------------------------------------------------------------


def flagged(bit: int) -> h.Builder:
    def build(path: Path) -> None:
        h.add_data_cluster(path)  # guest cluster 0 reads 0xaa
        h.set_bits(path, "incompatible_features", bit)

    return build


def test_dirty_image_is_read_as_is_and_repaired_before_writing(
    tmp_path: Path, bitback_io: list[str], bitback_img: list[str], qemu_img: str
) -> None:
    """A dirty bit (lazy refcounts left unsynced) is no reason to refuse the image: reading
    leaves the file alone; a read-write open first rebuilds the refcounts, as QEMU does."""
    path = make_case(tmp_path, flagged(h.INCOMPAT_DIRTY))
    before = snapshot(path.parent)
    p = probe(path, "ro", "read")
    assert p.result == "ok" and p.data == "aa" * 16, f"read-only open of a dirty image: {p}"
    res = run([*bitback_io, "-f", "qcow2", "-r", "-c", "read -P 0xaa 0 64k", path], timeout=TIMEOUT)
    assert_no_crash(res)
    assert res.returncode == 0 and "read 65536/65536" in res.stdout, show(res)
    res_info = run([*bitback_img, "info", "-f", "qcow2", path], timeout=TIMEOUT)
    assert_no_crash(res_info)
    assert res_info.returncode == 0, show(res_info)
    assert_unchanged(before, snapshot(path.parent), show(res))

    res = run([*bitback_io, "-f", "qcow2", "-c", WRITE, "-c", "read -P 0x41 0 64k", path],
              timeout=TIMEOUT)
    assert_no_crash(res)
    assert res.returncode == 0, show(res)
    with open(path, "rb") as f:
        f.seek(72)
        assert int.from_bytes(f.read(8), "big") & h.INCOMPAT_DIRTY == 0, "dirty bit not cleared"
    check = run([qemu_img, "check", path], timeout=TIMEOUT)
    assert check.returncode == 0, show(check)


def test_corrupt_image_opens_read_only(
    tmp_path: Path, bitback_io: list[str], bitback_img: list[str]
) -> None:
    path = make_case(tmp_path, flagged(h.INCOMPAT_CORRUPT))
    before = snapshot(path.parent)
    p = probe(path, "rw", "read")
    assert p.result == "ok" and p.data == "aa" * 16, f"read of a corrupt-bit image: {p}"
    p = probe(path, "rw", "write")
    assert_bitback_error(p, r"corrupt", "write to a corrupt-bit image")
    assert_unchanged(before, snapshot(path.parent), f"refused library write: {p}")

    res = run([*bitback_io, "-f", "qcow2", "-c", "read -P 0xaa 0 64k", path], timeout=TIMEOUT)
    assert_no_crash(res)
    assert res.returncode == 0 and "read 65536/65536" in res.stdout, show(res)
    res = run([*bitback_io, "-f", "qcow2", "-c", WRITE, path], timeout=TIMEOUT)
    assert_one_line_error(res, "bitback-io", r"corrupt")
    assert_unchanged(before, snapshot(path.parent), show(res))
    res = run([*bitback_img, "info", "-f", "qcow2", path], timeout=TIMEOUT)
    assert_no_crash(res)
    assert res.returncode == 0 and re.search(r"corrupt: true", res.stdout), show(res)


# ------------------------------------------------------------------------------------------
# Memory bound
# ------------------------------------------------------------------------------------------

WORST = [
    "l1-size-2^31",
    "l1-size-at-limit-past-eof",
    "refcount-table-clusters-huge",
    "chain-of-300",
]


@pytest.mark.parametrize("case", [c for c in REFUSED if c.id in WORST], ids=WORST)
@pytest.mark.parametrize("tool", ["bitback-io", "bitback-img"])
def test_worst_cases_in_bounded_memory(
    case: Refused, tool: str, tmp_path: Path, bitback_io: list[str], bitback_img: list[str]
) -> None:
    """Under a 1 GiB address-space limit the error is the clean one, not 'out of memory'."""
    path = make_case(tmp_path, case.build, fresh=case.fresh)
    argv = (
        [*bitback_io, "-f", "qcow2", "-c", READ, str(path)]
        if tool == "bitback-io"
        else [*bitback_img, "info", "-f", "qcow2", *info_chain(case), str(path)]
    )
    res = run_limited(argv)
    assert "MemoryError" not in res.stderr and "out of memory" not in res.stderr, show(res)
    assert "internal error" not in res.stderr, show(res)
    assert_one_line_error(res, tool, case.phrase)


# ------------------------------------------------------------------------------------------
# Bad command lines, against qemu-img and qemu-io
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BadCommand:
    """A bad command line. In ``args``, ``{img}`` is a fresh 64 MiB qcow2 image (it must be
    unchanged afterwards), ``{new}`` a file that must not be created, ``{missing}`` a file that
    does not exist and ``{dir}`` a directory. ``phrase`` must match our error line."""

    id: str
    args: tuple[str, ...]
    phrase: str


IMG_CASES = [
    BadCommand("unknown-option", ("--bogus-option",), r"unrecognized option|unknown option"),
    BadCommand("unknown-subcommand", ("frobnicate",), r"command not found|unknown command"),
    BadCommand("info-missing-filename", ("info",), r"file ?name"),
    BadCommand("create-missing-filename", ("create", "-f", "qcow2"), r"file ?name"),
    BadCommand("create-missing-size", ("create", "-f", "qcow2", "{new}"), r"size"),
    BadCommand("create-size-12Q", ("create", "-f", "qcow2", "{new}", "12Q"), r"size"),
    BadCommand("create-size-abc", ("create", "-f", "qcow2", "{new}", "abc"), r"size"),
    BadCommand("create-size-negative", ("create", "-f", "qcow2", "{new}", "--", "-1"), r"size"),
    BadCommand("create-size-fraction", ("create", "-f", "qcow2", "{new}", "1.5b"), r"size"),
    BadCommand("create-size-2E", ("create", "-f", "qcow2", "{new}", "2E"), r"too large"),
    BadCommand(
        "create-cluster-size-1000",
        ("create", "-f", "qcow2", "-o", "cluster_size=1000", "{new}", "64M"),
        r"cluster size",
    ),
    BadCommand("create-unknown-format", ("create", "-f", "bogus", "{new}", "1M"), r"bogus"),
    BadCommand("info-format-vmdk", ("info", "-f", "vmdk", "{img}"), r"vmdk"),
    BadCommand("info-unknown-format", ("info", "-f", "bogus", "{img}"), r"bogus"),
    BadCommand("info-missing-file", ("info", "{missing}"), r"no such file"),
    BadCommand("info-directory", ("info", "-f", "qcow2", "{dir}"), r"is a directory|regular file"),
    BadCommand("resize-size-12Q", ("resize", "-f", "qcow2", "{img}", "12Q"), r"size"),
    BadCommand("resize-below-zero", ("resize", "-f", "qcow2", "{img}", "--", "-1G"), r"size"),
    BadCommand("check-bad-repair-mode", ("check", "-r", "bogus", "{img}"), r"-r|bogus"),
    BadCommand(
        "convert-unknown-format",
        ("convert", "-f", "qcow2", "-O", "bogus", "{img}", "{new}"),
        r"bogus",
    ),
    BadCommand("compare-one-filename", ("compare", "{img}"), r"file ?names?"),
    BadCommand("map-bad-output", ("map", "--output=xml", "{img}"), r"output"),
    BadCommand("commit-without-backing", ("commit", "-f", "qcow2", "{img}"), r"backing"),
]

IO_CASES = [
    BadCommand("unknown-option", ("--bogus-option",), r"unrecognized option|unknown option"),
    BadCommand("unknown-command", ("-f", "qcow2", "-c", "frobnicate", "{img}"), r"not found"),
    BadCommand("missing-filename", ("-c", "read 0 512"), r"no file open"),
    BadCommand("format-vmdk", ("-f", "vmdk", "-c", "read 0 512", "{img}"), r"vmdk"),
    BadCommand("unknown-format", ("-f", "bogus", "-c", "read 0 512", "{img}"), r"bogus"),
    BadCommand("missing-file", ("-f", "qcow2", "-c", "read 0 512", "{missing}"), r"no such file"),
    BadCommand("directory", ("-f", "qcow2", "-c", "read 0 512", "{dir}"), r"directory"),
    BadCommand("bad-cache-mode", ("-t", "bogus", "-c", "read 0 512", "{img}"), r"cache"),
    BadCommand("bad-pattern", ("-f", "qcow2", "-c", "write -P 0x1234 0 512", "{img}"), r"pattern"),
    BadCommand("write-past-end", ("-f", "qcow2", "-c", "write 64M 512", "{img}"), r"write failed"),
    BadCommand("read-past-end", ("-f", "qcow2", "-c", "read 64M 512", "{img}"), r"read failed"),
    BadCommand(
        "non-numeric-offset", ("-f", "qcow2", "-c", "read abc 512", "{img}"), r"non-numeric"
    ),
    BadCommand(
        "bad-length-suffix", ("-f", "qcow2", "-c", "write 0 12Q", "{img}"), r"non-numeric|suffix"
    ),
    BadCommand(
        "negative-offset", ("-f", "qcow2", "-c", "read -- -512 512", "{img}"), r"non-numeric"
    ),
    BadCommand("bad-argument-count", ("-f", "qcow2", "-c", "read 0", "{img}"), r"argument count"),
    BadCommand(
        "length-too-large", ("-f", "qcow2", "-c", "write -z 0 1T", "{img}"), r"cannot exceed"
    ),
]

_PREFIXES = {"qemu-img": "bitback-img", "qemu-io": "bitback-io"}


def _prepare(directory: Path, qemu_img: str) -> dict[str, str]:
    directory.mkdir()
    run([qemu_img, "create", "-f", "qcow2", directory / "disk.qcow2", "64M"], check=True)
    (directory / "subdir").mkdir()
    return {"img": "disk.qcow2", "new": "new.qcow2", "missing": "missing.qcow2", "dir": "subdir"}


def run_twins(
    case: BadCommand, tmp_path: Path, qemu_img: str, ours: list[str], theirs: str
) -> tuple[Result, Result, dict[str, bytes]]:
    """Run the case through QEMU's tool and ours, each in its own twin directory."""
    results = []
    before: dict[str, bytes] = {}
    for name, prefix in (("q", [theirs]), ("b", ours)):
        d = tmp_path / name
        names = _prepare(d, qemu_img)
        before = snapshot(d)
        argv = [*prefix, *(a.format(**names) for a in case.args)]
        results.append(run(argv, cwd=d, timeout=TIMEOUT))
    return results[0], results[1], before


def assert_like_qemu(case: BadCommand, ref: Result, res: Result, qprog: str) -> None:
    prog = _PREFIXES[qprog]
    both = f"{show(res)}\n--- {qprog} on the same input ---\n{show(ref)}"
    assert_no_crash(res, "\n" + both)
    assert ref.returncode != 0, f"the reference tool accepted this input\n{both}"
    assert res.returncode == ref.returncode, f"exit codes differ\n{both}"
    # The stream QEMU puts its error on (qemu-io prints most command errors on stdout).
    on_stderr = bool(ref.stderr.strip())
    theirs = lines_of(ref.stderr if on_stderr else ref.stdout)
    ours = lines_of(res.stderr if on_stderr else res.stdout)
    if on_stderr:
        assert len(ours) == 1, f"expected exactly one line on stderr\n{both}"
    else:
        assert not res.stderr.strip(), f"expected nothing on stderr\n{both}"
        assert len(ours) == len(theirs), f"different number of lines on stdout\n{both}"
    # getopt errors carry argv[0], which may be a full path: compare the program's name.
    prefixed = re.compile(rf"^(?:\S*/)?({re.escape(prog)}|{re.escape(qprog)}):")
    assert bool(prefixed.match(ours[0])) == bool(prefixed.match(theirs[0])), (
        f"message shape differs (prefix)\n{both}"
    )
    assert re.search(case.phrase, "\n".join(ours), re.IGNORECASE), (
        f"our error does not name the problem (/{case.phrase}/i)\n{both}"
    )


def assert_files_kept(before: dict[str, bytes], directory: Path, res: Result) -> None:
    assert not (directory / "new.qcow2").exists(), f"a half-written image was left\n{show(res)}"
    assert_unchanged(before, snapshot(directory), show(res))


@pytest.mark.qemu
@pytest.mark.parametrize("case", IMG_CASES, ids=[c.id for c in IMG_CASES])
def test_img_bad_command_line(
    case: BadCommand, tmp_path: Path, qemu_img: str, bitback_img: list[str]
) -> None:
    ref, res, before = run_twins(case, tmp_path, qemu_img, bitback_img, qemu_img)
    assert_like_qemu(case, ref, res, "qemu-img")
    assert_files_kept(before, tmp_path / "b", res)


@pytest.mark.qemu
@pytest.mark.parametrize("case", IO_CASES, ids=[c.id for c in IO_CASES])
def test_io_bad_command_line(
    case: BadCommand, tmp_path: Path, qemu_img: str, qemu_io: str, bitback_io: list[str]
) -> None:
    ref, res, before = run_twins(case, tmp_path, qemu_img, bitback_io, qemu_io)
    assert_like_qemu(case, ref, res, "qemu-io")
    assert_files_kept(before, tmp_path / "b", res)


# ------------------------------------------------------------------------------------------
# The builders themselves
# ------------------------------------------------------------------------------------------


@pytest.mark.qemu
@pytest.mark.parametrize("maker", ["bitback", "qemu-img"])
def test_add_data_cluster_keeps_image_clean(
    maker: str, tmp_path: Path, qemu_img: str, qemu_io: str
) -> None:
    """Entry-level damage starts from a consistent image, whoever created it."""
    path = tmp_path / IMAGE
    if maker == "bitback":
        h.fresh_qcow2(path)
    else:
        run([qemu_img, "create", "-f", "qcow2", path, "64M"], check=True)
    h.add_data_cluster(path)
    run([qemu_img, "check", "-f", "qcow2", path], check=True, timeout=TIMEOUT)
    res = run([qemu_io, "-f", "qcow2", "-r", "-c", "read -P 0xaa 0 64k", path], timeout=TIMEOUT)
    assert res.returncode == 0 and "verification failed" not in res.stdout, show(res)


def test_case_count_meets_acceptance() -> None:
    """At least 30 hostile-image and bad-command-line cases (the acceptance item)."""
    assert len(REFUSED) + len(DAMAGED) >= 30
    assert len(IMG_CASES) + len(IO_CASES) >= 30
    for ids in (REFUSED_IDS, DAMAGED_IDS, [c.id for c in IMG_CASES], [c.id for c in IO_CASES]):
        assert len(ids) == len(set(ids))
