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
  from a second pass: see :mod:`foldhpc.checkpoint.digest`. The bytes go out through the file's
  descriptor, up to 8 MiB (or 1024 buffers) per ``writev``, and the disk's writeback is started
  every 32 MiB, so the final fsync finds little left to do (:class:`_FdWriter`); the bytes on disk
  are the same as with one ``write`` per tensor.
* **One copy on load.** Each tensor's bytes are read straight into its own storage by the I/O
  pool's threads, which check the crc32s of what they read while the others still read.

Format 1 (``b"FOLDHPC1"``, header first, integrity only through the manifest's sha256) is still read.

**A header is input, not trusted.** The crc32 proves a header was not damaged by accident, not
that a sane program wrote it, and the checkpoint directory may hold anything (a file crafted or
edited by hand, one written by a newer foldhpc, a FIFO named like a checkpoint). So before any
byte is allocated the header is checked whole: capped at :data:`MAX_HEADER` bytes and
:data:`MAX_DEPTH` levels, every field of ``info`` typed, every node of the tree well formed, every
tensor's dtype known, its shape matching its byte count, and the tensor ranges non-negative,
non-overlapping and inside the data section (so a file can never make the reader allocate more
than its own size). Whatever is wrong raises :class:`FormatError` naming the file and the fault,
which the manager treats like any other damage: it falls back to the previous checkpoint. A file of
a newer format raises :class:`UnknownFormat` (not damage: it is left alone), a path that is not a
regular file :class:`NotRegularFile` (an OSError: never read, never deleted).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import stat
import struct
import sys
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, TypeGuard, cast

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
# A header describes tensors, it does not hold them: a state of 100k tensors needs ~10 MiB. json
# needs ~25 bytes of memory per byte of a header of empty containers, so the cap also bounds what
# parsing a crafted header can cost (~400 MiB at the cap; it was 6.6 GB at 256 MiB).
MAX_HEADER = 16 << 20
# JSON nesting of a header (a trainer's state is ~20 deep): deep enough for any real state,
# shallow enough that the recursive walks below stay far from Python's recursion limit.
MAX_DEPTH = 200
MAX_TIME = 1e11  # a save time (seconds since 1970) past this is not one (and time.localtime fails)


POOL_THREADS = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


class FormatError(ValueError):
    """Not a foldhpc checkpoint file, or a damaged one."""


class UnknownFormat(FormatError):
    """A checkpoint of a newer format than this foldhpc reads: not damaged, and not this
    version's to judge -- it is neither used nor ever deleted (an older foldhpc resumed on a run
    directory must not destroy what a newer one wrote)."""


class NotRegularFile(OSError):
    """A FIFO, device, socket or directory where a checkpoint file was expected. An OSError, so the
    manager handles it like an unreadable file: skipped, never marked bad, never deleted."""


def open_regular(path: Path, buffering: int = -1) -> BinaryIO:
    """``open(path, "rb")`` for regular files only, without ever blocking in ``open``.

    A FIFO named like a checkpoint would block a plain ``open`` until a writer appears (and
    SIGTERM would not end the wait: the signal handler runs only between bytecodes). O_NONBLOCK
    makes the open return at once; the type is then checked on the opened descriptor itself, so
    nothing can be swapped in between a check and the open.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(errno.EINVAL, f"not a regular file ({_kind(mode)})", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a plain file"


def is_count(x: Any) -> TypeGuard[int]:
    """A non-negative int that is not a bool (``True`` is an int to Python, not to a header)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def is_timestamp(x: Any) -> bool:
    """Seconds since 1970 that ``time.localtime`` can show: finite, non-negative, before year 5000."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and 0 <= x < MAX_TIME


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

    dt = getattr(torch, name.removeprefix("torch."), None) if isinstance(name, str) else None
    if not isinstance(dt, torch.dtype):
        raise FormatError(f"unknown tensor dtype {name!r}")
    return dt


def byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a host tensor (read-only), without a copy when it is contiguous.

    The common case (a plain contiguous tensor) is a ctypes array over the tensor's memory that
    holds a reference to the tensor, so the view keeps the memory alive like any buffer export;
    it is ~5x cheaper than the detach/reshape/view/numpy chain (a state has ~10k tensors: 0.1 s
    of a 1.2 s save). Everything else (strided, conjugate or negative views, other layouts) goes
    through torch.
    """
    import torch

    n = t.numel() * t.element_size()
    if (n and t.layout == torch.strided and t.device.type == "cpu" and t.is_contiguous()
            and not t.is_conj() and not t.is_neg()):
        import ctypes

        arr = (ctypes.c_ubyte * n).from_address(t.data_ptr())
        arr._tensor = t  # type: ignore[attr-defined]  # the memory's owner lives as long as the view
        return memoryview(arr).cast("B").toreadonly()
    flat = t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
    # numpy's stubs give ndarray no __buffer__ before Python 3.12, though it has the buffer protocol
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")  # type: ignore[arg-type]


def _crc_batch(mvs: list[memoryview]) -> list[int]:
    return [zlib.crc32(m) for m in mvs]


class Checksummer:
    """crc32 of every PIECE of many buffers, computed in the checksum pool while the caller goes on.

    Pieces are handed to the pool in batches of about PIECE bytes: one task per small tensor
    would cost more in thread hand-offs than the crc32 itself (a state has thousands).
    """

    def __init__(self) -> None:
        self.crcs: list[list[int]] = []
        self._batches: list[tuple[list[tuple[int, int]], Future[list[int]]]] = []
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


def _load_sync_file_range() -> Callable[[int, int, int], None] | None:
    """Linux's ``sync_file_range(fd, off, n, SYNC_FILE_RANGE_WRITE)`` (not in :mod:`os`), or None.

    It only *starts* the writeback of a range and returns: the disk then works while the rest of
    the file is still being written, instead of all at the final fsync (1.02 s -> 0.64 s for 1 GB
    here, see docs/measurements/checkpoint-bandwidth-2026-12-02.md). It promises nothing about
    durability: the fsync after the write still does that, and is still done.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int

    def start_writeback(fd: int, off: int, n: int) -> None:
        fn(fd, off, n, 2)  # SYNC_FILE_RANGE_WRITE; a failure is only a lost hint: fsync reports real errors

    return start_writeback


_start_writeback = _load_sync_file_range()
WRITEBACK = 32 << 20  # bytes written between two writeback starts
_IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") and "SC_IOV_MAX" in os.sysconf_names
               else 16)


class _FdWriter:
    """Sequential writes to a file descriptor, many buffers per ``writev`` (a state has thousands of
    small tensors: one syscall each, and a copy each through a BufferedWriter, cost more than their
    bytes), with the disk's writeback started every :data:`WRITEBACK` bytes (:func:`_load_sync_file_range`).
    """

    def __init__(self, fd: int, pos: int) -> None:
        self.fd = fd
        self.pos = pos  # file offset of the next byte queued
        self._iov: list[memoryview] = []
        self._queued = 0
        self._synced = pos  # writeback started up to here

    def add(self, mv: memoryview | bytes) -> None:
        """Queue ``mv`` (kept by reference: it must not change until :meth:`flush` returns)."""
        mv = memoryview(mv).cast("B") if not isinstance(mv, memoryview) or mv.format != "B" else mv
        for a in range(0, mv.nbytes, PIECE):
            piece = mv[a:a + PIECE]
            self._iov.append(piece)
            self._queued += piece.nbytes
            self.pos += piece.nbytes
            if self._queued >= PIECE or len(self._iov) >= _IOV_MAX:
                self.flush()

    def flush(self) -> None:
        """Write everything queued (all of it: a short write is continued where it stopped)."""
        iov, self._iov, self._queued = self._iov, [], 0
        i = 0
        while i < len(iov):
            n = os.writev(self.fd, iov[i:] if i else iov)
            if n <= 0:
                raise OSError(errno.EIO, "writev wrote nothing")
            while i < len(iov) and n >= iov[i].nbytes:
                n -= iov[i].nbytes
                i += 1
            if n:
                iov[i] = iov[i][n:]
        if _start_writeback is not None and self.pos - self._synced >= WRITEBACK:
            _start_writeback(self.fd, self._synced, self.pos - self._synced)
            self._synced = self.pos


def write(f: BinaryIO, state: Any, meta: dict[str, Any], info: dict[str, Any],
          digest_of: Callable[[Any], str] | None = None,
          data_done: Callable[[], None] | None = None) -> dict[str, Any]:
    """Write ``state`` to the open binary file ``f`` (positioned at 0); returns the header written.

    ``f`` must be a real file (it is written through its descriptor, see :class:`_FdWriter`).
    ``digest_of(tree)``, if given, computes ``info["digest"]`` from the header tree once its
    crc32s are known (before the header is written), so the state's bytes are read only once.
    ``data_done()`` is called once every tensor byte has been written and checksummed: from then
    on the tensors may change.
    """
    enc = encode(state)
    f.flush()
    out = _FdWriter(f.fileno(), f.tell())
    out.add(MAGIC.ljust(ALIGN, b"\0"))
    ck = Checksummer()
    for node, mv in enc.tensors:
        off = node[2]
        if off > out.pos:
            out.add(_ZEROS[:off - out.pos])
        ck.add(mv)  # hashed by the pool while this thread writes
        out.add(mv)
    pos = out.pos
    out.flush()
    for (node, _), crcs in zip(enc.tensors, ck.result()):
        node[4] = crcs
    if data_done is not None:
        data_done()
    if digest_of is not None:
        info = dict(info, digest=digest_of(enc.tree))
    header = json.dumps({"format": FORMAT, "info": info, "meta": meta, "state": enc.tree},
                        separators=(",", ":")).encode()
    out.add(header)
    out.add(_FOOTER.pack(pos, len(header), zlib.crc32(header), TAIL))
    out.flush()
    f.seek(out.pos)  # the file object's position follows what went through its descriptor
    return {"format": FORMAT, "info": info, "meta": meta, "bytes": pos + len(header) + _FOOTER.size}


_ZEROS = memoryview(bytes(ALIGN))  # padding between tensors is always < ALIGN bytes


# ---------------------------------------------------------------------------------------- reading
def file_format(path: Path) -> int:
    """1 or 2 from the magic bytes; raises FormatError if the file is not a foldhpc checkpoint
    (UnknownFormat if it is one of a newer format)."""
    with open_regular(path) as f:
        magic = f.read(len(MAGIC))
    if magic == MAGIC:
        return 2
    if magic == MAGIC_V1:
        return 1
    _check_newer_magic(magic, path)
    raise FormatError(f"{path}: not a foldhpc checkpoint (bad magic {magic[:8]!r})")


def _check_newer_magic(magic: bytes, path: Path) -> None:
    """Raise UnknownFormat for ``FOLDHPC<n>`` with n above FORMAT (a newer foldhpc's file)."""
    stem = MAGIC[:-1]
    if magic.startswith(stem) and magic[len(stem):].isdigit() and int(magic[len(stem):]) > FORMAT:
        raise UnknownFormat(f"{path}: written by a newer foldhpc (format {magic[len(stem):].decode()}; this "
                            f"version reads formats 1 and {FORMAT}): not used, not deleted")


def _read_header(f: BinaryIO, path: Path, size: int) -> tuple[dict[str, Any], int]:
    if size < ALIGN + _FOOTER.size:
        raise FormatError(f"{path}: truncated ({size} bytes)")
    f.seek(0)
    magic = f.read(len(MAGIC))
    if magic != MAGIC:
        _check_newer_magic(magic, path)
        raise FormatError(f"{path}: not a foldhpc format-2 checkpoint (bad magic)")
    f.seek(size - _FOOTER.size)
    hoff, hlen, hcrc, tail = _FOOTER.unpack(f.read(_FOOTER.size))
    if tail != TAIL:
        raise FormatError(f"{path}: no footer (truncated or half-written file)")
    if hoff < ALIGN or hoff + hlen + _FOOTER.size != size:
        raise FormatError(f"{path}: footer does not match the file size {size} (truncated or appended to)")
    if hlen > MAX_HEADER:  # checked before a byte of it is read
        raise FormatError(f"{path}: header of {hlen} bytes is over the {MAX_HEADER >> 20} MiB limit (not a header "
                          "foldhpc writes)")
    f.seek(hoff)
    raw = f.read(hlen)
    if len(raw) != hlen or zlib.crc32(raw) != hcrc:
        raise FormatError(f"{path}: header checksum mismatch (corrupted)")
    header = _parse_json(raw, path)
    if not isinstance(header, dict):
        raise FormatError(f"{path}: header is not a format-{FORMAT} header")
    fmt = header.get("format")
    if is_count(fmt) and fmt > FORMAT:
        raise UnknownFormat(f"{path}: written by a newer foldhpc (header format {fmt}; this version reads formats "
                            f"1 and {FORMAT}): not used, not deleted")
    if fmt != FORMAT or not isinstance(header.get("info"), dict):
        raise FormatError(f"{path}: header is not a format-{FORMAT} header")
    _check_info(header["info"], path)
    if not isinstance(header.get("meta", {}), dict):
        raise FormatError(f"{path}: header 'meta' is not an object")
    if "state" not in header:
        raise FormatError(f"{path}: header holds no 'state'")
    return header, hoff


def _parse_json(raw: bytes, path: Path) -> Any:
    """JSON of a header, its nesting at most MAX_DEPTH (checked without recursion)."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: corrupt header ({e})") from None
    except RecursionError:
        raise FormatError(f"{path}: header nested too deeply (over {MAX_DEPTH} levels)") from None
    todo: list[tuple[Any, int]] = [(doc, 1)]
    while todo:
        x, depth = todo.pop()
        if depth > MAX_DEPTH:
            raise FormatError(f"{path}: header nested too deeply (over {MAX_DEPTH} levels)")
        if isinstance(x, dict):
            todo.extend((v, depth + 1) for v in x.values())
        elif isinstance(x, list):
            todo.extend((v, depth + 1) for v in x if isinstance(v, (dict, list)))
    return doc


def _check_info(info: dict[str, Any], path: Path) -> None:
    """The fields the manager indexes a file by (see CheckpointEntry.from_header), typed."""
    checks: dict[str, tuple[Callable[[Any], bool], str]] = {
        "step": (is_count, "a non-negative integer"), "seq": (is_count, "a non-negative integer"),
        "saved_at": (is_timestamp, "a time in seconds since 1970"),
    }
    for key, (ok, what) in checks.items():
        if key not in info:
            raise FormatError(f"{path}: header info has no {key!r}")
        if not ok(info[key]):
            raise FormatError(f"{path}: header info {key!r} = {info[key]!r:.40} is not {what}")
    for key in ("reason", "digest"):
        if not isinstance(info.get(key, ""), str):
            raise FormatError(f"{path}: header info {key!r} = {info[key]!r:.40} is not a string")
    w = info.get("write_s", 0.0)
    if not (isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0):
        raise FormatError(f"{path}: header info 'write_s' = {w!r:.40} is not a duration")


def _tensor_nodes(tree: Any, path: Path, data_end: int) -> list[list[Any]]:
    """Every tensor node of a header tree, each checked; raises FormatError for any malformed node.

    Checked here, before anything is allocated: node kinds (``T``, ``D``, ``U``, lists, scalars),
    dict keys (str or int), tensor entries ``[dtype name, shape, offset, nbytes, crc32s]`` with
    non-negative integers, one crc32 per piece, and byte ranges that lie in the data section and
    do not overlap (so the tensors' total size is at most the file's). The dtype itself, and that
    the shape matches nbytes, need torch: :func:`_check_dtypes`.
    """
    out: list[list[Any]] = []

    def walk(x: Any) -> None:  # depth bounded by _parse_json
        if isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, dict):
            if len(x) != 1 or next(iter(x)) not in ("T", "D", "U"):
                raise FormatError(f"{path}: unknown header node {sorted(x)[:5]}")
            kind, v = next(iter(x.items()))
            if kind == "T":
                out.append(_check_node(v, path))
            elif not isinstance(v, list):
                raise FormatError(f"{path}: header node {kind!r} holds {type(v).__name__}, not a list")
            elif kind == "U":
                for u in v:
                    walk(u)
            else:
                for kv in v:
                    if not (isinstance(kv, list) and len(kv) == 2):
                        raise FormatError(f"{path}: dict entry {kv!r:.60} is not a [key, value] pair")
                    if not (isinstance(kv[0], str) or isinstance(kv[0], int) and not isinstance(kv[0], bool)):
                        raise FormatError(f"{path}: dict key {kv[0]!r:.60} is not a string or an integer")
                    walk(kv[1])
        elif not (x is None or isinstance(x, (bool, int, float, str))):
            raise FormatError(f"{path}: unknown header value {x!r:.60}")

    walk(tree)
    end = ALIGN
    for n in sorted(out, key=lambda n: (n[2], n[3])):
        if n[2] < end or n[2] + n[3] > data_end:
            raise FormatError(f"{path}: tensor bytes {n[2]}..{n[2] + n[3]} "
                              + ("overlap another tensor's" if n[2] < end and n[2] >= ALIGN else
                                 f"lie outside the data section {ALIGN}..{data_end}")
                              + " (a damaged or crafted header)")
        end = n[2] + n[3]
    return out


def _check_node(n: Any, path: Path) -> list[Any]:
    """One tensor entry ``[dtype, shape, offset, nbytes, crc32s]``, its fields typed."""
    if not (isinstance(n, list) and len(n) == 5):
        raise FormatError(f"{path}: tensor entry {n!r:.80} is not [dtype, shape, offset, nbytes, crc32s]")
    dtype, shape, off, nbytes, crcs = n
    if not (isinstance(dtype, str) and dtype.startswith("torch.") and dtype[6:].isidentifier()):
        raise FormatError(f"{path}: tensor entry {n!r:.80}: dtype {dtype!r:.40} is not a torch dtype name")
    if not (isinstance(shape, list) and all(is_count(d) for d in shape)):
        raise FormatError(f"{path}: tensor entry {n!r:.80}: shape is not a list of non-negative integers")
    if not (is_count(off) and is_count(nbytes)):
        raise FormatError(f"{path}: tensor entry {n!r:.80}: offset and size must be non-negative integers")
    if not (isinstance(crcs, list) and len(crcs) == -(-nbytes // PIECE)
            and all(is_count(c) and c <= 0xFFFFFFFF for c in crcs)):
        raise FormatError(f"{path}: tensor entry {n!r:.80}: not one crc32 per {PIECE >> 20} MiB piece")
    return n


def _check_dtypes(nodes: list[list[Any]], path: Path) -> None:
    """Each tensor's dtype exists in this torch and its shape accounts for exactly its bytes."""
    for n in nodes:
        dt = _dtype(n[0])
        if math.prod(n[1]) * dt.itemsize != n[3]:
            raise FormatError(f"{path}: tensor entry {n!r:.80}: shape {n[1]} of {n[0]} is not {n[3]} bytes")


def read_header(path: Path) -> dict[str, Any]:
    """The header of a format-2 file (footer and header checksum verified; data not read)."""
    path = Path(path)
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        header, data_end = _guarded(path, lambda: _read_header(f, path, size))
        _guarded(path, lambda: _tensor_nodes(header["state"], path, data_end))
    header["bytes"] = size
    return cast("dict[str, Any]", header)


# What parsing a malformed header can raise beyond FormatError: every such case is meant to be
# caught by the checks above; this is the backstop that keeps the promise "a bad file is skipped,
# never a crash". OSError is not here (I/O, not damage), nor MemoryError (this process, not the file).
_PARSE_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError, RecursionError, OverflowError,
                 RuntimeError, EOFError)


def _guarded(path: Path, parse: Callable[[], Any]) -> Any:
    """``parse()``, any parse exception turned into a FormatError naming ``path``."""
    try:
        return parse()
    except FormatError:
        raise
    except _PARSE_ERRORS as e:
        raise FormatError(f"{path}: malformed header ({type(e).__name__}: {e!s:.200})") from None


def read(path: Path, verify: bool = True) -> dict[str, Any]:
    """Load a checkpoint file: ``{"format", "info", "meta", "state", "bytes"}``.

    Format 2: every tensor piece's crc32 is checked while the file is read (``verify=False``
    checks footer, header and layout only). Raises FormatError, naming the damage, for any file
    that is not intact. Format 1 files are parsed as before (integrity: the manifest's sha256).
    """
    import torch

    path = Path(path)
    if file_format(path) == 1:
        return cast("dict[str, Any]", _guarded(path, lambda: _read_v1(path)))
    with open_regular(path, buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        header, data_end = _guarded(path, lambda: _read_header(f, path, size))
        nodes = _guarded(path, lambda: _tensor_nodes(header["state"], path, data_end))
        _guarded(path, lambda: _check_dtypes(nodes, path))
        # Every tensor gets its own storage and its bytes are read straight into it: no second copy,
        # and, like torch.load, allocations a long-lived process can serve from memory it already
        # has (one 1 GB buffer would be fresh pages, faulted in, every time). The reads are done by
        # the pool's threads, each a contiguous share of the file, each checking the crc32s of what
        # it read: page faults, copies out of the page cache and crc32s run on every core at once.
        bufs = {id(n): torch.empty(n[3], dtype=torch.uint8) for n in nodes}
        # numpy's stubs give ndarray no __buffer__ before Python 3.12, though it has the buffer protocol
        views = {k: memoryview(t.numpy()) if t.numel() else memoryview(bytearray())  # type: ignore[arg-type]
                 for k, t in bufs.items()}
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
            "state": _guarded(path, lambda: _decode(header["state"], tensor, path)), "bytes": size}


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

    with open_regular(path) as f:
        data = f.read()
    if len(data) < len(MAGIC_V1) + _LEN.size:
        raise FormatError(f"{path}: truncated header")
    (n,) = _LEN.unpack_from(data, len(MAGIC_V1))
    start = len(MAGIC_V1) + _LEN.size
    if n > MAX_HEADER or start + n > len(data):
        raise FormatError(f"{path}: truncated or corrupt header")
    tree = _parse_json(data[start:start + n], path)
    payload = memoryview(data)[start + n:]
    nodes: list[list[Any]] = []
    _collect(tree, nodes)
    for node in nodes:
        if not (isinstance(node, list) and len(node) == 4 and is_count(node[2]) and is_count(node[3])):
            raise FormatError(f"{path}: tensor entry {node!r:.80} is not [dtype, shape, offset, nbytes]")
    end = 0
    for node in sorted(nodes, key=lambda u: (u[2], u[3])):  # each tensor is copied: no overlaps, no blow-up
        if node[2] < end or node[2] + node[3] > len(payload):
            raise FormatError(f"{path}: tensor entry {node!r:.80} out of range or overlapping (a damaged file)")
        end = node[2] + node[3]

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
