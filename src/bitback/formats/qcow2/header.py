"""qcow2 header and header extensions: pure codec, no I/O.

Field names are those of ``docs/interop/qcow2.txt``. ``decode_header`` turns the first cluster
of an image into a :class:`Header`; ``validate_header`` checks it against the file size and
bitback's limits (a separate step, so tools can print what a broken header says);
``encode_header`` produces the bytes of cluster 0.

Layout of cluster 0 as bitback (and qemu-img 7.2) writes it::

    0      header (112 bytes for v3: 104 + compression_type + padding)
    112    extensions: {u32 type, u32 length, data, pad to 8} ... {0, 0}
    ...    backing file name (not NUL-terminated)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace

from bitback.errors import ImageFormatError, UnsupportedFeatureError

__all__ = [
    "AUTOCLEAR_BITMAPS",
    "AUTOCLEAR_DATA_FILE_RAW",
    "COMPAT_LAZY_REFCOUNTS",
    "EXT_BACKING_FORMAT",
    "EXT_BITMAPS",
    "EXT_CRYPTO",
    "EXT_DATA_FILE",
    "EXT_END",
    "EXT_FEATURE_TABLE",
    "INCOMPAT_COMPRESSION",
    "INCOMPAT_CORRUPT",
    "INCOMPAT_DATA_FILE",
    "INCOMPAT_DIRTY",
    "INCOMPAT_EXTL2",
    "MAGIC",
    "MAX_CLUSTER_BITS",
    "MIN_CLUSTER_BITS",
    "Extension",
    "Header",
    "decode_header",
    "encode_header",
    "feature_table",
]

MAGIC = b"QFI\xfb"

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
KNOWN_INCOMPAT = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)

COMPAT_LAZY_REFCOUNTS = 1 << 0

AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1

_V2 = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes
_V3 = struct.Struct(">QQQII")  # 32 bytes: features, refcount_order, header_length
_EXT = struct.Struct(">II")

V2_HEADER_LENGTH = 72
V3_MIN_HEADER_LENGTH = 104
V3_HEADER_LENGTH = 112  # what qemu-img 7.2 writes: includes the compression_type byte

# The feature-name table qemu-img writes: (type, bit, name); type 0 incompat, 1 compat,
# 2 autoclear. Names are facts of the format, padded to 46 bytes.
_FEATURE_NAMES: tuple[tuple[int, int, bytes], ...] = (
    (0, 0, b"dirty bit"),
    (0, 1, b"corrupt bit"),
    (0, 2, b"external data file"),
    (0, 3, b"compression type"),
    (0, 4, b"extended L2 entries"),
    (1, 0, b"lazy refcounts"),
    (2, 0, b"bitmaps"),
    (2, 1, b"raw external data"),
)


@dataclass(frozen=True, slots=True)
class Extension:
    """One header extension, kept as raw bytes so unknown ones survive a rewrite."""

    type: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Header:
    """The decoded qcow2 header plus the extensions and backing name stored in cluster 0."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V3_HEADER_LENGTH
    compression_type: int = COMPRESSION_ZLIB
    extensions: tuple[Extension, ...] = field(default=())
    backing_file: str | None = None

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // 8

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def refblock_entries(self) -> int:
        """Clusters described by one refcount block."""
        return self.cluster_size * 8 // self.refcount_bits

    @property
    def backing_format(self) -> str | None:
        ext = self.extension(EXT_BACKING_FORMAT)
        return ext.data.decode("utf-8", "replace") if ext is not None else None

    def extension(self, ext_type: int) -> Extension | None:
        for ext in self.extensions:
            if ext.type == ext_type:
                return ext
        return None

    def with_extension(self, ext_type: int, data: bytes | None) -> Header:
        """A copy with the extension of that type replaced (``None`` removes it)."""
        exts = [e for e in self.extensions if e.type != ext_type]
        if data is not None:
            exts.append(Extension(ext_type, data))
        return replace(self, extensions=tuple(exts))


def feature_table() -> bytes:
    """The payload of the feature-name table extension."""
    out = bytearray()
    for kind, bit, name in _FEATURE_NAMES:
        out += struct.pack(">BB46s", kind, bit, name)
    return bytes(out)


