"""Unit tests of the io tool: argument parsing, output shapes, each command, the CLI.

Commands run against a raw driver over an in-memory node (``RawDriver(MemoryDriver)``, which
checks request bounds like a real image), so these tests need no files and no QEMU. The
expected texts were measured on qemu-io 7.2 (the interop tests compare against it live).
"""

from __future__ import annotations

import errno
import io
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitback.block.driver import BlockDriver, Extent
from bitback.block.drivers.memory import MemoryDriver
from bitback.block.drivers.raw import RawDriver
from bitback.tools.io import COMMAND_TABLE, CommandContext, io_ops, run_captured
from bitback.tools.io.cli import Options, main, parse_args
from bitback.tools.io.parsing import (
    CvtnumError,
    GetOpt,
    GetOptError,
    PatternError,
    breakline,
    cvtnum,
    parse_pattern,
    strtosz,
)
from bitback.tools.io.report import (
    cvtstr,
    dump_buffer,
    dump_specific_info,
    io_report,
    qdict_order,
    timestr,
)

MiB = 1 << 20


def mem_image(size: int = MiB, *, read_only: bool = False) -> RawDriver:
    return RawDriver(MemoryDriver(bytes(size)), read_only=read_only)


def run(
    driver: BlockDriver | None,
    *lines: str,
    writethrough: bool = False,
    discard: bool = True,
    no_flush: bool = False,
) -> tuple[bool, str, str]:
    """Run lines in one context; (all succeeded, stdout text, stderr text)."""
    out, err = io.StringIO(), io.StringIO()
    ctx = CommandContext(out, err, prog="bitback-io", writethrough=writethrough,
                         discard=discard, no_flush=no_flush)
    ok = True
    for line in lines:
        ok = COMMAND_TABLE.run(driver, line, ctx) and ok
    return ok, out.getvalue(), err.getvalue()


def no_timing(text: str) -> list[str]:
    """Drop the timing lines; they are the only output that varies from run to run."""
    return [line for line in text.splitlines() if " ops; " not in line]


# -- parsing ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("512", 512), ("1.5k", 1536), ("3b", 3), ("0x200", 512), ("1.1k", 1126), ("0.1k", 102),
        ("1.999k", 2047), ("0X10", 16), ("010", 10), ("+5", 5), ("1.", 1), ("1.k", 1024),
        ("1.0", 1), ("1.0b", 1), ("0.00001k", 0), ("1.00000000000000000001k", 1024),
        ("1K", 1024), ("64M", 64 * MiB), ("15872k", 15872 * 1024), ("5.k", 5120), ("1.e", 1 << 60),
    ],
)
def test_strtosz_accepts_what_qemu_io_7_2_accepts(text: str, value: int) -> None:
    assert strtosz(text) == value


@pytest.mark.parametrize(
    "text",
    ["abc", "1.1", "1e3", "0x1.8", ".5k", "1.5b", "1.0e0k", "1.2.3k", "0x", "1kk", "inf",
     "nan", "-5", "1kB", "", "99999999999999999999k"],
)
def test_strtosz_refuses_with_einval(text: str) -> None:
    with pytest.raises(CvtnumError) as info:
        cvtnum(text)
    assert info.value.errno == errno.EINVAL
    assert info.value.message == (
        f"Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {text}"
    )


@pytest.mark.parametrize("text", ["8E", "16E", "99999999999999999999", "0x8000000000000000"])
def test_cvtnum_too_large_is_erange(text: str) -> None:
    with pytest.raises(CvtnumError) as info:
        cvtnum(text)
    assert info.value.errno == errno.ERANGE
    assert info.value.message == f"Parsing error: argument too large -- {text}"


def test_hex_with_suffix_warns_like_qemu() -> None:
    warnings: list[str] = []
    assert strtosz("0x10k", warn=warnings.append) == 16384
    assert warnings == ["Using a multiplier suffix on hex numbers is deprecated: 0x10k"]


@settings(max_examples=300)
@given(
    whole=st.integers(0, 10**6),
    digits=st.text("0123456789", min_size=1, max_size=6),
    unit=st.sampled_from("kKmMgGtT"),
)
def test_strtosz_rounds_fractions_to_the_nearest_byte(whole: int, digits: str, unit: str) -> None:
    # With at most 6 decimals no value lies within double precision of a half byte, so QEMU's
    # 64.64 fixed-point result equals exact rational rounding (half up).
    shift = {"k": 10, "m": 20, "g": 30, "t": 40}[unit.lower()]
    exact = (whole + Fraction(int(digits), 10 ** len(digits))) * (1 << shift)
    assert strtosz(f"{whole}.{digits}{unit}") == int(exact + Fraction(1, 2))


