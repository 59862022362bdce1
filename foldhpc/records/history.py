"""``<run.dir>/jobs.jsonl``: the append-only story of a run's Slurm jobs.

One JSON object per line, so ``foldhpc status`` can rebuild submit -> run -> preempted ->
requeued -> run -> completed even after sacct has forgotten the job. Appends of one short line
are atomic on POSIX filesystems.

Every event is a dataclass below (:class:`Submitted`, :class:`Started`, :class:`Requeued`,
:class:`Stopped`, :class:`Completed`, :class:`Failed`, :class:`FollowedUp`,
:class:`FollowupCancelled`, :class:`Refused`, :class:`Restarted`, :class:`GaveUp`), written by
:func:`write_event` as ``{"time", "event", "host", <its fields>}`` with sorted keys: the same line
the untyped ``record_event(run_dir, "started", job_id=...)`` wrote before the types, so every
reader (``foldhpc status``, ``goodput``, ``plot``, the chain count) keeps reading plain dicts
through :func:`read_history`. A field whose default is :data:`ABSENT` is left out of the line
unless given, where it was written only sometimes before (``step`` of a decision whose step is
unknown, ``rank`` of a one-process job): readers tell "absent" from ``null`` (``"step" not in e``).
"""

from __future__ import annotations

import enum
import json
import os
import socket
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar, Union

from foldhpc.records.layout import HISTORY_FILE

__all__ = ["HISTORY_FILE", "ABSENT", "JobEvent", "Submitted", "Started", "Requeued", "Stopped", "Completed",
           "Failed", "FollowedUp", "FollowupCancelled", "Refused", "Restarted", "GaveUp", "EVENTS",
           "write_event", "record_started", "record_event", "read_history", "job_ids", "or_absent"]

T = TypeVar("T")


class _Absent(enum.Enum):
    ABSENT = "absent"

    def __repr__(self) -> str:
        return "ABSENT"


#: the value of a field that is not written at all (``None`` is written as ``null``)
ABSENT = _Absent.ABSENT
#: a field that may be left out of the line
Maybe = Union[T, _Absent]


def or_absent(value: T | None) -> T | _Absent:
    """``value``, or :data:`ABSENT` where it is None (for a field written only when known)."""
    return ABSENT if value is None else value


@dataclass(frozen=True, kw_only=True)
class JobEvent:
    """One line of jobs.jsonl; ``EVENT`` is its ``"event"`` value. ``job_id`` is None outside Slurm
    (a ``--local`` job, a supervisor run by hand)."""

    EVENT: ClassVar[str]
    job_id: str | None

    def fields(self) -> dict[str, Any]:
        """The line's own fields (without time, event, host), ABSENT ones left out."""
        return {f.name: v for f in fields(self) if (v := getattr(self, f.name)) is not ABSENT}


@dataclass(frozen=True, kw_only=True)
class Submitted(JobEvent):
    """A job was submitted for the run (``backend``: "slurm", or "local" whose id is a pid)."""

    EVENT: ClassVar[str] = "submitted"
    backend: str
    partition: str | None
    followup_of: Maybe[str] = ABSENT  # a follow-up job: its predecessor (foldhpc.slurm.followup)
    chain_restarts: Maybe[int] = ABSENT  # ... and the restarts its chain had used before it
    sweep: Maybe[str] = ABSENT  # a task of a sweep: the sweep directory (foldhpc.slurm.sweep)
    array_task: Maybe[int] = ABSENT


@dataclass(frozen=True, kw_only=True)
class Started(JobEvent):
    """A run of the job began (once per Slurm restart: ``restart_count``). Written by
    :func:`record_started` only."""

    EVENT: ClassVar[str] = "started"
    restart_count: int
    backend: Maybe[str] = ABSENT  # "sbatch": a batch script running ``foldhpc train``; absent: submitit
    supervised: Maybe[bool] = ABSENT  # the batch script's trainer runs under a supervisor
    world_size: Maybe[int] = ABSENT  # a multi-rank submitit job


@dataclass(frozen=True, kw_only=True)
class Completed(JobEvent):
    EVENT: ClassVar[str] = "completed"
    step: int


@dataclass(frozen=True, kw_only=True)
class Failed(JobEvent):
    EVENT: ClassVar[str] = "failed"
    error: str
    rank: Maybe[int] = ABSENT  # a multi-rank job: which rank, on which node
    node: Maybe[str] = ABSENT


@dataclass(frozen=True, kw_only=True)
class _Decided(JobEvent):
    """After a checkpoint on a signal: the requeue decision (foldhpc.slurm.requeue.Decision)."""

    restart_count: int
    why: str  # Decision.kind
    reason: str
    step: Maybe[int] = ABSENT  # the checkpointed step, where known
    signal: Maybe[str | None] = ABSENT  # the submitit job writes it (null: no signal name known)


@dataclass(frozen=True, kw_only=True)
class Requeued(_Decided):
    EVENT: ClassVar[str] = "requeued"


@dataclass(frozen=True, kw_only=True)
class Stopped(_Decided):
    EVENT: ClassVar[str] = "stopped"


