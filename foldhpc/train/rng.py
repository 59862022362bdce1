"""Capture and restore every random number generator the training step can touch.

Training also reseeds torch from (seed, step) before each step (see :func:`step_seed`), so a
resumed run is exact even if some library consumed random numbers between steps; saving the
generator states on top makes the checkpoint complete for any code that draws outside a step.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, cast

import numpy as np
import torch


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """A 63-bit seed that depends only on (seed, step) and, for ranks other than 0, the rank
    (each rank draws its own dropout masks; rank 0's stream is that of a one-process run)."""
    key = f"foldhpc:{seed}:{step}" + (f":{rank}" if rank else "")
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def capture_rng_state() -> dict[str, Any]:
    """All RNG states as tensors and plain values (what the checkpoint file format can hold)."""
    # the legacy tuple (the default for the global MT19937 generator); numpy's stubs say dict | tuple
    np_state = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "key": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]  # torch: unannotated
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