@pytest.mark.parametrize(
    ("text", "value"),
    [("0xcd", 0xCD), ("0x41", 0x41), ("65", 65), ("0101", 65), ("0", 0), ("-0", 0), ("+7", 7),
     (" 5", 5), ("", 0), ("255", 255)],
)
def test_parse_pattern_uses_c_integer_syntax(text: str, value: int) -> None:
    assert parse_pattern(text) == value


@pytest.mark.parametrize("text", ["0x1234", "256", "-1", "08", "0x", "abc", "1k", "0x1ff"])
def test_parse_pattern_refuses_non_bytes(text: str) -> None:
    with pytest.raises(PatternError) as info:
        parse_pattern(text)
    assert info.value.message == f"{text} is not a valid pattern byte"


def test_getopt_permutes_like_glibc() -> None:
    opts = GetOpt(["write", "0", "-q", "512", "-P0x41"], "P:q")
    assert list(opts) == [("q", None), ("P", "0x41")]
    assert opts.operands == ["0", "512"]
    opts = GetOpt(["read", "-qv", "--", "-1", "2"], "qv")
    assert list(opts) == [("q", None), ("v", None)]
    assert opts.operands == ["-1", "2"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["write", "0", "-1"], "write: invalid option -- '1'"),
        (["read", "0", "512", "-P"], "read: option requires an argument -- 'P'"),
    ],
)
def test_getopt_errors_carry_glibc_text(argv: list[str], message: str) -> None:
    with pytest.raises(GetOptError, match=message):
        list(GetOpt(argv, "P:q"))


def test_getopt_long_options() -> None:
    longs = {"cmd": (True, "c"), "cache": (True, "t"), "read-only": (False, "r")}
    opts = GetOpt(["p", "--cmd=read 0 1", "--read", "--cache", "none", "img"], "c:t:r", longs)
    assert list(opts) == [("c", "read 0 1"), ("r", None), ("t", "none")]
    assert opts.operands == ["img"]
    with pytest.raises(GetOptError, match="ambiguous"):
        list(GetOpt(["p", "--c", "x"], "", longs))
    with pytest.raises(GetOptError, match="unrecognized option '--bogus'"):
        list(GetOpt(["p", "--bogus"], "", longs))


def test_breakline_splits_on_spaces_only() -> None:
    assert breakline("  write   0  512 ") == ["write", "0", "512"]
    assert breakline("write\t0 512") == ["write\t0", "512"]
    assert breakline("   ") == []


# -- output shapes ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "text"),
    [(0, "0 bytes"), (1, "1 bytes"), (512, "512 bytes"), (1536, "1.500 KiB"), (MiB, "1 MiB"),
     (64 * MiB, "64 MiB"), (0.846409, "0.846409 bytes"), (498.96, "498.960000 bytes"),
     (0x3DF0000, "61.938 MiB"), (2146435072, "1.999 GiB"), (float("inf"), "inf EiB"),
     (0.000123, "0 bytes")],
)
def test_cvtstr(value: float, text: str) -> None:
    assert cvtstr(value) == text


def test_timestr_short_and_long() -> None:
    assert timestr(1_234_000) == "00.00 sec"
    assert timestr(560_000_000) == "00.56 sec"
    assert timestr(10_120_000_000) == "0:00:10.12"
    assert timestr(3_725_500_000_000) == "1:02:05.50"
    assert timestr(0, verbose=True) == "0:00:00.00"


def test_io_report_shapes() -> None:
    assert io_report("wrote", 1_000_000, 0, 512, 512) == [
        "wrote 512/512 bytes at offset 0",
        "512 bytes, 1 ops; 00.00 sec (500 KiB/sec and 1000.0000 ops/sec)",
    ]
    assert io_report("read", 2_000_000_000, 5, 1024, 1024, machine=True) == [
        "1024,1,0:00:02.00,512.000,0.500"
    ]


def test_dump_buffer_matches_qemu_io() -> None:
    assert list(dump_buffer(b"ABABA", 0)) == ["00000000:  41 42 41 42 41  ABABA"]
    lines = list(dump_buffer(b"\xcd" * 20 + b"a-Z9", 0x1F0))
    assert lines == [
        "000001f0:  " + "cd " * 16 + " " + "." * 16,
        "00000200:  cd cd cd cd 61 2d 5a 39  ....a.Z9",
    ]


