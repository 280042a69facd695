"""The seed's set-up (iotest 124) and the two places where bitbackd and QEMU 7.2 answer alike
in substance but not in shape, for tests that run one scenario on both.

* :func:`make_seed_image`: ``create -f qcow2 IMG 64M`` and the three offline pattern writes of
  the seed's ``setUp``, one io-tool run per pattern as the seed does, with either tool set
  (real ``qemu-img``/``qemu-io`` or ``bitback-img``/``bitback-io``).
* :class:`HarnessVM`: :class:`helpers.vm.VM` with the process's stdout and stderr kept in a file, so
  that :meth:`HarnessVM.io` can return what an HMP ``qemu-io`` command printed on either
  backend (the first documented difference, spec 3.8).
* :func:`device_bitmaps`: a ``query-block`` entry's bitmaps in QEMU 7.2's shape (the second
  documented difference, spec 3.5 and 12).
* :class:`Session`, :func:`assert_same_logs` and friends: one scenario run on both backends
  with every answer recorded, normalized and compared (``test_daemon_vs_qemu.py``).
* :func:`granule_sha256` and ``QEMU72_VECTORS``: the model of QEMU's bitmap digest and the
  digests QEMU 7.2 gave.

Both differences are checked, not just papered over: :meth:`HarnessVM.io` requires QEMU's
reply to be ``""`` and bitbackd's stdout to stay empty; :func:`device_bitmaps` requires
bitbackd's seed-era members to agree with the 7.2 ones they duplicate.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import struct
import subprocess
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any

from qemu.qmp.legacy import QEMUMonitorProtocol

from helpers.imagetools import strip_timing
from helpers.procs import run
from helpers.vm import VM, emulator_argv

__all__ = [
    "QEMU72_VECTORS",
    "SETUP_PATTERNS",
    "VECTOR_BITMAPS",
    "VECTOR_STEPS",
    "WRITES_1",
    "WRITES_2",
    "HarnessVM",
    "Prepare",
    "Scenario",
    "Session",
    "Solo",
    "Twin",
    "assert_same_logs",
    "device_bitmaps",
    "granule_sha256",
    "hmp_writes",
    "make_seed_image",
    "query_block_72",
    "quit_vm",
    "seed_status",
]

KiB, MiB = 1 << 10, 1 << 20

# (pattern, offset, length) as the seed spells them for qemu-io.
SETUP_PATTERNS = (("0x41", "0", "512"), ("0xd5", "1M", "32k"), ("0xdc", "32M", "124k"))
WRITES_1 = (("0xab", "0", "512"), ("0xfe", "16M", "256k"), ("0x64", "32736k", "64k"))
WRITES_2 = (("0x9a", "0", "512"), ("0x55", "8M", "352k"), ("0x78", "15872k", "1M"))


# -- QEMU 7.2's x-debug-block-dirty-bitmap-sha256 vectors -----------------------------------
#
# Measured on QEMU 7.2.22 (/tmp/qemu72-probe/SUMMARY.md, "SHA-256 test vectors"): a fresh 64M
# image with 0x41 at [0, 512) written before launch (so no bitmap sees it), these bitmaps added
# to drive0 in this order (None: the default granularity, 65536 for 64k clusters), then the
# steps below, cumulative. QEMU72_VECTORS[i] is (virtual size, {bitmap: (count, sha256)})
# after step i; step 0 is "nothing done yet".

VECTOR_BITMAPS: dict[str, int | None] = {
    "b64k": None,
    "g512": 512,
    "g1024": 1024,
    "g4096": 4096,
    "g1m": 1 * MiB,
    "g2p31": 1 << 31,
}

# Actions: ("write", offset, length), ("resize", size), ("clear", bitmap),
# ("merge", target, source). The writes use the pattern bytes of the probe (irrelevant here).
VECTOR_STEPS: tuple[tuple[tuple[Any, ...], ...], ...] = (
    (),
    (("write", 0, 512),),
    (("write", 16 * MiB, 256 * KiB),),
    (("write", 32736 * KiB, 64 * KiB),),
    (("resize", 65 * MiB),),
    (("write", 64 * MiB, 64 * KiB),),
    (("clear", "g512"), ("merge", "g512", "b64k"), ("merge", "g1m", "g4096")),
    (("resize", 64 * MiB),),
    (("resize", 64 * MiB + 512),),
)

QEMU72_VECTORS: tuple[tuple[int, dict[str, tuple[int, str]]], ...] = (
    # step 0: empty (64M)
    (67108864, {
        "b64k": (0, "38723a2e5e8a17aa7950dc008209944e898f69a7bd10a23c839d341e935fd5ca"),
        "g512": (0, "4fe7b59af6de3b665b67788cc2f99892ab827efae3a467342b3bb4e3bc8e5bfe"),
        "g1024": (0, "9f1dcbc35c350d6027f98be0f5c8b43b42ca52b7604459c0c42be3aa88913d47"),
        "g4096": (0, "e5a00aa9991ac8a5ee3109844d84a55583bd20572ad3ffcd42792f3c36b183ad"),
        "g1m": (0, "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc"),
        "g2p31": (0, "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc"),
    }),
    # step 1: + qemu-io drive0 "write -P0xab 0 512"
    (67108864, {
        "b64k": (65536, "ed4fc1d85afa5175e4973c9780b78fa000f070c00230ec18d6190133cb915db5"),
        "g512": (512, "dfc53015b39cdf85a8eec8608cd7413330a8e260e8954bc315aedd85bd8954a0"),
        "g1024": (1024, "2b8e753c2efa059010b3aecd6c00bff0a1a09c0f08d5d4522ffef4d207c1fb0c"),
        "g4096": (4096, "d5990a0fe875a0aa109edb831f0e95b8f0a3a46b9b78daeaea9ce05c32c7201f"),
        "g1m": (1048576, "7c9fa136d4413fa6173637e883b6998d32e1d675f88cddff9dcbcf331820f4b8"),
        "g2p31": (2147483648, "7c9fa136d4413fa6173637e883b6998d32e1d675f88cddff9dcbcf331820f4b8"),
    }),
    # step 2: + "write -P0xfe 16M 256k"
    (67108864, {
        "b64k": (327680, "2a9531695fdd190dc1ea3d2cdd5ba02237c5c6dc25cd2d0516aa42d27218c98a"),
        "g512": (262656, "3916f6d418b524654a768770a4946559b3b0fb83c25e88a6c90f66c96a7c73b7"),
        "g1024": (263168, "2c7e9fa8d9623b58c744743a54a87aadd0261b41e501bf587581df5959214f92"),
        "g4096": (266240, "40157110433a2a21abfae595872612acc9255938a53cc5b4db809c8d9c675da8"),
        "g1m": (2097152, "578ce22e73619f9dfc119e4e56196a02155da6d446d7f185567d49884f58724f"),
        "g2p31": (2147483648, "7c9fa136d4413fa6173637e883b6998d32e1d675f88cddff9dcbcf331820f4b8"),
    }),
    # step 3: + "write -P0x64 32736k 64k"
    (67108864, {
        "b64k": (458752, "b989ff83b290b7753a3d4e47a0ac769cb190bb0949f49a873eb2f67eb254a66b"),
        "g512": (328192, "f4fa79f58fb249febdb39792e0fba5cc7380d29c9a8510ab20dbab5069a5030b"),
        "g1024": (328704, "576b3f8f07604bf4c2b76fcd40ddf0af7cd784c7b95e099d90e9de15ed7426e7"),
        "g4096": (331776, "dff9b39d9153536edbf09c0e9be50bbea17aebf665fb389b3dbd0f45761b0dfb"),
        "g1m": (4194304, "654135235690622f5d7765b0fb26929aa11dbc2976c4113ede8fdb1a929fe299"),
        "g2p31": (2147483648, "7c9fa136d4413fa6173637e883b6998d32e1d675f88cddff9dcbcf331820f4b8"),
    }),
    # step 4: + block_resize device=drive0 size=68157440 (65M)
    (68157440, {
        "b64k": (458752, "b606d6f3c9836a02edc957b2a79c2f1614a5998cd9dba0f643270bd73a9d92df"),
        "g512": (328192, "318bd590fc2ba8e24c3049c844c642b04eb2daa57191ed379e15ad5569ee0191"),
        "g1024": (328704, "6638750438d8a4c3b14d94e3078e35c17cd3e50abd8a0ec671159f656c647ea2"),
        "g4096": (331776, "76a5fd543a2b64a764e8546efa0da82551f9983c1dd9bae555c0c3e44f8b5376"),
        "g1m": (4194304, "3d26b912bc3dd03aeeb61f27256d920aa85da28b3fa14a268575e03be15ccb8b"),
        "g2p31": (2147483648, "7c9fa136d4413fa6173637e883b6998d32e1d675f88cddff9dcbcf331820f4b8"),
    }),
    # step 5: + "write 64M 64k"
    (68157440, {
        "b64k": (524288, "e5a0fe758981bc1355d005e499b40984abae2de6a1d8b38f28226aac966bf2e8"),
        "g512": (393728, "9cf7d410f4dba9d444f4e0e8e306b316c2a2866771097d3295df10a884721c04"),
        "g1024": (394240, "f71350e4b348c849861193cd1fc4e2b0e539f8a124bb2a065c9e47a8ff54aeba"),
        "g4096": (397312, "ffb90efbd9520e1ed2918a71be9231f6479d9e8544b3aa3ecca54b6c86396bca"),
        "g1m": (5242880, "921bee1b6d1c5c001f5b1da07475a397e2ca2092d13c01e7e7614578898dd05f"),
        "g2p31": (2147483648, "7c9fa136d4413fa6173637e883b6998d32e1d675f88cddff9dcbcf331820f4b8"),
    }),
    # step 6: + clear g512; merge b64k->g512; merge g4096->g1m
    (68157440, {
        "b64k": (524288, "e5a0fe758981bc1355d005e499b40984abae2de6a1d8b38f28226aac966bf2e8"),
        "g512": (524288, "9690947af777675cca1626fedf5d25b73320962530debf3859851e8656dcc4b7"),
        "g1024": (394240, "f71350e4b348c849861193cd1fc4e2b0e539f8a124bb2a065c9e47a8ff54aeba"),
        "g4096": (397312, "ffb90efbd9520e1ed2918a71be9231f6479d9e8544b3aa3ecca54b6c86396bca"),
        "g1m": (5242880, "921bee1b6d1c5c001f5b1da07475a397e2ca2092d13c01e7e7614578898dd05f"),
        "g2p31": (2147483648, "7c9fa136d4413fa6173637e883b6998d32e1d675f88cddff9dcbcf331820f4b8"),
    }),
    # step 7: + block_resize size=67108864 (shrink back to 64M)
    (67108864, {
        "b64k": (458752, "b989ff83b290b7753a3d4e47a0ac769cb190bb0949f49a873eb2f67eb254a66b"),
        "g512": (458752, "2b6235d73b9fa110b4d0205067ac0740e9320ba2cd0800350f19efa6fc9040fc"),
        "g1024": (328704, "576b3f8f07604bf4c2b76fcd40ddf0af7cd784c7b95e099d90e9de15ed7426e7"),
        "g4096": (331776, "dff9b39d9153536edbf09c0e9be50bbea17aebf665fb389b3dbd0f45761b0dfb"),
        "g1m": (4194304, "654135235690622f5d7765b0fb26929aa11dbc2976c4113ede8fdb1a929fe299"),
        "g2p31": (2147483648, "7c9fa136d4413fa6173637e883b6998d32e1d675f88cddff9dcbcf331820f4b8"),
    }),
    # step 8: + block_resize size=67109376 (64M+512)
    (67109376, {
        "b64k": (458752, "b606d6f3c9836a02edc957b2a79c2f1614a5998cd9dba0f643270bd73a9d92df"),
        "g512": (458752, "10b77765458ad17cc9e49adb007e3e93d58910ed2a24206da91157534c490445"),
        "g1024": (328704, "704bafe3a259eb2a2eb6f4b3a8daf6b01461babf7502feddc3dffdb91af40e54"),
        "g4096": (331776, "b1a69477f8bcd0e9bef1a305219c71b30443af5b3d689bb8dcbd18e93288bca7"),
        "g1m": (4194304, "3d26b912bc3dd03aeeb61f27256d920aa85da28b3fa14a268575e03be15ccb8b"),
        "g2p31": (2147483648, "7c9fa136d4413fa6173637e883b6998d32e1d675f88cddff9dcbcf331820f4b8"),
    }),
)


def granule_sha256(size: int, granularity: int, dirty: Iterable[int]) -> str:
    """The model of ``x-debug-block-dirty-bitmap-sha256``: SHA-256 of QEMU's HBitmap last
    level for a disk of ``size`` bytes, i.e. ``ceil(granules / 64)`` little-endian 64-bit
    words (at least one) with bit ``i % 64`` of word ``i // 64`` set for each dirty granule
    ``i``. Written from the description, independently of :mod:`bitback.bitmaps`.

    >>> granule_sha256(0, 512, ()) == hashlib.sha256(bytes(8)).hexdigest()
    True
    """
    granules = -(-size // granularity)
    words = [0] * max(1, -(-granules // 64))
    for index in dirty:
        assert 0 <= index < granules, (index, granules)
        words[index // 64] |= 1 << (index % 64)
    return hashlib.sha256(b"".join(struct.pack("<Q", word) for word in words)).hexdigest()


def make_seed_image(img_tool: Sequence[str], io_tool: Sequence[str], path: Path,
                    size: str = "64M",
                    patterns: Iterable[tuple[str, str, str]] = SETUP_PATTERNS) -> Path:
    """Create ``path`` as the seed's ``setUp`` does, with the given tools (argv prefixes)."""
    run([*img_tool, "create", "-f", "qcow2", str(path), size], check=True)
    for pattern, offset, length in patterns:
        run([*io_tool, "-f", "qcow2", "-c", f"write -P{pattern} {offset} {length}", str(path)],
            check=True)
    return path


