"""The checkpoint file format: raw tensor bytes, then a JSON header that describes and checks them.
No pickle, ever.

Format 2 (written since foldhpc 0.2)::

    b"FOLDHPC2" + zero padding to 64 bytes
    tensor data: each tensor's bytes at a 64-byte aligned file offset
    header: UTF-8 JSON
    footer (32 bytes): uint64 header offset | uint64 header length | uint32 crc32(header) | 4 zero bytes
                       | b"FHPC2END"                                  (integers little-endian)

The header is ``{"format": 2, "info": {...}, "meta": {...}, "state": TREE}``: ``info`` is what the
checkpoint manager needs to index the file without the manifest (step, commit sequence number,
reason, state digest, save time); ``TREE`` is the nested state with every tensor replaced by
``{"T": [dtype, shape, offset, nbytes, [crc32 of each 8 MiB piece]]}``, dicts by
``{"D": [[key, value], ...]}`` (keys keep their type: the optimizer's are ints) and tuples by
``{"U": [...]}``.

Why this layout:

* **Every file checks itself.** A file is complete only if its footer is there and points at a
  header whose crc32 matches; every tensor piece carries its own crc32. So truncation, a torn or
  half-written file, a bit flip anywhere, or a header that does not belong to the data are all
  detected without the manifest (the manifest is an index, rebuilt from these headers if lost).
  crc32 is not a cryptographic hash: it guards against accidents (storage and transfer errors,
  torn writes), not against someone forging a file -- and a forged file still cannot run code,
  since loading only parses JSON and views bytes.
* **One pass over the bytes.** The crc32s are computed while the data are written (or read), in a
  small thread pool (zlib releases the GIL), 8 MiB at a time, so hashing runs in parallel with the
  I/O and with itself. The state digest (bit-exactness) is derived from the same crc32s rather than
  from a second pass: see :mod:`foldhpc.checkpoint.digest`.
* **Zero-copy load.** The data section is read into one buffer (anonymous memory, transparent huge
  pages where the kernel allows, so 1 GB costs few page faults) and every tensor is a view into it.

Format 1 (``b"FOLDHPC1"``, header first, integrity only through the manifest's sha256) is still read.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import struct
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

log = logging.getLogger(__name__)

MAGIC = b"FOLDHPC2"
MAGIC_V1 = b"FOLDHPC1"
TAIL = b"FHPC2END"
FORMAT = 2
ALIGN = 64
PIECE = 8 << 20  # bytes per crc32: small enough to spread over threads, large enough to be cheap
_FOOTER = struct.Struct("<QQI4x8s")
_LEN = struct.Struct("<Q")
_MAX_HEADER = 256 << 20
_READ_CHUNK = 64 << 20
_VIEW_MIN_BYTES = 1 << 20  # tensors at least this big are views into the read buffer

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


class FormatError(ValueError):
    """Not a foldhpc checkpoint file, or a damaged one."""


def checksum_pool() -> ThreadPoolExecutor:
    """The process's crc32 threads (created once: starting threads per save costs ms)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)),
                                       thread_name_prefix="ckpt-crc")
        return _pool


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise FormatError(f"unknown tensor dtype {name!r}")
    return dt


def byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a host tensor, without a copy when it is contiguous."""
    flat = t.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def piece_crcs(mv: memoryview) -> list[Future]:
    """crc32 of each PIECE of ``mv``, computed in the checksum pool."""
    pool = checksum_pool()
    return [pool.submit(zlib.crc32, mv[a:a + PIECE]) for a in range(0, mv.nbytes, PIECE)]


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class Encoded:
    """A state as a header tree, plus each tensor node with the bytes it stands for."""

    tree: Any
    tensors: list[tuple[list[Any], memoryview]] = field(default_factory=list)
    end: int = ALIGN  # end of the data section so far

    def checksum(self) -> None:
        """Fill every tensor node's crc32 list (what writing does on the way out)."""
        fill_crcs([(node, piece_crcs(mv)) for node, mv in self.tensors])


def fill_crcs(pending: list[tuple[list[Any], list[Future]]]) -> None:
    for node, futs in pending:
        node[4] = [fu.result() for fu in futs]


