"""Job statuses and user verbs as two tables, and the two guards that read them.

This module is pure data plus two checks; it does no I/O and knows nothing of events. The
tables transcribe QEMU 7.2's ``JobSTT`` and ``JobVerbTable`` (``job.c``), the statuses and
verbs of ``qapi/job.json``.

Every status a job passes through, with the moves :data:`TRANSITIONS` allows::

    created --start--> running --run() done--> waiting --all done--> pending --finalize--+
      |  |              |  ^                                                              |
      |  |        pause |  | resume        (mirror: running -> ready <-> standby,         |
      |  |              v  |                ready -> waiting)                             |
      |  |             paused                                                             v
      |  +--creation failed--> null <--dismiss-- concluded <-----------------------------+
      |                                             ^
      +--cancel--> aborting ------------------------+
                     ^
                     +-- failure or cancel from running, ready, waiting or pending

Success: ``running -> waiting -> pending -> concluded -> null``. Failure or cancel:
``... -> aborting -> concluded -> null``. ``aborting -> aborting`` is allowed (the failure is
recorded twice on some paths) and, like every transition to the same status, emits nothing.

A *verb* is a user command addressed to a job (``block-job-pause``, ``job-finalize``...).
:func:`check_verb` refuses a verb the job's status does not accept, with QEMU's text; a
refused *transition* (:func:`check_transition`) is never the user's fault but a bug in
bitback, so it raises :class:`JobTransitionError`, an :class:`AssertionError`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType

from bitback.errors import InvalidArgumentError

__all__ = [
    "COMPLETED_STATUSES",
    "READY_STATUSES",
    "TRANSITIONS",
    "VERBS",
    "JobError",
    "JobStatus",
    "JobTransitionError",
    "JobVerb",
    "check_job_id",
    "check_transition",
    "check_verb",
]


class JobStatus(StrEnum):
    """``JobStatus`` of ``qapi/job.json``, in its order."""

    UNDEFINED = "undefined"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    READY = "ready"
    STANDBY = "standby"
    WAITING = "waiting"
    PENDING = "pending"
    ABORTING = "aborting"
    CONCLUDED = "concluded"
    NULL = "null"


class JobVerb(StrEnum):
    """``JobVerb`` of ``qapi/job.json``, in its order. ``change`` (``block-job-change``)
    arrived in QEMU 8.2; it is listed so the table is complete, no 7.2 command uses it."""

    CANCEL = "cancel"
    PAUSE = "pause"
    RESUME = "resume"
    SET_SPEED = "set-speed"
    COMPLETE = "complete"
    DISMISS = "dismiss"
    FINALIZE = "finalize"
    CHANGE = "change"


_S = JobStatus

TRANSITIONS: Mapping[JobStatus, frozenset[JobStatus]] = MappingProxyType({
    _S.UNDEFINED: frozenset({_S.CREATED}),
    _S.CREATED: frozenset({_S.RUNNING, _S.ABORTING, _S.NULL}),
    _S.RUNNING: frozenset({_S.PAUSED, _S.READY, _S.WAITING, _S.ABORTING}),
    _S.PAUSED: frozenset({_S.RUNNING}),
    _S.READY: frozenset({_S.STANDBY, _S.WAITING, _S.ABORTING}),
    _S.STANDBY: frozenset({_S.READY}),
    _S.WAITING: frozenset({_S.PENDING, _S.ABORTING}),
    _S.PENDING: frozenset({_S.ABORTING, _S.CONCLUDED}),
    _S.ABORTING: frozenset({_S.ABORTING, _S.CONCLUDED}),
    _S.CONCLUDED: frozenset({_S.NULL}),
    _S.NULL: frozenset(),
})  # fmt: skip
"""Status -> the statuses a job may move to from it (QEMU's ``JobSTT``)."""

_LIVE = frozenset({_S.CREATED, _S.RUNNING, _S.PAUSED, _S.READY, _S.STANDBY})

VERBS: Mapping[JobVerb, frozenset[JobStatus]] = MappingProxyType({
    JobVerb.CANCEL: _LIVE | {_S.WAITING, _S.PENDING},
    JobVerb.PAUSE: _LIVE,
    JobVerb.RESUME: _LIVE,
    JobVerb.SET_SPEED: _LIVE,
    JobVerb.COMPLETE: frozenset({_S.READY}),
    JobVerb.DISMISS: frozenset({_S.CONCLUDED}),
    JobVerb.FINALIZE: frozenset({_S.PENDING}),
    JobVerb.CHANGE: frozenset({_S.READY}),
})  # fmt: skip
"""Verb -> the statuses in which a job accepts it (QEMU's ``JobVerbTable``)."""

COMPLETED_STATUSES = frozenset({_S.WAITING, _S.PENDING, _S.ABORTING, _S.CONCLUDED, _S.NULL})
"""Statuses of a job whose work has ended (QEMU's ``job_is_completed``)."""

READY_STATUSES = frozenset({_S.READY, _S.STANDBY})
"""Statuses in which ``query-block-jobs`` reports ``ready: true`` (``job_is_ready``)."""


class JobError(InvalidArgumentError):
    """A verb the job's current status does not accept.

    Fields: ``job_id``, ``status`` and ``verb``; the message is QEMU's
    ``Job 'ID' in state 'STATUS' cannot accept command verb 'VERB'``.
    """

    def __init__(self, job_id: str, status: JobStatus, verb: JobVerb) -> None:
        super().__init__(f"Job '{job_id}' in state '{status}' cannot accept command verb '{verb}'")
        self.job_id = job_id
        self.status = status
        self.verb = verb


class JobTransitionError(AssertionError):
    """The framework tried a status change the table forbids: a bug, never a user error."""

    def __init__(self, old: JobStatus, new: JobStatus) -> None:
        super().__init__(f"job status transition {old} -> {new} is not allowed")
        self.old = old
        self.new = new


def check_verb(job_id: str, status: JobStatus, verb: JobVerb) -> None:
    """Return if a job in ``status`` accepts ``verb``, else raise :class:`JobError`."""
    if status not in VERBS[verb]:
        raise JobError(job_id, status, verb)


def check_transition(old: JobStatus, new: JobStatus) -> None:
    """Return if ``old -> new`` is in :data:`TRANSITIONS`, else raise
    :class:`JobTransitionError`."""
    if new not in TRANSITIONS[old]:
        raise JobTransitionError(old, new)


# QEMU's id_wellformed (util/id.c): a letter, then letters, digits, '-', '.', '_'.
_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")


def check_job_id(job_id: str) -> None:
    """Return if ``job_id`` has the syntax of a QEMU identifier (that of node names, without
    their length limit), else raise ``Invalid job ID 'X'``."""
    if not _ID_RE.match(job_id):
        raise InvalidArgumentError(f"Invalid job ID '{job_id}'")
