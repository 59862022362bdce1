"""``foldhpc status [RUN_DIR | JOB_ID ...]``: where each run stands, from Slurm *and* the run itself.

Slurm (:mod:`foldhpc.cluster.sacct`) knows whether the job is pending, running, was preempted and
requeued, timed out or ran out of memory; the run directory (``status.json``, ``jobs.jsonl``,
checkpoints) knows the step, the loss, the last checkpoint and the error the trainer recorded.
Neither alone answers "is my run OK?", so this module merges them per run and says where each
fact came from (``source``). A state no source can vouch for is shown as ``unknown``, with a note
saying why, never guessed.

Exit status (for scripts; the highest that applies wins, as listed):

* 2 bad usage, or a RUN_DIR/JOB_ID was not found;
* 1 at least one is failed, timeout, out_of_memory or node_fail;
* 3 none failed, but at least one stopped and will not go on by itself: cancelled, preempted and
  not requeued, stopped at the requeue limit (``stopped``), or held (``scontrol release`` it);
  a script waiting for "done" must not take these for success;
* 0 every one is completed, running, pending or requeued.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from foldhpc.config import ConfigError, load_config
from foldhpc.records.fmt import format_age
from foldhpc.records.layout import STATUS_FILE
from foldhpc.records.status import CRASH_LOOP, read_status  # CRASH_LOOP: exit 93, a failure
from foldhpc.records.fsio import pid_alive
from foldhpc.cluster import sacct
from foldhpc.records.history import HISTORY_FILE, job_ids, read_history
from foldhpc.records.exitcodes import ExitCode
from foldhpc.records.layout import RUN_MARKERS

log = logging.getLogger(__name__)

FAILURE_STATES = frozenset({sacct.FAILED, sacct.TIMEOUT, sacct.OUT_OF_MEMORY, sacct.NODE_FAIL})
#: a run stopped after a durable checkpoint and not requeued (requeue limit, or the requeue failed)
STOPPED = "stopped"
#: over, or not going on by itself, without having failed: exit status 3
STOPPED_STATES = frozenset({sacct.CANCELLED, sacct.PREEMPTED, STOPPED, sacct.HELD})
HISTORY_SLACK_S = 60.0  # clock/recording slack when bounding sacct rows by the run's own history
DEFAULT_RUNS_ROOT = Path("runs")
DEFAULT_WATCH_S = 10.0
RUN_SOURCE = "run-dir"  # the state is the run's own record (no Slurm job)
_JOB_ARG_RE = re.compile(r"\d+(?:_\d+)?")

EPILOG = """\
Without arguments: every run directory under the runs root (the parent of run.dir of --config,
else ./runs). A JOB_ID is looked up in sacct (--duplicates: earlier runs of a requeued job count
as restarts) and, if a run under the runs root recorded it in jobs.jsonl, merged with that run.
When sacct is unavailable the state comes from scontrol/squeue and the output says so.

exit status (the first that applies):
  2  bad usage, or a RUN_DIR/JOB_ID was not found (shown as unknown)
  1  at least one run/job is failed, timeout, out_of_memory or node_fail
  3  at least one is cancelled, preempted (not requeued), stopped (requeue limit) or held
  0  every run/job is completed, running, pending or requeued
