"""Slurm orchestration: submission via submitit, self-requeue, follow-up jobs, sweeps as job arrays.

What Slurm says (environment, sacct/squeue/scontrol) is in foldhpc.cluster; the job history file is
in foldhpc.records.
"""
