"""Argument validation against QEMU 7.2.22's answers.

The schemas below transcribe the QAPI 7.2 declarations of the commands the texts were
measured with (member order matters: the first fault in that order is the one reported).
Expected texts were copied from real replies (QMP) and real ``-blockdev`` errors (keyval).
"""

from __future__ import annotations

from typing import Any

import pytest

from bitback.qmp.errors import QMPError
from bitback.qmp.schema import (
    ANY,
    BOOL,
    INT,
    INT32,
    NULL,
    NUMBER,
    SIZE,
    STR,
    UINT32,
    UINT64,
    Alternate,
    Enum,
    ListOf,
    Member,
    Struct,
    Union,
    validate,
    validate_arguments,
)


def opt(name: str, t: Any, **kw: Any) -> Member:
    return Member(name, t, optional=True, **kw)


BITMAP = Struct("BlockDirtyBitmap", [Member("node", STR), Member("name", STR)])
BITMAP_ADD = Struct(
    "BlockDirtyBitmapAdd",
    [opt("granularity", UINT32), opt("persistent", BOOL), opt("disabled", BOOL)],
    base=BITMAP,
)
MERGE = Struct(
    "BlockDirtyBitmapMerge",
    [Member("node", STR), Member("target", STR),
     Member("bitmaps", ListOf(Alternate("BlockDirtyBitmapOrStr", [STR, BITMAP])))],
)  # fmt: skip
RESIZE = Struct("block_resize", [opt("device", STR), opt("node-name", STR), Member("size", INT)])
NO_ARGS = Struct("query-block", [])
ON_ERROR = Enum("BlockdevOnError", ["report", "ignore", "enospc", "stop", "auto"])
DRIVE_BACKUP = Struct(
    "DriveBackup",
    [opt("job-id", STR), Member("device", STR),
     Member("sync", Enum("MirrorSyncMode", ["top", "full", "none", "incremental", "bitmap"])),
     opt("speed", INT), opt("bitmap", STR),
     opt("bitmap-mode", Enum("BitmapSyncMode", ["on-success", "never", "always"])),
     opt("compress", BOOL), opt("on-source-error", ON_ERROR), opt("on-target-error", ON_ERROR),
     opt("auto-finalize", BOOL), opt("auto-dismiss", BOOL), opt("filter-node-name", STR),
     opt("x-perf", Struct("BackupPerf", [opt("use-copy-range", BOOL), opt("max-workers", INT),
                                         opt("max-chunk", INT)])),
     Member("target", STR), opt("format", STR),
     opt("mode", Enum("NewImageMode", ["existing", "absolute-paths"]))],
)  # fmt: skip