"""


@dataclass
class RunView:
    """One line of ``foldhpc status``: a run directory and/or a Slurm job, merged."""

    name: str  # run directory name, or "-" for a bare job id
    run_dir: str | None = None
    job_id: str | None = None
    state: str = sacct.UNKNOWN
    source: str = "none"  # sacct | scontrol | squeue | run-dir | none
    slurm_state: str | None = None  # raw, e.g. "CANCELLED by 0"
    restarts: int | None = None  # Slurm restarts of the current job (requeues), plus its chain's (follow-ups)
    elapsed_s: int | None = None  # current run of the job
    step: int | None = None
    max_steps: int | None = None
    loss: float | None = None
    last_checkpoint: dict[str, Any] | None = None  # step, file, saved_at, age_s
    exit_code: str | None = None
    error: str | None = None  # recorded by the run (status.json)
    reason: str | None = None  # why it is not running / why it failed, in words
    run_state: str | None = None  # status.json's own state
    run_restarts: int | None = None  # resumes recorded by the trainer (over all jobs of the run)
    run_updated_at: float | None = None  # when status.json was last written
    run_host: str | None = None  # who wrote it
    run_pid: int | None = None
    job_ids: list[str] = field(default_factory=list)  # every job of the run, oldest first
    slurm: dict[str, Any] | None = None  # the full Slurm view (runs of the job, steps)
    notes: list[str] = field(default_factory=list)
    found: bool = True  # False: the argument named nothing that exists
    # from jobs.jsonl, for the current job: when it was submitted / first started, how it stopped
    submitted_at: float | None = None
    first_started_at: float | None = None
    stop_event: dict[str, Any] | None = None
    # a multi-rank run (status.json + ranks/rank-N.json): how many ranks, on which nodes, and
    # each rank's node/host/pid/device and, where its record belongs to the same start, its state
    world_size: int | None = None
    nodes: list[str] | None = None
    ranks: list[dict[str, Any]] | None = None
    failed_ranks: list[dict[str, Any]] | None = None  # the rank(s) the run blamed: rank, node, host, pid, why
    # a chain of follow-up jobs (Slurm would not requeue: foldhpc.slurm.followup): its job ids up to
    # the current one, oldest first, and the restarts used before the current job
    chain: list[str] | None = None
    chain_restarts: int | None = None
    # a task of a sweep (foldhpc.slurm.sweep): the sweep directory, and the run's best validation
    # (lowest val/distogram_loss: value, step, precision_long)
    sweep: str | None = None
    best_val: dict[str, Any] | None = None
    # restarts inside the current job after a crash or hang (foldhpc.resilience.supervisor), and
    # the failure that caused the latest one: step, phase, reason
    in_job_restarts: int | None = None
    last_failure: dict[str, Any] | None = None
    # silent data corruption (foldhpc.train.sdc): the latest attribution (step, trigger, verdict,
    # reproducible, ranks, nodes, samples), how many, the mismatches and the suspect nodes; and the
    # ranks the latest straggler window named (rank, node, ratio, compute_s, wait_s, step)
    sdc: dict[str, Any] | None = None
    stragglers: list[dict[str, Any]] | None = None
    # bad nodes (foldhpc.resilience.health, foldhpc.cluster.nodes): every node found bad in this run
    # (node, check, detail, t, job_id) and those the newest hand-over excluded (--exclude)
    bad_nodes: list[dict[str, Any]] | None = None
    excluded_nodes: list[str] | None = None

    @property
    def ranks_text(self) -> str:
        """``"2 on n1,n2"`` for a multi-rank run, ``"1"`` for one process, ``"-"`` if unknown."""
        if self.world_size is None:
            return "-"
        if self.world_size <= 1:
            return "1"
        return f"{self.world_size} on {','.join(self.nodes)}" if self.nodes else str(self.world_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StatusReport:
    runs: list[RunView]
    notes: list[str] = field(default_factory=list)  # global: where states came from, parse problems
    errors: list[str] = field(default_factory=list)  # arguments that name nothing
    source: str = "none"
    generated_at: float = field(default_factory=time.time)
    sweeps: list[dict[str, Any]] = field(default_factory=list)  # one summary per sweep shown (foldhpc.slurm.sweep)

    @property
    def exit_status(self) -> int:
        if self.errors or any(not r.found for r in self.runs):
            return ExitCode.USAGE
        if any(r.state in FAILURE_STATES or r.state == CRASH_LOOP for r in self.runs):
            return ExitCode.FAILED
        if any(r.state in STOPPED_STATES for r in self.runs):
            return ExitCode.STOPPED
        return ExitCode.OK

    def to_dict(self) -> dict[str, Any]:
        return {"generated_at": self.generated_at, "source": self.source, "exit_status": self.exit_status,
                "runs": [r.to_dict() for r in self.runs], "notes": self.notes, "errors": self.errors,
                "sweeps": self.sweeps}


# ------------------------------------------------------------------ targets
def runs_root_of(config: str | None, overrides: list[str]) -> Path:
    """Where runs live: the parent of ``run.dir`` of the given config, else ``./runs``."""
    if config is None and not overrides:
        return DEFAULT_RUNS_ROOT
    return load_config(config, overrides).run_dir.parent


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / m).exists() for m in RUN_MARKERS)


def find_runs(root: Path) -> list[Path]:
    """Run directories directly under ``root``, by name; a sweep's tasks in task order."""
    from foldhpc.slurm.sweep import task_dirs

    try:
        found: list[Path] = []
        for p in sorted(root.iterdir()):
            tasks = task_dirs(p) if p.is_dir() else None
            found += tasks if tasks is not None else [p] if is_run_dir(p) else []
        return found
    except OSError:
        return []


