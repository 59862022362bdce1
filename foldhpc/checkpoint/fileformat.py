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
* **One copy on load.** Each tensor's bytes are read straight into its own storage by the I/O
  pool's threads, which check the crc32s of what they read while the others still read.

Format 1 (``b"FOLDHPC1"``, header first, integrity only through the manifest's sha256) is still read.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable

if TYPE_CHECKING:  # imported where tensors are handled: reading a header (foldhpc status,
    import torch   # foldhpc checkpoints) must not cost a torch import

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


POOL_THREADS = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


class FormatError(ValueError):
    """Not a foldhpc checkpoint file, or a damaged one."""


def checksum_pool() -> ThreadPoolExecutor:
    """The process's checkpoint I/O threads: crc32s while writing, read + crc32 shares while
    loading (created once: starting threads per save costs ms). As many as the CPUs this process
    may use, at most 4: crc32 runs at ~4 GB/s per core, so more would only wait on the disk."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=POOL_THREADS, thread_name_prefix="ckpt-io")
        return _pool


def _dtype(name: str) -> torch.dtype:
    import torch

    dt = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise FormatError(f"unknown tensor dtype {name!r}")
    return dt


def byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a host tensor, without a copy when it is contiguous."""
    import torch

    flat = t.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _crc_batch(mvs: list[memoryview]) -> list[int]:
    return [zlib.crc32(m) for m in mvs]


class Checksummer:
    """crc32 of every PIECE of many buffers, computed in the checksum pool while the caller goes on.

    Pieces are handed to the pool in batches of about PIECE bytes: one task per small tensor
    would cost more in thread hand-offs than the crc32 itself (a state has thousands).
    """

    def __init__(self) -> None:
        self.crcs: list[list[int]] = []
        self._batches: list[tuple[list[tuple[int, int]], Future]] = []
        self._keys: list[tuple[int, int]] = []
        self._mvs: list[memoryview] = []
        self._bytes = 0

    def add(self, mv: memoryview) -> int:
        """Queue ``mv``; returns its index in :attr:`crcs`."""
        idx = len(self.crcs)
        pieces = [mv[a:a + PIECE] for a in range(0, mv.nbytes, PIECE)]
        self.crcs.append([0] * len(pieces))
        for j, piece in enumerate(pieces):
            self._keys.append((idx, j))
            self._mvs.append(piece)
            self._bytes += piece.nbytes
            if self._bytes >= PIECE:
                self._flush()
        return idx

    def _flush(self) -> None:
        if self._keys:
            self._batches.append((self._keys, checksum_pool().submit(_crc_batch, self._mvs)))
            self._keys, self._mvs, self._bytes = [], [], 0

    def result(self) -> list[list[int]]:
        """Every buffer's crc32 list, in the order added (waits for the pool)."""
        self._flush()
        for keys, fut in self._batches:
            for (i, j), crc in zip(keys, fut.result()):
                self.crcs[i][j] = crc
        self._batches = []
        return self.crcs


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
        ck = Checksummer()
        for _, mv in self.tensors:
            ck.add(mv)
        for (node, _), crcs in zip(self.tensors, ck.result()):
            node[4] = crcs


def encode(obj: Any) -> Encoded:
    """Header tree of ``obj`` with data offsets assigned (crc32 lists still empty)."""
    import torch

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
          digest_of: Callable[[Any], str] | None = None,
          data_done: Callable[[], None] | None = None) -> dict[str, Any]:
    """Write ``state`` to the open binary file ``f`` (positioned at 0); returns the header written.

    ``digest_of(tree)``, if given, computes ``info["digest"]`` from the header tree once its
    crc32s are known (before the header is written), so the state's bytes are read only once.
    ``data_done()`` is called once every tensor byte has been written and checksummed: from then
    on the tensors may change.
    """
    enc = encode(state)
    f.write(MAGIC.ljust(ALIGN, b"\0"))
    pos = ALIGN
    ck = Checksummer()
    for node, mv in enc.tensors:
        off = node[2]
        if off > pos:
            f.write(b"\0" * (off - pos))
        ck.add(mv)  # hashed by the pool while this thread writes
        f.write(mv)
        pos = off + mv.nbytes
    for (node, _), crcs in zip(enc.tensors, ck.result()):
        node[4] = crcs
    if data_done is not None:
        data_done()
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


