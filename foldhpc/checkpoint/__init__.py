"""Checkpointing: complete training state, durable verified files, async saves, signals."""

from foldhpc.checkpoint.digest import state_digest
from foldhpc.checkpoint.manager import CheckpointEntry, CheckpointError, CheckpointManager, LoadedCheckpoint
from foldhpc.checkpoint.signals import PreemptionSignals, ignore_signals

__all__ = ["CheckpointEntry", "CheckpointError", "CheckpointManager", "LoadedCheckpoint",
           "PreemptionSignals", "ignore_signals", "state_digest"]
