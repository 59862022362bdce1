"""Shared helpers for the foldhpc benchmarks: statistics, tables, JSON output, training runs.

Not a benchmark itself. The scripts next to it import it as ``_common`` (they are run as
``python benchmarks/bench_*.py`` so this folder is on ``sys.path``).

What a training run did is read from its ``<run.dir>/events.jsonl`` (foldhpc.records.events), never
from ``train.log``: that is prose for people and may be reworded. Only the records of rank 0 and of
rank-less processes (the supervisor) are read, the run's story as ``train.log`` told it; a run that
grows is followed with :func:`event_tail` (foldhpc.chaos.eventtail: appended bytes, complete lines).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from foldhpc.chaos.eventtail import EventTail
from foldhpc.records.events import Event, iter_events
from foldhpc.records.layout import EVENTS_FILE

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "default.toml"
TRAINRUN = Path(__file__).resolve().with_name("_trainrun.py")


# ------------------------------------------------------------------ statistics
def summary(xs: Iterable[float]) -> dict[str, float]:
    """median / min / max / n of ``xs`` (NaN for an empty list)."""
    v = [float(x) for x in xs]
    if not v:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}


def fmt_summary(s: dict[str, float], unit: str = "", scale: float = 1.0, digits: int = 3) -> str:
    """``median [min..max] unit`` (n=...)."""
    if not s["n"]:
        return "n/a"
    f = f"{{:.{digits}f}}"
    return (f"{f.format(s['median'] * scale)} [{f.format(s['min'] * scale)}..{f.format(s['max'] * scale)}]"
            f"{(' ' + unit) if unit else ''} (n={s['n']})")


def verdict(ok: bool, *values: float) -> str:
    """OK / MISSED, or n/a when any of ``values`` (the compared figures) is NaN."""
    if any(v != v for v in values):
        return "n/a"
    return "OK" if ok else "MISSED"


# ------------------------------------------------------------------ output
def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = "  ".join("-" * w for w in widths)
    print(f"\n== {title}")
    print("  ".join(h.ljust(w) for h, w in zip(cells[0], widths)))
    print(line)
    for r in cells[1:]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    sys.stdout.flush()


def default_out(name: str) -> Path:
    return REPO / "bench-out" / f"{name}.json"


def environment() -> dict[str, Any]:
    import torch

    return {"python": platform.python_version(), "torch": str(torch.__version__),
            "cpus": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "host": platform.node(), "loadavg_start": os.getloadavg(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = dict(data, loadavg_end=os.getloadavg())
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    print(f"\nwrote {path}")


# ------------------------------------------------------------------ training runs
def train_cmd(run_dir: Path, overrides: Sequence[str] = (), config: Path = DEFAULT_CONFIG,
              trace: Path | None = None) -> list[str]:
    """Command line of a training run: the real CLI, or the traced runner when ``trace`` is set."""
    sets = [a for o in [f"run.dir={run_dir}", *overrides] for a in ("--set", o)]
    if trace is not None:
        return [sys.executable, str(TRAINRUN), "--trace", str(trace), "--config", str(config), *sets]
    return [sys.executable, "-m", "foldhpc", "train", "--config", str(config), *sets]


def run_training(run_dir: Path, overrides: Sequence[str] = (), trace: Path | None = None,
                 timeout: float = 900.0) -> int:
    """Run one training process to completion (console output to ``<run_dir>.console``)."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{run_dir}.console", "ab") as console:
        return subprocess.run(train_cmd(run_dir, overrides, trace=trace), cwd=REPO, stdout=console,
                              stderr=subprocess.STDOUT, timeout=timeout).returncode


def run_events(run_dir: Path, kind: str | None = None) -> list[Event]:
    """The records of rank 0 and of rank-less processes in ``<run_dir>/events.jsonl``, in file order,
    optionally of one ``kind`` (nothing if the file does not exist)."""
    return [e for e in iter_events(run_dir) if e.rank in (None, 0) and (kind is None or e.kind == kind)]


def event_tail(run_dir: Path) -> EventTail:
    """A reader of ``<run_dir>/events.jsonl`` as it grows: each ``poll()`` parses the complete lines
    appended since the last one (rank 0 and rank-less records only)."""
    return EventTail(Path(run_dir) / EVENTS_FILE)


def progress_windows(events: Iterable[Event]) -> list[dict[str, float]]:
    """The ``progress`` records among ``events`` (one per log window): step, max_steps, samples/s,
    data wait fraction."""
    return [{"step": int(e["step"]), "max_steps": int(e["max_steps"]), "samples_per_s": float(e["samples_per_s"]),
             "data_wait_frac": float(e["data_wait_frac"])} for e in events if e.kind == "progress"]


def progress_records(run_dir: Path) -> list[dict[str, float]]:
    """The progress windows of a run (rank 0), see :func:`progress_windows`."""
    return progress_windows(run_events(run_dir, "progress"))


def wait_for(cond: Callable[[], Any], timeout: float, poll: float = 0.005) -> Any:
    """Poll ``cond`` until it returns something truthy; that value, or None after ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > end:
            return None
        time.sleep(poll)


def read_json(path: Path) -> Any:
    """Parsed JSON file, or None while it is missing or being replaced."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