def test_specific_info_dump_uses_qdict_order() -> None:
    info = {
        "compat": "1.1", "compression-type": "zlib", "lazy-refcounts": False,
        "bitmaps": [{"flags": ["in-use", "auto"], "name": "b0", "granularity": 65536}],
        "refcount-bits": 16, "corrupt": False, "extended-l2": False,
    }
    # measured: qemu-io 7.2 "info" on a qcow2 image with one bitmap
    assert dump_specific_info(info) == [
        "    compat: 1.1",
        "    compression type: zlib",
        "    lazy refcounts: false",
        "    bitmaps:",
        "        [0]:",
        "            flags:",
        "                [0]: in-use",
        "                [1]: auto",
        "            name: b0",
        "            granularity: 65536",
        "    refcount bits: 16",
        "    corrupt: false",
        "    extended l2: false",
    ]
    assert qdict_order(["a", "a2"]) == qdict_order(["a", "a2"])  # deterministic


# -- commands ---------------------------------------------------------------------------------
def test_write_then_read_with_pattern() -> None:
    drv = mem_image()
    ok, out, err = run(drv, "write -P 0x41 512 1k", "read -P 0x41 512 1k", "read -v 508 8")
    assert ok and err == ""
    assert no_timing(out) == [
        "wrote 1024/1024 bytes at offset 512",
        "read 1024/1024 bytes at offset 512",
        "000001fc:  00 00 00 00 41 41 41 41  ....AAAA",
        "read 8/8 bytes at offset 508",
    ]
    assert drv.pread(0, 2048) == bytes(512) + b"A" * 1024 + bytes(512)
    assert "1 KiB, 1 ops; " in out and " ops/sec)" in out


def test_default_pattern_is_0xcd_and_q_is_quiet() -> None:
    drv = mem_image()
    assert run(drv, "write -q 0 3b", "read -q -P 0xcd 0 3") == (True, "", "")
    assert drv.pread(0, 4) == b"\xcd\xcd\xcd\x00"


def test_pattern_mismatch_fails_but_still_reports() -> None:
    ok, out, _ = run(mem_image(), "read -P 0x42 512 1k")
    assert not ok
    assert no_timing(out) == [
        "Pattern verification failed at offset 512, 1024 bytes",
        "read 1024/1024 bytes at offset 512",
    ]
    ok, out, _ = run(mem_image(), "read -P 0 -s 8 -l 4 0 16", "read -P 0 -l 20 0 16")
    assert not ok
    assert no_timing(out) == [
        "read 16/16 bytes at offset 0",
        "pattern verification range exceeds end of read data",
    ]


def test_past_the_end_is_an_io_error_and_writes_nothing() -> None:
    drv = mem_image()
    ok, out, _ = run(drv, "write 1023k 2k", "read 0 2M", "discard 2M 1", "write 1M 0")
    assert not ok
    assert no_timing(out) == [
        "write failed: Input/output error",
        "read failed: Input/output error",
        "discard failed: Input/output error",
        "wrote 0/0 bytes at offset 1048576",
    ]
    assert drv.pread(0, MiB) == bytes(MiB)


def test_parse_errors_print_on_stdout_and_getopt_errors_on_stderr() -> None:
    ok, out, err = run(mem_image(), "write -P 0x1234 0 512", "write 0 abc", "write 0 -1",
                       "read 0 3G", "write -u 0 1", "write -z -P 1 0 1")
    assert not ok
    assert out.splitlines() == [
        "0x1234 is not a valid pattern byte",
        "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- abc",
        "write [-bcCfnquz] [-P pattern | -s source_file] off len -- "
        "writes a number of bytes at a specified offset",
        "length cannot exceed 2147483136, given 3G",
        "-u requires -z to be specified",
        "Only one of -z, -P, and -s can be specified at the same time",
    ]
    assert err == "write: invalid option -- '1'\n"


def test_dispatcher_errors() -> None:
    ok, out, err = run(mem_image(), "nosuch 0", "read 0", "map 1", "alloc", "help nosuch", "")
    assert not ok
    assert out == "command nosuch not found\n"
    assert err.splitlines() == [
        'command "nosuch" not found',
        "bad argument count 1 to read, expected at least 2 arguments",
        "bad argument count 1 to map, expected 0 arguments",
        "bad argument count 0 to alloc, expected between 1 and 2 arguments",
    ]
    ok, out, err = run(None, "read 0 1", "sleep 0", "help flush")
    assert not ok
    assert err == "no file open, try 'help open'\n"
    assert out == "flush -- flush all in-core file state to disk\n"