# BlockdevOptions, recursive through BlockdevRef: complete the alternates once it exists.
BLOCKDEV_REF = Alternate("BlockdevRef", [STR])
BLOCKDEV_REF_OR_NULL = Alternate("BlockdevRefOrNull", [STR, NULL])
EVENT = Enum("BlkdebugEvent", ["l1_update", "read_aio", "flush_to_disk", "write_aio"])
INJECT = Struct(
    "BlkdebugInjectErrorOptions",
    [Member("event", EVENT), opt("state", INT),
     opt("iotype", Enum("BlkdebugIOType", ["read", "write"])), opt("errno", INT),
     opt("sector", INT), opt("once", BOOL), opt("immediately", BOOL)],
)  # fmt: skip
SET_STATE = Struct(
    "BlkdebugSetStateOptions", [Member("event", EVENT), opt("state", INT), Member("new_state", INT)]
)
OVERLAP = Alternate(
    "Qcow2OverlapChecks",
    [Struct("Qcow2OverlapCheckFlags",
            [opt("template", Enum("Qcow2OverlapCheckMode", ["none", "constant", "cached", "all"])),
             opt("main-header", BOOL)]),
     Enum("Qcow2OverlapCheckMode", ["none", "constant", "cached", "all"])],
)  # fmt: skip
ENCRYPT_FORMAT = Enum("BlockdevQcow2EncryptionFormat", ["aes", "luks"])
ENCRYPT = Union(
    "BlockdevQcow2Encryption", [Member("format", ENCRYPT_FORMAT)], "format",
    {"aes": Struct("QCryptoBlockOptionsQCow", [opt("key-secret", STR)])},
)  # fmt: skip
SOCKET = Union(
    "SocketAddress", [Member("type", Enum("SocketAddressType", ["inet", "unix", "vsock", "fd"]))],
    "type", {"unix": Struct("UnixSocketAddress", [Member("path", STR), opt("abstract", BOOL)])},
)  # fmt: skip
BLOCKDEV_OPTIONS = Union(
    "BlockdevOptions",
    [Member("driver", Enum("BlockdevDriver", ["blkdebug", "file", "nbd", "null-co", "qcow2"])),
     opt("node-name", STR), opt("discard", Enum("BlockdevDiscardOptions", ["ignore", "unmap"])),
     opt("cache", Struct("BlockdevCacheOptions", [opt("direct", BOOL), opt("no-flush", BOOL)])),
     opt("read-only", BOOL), opt("auto-read-only", BOOL), opt("force-share", BOOL)],
    "driver",
    {"file": Struct("BlockdevOptionsFile", [Member("filename", STR), opt("locking", Enum(
         "OnOffAuto", ["auto", "on", "off"])), opt("aio", Enum("BlockdevAioOptions", ["threads",
         "native", "io_uring"])), opt("aio-max-batch", INT)]),
     "null-co": Struct("BlockdevOptionsNull", [opt("size", INT), opt("latency-ns", UINT64),
                                               opt("read-zeroes", BOOL)]),
     "nbd": Struct("BlockdevOptionsNbd", [Member("server", SOCKET), opt("export", STR),
                                          opt("reconnect-delay", UINT32)]),
     "blkdebug": Struct("BlockdevOptionsBlkdebug", [Member("image", BLOCKDEV_REF),
         opt("config", STR), opt("align", INT), opt("opt-write-zero", INT32),
         opt("inject-error", ListOf(INJECT)), opt("set-state", ListOf(SET_STATE))]),
     "qcow2": Struct("BlockdevOptionsQcow2", [Member("file", BLOCKDEV_REF),
         opt("backing", BLOCKDEV_REF_OR_NULL), opt("lazy-refcounts", BOOL),
         opt("overlap-check", OVERLAP), opt("l2-cache-size", INT),
         opt("cache-clean-interval", INT), opt("encrypt", ENCRYPT)])},
)  # fmt: skip
object.__setattr__(BLOCKDEV_REF, "branches", (BLOCKDEV_OPTIONS, STR))
object.__setattr__(BLOCKDEV_REF_OR_NULL, "branches", (BLOCKDEV_OPTIONS, STR, NULL))

ACTION = Union(
    "TransactionAction",
    [Member("type", Enum("TransactionActionKind", ["abort", "block-dirty-bitmap-clear",
                                                   "drive-backup"]))],
    "type",
    {"abort": Struct("AbortWrapper", [Member("data", Struct("Abort", []))]),
     "block-dirty-bitmap-clear": Struct("BlockDirtyBitmapWrapper", [Member("data", BITMAP)]),
     "drive-backup": Struct("DriveBackupWrapper", [Member("data", DRIVE_BACKUP)])},
)  # fmt: skip
TRANSACTION = Struct(
    "transaction",
    [Member("actions", ListOf(ACTION)),
     opt("properties", Struct("TransactionProperties", [opt("completion-mode", Enum(
         "ActionCompletionMode", ["individual", "grouped"]))]))],
)  # fmt: skip
STR_OR_NULL = Struct(
    "MigrateSetParameters", [opt("tls-creds", Alternate("StrOrNull", [STR, NULL]))]
)
QMP_CAPS = Struct("qmp_capabilities", [opt("enable", ListOf(Enum("QMPCapability", ["oob"])))])

