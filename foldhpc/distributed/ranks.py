"""Per-rank records in ``<run.dir>/ranks/rank-<N>.json``, and naming the rank that failed.

Each rank writes its record when it starts (node, host, pid, Slurm job) and rewrites it when it
stops. When a rank fails, the survivors' next collective fails too; without records every rank
would report "a collective failed" and nobody would know which process to blame. So:

* a rank that raises records ``failed`` with its error;
* a survivor whose collective failed (:class:`~foldhpc.distributed.group.PeerFailure`) records
  ``aborted``, waits a moment for the others' records, and names the culprits:
  ranks that recorded ``failed`` (with their error), else ranks still recorded as ``running``
  whose pid is gone on this host (killed: SIGKILL, the OOM killer, a native crash) or, on another
  host, that could not be asked (lost: the node's own log says more).

``foldhpc status`` shows the records of the latest start.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from foldhpc.distributed.env import DistEnv
from foldhpc.records.fsio import atomic_write_text, pid_alive
from foldhpc.records.events import EventSink
from foldhpc.records.layout import RANKS_DIR
from foldhpc.records.status import FAILED as FAILED_STATE
from foldhpc.records.status import StatusFile, StatusSink

log = logging.getLogger(__name__)

RUNNING, DONE, FAILED, ABORTED = "running", "done", "failed", "aborted"


def _path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / RANKS_DIR / f"rank-{rank}.json"


def write_record(run_dir: Path, env: DistEnv, state: str, **fields: Any) -> None:
    rec = {"rank": env.rank, "world_size": env.world_size, "local_rank": env.local_rank, "node": env.node,
           "host": socket.gethostname(), "pid": os.getpid(), "state": state, "updated_at": time.time(),
           "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""), **fields}
    path = _path(run_dir, env.rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(rec, sort_keys=True) + "\n", fsync=False)


def read_records(run_dir: Path, world_size: int | None = None) -> list[dict[str, Any]]:
    """Records of ranks ``0..world_size-1`` (all found if None), by rank; unreadable ones skipped."""
    d = Path(run_dir) / RANKS_DIR
    out = []
    for p in sorted(d.glob("rank-*.json"), key=lambda p: int(p.stem.split("-")[1]) if p.stem[5:].isdigit() else -1):
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and (world_size is None or int(rec.get("rank", -1)) < world_size):
            out.append(rec)
    return out


def remove_stale(run_dir: Path, world_size: int) -> None:
    """Drop records of ranks that this start does not have (an earlier start had more)."""
    for rec in read_records(run_dir):
        if int(rec.get("rank", -1)) >= world_size:
            _path(run_dir, int(rec["rank"])).unlink(missing_ok=True)


def culprits(run_dir: Path, env: DistEnv, started_at: float, settle_s: float = 5.0) -> list[dict[str, Any]]:
    """The ranks to blame for a failed collective, each with a ``why`` (see the module docstring).

    Waits up to ``settle_s`` for a failing rank, and for the other survivors, to write their
    records. Records older than this start (``started_at``) are ignored.
    """
    host = socket.gethostname()
    deadline = time.monotonic() + settle_s
    while True:
        recs = [r for r in read_records(run_dir, env.world_size)
                if r.get("rank") != env.rank and float(r.get("updated_at", 0)) >= started_at - 1]
        failed = [dict(r, why=r.get("error") or "failed") for r in recs if r.get("state") == FAILED]
        # survivors that have not written "aborted" yet (their collective fails too, a moment later)
        pending = [r for r in recs if r.get("state") == RUNNING
                   and (r.get("host") != host or pid_alive(int(r.get("pid", 0))))]
        if failed or not pending or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    if failed:
        return failed
    out, silent = [], []
    for r in recs:
        if r.get("state") != RUNNING:
            continue
        if r.get("host") != host:
            out.append(dict(r, why="stopped responding (no error recorded; see its node's log)"))
        elif not pid_alive(int(r.get("pid", 0))):
            out.append(dict(r, why="died without reporting an error (killed by a signal such as SIGKILL, "
                                   "the OOM killer, or a crash in native code)"))
        else:  # alive here: only to blame if nobody died (the other survivors are still running too)
            silent.append(dict(r, why="alive but did not answer within distributed.timeout (hung, stopped, "
                                      "or in a phase longer than the timeout)"))
    if not out:
        out = silent
    seen = {int(r.get("rank", -1)) for r in recs}
    for rank in range(env.world_size):
        if rank != env.rank and rank not in seen:
            out.append({"rank": rank, "node": "?", "why": "never started or recorded nothing"})
    return out


#: what a status or event keeps of each rank to blame
BLAME_FIELDS = ("rank", "node", "host", "pid", "why")


def blame(run_dir: Path, env: DistEnv, error: str, step: int, started_at: float, peer: bool) -> list[dict[str, Any]]:
    """Record how this rank ended and name the ranks to blame, with :data:`BLAME_FIELDS` each.

    ``peer``: this rank's collective failed (a :class:`~foldhpc.distributed.group.PeerFailure`),
    so it records ``aborted`` and names the :func:`culprits`; otherwise it raised ``error`` itself,
    records ``failed`` and names itself. The built-in trainer and :class:`foldhpc.Session` share
    this, so that ``foldhpc status`` tells the same story for both.
    """
    if peer:
        write_record(run_dir, env, ABORTED, error=error, step=step)
        found = culprits(run_dir, env, started_at)
    else:
        write_record(run_dir, env, FAILED, error=error, step=step)
        found = [{"rank": env.rank, "node": env.node, "pid": os.getpid(), "why": error}]
    return [{k: c.get(k) for k in BLAME_FIELDS} for c in found]


def record_failure(run_dir: Path, env: DistEnv, error: str, step: int, started_at: float, peer: bool,
                   events: EventSink, status: StatusSink) -> None:
    """A multi-rank run's failure on this rank: :func:`blame`, then the culprits in a
    ``failed_ranks`` event and in ``status.json`` (``failed``, ``failed_ranks``), written by every
    failing rank (a rank other than 0 has no status sink of its own: it opens the file). An
    unwritable run directory is logged, never raised: the failure itself is what propagates."""
    try:
        blamed = blame(run_dir, env, error, step, started_at, peer)
        if blamed:
            error = describe(blamed)
            log.error("run failed: %s", error)
            events.emit("failed_ranks", step=step, error=error, ranks=blamed)
        sink = status if isinstance(status, StatusFile) else StatusFile(run_dir)
        sink.update(state=FAILED_STATE, step=step, error=error, failed_ranks=blamed)
    except OSError as err:  # the run directory itself may be the problem
        log.error("cannot record the failure in %s: %s", run_dir, err)


def describe(culprits_: list[dict[str, Any]]) -> str:
    return "; ".join(f"rank {c.get('rank')} on {c.get('node', '?')} (pid {c.get('pid', '?')}): {c['why']}"
                     for c in culprits_)