def hmp_writes(vm: HarnessVM, device: str, patterns: Iterable[tuple[str, str, str]]) -> None:
    """The seed's ``hmp_io_writes``: each pattern through HMP ``qemu-io``, then a flush.
    Every write must succeed."""
    for pattern, offset, length in patterns:
        out = vm.io(device, f"write -P{pattern} {offset} {length}")
        assert out.startswith("wrote "), f"{vm.backend}: write {offset} {length}: {out!r}"
    assert vm.io(device, "flush") == "", vm.backend


class HarnessVM(VM):
    """A :class:`VM` whose stdout and stderr go to a file that :meth:`io` reads from.

    QEMU 7.2 prints an HMP ``qemu-io`` command's output on its own stdout and replies ``""``;
    bitbackd returns the output as the reply (with the monitor's ``\\r\\n`` line ends). The
    command line is exactly :class:`VM`'s (``emulator_argv`` plus the client-mode chardev).
    """

    def __init__(self, backend: str, args: Sequence[str] = (), *, timeout: float = 60.0) -> None:
        super().__init__(backend, args, timeout=timeout)
        self.stdout_path = os.path.join(self._dir.name, "stdout.txt")
        self._stdout: IO[str] | None = None
        self._stdout_seen = 0

    def launch(self) -> HarnessVM:
        self.monitor = QEMUMonitorProtocol(self.sock, server=True)
        argv = [
            *emulator_argv(self.backend),
            "-chardev", f"socket,id=mon,path={self.sock}",
            "-mon", "chardev=mon,mode=control",
            *self.args,
        ]
        # One file for both streams, in the order written: qemu-io prints most lines on
        # stdout but some ('command "x" not found') on stderr.
        self._stdout = open(self.stdout_path, "w")  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(argv, stdout=self._stdout, stderr=subprocess.STDOUT,
                                     text=True)
        try:
            self.monitor.accept(timeout=self.timeout)
        except BaseException:
            self.__exit__(None, None, None)  # kill, close the file, drop the directory
            raise
        self.monitor.settimeout(self.timeout)
        self._new_stdout()  # whatever was printed while starting up is not qemu-io's
        return self

    def printed(self) -> str:
        """Everything the process printed so far (stdout and stderr)."""
        with open(self.stdout_path) as out:
            return out.read()

    def __enter__(self) -> HarnessVM:
        return self.launch()

    def __exit__(self, *exc: object) -> None:
        if self._stdout is not None:
            self._stdout.close()
            self._stdout = None
        super().__exit__(*exc)

    def _new_stdout(self) -> str:
        # QEMU writes (and flushes) the lines before it sends the reply, so they are there.
        with open(self.stdout_path) as out:
            out.seek(self._stdout_seen)
            text = out.read()
        self._stdout_seen += len(text)
        return text

    def io(self, device: str, command: str, *, raw: bool = False) -> str:
        """What ``qemu-io DEVICE "COMMAND"`` printed, ``\\n`` line ends, timing lines dropped
        unless ``raw``. Documented difference (spec 3.8): QEMU replies ``""`` and prints on
        stdout (and stderr); bitbackd returns the text and prints nothing."""
        reply = self.qemu_io(device, command)
        printed = self._new_stdout()
        if self.backend == "qemu":
            assert reply == "", f"QEMU replied {reply!r} to qemu-io {command!r}"
            text = printed
        else:
            assert printed == "", f"bitbackd printed {printed!r} for qemu-io {command!r}"
            text = reply.replace("\r\n", "\n")
        return text if raw else strip_timing(text)


