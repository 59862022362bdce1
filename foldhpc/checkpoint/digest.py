"""A state digest: one hash over model and optimizer tensors in a canonical order.

Two runs whose digests match have bit-identical weights and optimizer moments, which is how
``foldhpc checkpoints`` lets a user compare an interrupted run with an uninterrupted one.

The digest is a sha256 over the canonical walk of the model state and the optimizer's per-parameter
state, where each tensor contributes its key, dtype, shape and the crc32 of each 8 MiB piece of its
bytes -- the same crc32s the checkpoint file stores. So saving a checkpoint gets the digest from
the checksums it computes anyway, without a second pass over a 1 GB state. Every single-bit
difference changes a crc32 and so the digest; two different states collide only if every differing
tensor's crc32s collide (about 2^-32 per tensor), which is ample for "did these two runs end
bit-identical?" but not a defence against forgery (nothing here needs one). Digests of format-1
checkpoints (foldhpc 0.1) were computed differently and are not comparable with these.
"""

from __future__ import annotations

import hashlib
from typing import Any

from foldhpc.checkpoint import fileformat


def _feed(h: "hashlib._Hash", key: str, node: Any) -> None:
    h.update(key.encode())
    if isinstance(node, dict) and "T" in node:
        dtype, shape, _, _, crcs = node["T"]
        h.update(f"|{dtype}|{tuple(shape)}|{','.join(map(str, crcs))}|".encode())
    elif isinstance(node, dict) and "D" in node:
        for k, v in sorted(node["D"], key=lambda kv: str(kv[0])):
            _feed(h, f"{key}/{k}", v)
    elif isinstance(node, dict) and "U" in node or isinstance(node, list):
        for i, v in enumerate(node["U"] if isinstance(node, dict) else node):
            _feed(h, f"{key}[{i}]", v)
    else:
        h.update(f"={node!r};".encode())


def _child(node: Any, name: str) -> Any:
    if isinstance(node, dict) and "D" in node:
        for k, v in node["D"]:
            if k == name:
                return v
    return {"D": []}


def tree_digest(tree: Any) -> str:
    """Digest of a checkpoint header tree whose tensor nodes carry their crc32s."""
    h = hashlib.sha256()
    _feed(h, "model", _child(tree, "model"))
    _feed(h, "optimizer", _child(_child(tree, "optimizer"), "state"))
    return h.hexdigest()[:16]


def state_digest(model_state: dict[str, Any], optimizer_state: dict[str, Any]) -> str:
    """sha256 (hex, 16 chars) over the model and optimizer state, tensors byte for byte."""
    enc = fileformat.encode({"model": model_state,
                             "optimizer": {"state": optimizer_state.get("state", {}) if optimizer_state else {}}})
    enc.checksum()
    return tree_digest(enc.tree)
