"""Durable, self-verifying, asynchronous checkpoints of the whole training state.

Protocol (after torchtitan's checkpoint component): the trainer hands :meth:`CheckpointManager.save`
a nested dict of state dicts (model, optimizer, scheduler, RNG states, counters) plus metadata.
The manager

1. *snapshots* it at the step boundary -- every tensor copied to host memory (pinned on CUDA) --
   so training can go on mutating its parameters while the copy is written (a blocking save of a
   host state skips the copy: nothing runs meanwhile); a state with a NaN or inf in any floating
   tensor is refused here, before anything is written (:mod:`foldhpc.resilience.nonfinite`);
2. writes it (in a background thread, at most one save in flight) to a temporary name, fsyncs,
   renames it to ``step_XXXXXXXX.ckpt`` and fsyncs the directory. **The rename is the commit**:
   a file only ever appears under its final name once it is complete, and every file verifies
   itself (footer, header crc32, a crc32 per 8 MiB of tensor data; :mod:`foldhpc.checkpoint.fileformat`);
3. then updates ``manifest.json``, an *index* of the files (step, commit sequence number, size,
   state digest, reason, write time), replaced atomically. The index is never the only copy of
   anything: a missing or corrupt manifest, or a file missing from it (a crash between rename and
   index update), is rebuilt from the files' own headers, loudly, and never shortened.

Which checkpoint is "the newest" is decided by commit order (``seq``), not by step number: after
``--resume`` of an older checkpoint, the new line of checkpoints is newer than the abandoned one
even though its steps are lower. Pruning keeps the ``keep_last`` newest *good* checkpoints and
deletes the rest only after a newer one is committed; files found bad (truncated, corrupted) are
never counted as kept and are deleted at the next commit -- if they are still the file that was
found bad (same inode, size and mtime): one that was replaced meanwhile is judged afresh. A file
that is missing, unreadable (I/O errors), not a regular file, or of a newer format than this
foldhpc reads is *not* bad and is never deleted (a network file system may hide a file for a
moment; an older foldhpc must not destroy a newer one's checkpoints). Loading walks the index
newest first and uses the first file that verifies and parses -- the format holds no pickle, so a
checkpoint can never run code -- logging loudly for each one it has to skip.

The directory's contents are input, not trusted: the index's entries are type-checked and their
names must be ``step_<digits>.ckpt`` (:data:`CHECKPOINT_NAME`), so loading and pruning never
touch a path outside the directory; an index that fails any check is rebuilt from the files.
Only regular files are ever opened (a FIFO named like a checkpoint would block forever).

Several ranks. With DDP the state is replicated, so rank 0 alone owns a manager that writes;
the other ranks only load (the file rank 0 picked, see ``Trainer._restore``), and every rank
waits for the commit of a checkpoint it is about to exit on. A file holds no rank count (the
header's meta records ``world_size`` for the log), so a checkpoint written by N ranks resumes
on M. Sharded state (FSDP through ``torch.distributed.checkpoint``) fits the same run directory
without a layout change: one checkpoint becomes a *directory* ``step_XXXXXXXX.dcp/`` of per-rank
shards written under a temporary name by every rank and renamed by rank 0 after a barrier (the
rename is still the commit), indexed in the same ``manifest.json`` with its own format field;
loading dispatches on the suffix. Nothing of that exists yet: only replicated state is written.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import errno
import gc
import hashlib
import json
import logging
import math
import os
import queue
import re
import shutil
import socket
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Union

from foldhpc import faults
from foldhpc.checkpoint import fileformat
from foldhpc.checkpoint.digest import tree_digest
from foldhpc.checkpoint.errors import CheckpointError  # noqa: F401 - defined there without torch
from foldhpc.records.envvars import WRITE_DELAY
from foldhpc.records.events import EventSink, NullEventLog
from foldhpc.records.layout import MANIFEST_FILE
from foldhpc.records.fsio import PRIVATE_DIR_MODE, atomic_write_text, fsync_dir, pid_alive

if TYPE_CHECKING:  # torch is imported where state is staged or loaded: listing checkpoints (foldhpc
    import torch   # status, foldhpc checkpoints) reads the manifest and file headers only

log = logging.getLogger(__name__)

MANIFEST_VERSION = 2
MAX_MANIFEST = 16 << 20  # bytes: an index of ~300 bytes per checkpoint; anything bigger is not one
# The only names ever indexed, loaded or deleted: a plain name (no "/", no "..") in this directory.
CHECKPOINT_NAME = re.compile(r"step_[0-9]{8,}\.ckpt")
# --no-resume moves the old checkpoints into <dir>/old-<time>-<n>/: a subdirectory, so neither
# indexing nor pruning (top level only) ever sees them again.
ASIDE_PREFIX = "old-"
FORMAT_VERSION = fileformat.FORMAT
STALE_TMP_S = 3600.0  # a temporary file this old is a dead writer's, whoever wrote it
# Debug hook for tests (foldhpc.faults): seconds every write sleeps before its rename (keeps a
# save "in flight").
WRITE_DELAY_ENV = WRITE_DELAY

StateSource = Union[dict[str, Any], Callable[[], dict[str, Any]]]


@dataclass
class CheckpointEntry:
    """One committed checkpoint, as recorded in the index (and in the file's own header)."""

    file: str
    step: int
    bytes: int = 0
    saved_at: float = 0.0
    digest: str = ""
    reason: str = ""
    write_s: float = 0.0  # seconds the write took
    seq: int = 0  # commit order within the directory: the highest is the newest
    format: int = FORMAT_VERSION
    sha256: str = ""  # format 1 only: its integrity check lives in the manifest

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CheckpointEntry":
        """An index entry, every field type-checked; ValueError naming the field if one is wrong
        (the caller then rebuilds the index from the files)."""
        for key in ("file", "step"):
            if key not in d:
                raise ValueError(f"entry {d!r:.100} has no {key!r}")
        for key, value in d.items():
            check = _ENTRY_FIELDS.get(key)
            if check is not None and not check[0](value):
                raise ValueError(f"entry {d.get('file')!r:.60}: {key} = {value!r:.60} is not {check[1]}")
        return cls(**{k: v for k, v in d.items() if k in _ENTRY_FIELDS})

    @classmethod
    def from_header(cls, file: str, header: dict[str, Any]) -> "CheckpointEntry":
        info = header["info"]
        return cls(file=file, step=int(info["step"]), bytes=int(header["bytes"]), saved_at=float(info["saved_at"]),
                   digest=str(info.get("digest", "")), reason=str(info.get("reason", "")),
                   write_s=float(info.get("write_s", 0.0)), seq=int(info["seq"]), format=int(header["format"]))


def _is_duration(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0


# Each field of CheckpointEntry: (check, what it must be). The manifest is edited by hand, copied
# between runs and written by other versions: a wrong type here would crash train, status and
# checkpoints (a str seq cannot be sorted with ints, a str size cannot be shown in MiB).
_ENTRY_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "file": (lambda v: isinstance(v, str) and CHECKPOINT_NAME.fullmatch(v) is not None,
             "a checkpoint file name step_XXXXXXXX.ckpt in the checkpoint directory"),
    "step": (fileformat.is_count, "a non-negative integer"),
    "bytes": (fileformat.is_count, "a non-negative integer"),
    "saved_at": (fileformat.is_timestamp, "a time in seconds since 1970"),
    "digest": (lambda v: isinstance(v, str), "a string"),
    "reason": (lambda v: isinstance(v, str), "a string"),
    "write_s": (_is_duration, "a duration in seconds"),
    "seq": (fileformat.is_count, "a non-negative integer"),
    "format": (lambda v: fileformat.is_count(v) and v >= 1, "a format number"),
    "sha256": (lambda v: isinstance(v, str), "a string"),
}
assert set(_ENTRY_FIELDS) == {f.name for f in dataclasses.fields(CheckpointEntry)}

Identity = tuple[int, int, int, int]


def _identity(path: Path) -> Identity | None:
    """(device, inode, size, mtime) of ``path``, None if it cannot be stat'ed: what a file found bad
    must still be when it is deleted (a file replaced or rewritten since is judged afresh)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _free_name(directory: Path, name: str) -> Path:
    """``directory/name``, or ``name-2``, ``name-3``... if taken: two in the same second must not
    overwrite each other."""
    path, n = directory / name, 1
    while os.path.lexists(path):
        n += 1
        path = directory / f"{name}-{n}"
    return path


@dataclass
class LoadedCheckpoint:
    entry: CheckpointEntry
    path: Path
    state: dict[str, Any]
    meta: dict[str, Any]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why) newer ones not used


def sha256_file(path: Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with fileformat.open_regular(path) as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


PASS_THROUGH_MIN_BYTES = 1 << 20  # host tensors at least this big are written in place, not copied


def snapshot(obj: Any, pin: bool = False, staging: dict[str, torch.Tensor] | None = None, _path: str = "",
             *, devices: set[torch.device] | None = None, copy_small_host: bool = True) -> Any:
    """The nested state with every tensor on the host, detached from training, ready to write.

    Device tensors are copied into host buffers (pinned on CUDA, non-blocking); with a ``staging``
    dict the buffers are kept from one save to the next (same path, shape and dtype), which avoids
    allocating and page-faulting fresh memory each time. Small host tensors are copied too (they
    are cheap, and some, like AdamW's ``step``, change in place every step). Large host tensors are
    passed through uncopied: the write itself copies them into the page cache, once, instead of a
    staging copy and then a write (half the memory traffic and no second 1 GB of RAM on a CPU run).
    A blocking save passes ``copy_small_host=False``: nothing runs until it is written.
    ``devices`` collects every device read from -- each CUDA device must be synchronized before its
    buffers are read (a copy on cuda:1 is not finished when cuda:0 is), and ``cpu`` in it means live
    host tensors are referenced: they must not change until the write has read them. The caller
    must not reuse ``staging`` while a write still reads it.
    """
    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.device.type == "cpu" and (not copy_small_host or t.numel() * t.element_size() >= PASS_THROUGH_MIN_BYTES):
            if devices is not None:
                devices.add(t.device)
            return t
        if t.device.type == "cuda" and devices is not None:
            devices.add(t.device)
        buf = staging.get(_path) if staging is not None else None
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin and t.device.type != "cpu")
            if staging is not None:
                staging[_path] = buf
        buf.copy_(t, non_blocking=pin and t.device.type != "cpu")
        return buf
    if isinstance(obj, dict):
        return {k: snapshot(v, pin, staging, f"{_path}/{k}", devices=devices, copy_small_host=copy_small_host)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        if not any(isinstance(v, (torch.Tensor, dict, list, tuple)) for v in obj):
            return list(obj) if isinstance(obj, list) else obj  # e.g. python's RNG state: 625 ints
        out = [snapshot(v, pin, staging, f"{_path}[{i}]", devices=devices, copy_small_host=copy_small_host)
               for i, v in enumerate(obj)]
        return out if isinstance(obj, list) else tuple(out)
    return obj  # ints, floats, str, None, bool: immutable


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the duration (restored as it was, also on error).

    Saving a trainer state makes tens of thousands of short-lived objects (a view, a header node
    and a checksum slice per tensor: 10,410 tensors for configs/large.toml + AdamW), enough to set
    off several collections, each walking the whole heap of the process: 0.25-0.35 s of a 1.2 s
    save here. Used for saves written in place (blocking, or ``async_save=False``), where the
    training thread waits anyway; the garbage is the same, collected after. Not around background
    writes: those overlap training, whose cycles must not wait seconds for a collection.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class CheckpointManager:
    """Saves and restores training state under one directory; see the module docstring."""

    def __init__(self, directory: Path, keep_last: int = 3, async_save: bool = True,
                 owner_check: Callable[[], None] | None = None, events: EventSink | None = None) -> None:
        self.dir = Path(directory)
        self.keep_last = keep_last
        self.async_save = async_save
        # Raises if this process no longer owns the directory (the run lock was taken over:
        # RunLock.verify); called before a commit and before pruning, so a save in flight then
        # neither becomes the new owner's newest checkpoint nor deletes its files.
        self.owner_check = owner_check
        # events.jsonl of the run (foldhpc.records.events): a manager of a tool or a test has no run
        # directory, so by default nothing is recorded. Emitted beside the log line that says the same.
        self.events: EventSink = events if events is not None else NullEventLog()
        # One long-lived writer thread fed by a queue: starting a thread per save costs a GIL
        # handshake of several ms on the training thread.
        self._worker: threading.Thread | None = None
        self._jobs: queue.SimpleQueue[tuple[int, StateSource, dict[str, Any], str] | None] = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._staged = threading.Event()  # the job in flight has copied its state
        self._staged.set()
        self._lock = threading.Lock()
        self._error: BaseException | None = None  # of the last background save, reported once
        self._staging: dict[str, torch.Tensor] = {}  # host buffers reused by every snapshot
        # file -> (why, identity when found bad): found bad by this process, deleted at the next
        # commit if it is still that file
        self._bad: dict[str, tuple[str, Identity | None]] = {}
        self._write_delay = faults.seconds(WRITE_DELAY_ENV)
        self.last_committed: CheckpointEntry | None = None

    # ------------------------------------------------------------------ preflight
    def preflight(self, estimated_bytes: int, min_free_bytes: int = 0) -> None:
        """Fail now, not after hours of training, if checkpoints cannot be written.

        Probes every operation a save needs: create, write, fsync, rename over a final name,
        fsync of the directory (some FUSE and object-store mounts fail only at the rename).
        """
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"cannot create checkpoint directory {self.dir}: {e.strerror}. "
                                  "Set checkpoint.dir to a writable, persistent location.") from None
        self.remove_stale_temporaries()
        probe = self.dir / self._tmp_name(".preflight")
        final = self.dir / f".preflight-{socket.gethostname()}-{os.getpid()}"
        try:
            with open(probe, "wb") as f:
                f.write(b"\0" * min(estimated_bytes, 1 << 20))
                f.flush()
                os.fsync(f.fileno())
            os.replace(probe, final)
            fsync_dir(self.dir)
            final.unlink()
        except OSError as e:
            for p in (probe, final):
                try:
                    p.unlink(missing_ok=True)
                except OSError:
                    pass
            raise CheckpointError(f"checkpoint directory {self.dir} cannot be used for checkpoints "
                                  f"(write, fsync, rename and directory fsync are all needed): {e.strerror or e}. "
                                  "Set checkpoint.dir to a writable, persistent location.") from None
        need = max(min_free_bytes, 3 * estimated_bytes)
        free = shutil.disk_usage(self.dir).free
        if free < need:
            raise CheckpointError(
                f"checkpoint directory {self.dir} has {free / 2**20:.1f} MiB free, needs {need / 2**20:.1f} MiB "
                f"(3 checkpoints of ~{estimated_bytes / 2**20:.1f} MiB, or checkpoint.min_free_mb). "
                "Free space or point checkpoint.dir elsewhere.")

    @staticmethod
    def _tmp_name(name: str) -> str:
        return f".{name}.tmp-{socket.gethostname()}-{os.getpid()}"

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete temporary files of writers that are gone (a full-size file each on scratch).

        A temporary file is stale if its writer ran on this host and is no longer alive, or if it
        is older than STALE_TMP_S (no write takes that long; covers other hosts and format-1 names).
        """
        host, removed = socket.gethostname(), []
        now = time.time()
        for p in self.dir.glob(".*.tmp-*"):
            tag = p.name.rsplit(".tmp-", 1)[1]
            who, _, pid = tag.rpartition("-")
            try:
                mine_dead = who == host and pid.isdigit() and not pid_alive(int(pid))
                if mine_dead or now - p.stat().st_mtime > STALE_TMP_S:
                    size = p.stat().st_size
                    p.unlink()
                    removed.append(p)
                    log.warning("removed stale temporary checkpoint file %s (%.1f MiB, from a writer that died)",
                                p, size / 2**20)
                    self.events.emit("checkpoint_stale_tmp", path=str(p), bytes=size)
            except OSError:
                continue
        return removed

    # ------------------------------------------------------------------ starting over
    def move_aside(self) -> Path | None:
        """``--no-resume``: move the checkpoints and the index into ``<dir>/old-<time>-<n>/``.

        By rename only, inside the directory itself: the directory may be a mount point or a
        symlink to scratch (it must stay one), and a copy to another file system of what may be
        hundreds of GB is never what a user asked for. A subdirectory is never indexed or pruned
        (both look at the top level only), so the old files are kept until a person removes them.
        Returns the folder they went into, or None if there was nothing to move. Raises
        CheckpointError (a usage error: exit 2) if a rename fails -- a file that is a mount point
        (EBUSY), on another file system (EXDEV), not permitted -- after moving back what was moved.
        """
        if not self.dir.is_dir():
            return None
        names = sorted(p.name for p in self.dir.iterdir()
                       if CHECKPOINT_NAME.fullmatch(p.name) or p.name == MANIFEST_FILE
                       or p.name.startswith(f"{MANIFEST_FILE}.corrupt-"))
        if not names:
            return None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        n = 1
        while True:  # mkdir is the claim: a unique name even for two starts in the same second
            aside = self.dir / f"{ASIDE_PREFIX}{stamp}-{n}"
            try:
                aside.mkdir(mode=PRIVATE_DIR_MODE)
                break
            except FileExistsError:
                n += 1
            except OSError as e:
                raise CheckpointError(f"--no-resume: cannot create {aside} to move the old checkpoints of {self.dir} "
                                      f"into: {e.strerror or e}. Move them away yourself, or set checkpoint.dir to "
                                      "an empty directory.", damaged=False) from None
        moved: list[str] = []
        try:
            for name in names:
                os.rename(self.dir / name, aside / name)  # never shutil.move: it would copy instead
                moved.append(name)
            fsync_dir(aside)
            fsync_dir(self.dir)
        except OSError as e:
            for name in reversed(moved):  # leave the directory as it was
                try:
                    os.rename(aside / name, self.dir / name)
                except OSError:
                    log.error("--no-resume: could not move %s back to %s", aside / name, self.dir)
            try:
                aside.rmdir()
            except OSError:
                pass
            why = {errno.EBUSY: " (it is a mount point or in use)",
                   errno.EXDEV: " (it is on another file system)"}.get(e.errno or 0, "")
            raise CheckpointError(
                f"--no-resume: cannot move {self.dir / (names[len(moved)] if len(moved) < len(names) else '')} "
                f"aside into {aside}: {e.strerror or e}{why}; nothing was moved or deleted. Move or delete the old "
                f"checkpoints in {self.dir} yourself, or set checkpoint.dir to an empty directory, then run "
                "again.", damaged=False) from None
        log.warning("--no-resume: moved %d existing checkpoint file(s) of %s aside into %s (kept, never indexed or "
                    "deleted by foldhpc)", len(names), self.dir, aside)
        return aside

    # ------------------------------------------------------------------ saving
    @property
    def in_flight(self) -> bool:
        return not self._idle.is_set()

    def save(self, step: int, state: StateSource, meta: dict[str, Any], *,
             reason: str = "", blocking: bool = False) -> bool:
        """Snapshot ``state`` and write it (in the background unless ``blocking``).

        ``state`` is the nested state dict, or a function returning it. In the background case the
        function is called and its tensors staged (see :func:`snapshot`) and written by the writer
        thread, overlapping the next forward/backward pass, which does not modify parameters or
        optimizer state; the training loop calls :meth:`wait_staged` before its next
        ``optimizer.step()``, so what is written is exactly the state at this step boundary. Anything that changes between steps (RNG states,
        counters) must already be captured when ``save`` is called.

        Returns False (and saves nothing) if an asynchronous save is still in flight and
        ``blocking`` is False: the caller tries again at a later step boundary.

        Errors: a *blocking* save raises CheckpointError if its own write fails (the caller needs
        this state durable, e.g. before exiting on a signal); an earlier background save's failure
        is not its failure and stays for :meth:`poll_error`. A non-blocking save that fails
        (background, or written in place with ``async_save=False``) is logged and reported by
        :meth:`poll_error`; training goes on and the previous checkpoint is kept.
        """
        if self.in_flight:
            if not blocking:
                return False
            self.wait()
        if blocking or not self.async_save:  # written on this thread, nothing runs meanwhile
            try:
                with gc_paused():
                    self._stage_and_write(step, state, dict(meta, step=step), reason, in_place=True)
            except Exception as e:  # noqa: BLE001 - logged by _write
                if blocking:
                    raise CheckpointError(f"checkpoint at step {step} failed: {e}") from e
                self._error = e  # reported by poll_error; training goes on
            return True
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._work, name="ckpt-writer", daemon=True)
            self._worker.start()
            atexit.register(self.wait)  # a daemon thread: never let interpreter exit cut a write short
        log.info("checkpoint step %d: staging and writing in the background (%s)", step, reason or "save")
        self.events.emit("checkpoint_staged", step=step, reason=reason or "save")
        self._idle.clear()
        self._staged.clear()
        self._jobs.put((step, state, dict(meta, step=step), reason))
        return True

    def wait_staged(self, timeout: float | None = None) -> bool:
        """Block until the save in flight no longer reads the live state (call before mutating it);
        False if ``timeout`` seconds passed first."""
        return self._staged.wait(timeout)

    def wait(self) -> None:
        """Block until the save in flight (if any) is durable or has failed."""
        self._idle.wait()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                self._stage_and_write(*job)
            except BaseException as e:  # noqa: BLE001 - reported to the training thread
                self._error = e
            finally:
                self._staged.set()
                self._idle.set()

    def _stage_and_write(self, step: int, state: StateSource, meta: dict[str, Any], reason: str,
                         in_place: bool = False) -> None:
        """Stage the state (see :func:`snapshot`) and write it; signals ``_staged`` as soon as the
        training thread may change its tensors again: after the device copies, or -- when live host
        tensors are written in place -- once the write has read them (before the fsync)."""
        import torch

        from foldhpc.checkpoint.finite import nonfinite_tensors

        try:
            live = state() if callable(state) else state
            # snapshot pins (and copies non-blocking) only the buffers of CUDA tensors
            pin = torch.cuda.is_available() and torch.cuda.is_initialized()  # type: ignore[no-untyped-call]  # torch: unannotated
            devices: set[torch.device] = set()
            # one save at a time, so the staging buffers are free
            snap = snapshot(live, pin=pin, staging=self._staging, devices=devices, copy_small_host=not in_place)
            for dev in devices:
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
        except BaseException as e:  # noqa: BLE001 - reported like a failed write
            log.error("checkpoint at step %d FAILED while copying the state: %s", step, e)
            self.events.emit("checkpoint_failed", step=step, error=str(e), phase="staging")
            self._staged.set()
            raise
        if not any(d.type == "cpu" for d in devices):
            self._staged.set()
        try:
            # Never a checkpoint with NaN/inf in it: it would become "the newest good checkpoint"
            # that every resume and rollback goes back to. Checked on what is about to be written
            # (host copies, or the live host tensors a blocking save writes in place).
            bad = nonfinite_tensors(snap)
            if bad:
                log.error("checkpoint at step %d REFUSED: non-finite values in %s; nothing written, previous "
                          "checkpoint kept", step, "; ".join(bad))
                self.events.emit("checkpoint_failed", step=step, phase="refused",
                                 error=f"refused: non-finite values in {'; '.join(bad)}")
                raise CheckpointError(f"refused: the state holds non-finite values ({'; '.join(bad)}); nothing "
                                      "was written, the previous checkpoint is kept", damaged=False)
            self._write(step, snap, meta, reason)
        finally:
            self._staged.set()

    def poll_error(self) -> BaseException | None:
        """The error of a finished non-blocking save, returned once; None if all went well."""
        if self.in_flight:
            return None
        err, self._error = self._error, None
        return err

    def _write(self, step: int, state: dict[str, Any], meta: dict[str, Any], reason: str) -> CheckpointEntry:
        t0 = time.monotonic()
        name = f"step_{step:08d}.ckpt"
        final = self.dir / name
        tmp = self.dir / self._tmp_name(name)
        try:
            seq = max((e.seq for e in self.entries()), default=0) + 1
            info: dict[str, Any] = {"step": step, "seq": seq, "reason": reason, "saved_at": time.time()}
            with open(tmp, "wb") as f:
                header = fileformat.write(f, state, meta, info, digest_of=tree_digest, data_done=self._staged.set)
                f.flush()
                os.fsync(f.fileno())
            if self._write_delay:
                time.sleep(self._write_delay)
            if self.owner_check is not None:
                self.owner_check()
            os.replace(tmp, final)  # the commit: complete files only ever appear under their final name
            fsync_dir(self.dir)
        except BaseException as e:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            log.error("checkpoint at step %d FAILED, previous checkpoint kept: %s", step, e)
            self.events.emit("checkpoint_failed", step=step, error=str(e), phase="write")
            raise
        entry = CheckpointEntry(file=name, step=step, bytes=header["bytes"], saved_at=info["saved_at"],
                                digest=header["info"]["digest"], reason=reason,
                                write_s=round(time.monotonic() - t0, 4), seq=seq)
        self.last_committed = entry
        try:
            self._index_commit(entry)
        except OSError as e:  # the checkpoint is durable: the index is only an index
            # Failing here would report a committed checkpoint as lost (an exit save: 1, not 75)
            # although every resume finds it: the index is rebuilt from the files' own headers.
            # Only file-system errors: a lost run lock (owner_check) still propagates.
            log.warning("checkpoint step %d is committed (%s) but updating the index %s or pruning failed: %s; "
                        "the index is rebuilt from the files at the next save or start", step, final,
                        self.dir / MANIFEST_FILE, e)
        log.info("checkpoint step %d saved (%s, %.1f MiB, %.2fs) -> %s", step, reason or "save",
                 entry.bytes / 2**20, entry.write_s, final)
        self.events.emit("checkpoint_committed", step=step, reason=reason or "save", bytes=entry.bytes,
                         write_s=entry.write_s, path=str(final), file=name, seq=seq, digest=entry.digest)
        return entry

    def _index_commit(self, entry: CheckpointEntry) -> None:
        """Record a committed file in the index and prune: keep the ``keep_last`` newest good ones."""
        with self._lock:
            if self.owner_check is not None:
                self.owner_check()
            entries, problem = self._index(committing=entry.file)
            entries = [e for e in entries if e.file != entry.file] + [entry]
            self._bad.pop(entry.file, None)
            for f, (why, ident) in list(self._bad.items()):
                if _identity(self.dir / f) != ident:  # replaced, rewritten or gone since: not known bad
                    del self._bad[f]
                    log.info("checkpoint %s was found bad (%s) but has changed since; judged afresh", f, why)
            # A newer foldhpc's checkpoints (listed by its index) are neither counted nor deleted here.
            foreign = [e for e in entries if e.format > FORMAT_VERSION and (self.dir / e.file).exists()]
            good = [e for e in entries if e.format <= FORMAT_VERSION and e.file not in self._bad
                    and (self.dir / e.file).is_file()]
            keep = good[-self.keep_last:]
            if problem and (self.dir / MANIFEST_FILE).exists():
                aside = _free_name(self.dir, f"{MANIFEST_FILE}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
                os.replace(self.dir / MANIFEST_FILE, aside)
                log.error("checkpoint index %s was %s; kept it as %s and wrote a new one from the files",
                          self.dir / MANIFEST_FILE, problem, aside.name)
            self._write_manifest(sorted(keep + foreign, key=lambda e: (e.seq, e.saved_at)))  # matches the files
            kept = {e.file for e in keep + foreign}
            for e in entries:
                if e.file not in kept:
                    self._prune(e, entry.step)

    def _prune(self, e: CheckpointEntry, durable_step: int) -> None:
        """Delete the file of an entry that is not kept, if it is still ours to delete.

        Only names matching CHECKPOINT_NAME, directly in this directory; only regular files; a file
        found bad only if it is still the file that was found bad. A failure is logged, not raised:
        the new checkpoint is committed whatever happens to the old ones.
        """
        bad = self._bad.pop(e.file, None)
        if not CHECKPOINT_NAME.fullmatch(e.file):  # never reached: entries are checked when read
            log.error("not deleting %r: not a checkpoint name in %s", e.file, self.dir)
            return
        path = self.dir / e.file
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            log.warning("dropped index entry %s (step %d): its file is missing", e.file, e.step)
            return
        except OSError as err:
            log.warning("not pruning checkpoint %s: %s", path, err.strerror or err)
            return
        if not stat.S_ISREG(st.st_mode):
            log.warning("not pruning %s: not a regular file", path)
            return
        try:
            path.unlink()
        except OSError as err:
            log.warning("could not prune checkpoint %s: %s", path, err.strerror or err)
            return
        if bad:
            log.warning("deleted bad checkpoint %s (%s) now that step %d is durable", e.file, bad[0], durable_step)
            self.events.emit("checkpoint_deleted", path=e.file, reason=bad[0], step=e.step, durable_step=durable_step)
        else:
            log.info("pruned checkpoint %s (step %d; keep_last=%d)", e.file, e.step, self.keep_last)
            self.events.emit("checkpoint_pruned", path=e.file, step=e.step, keep_last=self.keep_last)

    # ------------------------------------------------------------------ index
    def _read_manifest(self) -> list[CheckpointEntry]:
        """The index's entries; ValueError (or OSError) if anything in it is not as written."""
        with fileformat.open_regular(self.dir / MANIFEST_FILE) as f:  # a FIFO must not block status
            raw = f.read(MAX_MANIFEST + 1)
        if len(raw) > MAX_MANIFEST:
            raise ValueError(f"over {MAX_MANIFEST >> 20} MiB")
        data = json.loads(raw)
        if not isinstance(data, dict) or not isinstance(data.get("checkpoints"), list):
            raise ValueError("not a foldhpc manifest")
        version = data.get("version", 1)
        entries, seen = [], set()
        for d in data["checkpoints"]:
            if not isinstance(d, dict):
                raise ValueError(f"bad entry {d!r:.100}")
            entry = CheckpointEntry.from_dict(dict(d, format=d.get("format", 1 if version == 1 else 2)))
            if entry.file in seen:
                raise ValueError(f"lists {entry.file} twice")
            seen.add(entry.file)
            entries.append(entry)
        return entries

    def _write_manifest(self, entries: list[CheckpointEntry]) -> None:
        """Replace the index atomically (readers see the old or the new one). Not fsynced: the
        checkpoint file is already durable and the index is rebuilt from it if this write is lost,
        so two more fsyncs per save would buy nothing."""
        doc = {"version": MANIFEST_VERSION, "checkpoints": [dataclasses.asdict(e) for e in entries]}
        atomic_write_text(self.dir / MANIFEST_FILE, json.dumps(doc, indent=1) + "\n", fsync=False)

    def _index(self, committing: str = "") -> tuple[list[CheckpointEntry], str | None]:
        """(entries oldest first, what was wrong with the manifest or None).

        The manifest's entries plus every ``step_*.ckpt`` it does not list, indexed from the
        file's own header: such a file is complete (files appear only under their final name once
        written) -- a crash between the rename and the index update, or a lost manifest.
        """
        problem: str | None = None
        try:
            listed = self._read_manifest()
        except FileNotFoundError:
            listed, problem = [], None
        except (OSError, ValueError, TypeError, RecursionError) as e:
            listed, problem = [], f"corrupt ({e})"
        known = {e.file for e in listed}
        extra: list[CheckpointEntry] = []
        for p in sorted(self.dir.glob("step_*.ckpt")):  # top level only: never the moved-aside old-*/
            if p.name in known or p.name == committing:
                continue
            if not CHECKPOINT_NAME.fullmatch(p.name):
                log.warning("%s is not named like a foldhpc checkpoint (step_XXXXXXXX.ckpt); ignored", p)
                continue
            ident = _identity(p)  # before reading: what is deleted later must be what was read now
            try:
                extra.append(CheckpointEntry.from_header(p.name, fileformat.read_header(p)))
            except fileformat.NotRegularFile as e:
                log.warning("%s is %s; ignored (never read, never deleted)", p, e.strerror)
            except OSError as e:  # I/O, not damage: maybe readable later; never marked bad
                log.error("checkpoint %s cannot be read now (%s); not used", p, e.strerror or e)
            except fileformat.UnknownFormat as e:
                log.warning("checkpoint %s", e)
            except (fileformat.FormatError, KeyError, TypeError, ValueError) as e:
                try:
                    v1 = fileformat.file_format(p) == 1
                except (OSError, fileformat.FormatError):
                    v1 = False
                if v1:
                    log.warning("checkpoint %s (format 1, foldhpc 0.1) is not in the index and cannot verify "
                                "itself; not used automatically. Use --resume %s to load it anyway.", p, p)
                else:
                    why = str(e).removeprefix(f"{p}: ")
                    self._bad[p.name] = (f"unreadable: {why}", ident)
                    log.error("CHECKPOINT %s IS BAD and not in the index: %s", p, why)
        newest_listed = max((e.seq for e in listed), default=-1)
        newer = [e for e in extra if e.seq > newest_listed]
        if extra and (problem or newer or not (self.dir / MANIFEST_FILE).exists()):
            if not (self.dir / MANIFEST_FILE).exists():
                how = "is missing"
            elif problem:
                how = f"is {problem}"
            else:
                how = "does not list them (a save was interrupted after its rename)"
            log.error("checkpoint index %s %s: indexed %d checkpoint file(s) from their own headers: %s",
                      self.dir / MANIFEST_FILE, how, len(extra), ", ".join(e.file for e in extra))
        elif extra:  # all older than the newest listed: the index was written, the pruning after it cut short
            log.info("checkpoint index %s does not list %d older checkpoint file(s) (pruning was interrupted, or a "
                     "file was briefly invisible): indexed them from their own headers: %s", self.dir / MANIFEST_FILE,
                     len(extra), ", ".join(e.file for e in extra))
        elif problem:
            log.error("checkpoint index %s is %s and there are no checkpoint files to rebuild it from",
                      self.dir / MANIFEST_FILE, problem)
        entries = sorted(listed + extra, key=lambda e: (e.seq, e.saved_at))
        return entries, problem

    def entries(self) -> list[CheckpointEntry]:
        """Committed checkpoints, oldest first (by commit order); empty if none.

        Never fails because of the manifest: see :meth:`_index`.
        """
        if not self.dir.is_dir():
            return []
        return self._index()[0]

    # ------------------------------------------------------------------ loading
    def _load_entry(self, entry: CheckpointEntry) -> dict[str, Any]:
        """Load and fully verify one indexed file; raises CheckpointError saying what is wrong."""
        path = self.dir / entry.file
        if not path.exists():  # not damage: a network file system may show it again later
            raise CheckpointError("file is missing", damaged=False)
        if entry.format == 1:
            try:
                digest = sha256_file(path)
            except OSError as e:
                raise CheckpointError(f"cannot be read: {e.strerror or e}", damaged=False) from None
            size = path.stat().st_size
            if size != entry.bytes:
                raise CheckpointError(f"size {size} != {entry.bytes} recorded (truncated or half-written)")
            if digest != entry.sha256:
                raise CheckpointError("sha256 mismatch (corrupted)")
        payload = self.load_file(path)
        if payload["format"] == 2 and int(payload["info"].get("step", -1)) != entry.step:
            raise CheckpointError(f"file holds step {payload['info'].get('step')}, index says {entry.step}")
        return payload

    def verify(self, entry: CheckpointEntry) -> str | None:
        """None if the file is intact (every checksum) and matches its index entry, else why not."""
        try:
            self._load_entry(entry)
        except CheckpointError as e:
            return str(e)
        return None

    def load_file(self, path: Path) -> dict[str, Any]:
        """Load a checkpoint file safely (no pickle, so no code can run), verifying every checksum.

        Returns ``{"format", "info", "meta", "state", "bytes"}``; raises CheckpointError naming
        the file and the damage.
        """
        try:
            payload = fileformat.read(path)
        except fileformat.UnknownFormat as e:
            raise CheckpointError(str(e), damaged=False) from None
        except fileformat.FormatError as e:
            raise CheckpointError(str(e)) from None
        except OSError as e:
            raise CheckpointError(f"{path}: cannot be read: {e.strerror or e}", damaged=False) from None
        if not isinstance(payload.get("state"), dict):
            raise CheckpointError(f"{path}: holds no training state")
        return payload

    def load_latest(self) -> LoadedCheckpoint | None:
        """Newest (by commit order) checkpoint that verifies and loads; None if there is none at all."""
        entries = self.entries()
        skipped: list[tuple[str, str]] = []
        for entry in reversed(entries):
            ident = _identity(self.dir / entry.file)  # before reading: see _index_commit
            try:
                payload = self._load_entry(entry)
            except CheckpointError as e:
                why = str(e).removeprefix(f"{self.dir / entry.file}: ")
                kind = "BAD" if e.damaged else "UNREADABLE" if ident is not None else "MISSING"
                log.error("CHECKPOINT %s (step %d) IS %s: %s -- falling back to the previous one",
                          entry.file, entry.step, kind, why)
                self.events.emit("checkpoint_rejected", path=entry.file, step=entry.step, problem=kind, reason=why)
                if e.damaged:
                    self._bad[entry.file] = (why, ident)
                skipped.append((entry.file, why))
                continue
            if payload["format"] == 2 and int(payload["info"]["seq"]) != entry.seq:
                entry = CheckpointEntry.from_header(entry.file, payload)  # the file's own record wins
            return LoadedCheckpoint(entry, self.dir / entry.file, payload["state"], payload["meta"], skipped)
        bad = [(f, w) for f, (w, _) in self._bad.items() if f not in dict(skipped)]
        if entries or bad:
            raise CheckpointError(
                f"no usable checkpoint in {self.dir}: " + "; ".join(f"{f}: {w}" for f, w in skipped + bad)
                + ". Use --resume PATH to choose a file, or --no-resume to start over (existing files are "
                "moved aside, not deleted).")
        return None
