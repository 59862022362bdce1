"""The run's machine-readable status file, ``<run.dir>/status.json``.

``foldhpc status`` reads it next to sacct: Slurm knows whether the *job* is alive, only the
run knows how far training got and why it failed. It is rewritten atomically (temp file +
rename) so a reader never sees half a file, even if the writer is killed.

"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from foldhpc.records.fsio import atomic_write_text
from foldhpc.records.layout import STATUS_FILE

log = logging.getLogger(__name__)


# States a run records itself. Slurm-level states (pending, preempted, timeout...) come from sacct.
RUNNING, COMPLETED, FAILED, CHECKPOINTED = "running", "completed", "failed", "checkpointed"


class StatusFile:
    """Keeps the status dict in memory and rewrites the file on each update.

    A write that fails (``run.dir`` full while the checkpoints, elsewhere, still have room; a
    flaky mount) never ends training: status.json is for people and ``foldhpc status``, the run's
    state is in its checkpoints. It is logged once per outage, and every later update retries with
    the whole dict, so the file is complete again as soon as a write succeeds.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / STATUS_FILE
        self.failing = False  # the last write failed (warned once; the next update retries)
        try:
            self.data: dict[str, Any] = read_status(run_dir) or {}
        except ValueError:  # a corrupt file from a killed writer of an old version: start afresh
            self.data = {}

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        self.data["updated_at"] = time.time()
        self.data["host"] = socket.gethostname()
        self.data["pid"] = os.getpid()
        try:
            atomic_write_text(self.path, json.dumps(self.data, indent=1, sort_keys=True) + "\n", fsync=False)
        except OSError as e:
            if not self.failing:
                log.warning("cannot write %s (%s): training goes on, the status is written again at the next "
                            "update that succeeds", self.path, e.strerror or e)
            self.failing = True
            return
        if self.failing:
            log.info("%s is written again", self.path)
            self.failing = False


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
