"""``bitback-img create``: new qcow2 or raw images, as ``qemu-img create`` makes them.

The flow is QEMU's ``bdrv_img_create``, step for step, because each step has its own error
and some come after the ``Formatting ...`` line is printed:

1. parse ``-o`` (``Invalid parameter 'x'``, typed values); the size given once only;
2. ``-b``/``-F`` override ``-o backing_file/backing_fmt``; the backing file is opened to
   check it and to take its size when none is given (not with ``-u``); 7.2 insists on a
   backing format (``Backing file specified without backing format``);
3. print ``Formatting 'FILE', fmt=... opt=value ...`` in QEMU's option order;
4. the format's own checks (cluster size, compat, refcount width...) and the write.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from bitback.block.chain import virtual_size
from bitback.block.drivers.qcow2.create import create_qcow2, validate_cluster_size
from bitback.block.open import resolve_backing
from bitback.errors import BitbackError, InvalidArgumentError
from bitback.tools.img.images import OpenFailed, open_img
from bitback.tools.img.options import (
    PROG,
    HelpRequested,
    OptionList,
    OptSpec,
    OptType,
    UsageError,
    cvtnum,
    getopt,
    split_option_list,
    valid_option_list,
)

__all__ = [
    "FORMAT_OPTIONS",
    "create_image",
    "has_help_option",
    "img_create",
    "make_qcow2",
    "option_help",
    "parse_create_options",
    "write_raw",
]

SPEC = OptSpec("F:b:f:ho:qu", {"help": (False, "h")})


@dataclass(frozen=True, slots=True)
class CreateOpt:
    """One creation option: its QemuOpts type, help text and default shown by QEMU."""

    type: OptType
    help: str
    default: str | None = None
    protocol: bool = False  # the file driver's option: listed by -o help with a file name


# In the order qemu-img 7.2 prints them on the Formatting line.
FORMAT_OPTIONS: dict[str, dict[str, CreateOpt]] = {
    "qcow2": {
        "cluster_size": CreateOpt("size", "qcow2 cluster size", "65536"),
        "extended_l2": CreateOpt("bool", "Extended L2 tables", "off"),
        "preallocation": CreateOpt(
            "string", "Preallocation mode (allowed values: off, metadata, falloc, full)"
        ),
        "compression_type": CreateOpt(
            "string", "Compression method used for image cluster compression", "zlib"
        ),
        "size": CreateOpt("size", "Virtual disk size"),
        "compat": CreateOpt("string", "Compatibility level (v2 [0.10] or v3 [1.1])"),
        "backing_file": CreateOpt("string", "File name of a base image"),
        "backing_fmt": CreateOpt("string", "Image format of the base image"),
        "lazy_refcounts": CreateOpt("bool", "Postpone refcount updates", "off"),
        "refcount_bits": CreateOpt("number", "Width of a reference count entry in bits", "16"),
    },
    "raw": {
        "size": CreateOpt("size", "Virtual disk size"),
        "preallocation": CreateOpt(
            "string", "Preallocation mode (allowed values: off, falloc, full)", protocol=True
        ),
    },
}

# Options real qemu-img knows that bitback does not implement: refused plainly.
_UNSUPPORTED = {
    "data_file",
    "data_file_raw",
    "encryption",
    "encrypt.format",
    "encrypt.key-secret",
    "encrypt.cipher-alg",
    "encrypt.cipher-mode",
    "encrypt.ivgen-alg",
    "encrypt.ivgen-hash-alg",
    "encrypt.hash-alg",
    "encrypt.iter-time",
    "nocow",
    "extent_size_hint",
}
_OTHER_QEMU_FORMATS = {
    "bochs",
    "cloop",
    "dmg",
    "luks",
    "parallels",
    "qcow",
    "qed",
    "vdi",
    "vhdx",
    "vmdk",
    "vpc",
    "vvfat",
}
_TYPE_NAMES = {"size": "size", "number": "num", "bool": "bool (on/off)", "string": "str"}


class _DetectedFormat(BitbackError):
    """``-b`` without ``-F``: qemu-img names the probed format in an unterminated hint."""


def option_help(filename: str | None, fmt: str) -> int:
    """``-o help``: the options a format accepts, in qemu-img's layout."""
    table = _format_table(fmt)
    print("Supported options:" if filename else f"Supported {fmt} options:")
    for name in sorted(table):
        if table[name].protocol and not filename:
            continue
        label = f"{name}=<{_TYPE_NAMES[table[name].type]}>"
        print(f"  {label:<22} - {table[name].help}")
    if not filename:
        print("\nThe protocol level may support further options.")
        print("Specify the target filename to include those options.")
    return 0


