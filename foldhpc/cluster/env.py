"""What Slurm tells a job about itself through its environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class SlurmEnv:
    """This process's Slurm job, as its environment says; ``job_id`` is None outside Slurm.

    ``job_id`` is ``ARRAYID_TASK`` for an array task (the id sacct and scancel accept for that task
    alone); ``restart_count`` is ``SLURM_RESTART_COUNT``, the number of times Slurm requeued it.
    """

    job_id: str | None
    restart_count: int = 0

    @classmethod
    def from_environ(cls, env: Mapping[str, str] | None = None) -> SlurmEnv:
        env = os.environ if env is None else env
        job_id = env.get("SLURM_JOB_ID") or None
        if env.get("SLURM_ARRAY_JOB_ID"):
            job_id = f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '')}"
        try:
            restarts = int(env.get("SLURM_RESTART_COUNT", "0") or 0)
        except ValueError:
            restarts = 0
        return cls(job_id=job_id, restart_count=restarts)


def slurm_env() -> SlurmEnv:
    """The Slurm job of this process, read now (a requeued job's count changes between runs)."""
    return SlurmEnv.from_environ()
