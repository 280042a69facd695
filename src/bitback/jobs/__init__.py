"""Background jobs: the framework every long-running block operation is built on.

* :mod:`bitback.jobs.status` - :class:`JobStatus`, :class:`JobVerb` and their two tables
  (which status may follow which, which verb each status accepts); pure data.
* :mod:`bitback.jobs.job` - :class:`Job`: statuses with ``JOB_STATUS_CHANGE``, pause points,
  rate limiting (:class:`RateLimit`), error actions, user verbs, query entries.
* :mod:`bitback.jobs.registry` - :class:`JobRegistry`: the live jobs by id, the queries, the
  event sink, background completion work, cancel-all for ``quit``.
* :mod:`bitback.jobs.txn` - :class:`JobTxn`, the completion group: members succeed together
  or are cancelled together, and finish newest first.

A concrete job (backup) subclasses :class:`Job` and implements ``run`` and its outcome hooks;
it knows nothing of QMP. The ``block-job-*`` / ``job-*`` commands live in
:mod:`bitback.qmp.commands.jobs`.
"""

from __future__ import annotations

from bitback.jobs.job import EmitFn, Job, JobFailed, JobNotFoundError, JobRegistry, RateLimit
from bitback.jobs.status import (
    COMPLETED_STATUSES,
    READY_STATUSES,
    TRANSITIONS,
    VERBS,
    JobError,
    JobStatus,
    JobTransitionError,
    JobVerb,
    check_job_id,
    check_transition,
    check_verb,
)
from bitback.jobs.txn import JobTxn

__all__ = [
    "COMPLETED_STATUSES",
    "READY_STATUSES",
    "TRANSITIONS",
    "VERBS",
    "EmitFn",
    "Job",
    "JobError",
    "JobFailed",
    "JobNotFoundError",
    "JobRegistry",
    "JobStatus",
    "JobTransitionError",
    "JobTxn",
    "JobVerb",
    "RateLimit",
    "check_job_id",
    "check_transition",
    "check_verb",
]