F = {"driver": "file", "filename": "/nonexist"}


def blkdebug(**kw: Any) -> dict[str, Any]:
    return {"driver": "qcow2", "file": {"driver": "blkdebug", "image": F, **kw}}


BD, TXN = BLOCKDEV_OPTIONS, TRANSACTION


def typ(path: str, expected: str) -> str:
    return f"Invalid parameter type for '{path}', expected: {expected}"


def missing(path: str) -> str:
    return f"Parameter '{path}' is missing"


def unexpected(path: str) -> str:
    return f"Parameter '{path}' is unexpected"


def rejects(name: str, value: str) -> str:
    return f"Parameter '{name}' does not accept value '{value}'"


# (schema, arguments, QEMU 7.2's desc)
JSON_ERRORS: list[tuple[Struct, dict[str, Any], str]] = [
    (BITMAP_ADD, {}, missing("node")),
    (BITMAP_ADD, {"name": "b"}, missing("node")),
    (BITMAP_ADD, {"node": "n"}, missing("name")),
    (BITMAP_ADD, {"bogus": 1}, missing("node")),
    (BITMAP_ADD, {"node": 1, "name": "b"}, typ("node", "string")),
    (BITMAP_ADD, {"node": "n", "name": None}, typ("name", "string")),
    (BITMAP_ADD, {"node": "n", "name": 5, "granularity": "x"},
     typ("name", "string")),
    *[(BITMAP_ADD, {"node": "n", "name": "b", "granularity": v},
       "Parameter 'granularity' expects uint64")
      for v in ("x", 1.5, 1.0, None, True, 2.0**64)],
    *[(BITMAP_ADD, {"node": "n", "name": "b", "granularity": v},
       "Parameter 'granularity' expects uint32_t") for v in (2**32, -1, 2**64 - 1)],
    (BITMAP_ADD, {"node": "n", "name": "b", "persistent": "yes"},
     typ("persistent", "boolean")),
    (BITMAP_ADD, {"node": "n", "name": "b", "persistent": 1},
     typ("persistent", "boolean")),
    (BITMAP_ADD, {"node": "n", "name": "b", "bogus": 1}, unexpected("bogus")),
    (MERGE, {"node": "n", "target": "t", "bitmaps": ["a", 1]},
     typ("null", "BlockDirtyBitmapOrStr")),
    (MERGE, {"node": "n", "target": "t", "bitmaps": [None]},
     typ("null", "BlockDirtyBitmapOrStr")),
    (MERGE, {"node": "n", "target": "t", "bitmaps": [{"node": "n"}]},
     missing("bitmaps[0].name")),
    (MERGE, {"node": "n", "target": "t", "bitmaps": [{"node": "n", "name": "b", "x": 1}]},
     unexpected("bitmaps[0].x")),
    (RESIZE, {"device": "d"}, missing("size")),
    *[(RESIZE, {"device": "d", "size": v}, typ("size", "integer"))
      for v in ("1", 1.5, 2**63, 2**64 - 1, 1e3, float("inf"))],
    (NO_ARGS, {"x": 1}, unexpected("x")),
    (DRIVE_BACKUP, {"device": "d", "target": "/x"}, missing("sync")),
    (DRIVE_BACKUP, {"device": "d", "target": "/x", "sync": "bogus"},
     rejects("sync", "bogus")),
    (DRIVE_BACKUP, {"device": "d", "target": "/x", "sync": 1},
     typ("sync", "string")),
    (DRIVE_BACKUP, {"device": "d", "target": "/x", "sync": None},
     typ("sync", "string")),
    (DRIVE_BACKUP, {"device": "d", "target": "/x", "sync": "full", "speed": "1"},
     typ("speed", "integer")),
    (DRIVE_BACKUP, {"device": "d", "target": "/x", "sync": "full", "speed": 2**64 - 1},
     typ("speed", "integer")),
    (DRIVE_BACKUP, {"device": "d", "target": "/x", "sync": "full", "on-source-error": "x"},
     rejects("on-source-error", "x")),
    (DRIVE_BACKUP, {"device": "d", "target": "/x", "sync": "full", "x-perf": {"max-chunk": "x"}},
     typ("x-perf.max-chunk", "integer")),
    (DRIVE_BACKUP, {"device": "d", "target": "/x", "sync": "full", "x-perf": {"bogus": 1}},
     unexpected("x-perf.bogus")),
    (DRIVE_BACKUP, {"device": "d", "target": "/x", "sync": "full", "x-perf": 1},
     typ("x-perf", "object")),
    (BD, {}, missing("driver")),
    (BD, {"node-name": "n"}, missing("driver")),
    (BD, {"driver": "bogus"}, rejects("driver", "bogus")),
    (BD, {"driver": 1}, typ("driver", "string")),
    (BD, {"driver": "file"}, missing("filename")),
    (BD, {**F, "bogus": 1}, unexpected("bogus")),
    (BD, {**F, "node-name": 5}, typ("node-name", "string")),
    (BD, {**F, "aio": "bogus"}, rejects("aio", "bogus")),
    (BD, {"driver": "qcow2"}, missing("file")),
    *[(BD, {"driver": "qcow2", "file": v},
       typ("file", "BlockdevRef")) for v in (1, None, ["x"])],
    (BD, {"driver": "qcow2", "file": {}}, missing("file.driver")),
    (BD, {"driver": "qcow2", "file": {"driver": "file"}},
     missing("file.filename")),
    (BD, {"driver": "qcow2", "file": {"driver": "bogus"}},
     rejects("driver", "bogus")),
    (BD, {"driver": "qcow2", "file": {**F, "bogus": 1}},
     unexpected("file.bogus")),
    (BD, {"driver": "qcow2", "file": F, "backing": 1},
     typ("backing", "BlockdevRefOrNull")),
    (BD, {"driver": "qcow2", "file": F, "backing": {"driver": "file"}},
     missing("backing.filename")),
    (BD, {"driver": "qcow2", "file": {"driver": "blkdebug"}},
     missing("file.image")),
    (BD, {"driver": "qcow2", "file": {"driver": "blkdebug", "image": 1}},
     typ("image", "BlockdevRef")),
    (BD, {"driver": "qcow2", "file": {"driver": "blkdebug", "image": {"driver": "file"}}},
     missing("file.image.filename")),
    (BD, {"driver": "qcow2", "file": {"driver": "blkdebug",
                                                    "image": {"driver": "file", "filename": []}}},
     typ("file.image.filename", "string")),
    (BD, blkdebug(**{"inject-error": 1}),
     typ("file.inject-error", "array")),
    (BD, blkdebug(**{"inject-error": [{}]}),
     missing("file.inject-error[0].event")),
    (BD, blkdebug(**{"inject-error": [1]}),
     typ("file.inject-error[0]", "object")),
    (BD, blkdebug(**{"inject-error": [{"event": "bogus"}]}),
     rejects("event", "bogus")),
    (BD, blkdebug(**{"inject-error": [{"event": 5}]}),
     typ("file.inject-error[0].event", "string")),
    (BD, blkdebug(**{"inject-error": [{"event": "read_aio", "errno": "x"}]}),
     typ("file.inject-error[0].errno", "integer")),
    (BD, blkdebug(**{"inject-error": [{"event": "read_aio", "once": 1}]}),
     typ("file.inject-error[0].once", "boolean")),
    (BD, blkdebug(**{"inject-error": [{"event": "read_aio", "immediately": None}]}),
     typ("file.inject-error[0].immediately", "boolean")),
    (BD, blkdebug(**{"inject-error": [{"event": "read_aio", "iotype": "bogus"}]}),
     rejects("iotype", "bogus")),
    (BD, blkdebug(**{"inject-error": [{"event": "read_aio"}, {"event": "read_aio",
                                                                            "bogus": 1}]}),
     unexpected("file.inject-error[1].bogus")),
    (BD, blkdebug(**{"inject-error": [{"event": "read_aio"}, {"errno": 5}]}),
     missing("file.inject-error[1].event")),
    (BD, blkdebug(**{"set-state": [{"event": "flush_to_disk", "state": 1}]}),
     missing("file.set-state[0].new_state")),
    (BD, blkdebug(**{"set-state": [{"event": "flush_to_disk", "new_state": "2"}]}),
     typ("file.set-state[0].new_state", "integer")),
    (BD, blkdebug(**{"opt-write-zero": 2**31}), "Parameter 'opt-write-zero' expects int32_t"),
    (BD, blkdebug(**{"opt-write-zero": "x"}),
     typ("file.opt-write-zero", "integer")),
    (BD, blkdebug(align=2**63), typ("file.align", "integer")),
    (BD, {"driver": "qcow2", "file": {"driver": "nbd", "reconnect-delay": 2**32,
                                                    "server": {"type": "unix", "path": "/x"}}},
     "Parameter 'reconnect-delay' expects uint32_t"),
    (BD, {"driver": "qcow2", "file": {"driver": "nbd", "reconnect-delay": "x",
                                                    "server": {"type": "unix", "path": "/x"}}},
     "Parameter 'file.reconnect-delay' expects uint64"),
    (BD, {**F, "driver": "qcow2", "file": F, "discard": "bogus"},
     rejects("discard", "bogus")),
    (BD, {"driver": "qcow2", "file": F, "cache": {"direct": "x"}},
     typ("cache.direct", "boolean")),
    (BD, {"driver": "null-co", "size": "1"}, typ("size", "integer")),
    (BD, {"driver": "qcow2", "file": F, "l2-cache-size": 2**64},
     typ("l2-cache-size", "integer")),
    (BD, {"driver": "qcow2", "file": F, "encrypt": {"format": "bogus"}},
     rejects("format", "bogus")),
    (BD, {"driver": "qcow2", "file": F, "encrypt": {"key-secret": "x"}},
     missing("encrypt.format")),
    *[(BD, {"driver": "qcow2", "file": F, "overlap-check": v},
       typ("overlap-check", "Qcow2OverlapChecks")) for v in (5, None)],
    (BD, {"driver": "qcow2", "file": F, "overlap-check": "bogus"},
     rejects("overlap-check", "bogus")),
    (BD, {"driver": "qcow2", "file": F, "overlap-check": {"template": "bogus"}},
     rejects("template", "bogus")),
    (TXN, {}, missing("actions")),
    (TXN, {"actions": {}}, typ("actions", "array")),
    (TXN, {"actions": [1]}, typ("actions[0]", "object")),
    (TXN, {"actions": [{}]}, missing("actions[0].type")),
    (TXN, {"actions": [{"type": "bogus"}]}, rejects("type", "bogus")),
    (TXN, {"actions": [{"type": 5}]}, typ("actions[0].type", "string")),
    (TXN, {"actions": [{"type": "block-dirty-bitmap-clear"}]}, missing("actions[0].data")),
    (TXN, {"actions": [{"type": "block-dirty-bitmap-clear", "data": 1}]},
     typ("actions[0].data", "object")),
    (TXN, {"actions": [{"type": "block-dirty-bitmap-clear", "data": {}}]},
     missing("actions[0].data.node")),
    (TXN, {"actions": [{"type": "block-dirty-bitmap-clear", "data": {"node": "n", "name": "b",
                                                                                  "x": 1}}]},
     unexpected("actions[0].data.x")),
    (TXN, {"actions": [{"type": "block-dirty-bitmap-clear", "data": {"node": "n", "name": "b"},
                                "x": 1}]}, unexpected("actions[0].x")),
    (TXN, {"actions": [{"type": "abort", "data": {}},
                               {"type": "drive-backup", "data": {"device": "d", "target": "t"}}]},
     missing("actions[1].data.sync")),
    (TXN, {"actions": [], "properties": {"completion-mode": "bogus"}},
     rejects("completion-mode", "bogus")),
    (TXN, {"actions": [], "properties": 1}, typ("properties", "object")),
    (TXN, {"actions": [], "properties": {"x": 1}}, unexpected("properties.x")),
    (STR_OR_NULL, {"tls-creds": 1}, typ("tls-creds", "StrOrNull")),
    (QMP_CAPS, {"enable": "oob"}, typ("enable", "array")),
    (QMP_CAPS, {"enable": ["bogus"]}, rejects("null", "bogus")),
    (QMP_CAPS, {"enable": [1]}, typ("enable[0]", "string")),
]  # fmt: skip


