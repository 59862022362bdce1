"""Which nodes a run's next job must avoid: every node found bad in the run's records, bounded.

A node fails its health check (:mod:`foldhpc.resilience.health`) or is blamed for crashes (the
supervisor's ``fault.node_crash_limit``): either writes a ``node_unhealthy`` record to the run's
events.jsonl. Every later job of the run -- a follow-up (``sbatch --exclude``) or a requeue
(``scontrol update JobId=N ExcNodeList=...`` before ``scontrol requeue``) -- excludes the union of
those nodes, so the exclusion accumulates across the chain and survives a resubmission.

The bound: a run must never exclude so many nodes that its job cannot be placed (a pending job
that no node can run, for ever). At most the cluster's node count (its partition's, from ``sinfo``)
minus the job's node count may be excluded; past that the run stops, saying why
(:func:`foldhpc.slurm.requeue.maybe_requeue`, kind ``bad_nodes``). Where ``sinfo`` does not answer,
the bound is unknown and only the nodes already known bad are excluded.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from foldhpc.cluster.command import SlurmCommandError, run_command
from foldhpc.records.events import parse_event
from foldhpc.records.layout import EVENTS_FILE

log = logging.getLogger(__name__)

#: the events.jsonl kind of a bad node
UNHEALTHY_KIND = "node_unhealthy"


@dataclass(frozen=True)
class Exclusion:
    """The nodes a run's next job excludes and whether that is still within the bound."""

    nodes: tuple[str, ...]  # sorted
    why: dict[str, str]  # node -> "check: detail" of its newest record
    cluster_nodes: int | None  # the partition's node count (None: sinfo did not answer)
    job_nodes: int

    @property
    def bound(self) -> int | None:
        """How many nodes may be excluded (None: unknown)."""
        return None if self.cluster_nodes is None else max(0, self.cluster_nodes - self.job_nodes)

    @property
    def over(self) -> bool:
        """Excluding them all would leave fewer nodes than the job needs."""
        return self.bound is not None and len(self.nodes) > self.bound

    def describe(self) -> str:
        return ", ".join(f"{n} ({self.why[n]})" for n in self.nodes)


def bad_nodes(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Every node found bad in ``run_dir``'s events.jsonl -> its newest ``node_unhealthy`` record
    (check, detail, t, job_id); {} where there is none (or the file is unreadable)."""
    out: dict[str, dict[str, Any]] = {}
    marker = UNHEALTHY_KIND.encode()
    try:
        with open(Path(run_dir) / EVENTS_FILE, "rb") as f:
            for line in f:
                if marker not in line:  # a cheap filter: a long run has 100k lines of other kinds
                    continue
                e = parse_event(line)
                node = e.get("node") if e is not None and e.kind == UNHEALTHY_KIND else None
                if e is not None and isinstance(node, str) and node:
                    out[node] = {"check": e.get("check"), "detail": e.get("detail"), "t": e.t,
                                 "job_id": e.get("job_id")}
    except FileNotFoundError:
        return {}
    except OSError as e:
        log.warning("cannot read the bad nodes of %s: %s", run_dir, e)
    return out


def cluster_node_count(partition: str | None, timeout: float) -> int | None:
    """The number of nodes of ``partition`` (all nodes where None), from ``sinfo``; None if it fails."""
    cmd = ["sinfo", "-h", "-N", "-o", "%N"] + (["-p", partition] if partition else [])
    try:
        out = run_command(cmd, timeout=timeout)
    except SlurmCommandError as e:
        log.warning("sinfo failed (%s): the bound on excluded nodes is unknown", e)
        return None
    names = {ln.strip() for ln in out.splitlines() if ln.strip()}
    return len(names) or None


def exclusion(run_dir: Path, timeout: float, partition: str | None = None, job_nodes: int | None = None) -> Exclusion:
    """The run's :class:`Exclusion` for its next job (``partition`` and ``job_nodes`` default to this
    job's ``SLURM_JOB_PARTITION`` and ``SLURM_JOB_NUM_NODES``); sinfo is asked only where there are bad nodes."""
    bad = bad_nodes(run_dir)
    if job_nodes is None:
        raw = os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or "1"
        job_nodes = int(raw) if raw.isdigit() else 1
    if partition is None:
        partition = os.environ.get("SLURM_JOB_PARTITION") or None
    count = cluster_node_count(partition.split(",")[0] if partition else None, timeout) if bad else None
    why = {n: f"{r.get('check')}: {r.get('detail')}" for n, r in bad.items()}
    return Exclusion(tuple(sorted(bad)), why, count, job_nodes)


def merge_exclude(*lists: str | None) -> str:
    """Slurm node lists (``n1,n[3-4]``) joined into one ``--exclude`` value, each item once, in order."""
    items: list[str] = []
    for lst in lists:
        for item in _split(lst or ""):
            if item not in items:
                items.append(item)
    return ",".join(items)


def _split(nodelist: str) -> list[str]:
    """Split a node list at the commas outside brackets (``n[1-2,5],m3`` -> ``n[1-2,5]``, ``m3``)."""
    out, depth, cur = [], 0, ""
    for ch in nodelist.strip():
        if ch == "," and depth == 0:
            if cur.strip():
                out.append(cur.strip())
            cur = ""
            continue
        depth += ch == "["
        depth -= ch == "]"
        cur += ch
    if cur.strip() and cur.strip() != "(null)":
        out.append(cur.strip())
    return out
