"""bitbackd's life as a process: start-up, refused start-ups, serving, and every way out.

The daemon runs as a subprocess; QMP goes over real UNIX sockets, with the raw client of
:mod:`helpers.qmpraw` or, for the harness-style command line, :class:`helpers.vm.VM`. Images
written through the daemon are checked afterwards with QEMU 7.2's own ``qemu-img`` and
``qemu-io``. Error texts are QEMU 7.2's (measured on this machine with
``qemu-system-x86_64``), with ``bitbackd`` in place of the program name.
"""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.procs import run
from helpers.qmpraw import DaemonPool, RawQMP, Running
from helpers.tools import bitback_argv
from helpers.vm import VM, drive_args

pytestmark = pytest.mark.timeout(60)

WRITES = [("0x5a", 0, 65536), ("0xa5", 1 << 20, 4096), ("0x3c", (64 << 20) - 512, 512)]


@pytest.fixture
def pool() -> Iterator[DaemonPool]:
    with DaemonPool() as daemons:
        yield daemons


def bitbackd(*args: str, timeout: float = 30) -> tuple[int, str, str]:
    """Run bitbackd to completion: (exit status, stdout, stderr)."""
    res = run([*bitback_argv("bitbackd"), *args], timeout=timeout)
    return res.returncode, res.stdout, res.stderr


def assert_one_line_error(stderr: str, expected: str) -> None:
    """A refused start-up prints exactly ``bitbackd: EXPECTED`` and nothing else."""
    assert "Traceback" not in stderr, stderr
    assert stderr == f"bitbackd: {expected}\n"


def assert_no_traceback(daemon: Running) -> None:
    """The daemon's stderr holds no Python traceback."""
    assert "Traceback" not in daemon.stderr, daemon.stderr


# -- quit ----------------------------------------------------------------------------------


def test_quit_event_reply_eof_exit_0(pool: DaemonPool) -> None:
    """``quit``: the SHUTDOWN event ``{"guest": false, "reason": "host-qmp-quit"}`` comes
    before the ``{}`` reply, in QEMU's exact bytes, then the connection closes and the
    process exits 0. Another negotiated client gets the event then EOF; an unnegotiated one
    gets EOF only (QEMU 7.2's multi-monitor quit, probe summary case 6b)."""
    daemon, sock = pool.serve()
    with (
        RawQMP.connect(sock) as actor,
        RawQMP.connect(sock) as other,
        RawQMP.connect(sock) as silent,
    ):
        actor.negotiate()
        other.negotiate()
        start = len(actor.received)
        actor.send(b'{"execute": "quit"}')
        messages = actor.wait_eof()
        assert [m.get("event") for m in messages] == ["SHUTDOWN", None]
        assert messages[0]["data"] == {"guest": False, "reason": "host-qmp-quit"}
        assert messages[1] == {"return": {}}
        event_bytes, reply_bytes, rest = bytes(actor.received[start:]).split(b"\r\n")
        assert event_bytes.startswith(b'{"timestamp": {"seconds": ')
        assert event_bytes.endswith(
            b'}, "event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}}'
        )
        assert (reply_bytes, rest) == (b'{"return": {}}', b"")
        others = other.wait_eof()
        assert [m["event"] for m in others] == ["SHUTDOWN"]
        assert silent.wait_eof() == []
    assert daemon.wait() == 0
    assert_no_traceback(daemon)


# -- exits that keep the data ----------------------------------------------------------


def write_through_daemon(qmp: RawQMP) -> None:
    for pattern, offset, length in WRITES:
        out = qmp.ok(
            "human-monitor-command",
            {"command-line": f'qemu-io drive0 "write -P {pattern} {offset} {length}"'},
        )
        assert f"wrote {length}/{length} bytes at offset {offset}" in out, out


@pytest.mark.qemu
@pytest.mark.parametrize("how", ["quit", "SIGTERM", "SIGINT"])
def test_exit_flushes_and_closes_the_image(
    pool: DaemonPool, tmp_path: Path, qemu_img: str, qemu_io: str, how: str
) -> None:
    """``quit``, SIGTERM and SIGINT all end with exit status 0 and an image that real
    ``qemu-img check`` finds clean and real ``qemu-io`` reads the written data back from,
    identical to the same writes done by real qemu-io. Signals are announced like QEMU
    does: SHUTDOWN ``{"guest": false, "reason": "host-signal"}``, then EOF."""
    image, reference = tmp_path / "disk.qcow2", tmp_path / "ref.qcow2"
    for path in (image, reference):
        run([qemu_img, "create", "-f", "qcow2", path, "64M"], check=True)
    commands = [f"write -P {p} {o} {n}" for p, o, n in WRITES]
    run([qemu_io, *[a for c in commands for a in ("-c", c)], reference], check=True)

    daemon, sock = pool.serve("-drive", f"if=virtio,id=drive0,file={image},format=qcow2")
    with RawQMP.connect(sock) as qmp:
        qmp.negotiate()
        write_through_daemon(qmp)
        if how == "quit":
            qmp.send_json({"execute": "quit"})
            reason = "host-qmp-quit"
        else:
            daemon.signal(getattr(signal, how))
            reason = "host-signal"
        messages = qmp.wait_eof()
    assert messages[0]["event"] == "SHUTDOWN"
    assert messages[0]["data"] == {"guest": False, "reason": reason}
    assert daemon.wait() == 0
    assert_no_traceback(daemon)

    check = run([qemu_img, "check", image])
    assert check.returncode == 0, check.stdout + check.stderr
    assert "No errors were found on the image." in check.stdout
    reads = [a for p, o, n in WRITES for a in ("-c", f"read -P {p} {o} {n}")]
    res = run([qemu_io, "-f", "qcow2", *reads, image])
    assert res.returncode == 0 and "Pattern verification failed" not in res.stdout, res.stdout
    cmp = run([qemu_img, "compare", image, reference])
    assert (cmp.returncode, cmp.stdout) == (0, "Images are identical.\n"), cmp.stderr