def resolve(args: list[str], root: Path) -> tuple[list[tuple[Path | None, str | None]], list[str]]:
    """(run dir, job id) pairs for the arguments, and an error message per argument that names nothing.

    A job id recorded by a run under ``root`` (``jobs.jsonl``) is shown with that run.
    """
    targets: list[tuple[Path | None, str | None]] = []
    errors: list[str] = []
    index: dict[str, Path] | None = None
    from foldhpc.slurm.sweep import task_dirs

    for arg in args:
        path = Path(arg)
        if path.is_dir():
            tasks = task_dirs(path)  # a sweep: one row per task
            targets += [(t, None) for t in tasks] if tasks is not None else [(path, None)]
            continue
        items = [a for a in arg.split(",") if a]
        if items and all(_JOB_ARG_RE.fullmatch(a) for a in items):
            if index is None:
                index = {jid: run for run in find_runs(root) for jid in _job_ids(run)}
            targets += [(index.get(jid), jid) for jid in items]
        elif path.exists():
            errors.append(f"{arg}: not a directory (give a run directory or a job id)")
        elif re.fullmatch(r"\d+(?:_\d+)?\.\w+", arg):
            errors.append(f"{arg}: is a job step; give the job id ({arg.split('.')[0]})")
        else:
            errors.append(f"{arg}: no such run directory, and not a job id")
    return targets, errors


# ------------------------------------------------------------------ gathering
def read_run(run_dir: Path, job_id: str | None = None) -> RunView:
    """What the run directory says (status.json, jobs.jsonl, checkpoints); never raises."""
    view = RunView(name=run_dir.name or str(run_dir), run_dir=str(run_dir), job_id=job_id)
    if not is_run_dir(run_dir):
        view.notes.append(f"{run_dir} has no {STATUS_FILE}, {HISTORY_FILE}, config.toml or checkpoints/: "
                          "not a foldhpc run directory?")
    status: dict[str, Any] | None = None
    try:
        status = read_status(run_dir)
        if status is None and is_run_dir(run_dir):
            view.notes.append(f"no {STATUS_FILE} (training has not started here yet?)")
    except (ValueError, OSError) as e:
        view.notes.append(f"status file unreadable: {e}")
    try:
        events, bad = read_history(run_dir)
        view.job_ids = job_ids(run_dir)
        if bad:
            view.notes.append(f"{bad} unreadable line(s) in {HISTORY_FILE}")
    except (OSError, ValueError) as e:  # ValueError: not UTF-8
        events, view.job_ids = [], []
        view.notes.append(f"{HISTORY_FILE} unreadable: {e}")
    if status:
        view.run_state = _str_or_none(status.get("state"))
        view.in_job_restarts = _int_or_none(status.get("in_job_restarts"))
        lf = status.get("last_failure")
        view.last_failure = lf if isinstance(lf, dict) else None
        bn, xn = status.get("bad_nodes"), status.get("excluded_nodes")
        view.bad_nodes = [b for b in bn if isinstance(b, dict)] if isinstance(bn, list) else None
        view.excluded_nodes = [str(n) for n in xn] if isinstance(xn, list) else None
        view.step, view.max_steps = _int_or_none(status.get("step")), _int_or_none(status.get("max_steps"))
        view.loss = status.get("loss") if isinstance(status.get("loss"), (int, float)) else None
        view.error = _str_or_none(status.get("error"))
        view.run_restarts = _int_or_none(status.get("restarts"))
        upd = status.get("updated_at")
        view.run_updated_at = float(upd) if isinstance(upd, (int, float)) else None
        view.run_host, view.run_pid = _str_or_none(status.get("host")), _int_or_none(status.get("pid"))
        sid = _str_or_none(status.get("slurm_job_id"))
        if sid and sid not in view.job_ids:
            view.job_ids.insert(0, sid)  # jobs.jsonl, where it has ids, knows better which one is newest
        _read_ranks(view, run_dir, status)
        sdc = status.get("sdc")
        if isinstance(sdc, dict):
            view.sdc = {k: sdc.get(k) for k in ("last", "mismatches", "suspect_nodes", "checks", "check_every")}
            view.sdc["attributions"] = len(sdc.get("attributions") or [])
        strag = status.get("stragglers")
        view.stragglers = [s for s in strag if isinstance(s, dict)] if isinstance(strag, list) else None
    if view.job_id is None and view.job_ids:
        # the newest submission is the one that matters now -- unless it refused to start because
        # another trainer held the run directory (foldhpc.resilience.runlock): the holder's job is
        refused = {str(e.get("job_id")): e for e in events if e.get("event") == "refused"}
        live = [j for j in view.job_ids if j not in refused]
        view.job_id = (live or view.job_ids)[-1]
        successor = {str(e.get("job_id")): str(e["followup_job_id"]) for e in events
                     if e.get("event") == "followup" and e.get("followup_job_id")}
        seen = {view.job_id}
        while view.job_id in successor and successor[view.job_id] not in seen:
            view.job_id = successor[view.job_id]  # a chain's newest job, whatever the order of the events
            seen.add(view.job_id)
        for jid in [j for j in view.job_ids if j in refused][-3:]:
            view.notes.append(f"job {jid} refused to start: {refused[jid].get('reason') or 'run directory in use'}")
    if view.job_id is not None:
        from foldhpc.slurm.followup import chain_of

        chain = chain_of(events, view.job_id)
        if len(chain) > 1:
            view.chain = chain
            link: dict[str, Any] = next((e for e in reversed(events) if e.get("event") == "followup"
                                         and str(e.get("followup_job_id")) == view.job_id), {})
            view.chain_restarts = _int_or_none(link.get("chain_restarts")) or len(chain) - 1
    if view.job_id is not None:
        mine = [e for e in events if str(e.get("job_id")) == view.job_id and isinstance(e.get("time"), (int, float))]
        view.submitted_at = min((e["time"] for e in mine if e.get("event") == "submitted"), default=None)
        view.first_started_at = min((e["time"] for e in mine if e.get("event") == "started"
                                     and not e.get("restart_count")), default=None)
        ends = [e for e in mine if e.get("event") in ("stopped", "requeued", "completed", "failed", "started")]
        view.stop_event = ends[-1] if ends and ends[-1].get("event") == "stopped" else None
    if view.job_id is None and events:
        view.notes.append(f"{HISTORY_FILE} records no job id")
    view.last_checkpoint = _last_checkpoint(run_dir, status, view.notes)
    return view


