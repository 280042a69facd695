"""bitback-img's command-line parsing: getopt as qemu-img uses it, sizes, -o lists, JSON."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bitback.errors import InvalidArgumentError
from bitback.qjson import dumps_pretty, qdict_order, quote
from bitback.tools.img.options import (
    OptionList,
    OptSpec,
    RangeError,
    UsageError,
    cvtnum,
    getopt,
    split_option_list,
    strtosz,
    valid_option_list,
)
from bitback.tools.img.progress import Progress

SPEC = OptSpec("hf:UF:", {"output": (True, "output"), "backing-chain": (False, "chain")})


def test_getopt_permutes_options_after_operands() -> None:
    opts, ops = getopt(["create", "a.qcow2", "64M", "-f", "qcow2", "-U"], SPEC)
    assert opts == [("f", "qcow2"), ("U", None)]
    assert ops == ["a.qcow2", "64M"]


def test_getopt_clusters_attached_values_and_double_dash() -> None:
    opts, ops = getopt(["info", "-Ufraw", "--", "-f", "x"], SPEC)
    assert opts == [("U", None), ("f", "raw")]
    assert ops == ["-f", "x"]


def test_getopt_long_options_prefixes_and_values() -> None:
    opts, _ = getopt(["info", "--outp=json", "--back", "--output", "human", "f"], SPEC)
    assert opts == [("output", "json"), ("chain", None), ("output", "human")]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["info", "-xU", "f"], "unrecognized option 'info'"),  # qemu quotes argv[optind-1]
        (["info", "f", "-xU"], "unrecognized option 'f'"),
        (["info", "-Ux", "f"], "unrecognized option '-Ux'"),
        (["info", "--foo"], "unrecognized option '--foo'"),
        (["info", "--backing-chain=1"], "unrecognized option '--backing-chain=1'"),
        (["info", "f", "--output"], "missing argument for option '--output'"),
        (["info", "f", "-Uf"], "missing argument for option '-Uf'"),
    ],
)
def test_getopt_errors_quote_what_qemu_img_quotes(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError) as err:
        getopt(argv, SPEC)
    assert str(err.value) == f"{message} (try 'bitback-img --help' for more information)"


def test_getopt_without_permutation_stops_at_first_operand() -> None:
    opts, ops = getopt(["bitback-img", "-h", "info", "-f", "raw"], SPEC, permute=False)
    assert opts == [("h", None)]
    assert ops == ["info", "-f", "raw"]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("512", 512),
        ("64k", 65536),
        ("1.5k", 1536),
        ("1.1k", 1126),
        ("0.5k", 512),
        ("1.0000000001k", 1024),
        ("0x200", 512),
        ("1K", 1024),
        (" 1k", 1024),
        ("1.k", 1024),
        ("15872k", 15872 << 10),
        ("8E", 8 << 60),
        ("+4", 4),
        ("0", 0),
    ],
)
def test_strtosz_accepts_what_qemu_accepts(text: str, value: int) -> None:
    assert strtosz(text) == value


@pytest.mark.parametrize(
    "text", ["", ".5k", "1.5", "1.5b", "0x1.8k", "1k5", "1 k", "1kB", "1e3", "-5", "abc", "0x"]
)
def test_strtosz_refuses_what_qemu_refuses(text: str) -> None:
    with pytest.raises(InvalidArgumentError):
        strtosz(text)


def test_strtosz_range_error_past_2_64() -> None:
    with pytest.raises(RangeError):
        strtosz("16E")
    assert strtosz("18446744073709551615") == (1 << 64) - 1


@given(st.integers(min_value=0, max_value=(1 << 24) - 1), st.sampled_from("bkmgt"))
def test_strtosz_integers_with_units(n: int, unit: str) -> None:
    shift = {"b": 0, "k": 10, "m": 20, "g": 30, "t": 40}[unit]
    assert strtosz(f"{n}{unit}") == n << shift


def test_cvtnum_messages() -> None:
    with pytest.raises(InvalidArgumentError) as err:
        cvtnum("image size", "1x")
    assert str(err.value) == (
        "Invalid image size specified. You may use k, M, G, T, P or E suffixes for "
        "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
    )
    with pytest.raises(RangeError) as err2:
        cvtnum("image size", "9E")
    assert str(err2.value) == (
        "Invalid image size specified. Must be between 0 and 9223372036854775807."
    )


def test_option_lists() -> None:
    assert split_option_list("a=1,b=x,,y,c") == [("a", "1"), ("b", "x,y"), ("c", None)]
    assert valid_option_list("a=1,,")
    assert not valid_option_list("a=1,")
    assert not valid_option_list(",a=1")
    assert not valid_option_list("")


def test_option_list_types_and_messages() -> None:
    opts = OptionList({"cluster_size": "size", "refcount_bits": "number", "lazy": "bool"})
    opts.parse("cluster_size=64k,refcount_bits=0x10,lazy")
    assert opts.printed("cluster_size") == "65536"
    assert opts.printed("refcount_bits") == "16"
    assert opts.get_bool("lazy") is True
    cases = {
        "foo=1": "Invalid parameter 'foo'",
        "refcount_bits=abc": "Parameter 'refcount_bits' expects a number",
        "lazy=maybe": "Parameter 'lazy' expects 'on' or 'off'",
        "cluster_size=16E": "Value '16E' is out of range for parameter 'cluster_size'",
    }
    for text, message in cases.items():
        with pytest.raises(InvalidArgumentError) as err:
            opts.parse(text)
        assert str(err.value) == message
    with pytest.raises(InvalidArgumentError) as err:
        opts.parse("cluster_size=abc")
    assert str(err.value).startswith(
        "Parameter 'cluster_size' expects a non-negative number below 2^64. Optional suffix"
    )


def test_qdict_order_matches_qemu_img_info() -> None:
    keys = [
        "filename",
        "format",
        "dirty-flag",
        "actual-size",
        "virtual-size",
        "cluster-size",
        "backing-filename",
        "full-backing-filename",
        "backing-filename-format",
        "format-specific",
    ]
    assert qdict_order(keys) == [
        "backing-filename-format",
        "virtual-size",
        "filename",
        "cluster-size",
        "format",
        "actual-size",
        "format-specific",
        "full-backing-filename",
        "backing-filename",
        "dirty-flag",
    ]


def test_dumps_pretty_layout_and_escapes() -> None:
    # Empty containers close on a line of their own, as QEMU 7.2's JSON writer does
    # (``qemu-img info`` of a bitmap without flags prints ``"flags": [`` then ``]``).
    assert dumps_pretty({"type": "qcow2", "data": {}}) == (
        '{\n    "type": "qcow2",\n    "data": {\n    }\n}'
    )
    assert dumps_pretty({"type": []}) == '{\n    "type": [\n    ]\n}'
    assert dumps_pretty([{"a": True}]) == '[\n    {\n        "a": true\n    }\n]'
    assert quote('é"\n\x7f😀') == '"\\u00E9\\"\\n\\u007F\\uD83D\\uDE00"'


def test_progress_prints_like_qemu(capsys: pytest.CaptureFixture[str]) -> None:
    meter = Progress(True, 2.0)
    meter.print(0, 100)
    for _ in range(4):
        meter.print(1, 100)  # 1% steps: printed when more than 2% since the last print
    meter.print(100, 0)
    meter.end()
    assert capsys.readouterr().out == ("    (0.00/100%)\r    (3.00/100%)\r    (100.00/100%)\r\n")
    quiet = Progress(False, 2.0)
    quiet.print(50, 0)
    quiet.end()
    assert capsys.readouterr().out == ""
