"""The run's machine-readable status file, ``<run.dir>/status.json``.

``foldhpc status`` reads it next to sacct: Slurm knows whether the *job* is alive, only the
run knows how far training got and why it failed. It is rewritten atomically (temp file +
rename) so a reader never sees half a file, even if the writer is killed.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

STATUS_FILE = "status.json"

# States a run records itself. Slurm-level states (pending, preempted, timeout...) come from sacct.
RUNNING, COMPLETED, FAILED, CHECKPOINTED = "running", "completed", "failed", "checkpointed"


def atomic_write_text(path: Path, text: str, *, fsync: bool = True) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new file, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if fsync:
        fsync_dir(path.parent)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (POSIX needs the directory itself synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StatusFile:
    """Keeps the status dict in memory and rewrites the file on each update."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / STATUS_FILE
        try:
            self.data: dict[str, Any] = read_status(run_dir) or {}
        except ValueError:  # a corrupt file from a killed writer of an old version: start afresh
            self.data = {}

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        self.data["updated_at"] = time.time()
        self.data["host"] = socket.gethostname()
        self.data["pid"] = os.getpid()
        atomic_write_text(self.path, json.dumps(self.data, indent=1, sort_keys=True) + "\n", fsync=False)


class NullStatus:
    """The status of ranks other than 0: rank 0 owns status.json (a failing rank writes it through
    a :class:`StatusFile` of its own)."""

    data: dict[str, Any] = {}

    def update(self, **fields: Any) -> None:
        pass


def read_status(run_dir: Path) -> dict[str, Any] | None:
    """The status dict, or None if the file is missing. Raises ValueError if it is corrupt."""
    path = Path(run_dir) / STATUS_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupt status file ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: corrupt status file (not a JSON object)")
    return data
