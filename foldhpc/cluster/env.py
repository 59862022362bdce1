"""What Slurm tells a job about itself through its environment."""

from __future__ import annotations

import os
from typing import Any


def slurm_info() -> dict[str, Any]:
    """This process's Slurm job id (``ARRAYID_TASK`` for array tasks) and restart count, if any."""
    env = os.environ
    job_id = env.get("SLURM_JOB_ID")
    if env.get("SLURM_ARRAY_JOB_ID"):
        job_id = f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '')}"
    return {"job_id": job_id, "restart_count": int(env.get("SLURM_RESTART_COUNT", "0") or 0)}