@pytest.mark.parametrize(("schema", "args", "desc"), JSON_ERRORS)
def test_qmp_errors(schema: Struct, args: dict[str, Any], desc: str) -> None:
    with pytest.raises(QMPError) as info:
        validate_arguments(schema, args)
    assert (info.value.error_class, info.value.desc) == ("GenericError", desc)


# Several unexpected members: QEMU names the first left in its GLib hash table (measured
# with random member sets; block-dirty-bitmap-add also had node, name and granularity).
UNEXPECTED = [
    (BITMAP_ADD, ["node", "name", "bogus", "zap"], "zap"),
    (BITMAP_ADD, ["node", "name", "zap", "bogus"], "zap"),
    (BITMAP_ADD, ["node", "name", "a", "b", "c", "d", "e"], "e"),
    (BITMAP_ADD, ["e", "d", "c", "b", "a", "node", "name"], "e"),
    (NO_ARGS, ["x", "y"], "y"),
    (NO_ARGS, ["bar", "c"], "bar"),
    (NO_ARGS, ["long-name-here", "e", "zap"], "e"),
    (NO_ARGS, ["zz", "a", "x"], "zz"),
    (NO_ARGS, ["driver2", "v", "c", "foo", "zz"], "foo"),
    (BITMAP_ADD, ["name", "granularity", "u", "b", "zz", "w", "zap", "node"], "b"),
    (BITMAP_ADD, ["foo", "node", "node-name", "w", "x", "q1", "granularity", "t", "bar", "name",
                  "s"], "bar"),
    (NO_ARGS, ["b", "long-name-here", "zz", "d", "bar", "c", "q2", "t", "zap", "a", "driver2", "r"],
     "bar"),
    (BITMAP_ADD, ["foo", "node-name", "p", "a", "t", "name", "granularity", "n", "node", "q2", "w",
                  "k9", "q1", "zap", "y"], "foo"),
    (BITMAP_ADD, ["c", "u", "q2", "q1", "d", "name", "node-name", "x", "y", "w", "filename", "m",
                  "node", "e", "n", "long-name-here", "v", "foo", "granularity", "s", "r", "a",
                  "zz"], "w"),
    (BITMAP_ADD, ["p", "bar", "w", "node-name", "t", "name", "granularity", "bogus", "b", "n",
                  "node", "m", "y", "long-name-here", "q2", "driver2", "c", "k9", "v", "r", "foo",
                  "e", "d", "zz", "q1", "zap", "filename", "u", "a", "x", "s"], "x"),
    (NO_ARGS, ["node-name", "a", "x", "b", "t", "q2", "e", "bar", "n", "p", "bogus", "w", "v",
               "filename", "m", "zap", "zz", "q1", "k9", "s", "r", "long-name-here", "y", "u",
               "driver2", "c", "foo", "d"], "w"),
]  # fmt: skip