def test_read_only_refuses_writes_before_parsing() -> None:
    ok, out, err = run(mem_image(read_only=True), "write -P 0x1ff 0 1", "discard 0 1",
                       "truncate 2M", "aio_write 0 1", "flush", "read 0 1")
    assert not ok
    assert err.splitlines() == ["bitback-io: Block node is read-only"] * 4
    assert no_timing(out) == ["read 1/1 bytes at offset 0"]


def test_zero_writes_and_discard() -> None:
    drv = mem_image()
    ok, out, _ = run(drv, "write -P 7 0 8k", "write -z -u 0 1k", "discard -q 4k 4k",
                     "read -P 0 0 1k", "read -P 7 1k 3k")
    assert ok
    assert no_timing(out) == [
        "wrote 8192/8192 bytes at offset 0",
        "wrote 1024/1024 bytes at offset 0",
        "read 1024/1024 bytes at offset 0",
        "read 3072/3072 bytes at offset 1024",
    ]


def test_discard_ignored_still_checks_bounds() -> None:
    drv = mem_image()
    ok, out, _ = run(drv, "write -P 7 0 4k", "discard 0 4k", "discard 1M 1", discard=False)
    assert not ok
    assert drv.pread(0, 4) == b"\x07" * 4
    assert no_timing(out)[-1] == "discard failed: Input/output error"


def test_writethrough_flushes_after_each_write() -> None:
    mem = MemoryDriver(bytes(MiB))
    drv = RawDriver(mem, read_only=False)
    run(drv, "write 0 1", "write -z 0 1", "read 0 1", writethrough=True)
    assert mem.flushes == 2
    run(drv, "write 0 1", "write -f 0 1", "flush")
    assert mem.flushes == 4
    run(drv, "write -f 0 1", "flush", no_flush=True)
    assert mem.flushes == 4


def test_vector_and_aio_commands() -> None:
    drv = mem_image()
    ok, out, _ = run(drv, "writev -P 5 0 512 1k", "readv -P 5 0 1k 512", "aio_write 1k 1k",
                     "aio_read -P 0xcd 1k 1k", "aio_flush", "aio_read -i 0 1")
    assert ok
    assert no_timing(out) == [
        "wrote 1536/1536 bytes at offset 0",
        "read 1536/1536 bytes at offset 0",
        "wrote 1024/1024 bytes at offset 1024",
        "read 1024/1024 bytes at offset 1024",
        "injecting invalid read request",
    ]
    # aio requests "succeed once submitted": errors and mismatches are printed, not failures
    ok, out, _ = run(drv, "aio_read 2M 512", "aio_read -P 1 0 512", "aio_write 2M 1")
    assert ok
    assert no_timing(out) == [
        "readv failed: Input/output error",
        "Pattern verification failed at offset 0, 512 bytes",
        "read 512/512 bytes at offset 0",
        "aio_write failed: Input/output error",
    ]
    ok, out, _ = run(drv, "readv -P 1 0 512", "readv 0 3G", "aio_write -z 0 1 1")
    assert not ok
    assert no_timing(out)[1:] == [
        "read 512/512 bytes at offset 0",
        "Argument '3G' exceeds maximum size 2147483136",
        "-z supports only a single length parameter",
    ]


def test_write_from_source_file(tmp_path: Path) -> None:
    src = tmp_path / "pat.bin"
    src.write_bytes(b"AB")
    (tmp_path / "empty.bin").write_bytes(b"")
    drv = mem_image()
    ok, _, err = run(drv, f"write -s {src} 0 5", f"write -s {tmp_path}/none 0 1",
                       f"write -s {tmp_path}/empty.bin 0 1")
    assert not ok
    assert drv.pread(0, 6) == b"ABABA\x00"
    assert err.splitlines() == [
        f"{tmp_path}/none: No such file or directory",
        f"{tmp_path}/empty.bin: file is empty",
    ]


def test_compressed_and_vmstate_are_unsupported_on_raw() -> None:
    ok, out, _ = run(mem_image(), "write -c 0 512", "write -c 1 512", "read -b 0 512")
    assert not ok
    assert out.splitlines() == [
        "write failed: Operation not supported",
        "1 is not a sector-aligned value for 'offset'",
        "read failed: Operation not supported",
    ]


