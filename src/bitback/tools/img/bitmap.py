"""``bitback-img bitmap``: change the persistent dirty bitmaps of a qcow2 image.

``bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)...
[-b SOURCE_FILE [-F SOURCE_FMT]] [-g GRANULARITY] [--object OBJDEF] [-f FMT] FILE BITMAP``,
as qemu-img 7.2 runs it:

* the actions apply to the one bitmap ``BITMAP``, in the order given (``--remove --add b``
  starts ``b`` afresh); the first one that fails stops the run, exit 1, with
  ``Operation ACTION on bitmap BITMAP failed: REASON``. What the actions before it did is
  kept: the image is closed, and its bitmaps stored, either way;
* ``--add`` makes an enabled, persistent bitmap; its granularity is ``-g`` (taken, as in
  qemu-img, modulo 2^32: QMP's granularity is 32 bits wide) or the image's cluster size
  clamped to 4 KiB..64 KiB. Its checks come in QEMU's order: empty name, granularity, a
  bitmap of that name, then whether the image can store it (``Can't make bitmap 'b'
  persistent in '#block123': ...``, where QEMU names its node with a random suffix);
* ``--merge SOURCE`` ORs bitmap ``SOURCE`` (of the same image, or of ``-b FILE`` opened
  read-only) into ``BITMAP``; granularities may differ, disk sizes may not;
* the image is opened read-write without its backing file (bitmaps do not need it).

The in-memory bitmaps are the driver's (:class:`~bitback.block.drivers.qcow2.bitmap_store.
PersistentBitmaps`); they reach the disk when the image is closed, except ``--remove``, which
takes the bitmap off the disk at once (as QEMU does).
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field

from bitback.bitmaps import DirtyBitmap, check_granularity, default_granularity
from bitback.block.driver import BlockDriver
from bitback.errors import BitbackError, InvalidArgumentError, NotFoundError
from bitback.tools.img.images import OpenFailed, error_text, open_img
from bitback.tools.img.options import HelpRequested, OptSpec, cvtnum, getopt, warn

__all__ = [
    "ACTIONS",
    "BitmapAction",
    "add_bitmap",
    "apply_action",
    "check_source_bitmaps",
    "check_target_bitmaps",
    "copy_bitmaps",
    "img_bitmap",
    "merge_bitmap",
    "node_label",
    "remove_bitmap",
]

SPEC = OptSpec(
    "b:f:F:g:h",
    {
        "help": (False, "h"),
        "object": (True, "object"),
        "add": (False, "add"),
        "remove": (False, "remove"),
        "clear": (False, "clear"),
        "enable": (False, "enable"),
        "disable": (False, "disable"),
        "merge": (True, "merge"),
    },
)

ACTIONS = ("add", "remove", "clear", "enable", "disable", "merge")
_UINT32 = 0xFFFF_FFFF


@dataclass(frozen=True, slots=True)
class BitmapAction:
    """One action of the command line; ``source`` is the bitmap a merge reads."""

    verb: str
    source: str | None = None


@dataclass
class _Args:
    actions: list[BitmapAction] = field(default_factory=list)
    fmt: str | None = None
    src_filename: str | None = None
    src_fmt: str | None = None
    granularity: int = 0  # 0: the default (qemu-img tests the int64 before truncating)


def node_label() -> str:
    """The name QEMU invents for the image's format node: ``#block1`` and two random digits
    (the node is the second QEMU names in qemu-img, after the file node)."""
    return f"#block1{random.randrange(100):02d}"


def _parse(argv: list[str]) -> tuple[_Args, list[str]]:
    opts, operands = getopt(argv, SPEC)
    a = _Args()
    for key, value in opts:
        if key == "h":
            raise HelpRequested
        if key == "f":
            a.fmt = value
        elif key == "b":
            a.src_filename = value
        elif key == "F":
            a.src_fmt = value
        elif key == "g":
            assert value is not None
            a.granularity = cvtnum("granularity", value)
        elif key == "merge":
            a.actions.append(BitmapAction("merge", value))
        elif key in ACTIONS:
            a.actions.append(BitmapAction(key))
        # --object: accepted and ignored (bitback has no secrets or other objects to make)
    if not a.actions:
        raise InvalidArgumentError(
            "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge"
        )
    if a.granularity and not any(act.verb == "add" for act in a.actions):
        raise InvalidArgumentError("granularity only supported with --add")
    if a.src_fmt is not None and a.src_filename is None:
        raise InvalidArgumentError("-F only supported with -b")
    if a.src_filename is not None and not any(act.verb == "merge" for act in a.actions):
        raise InvalidArgumentError("Merge bitmap source file only supported with --merge")
    if len(operands) != 2:
        raise InvalidArgumentError("Expecting filename and bitmap name")
    return a, operands


# -- the actions ------------------------------------------------------------------------------


def _bitmaps(node: BlockDriver) -> list[DirtyBitmap]:
    store = getattr(node, "persistent", None)
    return [] if store is None else list(store.bitmaps)


def _find(node: BlockDriver, name: str) -> DirtyBitmap:
    for bitmap in _bitmaps(node):
        if bitmap.name == name:
            return bitmap
    raise NotFoundError(f"Dirty bitmap '{name}' not found")


def add_bitmap(
    node: BlockDriver, name: str, granularity: int, label: str, *, enabled: bool = True
) -> DirtyBitmap:
    """``block-dirty-bitmap-add persistent=on`` as qemu-img issues it: a new, empty bitmap
    (``granularity`` 0: the default); ``label`` names the node in QEMU's messages."""
    if not name:
        raise InvalidArgumentError("Bitmap name cannot be empty")
    if granularity:
        granularity &= _UINT32  # qemu-img hands its int64 to a uint32 parameter
        check_granularity(granularity)
    else:
        granularity = default_granularity(node.cluster_size)
    if any(b.name == name for b in _bitmaps(node)):
        raise InvalidArgumentError(f"Bitmap already exists: {name}")
    store = getattr(node, "persistent", None)
    if store is None:
        raise InvalidArgumentError(
            f"Can't store persistent bitmaps to {label}: Operation not supported"
        )
    store.check_new(name, granularity, label)
    bitmap = DirtyBitmap(node.length(), granularity, name, enabled=enabled, persistent=True)
    store.add(bitmap)
    return bitmap


