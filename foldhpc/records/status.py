"""The run's machine-readable status file, ``<run.dir>/status.json``.

``foldhpc status`` reads it next to sacct: Slurm knows whether the *job* is alive, only the
run knows how far training got and why it failed. It is rewritten atomically (temp file +
rename) so a reader never sees half a file, even if the writer is killed.

:class:`RunStatus` is the file's schema: every field any writer puts there, with its type. Writers
keep calling ``status.update(step=..., state=...)``, and a name :class:`RunStatus` does not declare
is refused (a typo would otherwise silently start a new field that no reader looks at). Readers
either take the dict (:func:`read_status`, as it is on disk) or the typed record
(:func:`read_run_status`), which tolerates files of older versions (fields missing) and newer ones
(fields it does not know, kept in :attr:`RunStatus.extra`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from foldhpc.records.fsio import atomic_write_text
from foldhpc.records.layout import STATUS_FILE

log = logging.getLogger(__name__)


# States a run records itself. Slurm-level states (pending, preempted, timeout...) come from sacct.
RUNNING, COMPLETED, FAILED, CHECKPOINTED = "running", "completed", "failed", "checkpointed"
#: the supervisor's state between a crashed trainer and its restart (foldhpc.resilience.supervisor)
RESTARTING = "restarting"
#: restarts or jobs without a new checkpoint: ended by the crash-loop breaker, never requeued (exit 93)
CRASH_LOOP = "crash_loop"


@dataclass
class RunStatus:
    """Every field of ``status.json``; None where the file does not have it (not yet written, or
    written by an older version). Names are a contract with users' scripts: add, never rename."""

    # -- written by every update (StatusFile itself)
    updated_at: float | None = None  #: wall time of the last write
    host: str | None = None  #: host name of the process that wrote it last
    pid: int | None = None  #: pid of the process that wrote it last (trainer or supervisor)
    # -- the run's state (foldhpc.train.loop, foldhpc.resilience.supervisor)
    state: str | None = None  #: running, completed, failed, checkpointed (for requeue) or restarting
    step: int | None = None  #: optimizer steps completed (after a rollback: the step rolled back to)
    max_steps: int | None = None  #: train.max_steps of the run
    started_at: float | None = None  #: wall time this trainer process started
    finished_at: float | None = None  #: wall time training completed
    error: str | None = None  #: why the run failed (None while it runs, or after it completed)
    signal: str | None = None  #: the preemption signal that made it checkpoint and exit ("SIGUSR1")
    warning: str | None = None  #: a problem that did not stop the run (bad checkpoints skipped at resume)
    # -- where it runs (foldhpc.train.loop)
    slurm_job_id: str | None = None  #: SLURM_JOB_ID of the job running it (None outside Slurm)
    slurm_restart_count: int | None = None  #: SLURM_RESTART_COUNT: times Slurm requeued that job
    world_size: int | None = None  #: number of ranks
    nodes: list[str] | None = None  #: the nodes of a multi-rank run, sorted
    ranks: list[dict[str, Any]] | None = None  #: one record per rank: rank, node, host, pid, device
    failed_ranks: list[dict[str, Any]] | None = None  #: the rank(s) blamed for a failure: rank, node, host, pid, why
    # -- restarts
    restarts: int | None = None  #: resumes from a checkpoint over the run's life (trainer's count)
    in_job_restarts: int | None = None  #: restarts of a crashed/hung trainer by the supervisor in this job
    last_failure: dict[str, Any] | None = None  #: the supervisor's last trainer failure: rank, step, phase, reason, ...
    # -- checkpoints
    last_checkpoint: dict[str, Any] | None = None  #: newest committed checkpoint: step, file, saved_at
    last_save_error: str | None = None  #: why the last checkpoint write failed (None once one succeeds)
    # -- progress (foldhpc.train.loop, every log window)
    loss: float | None = None  #: mean training loss of the latest log window with a finite loss
    samples_per_s: float | None = None  #: throughput of the latest log window
    data_wait_frac: float | None = None  #: fraction of that window spent waiting for data
    eta_s: float | None = None  #: estimated seconds to max_steps
    train_time_s: float | None = None  #: seconds spent training (carried across restarts by the checkpoint)
    startup: dict[str, float] | None = None  #: startup breakdown of this process (imports_s, rendezvous_s, ...)
    nonfinite: dict[str, Any] | None = None  #: non-finite losses: skipped, streak, rollbacks, rollback_after
    #: silent data corruption (foldhpc.train.sdc): check_every, checks, mismatches, attributions (each: step,
    #: trigger, verdict, reproducible, ranks, nodes, samples, replay_s), suspect_nodes {node: count}, last
    sdc: dict[str, Any] | None = None
    #: ranks named as stragglers in the latest window: rank, node, ratio, compute_s, wait_s, step (empty: none)
    stragglers: list[dict[str, Any]] | None = None
    # -- validation and results
    val: dict[str, float] | None = None  #: metrics of the latest validation
    val_step: int | None = None  #: the step of that validation
    metrics: dict[str, float] | None = None  #: final metrics of a completed run
    # -- bad nodes (foldhpc.resilience.health, foldhpc.cluster.nodes)
    bad_nodes: list[dict[str, Any]] | None = None  #: every node found bad in this run: node, check, detail, t, job_id
    excluded_nodes: list[str] | None = None  #: the nodes the run's newest hand-over excluded (--exclude)
    #: fields of the file that this version does not know (a newer foldhpc wrote them); not a field
    #: of the file itself, and never written by :class:`StatusFile`
    extra: dict[str, Any] = field(default_factory=dict, metadata={"status_field": False}, repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunStatus:
        """The typed record of a status dict. A field of the wrong type (a hand-edited or foreign
        file) is read as None -- the dict from :func:`read_status` still has it as it is."""
        known: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for name, value in data.items():
            check = _CHECKS.get(name)
            if check is None:
                extra[name] = value
            elif value is None or check(value):
                known[name] = float(value) if name in _FLOATS and value is not None else value
            else:
                log.debug("status.json field %s = %r is not a %s: read as None", name, value, _TYPES[name])
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The fields set (not None), as :class:`StatusFile` writes them; unknown fields kept."""
        out = {f: getattr(self, f) for f in STATUS_FIELDS if getattr(self, f) is not None}
        return {**self.extra, **out}


def _runtime_check(hint: Any) -> typing.Callable[[Any], bool]:
    """isinstance against an annotation of :class:`RunStatus` (``X | None`` with X a plain type or
    a ``list[...]``/``dict[...]``: the containers' items are not checked). bool is no int here."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] if isinstance(hint, types.UnionType) else [hint]
    kinds = tuple(typing.get_origin(a) or a for a in args)
    if float in kinds:
        kinds += (int,)  # JSON has one number type: 3 is a fine float

    def check(value: Any) -> bool:
        return isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    return check


_HINTS = typing.get_type_hints(RunStatus)
#: the names a status.json may hold: every field of RunStatus but ``extra``
STATUS_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(RunStatus)
                                       if f.metadata.get("status_field", True))
_TYPES = {name: _HINTS[name] for name in STATUS_FIELDS}
_CHECKS = {name: _runtime_check(hint) for name, hint in _TYPES.items()}
_FLOATS = frozenset(name for name, hint in _TYPES.items() if float in typing.get_args(hint))


def check_status_fields(fields: typing.Iterable[str]) -> None:
    """Raise TypeError naming each field that :class:`RunStatus` does not declare."""
    unknown = [f for f in fields if f not in _CHECKS]
    if unknown:
        raise TypeError(f"status.json has no field {', '.join(map(repr, unknown))}: declare it in "
                        "foldhpc.records.status.RunStatus (with its type and what it means) to write it")


@runtime_checkable
class StatusSink(Protocol):
    """Where the trainer and the supervisor record the run's state: a :class:`StatusFile` (rank 0,
    the supervisor) or a :class:`NullStatus` (the other ranks). ``update`` takes fields of
    :class:`RunStatus` and refuses others; ``data`` is what has been recorded so far."""

    data: dict[str, Any]

    def update(self, **fields: Any) -> None: ...


class StatusFile:
    """Keeps the status dict in memory and rewrites the file on each update.

    A write that fails (``run.dir`` full while the checkpoints, elsewhere, still have room; a
    flaky mount) never ends training: status.json is for people and ``foldhpc status``, the run's
    state is in its checkpoints. It is logged once per outage, and every later update retries with
    the whole dict, so the file is complete again as soon as a write succeeds.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / STATUS_FILE
        self.failing = False  # the last write failed (warned once; the next update retries)
        try:
            self.data: dict[str, Any] = read_status(run_dir) or {}
        except ValueError:  # a corrupt file from a killed writer of an old version: start afresh
            self.data = {}

    def update(self, **fields: Any) -> None:
        """Record ``fields`` (names of :class:`RunStatus`; TypeError for any other, nothing
        written) and rewrite the file with everything recorded so far."""
        check_status_fields(fields)
        self.data.update(fields)
        self.data["updated_at"] = time.time()
        self.data["host"] = socket.gethostname()
        self.data["pid"] = os.getpid()
        try:
            atomic_write_text(self.path, json.dumps(self.data, indent=1, sort_keys=True) + "\n", fsync=False)
        except OSError as e:
            if not self.failing:
                log.warning("cannot write %s (%s): training goes on, the status is written again at the next "
                            "update that succeeds", self.path, e.strerror or e)
            self.failing = True
            return
        if self.failing:
            log.info("%s is written again", self.path)
            self.failing = False


class NullStatus:
    """The status of ranks other than 0: rank 0 owns status.json (a failing rank writes it through
    a :class:`StatusFile` of its own)."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def update(self, **fields: Any) -> None:
        check_status_fields(fields)  # the same typos fail on every rank, not only on rank 0


def read_status(run_dir: Path) -> dict[str, Any] | None:
    """The status dict, or None if the file is missing. Raises ValueError if it is corrupt."""
    path = Path(run_dir) / STATUS_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupt status file ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: corrupt status file (not a JSON object)")
    return data


def read_run_status(run_dir: Path) -> RunStatus | None:
    """The typed status (see :meth:`RunStatus.from_dict`), or None if the file is missing. Raises
    ValueError if it is corrupt, like :func:`read_status`."""
    data = read_status(run_dir)
    return None if data is None else RunStatus.from_dict(data)