def test_length_truncate_info() -> None:
    drv = mem_image()
    ok, out, err = run(drv, "length", "truncate 2M", "length", "t 512k", "l",
                       "truncate -m bogus 1M", "truncate abc", "info")
    assert not ok
    assert out.splitlines() == [
        "1 MiB", "2 MiB", "512 KiB",
        "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- abc",
        "format name: raw", "cluster size: 0 bytes", "vm state offset: 0 bytes",
    ]
    assert err == "bitback-io: Invalid preallocation mode 'bogus'\n"


class _Runs(MemoryDriver):
    """A node whose allocation alternates every 64 KiB, reported in 16 KiB extents."""

    def block_status(self, offset: int, length: int) -> Extent:
        n = min(length, 16384 - offset % 16384, self.length() - offset)
        return Extent(offset, n, allocated=(offset // 65536) % 2 == 0, zero=False, data=True)


def test_map_merges_runs_and_alloc_counts() -> None:
    drv = _Runs(bytes(3 * 65536 + 4096))
    ok, out, _ = run(drv, "map", "alloc 0", "alloc 60k 8k", "alloc 3M", "alloc 192k 1M")
    assert ok
    assert out.splitlines() == [
        "64 KiB (0x10000) bytes     allocated at offset 0 bytes (0x0)",
        "64 KiB (0x10000) bytes not allocated at offset 64 KiB (0x10000)",
        "64 KiB (0x10000) bytes     allocated at offset 128 KiB (0x20000)",
        "4 KiB (0x1000) bytes not allocated at offset 192 KiB (0x30000)",
        "512/512 bytes allocated at offset 0 bytes",
        "4096/8192 bytes allocated at offset 60 KiB",
        "0/0 bytes allocated at offset 3 MiB",
        "0/4096 bytes allocated at offset 192 KiB",
    ]


def test_help_lists_sorted_commands_and_extended_help() -> None:
    ok, out, _ = run(None, "help")
    assert ok
    lines = out.splitlines()
    assert lines[-2:] == ["", "Use 'help commandname' for extended help."]
    names = [line.split(" ")[0] for line in lines[:-2]]
    assert names == sorted(names) and "read" in names
    assert "map  -- prints the allocated areas of a file" in lines
    ok, out, _ = run(None, "help r")
    assert out.startswith("r [-abCqv] [-P pattern [-s off] [-l len]] off len -- reads")
    assert out.endswith(" -v, -- dump buffer to standard output\n\n")


def test_sleep_validates_its_number() -> None:
    assert run(None, "sleep 0", "sleep 0x1") == (True, "", "")
    ok, out, _ = run(None, "sleep abc", "sleep -1")
    assert not ok
    assert out.splitlines() == ["abc is not a valid number", "-1 is not a valid number"]


def test_run_captured_merges_streams() -> None:
    drv = mem_image()
    ok, text = run_captured(drv, "write -P 0xab 0 512")
    assert ok and text.startswith("wrote 512/512 bytes at offset 0\n")
    ok, text = run_captured(drv, "nosuch")
    assert not ok and text == 'command "nosuch" not found\n'


def test_large_requests_go_in_chunks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(io_ops, "CHUNK", 1000)
    mem = MemoryDriver(bytes(10_000))
    writes: list[tuple[int, int]] = []
    real_pwrite = mem.pwrite

    def spy(offset: int, data: bytes | bytearray | memoryview) -> None:
        writes.append((offset, len(data)))
        real_pwrite(offset, data)

    monkeypatch.setattr(mem, "pwrite", spy)
    drv = RawDriver(mem, read_only=False)
    src = tmp_path / "abc"
    src.write_bytes(b"abc")
    ok, out, _ = run(drv, f"write -s {src} 100 2500", "read -P 0x61 9999 1", "write 9000 1241")
    assert writes == [(100, 1000), (1100, 1000), (2100, 500)]  # the failing one wrote nothing
    assert mem.data[100:2600] == (b"abc" * 834)[:2500]
    assert no_timing(out)[-1] == "write failed: Input/output error"
    ok, out, _ = run(drv, "read -P 0x63 2598 1", "read -P 0xcd -s 2 -l 2997 2598 2999")
    assert not ok
    assert no_timing(out)[1] == "Pattern verification failed at offset 2600, 2997 bytes"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["write -P 0x5a", "write -z", "write", "discard"]),
                          st.integers(0, 4095), st.integers(0, 2048)), max_size=12))
