"""A run's wall time as a :class:`Timeline` of segments and events, rebuilt from its records.

``foldhpc goodput`` sums the segments per category and ``foldhpc plot`` draws them; both read
only what a run already writes, so they work on any run directory, finished, running or long dead:

* ``events.jsonl`` (:mod:`foldhpc.records.events`: every process of the run appends typed records,
  each with its pid, rank and a float time): trainer starts (the supervisor's ``supervisor_spawn``
  with the trainer pids), ``first_step`` with the startup timings of *that* start (``status.json``
  keeps only the latest), one ``progress`` record per ``run.log_every`` steps with samples/s and the
  data-wait fraction (so the window's measured loop time is ``steps x batch / samples_per_s``),
  validation and checkpoint records, resumes, the supervisor's failure and hang records (the step
  the trainer was working on when it died), non-finite rollbacks.
* ``jobs.jsonl``: submitted / started / requeued / stopped / completed / failed, with float times:
  the queue wait of each Slurm job run, refined by sacct's Submit/Start/End where sacct answers.
* ``status.json``: whether the run is still going (then the timeline ends *now*).

``train.log`` is prose for people and is never parsed: rewording a log line changes nothing here.
A run made before foldhpc recorded events has a ``train.log`` and no ``events.jsonl``: its timeline
holds what ``jobs.jsonl``, ``status.json`` and sacct say (wall time, queue waits, job runs), and
:attr:`Timeline.steps_known` is False with a note: its step figures are unknown, not zero.
TensorBoard is not read: a resume purges the scalars of the steps a crash lost, and events after
the last flush die with the process, which are exactly the steps goodput must count as recomputed;
``events.jsonl`` is written a record at a time.

``events.jsonl`` is read record by record, in one pass, and only what the timeline needs of each is
kept: a file of gigabytes is never in memory. A truncated last line, a garbage line, a record of an
unknown version or kind, or one whose fields are not what its kind says is skipped, counted and
noted. A record stamped more than :data:`CLOCK_STEP_S` earlier than one before it means the wall
clock was stepped back (an NTP step, a VM resumed): the records from there on are shifted forward
to follow on, with a note, so the timeline never runs backwards.

Every instant between the run's first record (its first submission, else its first process start)
and its end (now, while it runs) belongs to exactly one segment, so the categories add up to the
wall time. Inside a progress window the split between data wait, checkpoint stall and compute is
by measured durations (poured into the window's free time in that order), not by exact instants:
the window's own records carry no finer timing. The stall of a background checkpoint (the training
thread waits for the state copy in the next step) is not recorded; it is estimated as the window's
excess over the attempt's median step time.
"""

from __future__ import annotations

import bisect
import logging
import math
import shutil
import socket
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from foldhpc.cluster.command import SlurmCommandError
from foldhpc.records.events import Event, EventScan, has_events, iter_events
from foldhpc.records.fsio import pid_alive
from foldhpc.records.history import read_history
from foldhpc.records.layout import EVENTS_FILE, HISTORY_FILE, LOG_FILE, STATUS_FILE
from foldhpc.records.status import read_status

log = logging.getLogger(__name__)

PRODUCTIVE, RECOMPUTED, QUEUE, STARTUP = "productive", "recomputed", "queue_wait", "startup"
CHECKPOINT, VALIDATION, DATA_WAIT, IDLE = "checkpoint", "validation", "data_wait", "idle"
#: every category of wall time, in the order reports list them
CATEGORIES = (PRODUCTIVE, RECOMPUTED, QUEUE, STARTUP, CHECKPOINT, VALIDATION, DATA_WAIT, IDLE)
_SLACK_S = 1.0  # clock/recording slack when matching a process start to the job run it belongs to
#: A record this many seconds earlier than one before it: the clock was stepped back (records of
#: two processes, or two threads, can be out of order by milliseconds, never by this much)
CLOCK_STEP_S = 1.0
#: the note of a run directory without events.jsonl (made before foldhpc recorded events)
#: the note of a run whose supervised command records no steps
FOREIGN_NOTE = ("the supervised command records no steps (it does not use foldhpc.Session): wall time, restarts "
                "and queue wait only")
NO_EVENTS_NOTE = (f"no {EVENTS_FILE}: this run was made before foldhpc recorded events; step figures are unknown "
                  f"(wall time, queue wait and job runs are from {HISTORY_FILE}, {STATUS_FILE} and sacct; "
                  f"{LOG_FILE} is prose and is not parsed)")


