"""After a checkpoint on a signal: requeue the job, or not?

Run inside the job, after the trainer saved and exited 75: by ``sbatch/train.sbatch``
(``python -m foldhpc.slurm.requeue --config CONFIG [--set k=v ...]``, which reads
``slurm.max_requeues`` and ``slurm.signal_lead`` from the job's own config) or by the submitit
trainer (:mod:`foldhpc.slurm.job`).

What Slurm shows *inside the job* when its signal arrives (measured on the local Slurm 22.05.8
cluster, tests/slurm/cluster.sh, from a batch script that queried both at each signal):

=================================  ============================  ================================
event                              ``scontrol show job`` JobState  ``sacct`` State (current run)
=================================  ============================  ================================
``scancel ID`` (SIGTERM)           ``COMPLETING``                ``CANCELLED by 0`` (see lag below)
``scancel --signal=USR1 --batch``  ``RUNNING``                   ``RUNNING``
``--signal=B:USR1@50`` time limit  ``RUNNING``                   ``RUNNING``
partition preemption, USR1         ``RUNNING`` (Restarts=0)      ``RUNNING``
  (``preempt_send_user_signal``)
partition preemption, SIGTERM      ``COMPLETING`` (Restarts=1:   ``PREEMPTED``
  after GraceTime (20 s)           Slurm already counts the
                                   requeue it is doing itself)
=================================  ============================  ================================

``COMPLETING`` lasts until the batch script exits (or KillWait, 10 s here, then SIGKILL), so it is
still what the decision sees after the save. **sacct can lag**: with slurmdbd restarted just after
an ``scancel`` (slurmctld had to queue the record), sacct said ``RUNNING`` for 18 s while
slurmctld said ``CANCELLED``; with slurmdbd down sacct fails at once ("Connection refused").

Hence the rules, slurmctld first:

* not under Slurm: never requeue (the caller just exits 75);
* slurmctld says ``COMPLETING``/``CANCELLED`` (or anything but ``RUNNING``): the job is already
  ending — cancelled by a user, or preempted, which Slurm requeues itself with
  ``PreemptMode=REQUEUE`` — so requeueing would undo a user's ``scancel`` or double a requeue;
* sacct says ``CANCELLED``: same (a user's decision is never undone);
* slurmctld does not answer: we cannot tell a cancel from a time limit; do not resurrect a job
  (the checkpoint is durable either way; resubmitting continues from it);
* otherwise (time-limit signal, preemption signal during GraceTime, a user's ``--signal``):
  requeue while the run has restarted fewer than ``slurm.max_requeues`` times.

All of it, including retries of a failed ``scontrol requeue`` (with backoff), runs under one
deadline that fits in what is left of ``slurm.signal_lead`` after the save, with short timeouts per
Slurm command, so the job is not killed by its time limit in the middle of deciding.

**When Slurm will not requeue** (measured: a job with ``Requeue=0`` -- ``--no-requeue``, a cluster
with ``JobRequeue=0`` and no ``--requeue``, or ``scontrol update JobId=N Requeue=0`` -- gets
"Requested operation is presently disabled for job N"; a user without the right gets "Access/
permission denied"): a refusal is final, not retried, and where the caller passes a
:class:`~foldhpc.slurm.followup.FollowUp` the run continues in a follow-up job instead (same run
directory and resources, ``--dependency=afterany:<this job>``; :mod:`foldhpc.slurm.followup`).
``Requeue=0`` in slurmctld's record is known before trying: the follow-up is then the decision.
``slurm.max_requeues`` counts over the whole chain of follow-up jobs (their restarts are in
``jobs.jsonl``). The same happens when ``scontrol requeue`` keeps failing until the deadline
while slurmctld still says the job is RUNNING (it was not requeued).

**Bad nodes** (issue 23; docs/nodes.md): every node the run's records found bad (a failed health
check, a node blamed for crashes: :mod:`foldhpc.cluster.nodes`) is excluded from the run's next
job: a follow-up gets ``--exclude``, a requeued job ``scontrol update JobId=N ExcNodeList=...``
right after ``scontrol requeue`` (slurmctld refuses it for a running job and accepts it once the
job is pending again: :func:`_exclude_after_requeue`). Bounded: where that would
exclude more than the cluster's node count minus the job's, the run stops instead (kind
``bad_nodes``). **Crash loop**: ``fault.crash_loop_jobs`` jobs in a row without a new checkpoint
stop the chain (kind ``no_progress``): the job then exits 93 (``ExitCode.CRASH_LOOP``) and the
run's state is ``crash_loop``, never requeued.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from foldhpc.cluster.command import CALL_TIMEOUT_S, SlurmCommandError, run_command
from foldhpc.cluster.env import slurm_env
from foldhpc.cluster.nodes import Exclusion, exclusion
from foldhpc.cluster.sacct import acct_state, ctl_job, ctl_state
from foldhpc.records.exitcodes import ExitCode
from foldhpc.records.history import ABSENT, Requeued, Stopped, or_absent, read_history, write_event
from foldhpc.records.layout import CONFIG_FILE
from foldhpc.slurm.followup import FollowUp, SbatchFollowUp, chain_restarts, hand_over

if TYPE_CHECKING:
    from foldhpc.config import Config
    from foldhpc.records.history import Maybe

log = logging.getLogger(__name__)

#: left unused before the end of the signal lead (the time-limit kill, a slow exit)
SAFETY_MARGIN_S = 10.0
#: the decision gets at least this long even if the lead looks used up (the kill may be late)
MIN_BUDGET_S = 5.0
MAX_BUDGET_S = 120.0
#: how long a COMPLETING job's sacct State may take to say CANCELLED or PREEMPTED
ACCT_SETTLE_S = 4.0
#: first pause between ``scontrol requeue`` attempts; doubled after each failure
BACKOFF_S = 0.5

#: slurmctld job states in which requeueing is right (the job is alive and not ending)
REQUEUEABLE_CTL_STATES = frozenset({"RUNNING"})
#: a chain stops when this many jobs in a row checkpointed at the step the job before them had
#: reached (a signal that always comes before the first step): ``slurm.max_requeues`` would
#: otherwise let it spend up to that many jobs, each one a trip through the queue, on nothing
NO_PROGRESS_JOBS = 3
#: jobs.jsonl events of a job whose run went on in another job (or the same one requeued); each
#: carries the ``step`` the job had checkpointed at
CONTINUATION_EVENTS = ("followup", "requeued")
#: events after which an older chain of the run directory ended: counting stops there
_CHAIN_ENDS = ("stopped", "completed", "failed", "followup_cancelled")

#: ``scontrol requeue`` errors that no retry changes (Requeue=0 / JobRequeue=0; no permission)
_REFUSALS = ("presently disabled", "permission denied", "not permitted", "access denied", "not supported")


@dataclass(frozen=True)
class Decision:
    requeue: bool
    reason: str
    #: why, for jobs.jsonl and ``foldhpc status``: requeue | requeue_limit | ending | cancelled | unknown |
    #: not_slurm | requeue_failed | requeue_refused | followup | followup_failed | no_progress | bad_nodes |
    #: node_fail (Slurm requeues the job after a node failure)
    kind: str = ""
    followup_job_id: str | None = None  # kind "followup": the job that continues the run

    @property
    def continues(self) -> bool:
        """The run goes on by itself: requeued, or a follow-up job submitted."""
        return self.requeue or self.followup_job_id is not None

    @property
    def event(self) -> str:
        """The jobs.jsonl event for this decision."""
        return "requeued" if self.requeue else "followup" if self.followup_job_id else "stopped"


def decision_event(d: Decision, job_id: str | None, restart_count: int, step: Maybe[int] = ABSENT,
                   signal: Maybe[str | None] = ABSENT) -> Requeued | Stopped:
    """The jobs.jsonl event of a decision that ``record`` is given: requeued or stopped (a follow-up
    is recorded by :func:`foldhpc.slurm.followup.hand_over` itself, never through ``record``)."""
    kind = Requeued if d.requeue else Stopped
    return kind(job_id=job_id, restart_count=restart_count, why=d.kind, reason=d.reason, step=step, signal=signal)


def refused(error: str) -> bool:
    """Whether an ``scontrol requeue`` error is a refusal that retrying cannot change."""
    low = error.lower()
    return any(r in low for r in _REFUSALS)


def _word(state: str | None) -> str | None:
    return state.strip().split(" ", 1)[0].upper() if state and state.strip() else None


def decide_from(job_id: str | None, restart_count: int, max_requeues: int,
                ctl_state: str | None, acct_state: str | None, requeue_allowed: bool | None = None,
                chain_restarts: int = 0, slurm_requeues: bool | None = None, mode: str = "requeue") -> Decision:
    """The requeue decision from what Slurm said (pure, so every case is unit tested).

    ``ctl_state``: ``scontrol show job`` JobState, None if slurmctld did not answer;
    ``acct_state``: sacct State of the current run (e.g. ``"CANCELLED by 0"``), None if unavailable;
    ``requeue_allowed``: slurmctld's ``Requeue=`` flag of the job (False: ``scontrol requeue`` will
    be refused), None if unknown; ``restart_count`` counts the whole chain of follow-up jobs, of
    which ``chain_restarts`` came before this job; ``slurm_requeues``: whether slurmctld counts a
    restart this job has not seen yet (its ``Restarts=`` above ``SLURM_RESTART_COUNT``: Slurm is
    requeueing it itself), None if unknown; ``mode``: ``slurm.resume`` ("chain": where a requeue
    would be right, continue in a follow-up job instead, kind "chain").
    """
    if not job_id:
        return Decision(False, "not running under Slurm", "not_slurm")
    ctl, acct = _word(ctl_state), _word(acct_state)
    if ctl is None:
        return Decision(False, f"slurmctld did not say what job {job_id} is doing (scontrol failed); it may be "
                               "cancelled, so not requeueing (the checkpoint is durable: resubmit to continue)", "unknown")
    over = f", {chain_restarts} of them in earlier jobs of its chain" if chain_restarts else ""
    if ctl == "COMPLETING" and acct == "PREEMPTED" and slurm_requeues is False:
        # PreemptMode=CANCEL (measured: COMPLETING, Restarts unchanged, sacct PREEMPTED): nobody
        # would resume this run; only a follow-up job can (foldhpc.slurm.followup)
        if restart_count >= max_requeues:
            return Decision(False, f"job {job_id} was preempted and cancelled (PreemptMode=CANCEL) and already "
                                   f"restarted {restart_count} times{over} (slurm.max_requeues={max_requeues}): "
                                   "stopped at the requeue limit", "requeue_limit")
        return Decision(False, f"job {job_id} was preempted and Slurm is not requeueing it (PreemptMode=CANCEL: "
                               f"JobState=COMPLETING, sacct {acct_state}, Restarts unchanged); restarts "
                               f"{restart_count}{over} < slurm.max_requeues={max_requeues}", "preempted_cancel")
    if ctl == "COMPLETING" and acct == "NODE_FAIL" and slurm_requeues is True:
        # a node of the job failed (set DOWN, stopped answering): Slurm requeues the job itself
        # (--requeue), as after a preemption with PreemptMode=REQUEUE
        return Decision(False, f"job {job_id} lost a node (sacct {acct_state}): Slurm is requeueing it itself; "
                               "it resumes from the newest durable checkpoint", "node_fail")
    if ctl in ("COMPLETING", "CANCELLED"):
        return Decision(False, f"slurmctld says job {job_id} is {ctl}: it is ending (scancel, or a preemption that "
                               f"Slurm requeues itself); not requeueing (sacct: {acct_state or 'unavailable'})", "ending")
    if acct == "CANCELLED":
        return Decision(False, f"job {job_id} was cancelled (sacct State={acct_state!r}); not undoing that", "cancelled")
    if ctl not in REQUEUEABLE_CTL_STATES:
        return Decision(False, f"job {job_id} is {ctl} in slurmctld, not RUNNING; not requeueing", "ending")
    if restart_count >= max_requeues:
        return Decision(False, f"job {job_id} already restarted {restart_count} times{over} "
                               f"(slurm.max_requeues={max_requeues}): stopped at the requeue limit", "requeue_limit")
    if requeue_allowed is False:
        return Decision(False, f"job {job_id} may not be requeued (Requeue=0 in slurmctld: submitted with "
                               f"--no-requeue, or JobRequeue=0 on this cluster); restarts {restart_count}{over} "
                               f"< slurm.max_requeues={max_requeues}", "requeue_refused")
    if mode == "chain":
        return Decision(False, f"job {job_id} (JobState={ctl}, sacct {acct_state or 'unavailable'}, restarts "
                               f"{restart_count}{over} < slurm.max_requeues={max_requeues}) continues in a follow-up "
                               "job (slurm.resume=chain)", "chain")
    return Decision(True, f"job {job_id} (JobState={ctl}, sacct {acct_state or 'unavailable'}, restarts "
                          f"{restart_count}{over} < slurm.max_requeues={max_requeues}) will be requeued", "requeue")


def jobs_without_progress(events: list[dict[str, Any]], step: int) -> int:
    """How many jobs in a row, ending with the current one (which checkpointed at ``step``), made
    no checkpoint progress: the continuation events (:data:`CONTINUATION_EVENTS`) at the end of
    the run's history, newest first, that were at ``step`` too. The oldest of them may have
    reached ``step`` itself; each later job resumed from it and saved it again. Counting stops at
    an event where an earlier chain ended (:data:`_CHAIN_ENDS`) or a different step."""
    n = 0
    for e in reversed(events):
        kind = e.get("event")
        if kind in _CHAIN_ENDS:
            break
        if kind not in CONTINUATION_EVENTS or "step" not in e:
            continue
        if e.get("step") != step:
            break
        n += 1
    return n


def no_progress(run_dir: Path | None, step: int | None, job_id: str,
                limit: int = NO_PROGRESS_JOBS) -> Decision | None:
    """The "no_progress" stop (the chain's crash-loop breaker) where the chain has made no checkpoint
    progress in ``limit`` (``fault.crash_loop_jobs``) jobs in a row, else None (also when the step or
    history is unknown)."""
    if run_dir is None or step is None:
        return None
    try:
        events = read_history(run_dir)[0]
    except OSError:
        return None
    n = jobs_without_progress(events, step)
    if n < limit:
        return None
    return Decision(False, f"crash loop: job {job_id} checkpointed at step {step}, the step the run had when the {n} "
                           f"jobs before it ended: {n} jobs in a row made no progress (fault.crash_loop_jobs = "
                           f"{limit}; does the signal come before the first step? slurm.signal_lead longer than the "
                           "job's run time, a preemption at every start, crashes or bad nodes at every start?); "
                           f"stopping the chain, not requeued (resubmit to continue from step {step})", "no_progress")


def bad_nodes_stop(ex: Exclusion, job_id: str) -> Decision | None:
    """The "bad_nodes" stop where excluding every bad node would leave too few nodes, else None."""
    if not ex.over:
        return None
    return Decision(False, f"job {job_id}: the run found {len(ex.nodes)} bad node(s): {ex.describe()}; excluding them "
                           f"all would leave fewer than the job's {ex.job_nodes} of the partition's {ex.cluster_nodes} "
                           "nodes: stopping instead of a job that can never be placed (fix or drain the nodes, then "
                           "resubmit)", "bad_nodes")


def budget_s(signal_lead_s: float, signal_at: float | None, now: float | None = None) -> float:
    """Seconds the decision + requeue may take: what is left of the lead after the save, less a margin."""
    now = time.time() if now is None else now
    left = signal_lead_s - SAFETY_MARGIN_S - (now - signal_at if signal_at is not None else 0.0)
    if signal_at is None:
        left = min(left, signal_lead_s / 2)  # the save's duration is unknown: keep half for it
    return max(MIN_BUDGET_S, min(MAX_BUDGET_S, left))


def decide(job_id: str | None, restart_count: int, max_requeues: int, deadline: float,
           chain_restarts: int = 0, own_restarts: int | None = None, mode: str = "requeue") -> Decision:
    """Ask slurmctld, then sacct (each with a timeout that ends by ``deadline``, a monotonic time).

    ``own_restarts``: this job's ``SLURM_RESTART_COUNT`` (default: ``restart_count - chain_restarts``),
    to tell whether Slurm is requeueing the job itself. A job that slurmctld shows ``COMPLETING``
    while sacct does not say why yet (sacct lags slurmctld) is asked again for up to
    :data:`ACCT_SETTLE_S`: a cancel and a preemption look alike until then.
    """
    if not job_id:
        return decide_from(job_id, restart_count, max_requeues, None, None, mode=mode)
    info = ctl_job(job_id, _timeout(deadline))
    ctl = info.get("JobState") if info is not None else None
    acct = acct_state(job_id, _timeout(deadline)) if ctl is not None else None
    settle = min(deadline, time.monotonic() + ACCT_SETTLE_S)
    while _word(ctl) == "COMPLETING" and _word(acct) in (None, "RUNNING", "PENDING", "REQUEUED") and time.monotonic() < settle:
        time.sleep(0.5)
        acct = acct_state(job_id, _timeout(deadline))
    flag = (info or {}).get("Requeue")
    allowed = {"0": False, "1": True}.get(flag or "")
    own = restart_count - chain_restarts if own_restarts is None else own_restarts
    ctl_restarts = (info or {}).get("Restarts", "")
    slurm_requeues = int(ctl_restarts) > own if ctl_restarts.isdigit() else None
    return decide_from(job_id, restart_count, max_requeues, ctl, acct, allowed, chain_restarts, slurm_requeues, mode)


def _timeout(deadline: float) -> float:
    return max(1.0, min(CALL_TIMEOUT_S, deadline - time.monotonic()))


def requeue(job_id: str, deadline: float) -> bool:
    """``scontrol requeue``, retried with backoff until ``deadline`` while the job is still RUNNING.

    A refusal because the job is ending meanwhile (cancelled during the save) is final, not retried;
    so is a refusal that no retry can change (Requeue=0, no permission: :func:`refused`).
    """
    return _requeue(job_id, deadline)[0]


def _requeue(job_id: str, deadline: float) -> tuple[bool, str]:
    """(requeued, why not): "" | "refused" (final refusal, job still running) | "ending" (the job is
    no longer RUNNING) | "deadline" (kept failing; the job was RUNNING at the last look) | "unknown"."""
    pause, attempt = BACKOFF_S, 0
    while True:
        attempt += 1
        try:
            run_command(["scontrol", "requeue", job_id], timeout=_timeout(deadline))
            if attempt > 1:
                log.warning("scontrol requeue %s succeeded on attempt %d", job_id, attempt)
            return True, ""
        except SlurmCommandError as e:
            err = e
        state = _word(ctl_state(job_id, _timeout(deadline)))
        if state is not None and state not in REQUEUEABLE_CTL_STATES:
            log.error("scontrol requeue %s failed (%s) and the job is now %s: not retrying", job_id, err, state)
            return False, "ending"
        if refused(str(err)) and state is not None:
            log.error("scontrol requeue %s refused: %s; not retrying (Slurm will not requeue this job)", job_id, err)
            return False, "refused"
        if time.monotonic() + pause >= deadline:
            log.error("scontrol requeue %s failed %d time(s), last: %s; giving up (deadline): the checkpoint is "
                      "durable, resubmit the job to continue", job_id, attempt, err)
            return False, "deadline" if state is not None else "unknown"
        log.warning("scontrol requeue %s failed (attempt %d): %s; retrying in %.1fs", job_id, attempt, err, pause)
        time.sleep(pause)
        pause *= 2


def maybe_requeue(max_requeues: int, signal_lead_s: float = 120.0, signal_at: float | None = None,
                  record: Callable[[Decision], None] | None = None, followup: FollowUp | None = None,
                  mode: str = "requeue", step: int | None = None, run_dir: Path | None = None,
                  no_progress_jobs: int = NO_PROGRESS_JOBS) -> Decision:
    """Decide for the current job (SLURM_* variables) and requeue if right.

    Returns the decision; ``requeue`` is True only if ``scontrol requeue`` succeeded. ``signal_at``
    (``time.time()`` of the signal, if known) tightens the deadline to what is left of the lead.
    ``record(decision)`` is called *before* ``scontrol requeue``: slurmctld ends the running job as
    soon as it accepts the requeue, which can kill this process before anything after that call
    runs (seen in CI: the "requeued" event was lost). A requeue that then fails is recorded again.

    ``followup``: how to submit a follow-up job (:mod:`foldhpc.slurm.followup`) when Slurm will not
    requeue this one; its "followup" event is recorded by the hand-over itself (``record`` is not
    called for it). Without it, a refused requeue stops the run (recorded, resubmit to continue).

    ``mode`` (``slurm.resume``): "chain" continues in a follow-up job wherever a requeue would be
    right (falls back to a requeue without ``followup``). Before the hand-over the job is made
    non-requeueable (``scontrol update Requeue=0``): should a preemption's GraceTime run out before
    the job exits, Slurm then cancels it instead of requeueing it too, and the run never has two
    jobs. Whatever the mode, a job that a preemption is *cancelling* (PreemptMode=CANCEL) gets a
    follow-up where one can be submitted: nothing else would resume the run.

    ``step``: the step this job checkpointed at; with the run directory (``run_dir``, default
    ``followup.run_dir``) the run does not go on where :data:`NO_PROGRESS_JOBS` jobs in a row made
    no progress (:func:`no_progress`, kind "no_progress", recorded); ``no_progress_jobs`` is that
    limit (``fault.crash_loop_jobs``). With the run directory, the run's next job excludes every
    node its records found bad (:mod:`foldhpc.cluster.nodes`), or the run stops (kind "bad_nodes")
    where that is more than the cluster can spare.
    """
    info = slurm_env()
    job_id = info.job_id
    budget = budget_s(signal_lead_s, signal_at)
    deadline = time.monotonic() + budget
    chain = 0
    if followup is not None and job_id:
        chain = chain_restarts(followup.run_dir, job_id)
    restarts = info.restart_count + chain
    if mode == "chain" and followup is None:
        log.warning("slurm.resume=chain but no way to submit a follow-up job here: requeueing instead")
        mode = "requeue"
    d = decide(job_id, restarts, max_requeues, deadline, chain, info.restart_count, mode)
    rd = run_dir or (followup.run_dir if followup is not None else None)
    exclude: tuple[str, ...] = ()
    if d.kind in ("requeue", "chain", "requeue_refused", "preempted_cancel") and job_id:
        d = no_progress(rd, step, job_id, no_progress_jobs) or d
    if d.kind in ("requeue", "chain", "requeue_refused", "preempted_cancel") and job_id and rd is not None:
        ex = exclusion(rd, _timeout(deadline))
        d = bad_nodes_stop(ex, job_id) or d
        if d.kind != "bad_nodes" and ex.nodes:
            exclude = ex.nodes
            d = Decision(d.requeue, f"{d.reason}; excluding the bad node(s) {ex.describe()}", d.kind)
            _record_excluded(rd, exclude)
    log.warning("requeue decision (within %.0fs): %s", budget, d.reason)
    if d.kind in ("requeue_refused", "chain", "preempted_cancel") and followup is not None and job_id:
        if d.kind == "chain":
            _not_requeueable(job_id, deadline)
        # a job being cancelled by its preemption is COMPLETING: that is no reason to cancel its successor
        return _follow_up(followup, job_id, restarts, d.reason, record, last_look=d.kind != "preempted_cancel",
                          step=step, exclude=exclude)
    if record is not None:
        record(d)
    if d.requeue and job_id is not None:
        value = _exclude_value(job_id, exclude, deadline) if exclude else ""
        ok, why = _requeue(job_id, deadline)
        if ok and value:
            _exclude_after_requeue(job_id, value, deadline)
        if not ok:
            if followup is not None and why in ("refused", "deadline"):
                return _follow_up(followup, job_id, restarts,
                                  f"{d.reason}, but scontrol requeue was {why}", record, step=step, exclude=exclude)
            d = Decision(False, f"{d.reason}, but scontrol requeue failed: resubmit the job to continue",
                         "requeue_failed")
            if record is not None:
                record(d)
    return d


def _not_requeueable(job_id: str, deadline: float) -> None:
    """``scontrol update JobId=N Requeue=0``, best effort (a failure is logged: the run-directory
    lock still keeps a second job of the run from training)."""
    try:
        run_command(["scontrol", "update", f"JobId={job_id}", "Requeue=0"], timeout=_timeout(deadline))
    except SlurmCommandError as e:
        log.warning("could not make job %s non-requeueable before its hand-over (%s); should Slurm requeue it "
                    "too, the run-directory lock makes the second job exit", job_id, e)


def _exclude_value(job_id: str, nodes: tuple[str, ...], deadline: float) -> str:
    """The ``ExcNodeList`` the requeued job gets: its own list (read while slurmctld still has the
    running job's record) and ``nodes``."""
    from foldhpc.cluster.nodes import merge_exclude

    info = ctl_job(job_id, _timeout(deadline)) or {}
    return merge_exclude(info.get("ExcNodeList"), ",".join(nodes))


#: tries of ``scontrol update ExcNodeList=`` after the requeue (the job's SIGTERM may kill one try)
EXCLUDE_TRIES = 3


def _exclude_after_requeue(job_id: str, value: str, deadline: float) -> bool:
    """``scontrol update JobId=N ExcNodeList=VALUE`` right *after* ``scontrol requeue``.

    Why after: slurmctld accepts ``ExcNodeList`` for a pending job only; for the running job it
    answers "Job is no longer pending execution" (rc 1). Once ``scontrol requeue`` has returned, the
    job is pending again (``scontrol show job`` says COMPLETING while its old processes are being
    killed) and the same update is accepted; the job then waits its BeginTime hold (about
    ``cred_expire``: 5 s on the local cluster, 120 s by default) and starts on another node
    (measured on the local Slurm 22.05.8 cluster, 2026-12-03: requeue at 12:26:58.884, update rc 0
    at 12:26:58.895, restarted on n2 at 12:27:14 with ExcNodeList=n1). ``scontrol requeuehold`` +
    update + ``release`` would close the window before the job could start again, but a process
    of the job that is killed between the hold and the release leaves the run held for ever.

    This process keeps running after the requeue only because SIGTERM is ignored by now (the
    submitit job and ``python -m foldhpc.slurm.requeue`` both ignore it after training; the
    ``scontrol`` children inherit that) until SIGKILL after KillWait. A try that fails anyway (its
    ``scontrol`` killed, slurmctld busy) is repeated; if all fail the error is logged: the requeued
    job's health check on a bad node hands it over again, excluding it then. True if accepted."""
    err: SlurmCommandError | None = None
    for attempt in range(1, EXCLUDE_TRIES + 1):
        try:
            run_command(["scontrol", "update", f"JobId={job_id}", f"ExcNodeList={value}"], timeout=_timeout(deadline))
            log.warning("requeued job %s excludes %s from now on%s", job_id, value,
                        f" (attempt {attempt})" if attempt > 1 else "")
            return True
        except SlurmCommandError as e:
            err = e
            log.warning("scontrol update JobId=%s ExcNodeList=%s after the requeue failed (attempt %d of %d): %s",
                        job_id, value, attempt, EXCLUDE_TRIES, e)
            if time.monotonic() + BACKOFF_S >= deadline:
                break
            time.sleep(BACKOFF_S)
    log.error("could not exclude %s from requeued job %s: %s; should it start on one of them again, its health "
              "check hands it over again", value, job_id, err)
    return False


def _record_excluded(run_dir: Path, nodes: tuple[str, ...]) -> None:
    """status.json's ``excluded_nodes``: what ``foldhpc status`` shows (best effort)."""
    from foldhpc.records.status import StatusFile

    try:
        StatusFile(run_dir).update(excluded_nodes=list(nodes))
    except (OSError, ValueError, TypeError) as e:
        log.warning("cannot record the excluded nodes in %s: %s", run_dir, e)


def _follow_up(followup: FollowUp, job_id: str, restarts: int, why: str,
               record: Callable[[Decision], None] | None, last_look: bool = True, step: int | None = None,
               exclude: tuple[str, ...] = ()) -> Decision:
    try:
        new = hand_over(followup, job_id, restarts, why, last_look=last_look, step=step, exclude=exclude)
    except (SlurmCommandError, OSError) as e:
        log.error("could not submit a follow-up job for %s: %s", job_id, e)
        d = Decision(False, f"{why}; submitting a follow-up job failed ({e}): resubmit to continue",
                     "followup_failed")
        if record is not None:
            record(d)
        return d
    return Decision(False, f"{why}; the run continues in follow-up job {new} (afterany:{job_id})", "followup", new)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m foldhpc.slurm.requeue",
        description="Inside a Slurm job that checkpointed on a signal: requeue it unless it is being cancelled "
                    "or slurm.max_requeues is reached; where Slurm refuses the requeue and --followup-script "
                    "is given, submit a follow-up job instead. Exit 0 if requeued or followed up, 3 if not, "
                    "2 on bad usage.")
    p.add_argument("max_requeues_positional", nargs="?", type=int, help=argparse.SUPPRESS)  # old form: MAX_REQUEUES
    p.add_argument("--config", "-c", metavar="FILE", help="the job's config (slurm.max_requeues, slurm.signal_lead)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override, as given to the trainer (repeatable)")
    p.add_argument("--max-requeues", type=int, help="instead of slurm.max_requeues")
    p.add_argument("--signal-at", type=float, metavar="EPOCH", help="when the signal arrived (date +%%s)")
    p.add_argument("--followup-script", metavar="SCRIPT",
                   help="the job's batch script (in sbatch/train.sbatch: \"$0\"); if Slurm will not requeue the "
                        "job (or slurm.resume=chain), it is submitted again as 'SCRIPT RUN_DIR/config.toml' (the "
                        "config this run trains with, not CONFIG again) with the job's resources and "
                        "--dependency=afterany:$SLURM_JOB_ID (foldhpc.slurm.followup)")
    # The sbatch template passes the trainer's arguments through: these do not concern the decision.
    p.add_argument("--no-resume", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--force-resume", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--resume", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    from foldhpc.config import ConfigError, load_config, parse_duration
    from foldhpc.records.logs import setup_logging

    setup_logging("INFO")
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        log.error("requeue: config error: %s; not requeueing", e)
        return ExitCode.USAGE
    # An scancel during the decision sends SIGTERM here too: finish deciding (it sees the job
    # ending and does nothing), rather than die between submitting a follow-up and recording it.
    import signal

    for sig in {signal.SIGTERM, *cfg.checkpoint.signal_numbers()}:
        signal.signal(sig, signal.SIG_IGN)
    max_requeues = next(v for v in (args.max_requeues, args.max_requeues_positional, cfg.slurm.max_requeues)
                        if v is not None)
    step = _checkpointed_step(cfg.run_dir) if args.config or args.overrides else None
    record = (lambda d: _record(cfg, d, step)) if args.config or args.overrides else None
    followup = None
    if args.followup_script and args.config:
        followup = SbatchFollowUp(cfg.run_dir, args.followup_script, followup_script_args(cfg, args))
    d = maybe_requeue(max_requeues, parse_duration(cfg.slurm.signal_lead), args.signal_at, record, followup,
                      mode=cfg.slurm.resume, step=step, run_dir=cfg.run_dir if record else None,
                      no_progress_jobs=cfg.fault.crash_loop_jobs)
    if d.kind == "no_progress" and record is not None:
        mark_crash_loop(cfg.run_dir, d.reason)
        return ExitCode.CRASH_LOOP
    return ExitCode.REQUEUED if d.continues else ExitCode.NOT_REQUEUED


def mark_crash_loop(run_dir: Path, reason: str) -> None:
    """status.json says the run ended as a crash loop (state ``crash_loop``, the reason as its error)."""
    from foldhpc.records.status import CRASH_LOOP, StatusFile

    try:
        StatusFile(run_dir).update(state=CRASH_LOOP, error=reason)
    except (OSError, ValueError) as e:
        log.error("cannot record the crash loop in %s: %s", run_dir, e)


def followup_script_args(cfg: "Config", args: argparse.Namespace) -> list[str]:
    """The batch script's arguments for a follow-up job: the run directory's own ``config.toml``
    (the resolved config this run trains with, written by the trainer at its start) instead of
    CONFIG and ``--set`` overrides, so that a CONFIG file edited meanwhile does not silently move
    the chain; the original arguments only where the run has no config.toml. Never
    ``--force-resume``: the checkpoint the successor resumes from was written with this very
    config (``--no-resume``/``--resume PATH`` are dropped by the follow-up itself)."""
    resolved = cfg.run_dir / CONFIG_FILE
    if resolved.is_file():
        return [str(resolved.resolve())]
    log.warning("%s is missing: the follow-up job reads %s again", resolved, args.config)
    return [args.config] + [a for o in args.overrides for a in ("--set", o)]


def _checkpointed_step(run_dir: Path) -> int | None:
    """The step the trainer checkpointed at before it exited 75 (its status.json), None if unknown."""
    from foldhpc.records.status import read_status

    try:
        step = (read_status(run_dir) or {}).get("step")
    except (OSError, ValueError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _record(cfg: "Config", d: Decision, step: int | None = None) -> None:
    """The decision in ``<run.dir>/jobs.jsonl``, so ``foldhpc status`` can say why a job stopped."""
    info = slurm_env()
    if not info.job_id:
        return  # not a Slurm job: nothing to tell about it
    try:
        write_event(cfg.run_dir, decision_event(d, info.job_id, info.restart_count, or_absent(step)))
    except OSError as e:
        log.error("could not record the requeue decision in %s: %s", cfg.run_dir, e)
    from foldhpc.records.notify import REQUEUED, STOPPED, notify

    notify(cfg.run_dir, REQUEUED if d.requeue else STOPPED, command=cfg.monitor.on_state_change, step=step,
           job_id=info.job_id, reason=d.reason)


if __name__ == "__main__":
    raise SystemExit(main())
