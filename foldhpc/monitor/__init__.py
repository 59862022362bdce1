"""What a person or a script asks about a run: `foldhpc status` (report), the timeline, goodput and plots.

It reads the run records (foldhpc.records), Slurm (foldhpc.cluster) and the orchestration's state
files (foldhpc.slurm); nothing below imports it.
"""