def read(path: Path, verify: bool = True) -> dict[str, Any]:
    """Load a checkpoint file: ``{"format", "info", "meta", "state", "bytes"}``.

    Format 2: every tensor piece's crc32 is checked while the file is read (``verify=False``
    checks footer, header and layout only). Raises FormatError, naming the damage, for any file
    that is not intact. Format 1 files are parsed as before (integrity: the manifest's sha256).
    """
    import torch

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
        # Every tensor gets its own storage and its bytes are read straight into it: no second copy,
        # and, like torch.load, allocations a long-lived process can serve from memory it already
        # has (one 1 GB buffer would be fresh pages, faulted in, every time). The reads are done by
        # the pool's threads, each a contiguous share of the file, each checking the crc32s of what
        # it read: page faults, copies out of the page cache and crc32s run on every core at once.
        bufs = {id(n): torch.empty(n[3], dtype=torch.uint8) for n in nodes}
        views = {k: memoryview(t.numpy()) if t.numel() else memoryview(bytearray()) for k, t in bufs.items()}
        pieces = [(n, j, a, min(n[3], a + PIECE)) for n in nodes for j, a in enumerate(range(0, n[3], PIECE))]
        pieces.sort(key=lambda u: u[0][2] + u[2])
        pool = checksum_pool()
        shares = _split(pieces, POOL_THREADS)
        futs = [pool.submit(_read_share, f.fileno(), views, share, verify) for share in shares]
        crcs: dict[int, list[int]] = {id(n): [0] * len(range(0, n[3], PIECE)) for n in nodes}
        for share, fut in zip(shares, futs):
            try:
                got = fut.result()  # an OSError (I/O, not damage) propagates as such
            except EOFError:
                raise FormatError(f"{path}: file shrank while being read") from None
            for (n, j, _, _), c in zip(share, got):
                crcs[id(n)][j] = c
    if verify:
        for n in nodes:
            if crcs[id(n)] != n[4]:
                raise FormatError(f"{path}: checksum mismatch in the tensor at offset {n[2]} (corrupted data)")

    def tensor(node: list[Any]) -> torch.Tensor:
        dtype, shape, _, _, _ = node
        return bufs[id(node)].view(_dtype(dtype)).reshape(shape)

    return {"format": FORMAT, "info": header["info"], "meta": header.get("meta", {}),
            "state": _decode(header["state"], tensor, path), "bytes": size}


def _split(pieces: list[tuple[list[Any], int, int, int]], k: int) -> list[list[tuple[list[Any], int, int, int]]]:
    """``k`` consecutive shares of ``pieces`` with about the same number of bytes each."""
    total = sum(b - a for _, _, a, b in pieces)
    shares: list[list[tuple[list[Any], int, int, int]]] = [[] for _ in range(max(1, k))]
    acc = 0
    for u in pieces:
        shares[min(len(shares) - 1, acc * len(shares) // max(total, 1))].append(u)
        acc += u[3] - u[2]
    return [sh for sh in shares if sh]


def _read_share(fd: int, views: dict[int, memoryview], share: list[tuple[list[Any], int, int, int]],
                verify: bool) -> list[int]:
    """Read each piece of ``share`` into its tensor's buffer; crc32 of each piece if ``verify``."""
    out = []
    for n, _, a, b in share:
        dst = views[id(n)][a:b]
        pos = 0
        while pos < b - a:
            got = os.preadv(fd, [dst[pos:]], n[2] + a + pos)
            if not got:
                raise EOFError
            pos += got
        if verify:
            out.append(zlib.crc32(dst))
    return out


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
    import torch

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
