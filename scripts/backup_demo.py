"""A live incremental backup with bitbackd, driven over QMP with QEMU's own client library.

It starts ``bitbackd`` on a fresh disk image, takes a full backup, lets the "guest" write,
takes an incremental backup of just what changed (tracked by a dirty bitmap), and then shows
that the incremental, read through its chain, equals the disk - with ``bitback-img compare``
and, when installed, with QEMU's ``qemu-img compare``. Run by ``make demo`` after the image
tools tour; everything happens in a temporary directory (KEEP=1 keeps it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qemu.qmp.legacy import QEMUMonitorProtocol

BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else name


def run(*argv: str) -> str:
    print("   $", " ".join(argv))
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def wait_job(qmp: QEMUMonitorProtocol, job: str) -> dict[str, object]:
    """The job's BLOCK_JOB_COMPLETED data, once its status has reached null."""
    done: dict[str, object] = {}
    while True:
        event = qmp.pull_event(wait=True)
        assert event is not None
        data = event.get("data", {})
        if event["event"] == "BLOCK_JOB_COMPLETED" and data.get("device") == job:
            done = data
        if event["event"] == "JOB_STATUS_CHANGE" and data == {"id": job, "status": "null"}:
            return done


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="bitback-backup-demo."))
    img, io = tool("bitback-img"), tool("bitback-io")
    try:
        disk, full, inc = work / "disk.qcow2", work / "full.qcow2", work / "inc.qcow2"
        print("\n1. A 64 MiB disk with some data")
        run(img, "create", "-f", "qcow2", str(disk), "64M")
        run(io, "-c", "write -P 0x41 0 1M", "-c", "write -P 0x42 32M 2M", str(disk))

        print("\n2. bitbackd serves it over QMP (the qemu.qmp library is the client)")
        sock = str(work / "qmp.sock")
        daemon = subprocess.Popen([tool("bitbackd"), "--qmp", sock, "-drive",
                                   f"if=virtio,id=drive0,file={disk},format=qcow2"])
        for _ in range(100):
            if os.path.exists(sock):
                break
            time.sleep(0.05)
        qmp = QEMUMonitorProtocol(sock)
        qmp.connect()
        qmp.settimeout(60)

        print("\n3. Full backup, and a dirty bitmap from the same instant (one transaction)")
        qmp.cmd("transaction", actions=[
            {"type": "block-dirty-bitmap-add", "data": {"node": "drive0", "name": "nightly"}},
            {"type": "drive-backup", "data": {"device": "drive0", "sync": "full",
                                              "target": str(full), "format": "qcow2"}}])
        print("   full backup:", wait_job(qmp, "drive0"))

        print("\n4. The guest writes; the bitmap records where")
        for cmd in ("write -P 0x43 4M 64k", "write -P 0x44 40M 1M"):
            qmp.cmd("human-monitor-command", **{"command-line": f'qemu-io drive0 "{cmd}"'})
        info = qmp.cmd("query-block")[0]["inserted"]["dirty-bitmaps"][0]  # type: ignore[index]
        print(f"   bitmap 'nightly': {info['count']} dirty bytes")

        print("\n5. Incremental backup of just those bytes, on top of the full one")
        run(img, "create", "-f", "qcow2", "-b", str(full), "-F", "qcow2", str(inc), "64M")
        qmp.cmd("drive-backup", device="drive0", sync="incremental", bitmap="nightly",
                target=str(inc), format="qcow2", mode="existing")
        print("   incremental backup:", wait_job(qmp, "drive0"))
        qmp.cmd("quit")
        with contextlib.suppress(EOFError):  # the daemon hangs up after quit, as QEMU does
            qmp.close()
        daemon.wait(timeout=30)

        print("\n6. The incremental, read through its chain, is the disk")
        print("  ", run(img, "compare", str(inc), str(disk)).strip())
        if shutil.which("qemu-img"):
            print("  ", run("qemu-img", "compare", str(inc), str(disk)).strip(), "(QEMU's tool)")
            print("  ", run("qemu-img", "check", str(inc)).splitlines()[0])
        print("\nbackup demo: done")
        return 0
    finally:
        if os.environ.get("KEEP"):
            print(f"backup demo: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
