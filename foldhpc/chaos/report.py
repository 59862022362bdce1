"""The verdict of a chaos run and its report: ``report.json``, ``report.md`` and ``chaos.png``.

The verdict is deliberately strict and separate from the runner (:func:`judge` takes plain
records), so it can be tested on its own: a run passes only if *every* planned fault was
injected and recovered from as its kind promises, both trainings completed, and the final state
digest equals the reference's. Anything else -- one unrecovered fault, a digest that differs, a
missing digest -- fails it, so the tool cannot pass vacuously.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from foldhpc.chaos.kinds import KINDS
from foldhpc.chaos.local import ChaosOutcome, FaultRecord, outcome_to_dict
from foldhpc.chaos.schedule import Plan

log = logging.getLogger(__name__)

PNG_NAME = "chaos.png"


@dataclass
class Verdict:
    passed: bool
    faults_planned: int
    faults_run: int
    recovered: int
    recovery_rate: float
    bit_exact: bool
    problems: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1


def judge(plan_faults: int, records: list[FaultRecord], reference_digest: str | None, final_digest: str | None,
          reference_completed: bool, chaos_completed: bool, final_step: int | None = None,
          max_steps: int | None = None) -> Verdict:
    """Pass only with every planned fault recovered, both runs completed and equal digests."""
    problems: list[str] = []
    recovered = sum(1 for r in records if r.recovered)
    if len(records) != plan_faults:
        problems.append(f"{len(records)} of {plan_faults} planned faults were run")
    for r in records:
        if not r.recovered:
            problems.append(f"fault {r.index} ({r.kind} at step {r.step if r.step is not None else r.planned_step}) "
                            f"not recovered: {'; '.join(r.problems) or 'not injected'}")
    if not reference_completed:
        problems.append("the reference run did not complete")
    if not chaos_completed:
        problems.append("the chaos run did not complete")
    if max_steps is not None and final_step != max_steps:
        problems.append(f"the chaos run's newest checkpoint is at step {final_step}, not {max_steps}")
    bit_exact = bool(reference_digest) and reference_digest == final_digest
    if not bit_exact:
        problems.append(f"final state NOT bit-exact: digest {final_digest or 'missing'} vs reference "
                        f"{reference_digest or 'missing'}")
    rate = recovered / plan_faults if plan_faults else 1.0
    return Verdict(not problems, plan_faults, len(records), recovered, rate, bit_exact, problems)


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def per_kind(records: list[FaultRecord]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        rs = [r for r in records if r.kind == kind]
        if not rs:
            continue
        times = [r.time_to_resume_s for r in rs if r.time_to_resume_s is not None]
        lost = [r.steps_lost for r in rs if r.steps_lost is not None]
        out[kind] = {
            "faults": len(rs), "recovered": sum(r.recovered for r in rs),
            "steps_lost": {"total": sum(lost), "max": max(lost, default=None),
                           "mean": round(sum(lost) / len(lost), 2) if lost else None},
            "time_to_resume_s": {"n": len(times), "p50": _r(percentile(times, 50)), "p95": _r(percentile(times, 95)),
                                 "max": _r(max(times, default=None))},
            "measured_as": next((r.resume_measure for r in rs if r.resume_measure), ""),
            "rejected_checkpoints": sum(len(r.rejected) for r in rs),
        }
    return out


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"host": socket.gethostname(), "platform": platform.platform(),
                            "cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def build(outcome: ChaosOutcome, plan: Plan, verdict: Verdict, *, command: list[str], config: str | None,
          overrides: list[str], backend: str, load_start: tuple[float, ...], load_end: tuple[float, ...],
          skipped_kinds: dict[str, str], nproc: int = 1) -> dict[str, Any]:
    """Everything of the run as one JSON-able document (the source of report.md and the PNG)."""
    t0 = outcome.started_at
    doc: dict[str, Any] = {
        "tool": "foldhpc chaos", "version": __import__("foldhpc").__version__, "backend": backend,
        "command": " ".join(command), "date": time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(t0)),
        "machine": machine(), "load_average": {"start": list(load_start), "end": list(load_end)},
        "config": config, "overrides": overrides, "nproc": nproc, "seed": plan.seed, "plan": plan.to_dict(),
        "skipped_kinds": skipped_kinds,
        "verdict": {"passed": verdict.passed, "faults_planned": verdict.faults_planned,
                    "faults_run": verdict.faults_run, "recovered": verdict.recovered,
                    "recovery_rate": round(verdict.recovery_rate, 4), "bit_exact": verdict.bit_exact,
                    "problems": verdict.problems, "exit_code": verdict.exit_code},
        "per_kind": per_kind(outcome.records),
        "steps_lost_total": sum(r.steps_lost or 0 for r in outcome.records),
    }
    doc.update(outcome_to_dict(outcome))
    doc["timeline"] = _thin(outcome.timeline, t0)
    return doc


def _thin(timeline: list[tuple[float, int]], t0: float, min_dt: float = 0.5) -> list[list[float]]:
    """(seconds since start, step) points, thinned for the file: every drop in step is kept."""
    out: list[list[float]] = []
    for t, s in timeline:
        if out and s >= out[-1][1] and t - t0 - out[-1][0] < min_dt:
            continue
        out.append([round(t - t0, 2), s])
    if timeline and (not out or out[-1][1] != timeline[-1][1]):
        out.append([round(timeline[-1][0] - t0, 2), timeline[-1][1]])
    return out


def _fmt(x: Any, unit: str = "") -> str:
    return "-" if x is None else f"{x}{unit}"


def markdown(doc: dict[str, Any]) -> str:
    v = doc["verdict"]
    m = doc["machine"]
    ref, chaos = doc["reference"], doc["chaos"]
    ranks = f", {doc['nproc']} ranks (--nproc)" if doc.get("nproc", 1) > 1 else ""
    lines = [f"# foldhpc chaos: {v['faults_planned']} faults, {doc['backend']} backend{ranks}", ""]
    lines.append(f"**{'PASSED' if v['passed'] else 'FAILED'}**: {v['recovered']}/{v['faults_planned']} faults "
                 f"recovered ({100 * v['recovery_rate']:.1f} %), final state "
                 f"{'bit-exact with' if v['bit_exact'] else 'DIFFERENT from'} the uninterrupted reference "
                 f"(digest `{(chaos['digest'] or 'missing')[:16]}` vs `{(ref['digest'] or 'missing')[:16]}`); "
                 f"exit {v['exit_code']}.")
    lines += ["", f"- command: `{doc['command']}`", f"- date: {doc['date']}",
              f"- machine: {m.get('host')}, {m.get('cpu', '?')}, {m.get('cpus')} CPUs, {m.get('platform')}, "
              f"Python {m.get('python')}, torch {m.get('torch', '?')}",
              f"- load average (1/5/15 min) at start {'/'.join(f'{x:.2f}' for x in doc['load_average']['start'])}, "
              f"at end {'/'.join(f'{x:.2f}' for x in doc['load_average']['end'])} (a shared machine: other work "
              "ran too)",
              f"- config `{doc['config']}`, seed {doc['seed']}, {doc['plan']['max_steps']} steps, checkpoint every "
              f"{doc['plan']['every_steps']} steps; chaos settings: "
              + ", ".join(f"`{k}={val}`" for k, val in doc["settings"].items())
              + (f"; user overrides: {', '.join(f'`{o}`' for o in doc['overrides'])}" if doc["overrides"] else ""),
              f"- reference (no faults): {ref['wall_s']:.1f} s; chaos run: {chaos['wall_s']:.1f} s, " +
              (f"{len(doc['launches'])} submissions with `foldhpc submit` (the first and one after each user "
               f"scancel; {doc['unplanned_relaunches']} unplanned), {len(set(doc.get('slurm_jobs', [])))} Slurm "
               f"jobs in the run (follow-ups and requeues were Slurm's and foldhpc's; at most "
               f"{doc.get('max_jobs_running', 0)} RUNNING at once), "
               if doc["backend"] == "slurm" else
               f"{len(doc['launches'])} launches of `foldhpc train --supervise` ({doc['relaunches_for_hooks']} of "
               f"them only to carry a further FOLDHPC_FAIL_* hook, after a SIGUSR1 checked to lose 0 steps; "
               f"{doc['unplanned_relaunches']} unplanned), ") + f"{doc['steps_lost_total']} steps lost in all",
              f"- in-job restarts by the supervisor: {doc['in_job_restarts']} (faults that call for one: "
              f"{sum(1 for r in doc['faults'] if KINDS[r['kind']].restarts and not KINDS[r['kind']].ends_launch)}; "
              "more would mean "
              "a restart nobody planned, e.g. a hang timeout hit by a slow step)"]
    if doc["skipped_kinds"]:
        lines.append("- kinds left out: " + "; ".join(f"{k}: {why}" for k, why in doc["skipped_kinds"].items()))
    lines += ["", "| kind | faults | recovered | steps lost (total / max) | time to resume p50 | p95 | max | "
              "measured from -> to |", "|---|---|---|---|---|---|---|---|"]
    for kind, s in doc["per_kind"].items():
        t = s["time_to_resume_s"]
        lines.append(f"| {kind} | {s['faults']} | {s['recovered']} | {s['steps_lost']['total']} / "
                     f"{_fmt(s['steps_lost']['max'])} | {_fmt(t['p50'], ' s')} | {_fmt(t['p95'], ' s')} | "
                     f"{_fmt(t['max'], ' s')} | {s['measured_as']} |")
    if v["problems"]:
        lines += ["", "## Problems", ""] + [f"- {p}" for p in v["problems"]]
    lines += ["", f"![time to resume per kind; step over wall time with every fault]({PNG_NAME})", ""]
    if TIMELINE_NAME in doc.get("figures", []):
        lines += [f"Every process start of the chaos run, drawn by `foldhpc plot`: [{TIMELINE_NAME}]({TIMELINE_NAME})",
                  ""]
    lines += ["## Every fault", "",
              "| # | kind | variant | step | recovered | steps lost | time to resume | checkpoint used | rejected | "
              "notes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["faults"]:
        notes = "; ".join(r["notes"] + r["problems"])
        lines.append(f"| {r['index']} | {r['kind']} | {r['variant']} | {_fmt(r['step'])} | "
                     f"{'yes' if r['recovered'] else '**no**'} | {_fmt(r['steps_lost'])} | "
                     f"{_fmt(r['time_to_resume_s'], ' s')} | {r['checkpoint_used'] or '-'} | "
                     f"{', '.join(r['rejected']) or '-'} | {notes} |")
    lines += ["", "Kinds: " + " ".join(f"**{k}**: {spec.summary}." for k, spec in KINDS.items()), ""]
    return "\n".join(lines)


def plot(doc: dict[str, Any], out: Path) -> Path | None:
    """Left: time to resume per kind (every fault a dot, the median a bar). Right: training step
    over wall time of the chaos run, every fault marked where it hit. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no %s (pip install foldhpc[plot])", PNG_NAME)
        return None
    kinds = list(KINDS)
    colors = {k: plt.get_cmap("tab10")(i % 10) for i, k in enumerate(kinds)}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 5.5), gridspec_kw={"width_ratios": [1, 1.6]})
    shown = [k for k in kinds if doc["per_kind"].get(k, {}).get("time_to_resume_s", {}).get("n")]
    for i, k in enumerate(shown):
        ts = [r["time_to_resume_s"] for r in doc["faults"] if r["kind"] == k and r["time_to_resume_s"] is not None]
        jitter = [i + 0.25 * ((j * 0.618) % 1 - 0.5) for j in range(len(ts))]
        ax1.scatter(jitter, ts, s=12, color=colors[k], alpha=0.7)
        med = doc["per_kind"][k]["time_to_resume_s"]["p50"]
        ax1.hlines(med, i - 0.35, i + 0.35, color="black", lw=2)
    ax1.set_xticks(range(len(shown)))
    ax1.set_xticklabels(shown, rotation=35, ha="right")
    ax1.set_ylabel("seconds (bar: median)")
    ax1.set_title("time from fault to first resumed step\n(unwritable_dir: to the next durable checkpoint)",
                  fontsize=10)
    ax1.set_ylim(bottom=0)
    ax1.grid(axis="y", alpha=0.3)
    tl = doc["timeline"]
    if tl:
        ax2.plot([p[0] / 60 for p in tl], [p[1] for p in tl], color="0.3", lw=0.8, label="training step")
    t0 = doc["started_at"]
    seen: set[str] = set()
    for r in doc["faults"]:
        if r["injected_at"] is None:
            continue
        k = r["kind"]
        ax2.scatter([(r["injected_at"] - t0) / 60], [r["step"] if r["step"] is not None else r["planned_step"]],
                    color=colors[k], s=18, marker="o" if r["recovered"] else "x", zorder=3,
                    label=k if k not in seen else None)
        seen.add(k)
    ax2.set_xlabel(f"minutes since the chaos run started (after the {doc['reference']['wall_s']:.0f} s reference run)")
    ax2.set_ylabel("step")
    v = doc["verdict"]
    ax2.set_title(f"chaos run: {v['recovered']}/{v['faults_planned']} recovered, "
                  f"{'bit-exact' if v['bit_exact'] else 'NOT bit-exact'}", fontsize=10)
    ax2.legend(fontsize=7, ncol=2, loc="upper left")
    ax2.grid(alpha=0.3)
    fig.suptitle(f"foldhpc chaos, {doc['backend']}, seed {doc['seed']}, {doc['date']}", fontsize=11)
    fig.tight_layout()
    path = out / PNG_NAME
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


