"""foldhpc: train a protein structure model on Slurm clusters without losing work."""

__version__ = "0.1.0"