def remove_bitmap(node: BlockDriver, name: str) -> None:
    """``block-dirty-bitmap-remove``: the bitmap leaves the image at once."""
    bitmap = _find(node, name)
    if bitmap.busy or bitmap.readonly:  # inconsistent bitmaps may go: that is their cure
        bitmap.check_usable()
    store = getattr(node, "persistent")  # noqa: B009 - _find found one, so there is a store
    store.remove(name)
    store.forget(bitmap)


def merge_bitmap(node: BlockDriver, name: str, src_node: BlockDriver, src_name: str) -> None:
    """``block-dirty-bitmap-merge`` of one source: ``src_name`` of ``src_node`` is ORed
    into ``name`` of ``node`` (checked first: target, then source, then sizes)."""
    target = _find(node, name)
    target.check_usable()
    source = _find(src_node, src_name)
    source.check_usable(for_write=False)
    if source.size != target.size:
        raise InvalidArgumentError(
            f"Bitmaps are of different sizes (destination size is {target.size}, source size "
            f"is {source.size}) and can't be merged"
        )
    target.bits.merge(source.bits)


def apply_action(
    action: BitmapAction, node: BlockDriver, name: str, *, src_node: BlockDriver,
    granularity: int = 0, label: str = "",
) -> None:
    """Carry out one action on bitmap ``name`` of ``node`` (raises with QEMU's reason)."""
    if action.verb == "add":
        add_bitmap(node, name, granularity, label)
    elif action.verb == "remove":
        remove_bitmap(node, name)
    elif action.verb == "clear":
        bitmap = _find(node, name)
        bitmap.check_usable()
        bitmap.bits.clear()
    elif action.verb in ("enable", "disable"):
        bitmap = _find(node, name)
        bitmap.check_usable(for_write=False)
        bitmap.enabled = action.verb == "enable"
    else:
        assert action.source is not None
        merge_bitmap(node, name, src_node, action.source)


