"""Compressed clusters: raw deflate (zlib, window 4 KiB) and zstd, as qcow2 stores them."""

from __future__ import annotations

import zlib
from typing import Any

from bitback.errors import ImageCorruptError, UnsupportedFeatureError

__all__ = ["ZLIB", "ZSTD", "compress", "decompress"]

ZLIB = 0
ZSTD = 1
_WBITS = -12  # raw deflate stream, 4 KiB window: what QEMU writes and expects


def compress(data: bytes, compression_type: int) -> bytes:
    """Compress one cluster."""
    if compression_type == ZSTD:
        return bytes(_zstd().ZstdCompressor().compress(data))
    obj = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, _WBITS)
    return obj.compress(data) + obj.flush()


def decompress(raw: bytes, cluster_size: int, compression_type: int) -> bytes:
    """Decompress one cluster; the stored range may carry trailing bytes of others."""
    try:
        if compression_type == ZSTD:
            out = _zstd().ZstdDecompressor().decompressobj().decompress(raw)
        else:
            out = zlib.decompressobj(_WBITS).decompress(raw, cluster_size)
    except Exception as exc:  # zlib.error, zstd.ZstdError
        raise ImageCorruptError(f"Could not decompress a compressed cluster: {exc}") from exc
    if len(out) < cluster_size:
        raise ImageCorruptError("Compressed cluster decompresses to less than a cluster")
    return bytes(out[:cluster_size])


def _zstd() -> Any:
    try:
        import zstandard
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise UnsupportedFeatureError("zstd compression needs the 'zstandard' package") from exc
    return zstandard