def seed_status(bitmap: dict[str, Any]) -> str:
    """The seed-era ``status`` implied by the 7.2 members of an idle, consistent bitmap."""
    if bitmap["busy"]:
        return "locked"
    return "active" if bitmap["recording"] else "disabled"


def device_bitmaps(backend: str, info: dict[str, Any]) -> list[dict[str, Any]]:
    """The named bitmaps of a ``query-block`` entry, or of a ``query-named-block-nodes``
    node, in QEMU 7.2's shape, newest first.

    The documented difference (spec 3.5 and 12): QEMU 7.2 lists a device's bitmaps only in
    ``inserted["dirty-bitmaps"]`` (a node's in its own ``dirty-bitmaps``), without ``status``
    (removed in 6.0), and omits the list when there are none. bitbackd also keeps the seed-era
    place, a top-level ``entry["dirty-bitmaps"]`` present exactly when there is a bitmap, and
    gives every bitmap, wherever listed, the seed-era ``status``. For bitbackd this checks
    that the two lists agree and that each ``status`` is the one ``recording`` and ``busy``
    imply (:func:`seed_status`); for QEMU, that neither seed-era member appears. The result
    never has ``status``.
    """
    is_entry = "inserted" in info
    listed = list((info["inserted"] if is_entry else info).get("dirty-bitmaps", []))
    if backend == "qemu":
        assert not (is_entry and "dirty-bitmaps" in info), info
        assert all("status" not in bm for bm in listed), listed
        return [dict(bm) for bm in listed]
    if is_entry:
        top = list(info.get("dirty-bitmaps", []))
        assert ("dirty-bitmaps" in info) == bool(top), info
        assert top == listed, (top, listed)
    for bm in listed:
        assert bm["status"] == seed_status(bm), bm
    return [{k: v for k, v in bm.items() if k != "status"} for bm in listed]


