"""QMP errors: the error classes a reply can carry, and the one translation into them.

A QMP error reply is ``{"error": {"class": CLASS, "desc": TEXT}}``. QEMU 7.2 still sends five
classes; almost everything is ``GenericError``, the others survive for compatibility:

* ``GenericError``: every other failure, including all argument and framing errors;
* ``CommandNotFound``: unknown command; capabilities negotiation not done or already done;
* ``DeviceNotActive``: a block job that does not exist (``block-job-*``);
* ``DeviceNotFound``: a device ``id`` that does not exist (a few commands);
* ``KVMMissingCap``: KVM lacks a capability (never sent by bitbackd).

:func:`to_qmp_error` is the single place where bitback's own exceptions become QMP errors;
the server calls it for whatever a command raised and logs the traceback of anything that
is not a deliberate :class:`~bitback.errors.BitbackError`.
"""

from __future__ import annotations

from enum import StrEnum

from bitback.errors import BitbackError

__all__ = [
    "ErrorClass",
    "QMPError",
    "command_not_found",
    "generic",
    "oob_not_supported",
    "to_qmp_error",
]


class ErrorClass(StrEnum):
    """The ``class`` member of an error reply (QAPI enum ``QapiErrorClass``)."""

    GENERIC_ERROR = "GenericError"
    COMMAND_NOT_FOUND = "CommandNotFound"
    DEVICE_NOT_ACTIVE = "DeviceNotActive"
    DEVICE_NOT_FOUND = "DeviceNotFound"
    KVM_MISSING_CAP = "KVMMissingCap"


_CLASSES = frozenset(c.value for c in ErrorClass)


class QMPError(Exception):
    """An error to be sent to a QMP client as ``{"error": {"class", "desc"}}``.

    ``error_class`` is one of :class:`ErrorClass` (a plain ``str`` is accepted so callers may
    write ``QMPError("DeviceNotActive", ...)``); ``desc`` is the human-readable text, which
    clients and QEMU's iotests compare verbatim, so it must be QEMU's wording.
    """

    def __init__(self, error_class: str, desc: str) -> None:
        if error_class not in _CLASSES:
            raise ValueError(f"unknown QMP error class {error_class!r}")
        super().__init__(desc)
        self.error_class = str(error_class)
        self.desc = desc

    def __str__(self) -> str:
        return self.desc

    def __repr__(self) -> str:
        return f"QMPError({self.error_class!r}, {self.desc!r})"

    def to_dict(self) -> dict[str, str]:
        """The reply's ``error`` member, members in QAPI order (the encoder reorders)."""
        return {"class": self.error_class, "desc": self.desc}


def generic(desc: str) -> QMPError:
    """A ``GenericError`` with text ``desc`` (QEMU's ``error_setg``)."""
    return QMPError(ErrorClass.GENERIC_ERROR, desc)


def command_not_found(name: str) -> QMPError:
    """What QEMU answers for a command it does not know."""
    return QMPError(ErrorClass.COMMAND_NOT_FOUND, f"The command {name} has not been found")


def oob_not_supported(name: str) -> QMPError:
    """What QEMU answers for ``exec-oob`` of a command that may not run out of band."""
    return generic(f"The command {name} does not support OOB")


# Every deliberate bitback error is a GenericError in QEMU's terms: QEMU reports I/O errors,
# missing nodes, bad values and unsupported features alike through error_setg(). A subclass
# that needs another class would be listed here, most specific first.
_CLASS_BY_TYPE: tuple[tuple[type[BitbackError], ErrorClass], ...] = (
    (BitbackError, ErrorClass.GENERIC_ERROR),
)


def to_qmp_error(exc: BaseException) -> QMPError:
    """Translate whatever a command raised into the error its reply carries.

    * a :class:`QMPError` is returned unchanged;
    * a :class:`~bitback.errors.BitbackError` becomes a ``GenericError`` whose ``desc`` is the
      exception's message (``str(exc)``), which is written in QEMU's words where it matters;
    * anything else is a bug: it becomes a ``GenericError`` naming only the exception type,
      so no internals (paths, reprs, tracebacks) reach the client. The caller logs it.
    """
    if isinstance(exc, QMPError):
        return exc
    if isinstance(exc, BitbackError):
        for etype, eclass in _CLASS_BY_TYPE:
            if isinstance(exc, etype):
                return QMPError(eclass, str(exc))
    return generic(f"Internal error: {type(exc).__name__}")
