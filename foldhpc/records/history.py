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
from foldhpc.records.layout import HISTORY_FILE
from pathlib import Path
from typing import Any



def record_event(run_dir: Path, event: str, **fields: Any) -> None:
    entry = {"time": time.time(), "event": event, "host": socket.gethostname(), **fields}
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(run_dir) / HISTORY_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_history(run_dir: Path) -> tuple[list[dict[str, Any]], int]:
    """(events, number of unusable lines), never raising on what the file holds.

    Each line is decoded on its own: one bad byte (a torn write, a disk error, an editor) costs
    only its line, never the others -- ``foldhpc status``, ``goodput`` and the chain's restart
    count (:func:`foldhpc.slurm.followup.chain_restarts`, which bounds ``slurm.max_requeues``)
    all read the story from here. A line that is not valid UTF-8 is read with the bad bytes
    replaced (U+FFFD): a bad byte inside a string value still leaves its event usable. A line that
    is not a JSON object after that (a torn last line, a number, a list, nesting too deep) is
    counted and skipped. ``record_event`` writes ASCII only (``json.dumps``), split at ``\\n``.
    """
    path = Path(run_dir) / HISTORY_FILE
    events: list[dict[str, Any]] = []
    bad = 0
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        try:
            e = json.loads(raw.decode("utf-8", errors="replace"))
        except (ValueError, RecursionError):  # JSONDecodeError, an int of too many digits, [[[[...
            e = None
        if isinstance(e, dict):
            events.append(e)
        else:
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