# ------------------------------------------------------------------ one scenario on both
#
# A twin scenario runs the same steps on bitbackd and on QEMU, each on its own copy of the
# images in its own directory, and records every answer in a Session's log, normalized:
# the directory becomes ``<DIR>``, automatic node names ``#block<N>``, and ``actual-size``
# (disk usage, up to the file system) is dropped. assert_same_logs then compares the logs.

def quit_vm(vm: HarnessVM) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    """``quit``: its reply, the events that came with it, and the exit status."""
    assert vm.proc is not None and vm.monitor is not None
    reply = vm.qmp("quit")
    events = vm.events()
    with contextlib.suppress(Exception):  # the peer is gone; closing may say so
        vm.monitor.close()
    vm.proc.wait(timeout=vm.timeout)
    vm.exitcode = vm.proc.returncode
    return reply, events, vm.exitcode


_AUTO_NODE = re.compile(r"#block\d+")


def _without(value: Any, key: str) -> Any:
    if isinstance(value, dict):
        return {k: _without(v, key) for k, v in value.items() if k != key}
    if isinstance(value, list):
        return [_without(v, key) for v in value]
    return value


class Session:
    """One backend's run of a twin scenario: its VM, its directory and its normalized log."""

    def __init__(self, vm: HarnessVM, workdir: Path) -> None:
        self.vm = vm
        self.backend = vm.backend
        self.dir = workdir
        self.log: list[tuple[str, Any]] = []

    def normalize(self, value: Any) -> Any:
        text = json.dumps(value, sort_keys=True).replace(str(self.dir), "<DIR>")
        return _without(json.loads(_AUTO_NODE.sub("#block<N>", text)), "actual-size")

    def note(self, label: str, value: Any) -> None:
        self.log.append((self.normalize(label), self.normalize(value)))

    def qmp(self, cmd: str, **kwargs: Any) -> dict[str, Any]:
        """Run and record a command; returns the raw reply."""
        reply = self.vm.qmp(cmd, **kwargs)
        self.note(f"{cmd} {json.dumps(kwargs, sort_keys=True)}", reply)
        return reply

    def ok(self, cmd: str, **kwargs: Any) -> Any:
        reply = self.qmp(cmd, **kwargs)
        assert "return" in reply, f"{self.backend}: {cmd} {kwargs}: {reply}"
        return reply["return"]

    def error(self, cmd: str, **kwargs: Any) -> tuple[str, str]:
        """Run a command that must fail; (class, desc), the desc normalized."""
        reply = self.qmp(cmd, **kwargs)
        assert "error" in reply, f"{self.backend}: {cmd} {kwargs} succeeded: {reply}"
        return reply["error"]["class"], self.normalize(reply["error"]["desc"])

    def io(self, device: str, command: str) -> str:
        """HMP qemu-io output (either reply shape), recorded."""
        text = self.vm.io(device, command)
        self.note(f"qemu-io {device} {command}", text)
        return text

    def hmp(self, line: str) -> str:
        """A monitor line whose *reply* is compared (monitor errors, parse errors)."""
        return str(self.ok("human-monitor-command", command_line=line))

    def find_entry(self, device: str) -> dict[str, Any] | None:
        """The query-block entry of a device name, or of the node a device_add attached."""
        for entry in self.vm.ok("query-block"):
            if device in (entry["device"], entry["inserted"]["node-name"]):
                return dict(entry)
        return None

    def entry(self, device: str = "drive0") -> dict[str, Any]:
        entry = self.find_entry(device)
        assert entry is not None, f"{self.backend}: no query-block entry for {device}"
        return entry

    def bitmaps(self, device: str = "drive0") -> list[dict[str, Any]]:
        """The bitmaps (7.2 shape, newest first) with their digests, recorded: from
        query-block, or from query-named-block-nodes for a node without a device."""
        info = self.find_entry(device)
        if info is None:
            nodes = self.vm.ok("query-named-block-nodes")
            info = next((n for n in nodes if n["node-name"] == device), None)
            assert info is not None, f"{self.backend}: no node {device}"
        found = device_bitmaps(self.backend, info)
        for bm in found:
            bm["sha256"] = self.vm.ok("x-debug-block-dirty-bitmap-sha256", node=device,
                                      name=bm["name"])["sha256"]
        self.note(f"bitmaps of {device}", found)
        return found

    def bitmap(self, name: str, device: str = "drive0") -> dict[str, Any]:
        for bm in self.bitmaps(device):
            if bm["name"] == name:
                return bm
        raise AssertionError(f"{self.backend}: no bitmap {name} on {device}")

    def count(self, name: str, device: str = "drive0") -> int:
        return int(self.bitmap(name, device)["count"])