def _format_table(fmt: str) -> dict[str, CreateOpt]:
    if fmt in FORMAT_OPTIONS:
        return FORMAT_OPTIONS[fmt]
    if fmt in _OTHER_QEMU_FORMATS:
        raise InvalidArgumentError(f"Format driver '{fmt}' is not supported by {PROG}")
    raise InvalidArgumentError(f"Unknown file format '{fmt}'")


def has_help_option(options: str) -> bool:
    return any(key in ("help", "?") for key, _ in split_option_list(options))


def parse_create_options(fmt: str, options: str | None) -> OptionList:
    """``-o`` text -> checked option values for ``fmt`` (errors as QemuOpts words them)."""
    table = _format_table(fmt)
    opts = OptionList({name: opt.type for name, opt in table.items()})
    if options:
        for key, _ in split_option_list(options):
            if key in _UNSUPPORTED:
                raise InvalidArgumentError(f"Option '{key}' is not supported by {PROG}")
        opts.parse(options)
    return opts


def img_create(argv: list[str]) -> int:
    """``create [-f fmt] [-o opts] [-b backing [-F fmt]] [-u] [-q] FILE [SIZE]``."""
    opts, operands = getopt(argv, SPEC)
    fmt, base, base_fmt = "raw", None, None
    options: str | None = None
    quiet = unsafe = False
    for key, value in opts:
        assert value is not None or key in "hqu"
        if key == "h":
            raise HelpRequested
        if key == "F":
            base_fmt = value
        elif key == "b":
            base = value
        elif key == "f":
            fmt = value or ""
        elif key == "o":
            assert value is not None
            if not valid_option_list(value):
                raise InvalidArgumentError(f"Invalid option list: {value}")
            options = value if options is None else f"{options},{value}"
        elif key == "q":
            quiet = True
        elif key == "u":
            unsafe = True
    filename = operands[0] if operands else None
    if options and has_help_option(options):
        return option_help(filename, fmt)
    if filename is None:
        raise UsageError("Expecting image file name")
    size = cvtnum("image size", operands[1]) if len(operands) > 1 else None
    if len(operands) > 2:
        raise UsageError(f"Unexpected argument: {operands[2]}")
    try:
        create_image(
            filename,
            fmt,
            size,
            options=options,
            backing=base,
            backing_fmt=base_fmt,
            unsafe=unsafe,
            quiet=quiet,
        )
    except _DetectedFormat as exc:
        sys.stderr.write(f"{PROG}: {filename}: {exc}")  # QEMU's hint has no newline
        return 1
    except BitbackError as exc:
        raise InvalidArgumentError(f"{filename}: {exc}") from exc
    return 0


