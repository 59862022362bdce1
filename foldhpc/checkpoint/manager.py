"""Durable, verified, asynchronous checkpoints of the whole training state.

Protocol (after torchtitan's checkpoint component): the trainer hands :meth:`CheckpointManager.save`
a nested dict of state dicts (model, optimizer, scheduler, RNG states, counters) plus metadata.
The manager

1. *snapshots* it at the step boundary — every tensor copied to host memory (pinned on CUDA) —
   so training can go on mutating its parameters while the copy is written;
2. writes the snapshot in a background thread (at most one save in flight) to a temporary
   name, fsyncs, renames to ``step_XXXXXXXX.ckpt`` and fsyncs the directory (the file format,
   JSON header + raw tensor bytes, is in :mod:`foldhpc.checkpoint.fileformat`);
3. only then records the file, its size, sha256 and state digest in ``manifest.json``
   (itself replaced atomically). A file without a manifest entry was never committed.

Loading walks the manifest newest first and uses the first file whose size and sha256 match and
that parses — the format holds no pickle, so a checkpoint can never run code — and
logs loudly for each one it has to skip. Old checkpoints beyond ``keep_last`` are pruned only
after a newer one is committed.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import json
import logging
import os
import queue

import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

import torch

from foldhpc.checkpoint import fileformat
from foldhpc.checkpoint.digest import state_digest
from foldhpc.monitor.status import atomic_write_text, fsync_dir

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


StateSource = Union[dict[str, Any], Callable[[], dict[str, Any]]]


class CheckpointError(RuntimeError):
    """No usable checkpoint, or the checkpoint directory cannot be used."""


@dataclass
class CheckpointEntry:
    """One committed checkpoint, as recorded in the manifest."""

    file: str
    step: int
    sha256: str
    bytes: int
    saved_at: float
    digest: str
    reason: str = ""
    write_s: float = 0.0  # seconds the background write took

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CheckpointEntry":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class LoadedCheckpoint:
    entry: CheckpointEntry
    path: Path
    state: dict[str, Any]
    meta: dict[str, Any]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why) newer ones not used


def sha256_file(path: Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def snapshot(obj: Any, pin: bool = False, staging: dict[str, torch.Tensor] | None = None, _path: str = "") -> Any:
    """Deep copy of a nested state with every tensor on the host, detached from training.

    This is the only part of a save that runs on the training thread: a memory copy. With a
    ``staging`` dict the copies go into buffers kept from the previous save (same path, shape and
    dtype), which avoids allocating and page-faulting fresh memory each time — the bulk of the
    cost for a large state. The caller must not reuse ``staging`` while a write still reads it.
    """
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        buf = staging.get(_path) if staging is not None else None
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin and t.device.type != "cpu")
            if staging is not None:
                staging[_path] = buf
        buf.copy_(t, non_blocking=pin and t.device.type != "cpu")
        return buf
    if isinstance(obj, dict):
        return {k: snapshot(v, pin, staging, f"{_path}/{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        if not any(isinstance(v, (torch.Tensor, dict, list, tuple)) for v in obj):
            return list(obj) if isinstance(obj, list) else obj  # e.g. python's RNG state: 625 ints
        out = [snapshot(v, pin, staging, f"{_path}[{i}]") for i, v in enumerate(obj)]
        return out if isinstance(obj, list) else tuple(out)
    return obj  # ints, floats, str, None, bool: immutable


class CheckpointManager:
    """Saves and restores training state under one directory; see the module docstring."""

    def __init__(self, directory: Path, keep_last: int = 3, async_save: bool = True) -> None:
        self.dir = Path(directory)
        self.keep_last = keep_last
        self.async_save = async_save
        # One long-lived writer thread fed by a queue: starting a thread per save costs a GIL
        # handshake of several ms on the training thread.
        self._worker: threading.Thread | None = None
        self._jobs: queue.SimpleQueue[tuple[int, dict[str, Any], str] | None] = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._staged = threading.Event()  # the job in flight has copied its state
        self._staged.set()
        self._lock = threading.Lock()
        self._error: BaseException | None = None  # of the last background save, reported once
        self._staging: dict[str, torch.Tensor] = {}  # host buffers reused by every snapshot
        self.last_committed: CheckpointEntry | None = None

    # ------------------------------------------------------------------ preflight
    def preflight(self, estimated_bytes: int, min_free_bytes: int = 0) -> None:
        """Fail now, not after hours of training, if checkpoints cannot be written."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"cannot create checkpoint directory {self.dir}: {e.strerror}. "
                                  "Set checkpoint.dir to a writable, persistent location.") from None
        probe = self.dir / f".preflight-{os.getpid()}"
        try:
            with open(probe, "wb") as f:
                f.write(b"\0" * min(estimated_bytes, 1 << 20))
                f.flush()
                os.fsync(f.fileno())
            probe.unlink()
        except OSError as e:
            probe.unlink(missing_ok=True)
            raise CheckpointError(f"checkpoint directory {self.dir} is not writable: {e.strerror or e}. "
                                  "Set checkpoint.dir to a writable, persistent location.") from None
        need = max(min_free_bytes, 3 * estimated_bytes)
        free = shutil.disk_usage(self.dir).free
        if free < need:
            raise CheckpointError(
                f"checkpoint directory {self.dir} has {free / 2**20:.1f} MiB free, needs {need / 2**20:.1f} MiB "
                f"(3 checkpoints of ~{estimated_bytes / 2**20:.1f} MiB, or checkpoint.min_free_mb). "
                "Free space or point checkpoint.dir elsewhere.")

    # ------------------------------------------------------------------ saving
    @property
    def in_flight(self) -> bool:
        return not self._idle.is_set()

    def save(self, step: int, state: StateSource, meta: dict[str, Any], *,
             reason: str = "", blocking: bool = False) -> bool:
        """Snapshot ``state`` and write it (in the background unless ``blocking``).

        ``state`` is the nested state dict, or a function returning it. In the background case the
        function is called and its tensors copied to host memory by the writer thread, overlapping
        the next forward/backward pass, which does not modify parameters or optimizer state; the
        training loop calls :meth:`wait_staged` before its next ``optimizer.step()``, so the copy is
        exactly the state at this step boundary. Anything that changes between steps (RNG states,
        counters) must already be captured when ``save`` is called.

        Returns False (and saves nothing) if an asynchronous save is still in flight and
        ``blocking`` is False: the caller tries again at a later step boundary. A blocking save
        first waits for the one in flight, and raises if its own write fails.
        """
        if self.in_flight:
            if not blocking:
                return False
            self.wait()
        job = (step, state, dict(meta, step=step), reason)
        if blocking or not self.async_save:
            self._stage_and_write(*job)
            err, self._error = self._error, None
            if err is not None:
                raise CheckpointError(f"checkpoint at step {step} failed: {err}") from err
            return True
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._work, name="ckpt-writer", daemon=True)
            self._worker.start()
            atexit.register(self.wait)  # a daemon thread: never let interpreter exit cut a write short
        log.info("checkpoint step %d: staging and writing in the background (%s)", step, reason or "save")
        self._idle.clear()
        self._staged.clear()
        self._jobs.put(job)
        return True

    def wait_staged(self) -> None:
        """Block until the save in flight has copied the state (call before mutating it)."""
        self._staged.wait()

    def wait(self) -> None:
        """Block until the save in flight (if any) is durable or has failed."""
        self._idle.wait()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                self._stage_and_write(*job)
            finally:
                self._staged.set()
                self._idle.set()

    def _stage_and_write(self, step: int, state: StateSource, meta: dict[str, Any], reason: str) -> None:
        try:
            live = state() if callable(state) else state
            # snapshot pins (and copies non-blocking) only the buffers of CUDA tensors
            pin = torch.cuda.is_available() and torch.cuda.is_initialized()
            snap = snapshot(live, pin=pin, staging=self._staging)  # one save at a time: buffers are free
            if pin:
                torch.cuda.synchronize()
        except BaseException as e:  # noqa: BLE001 - reported like a failed write
            log.error("checkpoint at step %d FAILED while copying the state: %s", step, e)
            self._error = e
            return
        finally:
            self._staged.set()
        self._write(step, {"format": FORMAT_VERSION, "meta": meta, "state": snap}, reason)

    def poll_error(self) -> BaseException | None:
        """The error of a finished background save, returned once; None if all went well."""
        if self.in_flight:
            return None
        err, self._error = self._error, None
        return err

    def _write(self, step: int, payload: dict[str, Any], reason: str) -> None:
        t0 = time.monotonic()
        name = f"step_{step:08d}.ckpt"
        final = self.dir / name
        tmp = self.dir / f".{name}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                sha = fileformat.write(f, payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            fsync_dir(self.dir)
            st = payload["state"]
            entry = CheckpointEntry(
                file=name, step=step, sha256=sha, bytes=final.stat().st_size,
                saved_at=time.time(), digest=state_digest(st.get("model", {}), st.get("optimizer", {})),
                reason=reason, write_s=round(time.monotonic() - t0, 4))
            with self._lock:
                entries = [e for e in self._read_manifest_or_empty() if e.step != step] + [entry]
                entries.sort(key=lambda e: e.step)
                keep, drop = entries[-self.keep_last:], entries[:-self.keep_last]
                self._write_manifest(keep)  # commit point
                self.last_committed = entry
                for e in drop:
                    (self.dir / e.file).unlink(missing_ok=True)
            log.info("checkpoint step %d saved (%s, %.1f MiB, %.2fs) -> %s", step, reason or "save",
                     entry.bytes / 2**20, entry.write_s, final)
        except BaseException as e:  # noqa: BLE001 - reported to the training thread
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            log.error("checkpoint at step %d FAILED, previous checkpoint kept: %s", step, e)
            self._error = e

    # ------------------------------------------------------------------ manifest
    def _read_manifest(self) -> list[CheckpointEntry]:
        data = json.loads((self.dir / MANIFEST).read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("checkpoints"), list):
            raise ValueError("not a foldhpc manifest")
        return [CheckpointEntry.from_dict(d) for d in data["checkpoints"]]

    def _read_manifest_or_empty(self) -> list[CheckpointEntry]:
        try:
            return self._read_manifest()
        except FileNotFoundError:
            return []
        except (ValueError, TypeError) as e:
            log.error("checkpoint manifest %s is corrupt (%s); starting a new one", self.dir / MANIFEST, e)
            return []

    def _write_manifest(self, entries: list[CheckpointEntry]) -> None:
        doc = {"version": FORMAT_VERSION, "checkpoints": [dataclasses.asdict(e) for e in entries]}
        atomic_write_text(self.dir / MANIFEST, json.dumps(doc, indent=1) + "\n")

    def entries(self) -> list[CheckpointEntry]:
        """Committed checkpoints, oldest first (empty if none)."""
        if not (self.dir / MANIFEST).exists():
            return []
        return self._read_manifest()

    # ------------------------------------------------------------------ loading
    def verify(self, entry: CheckpointEntry) -> str | None:
        """None if the file matches its manifest entry, else why not."""
        path = self.dir / entry.file
        if not path.is_file():
            return "file is missing"
        size = path.stat().st_size
        if size != entry.bytes:
            return f"size {size} != {entry.bytes} recorded (truncated or half-written)"
        if sha256_file(path) != entry.sha256:
            return "sha256 mismatch (corrupted)"
        return None

    def load_file(self, path: Path) -> dict[str, Any]:
        """Load a checkpoint file safely: the format has no pickle, so no code can run."""
        payload = fileformat.read(path)
        if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"{path}: not a foldhpc checkpoint (format {FORMAT_VERSION})")
        return payload

    def load_latest(self) -> LoadedCheckpoint | None:
        """Newest checkpoint that verifies and loads; None if the directory has none at all."""
        try:
            entries = self.entries()
        except (ValueError, TypeError, json.JSONDecodeError) as e:
            raise CheckpointError(
                f"checkpoint manifest {self.dir / MANIFEST} is corrupt ({e}); pass --resume PATH to choose a "
                "checkpoint file explicitly or --no-resume to start over") from None
        committed = {e.file for e in entries}
        for p in sorted(self.dir.glob("step_*.ckpt")):
            if p.name not in committed:
                log.warning("checkpoint %s has no manifest entry (a save was interrupted); ignoring it", p)
        skipped: list[tuple[str, str]] = []
        for entry in reversed(entries):
            why = self.verify(entry)
            payload = None
            if why is None:
                try:
                    payload = self.load_file(self.dir / entry.file)
                except Exception as e:  # noqa: BLE001 - any unreadable file means: use an older one
                    why = f"cannot be loaded: {e}"
            if payload is None:
                log.error("CHECKPOINT %s (step %d) IS BAD: %s -- falling back to the previous one",
                          entry.file, entry.step, why)
                skipped.append((entry.file, str(why)))
                continue
            return LoadedCheckpoint(entry, self.dir / entry.file, payload["state"], payload["meta"], skipped)
        if entries:
            raise CheckpointError(
                f"no usable checkpoint in {self.dir}: " + "; ".join(f"{f}: {w}" for f, w in skipped)
                + ". Use --no-resume to start over.")
        return None

