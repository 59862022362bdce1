"""The checkpoint file format: a JSON header, then raw tensor bytes. No pickle, ever.

Layout::

    b"FOLDHPC1"  |  uint64 little-endian header length  |  header (UTF-8 JSON)  |  tensor data

The header is the nested state with every tensor replaced by ``{"T": [dtype, shape, offset,
nbytes]}`` (offset into the data section), dicts by ``{"D": [[key, value], ...]}`` (keys keep
their type: the optimizer's are ints) and tuples by ``{"U": [...]}``. Loading parses JSON and
views bytes — there is nothing a file could make it execute, which is the point of
``torch.load(weights_only=True)`` without relying on an allow-list.

Writing is GIL-friendly: tensor bytes go to the file as memoryviews, so ``write()`` releases the
GIL while the training thread keeps stepping; the sha256 is computed over the same buffers on
the way out, so the file is not read back to hash it.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any, BinaryIO

import torch

MAGIC = b"FOLDHPC1"
_LEN = struct.Struct("<Q")
_MAX_HEADER = 256 << 20


class FormatError(ValueError):
    """Not a foldhpc checkpoint file, or a damaged one."""


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise FormatError(f"unknown tensor dtype {name!r}")
    return dt


def _bytes_view(t: torch.Tensor) -> memoryview:
    flat = t.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def encode(obj: Any) -> tuple[Any, list[memoryview]]:
    """(JSON-able header tree, list of tensor byte buffers in data order)."""
    buffers: list[memoryview] = []
    offset = 0

    def enc(x: Any) -> Any:
        nonlocal offset
        if isinstance(x, torch.Tensor):
            if x.device.type != "cpu":
                raise TypeError("checkpoint tensors must be on the host (snapshot them first)")
            mv = _bytes_view(x)
            buffers.append(mv)
            node = {"T": [str(x.dtype), list(x.shape), offset, mv.nbytes]}
            offset += mv.nbytes
            return node
        if isinstance(x, dict):
            for k in x:
                if not isinstance(k, (str, int)) or isinstance(k, bool):
                    raise TypeError(f"checkpoint dict keys must be str or int, not {type(k).__name__}")
            return {"D": [[k, enc(v)] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"U": [enc(v) for v in x]}
        if isinstance(x, list):
            return [enc(v) for v in x]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot store {type(x).__name__} in a checkpoint (tensors, numbers, str, "
                        "lists, tuples and dicts only)")

    return enc(obj), buffers


def write(f: BinaryIO, obj: Any) -> str:
    """Write ``obj`` to the open binary file ``f``; returns the sha256 (hex) of what was written."""
    tree, buffers = encode(obj)
    header = json.dumps(tree, separators=(",", ":")).encode()
    h = hashlib.sha256()
    for chunk in (MAGIC, _LEN.pack(len(header)), header, *buffers):
        f.write(chunk)
        h.update(chunk)
    return h.hexdigest()


def read(path: Path) -> Any:
    """Load a file written by :func:`write`; raises FormatError if it is not one or is damaged."""
    data = Path(path).read_bytes()
    if data[: len(MAGIC)] != MAGIC:
        raise FormatError(f"{path}: not a foldhpc checkpoint (bad magic)")
    if len(data) < len(MAGIC) + _LEN.size:
        raise FormatError(f"{path}: truncated header")
    (n,) = _LEN.unpack_from(data, len(MAGIC))
    start = len(MAGIC) + _LEN.size
    if n > _MAX_HEADER or start + n > len(data):
        raise FormatError(f"{path}: truncated or corrupt header")
    try:
        tree = json.loads(data[start:start + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: corrupt header ({e})") from None
    payload = memoryview(data)[start + n:]

    def dec(x: Any) -> Any:
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            return x
        if "T" in x:
            dtype, shape, off, nbytes = x["T"]
            if off < 0 or off + nbytes > len(payload):
                raise FormatError(f"{path}: tensor data out of range (truncated file?)")
            raw = torch.frombuffer(bytearray(payload[off:off + nbytes]), dtype=torch.uint8) if nbytes else \
                torch.empty(0, dtype=torch.uint8)
            try:
                return raw.view(_dtype(dtype)).reshape(shape)
            except RuntimeError as e:
                raise FormatError(f"{path}: tensor does not match its header ({e})") from None
        if "D" in x:
            return {k: dec(v) for k, v in x["D"]}
        if "U" in x:
            return tuple(dec(v) for v in x["U"])
        raise FormatError(f"{path}: unknown header node {sorted(x)}")

    return dec(tree)