# ------------------------------------------------------------------ records
@dataclass
class EventTrail:
    """What :func:`iter_run_events` saw besides the records it yielded (filled as they are read)."""

    scan: EventScan = field(default_factory=EventScan)  # lines read, and skipped by why
    records: int = 0  # records yielded
    malformed: int = 0  # records of a known kind whose fields are not what the kind says (skipped)
    first: float | None = None  # time of the first and the last record
    last: float | None = None
    saved: list[tuple[int, int, float, float, str]] = field(default_factory=list)  # pid, step, time, write_s, reason
    clock_steps: list[tuple[float, float]] = field(default_factory=list)  # (stamp as recorded, seconds back)

    def notes(self) -> list[str]:
        out = self.scan.notes()
        if self.malformed:
            out.append(f"{EVENTS_FILE}: skipped {self.malformed} record(s) whose fields are not what their kind says")
        return out



#: records the supervisor writes about its node (foldhpc.resilience.health) before a start: they
#: belong to no trainer process, so they must not open an attempt under the supervisor's pid
NODE_KINDS = ("health_check", "node_unhealthy")

def iter_run_events(run_dir: Path, trail: EventTrail | None = None) -> Iterator[tuple[float, Event]]:
    """``(time, event)`` of every readable record of ``<run_dir>/events.jsonl`` in file order (nothing
    if there is none), ``time`` on a clock that never goes back (see the module docstring;
    ``trail.clock_steps``).

    Only the records of rank 0 and its supervisor (on one host, one clock) decide a clock step: the
    other ranks' records may come from other nodes' clocks.
    """
    trail = trail if trail is not None else EventTrail()
    offset, newest = 0.0, -math.inf
    for ev in iter_events(Path(run_dir), trail.scan):
        t = ev.t + offset
        if ev.rank in (None, 0):
            if t < newest - CLOCK_STEP_S:
                trail.clock_steps.append((ev.t, newest - t))
                offset += newest - t
                t = newest
            newest = max(newest, t)
        trail.records += 1
        trail.first = t if trail.first is None else trail.first
        trail.last = t
        if ev.kind == "checkpoint_committed":
            step, write_s = _int(ev.get("step")), _num(ev.get("write_s"))
            if step is not None and write_s is not None:
                trail.saved.append((ev.pid, step, t, write_s, str(ev.get("reason"))))
        yield t, ev


def _num(v: Any) -> float | None:
    """A finite number from a record's field, else None (a hand-edited or newer record)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _timings(v: Any) -> dict[str, float]:
    """The ``*_s`` numbers of a first_step record's ``timings``."""
    if not isinstance(v, dict):
        return {}
    return {str(k): float(x) for k, x in v.items() if str(k).endswith("_s") and _num(x) is not None}


# ------------------------------------------------------------------ the timeline
@dataclass(slots=True)
class Segment:
    """``kind`` (one of :data:`CATEGORIES`) from ``start`` to ``end`` on row ``lane``; training
    segments carry how many optimizer steps they hold."""

    kind: str
    start: float
    end: float
    lane: int
    steps: int = 0

    @property
    def duration(self) -> float:
        return max(0.0, self.end - self.start)


@dataclass
class Mark:
    """An instant worth a marker: ``signal``, ``crash``, ``restart``, ``requeue``, ``fault``,
    ``submitted``, ``completed``, ``gave_up``, ``rollback``."""

    time: float
    kind: str
    label: str
    lane: int | None = None


@dataclass
class Write:
    """A checkpoint write (background or blocking) as logged: it ended at ``end`` after ``write_s``."""

    lane: int
    step: int
    end: float
    write_s: float
    reason: str


@dataclass
class Lane:
    """One row: a trainer process start (or a job run still waiting in the queue)."""

    index: int
    label: str
    pid: int | None
    job_id: str | None
    job_run: int | None  # SLURM_RESTART_COUNT of the job run it belongs to
    start: float
    end: float
    start_step: int | None = None  # where it started training (resume point), None if it never got there
    last_step: int | None = None  # the last step it worked on
    outcome: str = "unknown"  # completed, checkpointed, failed, killed/crashed (the reason), running, pending
    startup: dict[str, float] = field(default_factory=dict)  # its first-step line's timings


@dataclass
class Timeline:
    run_dir: str
    start: float
    end: float
    running: bool
    lanes: list[Lane]
    segments: list[Segment]
    marks: list[Mark]
    writes: list[Write]
    step_points: list[tuple[float, int]]  # (time, step) of every progress line, in time order
    notes: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    #: False for a run made before foldhpc recorded events: no step figures (unknown, not zero)
    steps_known: bool = True

    @property
    def wall_s(self) -> float:
        return max(0.0, self.end - self.start)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------ per process start
