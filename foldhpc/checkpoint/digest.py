"""A state digest: one hash over model and optimizer tensors in a canonical order.

Two runs whose digests match have bit-identical weights and optimizer moments, which is how
``foldhpc checkpoints`` lets a user compare an interrupted run with an uninterrupted one.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch


def _feed(h: "hashlib._Hash", key: str, value: Any) -> None:
    h.update(key.encode())
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # no copy; hashlib drops the GIL
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            _feed(h, f"{key}/{k}", value[k])
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _feed(h, f"{key}[{i}]", v)
    else:
        h.update(f"={value!r};".encode())


def state_digest(model_state: dict[str, Any], optimizer_state: dict[str, Any]) -> str:
    """sha256 (hex, 16 chars) over the model and optimizer state, tensors byte for byte."""
    h = hashlib.sha256()
    _feed(h, "model", model_state)
    _feed(h, "optimizer", optimizer_state.get("state", {}) if optimizer_state else {})
    return h.hexdigest()[:16]
