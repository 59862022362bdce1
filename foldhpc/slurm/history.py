"""``<run.dir>/jobs.jsonl``: the append-only story of a run's Slurm jobs.

One JSON object per line (submitted, started, checkpointed, requeued, completed, failed), so
``foldhpc status`` can rebuild submit -> run -> preempted -> requeued -> run -> completed even
after sacct has forgotten the job. Appends of one short line are atomic on POSIX filesystems.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

HISTORY_FILE = "jobs.jsonl"


def record_event(run_dir: Path, event: str, **fields: Any) -> None:
    entry = {"time": time.time(), "event": event, "host": socket.gethostname(), **fields}
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(run_dir) / HISTORY_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_history(run_dir: Path) -> tuple[list[dict[str, Any]], int]:
    """(events, number of unreadable lines); a torn last line is skipped, not fatal."""
    path = Path(run_dir) / HISTORY_FILE
    events, bad = [], 0
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return [], 0
    for line in lines:
        try:
            e = json.loads(line)
            if isinstance(e, dict):
                events.append(e)
                continue
        except json.JSONDecodeError:
            pass
        bad += 1
    return events, bad


def job_ids(run_dir: Path) -> list[str]:
    """Slurm job ids of a run, in submission order, without duplicates (``--local`` runs have none:
    their "job id" is a process id that sacct must never be asked about)."""
    seen: list[str] = []
    for e in read_history(run_dir)[0]:
        if e.get("backend") == "local":
            continue
        jid = e.get("job_id")
        if jid and str(jid) not in seen:
            seen.append(str(jid))
    return seen