@dataclass
class _Attempt:
    pid: int
    spawn: float | None = None
    first_line: float | None = None  # its first and last own record
    last_line: float | None = None
    process_start: float | None = None  # when the OS started it (its process_start record)
    start_step: int | None = None
    batch: int | None = None
    resumed_from: int | None = None
    first_step_at: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    progress: list[tuple[float, int, float, float]] = field(default_factory=list)  # t, step, samples/s, wait
    rollbacks: list[tuple[float, int]] = field(default_factory=list)
    validations: list[tuple[float, float]] = field(default_factory=list)
    blocking: list[tuple[float, float]] = field(default_factory=list)  # signal and final saves
    staging: list[float] = field(default_factory=list)
    failure: tuple[float, int | None, str] | None = None  # supervisor: when, at which step, why
    outcome: str = "unknown"
    finished_at: float | None = None
    _val_open: float | None = None
    _sig_open: float | None = None

    @property
    def start(self) -> float:
        """The process start: the first step's time minus its age then (/proc), else the earliest of
        the spawn, the process_start record's OS start time and its first record."""
        p2f = self.timings.get("process_to_first_step_s")
        if self.first_step_at is not None and p2f:
            return self.first_step_at - p2f
        return min(t for t in (self.spawn, self.process_start, self.first_line) if t is not None)

    @property
    def end(self) -> float:
        return max(t for t in (self.last_line, self.finished_at, self.failure[0] if self.failure else None,
                               self.spawn) if t is not None)


class _Malformed(Exception):
    """A record of a known kind whose fields are not what the kind says: skipped and counted."""


def _need(v: int | float | None) -> Any:
    if v is None:
        raise _Malformed
    return v


def _parse_attempts(records: Iterable[tuple[float, Event]], marks: list[Mark], trail: EventTrail) -> list[_Attempt]:
    """Trainer process starts in order, from the supervisor's and the trainers' own records."""
    attempts: dict[int, _Attempt] = {}
    order: list[int] = []
    other_ranks: set[int] = set()
    current: _Attempt | None = None  # the newest supervised start (the one a failure record is about)

    def get(pid: int) -> _Attempt:
        if pid not in attempts:
            attempts[pid] = _Attempt(pid)
            order.append(pid)
        return attempts[pid]

    for t, ev in records:
        if ev.kind == "fault_injected":  # on whichever rank it fired
            marks.append(Mark(t, "fault", str(ev.get("what"))))
            continue
        if ev.rank not in (None, 0) or ev.pid in other_ranks:
            continue
        kind = ev.kind
        if kind in NODE_KINDS:  # the supervisor's records about its node: no trainer process's
            continue
        try:
            if kind.startswith("supervisor_"):
                current = _supervisor_event(t, ev, current, get, other_ranks, marks)
                continue
            a = get(ev.pid)
            a.first_line = t if a.first_line is None else a.first_line
            a.last_line = t
            _trainer_event(t, ev, a, marks)
        except _Malformed:
            trail.malformed += 1
    return [attempts[p] for p in order]


def _supervisor_event(t: float, ev: Event, current: _Attempt | None, get: Callable[[int], _Attempt],
                      other_ranks: set[int], marks: list[Mark]) -> _Attempt | None:
    """One supervisor record; returns the newest supervised start (a spawn makes a new one)."""
    kind = ev.kind
    if kind == "supervisor_spawn":
        pids = ev.get("pids")
        if not isinstance(pids, list) or not pids or any(_int(p) is None for p in pids):
            raise _Malformed
        current = get(pids[0])
        current.spawn = t
        other_ranks.update(pids[1:])
    elif kind in ("supervisor_failure", "supervisor_hang"):
        step = _int(ev.get("step"))
        step = step if step is not None and step >= 0 else None  # -1: at startup
        if kind == "supervisor_failure":
            why = ev.get("reason")
            if not isinstance(why, str):
                raise _Malformed
        else:
            why = f"hung at {f'step {step}' if step is not None else 'startup'} in {ev.get('phase')}"
        if current is not None and current.failure is None:
            current.failure = (t, step, why)
            current.outcome = why
            marks.append(Mark(t, "crash", why + (f" at step {step}" if step else "")))
    elif kind == "supervisor_restart":
        marks.append(Mark(t, "restart", "restart"))
    elif kind == "supervisor_give_up":
        marks.append(Mark(t, "gave_up", "gave up"))
    elif kind == "supervisor_forwarded":
        marks.append(Mark(t, "signal", str(ev.get("signal"))))
    return current