def _read_ranks(view: RunView, run_dir: Path, status: dict[str, Any]) -> None:
    """world_size, nodes, ranks and failed_ranks from status.json (written by rank 0, or by the
    rank that recorded the failure), each rank's state from its ``ranks/rank-N.json`` record when
    that record is of the same process (same pid and host as in status.json's layout)."""
    from foldhpc.distributed.ranks import read_records  # no torch import

    view.world_size = _int_or_none(status.get("world_size"))
    layout = status.get("ranks")
    if view.world_size is None or view.world_size <= 1:
        return
    nodes = status.get("nodes")
    if isinstance(nodes, list):
        view.nodes = [str(n) for n in nodes]
    try:
        records = {int(r["rank"]): r for r in read_records(run_dir, view.world_size) if isinstance(r.get("rank"), int)}
    except (OSError, ValueError, KeyError, TypeError):
        records = {}
    if isinstance(layout, list):
        view.ranks = []
        for item in layout:
            if not isinstance(item, dict):
                continue
            entry = {k: item.get(k) for k in ("rank", "node", "host", "pid", "device")}
            rec = records.get(item.get("rank"))  # type: ignore[arg-type]
            if rec is not None and rec.get("pid") == item.get("pid") and rec.get("host") == item.get("host"):
                entry["state"] = rec.get("state")
                if rec.get("error"):
                    entry["error"] = rec.get("error")
            view.ranks.append(entry)
        view.ranks.sort(key=lambda r: r["rank"] if isinstance(r.get("rank"), int) else -1)
    if view.nodes is None and view.ranks:
        view.nodes = sorted({str(r["node"]) for r in view.ranks if r.get("node")})
    failed = status.get("failed_ranks")
    if isinstance(failed, list) and failed:
        view.failed_ranks = [{k: f.get(k) for k in ("rank", "node", "host", "pid", "why")}
                             for f in failed if isinstance(f, dict)]


def describe_failed_ranks(failed: list[dict[str, Any]]) -> str:
    """``rank 1 on n2 (host h, pid 123): why``, ``; ``-joined."""
    out = []
    for f in failed:
        where = ", ".join(f"{k} {f[k]}" for k in ("host", "pid") if f.get(k) not in (None, ""))
        out.append(f"rank {f.get('rank', '?')} on {f.get('node') or '?'}" + (f" ({where})" if where else "")
                   + (f": {f['why']}" if f.get("why") else ""))
    return "; ".join(out)


