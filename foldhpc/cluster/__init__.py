"""The floor for what Slurm says: the job's own environment, the client-command runner, and the
parsing of sacct / squeue / scontrol. The runtime (run lock, supervisor, trainer) and the Slurm
orchestration (``foldhpc.slurm``) both read Slurm through this package; it imports nothing of
foldhpc above it.
"""