def _trainer_event(t: float, ev: Event, a: _Attempt, marks: list[Mark]) -> None:
    """One record of trainer process ``a`` (rank 0 or a one-process run)."""
    kind = ev.kind
    if kind == "progress":
        wait = _num(ev.get("data_wait_frac"))
        a.progress.append((t, _need(_int(ev.get("step"))), _need(_num(ev.get("samples_per_s"))),
                           min(1.0, max(0.0, _need(wait)))))
    elif kind == "checkpoint_staged":
        a.staging.append(t)
    elif kind == "checkpoint_committed":
        if ev.get("reason") == "final":  # blocking, right after the last step's progress record
            t0 = a.progress[-1][0] if a.progress else (a.first_step_at or t)
            a.blocking.append((t0, t))
    elif kind == "validation_start":
        a._val_open = t
    elif kind == "validation_end":
        if a._val_open is not None:
            a.validations.append((a._val_open, t))
        a._val_open = None
        if ev.get("stopped"):  # by a preemption signal: a checkpoint and an exit for requeue follow
            a.outcome = "checkpointed"
    elif kind == "training":
        first, batch = _need(_int(ev.get("first"))), _need(_int(ev.get("batch")))
        a.start_step, a.batch = first, batch
    elif kind == "resumed":
        a.resumed_from = _int(ev.get("step"))
    elif kind == "process_start":
        a.process_start = _num(ev.get("process_start_t"))
        if a.process_start is not None:
            a.process_start += t - ev.t  # on the clock-step-corrected time line
    elif kind == "first_step":
        a.first_step_at = t
        a.timings = _timings(ev.get("timings"))
        after = _num(ev.get("after_start_s"))
        if "process_to_first_step_s" not in a.timings and after is not None:
            a.timings["process_to_first_step_s"] = after
    elif kind == "signal":
        a._sig_open = t
        marks.append(Mark(t, "signal", str(ev.get("signal"))))
    elif kind == "checkpoint_durable":
        after = _num(ev.get("after_boundary_s"))
        a.blocking.append((a._sig_open if a._sig_open is not None else t - (after or 0.0), t))
        a.outcome = "checkpointed"
    elif kind == "rollback":
        to = _need(_int(ev.get("to")))
        a.rollbacks.append((t, to))
        marks.append(Mark(t, "rollback", f"rollback to {to}"))
    elif kind == "failed":
        error = str(ev.get("error"))
        a.outcome = f"failed: {error[:80]}"
        marks.append(Mark(t, "crash", error[:60]))
    elif kind == "completed":
        a.outcome = "completed"
    elif kind == "checkpointed":  # exiting for requeue on a durable checkpoint (a signal in the final validation)
        a.outcome = "checkpointed"


def _executions(a: _Attempt) -> list[tuple[float, int]]:
    """(time, step it resumed from) of every point where ``a`` (re)starts training: its start and
    each in-process rollback."""
    out = []
    if a.start_step is not None:
        out.append((a.start, a.start_step))
    out += a.rollbacks
    return out


def _pour(free: list[tuple[float, float]], parts: list[tuple[str, float, int]], lane: int) -> list[Segment]:
    """Fill the free intervals, in time order, with ``(kind, seconds, steps)`` parts in order; what
    does not fit is dropped, free time left over goes to the last part's kind."""
    out: list[Segment] = []
    parts = [p for p in parts if p[1] > 0 or p[2] > 0]
    if not parts:
        return out
    i, left = 0, parts[0][1]
    steps_given = [False] * len(parts)
    for a, b in free:
        t = a
        while t < b and i < len(parts):
            take = min(b - t, left) if i < len(parts) - 1 else b - t
            kind, _, steps = parts[i]
            out.append(Segment(kind, t, t + take, lane, 0 if steps_given[i] else steps))
            steps_given[i] = True
            t += take
            left -= take
            if left <= 1e-12 and i < len(parts) - 1:
                i += 1
                left = parts[i][1]
    for j, (kind, _, steps) in enumerate(parts):  # steps of a part that got no time still count
        if not steps_given[j] and steps:
            end = free[-1][1] if free else 0.0
            out.append(Segment(kind, end, end, lane, steps))
    return out