@pytest.mark.parametrize(("schema", "keys", "reported"), UNEXPECTED)
def test_first_unexpected_member_is_glibs(schema: Struct, keys: list[str], reported: str) -> None:
    values = {"node": "n", "name": "b", "granularity": 512}
    with pytest.raises(QMPError, match=f"^Parameter '{reported}' is unexpected$"):
        validate_arguments(schema, {k: values.get(k, 1) for k in keys})


def kv_blockdev(**opts: Any) -> dict[str, Any]:
    return {"driver": "null-co", "node-name": "n0", **opts}


def kv_blkdebug(*errors: dict[str, Any], **kw: Any) -> dict[str, Any]:
    file = {"driver": "blkdebug", "image": {"driver": "file", "filename": "/x"}, **kw}
    if errors:
        file["inject-error"] = list(errors)
    return {"driver": "qcow2", "node-name": "n0", "file": file}


# ``-blockdev`` trees (what keyval_parse builds) and QEMU 7.2's complaint about each.
KEYVAL_ERRORS = [
    *[(kv_blockdev(size=v), "Parameter 'size' expects integer")
      for v in ("abc", "1k", "9223372036854775808", "-9223372036854775809", "5 ", "1.0", "", "08")],
    *[(kv_blockdev(**{"read-only": v}), "Parameter 'read-only' expects 'on' or 'off'")
      for v in ("ON", "1", "bogus", "", "Y")],
    *[(kv_blockdev(size="1", **{"latency-ns": v}), "Parameter 'latency-ns' expects integer")
      for v in ("18446744073709551616", "abc", "-18446744073709551616", "", "1e3")],
    *[({"driver": "nbd", "node-name": "n0", "server": {"type": "unix", "path": "/x"},
        "reconnect-delay": v}, "Parameter 'reconnect-delay' expects uint32_t")
      for v in ("4294967296", "-1", "-4294967295")],
    ({"driver": "nbd", "node-name": "n0", "server": {"type": "unix", "path": "/x"},
      "reconnect-delay": "abc"}, "Parameter 'reconnect-delay' expects integer"),
    (kv_blkdebug({"event": "bogus"}), rejects("event", "bogus")),
    (kv_blkdebug({"errno": "5"}), missing("file.inject-error.0.event")),
    (kv_blkdebug({"event": "read_aio", "errno": "x"}),
     "Parameter 'file.inject-error.0.errno' expects integer"),
    (kv_blkdebug({"event": "read_aio", "once": "x"}),
     "Parameter 'file.inject-error.0.once' expects 'on' or 'off'"),
    (kv_blkdebug({"event": "read_aio", "bogus": "x"}), unexpected("file.inject-error.0.bogus")),
    (kv_blkdebug(**{"inject-error": "x"}), typ("file.inject-error", "array")),
    (kv_blkdebug(**{"inject-error": ["x"]}),
     typ("file.inject-error.0", "object")),
    ({"driver": "qcow2", "node-name": "n0", "file": {"driver": "file"}}, missing("file.filename")),
    ({"driver": "qcow2", "node-name": "n0", "file": {"driver": "file", "filename": {"x": "1"}}},
     "Parameters 'file.filename.*' are unexpected"),
    ({"driver": "qcow2", "file": {"driver": "file", "filename": "/x", "bogus": "1"}},
     unexpected("file.bogus")),
    ({"driver": "qcow2", "node-name": "n0", "file": {"driver": "file", "filename": "/x"},
      "cache": {"direct": "x"}}, "Parameter 'cache.direct' expects 'on' or 'off'"),
    ({"driver": "qcow2", "file": {"driver": "file", "filename": "/x"}, "cache": "x"},
     typ("cache", "object")),
    ({"driver": "qcow2", "file": F, "overlap-check": "bogus"},
     rejects("overlap-check", "bogus")),
    ({"driver": "qcow2", "file": F, "overlap-check": {"template": "bogus"}},
     rejects("template", "bogus")),
    ({"driver": "bogus", "node-name": "n0"}, rejects("driver", "bogus")),
    ({"node-name": "n0"}, missing("driver")),
    (kv_blockdev(bogus="1", zap="2"), unexpected("zap")),
    (kv_blockdev(zap="1", bogus="2"), unexpected("zap")),
]  # fmt: skip