@dataclass(frozen=True, kw_only=True)
class FollowedUp(JobEvent):
    """The run goes on in ``followup_job_id`` (``--dependency=afterany:<job_id>``)."""

    EVENT: ClassVar[str] = "followup"
    followup_job_id: str
    chain_restarts: int  # restarts the chain has used, this hand-over included
    restart_count: int
    reason: str
    step: Maybe[int] = ABSENT


@dataclass(frozen=True, kw_only=True)
class FollowupCancelled(JobEvent):
    """Follow-up job ``job_id`` was cancelled again: ``followup_of`` was cancelled or requeued meanwhile."""

    EVENT: ClassVar[str] = "followup_cancelled"
    followup_of: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class Refused(JobEvent):
    """The job did not train: another trainer holds the run directory (``holder``: its lock record)."""

    EVENT: ClassVar[str] = "refused"
    restart_count: int
    holder: dict[str, Any]
    reason: str


@dataclass(frozen=True, kw_only=True)
class Restarted(JobEvent):
    """The supervisor restarted the trainer within the job (in-job restart ``attempt``)."""

    EVENT: ClassVar[str] = "restarted"
    attempt: int
    step: int
    reason: str
    rank: Maybe[int] = ABSENT


@dataclass(frozen=True, kw_only=True)
class GaveUp(JobEvent):
    """The supervisor stopped restarting the trainer."""

    EVENT: ClassVar[str] = "gave_up"
    reason: str
    step: int
    in_job_restarts: int


#: event name -> its class, for every event written today
EVENTS: dict[str, type[JobEvent]] = {c.EVENT: c for c in (
    Submitted, Started, Completed, Failed, Requeued, Stopped, FollowedUp, FollowupCancelled, Refused, Restarted,
    GaveUp)}


def _append(run_dir: Path, event: str, fields_: dict[str, Any]) -> None:
    """One line, fsynced: the story must survive the node (a requeue may end this process next)."""
    entry = {"time": time.time(), "event": event, "host": socket.gethostname(), **fields_}
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(run_dir) / HISTORY_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_event(run_dir: Path, event: JobEvent) -> None:
    """Append ``event`` to ``<run_dir>/jobs.jsonl``; raises OSError if it cannot."""
    _append(run_dir, event.EVENT, event.fields())


class JobIdentity(Protocol):
    """What :func:`record_started` needs of the job (foldhpc.cluster.env.SlurmEnv has it)."""

    @property
    def job_id(self) -> str | None: ...

    @property
    def restart_count(self) -> int: ...


def record_started(run_dir: Path, job: JobIdentity, *, backend: Maybe[str] = ABSENT,
                   supervised: Maybe[bool] = ABSENT, world_size: Maybe[int] = ABSENT) -> None:
    """The "started" event of this run of ``job``: the one place it is written, by whichever process
    tells the job's story (the submitit job's rank 0, or ``foldhpc train`` / its supervisor in a
    batch script). Raises OSError if it cannot be written."""
    write_event(run_dir, Started(job_id=job.job_id, restart_count=job.restart_count, backend=backend,
                                 supervised=supervised, world_size=world_size))


def record_event(run_dir: Path, event: str, **fields_: Any) -> None:
    """The untyped form: an event by name with any fields (the same line as :func:`write_event`).
    Kept for callers not yet typed and for tests that write partial or odd histories; new code
    writes a :class:`JobEvent`."""
    _append(run_dir, event, fields_)


def read_history(run_dir: Path) -> tuple[list[dict[str, Any]], int]:
    """(events, number of unusable lines), never raising on what the file holds.

    Each line is decoded on its own: one bad byte (a torn write, a disk error, an editor) costs
    only its line, never the others -- ``foldhpc status``, ``goodput`` and the chain's restart
    count (:func:`foldhpc.slurm.followup.chain_restarts`, which bounds ``slurm.max_requeues``)
    all read the story from here. A line that is not valid UTF-8 is read with the bad bytes
    replaced (U+FFFD): a bad byte inside a string value still leaves its event usable. A line that
    is not a JSON object after that (a torn last line, a number, a list, nesting too deep) is
    counted and skipped. The writers write ASCII only (``json.dumps``), split at ``\\n``.
    """
    path = Path(run_dir) / HISTORY_FILE
    events: list[dict[str, Any]] = []
    bad = 0
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        try:
            e = json.loads(raw.decode("utf-8", errors="replace"))
        except (ValueError, RecursionError):  # JSONDecodeError, an int of too many digits, [[[[...
            e = None
        if isinstance(e, dict):
            events.append(e)
        else:
            bad += 1
    return events, bad


def job_ids(run_dir: Path) -> list[str]:
    """Slurm job ids of a run, in submission order, without duplicates (``--local`` runs have none:
    their "job id" is a process id that sacct must never be asked about)."""
    seen: list[str] = []
    for e in read_history(run_dir)[0]:
        if e.get("backend") == "local":
            continue
        jid = e.get("job_id")
        if jid and str(jid) not in seen:
            seen.append(str(jid))
    return seen
