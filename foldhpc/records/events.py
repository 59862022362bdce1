"""``<run.dir>/events.jsonl``: what the runtime did, as typed records that tools read instead of log text.

One JSON object a line, appended by every process of a run (trainer ranks, the supervisor) with one
``write`` each (``O_APPEND``: lines of several processes interleave whole, never mixed), never
rewritten. ``foldhpc goodput``, ``plot``, ``chaos`` and ``status`` read these records, ``jobs.jsonl``,
``status.json`` and sacct; ``train.log`` is prose for people and may be reworded, rotated or lost.

Each line::

    {"v": 1, "t": 1764650000.123, "pid": 4242, "rank": 0, "kind": "progress", "step": 40, ...}

``v`` is :data:`VERSION`; ``t`` the wall clock (seconds since the epoch); ``rank`` is null in a
process that has no rank (the supervisor of a one-process run). :data:`KINDS` lists every kind with
the fields it must carry; :class:`EventLog` refuses to write a record that lacks one (a programming
error, caught by the tests), and a reader gets the extra fields a newer writer added untouched.
A non-finite number (the loss of a NaN step) is written as null: JSON has no NaN, and every line
must stay readable by any JSON parser.

A reader skips and counts, never crashes on: a truncated last line (a process killed mid-write), a
line of garbage, a record of an unknown version or kind, a record without ``t``/``kind``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from foldhpc.records.layout import EVENTS_FILE

log = logging.getLogger(__name__)

VERSION = 1

#: every event kind -> the fields it must carry (beyond v, t, pid, rank, kind)
KINDS: dict[str, tuple[str, ...]] = {
    # -- a trainer process ------------------------------------------------------------------------
    "process_start": ("process_start_t", "max_steps"),  # process_start_t: when the OS started this process
    "resumed": ("path", "step", "restarts"),  # the checkpoint this start resumed from
    "checkpoint_rejected": ("path", "step", "problem", "reason"),  # problem: CORRUPT / INCOMPATIBLE / ...
    "training": ("first", "last", "batch"),  # steps first..last will be run, global batch size
    "first_step": ("step", "step_s", "after_start_s", "timings"),  # timings: imports_s, data_s, setup_s, ...
    "progress": ("step", "max_steps", "loss", "lr", "grad_norm", "samples_per_s", "data_wait_frac", "steps"),
    "validation_start": ("step", "batches"),
    "validation_end": ("step", "seconds", "stopped", "metrics"),
    "signal": ("signal", "step"),  # a preemption signal: a checkpoint at this step boundary follows
    "checkpoint_staged": ("step", "reason"),  # the state copy is taken; the write goes on in the background
    "checkpoint_committed": ("step", "reason", "bytes", "write_s", "path"),  # durable (fsync + rename)
    "checkpoint_failed": ("step", "error"),
    "checkpoint_durable": ("step", "after_boundary_s"),  # a signal save: durable this long after the boundary
    "checkpoint_deleted": ("path", "reason"),  # a bad file removed at resume
    "checkpoint_pruned": ("path", "step"),  # an old good file removed by keep_last
    "checkpoint_stale_tmp": ("path",),  # a temporary of a killed writer removed
    "nonfinite_skip": ("step", "what"),  # a non-finite step whose update was skipped
    "rollback": ("first", "at", "to"),  # skipped steps first..at, back to the checkpoint of step `to`
    # -- silent data corruption and stragglers (foldhpc.train.sdc, docs/sdc.md) ------------------
    # the replicas' digests differ at a check: digests = one per rank (rank order)
    "sdc_mismatch": ("step", "digests", "ranks"),
    # an attribution starts: trigger = mismatch / loss_spike / nonfinite, replaying window [first, last]
    "sdc_replay": ("step", "trigger", "first", "last", "path"),
    # its verdict: transient / deterministic / rank; ranks and nodes suspect (empty if none); step:
    # the step it is pinned to; reproducible: the anomaly came back in the replay; samples: the batch
    "sdc_attribution": ("step", "trigger", "verdict", "reproducible", "ranks", "nodes", "samples"),
    # a node found suspect by a second attribution of this run: the bad-node machinery excludes it
    "sdc_suspect_node": ("node", "suspected", "steps"),
    # a rank slower than straggler_factor x the median compute time per step over the window
    "straggler": ("step", "straggler_rank", "node", "ratio", "compute_s", "wait_s"),  # rank: the writer's
    "completed": ("step",),
    "failed": ("step", "error"),
    "failed_ranks": ("step", "error", "ranks"),  # several ranks: the rank(s) to blame, after "failed"
    "checkpointed": ("step", "signal"),  # exiting for requeue on a durable checkpoint (after a signal)
    # -- the supervisor ---------------------------------------------------------------------------
    "supervisor_spawn": ("pids", "nproc", "restarts"),  # started the trainer (one pid per local rank)
    # a trainer died; step -1: at startup. Both also carry ``node`` (where it ran) since the metrics (issue 25)
    "supervisor_failure": ("failed_rank", "step", "reason", "cause"),
    "supervisor_hang": ("failed_rank", "step", "phase", "silent_s"),  # no heartbeat for too long
    "supervisor_restart": ("restarts", "delay_s"),  # restarting the trainer after a failure
    "supervisor_give_up": ("reason",),
    "supervisor_forwarded": ("signal",),  # a signal passed on to the trainer
    # -- the node (foldhpc.resilience.health, the supervisor's crash attribution) -----------------
    # the supervisor's health check of its node before a start: ok, its time, each check's seconds
    "health_check": ("node", "ok", "seconds", "checks"),
    # a node found bad: check = the failing check (devices, writable, free_mem, free_disk, clock,
    # command, fault_hook) or "crashes" (fault.node_crash_limit failures there without checkpoint
    # progress); the run's later jobs exclude every node of these records (foldhpc.cluster.nodes)
    "node_unhealthy": ("node", "check", "detail"),
    # -- fault injection (foldhpc.faults; never in a normal run) --------------------------------
    "fault_injected": ("what", "step"),  # what: the hook and its setting, e.g. "FOLDHPC_FAIL_KIND=kill"
}

_BASE = ("v", "t", "pid", "rank", "kind")


@dataclass(frozen=True, slots=True)
class Event:
    """One record of events.jsonl: when, which process, what, and the kind's own fields."""

    kind: str
    t: float
    pid: int
    rank: int | None
    data: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)


