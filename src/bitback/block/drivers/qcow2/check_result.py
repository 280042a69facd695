"""The result of a qcow2 check, and its renderings as ``qemu-img check`` prints them.

:class:`CheckResult` carries QEMU's BdrvCheckResult counters under the names of qemu-img's
JSON (``--output=json``), the lines qemu-img prints on stderr, and renders the human text
(:meth:`~CheckResult.human`), the JSON object and its exact text, and the exit code, all
checked against qemu-img 7.2 by ``tests/interop/test_check_vs_qemu.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bitback.qjson import qdict_order, quote

__all__ = ["CheckResult"]


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The outcome of a check, shaped like ``qemu-img check`` (fields mirror its JSON).

    ``messages`` are the lines qemu-img prints on stderr, in order: those of the check (and,
    after a repair, those of the double check, starting at index ``recheck_from``).
    ``failure`` is the strerror text when the check could not complete (qemu-img then prints
    ``Check failed: <failure>`` and no summary); ``supported`` is false for formats without
    checks (exit code 63).
    """

    filename: str
    format: str = "qcow2"
    check_errors: int = 0
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    messages: list[str] = field(default_factory=list)
    failure: str | None = None
    recheck_from: int | None = None
    supported: bool = True

    @classmethod
    def unsupported(cls, filename: str, format: str) -> CheckResult:
        """The result for a format that has no consistency check (raw): exit code 63."""
        return cls(filename=filename, format=format, supported=False)

    @property
    def exit_code(self) -> int:
        """qemu-img's: 0 clean, 1 check failed, 2 corruptions, 3 leaks only, 63 unsupported."""
        if not self.supported:
            return 63
        if self.failure is not None or self.check_errors:
            return 1
        if self.corruptions:
            return 2
        return 3 if self.leaks else 0

    @property
    def error_line(self) -> str | None:
        """What the tool reports as its error (after ``<prog>: ``), if anything."""
        if not self.supported:
            return "This image format does not support checks"
        if self.failure is not None:
            return f"Check failed: {self.failure}"
        return "Check failed" if self.check_errors else None

    def to_json(self) -> dict[str, Any]:
        """qemu-img's ``--output=json`` object: optional keys only when non-zero, in its order."""
        values: dict[str, Any] = {
            "filename": self.filename,
            "format": self.format,
            "check-errors": self.check_errors,
        }
        optional = {
            "image-end-offset": self.image_end_offset,
            "corruptions": self.corruptions,
            "leaks": self.leaks,
            "corruptions-fixed": self.corruptions_fixed,
            "leaks-fixed": self.leaks_fixed,
            "total-clusters": self.total_clusters,
            "allocated-clusters": self.allocated_clusters,
            "fragmented-clusters": self.fragmented_clusters,
            "compressed-clusters": self.compressed_clusters,
        }
        values.update((k, v) for k, v in optional.items() if v)
        # QEMU prints a QDict, whose iteration order is that of its hash buckets.
        return {k: values[k] for k in qdict_order(values)}

    def json_text(self) -> str:
        """qemu-img's pretty-printed JSON text, byte for byte (with the final newline)."""
        items = [f"    {quote(k)}: {_json_value(v)}" for k, v in self.to_json().items()]
        return "{\n" + ",\n".join(items) + "\n}\n"

    def human(self) -> str:
        """qemu-img's human output (its stdout), after the messages."""
        out = []
        if not self.supported or (self.failure is not None and self.recheck_from is None):
            return ""  # the check (or the repair run before a double check) failed
        if self.corruptions_fixed or self.leaks_fixed:
            out.append(
                "The following inconsistencies were found and repaired:\n\n"
                f"    {self.leaks_fixed} leaked clusters\n"
                f"    {self.corruptions_fixed} corruptions\n\n"
                "Double checking the fixed image now...\n"
            )
        if self.failure is not None:  # the double check failed
            return "".join(out)
        if not (self.corruptions or self.leaks or self.check_errors):
            out.append("No errors were found on the image.\n")
        if self.corruptions:
            out.append(
                f"\n{self.corruptions} errors were found on the image.\n"
                "Data may be corrupted, or further writes to the image may corrupt it.\n"
            )
        if self.leaks:
            out.append(
                f"\n{self.leaks} leaked clusters were found on the image.\n"
                "This means waste of disk space, but no harm to data.\n"
            )
        if self.check_errors:
            out.append(f"\n{self.check_errors} internal errors have occurred during the check.\n")
        if self.total_clusters and self.allocated_clusters:
            alloc = self.allocated_clusters
            out.append(
                f"{alloc}/{self.total_clusters} = {alloc * 100.0 / self.total_clusters:0.2f}% "
                f"allocated, {self.fragmented_clusters * 100.0 / alloc:0.2f}% fragmented, "
                f"{self.compressed_clusters * 100.0 / alloc:0.2f}% compressed clusters\n"
            )
        if self.image_end_offset:
            out.append(f"Image end offset: {self.image_end_offset}\n")
        return "".join(out)

    def transcript(self) -> str:
        """stderr and stdout interleaved as on a terminal (``2>&1``), without the error line."""
        split = len(self.messages) if self.recheck_from is None else self.recheck_from
        text = "".join(m + "\n" for m in self.messages[:split])
        human = self.human()
        marker = "Double checking the fixed image now...\n"
        if marker in human:
            head, tail = human.split(marker, 1)
            text += head + marker
            human = tail
        text += "".join(m + "\n" for m in self.messages[split:])
        return text + human


def _json_value(value: Any) -> str:
    return quote(value) if isinstance(value, str) else str(value)