def _last_checkpoint(run_dir: Path, status: dict[str, Any] | None, notes: list[str]) -> dict[str, Any] | None:
    """Newest committed checkpoint from the manifest; status.json's record if the manifest is unreadable."""
    from foldhpc.checkpoint.errors import CheckpointError
    from foldhpc.checkpoint.listing import list_checkpoints  # manifest and headers: no torch import

    last: dict[str, Any] | None = None
    try:
        rows = list_checkpoints(run_dir)
        if rows:
            last = {k: rows[-1][k] for k in ("step", "file", "saved_at")}
    except (CheckpointError, OSError, ValueError) as e:
        notes.append(f"checkpoints unreadable: {e}")
    if last is None and status and isinstance(status.get("last_checkpoint"), dict):
        rec = status["last_checkpoint"]
        last = {k: rec.get(k) for k in ("step", "file", "saved_at")}
    if last is not None and isinstance(last.get("saved_at"), (int, float)):
        last["age_s"] = max(0.0, time.time() - last["saved_at"])
    return last


def merge(view: RunView, job: sacct.SlurmJob | None) -> RunView:
    """Put the Slurm view of the run's current job next to the run's own record."""
    if job is None:  # never submitted to Slurm (local run) or nothing recorded
        _merge_local(view)
        return view
    job = sacct.bound_runs(job, view.submitted_at, view.first_started_at, HISTORY_SLACK_S)
    view.slurm = job.to_dict()
    view.source = job.source
    view.notes += job.notes
    if not job.known:
        view.state = sacct.UNKNOWN
        view.found = view.run_dir is not None
        view.reason = "no Slurm record" + (f"; the run's status.json says {view.run_state}" if view.run_state else "")
        return view
    view.slurm_state, view.restarts, view.elapsed_s = job.raw_state, job.restarts, job.elapsed_s
    if view.chain_restarts and view.restarts is not None:
        view.restarts += view.chain_restarts  # a chain of follow-up jobs is one run: its restarts add up
    view.exit_code = job.exit_code or None
    view.state = job.state
    if job.state == sacct.PENDING and job.restarts:
        view.state = sacct.REQUEUED  # pending again after a preemption/requeue, not a fresh submission
    if job.state == sacct.FAILED and _exit_status(job.exit_code) == ExitCode.CHECKPOINTED and (
            view.stop_event is not None or view.run_state == "checkpointed"):
        view.state = STOPPED  # saved on a signal and deliberately not requeued: not a crash
    if job.state in (sacct.FAILED, sacct.COMPLETED) and view.run_state == CRASH_LOOP and (
            _exit_status(job.exit_code) == ExitCode.CRASH_LOOP or view.stop_event is not None):
        view.state = CRASH_LOOP  # the crash-loop breaker (exit 93): never requeued, a person must look
    view.reason = _reason(view, job)
    _cross_check_run(view, job)
    return view


def _merge_local(view: RunView) -> None:
    if view.run_state is None:
        view.notes.append("no Slurm job recorded and no run state: state unknown")
        return
    view.source, view.state = RUN_SOURCE, view.run_state
    view.notes.append("no Slurm job recorded for this run: state is the run's own status.json")
    pid = view.run_pid
    if view.run_state == sacct.RUNNING and view.run_host == socket.gethostname() and pid and not pid_alive(pid):
        view.state = sacct.UNKNOWN
        view.notes.append(f"status.json says running, but its process {pid} on this host is gone "
                          "(killed before it could record it?)")
    if view.run_state == sacct.RUNNING:
        host = socket.gethostname()
        for r in view.ranks or []:
            rpid = r.get("pid")
            if (r.get("rank") != 0 and r.get("host") == host and isinstance(rpid, int) and rpid > 0
                    and r.get("state") in (None, "running") and not pid_alive(rpid)):
                view.notes.append(f"rank {r.get('rank')} on {r.get('node')} (pid {rpid}) is gone while the run "
                                  "says running (killed?); the other ranks stop when their next collective fails")
    if view.run_state == sacct.FAILED:
        view.reason = _run_error(view)