def test_commands_agree_with_a_bytearray_model(ops: list[tuple[str, int, int]]) -> None:
    drv = mem_image(4096)
    model = bytearray(4096)
    for verb, offset, length in ops:
        ok, _, _ = run(drv, f"{verb} {offset} {length}")
        assert ok == (offset + length <= 4096)
        if ok and verb != "discard":  # discard of a memory node keeps the data
            fill = {"write -P 0x5a": 0x5A, "write -z": 0, "write": 0xCD}[verb]
            model[offset : offset + length] = bytes([fill]) * length
    assert drv.pread(0, 4096) == bytes(model)


# -- the command line -------------------------------------------------------------------------
def test_parse_args() -> None:
    opts = parse_args(["-f", "raw", "-c", "read 0 1", "--cmd=flush", "-r", "-t", "writeback",
                       "img"])
    assert opts == Options(commands=["read 0 1", "flush"], fmt="raw", read_only=True,
                           writethrough=False, filename="img")
    assert parse_args(["-n", "-d", "ignore"]).discard is False
    assert parse_args(["-t", "unsafe"]).no_flush is True
    assert parse_args(["--aio=threads", "-k", "-m", "-T", "x", "i"]).filename == "i"


def raw_file(tmp_path: Path, size: int = MiB) -> str:
    path = tmp_path / "r.img"
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-Z"], "bitback-io: invalid option -- 'Z'"),
        (["--bogus"], "bitback-io: unrecognized option '--bogus'"),
        (["-t", "nosuch"], "bitback-io: Invalid cache option: nosuch"),
        (["-f", "nosuch", "-c", "read 0 1", "{img}"],
         "bitback-io: can't open device {img}: Unknown driver 'nosuch'"),
        (["-c", "read 0 1", "{img}.none"],
         "bitback-io: can't open device {img}.none: Could not open '{img}.none': "
         "No such file or directory"),
        (["a", "b"], "bitback-io: unexpected argument 'b': only one image can be given"),
        (["-s", "x"], "bitback-io: option -s (--snapshot) is not supported by bitback-io"),
        (["-i", "bogus"], "bitback-io: Invalid aio option: bogus"),
    ],
)
def test_bad_command_lines_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    img = raw_file(tmp_path)
    assert main([a.replace("{img}", img) for a in argv]) == 1
    captured = capsys.readouterr()
    assert captured.err == message.replace("{img}", img) + "\n"
    assert captured.out == ""


def test_main_runs_every_command_and_fails_if_one_did(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    img = raw_file(tmp_path)
    assert main(["-f", "raw", "-c", "write -P 0x1ff 0 1", "-c", "write 0 1", img]) == 1
    assert no_timing(capsys.readouterr().out) == [
        "0x1ff is not a valid pattern byte", "wrote 1/1 bytes at offset 0"]
    assert main(["-f", "raw", "-c", "read -P 0xcd 0 1", "-c", "quit", "-c", "nosuch", img]) == 0
    assert main(["-f", "raw", "-c", "close", "-c", "read 0 1", img]) == 1
    assert capsys.readouterr().err.endswith("no file open, try 'help open'\n")


def test_probing_raw_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = raw_file(tmp_path)
    assert main(["-c", "length", img]) == 0
    captured = capsys.readouterr()
    assert captured.out == "1 MiB\n"
    assert captured.err.startswith(
        f"WARNING: Image format was not specified for '{img}' and probing guessed raw.\n"
    )


def test_interactive_mode_reads_stdin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    img = raw_file(tmp_path)
    monkeypatch.setattr("sys.stdin", io.StringIO("write 0 512\nread -P 1 0 1\nquit\nlength\n"))
    assert main(["-f", "raw", img]) == 1
    out = capsys.readouterr().out
    assert no_timing(out) == [
        "qemu-io> wrote 512/512 bytes at offset 0",
        "qemu-io> Pattern verification failed at offset 0, 1 bytes",
        "read 1/1 bytes at offset 0",
        "qemu-io> ",  # the prompt that read "quit"
    ]
    monkeypatch.setattr("sys.stdin", io.StringIO("length"))
    assert main(["-f", "raw", img]) == 0
    assert capsys.readouterr().out == "qemu-io> 1 MiB\nqemu-io> "


def test_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-h"]) == 0
    assert capsys.readouterr().out.startswith("Usage: bitback-io [OPTIONS]...")
    assert main(["-V"]) == 0
    assert capsys.readouterr().out.startswith("bitback-io version ")