TIMELINE_NAME = "timeline.png"
TIMELINE_MAX_FAULTS = 60  # one row per process start: beyond this the picture is too tall to read


def timeline(doc: dict[str, Any], out: Path) -> Path | None:
    """The chaos run drawn by ``foldhpc plot``'s timeline (one row per process start), every fault
    marked; optional: None (logged) where that module is missing, fails, or the run is too long."""
    if len(doc["faults"]) > TIMELINE_MAX_FAULTS:
        log.info("chaos: no %s: %d faults are too many rows for one picture (at most %d)", TIMELINE_NAME,
                 len(doc["faults"]), TIMELINE_MAX_FAULTS)
        return None
    try:
        from foldhpc.monitor.plot import plot_timeline
    except ImportError as e:
        log.info("chaos: no %s: %s", TIMELINE_NAME, e)
        return None
    marks = [(float(r["injected_at"]), str(r["kind"])) for r in doc["faults"] if r["injected_at"] is not None]
    try:
        return Path(plot_timeline(Path(doc["chaos"]["run_dir"]), out / TIMELINE_NAME, marks))
    except Exception as e:  # noqa: BLE001 - another module's picture must never fail the chaos verdict
        log.warning("chaos: no %s: %s: %s", TIMELINE_NAME, type(e).__name__, e)
        return None


def write(doc: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    pngs = [p for p in (plot(doc, out), timeline(doc, out)) if p is not None]
    doc["figures"] = [p.name for p in pngs]
    paths = [out / "report.json", out / "report.md"]
    paths[0].write_text(json.dumps(doc, indent=1) + "\n")
    paths[1].write_text(markdown(doc))
    return paths + pngs


def argv() -> list[str]:
    """The command as typed (``foldhpc chaos ...``), for the report."""
    prog = Path(sys.argv[0]).name
    args = sys.argv[1:]
    if prog in ("__main__.py", "-m"):
        prog = "foldhpc"
    return [prog, *args]