def _reason(view: RunView, job: sacct.SlurmJob) -> str | None:
    """Why the job is not (simply) running, in words: exit code, signal, Slurm's reason, run error."""
    parts: list[str] = []
    state = view.state
    if state == CRASH_LOOP:
        parts.append(view.error or "crash loop: restarts or jobs without a new checkpoint")
    elif state == STOPPED:
        ev = view.stop_event or {}
        if ev.get("why") == "requeue_limit":
            parts.append(f"stopped at the requeue limit ({view.restarts if view.restarts is not None else '?'} "
                         "restart(s), slurm.max_requeues reached)")
        else:
            parts.append("checkpointed on a signal and not requeued"
                         + (f": {ev['reason']}" if ev.get("reason") else ""))
        ck = view.last_checkpoint
        parts.append(f"resubmit to continue from step {ck['step']}" if ck and ck.get("step") is not None
                     else "resubmit to continue")
    elif state == sacct.HELD:
        held = job.reason or job.raw_state
        parts.append(f"held ({held}): it will not run until released (scontrol release {job.job_id})")
    elif state == sacct.REQUEUED:
        # the newest run that is over; sacct may not have recorded the new pending row yet
        prev = next((r.state for r in reversed(job.runs) if r.state in sacct.FINAL_STATES | {sacct.REQUEUED}), None)
        why = {sacct.PREEMPTED: "preemption", sacct.TIMEOUT: "time limit", sacct.NODE_FAIL: "node failure",
               sacct.REQUEUED: "requeue"}.get(prev or "", "requeue")
        parts.append(f"pending after {why}" + (f" ({job.reason})" if job.reason else ""))
        ck = view.last_checkpoint
        if ck and ck.get("step") is not None:
            parts.append(f"resumes from step {ck['step']}")
    elif state == sacct.PENDING and view.chain:
        parts.append(f"follow-up of job {view.chain[-2]} (Slurm would not requeue it), starts when that job has "
                     "ended" + (f" ({job.reason})" if job.reason else ""))
        ck = view.last_checkpoint
        if ck and ck.get("step") is not None:
            parts.append(f"resumes from step {ck['step']}")
    elif state == sacct.PENDING and job.reason:
        parts.append(f"pending ({job.reason})")
    elif state == sacct.CANCELLED:
        by = job.raw_state.split(" by ", 1)
        parts.append(f"cancelled by uid {by[1]}" if len(by) == 2 else "cancelled")
    elif state == sacct.PREEMPTED:
        parts.append("preempted, not requeued")
    if job.tasks and state not in (sacct.HELD,):
        parts.append(job.raw_state)
    elif state in FAILURE_STATES:
        label = {sacct.TIMEOUT: "time limit reached", sacct.OUT_OF_MEMORY: "out of memory",
                 sacct.NODE_FAIL: "node failure"}.get(state)
        if label:
            parts.append(label)
        if state != sacct.TIMEOUT:  # a timed-out job's exit code is just the SIGTERM that ended it
            parts.append(describe_exit(job.exit_code))
    if state in FAILURE_STATES | {sacct.CANCELLED} and (view.error or view.failed_ranks):
        parts.append(f"run error: {_run_error(view)}")
    return "; ".join(p for p in parts if p) or None


def _run_error(view: RunView) -> str | None:
    """The run's error; with the failed rank(s) named, where the error does not name them itself
    (the trainer's own error of a multi-rank run starts with "rank N on NODE")."""
    if not view.failed_ranks:
        return view.error
    named = describe_failed_ranks(view.failed_ranks)
    if view.error and all(f"rank {f.get('rank')} on " in view.error for f in view.failed_ranks):
        return view.error
    return f"{view.error}; failed: {named}" if view.error else f"failed: {named}"


def _exit_status(code: str) -> int | None:
    parsed = sacct.parse_exit_code(code.partition(" ")[0])
    return parsed[0] if parsed and not parsed[1] else None


def describe_exit(code: str) -> str:
    """``"3:0"`` -> ``"exit 3"``, ``"0:9"`` -> ``"signal 9 (SIGKILL)"``; keeps a ``(step ...)`` suffix."""
    head, _, where = code.partition(" ")
    parsed = sacct.parse_exit_code(head)
    if parsed is None:
        return f"exit code {code}" if code else ""
    rc, sig = parsed
    if sig:
        try:
            text = f"signal {sig} ({signal.Signals(sig).name})"
        except ValueError:
            text = f"signal {sig}"
    else:
        text = f"exit {rc}"
    return f"{text} {where}".strip()