@pytest.mark.parametrize(("tree", "desc"), KEYVAL_ERRORS)
def test_keyval_errors(tree: dict[str, Any], desc: str) -> None:
    with pytest.raises(QMPError) as info:
        validate_arguments(BD, tree, keyval=True)
    assert info.value.desc == desc


KEYVAL_INTS = [
    ("size", "0x10", 16), ("size", "0X10", 16), ("size", "010", 8), ("size", "-1", -1),
    ("size", " 5", 5), ("size", "+5", 5), ("size", "-0x10", -16),
    ("size", "9223372036854775807", 2**63 - 1),
    ("latency-ns", "-1", 2**64 - 1), ("latency-ns", "18446744073709551615", 2**64 - 1),
    ("latency-ns", "-18446744073709551615", 1), ("latency-ns", " 1", 1), ("latency-ns", "0x10", 16),
]  # fmt: skip


@pytest.mark.parametrize(("member", "text", "value"), KEYVAL_INTS)
def test_keyval_integers(member: str, text: str, value: int) -> None:
    """Accepted by QEMU 7.2 on the command line (it went on to open the node)."""
    assert validate_arguments(BD, kv_blockdev(**{member: text}), keyval=True)[member] == value


@pytest.mark.parametrize("text", ["on", "yes", "true", "y", "off", "no", "false", "n"])
def test_keyval_booleans(text: str) -> None:
    got = validate_arguments(BD, kv_blockdev(**{"read-only": text}), keyval=True)
    assert got["read-only"] is (text in ("on", "yes", "true", "y"))


