"""QEMU's own readers and writers of persistent dirty bitmaps, run as test oracles.

* :class:`NbdBitmaps`: real ``qemu-nbd -r -t -f qcow2 -B NAME... --socket=SOCK IMG`` serving an
  image read-only with some of its persistent bitmaps as NBD meta contexts;
  :meth:`NbdBitmaps.dirty` asks libnbd's ``nbdinfo --map=qemu:dirty-bitmap:NAME --json`` and
  returns the dirty byte runs, adjacent runs merged, clipped to the disk as NBD reports them::

      with NbdBitmaps(qemu_nbd, nbdinfo, img, ["b0", "b1"]) as nbd:
          assert nbd.dirty("b0") == [(65536, 131072)]

* :class:`StorageDaemon`: real ``qemu-storage-daemon`` with qcow2 nodes, a listening QMP
  monitor (a :class:`helpers.qmpraw.RawQMP` client, negotiated) and, on request, a writable NBD
  export of one node that real ``qemu-io -f raw`` can write through (:meth:`nbd_uri`)::

      with StorageDaemon(qsd, {"n0": img}, export="n0") as qsd:
          qsd.qmp.ok("block-dirty-bitmap-add", {"node": "n0", "name": "b", "persistent": True})
          run([qemu_io, "-f", "raw", "-c", "write 0 64k", qsd.nbd_uri()], check=True)
          assert qsd.quit() == 0          # stores the bitmap in the image

Both kill their process on the way out whatever happened (a failing test never leaves one
behind), and keep their sockets in a short private directory: ``sun_path`` holds 107 bytes,
less than pytest's ``tmp_path`` may need.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from helpers.procs import run
from helpers.qmpraw import RawQMP, wait_for_socket

__all__ = ["NbdBitmaps", "StorageDaemon", "merge_runs"]

Run = tuple[int, int]
PathLike = str | os.PathLike[str]

START_TIMEOUT = 30.0


def merge_runs(runs: Iterable[Run]) -> list[Run]:
    """Byte runs ``(start, length)`` sorted, with touching or overlapping ones joined.

    >>> merge_runs([(10, 5), (0, 10), (20, 1)])
    [(0, 15), (20, 1)]
    """
    out: list[Run] = []
    for start, length in sorted(runs):
        if length <= 0:
            continue
        if out and start <= out[-1][0] + out[-1][1]:
            last_start, last_length = out[-1]
            out[-1] = (last_start, max(last_length, start + length - last_start))
        else:
            out.append((start, length))
    return out


class _Server:
    """A process with a private socket directory and a stderr file, killed on close."""

    def __init__(self, prefix: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        self.stderr_path = self.dir / "stderr.txt"
        self.proc: subprocess.Popen[bytes] | None = None

    def _start(self, argv: Sequence[str], sockets: Sequence[str]) -> None:
        try:
            with open(self.stderr_path, "wb") as stderr:
                self.proc = subprocess.Popen(
                    list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=stderr
                )
            for sock in sockets:
                wait_for_socket(sock, self.proc, timeout=START_TIMEOUT, describe=f"({argv[0]})")
        except AssertionError as exc:
            said = self.stderr
            self.close()
            raise AssertionError(f"{exc}; stderr: {said}") from None
        except BaseException:
            self.close()
            raise

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


class NbdBitmaps(_Server):
    """``qemu-nbd`` exporting ``image`` read-only with the persistent bitmaps ``names``."""

    def __init__(self, qemu_nbd: str, nbdinfo: str, image: PathLike,
                 names: Iterable[str]) -> None:
        super().__init__("bbnbd-")
        self.nbdinfo = nbdinfo
        self.sock = str(self.dir / "nbd.sock")
        argv = [qemu_nbd, "-r", "-t", "-f", "qcow2"]
        for name in names:
            argv += ["-B", name]
        self._start([*argv, f"--socket={self.sock}", os.fspath(image)], [self.sock])

    def __enter__(self) -> NbdBitmaps:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def dirty(self, name: str) -> list[Run]:
        """The dirty byte runs of bitmap ``name`` as NBD block status reports them."""
        res = run([self.nbdinfo, f"--map=qemu:dirty-bitmap:{name}", "--json", self.uri()],
                  check=True, timeout=60)
        extents = json.loads(res.stdout)
        return merge_runs((e["offset"], e["length"]) for e in extents if e["type"] & 1)


class StorageDaemon(_Server):
    """``qemu-storage-daemon`` with one qcow2 node per image (``{node name: path}``).

    ``read_only`` opens every node read-only; ``export`` names a node to export writable over
    NBD (``nbd_uri``). ``qmp`` is a negotiated :class:`RawQMP` connection.
    """

    def __init__(self, qsd: str, images: Mapping[str, PathLike], *, read_only: bool = False,
                 export: str | None = None) -> None:
        super().__init__("bbqsd-")
        self.qmp_sock = str(self.dir / "qmp.sock")
        self.nbd_sock = str(self.dir / "nbd.sock")
        argv = [qsd]
        for node, path in images.items():
            opts = [
                "driver=qcow2", f"node-name={node}", "file.driver=file",
                f"file.filename={os.fspath(path).replace(',', ',,')}",
            ]
            if read_only:
                opts.append("read-only=on")
            argv += ["--blockdev", ",".join(opts)]
        sockets = [self.qmp_sock]
        if export is not None:
            argv += ["--nbd-server", f"addr.type=unix,addr.path={self.nbd_sock}",
                     "--export", f"type=nbd,id=exp0,node-name={export},name={export},"
                                 "writable=on"]
            sockets.append(self.nbd_sock)
        argv += ["--chardev", f"socket,id=mon,path={self.qmp_sock},server=on,wait=off",
                 "--monitor", "chardev=mon"]
        self._start(argv, sockets)
        self.export = export
        try:
            self.qmp = RawQMP.connect(self.qmp_sock, timeout=START_TIMEOUT, retry=START_TIMEOUT)
            self.qmp.negotiate()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> StorageDaemon:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def nbd_uri(self) -> str:
        assert self.export is not None
        return f"nbd+unix:///{self.export}?socket={self.nbd_sock}"

    def sha256(self, node: str, name: str) -> str:
        digest = self.qmp.ok("x-debug-block-dirty-bitmap-sha256", {"node": node, "name": name})
        return str(digest["sha256"])

    def quit(self, timeout: float = 60.0) -> int:
        """``quit`` (QEMU stores persistent bitmaps on the way out); the exit status."""
        assert self.proc is not None
        assert self.qmp.command("quit") == {"return": {}}
        self.qmp.close()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            err = self.stderr
            self.close()
            raise AssertionError(f"qemu-storage-daemon outlived quit; stderr: {err}") from None

    def close(self) -> None:
        qmp = getattr(self, "qmp", None)
        if qmp is not None:
            qmp.close()
        super().close()