def _cross_check_run(view: RunView, job: sacct.SlurmJob) -> None:
    """Say so when the job and the run's own record disagree (the job's state is still shown)."""
    rs = view.run_state
    if rs is None:
        return
    if job.state == sacct.COMPLETED and rs != sacct.COMPLETED:
        view.notes.append(f"the Slurm job completed but the run's status.json says {rs!r}")
    elif job.state in (sacct.RUNNING, sacct.PENDING) and rs == sacct.FAILED:
        view.notes.append("status.json says failed (from an earlier attempt?) while the job is "
                          f"{job.state}")


def gather(args: list[str], runs_root: Path) -> StatusReport:
    """The whole report for the arguments (or every run under ``runs_root``); never raises on bad input."""
    errors: list[str] = []
    notes: list[str] = []
    if args:
        targets, errors = resolve(args, runs_root)
    else:
        if not runs_root.is_dir():
            return StatusReport([], errors=[f"no runs root {runs_root}/ (give RUN_DIR or JOB_ID, or --config)"])
        targets = [(run, None) for run in find_runs(runs_root)]
        if not targets:
            notes.append(f"no run directories under {runs_root}/")
    views: list[RunView] = []
    seen: set[tuple[str | None, str | None]] = set()
    for run_dir, jid in targets:
        view = read_run(run_dir, jid) if run_dir is not None else RunView(name="-", job_id=jid)
        key = (str(run_dir.resolve()) if run_dir is not None else None, view.job_id)
        if key not in seen:  # "foldhpc status RUN_DIR JOB_ID_OF_IT" shows it once
            seen.add(key)
            views.append(view)
    query = sacct.query_jobs([v.job_id for v in views if v.job_id])
    notes += query.notes
    for v in views:
        merge(v, query.jobs.get(v.job_id) if v.job_id else None)
    from foldhpc.slurm import sweep

    for v in views:
        if v.run_dir is not None and (sweep_dir := sweep.sweep_of(Path(v.run_dir))) is not None:
            v.sweep, v.best_val = str(sweep_dir), sweep.best_validation(Path(v.run_dir))
    return StatusReport(views, notes=notes, errors=errors, source=query.source, sweeps=sweep.summaries(views))


