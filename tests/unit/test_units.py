"""Size parsing and printing follow qemu_strtosz and size_to_str."""

from __future__ import annotations

import pytest

from bitback.errors import InvalidArgumentError
from bitback.units import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("512", 512),
        ("32k", 32 << 10),
        ("64K", 64 << 10),
        ("1M", 1 << 20),
        ("15872k", 15872 << 10),
        ("32736k", (32 << 20) - (32 << 10)),
        ("1.5M", 3 << 19),
        ("0x200", 512),
        ("2G", 2 << 30),
        ("1T", 1 << 40),
        ("3b", 3),
        ("0", 0),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "abc", "-1", "1.5", "12Q", "1k2", "0x1.5k", "8E"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(InvalidArgumentError):
        parse_size(text)


@pytest.mark.parametrize(
    ("size", "text"),
    [(512, "512 B"), (64 << 20, "64 MiB"), (196616, "192 KiB"), (65 << 20, "65 MiB"),
     (3 << 29, "1.5 GiB"), (1 << 40, "1 TiB")],
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text