def create_image(
    filename: str,
    fmt: str,
    size: int | None,
    *,
    options: str | None = None,
    backing: str | None = None,
    backing_fmt: str | None = None,
    unsafe: bool = False,
    quiet: bool = False,
) -> None:
    """QEMU's ``bdrv_img_create``; errors carry QEMU's text (without the file prefix)."""
    opts = parse_create_options(fmt, options)
    if opts.get("size") is not None:
        if size is not None:
            raise InvalidArgumentError("The image size must be specified only once")
        size = opts.get_size("size")
    if backing is not None:
        if "backing_file" not in opts.types:
            raise InvalidArgumentError(f"Backing file not supported for file format '{fmt}'")
        opts.set("backing_file", backing)
    if backing_fmt is not None:
        if "backing_fmt" not in opts.types:
            raise InvalidArgumentError(f"Backing file format not supported for file format '{fmt}'")
        opts.set("backing_fmt", backing_fmt)
    backing = opts.get("backing_file")
    backing_fmt = opts.get("backing_fmt")
    if backing is not None:
        if backing == filename:
            raise InvalidArgumentError(
                "Error: Trying to create an image with the same filename as the backing file"
            )
        if not backing:
            raise InvalidArgumentError("Expected backing file name, got empty string")
    if backing and not unsafe:
        path = resolve_backing(filename, backing)
        try:
            node = open_img(path, backing_fmt)
        except OpenFailed as exc:
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            raise InvalidArgumentError(f"{cause}\nCould not open backing image.") from exc
        with node:
            if backing_fmt is None:
                raise _DetectedFormat(
                    "Backing file specified without backing format\n"
                    f"Detected format of {node.format_name}."
                )
            if size is None:
                size = virtual_size(node)
    elif backing and backing_fmt is None:
        raise InvalidArgumentError("Backing file specified without backing format")
    if size is None:
        raise InvalidArgumentError("Image creation needs a size parameter")
    opts.set("size", str(size))
    if not quiet:
        print(f"Formatting '{filename}', fmt={fmt} {_formatting_options(fmt, opts)}")
        sys.stdout.flush()
    rounded = -(-size // 512) * 512
    if fmt == "qcow2":
        make_qcow2(filename, rounded, opts)
    else:
        if (opts.get("preallocation") or "off") != "off":
            raise InvalidArgumentError(
                f"Preallocation mode '{opts.get('preallocation')}' is not supported by {PROG}"
            )
        write_raw(filename, rounded)


def _formatting_options(fmt: str, opts: OptionList) -> str:
    shown = []
    for name, opt in FORMAT_OPTIONS[fmt].items():
        value = opts.printed(name) if opts.get(name) is not None else opt.default
        if value is not None:
            shown.append(f"{name}={value}")
    return " ".join(shown)


def make_qcow2(filename: str, size: int, opts: OptionList) -> None:
    """qcow2's own checks, in QEMU 7.2's order, then the image."""
    compat = opts.get("compat")
    if compat is None or compat in ("1.1", "v3"):
        version = 3
    elif compat in ("0.10", "v2"):
        version = 2
    else:
        raise InvalidArgumentError(f"Parameter 'version' does not accept value '{compat}'")
    compression = opts.get("compression_type") or "zlib"
    if compression not in ("zlib", "zstd"):
        raise InvalidArgumentError(
            f"Parameter 'compression-type' does not accept value '{compression}'"
        )
    prealloc = opts.get("preallocation") or "off"
    if prealloc not in ("off", "metadata", "falloc", "full"):
        raise InvalidArgumentError(f"Parameter 'preallocation' does not accept value '{prealloc}'")
    cluster_size = opts.get_size("cluster_size") or 65536
    validate_cluster_size(cluster_size)
    backing = opts.get("backing_file")
    if opts.get("backing_fmt") is not None and backing is None:
        raise InvalidArgumentError("Backing format cannot be used without backing file")
    lazy = opts.get_bool("lazy_refcounts")
    if lazy and version < 3:
        raise InvalidArgumentError(
            "Lazy refcounts only supported with compatibility level 1.1 and above "
            "(use version=v3 or greater)"
        )
    refcount_bits = opts.get_number("refcount_bits")
    refcount_bits = 16 if refcount_bits is None else refcount_bits
    if refcount_bits > 64 or refcount_bits <= 0 or refcount_bits & (refcount_bits - 1):
        raise InvalidArgumentError(
            "Refcount width must be a power of two and may not exceed 64 bits"
        )
    if version < 3 and refcount_bits != 16:
        raise InvalidArgumentError(
            "Different refcount widths than 16 bits require compatibility level 1.1 or above "
            "(use version=v3 or greater)"
        )
    if version < 3 and compression != "zlib":
        raise InvalidArgumentError(
            "Non-zlib compression type is only supported with compatibility level 1.1 and "
            "above (use version=v3 or greater)"
        )
    for name, value, ok in (
        ("compression_type", compression, "zlib"),
        ("preallocation", prealloc, "off"),
        ("extended_l2", "on" if opts.get_bool("extended_l2") else "off", "off"),
    ):
        if value != ok:
            raise InvalidArgumentError(f"{name}={value} is not supported by {PROG}")
    if backing is not None and len(backing.encode()) > 1023:
        raise InvalidArgumentError(
            f"Could not assign backing file '{backing}' with format "
            f"'{opts.get('backing_fmt') or ''}': Invalid argument"
        )
    try:
        create_qcow2(
            filename,
            size,
            cluster_size=cluster_size,
            backing_file=backing,
            backing_fmt=opts.get("backing_fmt"),
            compat="1.1" if version == 3 else "0.10",
            refcount_bits=refcount_bits,
            lazy_refcounts=lazy,
        )
    except OSError as exc:
        raise InvalidArgumentError(
            f"Could not create '{filename}': {os.strerror(exc.errno or 5)}"
        ) from exc


def write_raw(filename: str, size: int) -> None:
    """A raw image as QEMU's file driver makes one: truncated to ``size``, and its first
    block written (zeros) so that later alignment probing finds allocated storage."""
    try:
        fd = os.open(filename, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise InvalidArgumentError(
            f"Could not create '{filename}': {os.strerror(exc.errno or 5)}"
        ) from exc
    try:
        try:
            os.ftruncate(fd, size)
        except OSError as exc:
            raise InvalidArgumentError(
                f"Could not resize file: {os.strerror(exc.errno or 5)}"
            ) from exc
        if size:
            os.pwrite(fd, bytes(512 if size < 4096 else 4096), 0)
    finally:
        os.close(fd)
