"""After a checkpoint on a signal: requeue the job, or not?

Run inside the job (``python -m foldhpc.slurm.requeue MAX_REQUEUES`` from an sbatch trap, or called by
the submitit trainer). Rules:

* not under Slurm: never requeue (the caller just exits 75);
* the job was cancelled by a user (``scancel``): slurmctld records the job as ``CANCELLED`` in
  accounting *before* its SIGTERM arrives, so ``sacct`` already says so while ``scontrol`` only
  says ``COMPLETING`` (measured on Slurm 22.05) — do not undo the user's decision. Without
  accounting, ``scontrol``'s ``COMPLETING``/``CANCELLED`` is treated the same way (when in doubt,
  do not resurrect a job);
* otherwise (``--signal`` lead before the time limit, partition preemption, SIGTERM from a node
  shutdown): requeue while the run has restarted fewer than ``slurm.max_requeues`` times.
"""

from __future__ import annotations

import logging
import sys

from foldhpc.slurm.env import slurm_info
from foldhpc.slurm.sacct import CANCELLED, SlurmCommandError, parse_scontrol, run_command, sacct_jobs

log = logging.getLogger(__name__)


def decide(job_id: str | None, restart_count: int, max_requeues: int) -> tuple[bool, str]:
    if not job_id:
        return False, "not running under Slurm"
    try:
        acct = sacct_jobs([job_id])[0].get(job_id)
    except SlurmCommandError as e:
        log.warning("sacct unavailable for the requeue decision: %s", e)
        acct = None
    if acct is not None and acct.state == CANCELLED:
        return False, f"job {job_id} was cancelled (sacct State={acct.raw_state!r}); not undoing that"
    try:
        state = parse_scontrol(run_command(["scontrol", "show", "job", "--oneliner", job_id])).get(
            job_id, {}).get("JobState", "UNKNOWN")
    except SlurmCommandError as e:
        log.warning("scontrol unavailable for the requeue decision: %s", e)
        state = "UNKNOWN"
    if acct is None and state in ("CANCELLED", "COMPLETING"):
        return False, (f"job {job_id} is {state} and accounting (sacct) cannot tell whether a user cancelled it; "
                       "not requeueing")
    if restart_count >= max_requeues:
        return False, f"job {job_id} already restarted {restart_count} times (slurm.max_requeues={max_requeues})"
    acct_state = acct.raw_state if acct is not None else "unknown"
    return True, f"job {job_id} (sacct {acct_state}, JobState={state}, restarts {restart_count}) will be requeued"


def requeue(job_id: str) -> bool:
    """``scontrol requeue``; False (logged) if Slurm refuses, e.g. it is already requeueing a preempted job."""
    try:
        run_command(["scontrol", "requeue", job_id], timeout=60)
    except SlurmCommandError as e:
        log.error("scontrol requeue %s failed: %s", job_id, e)
        return False
    return True


def maybe_requeue(max_requeues: int) -> bool:
    """Decide for the current job (from SLURM_* variables), requeue if right; True if requeued."""
    info = slurm_info()
    job_id = info["job_id"]
    ok, why = decide(job_id, info["restart_count"], max_requeues)
    log.warning("requeue decision: %s", why)
    return ok and job_id is not None and requeue(job_id)


def main(argv: list[str] | None = None) -> int:
    """``python -m foldhpc.slurm.requeue MAX_REQUEUES``: exit 0 if requeued, 3 if not."""
    from foldhpc.monitor.logs import setup_logging

    setup_logging("INFO")
    argv = sys.argv[1:] if argv is None else argv
    max_requeues = int(argv[0]) if argv else 20
    return 0 if maybe_requeue(max_requeues) else 3


if __name__ == "__main__":
    raise SystemExit(main())
