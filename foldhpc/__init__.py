"""foldhpc: train a protein structure model on Slurm clusters without losing work."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

__all__ = ["Session", "__version__"]


def __getattr__(name: str) -> Any:
    """``foldhpc.Session`` is imported on first use (PEP 562): ``import foldhpc`` stays free of torch,
    so the CLI's fast paths (``foldhpc status``, signal handling before torch loads) keep their speed."""
    if name == "Session":
        return importlib.import_module("foldhpc.session").Session
    raise AttributeError(f"module 'foldhpc' has no attribute {name!r}")