def encode(obj: Any) -> Encoded:
    """Header tree of ``obj`` with data offsets assigned (crc32 lists still empty)."""
    enc = Encoded(tree=None)

    def walk(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            if x.device.type != "cpu":
                raise TypeError("checkpoint tensors must be on the host (snapshot them first)")
            mv = byte_view(x)
            off = _align(enc.end)
            node = [str(x.dtype), list(x.shape), off, mv.nbytes, []]
            enc.tensors.append((node, mv))
            enc.end = off + mv.nbytes
            return {"T": node}
        if isinstance(x, dict):
            for k in x:
                if not isinstance(k, (str, int)) or isinstance(k, bool):
                    raise TypeError(f"checkpoint dict keys must be str or int, not {type(k).__name__}")
            return {"D": [[k, walk(v)] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"U": [walk(v) for v in x]}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot store {type(x).__name__} in a checkpoint (tensors, numbers, str, "
                        "lists, tuples and dicts only)")

    enc.tree = walk(obj)
    return enc


def write(f: BinaryIO, state: Any, meta: dict[str, Any], info: dict[str, Any],
          digest_of: Callable[[Any], str] | None = None) -> dict[str, Any]:
    """Write ``state`` to the open binary file ``f`` (positioned at 0); returns the header written.

    ``digest_of(tree)``, if given, computes ``info["digest"]`` from the header tree once its
    crc32s are known (before the header is written), so the state's bytes are read only once.
    """
    enc = encode(state)
    f.write(MAGIC.ljust(ALIGN, b"\0"))
    pos = ALIGN
    pending: list[tuple[list[Any], list[Future]]] = []
    for node, mv in enc.tensors:
        off = node[2]
        if off > pos:
            f.write(b"\0" * (off - pos))
        pending.append((node, piece_crcs(mv)))  # hashed by the pool while this thread writes
        f.write(mv)
        pos = off + mv.nbytes
    fill_crcs(pending)
    if digest_of is not None:
        info = dict(info, digest=digest_of(enc.tree))
    header = json.dumps({"format": FORMAT, "info": info, "meta": meta, "state": enc.tree},
                        separators=(",", ":")).encode()
    f.write(header)
    f.write(_FOOTER.pack(pos, len(header), zlib.crc32(header), TAIL))
    return {"format": FORMAT, "info": info, "meta": meta, "bytes": pos + len(header) + _FOOTER.size}


# ---------------------------------------------------------------------------------------- reading
def file_format(path: Path) -> int:
    """1 or 2 from the magic bytes; raises FormatError if the file is not a foldhpc checkpoint."""
    with open(path, "rb") as f:
        magic = f.read(len(MAGIC))
    if magic == MAGIC:
        return 2
    if magic == MAGIC_V1:
        return 1
    raise FormatError(f"{path}: not a foldhpc checkpoint (bad magic {magic[:8]!r})")


def _read_header(f: BinaryIO, path: Path, size: int) -> tuple[dict[str, Any], int]:
    if size < ALIGN + _FOOTER.size:
        raise FormatError(f"{path}: truncated ({size} bytes)")
    f.seek(0)
    if f.read(len(MAGIC)) != MAGIC:
        raise FormatError(f"{path}: not a foldhpc format-2 checkpoint (bad magic)")
    f.seek(size - _FOOTER.size)
    hoff, hlen, hcrc, tail = _FOOTER.unpack(f.read(_FOOTER.size))
    if tail != TAIL:
        raise FormatError(f"{path}: no footer (truncated or half-written file)")
    if hlen > _MAX_HEADER or hoff < ALIGN or hoff + hlen + _FOOTER.size != size:
        raise FormatError(f"{path}: footer does not match the file size {size} (truncated or appended to)")
    f.seek(hoff)
    raw = f.read(hlen)
    if len(raw) != hlen or zlib.crc32(raw) != hcrc:
        raise FormatError(f"{path}: header checksum mismatch (corrupted)")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: corrupt header ({e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT or not isinstance(header.get("info"), dict):
        raise FormatError(f"{path}: header is not a format-{FORMAT} header")
    return header, hoff


def read_header(path: Path) -> dict[str, Any]:
    """The header of a format-2 file (footer and header checksum verified; data not read)."""
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        header, _ = _read_header(f, path, size)
    header["bytes"] = size
    return header


def _buffer(n: int) -> tuple[torch.Tensor, memoryview]:
    """``n`` writable bytes for the data section: anonymous memory with transparent huge pages
    (faulting in 1 GB 4 KiB at a time is a large part of a load), else an ordinary tensor."""
    if n >= (64 << 20) and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            m.madvise(mmap.MADV_HUGEPAGE)
            return torch.frombuffer(m, dtype=torch.uint8), memoryview(m)  # the tensor keeps m alive
        except (OSError, ValueError):
            pass
    t = torch.empty(max(n, 1), dtype=torch.uint8)[:n]
    return t, memoryview(t.numpy())


def read(path: Path, verify: bool = True) -> dict[str, Any]:
    """Load a checkpoint file: ``{"format", "info", "meta", "state", "bytes"}``.

    Format 2: every tensor piece's crc32 is checked while the file is read (``verify=False``
    checks footer, header and layout only). Raises FormatError, naming the damage, for any file
    that is not intact. Format 1 files are parsed as before (integrity: the manifest's sha256).
    """
    path = Path(path)
    if file_format(path) == 1:
        return _read_v1(path)
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        header, data_end = _read_header(f, path, size)
        nodes: list[list[Any]] = []
        _collect(header["state"], nodes)
        for n in nodes:
            if not (isinstance(n, list) and len(n) == 5 and isinstance(n[2], int) and isinstance(n[3], int)
                    and ALIGN <= n[2] and n[2] + n[3] <= data_end and isinstance(n[4], list)):
                raise FormatError(f"{path}: tensor entry {n!r:.80} out of range")
        nodes.sort(key=lambda n: n[2])
        buf, mv = _buffer(data_end)
        checks: list[tuple[list[Any], list[Future]]] = []
        f.seek(ALIGN)
        pos, i = ALIGN, 0
        while pos < data_end:
            got = f.readinto(mv[pos:min(data_end, pos + _READ_CHUNK)])
            if not got:
                raise FormatError(f"{path}: file shrank while being read")
            pos += got
            while verify and i < len(nodes) and nodes[i][2] + nodes[i][3] <= pos:  # fully read: hash it
                n = nodes[i]
                checks.append((n, piece_crcs(mv[n[2]:n[2] + n[3]])))
                i += 1
    for n, futs in checks:
        if [fu.result() for fu in futs] != n[4]:
            raise FormatError(f"{path}: checksum mismatch in the tensor at offset {n[2]} (corrupted data)")

    def tensor(node: list[Any]) -> torch.Tensor:
        dtype, shape, off, nbytes, _ = node
        t = buf[off:off + nbytes].view(_dtype(dtype)).reshape(shape)
        # Small tensors get their own storage: some torch APIs mishandle a view at a storage offset
        # (torch.set_rng_state segfaults on one, torch 2.13), and copying them costs nothing.
        return t.clone() if nbytes < _VIEW_MIN_BYTES else t

    return {"format": FORMAT, "info": header["info"], "meta": header.get("meta", {}),
            "state": _decode(header["state"], tensor, path), "bytes": size}


def _decode(tree: Any, tensor: Callable[[list[Any]], torch.Tensor], path: Path) -> Any:
    """The nested state back from a header tree; ``tensor(node)`` makes each tensor."""
    def dec(x: Any) -> Any:
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            return x
        if "T" in x:
            try:
                return tensor(x["T"])
            except (RuntimeError, TypeError, ValueError) as e:
                raise FormatError(f"{path}: tensor does not match its header ({e})") from None
        if "D" in x:
            return {k: dec(v) for k, v in x["D"]}
        if "U" in x:
            return tuple(dec(v) for v in x["U"])
        raise FormatError(f"{path}: unknown header node {sorted(x)}")

    return dec(tree)


def _collect(x: Any, out: list[list[Any]]) -> None:
    """Every tensor node of a header tree."""
    if isinstance(x, list):
        for v in x:
            _collect(v, out)
    elif isinstance(x, dict):
        if "T" in x:
            out.append(x["T"])
        elif "D" in x:
            for _, v in x["D"]:
                _collect(v, out)
        elif "U" in x:
            for v in x["U"]:
                _collect(v, out)


def _read_v1(path: Path) -> dict[str, Any]:
    """Format 1: ``FOLDHPC1 | uint64 header length | JSON header | tensor data`` (foldhpc 0.1)."""
    data = path.read_bytes()
    if len(data) < len(MAGIC_V1) + _LEN.size:
        raise FormatError(f"{path}: truncated header")
    (n,) = _LEN.unpack_from(data, len(MAGIC_V1))
    start = len(MAGIC_V1) + _LEN.size
    if n > _MAX_HEADER or start + n > len(data):
        raise FormatError(f"{path}: truncated or corrupt header")
    try:
        tree = json.loads(data[start:start + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: corrupt header ({e})") from None
    payload = memoryview(data)[start + n:]

    def tensor(node: list[Any]) -> torch.Tensor:
        dtype, shape, off, nbytes = node
        if off < 0 or off + nbytes > len(payload):
            raise FormatError(f"{path}: tensor data out of range (truncated file?)")
        raw = torch.frombuffer(bytearray(payload[off:off + nbytes]), dtype=torch.uint8) if nbytes else \
            torch.empty(0, dtype=torch.uint8)
        return raw.view(_dtype(dtype)).reshape(shape)

    obj = _decode(tree, tensor, path)
    if not isinstance(obj, dict) or obj.get("format") != 1:
        raise FormatError(f"{path}: not a foldhpc format-1 checkpoint payload")
    return {"format": 1, "info": {}, "meta": obj.get("meta", {}), "state": obj.get("state"), "bytes": len(data)}
