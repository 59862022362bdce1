"""Slurm integration: submission via submitit, self-requeue, sbatch rendering, job history."""