def test_pidfile(pool: DaemonPool) -> None:
    """``--pidfile P``: written with the daemon's pid while it runs, removed at exit (which
    here is a ``quit`` with an ``id``: the reply echoes it, and the exit is still clean)."""
    pidfile = Path(pool.path("d.pid"))
    sock = pool.path("p.sock")
    daemon = pool.start(["--pidfile", str(pidfile), "--qmp", sock], wait_for=[sock])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # written just after the socket is ready
        if pidfile.exists() and pidfile.read_text().endswith("\n"):
            break
        time.sleep(0.02)
    assert pidfile.read_text() == f"{daemon.pid}\n"
    with RawQMP.connect(sock) as qmp:
        qmp.negotiate()
        assert qmp.ok("query-status")["status"] == "prelaunch"
        assert pidfile.read_text() == f"{daemon.pid}\n"
        qmp.send_json({"execute": "quit", "id": "bye"})
        assert qmp.wait_eof()[-1] == {"return": {}, "id": "bye"}
    assert daemon.wait() == 0
    assert not pidfile.exists()


# -- the harness command line -----------------------------------------------------------


def test_harness_command_line(tmp_path: Path, bitback_img: list[str]) -> None:
    """The seed harness's command line (spec section 1): bitbackd connects as a client to
    the harness's socket, ignores the emulator-only options (``-nodefaults -display none
    -accel tcg -S``, here also ``-machine`` and ``-m``), opens the ``-drive`` as ``drive0``
    and exits 0 on ``quit``, with nothing on stderr."""
    image = tmp_path / "disk.qcow2"
    run([*bitback_img, "create", "-f", "qcow2", image, "64M"], check=True)
    with VM("bitback", [*drive_args(image), "-machine", "pc", "-m", "256"], timeout=30) as vm:
        assert vm.ok("query-status") == {
            "status": "prelaunch",
            "singlestep": False,
            "running": False,
        }
        (block,) = vm.ok("query-block")
        assert block["device"] == "drive0"
        assert block["inserted"]["image"]["virtual-size"] == 64 << 20
        vm.ok("block-dirty-bitmap-add", node="drive0", name="bitmap0")
        assert vm.bitmap_info("drive0", "bitmap0")["granularity"] == 65536
        assert vm.shutdown() == 0
        assert vm.stderr == ""


def test_harness_disconnect_keeps_daemon() -> None:
    """When the harness side of a client-mode monitor goes away the daemon keeps running
    (as QEMU does), and still exits 0 on SIGTERM."""
    with VM("bitback", timeout=30) as vm:
        assert vm.ok("query-status")["status"] == "prelaunch"
        assert vm.monitor is not None and vm.proc is not None
        vm.monitor.close()
        time.sleep(0.3)
        assert vm.proc.poll() is None
        vm.proc.terminate()
        assert vm.proc.wait(timeout=30) == 0


@pytest.mark.parametrize("kind", ["missing", "stale"])
def test_client_chardev_without_listener(pool: DaemonPool, kind: str) -> None:
    """A client-mode chardev whose path has no listener: exit 1 with QEMU's one line,
    ``-chardev ...: Failed to connect to 'P': <strerror>``, and no traceback. A missing path
    is ENOENT; a socket file nobody listens on is ECONNREFUSED."""
    path = pool.path(f"{kind}.sock")
    if kind == "stale":
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
            stale.bind(path)  # the file stays; nobody listens
    reason = {"missing": "No such file or directory", "stale": "Connection refused"}[kind]
    opt = f"socket,id=mon,path={path}"
    rc, out, err = bitbackd("-S", "-chardev", opt, "-mon", "chardev=mon,mode=control")
    assert (rc, out) == (1, "")
    assert_one_line_error(err, f"-chardev {opt}: Failed to connect to '{path}': {reason}")