def _finite(x: Any) -> Any:
    """``x`` with every NaN/inf float (in dicts, lists, tuples) replaced by None."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def check_fields(kind: str, fields: dict[str, Any]) -> None:
    """ValueError if ``kind`` is not in :data:`KINDS` or ``fields`` lack one it must carry."""
    need = KINDS.get(kind)
    if need is None:
        raise ValueError(f"unknown event kind {kind!r} (add it to foldhpc.records.events.KINDS)")
    missing = [f for f in need if f not in fields]
    if missing:
        raise ValueError(f"event {kind!r} lacks {', '.join(missing)}")
    clash = [f for f in fields if f in _BASE and f != "t"]
    if clash:  # it would overwrite the record's own (pid: the writer's process, not the one meant)
        raise ValueError(f"event {kind!r}: field(s) {', '.join(clash)} are the record's own; use another name")


class EventSink(Protocol):
    """Where a component sends its events: an :class:`EventLog`, or a :class:`NullEventLog` where
    there is no run directory (a manager used by a tool, a test)."""

    def emit(self, kind: str, /, **fields: Any) -> None: ...


class EventLog:
    """Appends events of one process to ``<run_dir>/events.jsonl``.

    A failed write (the run folder full, a flaky mount) never stops training: it is logged once per
    outage and the event is lost (the checkpoints hold the run's state; the events are its account).
    """

    def __init__(self, run_dir: Path, rank: int | None = None) -> None:
        self.path = Path(run_dir) / EVENTS_FILE
        self.rank = rank
        self.failing = False

    def emit(self, kind: str, /, **fields: Any) -> None:
        check_fields(kind, fields)
        rec = {"v": VERSION, "t": fields.pop("t", None) or time.time(), "pid": os.getpid(), "rank": self.rank,
               "kind": kind, **fields}
        try:
            text = json.dumps(rec, separators=(",", ":"), default=str, allow_nan=False)
        except ValueError:  # a NaN or inf somewhere: null (rare; the common case is one dumps)
            text = json.dumps(_finite(rec), separators=(",", ":"), default=str, allow_nan=False)
        line = (text + "\n").encode("utf-8")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    # a record cut short (a full disk, a writer killed mid-line, by any process of
                    # the run): end that fragment so that this record stays a line of its own
                    line = b"\n" + line
                n = os.write(fd, line)
            finally:
                os.close(fd)
            if n < len(line):
                raise OSError(28, "short write (no space left?)")
        except OSError as e:
            if not self.failing:
                log.warning("cannot append to %s (%s): training goes on; events are lost until a write succeeds",
                            self.path, e.strerror or e)
            self.failing = True
            return
        self.failing = False


class NullEventLog:
    """Events of a process that records none (tests, tools that only read)."""

    def emit(self, kind: str, /, **fields: Any) -> None:
        check_fields(kind, fields)  # the same programming errors fail here as with a real log


@dataclass
class EventScan:
    """What a read of events.jsonl skipped, by why; ``notes()`` says it in a line each."""

    lines: int = 0
    bad_lines: int = 0  # not JSON, not an object, no t/kind (a truncated last line counts here)
    unknown_version: int = 0
    unknown_kind: int = 0
    kinds: dict[str, int] = field(default_factory=dict)

    def notes(self) -> list[str]:
        out = []
        if self.bad_lines:
            out.append(f"{EVENTS_FILE}: skipped {self.bad_lines} unreadable line(s) (truncated or not JSON)")
        if self.unknown_version:
            out.append(f"{EVENTS_FILE}: skipped {self.unknown_version} record(s) of an unknown version "
                       f"(this foldhpc reads version {VERSION})")
        if self.unknown_kind:
            out.append(f"{EVENTS_FILE}: skipped {self.unknown_kind} record(s) of an unknown kind")
        return out


def parse_event(line: str | bytes, scan: EventScan | None = None) -> Event | None:
    """One line -> an Event, or None (counted in ``scan``) if it is not a record this version reads."""
    scan = scan if scan is not None else EventScan()
    scan.lines += 1
    try:
        rec = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        scan.bad_lines += 1
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("kind"), str) \
            or not isinstance(rec.get("t"), (int, float)) or isinstance(rec.get("t"), bool):
        scan.bad_lines += 1
        return None
    if rec.get("v") != VERSION:
        scan.unknown_version += 1
        return None
    kind = rec["kind"]
    if kind not in KINDS:
        scan.unknown_kind += 1
        return None
    pid, rank = rec.get("pid"), rec.get("rank")
    ev = Event(kind=kind, t=float(rec["t"]), pid=pid if isinstance(pid, int) else -1,
               rank=rank if isinstance(rank, int) and not isinstance(rank, bool) else None,
               data={k: v for k, v in rec.items() if k not in _BASE})
    scan.kinds[kind] = scan.kinds.get(kind, 0) + 1
    return ev


def iter_events(run_dir: Path, scan: EventScan | None = None) -> Iterator[Event]:
    """The run's events in file order, streamed (a file of gigabytes is never in memory).
    Nothing if the file does not exist."""
    path = Path(run_dir) / EVENTS_FILE
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    with f:
        for line in f:
            if not line.strip():
                continue
            ev = parse_event(line, scan)
            if ev is not None:
                yield ev


def read_events(run_dir: Path) -> tuple[list[Event], EventScan]:
    """Every event of the run, and what was skipped."""
    scan = EventScan()
    return list(iter_events(run_dir, scan)), scan


def has_events(run_dir: Path) -> bool:
    return (Path(run_dir) / EVENTS_FILE).exists()
