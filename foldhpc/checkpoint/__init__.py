"""Checkpointing: complete training state, durable self-verifying files, async saves, signals.

The names are imported on first use (PEP 562): ``foldhpc.checkpoint.signals`` must be importable
without torch, so that ``foldhpc train`` can start recording preemption signals before the
second or two that importing torch takes (a signal in that window would otherwise kill it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names' types for type checkers; at run time __getattr__ imports them on first use
    from foldhpc.checkpoint.digest import state_digest as state_digest
    from foldhpc.checkpoint.errors import CheckpointError as CheckpointError
    from foldhpc.checkpoint.manager import (CheckpointEntry as CheckpointEntry,
                                            CheckpointManager as CheckpointManager,
                                            LoadedCheckpoint as LoadedCheckpoint)
    from foldhpc.checkpoint.signals import PreemptionSignals as PreemptionSignals, ignore_signals as ignore_signals

_EXPORTS = {
    "CheckpointEntry": "foldhpc.checkpoint.manager", "CheckpointError": "foldhpc.checkpoint.errors",
    "CheckpointManager": "foldhpc.checkpoint.manager", "LoadedCheckpoint": "foldhpc.checkpoint.manager",
    "PreemptionSignals": "foldhpc.checkpoint.signals", "ignore_signals": "foldhpc.checkpoint.signals",
    "state_digest": "foldhpc.checkpoint.digest",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'foldhpc.checkpoint' has no attribute {name!r}")
