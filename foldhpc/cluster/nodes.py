"""Which nodes a run's next job must avoid: every node found bad in the run's records, bounded.

A node fails its health check (:mod:`foldhpc.resilience.health`) or is blamed for crashes (the
supervisor's ``fault.node_crash_limit``): either writes a ``node_unhealthy`` record to the run's
events.jsonl; a node suspect of silent data corruption twice (issue 24) has an ``sdc_suspect_node``
record there, and is a bad node as well (check ``sdc``). Every later job of the run -- a follow-up (``sbatch --exclude``) or a requeue
(``scontrol update JobId=N ExcNodeList=...`` right after ``scontrol requeue``) -- excludes the union of
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
#: the events.jsonl kind of a node suspect of silent data corruption for the second time (issue 24:
#: the trainer's replay attribution, foldhpc.train.loop): a bad node too, check "sdc"
SDC_KIND = "sdc_suspect_node"
SDC_CHECK = "sdc"


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
    """Every node found bad in ``run_dir``'s events.jsonl -> its newest record (check, detail, t,
    job_id); {} where there is none (or the file is unreadable).

    Bad are the nodes of a ``node_unhealthy`` record (a failed health check, a node blamed for
    crashes) and those of an ``sdc_suspect_node`` record (suspect of silent data corruption twice:
    check ``sdc``; issue 24 asks that such a node be excluded at the next hand-over like any bad one)."""
    out: dict[str, dict[str, Any]] = {}
    markers = (UNHEALTHY_KIND.encode(), SDC_KIND.encode())
    try:
        with open(Path(run_dir) / EVENTS_FILE, "rb") as f:
            for line in f:
                if not any(m in line for m in markers):  # a cheap filter: a long run has 100k lines of other kinds
                    continue
                e = parse_event(line)
                if e is None or e.kind not in (UNHEALTHY_KIND, SDC_KIND):
                    continue
                node = e.get("node")
                if not isinstance(node, str) or not node:
                    continue
                if e.kind == SDC_KIND:
                    out[node] = {"check": SDC_CHECK, "detail": _sdc_detail(e.get("suspected"), e.get("steps")),
                                 "t": e.t, "job_id": e.get("job_id")}
                else:
                    out[node] = {"check": e.get("check"), "detail": e.get("detail"), "t": e.t,
                                 "job_id": e.get("job_id")}
    except FileNotFoundError:
        return {}
    except OSError as e:
        log.warning("cannot read the bad nodes of %s: %s", run_dir, e)
    return out


def _sdc_detail(suspected: Any, steps: Any) -> str:
    """``suspect of silent data corruption twice (steps 40, 80)``, from an sdc_suspect_node record."""
    n = suspected if isinstance(suspected, int) and not isinstance(suspected, bool) else 2
    times = {1: "once", 2: "twice"}.get(n, f"{n} times")
    where = f" (steps {', '.join(map(str, steps))})" if isinstance(steps, list) and steps else ""
    return f"suspect of silent data corruption {times}{where}"


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