def _open_source(a: _Args, filename: str, stack: ExitStack) -> BlockDriver | None:
    """The ``-b`` image, read-only and without its backing file (None without ``-b``)."""
    src = a.src_filename
    if src is None:
        return None
    if os.path.exists(src) and os.path.exists(filename) and os.path.samefile(src, filename):
        # QEMU's own image locks refuse a second open of the image being written.
        raise OpenFailed(
            f"Could not open '{src}': Failed to get shared \"write\" lock "
            f"(is another process using the image [{src}]?)", path=src,
        )
    return stack.enter_context(open_img(src, a.src_fmt, backing=False))


def run_actions(
    actions: Sequence[BitmapAction], node: BlockDriver, name: str, *,
    src_node: BlockDriver, granularity: int = 0,
) -> None:
    """Apply ``actions`` in order; the first failure raises ``Operation ... failed: ...``."""
    label = node_label()
    for action in actions:
        try:
            apply_action(action, node, name, src_node=src_node, granularity=granularity,
                         label=label)
        except BitbackError as exc:
            raise BitbackError(
                f"Operation {action.verb} on bitmap {name} failed: {error_text(exc)}"
            ) from exc


def img_bitmap(argv: list[str]) -> int:
    """``bitmap (--add|--remove|--clear|--enable|--disable|--merge SRC)... [-b FILE [-F FMT]]
    [-g SIZE] [-f FMT] FILE BITMAP``."""
    a, operands = _parse(argv)
    filename, name = operands
    with ExitStack() as stack:
        node = stack.enter_context(open_img(filename, a.fmt, read_only=False, backing=False))
        src_node = _open_source(a, filename, stack) or node
        run_actions(a.actions, node, name, src_node=src_node, granularity=a.granularity)
    return 0


# -- convert --bitmaps ------------------------------------------------------------------------


def _supports_bitmaps(node: BlockDriver) -> bool:
    """QEMU's ``bdrv_supports_persistent_dirty_bitmap``: qcow2 v3 only."""
    header = getattr(node, "header", None)
    return getattr(node, "persistent", None) is not None and header is not None and (
        header.version >= 3
    )


def check_source_bitmaps(sources: Sequence[BlockDriver], skip_broken: bool) -> None:
    """``convert --bitmaps``'s checks before the target is made (qemu-img's order)."""
    if len(sources) > 1:
        raise InvalidArgumentError("Copying bitmaps only possible with single source")
    if not _supports_bitmaps(sources[0]):
        raise InvalidArgumentError("Source lacks bitmap support")
    if skip_broken:
        return
    for bitmap in _bitmaps(sources[0]):
        if bitmap.inconsistent:
            raise InvalidArgumentError(
                f"Cannot copy inconsistent bitmap '{bitmap.name}' (try --skip-broken-bitmaps, "
                "or use 'bitback-img bitmap --remove' to delete it)"
            )


def check_target_bitmaps(target: BlockDriver) -> None:
    """``convert --bitmaps``: the opened target must be able to store bitmaps."""
    if not _supports_bitmaps(target):
        raise InvalidArgumentError(
            f"Format driver '{target.format_name}' does not support bitmaps"
        )


def copy_bitmaps(source: BlockDriver, target: BlockDriver, skip_broken: bool) -> None:
    """Copy every persistent bitmap of ``source`` (the top image only) to ``target``, after
    the data (so the copy's own writes mark nothing in them).

    As qemu-img 7.2: newest first; each keeps its name, granularity and enabled state (the
    ``auto`` flag); an inconsistent one is skipped with a warning (``skip_broken``). The first
    failure stops the copy (``Failed to create bitmap NAME: ...``, or ``Failed to populate
    bitmap NAME: ...``, after which that bitmap is removed again); the bitmaps copied before
    it stay.
    """
    label = node_label()
    for bitmap in _bitmaps(source):
        name = bitmap.name
        assert name is not None
        if bitmap.inconsistent and skip_broken:
            warn(f"Skipping inconsistent bitmap '{name}'")
            continue
        try:
            add_bitmap(target, name, bitmap.granularity, label, enabled=bitmap.enabled)
        except BitbackError as exc:
            raise BitbackError(f"Failed to create bitmap {name}: {error_text(exc)}") from exc
        try:
            merge_bitmap(target, name, source, name)
        except BitbackError as exc:
            remove_bitmap(target, name)
            raise BitbackError(f"Failed to populate bitmap {name}: {error_text(exc)}") from exc