def test_keyval_size_number_and_tree() -> None:
    # 'size' and 'number' have no -blockdev member in 7.2: texts follow the visitor's source.
    assert validate(SIZE, "64k", keyval=True) == 65536
    with pytest.raises(QMPError, match=r"^Parameter '<anonymous>' expects size$"):
        validate(SIZE, "1x", keyval=True)
    assert validate(NUMBER, "1.5", keyval=True) == 1.5
    with pytest.raises(QMPError, match=r"expected: number$"):
        validate(NUMBER, "inf", keyval=True)
    tree = kv_blkdebug({"event": "read_aio", "errno": "5", "once": "on"})
    got = validate_arguments(BD, tree, keyval=True)
    assert got["file"]["inject-error"] == [{"event": "read_aio", "errno": 5, "once": True}]


def test_valid_values_and_defaults() -> None:
    schema = Struct("S", [Member("a", UINT64), opt("b", BOOL, default=False), opt("c", STR),
                          opt("n", NUMBER), opt("any", ANY), opt("l", ListOf(INT))])  # fmt: skip
    got = validate_arguments(schema, {"a": -1, "n": 3, "any": {"x": [None]}, "l": [1, -2]})
    assert got == {"a": 2**64 - 1, "b": False, "n": 3.0, "any": {"x": [None]}, "l": [1, -2]}
    assert isinstance(got["n"], float)
    args = {"driver": "qcow2", "node-name": "n0", "backing": None,
            "file": {"driver": "blkdebug", "image": "base", "inject-error": [
                {"event": "read_aio", "errno": 5, "once": True}]}}  # fmt: skip
    assert validate_arguments(BD, args) == args
    assert validate_arguments(STR_OR_NULL, {"tls-creds": None}) == {"tls-creds": None}
    assert validate_arguments(TXN, {"actions": []}) == {"actions": []}


def test_declarations_are_checked() -> None:
    with pytest.raises(ValueError, match="discriminator"):
        Union("U", [Member("kind", STR)], "kind", {})
    with pytest.raises(ValueError, match="lacks"):
        Union("U", [Member("kind", Enum("K", ["a"]))], "kind", {"b": Struct("B", [])})
    with pytest.raises(ValueError, match="duplicate"):
        Struct("S", [Member("a", STR), Member("a", INT)])