# ------------------------------------------------------------------ rendering
def format_duration(seconds: float | None) -> str:
    """Slurm-style ``H:MM:SS`` / ``D-HH:MM:SS``; ``-`` if unknown."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{d}-{h:02d}:{m:02d}:{s:02d}" if d else f"{h}:{m:02d}:{s:02d}"


def format_table(report: StatusReport) -> str:
    """One row per run; a RANKS column (``2 on n1,n2``) only when a run has several ranks, and
    below the table one ``failed rank`` line per rank a failed run blamed (node, host, pid, why)."""
    multi = any((r.world_size or 1) > 1 for r in report.runs)
    header: tuple[str, ...] = ("RUN", "JOB", "STATE", "RESTARTS", "ELAPSED", "STEP", "LOSS", "CHECKPOINT", "REASON")
    if multi:
        header = (*header[:-1], "RANKS", header[-1])
    from foldhpc.slurm.sweep import format_best, summary_line

    sweeps = any(r.sweep for r in report.runs)  # sweep tasks: their best validation loss (and step)
    if sweeps:
        header = (*header[:-1], "BEST VAL", header[-1])
    rows: list[tuple[str, ...]] = []
    for r in report.runs:
        step = "-" if r.step is None else f"{r.step}/{r.max_steps}" if r.max_steps else str(r.step)
        ck = r.last_checkpoint
        ck_text = "-"
        if ck and ck.get("step") is not None:
            ck_text = f"{ck['step']}" + (f" ({format_age(ck['age_s'])} ago)" if ck.get("age_s") is not None else "")
        row: tuple[str, ...] = (r.name, r.job_id or "-", r.state, "?" if r.restarts is None else str(r.restarts),
                                format_duration(r.elapsed_s), step, "-" if r.loss is None else f"{r.loss:.4f}",
                                ck_text, r.reason or "")
        if multi:
            row = (*row[:-1], r.ranks_text, row[-1])
        if sweeps:
            row = (*row[:-1], format_best(r.best_val), row[-1])
        rows.append(row)
    lines: list[str] = []
    if rows:
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
        for row in (header, *rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    for r in report.runs:
        label = r.name if r.name != "-" else f"job {r.job_id}"
        if r.state in FAILURE_STATES | {sacct.CANCELLED, sacct.UNKNOWN} or r.run_state == sacct.FAILED:
            lines += [f"failed rank: {label}: {describe_failed_ranks([f])}" for f in r.failed_ranks or []]
        if r.in_job_restarts:
            lf = r.last_failure or {}
            lines.append(f"restarted in job: {label}: {r.in_job_restarts} time(s); latest after: "
                         f"{lf.get('reason', '?')} at step {lf.get('step', '?')}")
        if r.chain:
            lines.append(f"chain: {label}: jobs {' -> '.join(r.chain)} (follow-up jobs: Slurm would not requeue)")
        excluded = set(r.excluded_nodes or [])
        for b in r.bad_nodes or []:
            mark = "excluded" if b.get("node") in excluded else "bad node"
            lines.append(f"{mark}: {label}: {b.get('node')} ({b.get('check')}: {b.get('detail')}; job "
                         f"{b.get('job_id') or '-'})")
        lines += [f"note: {label}: {n}" for n in r.notes]
    lines += [summary_line(s) for s in report.sweeps]
    lines += [f"note: {n}" for n in report.notes]
    if report.runs and report.source not in ("sacct", "none"):
        lines.append(f"note: sacct was not available: Slurm states above come from {report.source}")
    return "\n".join(lines) if lines else "nothing to show"


def format_json(report: StatusReport, indent: int | None = 1) -> str:
    return json.dumps(report.to_dict(), indent=indent, sort_keys=True)


# ------------------------------------------------------------------ command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``foldhpc status`` (wired into foldhpc.cli, and used by :func:`main`)."""
    p.description = "Per run: Slurm job state (sacct), restarts, elapsed, step, loss, last checkpoint, reason."
    p.epilog = EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("targets", nargs="*", metavar="RUN_DIR|JOB_ID",
                   help="run directories and/or Slurm job ids (default: every run under the runs root)")
    p.add_argument("--config", "-c", metavar="FILE", help="config whose run.dir's parent is the runs root")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override, e.g. --set run.dir=/scratch/runs/x (repeatable)")
    p.add_argument("--json", action="store_true", help="machine-readable output (one document per refresh)")
    p.add_argument("--watch", nargs="?", type=float, const=DEFAULT_WATCH_S, default=None, metavar="SECONDS",
                   help=f"refresh every SECONDS (default {DEFAULT_WATCH_S:g}) until Ctrl-C; "
                        "write --watch=SECONDS before job ids")


def run(args: argparse.Namespace) -> int:
    """``foldhpc status``: print the report (again and again with --watch); return the exit status."""
    if args.watch is not None and args.watch <= 0:
        print("foldhpc status: --watch SECONDS must be > 0", file=sys.stderr)
        return ExitCode.USAGE
    try:
        root = runs_root_of(args.config, args.overrides)
    except ConfigError as e:
        print(f"foldhpc status: config error: {e}", file=sys.stderr)
        return ExitCode.USAGE
    code: int = ExitCode.USAGE
    try:
        while True:
            report = gather(args.targets, root)
            code = report.exit_status
            for err in report.errors:
                print(f"foldhpc status: {err}", file=sys.stderr)
            if args.json:
                print(format_json(report, indent=None if args.watch else 1), flush=True)
            else:
                if args.watch and sys.stdout.isatty():
                    print("\x1b[H\x1b[2J", end="")
                if args.watch:
                    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(report.generated_at))
                    print(f"foldhpc status  {stamp}  (every {args.watch:g}s, Ctrl-C to stop)")
                print(format_table(report), flush=True)
            if not args.watch:
                return code
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return code
    except BrokenPipeError:  # `foldhpc status --json | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return code
    except Exception as e:  # noqa: BLE001 - a status command must report, not crash
        log.debug("foldhpc status failed", exc_info=True)
        print(f"foldhpc status: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return ExitCode.FAILED


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -c 'from foldhpc.monitor.report import main; main()'``)."""
    parser = argparse.ArgumentParser(prog="foldhpc status")
    add_arguments(parser)
    return run(parser.parse_args(argv))


def _job_ids(run_dir: Path) -> list[str]:
    try:
        return job_ids(run_dir)
    except (OSError, ValueError):
        return []


def _int_or_none(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _str_or_none(v: Any) -> str | None:
    return None if v is None else str(v)


if __name__ == "__main__":
    sys.exit(main())