def test_drive_with_missing_file(pool: DaemonPool) -> None:
    """A ``-drive`` whose file does not exist: exit 1, one line naming the option as typed
    and QEMU's ``Could not open 'F': No such file or directory``; the monitor socket given
    after it is never created."""
    missing = pool.path("missing.qcow2")
    sock = pool.path("never.sock")
    drive = f"if=virtio,id=drive0,file={missing},format=qcow2"
    rc, out, err = bitbackd("--qmp", sock, "-drive", drive)
    assert (rc, out) == (1, "")
    assert_one_line_error(
        err, f"-drive {drive}: Could not open '{missing}': No such file or directory"
    )
    assert not Path(sock).exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["-bogus"], "-bogus: invalid option"),
        (["-mon", "chardev=nosuch,mode=control"],
         '-mon chardev=nosuch,mode=control: chardev "nosuch" not found'),
    ],
    ids=["unknown-option", "mon-without-chardev"],
)  # fmt: skip
def test_bad_command_lines(args: list[str], expected: str) -> None:
    """A refused command line: exit 1, nothing on stdout, one line on stderr, QEMU 7.2's
    text (a couple of cases: the parser has unit tests of its own)."""
    rc, out, err = bitbackd(*args)
    assert (rc, out) == (1, "")
    assert_one_line_error(err, expected)


def test_unwritable_pidfile(pool: DaemonPool) -> None:
    """A pid file that cannot be created: exit 1 with QEMU 7.2's one line (measured:
    ``cannot create PID file: Could not create 'P': No such file or directory``), no
    traceback."""
    pidfile = pool.path("no-such-dir/d.pid")
    rc, out, err = bitbackd("--pidfile", pidfile, "--qmp", pool.path("pf.sock"))
    assert (rc, out) == (1, "")
    assert_one_line_error(
        err, f"cannot create PID file: Could not create '{pidfile}': No such file or directory"
    )


def test_listening_socket_cannot_be_bound(pool: DaemonPool) -> None:
    """A listening monitor whose socket cannot be created (its directory does not exist):
    exit 1 with QEMU 7.2's one line (measured: ``-qmp unix:P,server=on,wait=off: Failed to
    bind socket to P: No such file or directory``), no traceback. (``--chardev
    socket,...,server=on`` and ``--qmp P`` fail the same way today.)"""
    path = pool.path("no-such-dir/s.sock")
    value = f"unix:{path},server=on,wait=off"
    rc, out, err = bitbackd("-qmp", value)
    assert (rc, out) == (1, "")
    assert_one_line_error(
        err, f"-qmp {value}: Failed to bind socket to {path}: No such file or directory"
    )


def test_drive_on_directory(pool: DaemonPool) -> None:
    """A ``-drive`` whose file is a directory: exit 1, QEMU 7.2's one line (measured)."""
    directory = pool.path("")
    drive = f"if=virtio,id=drive0,file={directory},format=qcow2"
    rc, out, err = bitbackd("-drive", drive)
    assert (rc, out) == (1, "")
    assert_one_line_error(
        err, f"-drive {drive}: 'file' driver requires '{directory}' to be a regular file"
    )


def test_help() -> None:
    """``--help`` prints the usage on stdout and exits 0."""
    rc, out, err = bitbackd("--help")
    assert (rc, err) == (0, "")
    assert out.startswith("Usage: bitbackd [options]\n")
    for option in ("--qmp", "-chardev", "-drive", "--pidfile"):
        assert option in out


# -- listening monitors ----------------------------------------------------------------


def test_wait_on_serves_first_client(pool: DaemonPool) -> None:
    """``-qmp unix:P,server=on,wait=on``: the daemon waits, alive, for its first client,
    which then gets the greeting and is served normally."""
    sock = pool.path("w.sock")
    daemon = pool.start(["-qmp", f"unix:{sock},server=on,wait=on"], wait_for=[sock], probe=False)
    time.sleep(0.2)
    assert daemon.alive()
    with RawQMP.connect(sock, retry=5) as qmp:
        assert "QMP" in qmp.greeting
        qmp.negotiate()
        assert qmp.ok("query-status")["status"] == "prelaunch"
        qmp.send_json({"execute": "quit"})
        qmp.wait_eof()
    assert daemon.wait() == 0


def test_client_disconnect_does_not_stop_daemon(pool: DaemonPool) -> None:
    """Clients leaving a listening socket (after negotiating, before it, or in the middle
    of a message) do not stop the daemon; the next client connects and is served."""
    daemon, sock = pool.serve()
    with RawQMP.connect(sock) as first:
        first.negotiate()
        first.ok("query-status")
    with RawQMP.connect(sock):
        pass
    with RawQMP.connect(sock) as partial:
        partial.send(b'{"execute": "query-st')
    time.sleep(0.2)
    assert daemon.alive()
    with RawQMP.connect(sock) as again:
        again.negotiate()  # a new session: negotiation again, state of its own
        assert again.ok("query-status")["status"] == "prelaunch"
        again.send_json({"execute": "quit"})
        again.wait_eof()
    assert daemon.wait() == 0
    assert_no_traceback(daemon)
