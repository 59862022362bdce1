"""Sweeps: a grid of runs as ONE Slurm job array, each task a fault-tolerant run of its own.

``python -m foldhpc.submit --config FILE --sweep train.lr=1e-3,5e-4 --sweep train.seed=1,2
[--max-parallel N]`` submits the cartesian product of the ``--sweep`` values (the first one varies
slowest) as one array job through submitit (``--array=0-3%N``). Each task trains in its own run
directory ``<run.dir>/<name>``, named from its overrides so a person can read it
(``lr=1e-3,seed=1``; characters outside ``[A-Za-z0-9._+=,-]`` become ``_``), which holds its
resolved ``config.toml`` from submission on. ``<run.dir>/sweep.json`` lists the axes and the
tasks; ``<run.dir>/slurm/`` holds submitit's files (``<array>_<task>_*``).

A task is a :class:`~foldhpc.slurm.job.SlurmJob` like a single run (the same payload): it checkpoints, saves on
its preemption signal, requeues *itself* (``scontrol requeue <array>_<task>``: the job id of an
array task is ``ARRAYID_TASK`` everywhere, :class:`foldhpc.cluster.env.SlurmEnv`), resumes and
completes on its own; ``slurm.max_requeues`` counts per task (each task has its own
``SLURM_RESTART_COUNT``); a task cancelled with ``scancel <array>_<task>`` stays cancelled while
the others go on. Submitting the same sweep again (same run.dir and task names) continues every
task from its newest checkpoint; a different grid into the same run.dir is refused.

``foldhpc status <run.dir>`` shows one row per task (state, step, loss, best validation loss) and
a summary line (:func:`summaries`); ``--json`` has them under ``"sweeps"``.

What may be swept: any key except ``run.dir`` (the tasks' parent), ``checkpoint.dir`` (with one
set, each task gets ``<checkpoint.dir>/<name>``) and ``slurm.*`` (one array job has one set of
resources). Values are separated by commas, so a value cannot contain one.

The sbatch template (``sbatch/train.sbatch``) run as an array (``sbatch --array=0-3 ...``) gets
the same safety without a grid: each task trains in ``<run.dir>/task-<SLURM_ARRAY_TASK_ID>``
(``python -m foldhpc.slurm.sweep --array-task-dir``), never in a directory shared with the others.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from foldhpc.config import Config, ConfigError, config_to_toml, load_config
from foldhpc.records.fsio import atomic_write_text, make_private_dir
from foldhpc.records.history import Submitted, write_event
from foldhpc.records.layout import CHECKPOINT_DIR, CONFIG_FILE, HISTORY_FILE, STATUS_FILE, TENSORBOARD_DIR
from foldhpc.slurm.job import Payload
from foldhpc.slurm.submit import check_submittable, executor_for, job_for

SWEEP_FILE = "sweep.json"
MAX_NAME = 120  # characters of a task directory name (longer ones end in a hash)
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=,-]")
_KEY = re.compile(r"^(?:[a-z_]+\.[a-z_0-9]+|task\.params\.[A-Za-z_][A-Za-z_0-9]*)$")  # task.params.X: one entry


@dataclass
class SweepTask:
    index: int  # array task id
    name: str  # run directory name under the sweep's run.dir
    overrides: list[str]  # "section.key=value" of this task
    job_id: str | None = None  # "<array>_<index>" once submitted


# ------------------------------------------------------------------ the grid
def parse_axes(specs: list[str]) -> list[tuple[str, list[str]]]:
    """``["train.lr=1e-3,5e-4", ...]`` -> ``[("train.lr", ["1e-3", "5e-4"]), ...]``; ConfigError on misuse."""
    axes: list[tuple[str, list[str]]] = []
    for spec in specs:
        key, eq, text = spec.partition("=")
        key = key.strip()
        values = [v.strip() for v in text.split(",")]
        if not eq or not _KEY.match(key) or not all(values):
            raise ConfigError(f"--sweep {spec!r}: expected SECTION.KEY=V1,V2,... (e.g. --sweep train.lr=1e-3,5e-4)")
        if key == "run.dir" or key == "checkpoint.dir" or key.startswith("slurm."):
            raise ConfigError(f"--sweep {key}: cannot be swept -- "
                              + ("every task's run directory is derived from run.dir" if key.endswith(".dir") else
                                 "one Slurm job array has one set of resources; submit one sweep per setting"))
        if key in (k for k, _ in axes):
            raise ConfigError(f"--sweep {key}: given twice; list all its values in one --sweep")
        if len(set(values)) != len(values):
            raise ConfigError(f"--sweep {spec!r}: a value is listed twice")
        axes.append((key, values))
    return axes


def _safe(text: str) -> str:
    name = _UNSAFE.sub("_", text)
    if name.startswith((".", "-")):
        name = "_" + name
    if len(name) > MAX_NAME:
        name = name[: MAX_NAME - 9] + "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return name


def grid(axes: list[tuple[str, list[str]]]) -> list[SweepTask]:
    """One task per combination (cartesian product, the first axis varies slowest), readably named
    from its values: ``lr=1e-3,seed=1`` (the full key where two axes share a last part)."""
    shorts = [k.rsplit(".", 1)[1] for k, _ in axes]
    labels = [s if shorts.count(s) == 1 else k for s, (k, _) in zip(shorts, axes)]
    tasks: list[SweepTask] = []
    seen: set[str] = set()
    for i, combo in enumerate(itertools.product(*[vals for _, vals in axes])):
        name = _safe(",".join(f"{label}={v}" for label, v in zip(labels, combo)))
        if name in seen:  # two values that differ only in unsafe characters
            name = f"{name}-{i}"
        seen.add(name)
        tasks.append(SweepTask(i, name, [f"{k}={v}" for (k, _), v in zip(axes, combo)]))
    return tasks


def plan(config: str | None, overrides: list[str], specs: list[str]) -> tuple[Config, list[tuple[SweepTask, Config]]]:
    """The sweep's own config (its run.dir is the sweep directory) and each task's resolved config,
    all validated before anything is submitted."""
    root = load_config(config, overrides)
    axes = parse_axes(specs)
    if not axes:
        raise ConfigError("a sweep needs at least one --sweep SECTION.KEY=V1,V2,...")
    out: list[tuple[SweepTask, Config]] = []
    for task in grid(axes):
        extra = [f"run.dir={root.run_dir / task.name}"]
        if root.checkpoint.dir:
            extra.append(f"checkpoint.dir={Path(root.checkpoint.dir) / task.name}")
        try:
            cfg = load_config(config, [*overrides, *task.overrides, *extra])
        except ConfigError as e:
            raise ConfigError(f"sweep task {task.name}: {e}") from None
        check_submittable(cfg)
        out.append((task, cfg))
    return root, out


# ------------------------------------------------------------------ submission
def read_sweep(sweep_dir: Path) -> dict[str, Any] | None:
    """The sweep's record (``sweep.json``); None if ``sweep_dir`` is not a sweep (or it is unreadable)."""
    try:
        data = json.loads((Path(sweep_dir) / SWEEP_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("tasks"), list) else None


def submit_sweep(config: str | None, overrides: list[str], specs: list[str], payload: Payload, max_parallel: int = 0,
                 local: bool = False) -> tuple[str, Path, list[SweepTask]]:
    """Submit the grid as one job array, each task running ``payload`` (:class:`foldhpc.slurm.job.Payload`);
    returns (array job id, sweep directory, tasks)."""
    if local:
        raise ConfigError("--sweep needs Slurm (one job array); without it, run each task with "
                          "foldhpc train --set run.dir=... --set KEY=VALUE")
    if max_parallel < 0:
        raise ConfigError(f"--max-parallel {max_parallel}: must be >= 1 (0 = no limit)")
    root, planned = plan(config, overrides, specs)
    sweep_dir = root.run_dir
    names = [t.name for t, _ in planned]
    previous = read_sweep(sweep_dir)
    if previous is not None and [t.get("name") for t in previous["tasks"]] != names:
        raise ConfigError(f"run.dir = '{sweep_dir}' holds another sweep ({len(previous['tasks'])} tasks: "
                          f"{', '.join(str(t.get('name')) for t in previous['tasks'][:4])}...); choose a new run.dir")
    if previous is None and any((sweep_dir / m).exists() for m in (STATUS_FILE, CHECKPOINT_DIR, HISTORY_FILE)):
        raise ConfigError(f"run.dir = '{sweep_dir}' is a single run's directory; a sweep needs a run.dir of its own")
    make_private_dir(sweep_dir)  # issue 19 item 4: not group-writable whatever the umask
    for task, cfg in planned:
        make_private_dir(cfg.run_dir)
        atomic_write_text(cfg.run_dir / CONFIG_FILE, config_to_toml(cfg), fsync=False)
    ex = executor_for(root)  # folder: <sweep>/slurm (or slurm.logs_dir); resources: the same for all tasks
    n = len(planned)
    ex.update_parameters(array_parallelism=min(max_parallel or n, n))
    with ex.batch():
        jobs = [ex.submit(job_for(cfg, payload)) for _, cfg in planned]
    array_id = str(jobs[0].job_id).split("_", 1)[0]
    for (task, cfg), job in zip(planned, jobs):
        task.job_id = str(job.job_id)
        write_event(cfg.run_dir, Submitted(job_id=task.job_id, backend="slurm", partition=root.slurm.partition,
                                           sweep=str(sweep_dir), array_task=task.index))
    record = {
        "version": 1, "config": str(Path(config).resolve()) if config else None, "overrides": list(overrides),
        "axes": [[k, v] for k, v in parse_axes(specs)], "max_parallel": max_parallel or None,
        "array_job_id": array_id, "submitted_at": time.time(),
        "arrays": [*(previous or {}).get("arrays", []), array_id],
        "tasks": [asdict(t) for t, _ in planned],
    }
    atomic_write_text(sweep_dir / SWEEP_FILE, json.dumps(record, indent=1) + "\n")
    return array_id, sweep_dir, [t for t, _ in planned]


def print_submitted(array_id: str, sweep_dir: Path, tasks: list[SweepTask], max_parallel: int) -> None:
    limit = f", at most {max_parallel} at a time" if max_parallel and max_parallel < len(tasks) else ""
    print(f"submitted job array {array_id} ({len(tasks)} tasks{limit})")
    print(f"sweep directory {sweep_dir.resolve()}")
    for t in tasks:
        print(f"  {t.job_id}  {t.name}")
    print(f"foldhpc status {sweep_dir}")


# ------------------------------------------------------------------ status
def task_dirs(sweep_dir: Path) -> list[Path] | None:
    """The run directories of a sweep's tasks, in task order; None if ``sweep_dir`` is no sweep."""
    data = read_sweep(sweep_dir)
    if data is None:
        return None
    return [Path(sweep_dir) / str(t["name"]) for t in data["tasks"] if isinstance(t, dict) and t.get("name")]


def sweep_of(run_dir: Path) -> Path | None:
    """The sweep directory ``run_dir`` is a task of, if any."""
    parent = Path(run_dir).parent
    dirs = task_dirs(parent)
    return parent if dirs is not None and Path(run_dir).name in {d.name for d in dirs} else None


def best_validation(run_dir: Path) -> dict[str, Any] | None:
    """The lowest validation distogram loss of the run so far, its step and the long-range contact
    precision there, from the run's TensorBoard curves (one continuous set across restarts);
    status.json's latest validation where there are no curves. None before any validation."""
    tb = Path(run_dir) / TENSORBOARD_DIR
    if tb.is_dir():
        try:
            from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

            acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
            acc.Reload()
            tags = acc.Tags().get("scalars", [])
            if "val/distogram_loss" in tags:
                best = min(acc.Scalars("val/distogram_loss"), key=lambda e: (e.value, e.step))
                out: dict[str, Any] = {"metric": "val/distogram_loss", "value": best.value, "step": best.step,
                                       "source": "tensorboard"}
                if "val/precision_long" in tags:
                    at = [e.value for e in acc.Scalars("val/precision_long") if e.step == best.step]
                    out["precision_long"] = at[-1] if at else None
                return out
        except Exception:  # noqa: BLE001 - unreadable curves: fall back to status.json
            pass
    try:
        status = json.loads((Path(run_dir) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    val = status.get("val") if isinstance(status, dict) else None
    if isinstance(val, dict) and isinstance(val.get("distogram_loss"), (int, float)):
        return {"metric": "val/distogram_loss", "value": val["distogram_loss"], "step": status.get("val_step"),
                "precision_long": val.get("precision_long"), "source": "status.json (latest)"}
    return None


def summaries(views: list[Any]) -> list[dict[str, Any]]:
    """One summary per sweep among the status rows (``RunView``s whose ``sweep`` is set): tasks shown,
    count per state, the array job(s), the task with the lowest validation loss."""
    out: dict[str, dict[str, Any]] = {}
    for v in views:
        if not getattr(v, "sweep", None):
            continue
        s = out.setdefault(v.sweep, {"sweep": v.sweep, "tasks": 0, "states": {}, "best": None})
        s["tasks"] += 1
        s["states"][v.state] = s["states"].get(v.state, 0) + 1
        b = v.best_val
        if b and isinstance(b.get("value"), (int, float)) and (s["best"] is None or b["value"] < s["best"]["value"]):
            s["best"] = {**b, "task": v.name}
    for path, s in out.items():
        data = read_sweep(Path(path)) or {}
        s["array_job_id"] = data.get("array_job_id")
        s["axes"] = data.get("axes")
        s["tasks_total"] = len(data.get("tasks", [])) or s["tasks"]
    return list(out.values())


def summary_line(s: dict[str, Any]) -> str:
    states = ", ".join(f"{n} {st}" for st, n in sorted(s["states"].items(), key=lambda kv: (-kv[1], kv[0])))
    line = f"sweep {s['sweep']}: array job {s.get('array_job_id') or '?'}, {s['tasks_total']} tasks: {states}"
    b = s.get("best")
    if b:
        line += f"; best val loss {b['value']:.4f} ({b['task']}, step {b.get('step', '?')})"
    return line


def format_best(b: dict[str, Any] | None) -> str:
    if not b or not isinstance(b.get("value"), (int, float)):
        return "-"
    return f"{b['value']:.4f}@{b['step']}" if b.get("step") is not None else f"{b['value']:.4f}"


# ------------------------------------------------------------------ sbatch arrays
def array_task_dir(config: str | None, overrides: list[str], task_id: str) -> Path:
    """Where task ``task_id`` of an sbatch job array trains: ``<run.dir>/task-<id>``."""
    if not re.fullmatch(r"\d+", task_id):
        raise ConfigError(f"SLURM_ARRAY_TASK_ID = {task_id!r} is not a task number")
    cfg = load_config(config, overrides)
    return cfg.run_dir / f"task-{task_id}"


def main(argv: list[str] | None = None) -> int:
    """``python -m foldhpc.slurm.sweep --array-task-dir --config CONFIG [--set k=v ...]``: print the
    run directory of this array task (sbatch/train.sbatch); exit 2 with one line on a config error."""
    p = argparse.ArgumentParser(prog="python -m foldhpc.slurm.sweep")
    p.add_argument("--array-task-dir", action="store_true", required=True,
                   help="print <run.dir>/task-$SLURM_ARRAY_TASK_ID for the config and overrides")
    p.add_argument("--config", "-c", metavar="FILE")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args, _ = p.parse_known_args(argv)  # the trainer's other arguments (--no-resume, ...) pass through
    try:
        print(array_task_dir(args.config, args.overrides, os.environ.get("SLURM_ARRAY_TASK_ID", "")))
    except ConfigError as e:
        print(f"foldhpc: config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
