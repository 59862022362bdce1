"""``foldhpc plot RUN_DIR``: the run's timeline as a picture (``<run_dir>/timeline.png``).

Top: one row per process start (restart) or Slurm job run, bars for queue wait, startup,
training (productive / recomputed), checkpoint stalls, validation, data wait and idle time --
the very segments ``foldhpc goodput`` sums (:mod:`foldhpc.monitor.timeline`) -- with checkpoint
writes as thin bars under each row and markers for signals, crashes, restarts, requeues and
rollbacks; faults injected from outside (``foldhpc chaos``) as vertical lines. Bottom, on the same
time axis: the training step over wall time, so a crash shows as the step falling back to the
checkpoint it resumed from.

matplotlib is optional (``pip install 'foldhpc[plot]'``) and imported only here, with the Agg
backend: this runs on login and compute nodes without a display.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from foldhpc.monitor.timeline import (CHECKPOINT, DATA_WAIT, IDLE, PRODUCTIVE, QUEUE, RECOMPUTED, STARTUP,
                                      VALIDATION, Timeline, build_timeline)
from foldhpc.records.exitcodes import ExitCode
from foldhpc.records.layout import EVENTS_FILE

log = logging.getLogger(__name__)

DEFAULT_NAME = "timeline.png"
COLORS = {QUEUE: "#bdbdbd", STARTUP: "#fdae6b", PRODUCTIVE: "#31a354", RECOMPUTED: "#de2d26",
          CHECKPOINT: "#3182bd", VALIDATION: "#756bb1", DATA_WAIT: "#fed976", IDLE: "#f0f0f0"}
#: marker kind -> (matplotlib marker, color)
MARKERS = {"signal": ("v", "#e6550d"), "crash": ("X", "#a50f15"), "restart": (">", "#000000"),
           "requeue": ("^", "#6a51a3"), "submitted": ("|", "#636363"), "fault": ("*", "#ff7f00"),
           "rollback": ("<", "#a50f15"), "completed": ("D", "#006d2c"), "gave_up": ("x", "#000000"),
           "stopped": ("s", "#6a51a3")}


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable("matplotlib is not installed: pip install 'foldhpc[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw(tl: Timeline, out: Path, fault_marks: list[tuple[float, str]] | None = None) -> Path:
    """Draw ``tl`` into ``out`` (PNG); ``fault_marks``: (epoch time, label) of faults injected from
    outside (``foldhpc chaos``), drawn as vertical lines across both panels."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    t0 = tl.start
    n = max(1, len(tl.lanes))
    fig, (ax, ax2) = plt.subplots(2, 1, sharex=True, figsize=(12, 2.2 + 0.45 * n + 2.2),
                                  gridspec_kw={"height_ratios": [max(1.0, 0.45 * n), 2.2]})
    for kind, color in COLORS.items():
        for lane in {s.lane for s in tl.segments if s.kind == kind}:
            mine = [(s.start - t0, s.duration) for s in tl.segments if s.kind == kind and s.lane == lane
                    and s.duration > 0]
            if mine:
                ax.broken_barh(mine, (lane - 0.3, 0.6), facecolors=color,
                               edgecolor="#999999" if kind == IDLE else "none", linewidth=0.3)
    for w in tl.writes:  # checkpoint writes (background ones overlap training): a thin bar under the row
        ax.broken_barh([(w.end - w.write_s - t0, max(w.write_s, tl.wall_s / 2000))], (w.lane + 0.32, 0.12),
                       facecolors=COLORS[CHECKPOINT])
    seen: set[str] = set()
    for m in tl.marks:
        marker, color = MARKERS.get(m.kind, ("o", "black"))
        y = m.lane if m.lane is not None else -0.6
        ax.plot([m.time - t0], [y], marker=marker, color=color, markersize=9, linestyle="none",
                label=m.kind if m.kind not in seen else None, zorder=5)
        seen.add(m.kind)
    for t, label in fault_marks or []:
        for a in (ax, ax2):
            a.axvline(t - t0, color=MARKERS["fault"][1], linestyle="--", linewidth=1)
        ax.annotate(label, (t - t0, n - 0.4), rotation=90, fontsize=7, va="top", ha="right",
                    color=MARKERS["fault"][1])
    ax.set_yticks(range(len(tl.lanes)))
    ax.set_yticklabels([f"{ln.label}\n{ln.outcome[:32]}" for ln in tl.lanes], fontsize=7)
    ax.set_ylim(n - 0.5, -1.0)
    handles = [Patch(color=c, label=k) for k, c in COLORS.items()]
    h2, _ = ax.get_legend_handles_labels()
    ax.legend(handles=handles + h2, fontsize=7, ncol=min(8, len(handles) + len(h2)), loc="lower left",
              bbox_to_anchor=(0, 1.0), frameon=False)
    fig.suptitle(f"{tl.run_dir}: {tl.wall_s:.1f} s wall" + (" (running)" if tl.running else "")
                 + ("" if tl.steps_known
                    else f" -- no {EVENTS_FILE}: made before foldhpc recorded events, steps unknown"),
                 fontsize=9)

    # step over wall time: a line per process start, so a restart shows as a fall back
    lanes_pts: dict[int, list[tuple[float, int]]] = {}
    for ln in tl.lanes:
        if ln.pid is None:
            continue
        pts = [(t - t0, s) for t, s in tl.step_points if ln.start - 1e-3 <= t <= ln.end + 1e-3]
        if ln.start_step is not None:
            pts.insert(0, (ln.start - t0, ln.start_step))
        if pts and ln.last_step is not None and ln.last_step > pts[-1][1]:  # the step it died in
            pts.append((ln.end - t0, ln.last_step))
        lanes_pts[ln.index] = pts
    for lane, pts in lanes_pts.items():
        if pts:
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], drawstyle="steps-post", linewidth=1.2)
    ax2.set_ylabel("training step")
    ax2.set_xlabel("seconds since the run's first record")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_timeline(run_dir: Path, out: Path, fault_marks: list[tuple[float, str]] | None = None) -> Path:
    """The picture of ``run_dir``'s timeline in ``out``; what ``foldhpc chaos`` calls for its report.
    Raises PlotUnavailable without matplotlib, FileNotFoundError if ``run_dir`` has no records."""
    return draw(build_timeline(Path(run_dir)), Path(out), fault_marks)


# ------------------------------------------------------------------ command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("-o", "--output", metavar="FILE.png", help=f"where to write it (default RUN_DIR/{DEFAULT_NAME})")


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        print(f"foldhpc plot: {run_dir}: no such run directory", file=sys.stderr)
        return ExitCode.USAGE
    out = Path(args.output) if args.output else run_dir / DEFAULT_NAME
    try:
        written = plot_timeline(run_dir, out)
    except PlotUnavailable as e:
        print(f"foldhpc plot: {e}", file=sys.stderr)
        return ExitCode.USAGE
    except FileNotFoundError as e:
        print(f"foldhpc plot: {e}", file=sys.stderr)
        return ExitCode.USAGE
    print(written)
    return ExitCode.OK