def query_block_72(s: Session) -> list[dict[str, Any]]:
    """query-block in QEMU 7.2's shape (bitmaps only in ``inserted``, no ``status``)."""
    entries = []
    for entry in s.vm.ok("query-block"):
        shaped = {k: v for k, v in entry.items() if k != "dirty-bitmaps"}
        shaped["inserted"] = {**entry["inserted"],
                              "dirty-bitmaps": device_bitmaps(s.backend, entry)}
        entries.append(shaped)
    return entries


def assert_same_logs(sessions: dict[str, Session]) -> None:
    """Every recorded step must match between the backends, in order."""
    bb, qe = sessions["bitback"].log, sessions["qemu"].log
    for index, ((label_b, value_b), (label_q, value_q)) in enumerate(zip(bb, qe, strict=False)):
        assert label_b == label_q, f"step {index}: scenario diverged ({label_b} / {label_q})"
        if value_b != value_q:
            raise AssertionError(
                f"step {index}, {label_b}: bitbackd and QEMU 7.2 differ\n"
                f"--- bitbackd ---\n{json.dumps(value_b, indent=1)}\n"
                f"--- QEMU 7.2 ---\n{json.dumps(value_q, indent=1)}"
            )
    assert len(bb) == len(qe), f"{len(bb)} steps on bitbackd, {len(qe)} on QEMU"


Prepare = Callable[[Path], list[str]]
Scenario = Callable[[Session], None]
Twin = Callable[[Prepare, Scenario], dict[str, Session]]
Solo = Callable[[str], HarnessVM]
