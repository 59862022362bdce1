"""foldhpc: train a protein structure model on Slurm clusters without losing work."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: the public API for a training loop of one's own (foldhpc.session), imported on first use
_SESSION_API = ("Session", "StepBatches", "Stateful", "StatesMismatch")
#: a model of one's own for the whole CLI: the [task] config section (foldhpc.task)
_TASK_API = ("Task", "TaskError")
#: the run configuration, for a Session or a task factory (foldhpc.config)
_CONFIG_API = ("Config", "ConfigError", "load_config")

__all__ = [*_SESSION_API, *_TASK_API, *_CONFIG_API, "__version__"]


def __getattr__(name: str) -> Any:
    """``foldhpc.Session`` and its companions are imported on first use (PEP 562): ``import foldhpc`` stays free of torch,
    so the CLI's fast paths (``foldhpc status``, signal handling before torch loads) keep their speed."""
    if name in _SESSION_API:
        return getattr(importlib.import_module("foldhpc.session"), name)
    if name in _TASK_API:
        return getattr(importlib.import_module("foldhpc.task"), name)
    if name in _CONFIG_API:
        return getattr(importlib.import_module("foldhpc.config"), name)
    raise AttributeError(f"module 'foldhpc' has no attribute {name!r}")