def _subtract(span: tuple[float, float], taken: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The parts of ``span`` not covered by the (sorted, disjoint) ``taken`` intervals."""
    a, b = span
    out = []
    for x, y in taken:
        if y <= a or x >= b:
            continue
        if x > a:
            out.append((a, x))
        a = max(a, y)
    if a < b:
        out.append((a, b))
    return out


def _attempt_segments(a: _Attempt, lane: int, start: float, end: float, later_resume: list[tuple[float, int]],
                      notes: list[str]) -> list[Segment]:
    """Segments of one process start over [start, end]: startup, then one progress window after the
    other (validation, blocking saves at their logged times; data wait, checkpoint stall and compute
    by duration), then the tail after the last progress line."""
    placed = sorted([(max(start, x), min(end, y), VALIDATION) for x, y in a.validations]
                    + [(max(start, x), min(end, y), CHECKPOINT) for x, y in a.blocking])
    placed = [(x, y, k) for x, y, k in placed if y > x]
    taken = [(x, y) for x, y, _ in placed]
    segs = [Segment(k, x, y, lane) for x, y, k in placed]

    def resume_below(t: float) -> int | None:
        """The lowest step training restarted from after time t (None: it never went back)."""
        later = [s for when, s in later_resume if when > t]
        return min(later) if later else None

    def train_parts(t_end: float, lo: int, hi: int) -> list[tuple[str, float, int]]:
        """(kind, share, steps) of steps lo+1..hi: productive, then those a later resume redid."""
        n = max(0, hi - lo)
        mark = resume_below(t_end)
        wasted = 0 if mark is None else max(0, hi - max(mark, lo))
        parts = [(PRODUCTIVE, (n - wasted) / n if n else 1.0, n - wasted)]
        if wasted:
            parts.append((RECOMPUTED, wasted / n, wasted))
        return parts

    first = a.first_step_at if a.first_step_at is not None else (a.progress[0][0] if a.progress else None)
    if first is None:  # never finished a step: all of it was starting up
        segs += _pour(_subtract((start, end), taken), [(STARTUP, end - start, 0)], lane)
        return segs
    first = min(max(first, start), end)
    segs += _pour(_subtract((start, first), taken), [(STARTUP, first - start, 0)], lane)

    # windows between progress lines; a rollback inside the window restarts the step count. Made
    # twice, on the fly (a window per progress line: a long run has millions, never all in memory)
    batch = a.batch or 1
    staging = sorted(a.staging)
    start_s = a.start_step if a.start_step is not None else 0

    def windows() -> Iterator[tuple[float, float, int, int, float, float, bool]]:
        prev_t, prev_s = first, start_s
        rollbacks = list(a.rollbacks)
        for t, s, sps, wait in a.progress:
            while rollbacks and rollbacks[0][0] <= t:
                prev_s = rollbacks.pop(0)[1]
            t = min(max(t, prev_t), end)
            n = max(0, s - prev_s)
            dt = n * batch / sps if sps > 0 else 0.0
            i = bisect.bisect_right(staging, prev_t)  # a background save staged in (prev_t, t]
            staged = i < len(staging) and staging[i] <= t
            yield prev_t, t, prev_s, s, dt, wait, staged
            prev_t, prev_s = t, s

    per_step = []  # seconds per step of the plain windows (no save, validation or first step in them)
    for i, (w0, w1, lo, hi, dt, wait, staged) in enumerate(windows()):
        if i and hi > lo and not staged and not any(x < w1 and y > w0 for x, y in taken):
            per_step.append((w1 - w0) * (1 - wait * min(1.0, dt / max(w1 - w0, 1e-9))) / (hi - lo))
    median = statistics.median(per_step) if per_step else None
    del per_step
    if a.staging and median is None:
        notes.append(f"pid {a.pid}: every window had a checkpoint; checkpoint stalls not estimated")
    prev_t, prev_s = first, start_s
    for w0, w1, lo, hi, dt, wait, staged in windows():
        free = _subtract((w0, w1), taken)
        total = sum(y - x for x, y in free)
        data = wait * min(dt, total)
        rest = total - data
        stall = max(0.0, rest - (hi - lo) * median) if staged and median is not None else 0.0
        parts = [(CHECKPOINT, stall, 0), (DATA_WAIT, data, 0)]
        parts += [(k, share * (rest - stall), steps) for k, share, steps in train_parts(w1, lo, hi)]
        segs += _pour(free, parts, lane)
        prev_t, prev_s = w1, hi

    # after the last progress line: exit saves/validation (placed), steps the process died in
    tail = _subtract((prev_t, end), taken)
    if tail:
        fail_step = a.failure[1] if a.failure is not None and a.failure[1] is not None else None
        hi = max(prev_s, fail_step) if fail_step is not None else prev_s
        mark = resume_below(end)
        if a.outcome in ("completed", "checkpointed") or a.outcome.startswith("failed:") and hi == prev_s:
            parts = [(IDLE, 1.0, 0)]
        elif hi > prev_s:  # died working on steps prev_s+1..hi
            parts = train_parts(end, prev_s, hi)
        else:  # died or still running with nothing logged since: lost work if a later start went back
            parts = [(RECOMPUTED if mark is not None and mark < prev_s else PRODUCTIVE if a.outcome == "running"
                      else IDLE, 1.0, 0)]
        total = sum(y - x for x, y in tail)
        segs += _pour(tail, [(k, share * total, steps) for k, share, steps in parts], lane)
    return segs


# ------------------------------------------------------------------ jobs and the queue
@dataclass
class _JobRun:
    job_id: str
    run: int
    pending_since: float | None  # submitted / requeued
    started: float | None
    ended: float | None = None
    end_event: str | None = None


def _job_runs(events: list[dict[str, Any]]) -> list[_JobRun]:
    """Job runs (a job id and its SLURM_RESTART_COUNT) from jobs.jsonl: when each was submitted or
    requeued, started, and how it ended."""
    runs: list[_JobRun] = []
    pending: dict[str, float] = {}
    count: dict[str, int] = {}
    for e in sorted((e for e in events if isinstance(e.get("time"), (int, float))), key=lambda e: e["time"]):
        jid = e.get("job_id")
        if jid in (None, "") or e.get("backend") == "local":
            continue
        jid, ev, t = str(jid), e.get("event"), float(e["time"])
        if ev == "submitted":
            pending[jid] = t
        elif ev == "started":
            rc = e.get("restart_count")
            run = int(rc) if isinstance(rc, int) else count.get(jid, -1) + 1
            count[jid] = run
            if any(r.job_id == jid and r.run == run for r in runs):
                continue  # the same run recorded twice (a submitit and a supervisor record)
            runs.append(_JobRun(jid, run, pending.pop(jid, None), t))
        elif ev in ("requeued", "stopped", "completed", "failed", "gave_up", "refused"):
            mine = [r for r in runs if r.job_id == jid and r.ended is None]
            if mine:
                mine[-1].ended, mine[-1].end_event = t, ev
            if ev == "requeued":
                pending[jid] = t
    for jid, t in pending.items():  # still (or again) in the queue
        runs.append(_JobRun(jid, count.get(jid, -1) + 1, t, None))
    return runs


def _refine_with_sacct(runs: list[_JobRun], notes: list[str], sources: list[str]) -> None:
    """Queue waits from sacct (--duplicates: one row per run of a job) where it answers: a run's
    Start, and its Submit (a requeued run's Submit is its requeue time)."""
    ids = sorted({r.job_id for r in runs})
    if not ids or shutil.which("sacct") is None:
        return
    from foldhpc.cluster import sacct

    try:
        jobs, _ = sacct.sacct_jobs(ids)
    except SlurmCommandError as e:
        notes.append(f"sacct unavailable ({e}): queue wait from jobs.jsonl alone")
        return
    used = False
    for r in runs:
        job = jobs.get(r.job_id)
        if job is None or r.run >= len(job.runs):
            continue
        row = job.runs[r.run].row
        submit, start = sacct.parse_time(row.get("Submit")), sacct.parse_time(row.get("Start"))
        # sacct has whole seconds: jobs.jsonl's time wins within a second of it
        if submit is not None and (r.pending_since is None or 1.0 <= abs(submit - r.pending_since) < 3600):
            r.pending_since = min(submit, r.pending_since) if r.pending_since is not None else submit
            used = True
        if start is not None and (r.started is None or abs(start - r.started) < 3600):
            # Slurm's Start: the allocation; up to the job's "started" record it launches (startup)
            r.started = min(start, r.started) if r.started is not None else start
            if r.pending_since is not None:
                r.started = max(r.started, r.pending_since)
            used = True
    if used:
        sources.append("sacct")


# ------------------------------------------------------------------ building
def _times(*values: Any) -> list[float]:
    return [v for v in (_num(x) for x in values) if v is not None]


def build_timeline(run_dir: Path, now: float | None = None, use_sacct: bool = True) -> Timeline:
    """The run's timeline from its records; raises FileNotFoundError, with why, if ``run_dir`` has
    nothing to build one from."""
    run_dir = Path(run_dir)
    now = time.time() if now is None else now
    notes: list[str] = []
    sources: list[str] = []
    trail = EventTrail()
    marks: list[Mark] = []
    attempts = _parse_attempts(iter_run_events(run_dir, trail), marks, trail)  # the one pass over events.jsonl
    events, bad = read_history(run_dir)
    try:
        status = read_status(run_dir) or {}
    except ValueError as err:
        status = {}
        notes.append(str(err))
    has_log = (run_dir / LOG_FILE).exists()
    if not trail.records and not events and not status:
        if trail.scan.lines:
            raise FileNotFoundError(f"{run_dir}: {EVENTS_FILE} has no readable record ({'; '.join(trail.notes())}) "
                                    f"and there is no {HISTORY_FILE} or {STATUS_FILE}")
        if has_log:
            raise FileNotFoundError(f"{run_dir}: only {LOG_FILE}, no {EVENTS_FILE}, {HISTORY_FILE} or {STATUS_FILE}: "
                                    f"a run made before foldhpc recorded events, and {LOG_FILE} is prose that "
                                    "foldhpc does not parse: nothing to build a timeline from")
        raise FileNotFoundError(f"{run_dir}: no {EVENTS_FILE}, {HISTORY_FILE} or {STATUS_FILE}: "
                                "not a foldhpc run directory?")
    # No events.jsonl although a trainer ran (its train.log, its status.json, a job run that
    # started): a run made before foldhpc recorded events. A job still waiting for its first start
    # has no events yet, and no steps: that is zero, not unknown.
    legacy = not has_events(run_dir) and (has_log or bool(status) or any(e.get("event") == "started" for e in events))
    if trail.records:
        sources.append(EVENTS_FILE)
    notes += trail.notes()
    if legacy:
        log.warning("%s: %s", run_dir, NO_EVENTS_NOTE)
        notes.append(NO_EVENTS_NOTE)
    for when, back in trail.clock_steps:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))
        log.warning("%s: the clock went back %.1f s at the record stamped %s (an NTP step?)", run_dir / EVENTS_FILE,
                    back, stamp)
        notes.append(f"{EVENTS_FILE}: the clock went back {back:.1f} s at the record stamped {stamp}; the records "
                     "from there on are shifted forward to follow on (times from jobs.jsonl and sacct after it may "
                     "not line up with them)")
    if events:
        sources.append(HISTORY_FILE)
    if bad:
        notes.append(f"{bad} unreadable line(s) in jobs.jsonl")
    if status:
        sources.append(STATUS_FILE)
    attempts = [a for a in attempts if a.spawn is not None or a.first_line is not None]
    # a supervised command that records nothing itself (it does not use foldhpc.Session): the
    # supervisor's spawn and failure records and its status.json (pid: the supervisor's) are all
    # there is; it ran from its spawn to the failure, or to the end status.json tells
    foreign = bool(attempts) and all(a.first_line is None for a in attempts)
    if status.get("finished_at") and attempts and (status.get("pid") == attempts[-1].pid or foreign):
        attempts[-1].finished_at = float(status["finished_at"])
    if foreign and attempts[-1].outcome == "unknown" and status.get("state") in ("completed", "checkpointed",
                                                                                 "failed"):
        attempts[-1].outcome = str(status["state"])
    if foreign:
        notes.append(FOREIGN_NOTE)
    running = False
    st = status.get("state")
    if st in ("running", "restarting"):
        pid = status.get("pid")
        here = status.get("host") == socket.gethostname()
        running = not here or (isinstance(pid, int) and pid_alive(pid))
        if not running:
            notes.append(f"status.json says {st}, but its process {pid} is gone: the timeline ends at the last record")
    if running and attempts and attempts[-1].outcome == "unknown":
        attempts[-1].outcome = "running"

    jruns = _job_runs(events)
    if use_sacct:
        _refine_with_sacct(jruns, notes, sources)
    if any(r.started is None for r in jruns):
        running = True  # a job is waiting in the queue: the run goes on

    # the run's span
    firsts = [a.start for a in attempts] + [r.pending_since for r in jruns if r.pending_since is not None]
    firsts += [r.started for r in jruns if r.started is not None]
    firsts += [float(e["time"]) for e in events if e.get("event") == "submitted" and isinstance(e.get("time"), (int, float))]
    lasts = [a.end for a in attempts] + [float(e["time"]) for e in events if isinstance(e.get("time"), (int, float))]
    lasts += [trail.last] if trail.last is not None else []
    if legacy:  # no process records: the span of every record there is
        firsts += _times(status.get("started_at"), *(e.get("time") for e in events))
        lasts += _times(status.get("started_at"), status.get("updated_at"), status.get("finished_at"))
        if not firsts and not running:
            raise FileNotFoundError(f"{run_dir}: no {EVENTS_FILE} (a run made before foldhpc recorded events), and "
                                    f"neither {HISTORY_FILE} nor {STATUS_FILE} holds a time: nothing to build a "
                                    "timeline from")
    if not firsts:
        firsts = [trail.first] if trail.first is not None else [float(_num(status.get("started_at")) or now)]
    start = min(firsts)
    end = now if running else max(lasts + [start])
    end = max(end, start)

    # lanes: one per process start, labelled with the job run it belongs to
    lanes: list[Lane] = []
    for i, a in enumerate(attempts):
        jr = next((r for r in reversed(jruns) if r.started is not None and r.started <= a.start + _SLACK_S), None)
        label = (f"job {jr.job_id}" + (f" run {jr.run}" if jr.run else "") + f" · pid {a.pid}") if jr else f"pid {a.pid}"
        last = max([s for _, s, _, _ in a.progress] + [a.failure[1] if a.failure and a.failure[1] else -1]
                   + [a.start_step if a.start_step is not None else -1])
        lanes.append(Lane(i, label, a.pid, jr.job_id if jr else None, jr.run if jr else None, a.start, a.end,
                          a.start_step, last if last >= 0 else None, a.outcome, a.timings))
    for r in jruns:
        if r.started is None or not any(ln.job_id == r.job_id and ln.job_run == r.run for ln in lanes):
            t = r.started if r.started is not None else (r.pending_since or end)
            lanes.append(Lane(len(lanes), f"job {r.job_id}" + (f" run {r.run}" if r.run else "")
                              + (" (pending)" if r.started is None else " (no trainer record)"),
                              None, r.job_id, r.run, t, r.ended or (end if r.started is None else t),
                              outcome="pending" if r.started is None else (r.end_event or "unknown")))
    if legacy and not jruns and status:  # a local run: its newest process start, as status.json tells it
        t0 = _num(status.get("started_at"))
        t0 = start if t0 is None else max(start, min(t0, end))
        t1 = end if running else max([t0] + _times(status.get("finished_at"), status.get("updated_at")))
        pid = _int(status.get("pid"))
        lanes.append(Lane(len(lanes), f"pid {pid} (no {EVENTS_FILE})" if pid is not None else f"no {EVENTS_FILE}",
                          None, None, None, t0, min(t1, end), outcome=str(st or "unknown")))
    lanes.sort(key=lambda ln: ln.start)
    for i, ln in enumerate(lanes):
        ln.index = i
    by_pid = {ln.pid: ln.index for ln in lanes if ln.pid is not None}

    # segments: process starts first (they win any overlap), then job launch and queue, then idle
    segments: list[Segment] = []
    resumes = [x for a in attempts for x in _executions(a)]
    prev_end = start
    spans: list[tuple[float, float]] = []
    for a in attempts:
        lane = by_pid[a.pid]
        s0, s1 = max(a.start, prev_end, start), min(max(a.end, a.start), end)
        if lanes[lane].outcome == "running":
            s1 = end
        if s1 <= s0:
            continue
        later = [(t, s) for t, s in resumes if t > a.start + 1e-6]
        segments += _attempt_segments(a, lane, s0, s1, later, notes)
        spans.append((s0, s1))
        prev_end = s1
    for m in marks:
        m.lane = next((ln.index for ln in lanes if ln.pid is not None and ln.start - _SLACK_S <= m.time <= ln.end + _SLACK_S),
                      None)
    spans.sort()
    extra: list[tuple[float, float, str, int]] = []
    for r in jruns:
        row = next((ln.index for ln in lanes if ln.job_id == r.job_id and ln.job_run == r.run), None)
        if row is None:
            continue
        if r.pending_since is not None:
            q_end = r.started if r.started is not None else end
            extra.append((r.pending_since, q_end, QUEUE, row))
            marks.append(Mark(r.pending_since, "requeue" if r.run else "submitted",
                              "requeued" if r.run else "submitted", row))
        if r.started is not None:  # the job run is up, its trainer not yet: launch, supervisor imports
            first = min((ln.start for ln in lanes if ln.job_id == r.job_id and ln.job_run == r.run
                         and ln.pid is not None), default=None)
            if first is not None:
                extra.append((r.started, first, STARTUP, row))
    for x, y, kind, lane in sorted(extra):
        for lo, hi in _subtract((max(x, start), min(y, end)), spans):
            segments.append(Segment(kind, lo, hi, lane))
            spans.append((lo, hi))
            spans.sort()
    for lo, hi in _subtract((start, end), _merge(spans)):  # between starts: restart back-off, unrecorded time
        lane = max((ln.index for ln in lanes if ln.start <= hi + 1e-6), default=0)
        segments.append(Segment(IDLE, lo, hi, lane))
    segments.sort(key=lambda s: (s.start, s.end))

    step_points = sorted((t, s) for a in attempts for t, s, _, _ in a.progress)
    writes = []
    for pid, step, t, write_s, reason in trail.saved:
        if pid in by_pid:
            writes.append(Write(by_pid[pid], step, t, write_s, reason))
    for e in events:
        if e.get("event") in ("completed", "stopped", "gave_up") and isinstance(e.get("time"), (int, float)):
            marks.append(Mark(float(e["time"]), e["event"], str(e["event"]), None))
    for m in marks:  # a job's end (jobs.jsonl) or a supervisor line between starts: the row it closes
        if m.lane is None and lanes:
            m.lane = max((ln.index for ln in lanes if ln.start <= m.time), default=0)
    marks.sort(key=lambda m: m.time)
    return Timeline(str(run_dir), start, end, running, lanes, segments, marks, writes, step_points, notes, sources,
                    steps_known=not legacy and not foreign)


def _merge(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out