def decode_header(buf: bytes) -> Header:
    """Decode cluster 0 (or at least its first 4 KiB... up to the whole cluster).

    Checks only what is needed to parse: magic, version, sizes of the structures inside
    ``buf``. Raises :class:`ImageFormatError` naming the problem.
    """
    if len(buf) < V2_HEADER_LENGTH or buf[:4] != MAGIC:
        raise ImageFormatError("Image is not in qcow2 format")
    (
        _magic,
        version,
        backing_file_offset,
        backing_file_size,
        cluster_bits,
        size,
        crypt_method,
        l1_size,
        l1_table_offset,
        refcount_table_offset,
        refcount_table_clusters,
        nb_snapshots,
        snapshots_offset,
    ) = _V2.unpack_from(buf, 0)
    if version not in (2, 3):
        raise UnsupportedFeatureError(f"Unsupported qcow2 version {version}")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise ImageFormatError(
            f"Unsupported cluster size: 2^{cluster_bits} (must be between 512 and 2M)"
        )
    cluster_size = 1 << cluster_bits
    incompat = compat = autoclear = 0
    refcount_order = 4
    header_length = V2_HEADER_LENGTH
    compression_type = COMPRESSION_ZLIB
    if version == 3:
        if len(buf) < V3_MIN_HEADER_LENGTH:
            raise ImageFormatError("qcow2 header truncated")
        incompat, compat, autoclear, refcount_order, header_length = _V3.unpack_from(buf, 72)
        if header_length < V3_MIN_HEADER_LENGTH or header_length % 8:
            raise ImageFormatError(f"qcow2 header length {header_length} is invalid")
        if header_length > cluster_size or header_length > len(buf):
            raise ImageFormatError("qcow2 header exceeds cluster size")
        if header_length > V3_MIN_HEADER_LENGTH:
            compression_type = buf[104]
    if refcount_order > 6:
        raise ImageFormatError("Reference count entry width too large; may not exceed 64 bits")
    extensions = _decode_extensions(buf, header_length, cluster_size, backing_file_offset)
    backing_file: str | None = None
    if backing_file_offset:
        if backing_file_size > 1023:
            raise ImageFormatError("Backing file name too long")
        end = backing_file_offset + backing_file_size
        if end > cluster_size or end > len(buf):
            raise ImageFormatError("Invalid backing file offset")
        backing_file = buf[backing_file_offset:end].decode("utf-8", "replace")
    return Header(
        version=version,
        backing_file_offset=backing_file_offset,
        backing_file_size=backing_file_size,
        cluster_bits=cluster_bits,
        size=size,
        crypt_method=crypt_method,
        l1_size=l1_size,
        l1_table_offset=l1_table_offset,
        refcount_table_offset=refcount_table_offset,
        refcount_table_clusters=refcount_table_clusters,
        nb_snapshots=nb_snapshots,
        snapshots_offset=snapshots_offset,
        incompatible_features=incompat,
        compatible_features=compat,
        autoclear_features=autoclear,
        refcount_order=refcount_order,
        header_length=header_length,
        compression_type=compression_type,
        extensions=tuple(extensions),
        backing_file=backing_file,
    )


def _decode_extensions(
    buf: bytes, start: int, cluster_size: int, backing_file_offset: int
) -> list[Extension]:
    end = min(len(buf), cluster_size)
    if backing_file_offset:
        end = min(end, backing_file_offset)
    exts: list[Extension] = []
    pos = start
    while pos + _EXT.size <= end:
        ext_type, length = _EXT.unpack_from(buf, pos)
        pos += _EXT.size
        if ext_type == EXT_END:
            return exts
        if length > end - pos:
            raise ImageFormatError(f"qcow2 header extension 0x{ext_type:x} is too large")
        exts.append(Extension(ext_type, bytes(buf[pos : pos + length])))
        pos += (length + 7) & ~7
    if pos > end:
        raise ImageFormatError("qcow2 header extensions run past the header cluster")
    return exts


def unknown_incompatible(header: Header) -> int:
    """Incompatible feature bits that bitback does not know."""
    return header.incompatible_features & ~KNOWN_INCOMPAT


def encode_header(header: Header) -> bytes:
    """Encode the header, its extensions and the backing name as cluster-0 bytes.

    Backing file offset and size are recomputed from ``header.backing_file``. The optional
    feature-name table is left out when it would not fit (small clusters), as qemu-img does.
    Raises :class:`ImageFormatError` if everything else does not fit in one cluster.
    """
    try:
        return _encode_header(header)
    except ImageFormatError:
        if header.extension(EXT_FEATURE_TABLE) is None:
            raise
        return _encode_header(header.with_extension(EXT_FEATURE_TABLE, None))


def _encode_header(header: Header) -> bytes:
    out = bytearray()
    v3 = header.version >= 3
    header_length = V3_HEADER_LENGTH if v3 else V2_HEADER_LENGTH
    backing = (header.backing_file or "").encode("utf-8")
    if len(backing) > 1023:
        raise ImageFormatError("Backing file name too long")
    ext_bytes = bytearray()
    for ext in header.extensions:
        if ext.type == EXT_END:
            continue
        ext_bytes += _EXT.pack(ext.type, len(ext.data)) + ext.data
        ext_bytes += b"\0" * (-len(ext.data) % 8)
    ext_bytes += _EXT.pack(EXT_END, 0)
    backing_offset = header_length + len(ext_bytes) if backing else 0
    total = header_length + len(ext_bytes) + len(backing)
    if total > header.cluster_size:
        raise ImageFormatError("qcow2 header does not fit in one cluster")
    out += _V2.pack(
        MAGIC,
        header.version,
        backing_offset,
        len(backing),
        header.cluster_bits,
        header.size,
        header.crypt_method,
        header.l1_size,
        header.l1_table_offset,
        header.refcount_table_offset,
        header.refcount_table_clusters,
        header.nb_snapshots,
        header.snapshots_offset,
    )
    if v3:
        out += _V3.pack(
            header.incompatible_features,
            header.compatible_features,
            header.autoclear_features,
            header.refcount_order,
            header_length,
        )
        out += bytes([header.compression_type]) + b"\0" * 7
    out += ext_bytes
    out += backing
    return bytes(out)
