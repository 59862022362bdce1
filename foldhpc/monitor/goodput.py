"""``foldhpc goodput RUN_DIR``: where a run's wall time went, and how much of it trained the model.

The wall time from the run's first record (its first submission, else its first process start)
to its end (now, while it runs) is split into :data:`~foldhpc.monitor.timeline.CATEGORIES`:

* ``productive``: optimizer steps that count (each step's last execution), with the loop's own
  overhead between steps;
* ``recomputed``: steps trained beyond the checkpoint a later start resumed from (a crash or
  SIGKILL lost them) -- trained twice, counted once, and the time a process spent on the step it
  died in;
* ``queue_wait``: pending after a submission or a requeue (jobs.jsonl; sacct Submit/Start);
* ``startup``: from a job run's start or a process start to the end of its first step (imports,
  data, model, checkpoint load, the first step: each start's own timings are in the JSON);
* ``checkpoint``: blocking saves (on a signal, the final one) and the estimated stall of
  background saves on the training thread;
* ``validation``, ``data_wait`` (the training loop waiting for a batch);
* ``idle``: the rest -- restart back-off, a process's exit, anything no record explains.

goodput = productive / allocated, where allocated = wall - queue_wait: the share of the time the
run held its resources that trained the model. The same per process start and per Slurm job run.
All of it is computed from the run's records by :mod:`foldhpc.monitor.timeline`; nothing here
talks to the trainer. A run made before foldhpc recorded events (no ``events.jsonl``) gets its wall
time, queue wait and job runs, and ``null`` for every figure that needs the trainer's records (the
steps, the categories but queue wait, goodput), with a note that says so. ``--tensorboard`` adds
the figures to ``<run_dir>/tensorboard/goodput``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from foldhpc.monitor.timeline import (CATEGORIES, PRODUCTIVE, QUEUE, RECOMPUTED, STARTUP, Timeline,
                                      build_timeline)
from foldhpc.records.exitcodes import ExitCode
from foldhpc.records.layout import TENSORBOARD_DIR

log = logging.getLogger(__name__)

TENSORBOARD_SUBDIR = "goodput"


@dataclass
class Row:
    """One process start or one Slurm job run."""

    label: str
    start: float
    end: float
    outcome: str
    seconds: dict[str, float | None]
    steps: dict[str, int | None]
    allocated_s: float
    goodput: float | None
    job_id: str | None = None
    job_run: int | None = None
    pid: int | None = None
    start_step: int | None = None
    last_step: int | None = None
    startup: dict[str, float] = field(default_factory=dict)


@dataclass
class Goodput:
    run_dir: str
    start: float
    end: float
    running: bool
    wall_s: float
    allocated_s: float
    seconds: dict[str, float | None]  # per category; they add up to wall_s (None: unknown, a run without events)
    steps: dict[str, int | None]  # productive, recomputed, executed (None: unknown)
    goodput: float | None  # productive / allocated
    processes: list[Row]
    jobs: list[Row]
    notes: list[str]
    sources: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sum(segments: list[Any]) -> tuple[dict[str, float], dict[str, int]]:
    sec: dict[str, float] = {k: 0.0 for k in CATEGORIES}
    steps: dict[str, int] = {PRODUCTIVE: 0, RECOMPUTED: 0}
    for s in segments:
        sec[s.kind] += s.duration
        if s.kind in steps:
            steps[s.kind] += s.steps
    steps["executed"] = steps[PRODUCTIVE] + steps[RECOMPUTED]
    return sec, steps


def _ratio(sec: dict[str, float]) -> tuple[float, float | None]:
    allocated = sum(sec.values()) - sec[QUEUE]
    return allocated, (sec[PRODUCTIVE] / allocated if allocated > 0 else None)


def compute(tl: Timeline) -> Goodput:
    """Sum the timeline per category, for the run, each process start and each job run."""
    known = tl.steps_known

    def figures(segments: list[Any]) -> tuple[dict[str, float | None], dict[str, int | None], float, float | None]:
        sec, steps = _sum(segments)
        allocated, fraction = _ratio(sec)
        if known:
            return dict(sec), dict(steps), allocated, fraction
        # no trainer records: only the queue wait is measured; the rest of the allocation is not split
        return ({k: (v if k == QUEUE else None) for k, v in sec.items()}, {k: None for k in steps}, allocated, None)

    sec, steps, allocated, fraction = figures(tl.segments)
    by_lane: dict[int, list[Any]] = defaultdict(list)
    for s in tl.segments:
        by_lane[s.lane].append(s)
    processes = []
    for ln in tl.lanes:
        ls, lsteps, alloc, frac = figures(by_lane[ln.index])
        processes.append(Row(ln.label, ln.start, ln.end, ln.outcome, ls, lsteps, alloc, frac, ln.job_id, ln.job_run,
                             ln.pid, ln.start_step, ln.last_step, ln.startup))
    jobs = []
    groups: dict[tuple[str, int | None], list[Any]] = {}
    for ln in tl.lanes:
        if ln.job_id is not None:
            groups.setdefault((ln.job_id, ln.job_run), []).append(ln)
    for (jid, run), lanes in groups.items():
        segs = [s for ln in lanes for s in by_lane[ln.index]]
        js, jsteps, alloc, frac = figures(segs)
        label = f"job {jid}" + (f" run {run}" if run else "")
        jobs.append(Row(label, min(ln.start for ln in lanes), max(ln.end for ln in lanes), lanes[-1].outcome, js,
                        jsteps, alloc, frac, jid, run))
    return Goodput(tl.run_dir, tl.start, tl.end, tl.running, tl.wall_s, allocated, sec, steps, fraction, processes,
                   jobs, list(tl.notes), list(tl.sources))


def goodput_of(run_dir: Path, use_sacct: bool = True) -> Goodput:
    return compute(build_timeline(Path(run_dir), use_sacct=use_sacct))


# ------------------------------------------------------------------ output
def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _f(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def format_report(g: Goodput) -> str:
    wall = g.wall_s
    out = [f"{g.run_dir}: {wall:.2f} s wall{' (still running: up to now)' if g.running else ''}, "
           f"allocated {g.allocated_s:.2f} s (wall - queue wait)", ""]
    out.append(f"{'CATEGORY':<12} {'SECONDS':>10} {'% WALL':>7} {'STEPS':>6}")
    for k in CATEGORIES:
        s = g.seconds[k]
        steps = ("-" if g.steps[k] is None else str(g.steps[k])) if k in (PRODUCTIVE, RECOMPUTED) else ""
        out.append(f"{k:<12} {_f(s, 3):>10} {_pct(s / wall if wall and s is not None else None):>7} {steps:>6}")
    total = None if None in g.seconds.values() else sum(v for v in g.seconds.values() if v is not None)
    executed = "-" if g.steps["executed"] is None else str(g.steps["executed"])
    out.append(f"{'total':<12} {_f(total, 3):>10} {_pct(total / wall if wall and total is not None else None):>7} "
               f"{executed:>6}")
    out += ["", f"goodput = productive / allocated = {_pct(g.goodput)}"]

    def table(title: str, rows: list[Row], with_steps: bool) -> None:
        if not rows:
            return
        w = max(len(title), *(len(r.label) for r in rows))
        out.extend(["", f"{title:<{w}} {'STEPS':>9} {'QUEUE_S':>8} {'STARTUP_S':>9} {'PRODUCTIVE_S':>12} "
                        f"{'RECOMPUTED_S':>12} {'ALLOC_S':>8} {'GOODPUT':>7}  OUTCOME"])
        for r in rows:
            span = (f"{r.start_step}->{r.last_step}" if with_steps and r.start_step is not None else
                    "-" if r.steps[PRODUCTIVE] is None else f"+{r.steps[PRODUCTIVE]}/{r.steps[RECOMPUTED]}")
            out.append(f"{r.label:<{w}} {span:>9} {_f(r.seconds[QUEUE], 2):>8} {_f(r.seconds[STARTUP], 2):>9} "
                       f"{_f(r.seconds[PRODUCTIVE], 3):>12} {_f(r.seconds[RECOMPUTED], 3):>12} {r.allocated_s:>8.2f} "
                       f"{_pct(r.goodput):>7}  {r.outcome}")

    table("PROCESS START", g.processes, True)
    table("SLURM JOB RUN", g.jobs, False)
    if g.notes:
        out += [""] + [f"note: {n}" for n in g.notes]
    return "\n".join(out)


def write_tensorboard(g: Goodput, run_dir: Path) -> Path:
    """``goodput/fraction``, ``goodput/<category>_s`` and the step counts at the run's newest step,
    in ``<run_dir>/tensorboard/goodput`` (a run of its own next to the training curves)."""
    from torch.utils.tensorboard import SummaryWriter  # only here: torch is heavy

    step = max([r.last_step for r in g.processes if r.last_step is not None] or [0])
    out = Path(run_dir) / TENSORBOARD_DIR / TENSORBOARD_SUBDIR
    w = SummaryWriter(log_dir=str(out))
    try:
        if g.goodput is not None:
            w.add_scalar("goodput/fraction", g.goodput, step)
        for k, v in g.seconds.items():
            if v is not None:
                w.add_scalar(f"goodput/{k}_s", v, step)
        w.add_scalar("goodput/wall_s", g.wall_s, step)
        for k in (PRODUCTIVE, RECOMPUTED):
            n = g.steps[k]
            if n is not None:  # unknown for a run without events
                w.add_scalar(f"goodput/{k}_steps", n, step)
    finally:
        w.close()
    return out


# ------------------------------------------------------------------ command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write goodput/fraction and goodput/<category>_s to RUN_DIR/tensorboard/goodput")
    p.add_argument("--no-sacct", dest="sacct", action="store_false",
                   help="queue wait from jobs.jsonl only (do not ask sacct)")


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        print(f"foldhpc goodput: {run_dir}: no such run directory", file=sys.stderr)
        return ExitCode.USAGE
    try:
        g = goodput_of(run_dir, use_sacct=args.sacct)
    except FileNotFoundError as e:
        print(f"foldhpc goodput: {e}", file=sys.stderr)
        return ExitCode.USAGE
    if args.tensorboard:
        where = write_tensorboard(g, run_dir)
        g.notes.append(f"TensorBoard scalars goodput/* written to {where}")
    print(json.dumps(g.to_dict(), indent=1) if args.json else format_report(g))
    return ExitCode.OK
