"""After a checkpoint on a signal: requeue the job, or not?

Run inside the job (``python -m foldhpc.slurm.requeue SIGNAL`` from an sbatch trap, or called by
the submitit trainer). Rules:

* not under Slurm: never requeue (the caller just exits 75);
* the job was cancelled by a user (``scancel``): slurmctld marks it CANCELLED *before* it sends
  SIGTERM, so ``scontrol show job`` already says so — do not undo the user's decision;
* otherwise (``--signal`` lead before the time limit, partition preemption, SIGTERM from a node
  shutdown): requeue while the run has restarted fewer than ``slurm.max_requeues`` times.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

log = logging.getLogger(__name__)


def scontrol_job(job_id: str) -> dict[str, str]:
    """``scontrol show job -o ID`` as a dict (empty if scontrol fails)."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("scontrol show job %s failed: %s", job_id, e)
        return {}
    return dict(re.findall(r"(\w+)=(\S*)", out))


def decide(job_id: str | None, restart_count: int, max_requeues: int) -> tuple[bool, str]:
    if not job_id:
        return False, "not running under Slurm"
    info = scontrol_job(job_id)
    state = info.get("JobState", "UNKNOWN")
    if state.startswith("CANCELLED"):
        return False, f"job {job_id} was cancelled (JobState={state}); not undoing that"
    if restart_count >= max_requeues:
        return False, f"job {job_id} already restarted {restart_count} times (slurm.max_requeues={max_requeues})"
    return True, f"job {job_id} (JobState={state}, restarts {restart_count}) will be requeued"


def requeue(job_id: str) -> None:
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60, capture_output=True, text=True)


def maybe_requeue(max_requeues: int) -> bool:
    """Decide for the current job (from SLURM_* variables), requeue if right; True if requeued."""
    job_id = os.environ.get("SLURM_JOB_ID")
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    ok, why = decide(job_id, restarts, max_requeues)
    log.warning("requeue decision: %s", why)
    if ok:
        assert job_id is not None
        requeue(job_id)
    return ok


def main(argv: list[str] | None = None) -> int:
    """``python -m foldhpc.slurm.requeue MAX_REQUEUES``: exit 0 if requeued, 3 if not."""
    from foldhpc.monitor.logs import setup_logging

    setup_logging("INFO")
    argv = sys.argv[1:] if argv is None else argv
    max_requeues = int(argv[0]) if argv else 20
    return 0 if maybe_requeue(max_requeues) else 3


if __name__ == "__main__":
    raise SystemExit(main())
