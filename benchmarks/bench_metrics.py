"""Issue 25: what publishing a run's metrics (``monitor.textfile_dir``) costs the training.

The publisher (:class:`foldhpc.monitor.metrics.TextfilePublisher`) runs as a thread in the process
that runs the training when there is no supervisor (the worst case measured here: it shares the
trainer's interpreter and GIL; under a supervisor it is another process). Three figures:

1. one publication (collect the run's records, render, write the .prom file atomically), timed on
   the run directory of a real 200-step default-config run, median over repeats; the same on a
   copy whose events.jsonl has grown to ``--long-events`` records (weeks of a real run);
2. its cost per step at the default cadence: a publication's time / ``monitor.textfile_every``
   (each publication can hold up the training thread at most for its own duration), plus goodput's
   recomputation, which the publisher bounds to ``GOODPUT_SHARE`` of the time (it rebuilds the whole
   timeline: seconds for a long run) -- the goal is <= 0.1 % of step time;
3. A/B in the same run: the median step time (progress windows) of 200-step default runs with
   publishing every 1 s (15 x the default cadence) and without, interleaved; the ratio.

    python benchmarks/bench_metrics.py [--rounds 3] [--quick]

It also writes the 200-step run's metrics (``foldhpc metrics``) to ``bench-out/metrics-200.prom``:
the README's table of the metric set lists them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import (REPO, default_out, environment, fmt_summary, print_table, progress_records, run_training,
                     summary, verdict, write_json)

from foldhpc.config import load_config, parse_duration
from foldhpc.monitor.goodput import goodput_of
from foldhpc.monitor.metrics import GOODPUT_SHARE, TextfilePublisher

GOAL = 0.001  # of step time


def step_times(run: Path, batch: int) -> list[float]:
    """Seconds per step of each progress window but the first (startup, first-step compile)."""
    return [batch / w["samples_per_s"] for w in progress_records(run)[1:]]


def publish_times(run: Path, textfile: Path, n: int) -> tuple[list[float], list[float]]:
    """(seconds of a publication without goodput, seconds of goodput's recomputation) x n."""
    cfg = load_config(run / "config.toml", [f"monitor.textfile_dir={textfile}"])
    pub = TextfilePublisher(cfg)
    pub.publish()  # the first reads the whole events.jsonl; the later ones read on from there
    pub.seconds.clear()
    for _ in range(n):
        pub.publish()
    assert len(pub.seconds) == n, "a publication failed: see the log"
    goodput = []
    for _ in range(max(3, n // 10)):
        t0 = time.perf_counter()
        goodput_of(run, use_sacct=False)
        goodput.append(time.perf_counter() - t0)
    return pub.seconds, goodput


def grow_events(run: Path, records: int) -> None:
    """Append ``records`` progress records after the run's own (as a long run has them)."""
    lines = [ln for ln in (run / "events.jsonl").read_text().splitlines() if '"kind":"progress"' in ln]
    last = json.loads(lines[-1])
    with open(run / "events.jsonl", "a") as f:
        for i in range(records):
            rec = dict(last, t=last["t"] + i, step=last["step"] + 25 * (i + 1))
            f.write(json.dumps(rec, separators=(",", ":")) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="A/B pairs of 200-step runs (default 3)")
    ap.add_argument("--repeats", type=int, default=30, help="publications timed per run directory")
    ap.add_argument("--long-events", type=int, default=100_000, help="records of the grown events.jsonl")
    ap.add_argument("--quick", action="store_true", help="1 pair of 60-step runs, 5 publications, 5k records")
    ap.add_argument("--out", type=Path, default=default_out("metrics"))
    args = ap.parse_args()
    steps, rounds, repeats, long_n = (60, 1, 5, 5000) if args.quick else (200, args.rounds, args.repeats,
                                                                         args.long_events)
    env = environment()
    cfg = load_config(REPO / "configs" / "default.toml")
    every = parse_duration(cfg.monitor.textfile_every)
    common = [f"train.max_steps={steps}", "train.val_every=0", "train.val_max_samples=1"]
    work = Path(tempfile.mkdtemp(prefix="bench-metrics-"))
    try:
        ab: dict[str, list[float]] = {"off": [], "on": []}
        per_run: dict[str, list[float]] = {"off": [], "on": []}
        run0 = None
        for i in range(rounds):
            for mode in (("off", "on") if i % 2 == 0 else ("on", "off")):
                run = work / f"{mode}-{i}"
                extra = [f"monitor.textfile_dir={work / 'textfile'}", "monitor.textfile_every=1s"] if mode == "on" \
                    else []
                rc = run_training(run, common + extra)
                assert rc == 0, f"training failed: {run}.console"
                st = step_times(run, cfg.train.batch_size)
                ab[mode] += st
                per_run[mode].append(statistics.median(st))
                run0 = run0 or run
        assert run0 is not None
        prom = subprocess.run([sys.executable, "-m", "foldhpc", "metrics", "--no-sacct", str(run0)], cwd=REPO,
                              capture_output=True, text=True, check=True).stdout
        out_prom = args.out.with_name(f"metrics-{steps}.prom")
        out_prom.parent.mkdir(parents=True, exist_ok=True)
        out_prom.write_text(prom)
        short = publish_times(run0, work / "tf-short", repeats)
        grown = work / "grown"
        shutil.copytree(run0, grown)
        grow_events(grown, long_n)
        long_ = publish_times(grown, work / "tf-long", repeats)
        step_s = statistics.median(ab["off"])
        rows = []
        res: dict[str, object] = {"env": env, "steps": steps, "cadence_s": every, "step_s": summary(ab["off"])}
        for label, (xs, gp) in ((f"{steps}-step run", short), (f"events.jsonl of {long_n} records", long_)):
            s, g = summary(xs), summary(gp)
            # goodput is recomputed once its cost is at most GOODPUT_SHARE of the time since
            frac = s["median"] / every + min(g["median"] / every, GOODPUT_SHARE)
            rows.append([label, fmt_summary(s, "ms", 1e3, 2), fmt_summary(g, "ms", 1e3, 1), f"{100 * frac:.4f} %",
                         f"{1e3 * frac * step_s:.4f} ms", verdict(frac <= GOAL, frac)])
            res[label] = {"publish_s": s, "goodput_s": g, "share_of_time": frac}
        print_table(f"one publication, and its cost at the default cadence ({every:.0f} s); step "
                    f"{fmt_summary(summary(ab['off']), 's', 1, 4)}",
                    ["run directory", "publication", "goodput recomputed", "share of step time", "per step",
                     f"goal <= {100 * GOAL} %"], rows)
        on, off = statistics.median(ab["on"]), statistics.median(ab["off"])
        print_table("A/B: median step time, publishing every 1 s vs off (interleaved)",
                    ["publishing", "step time", "per-run medians", "ratio"],
                    [["off", fmt_summary(summary(ab["off"]), "s", 1, 4), per_run["off"], "1"],
                     ["every 1 s", fmt_summary(summary(ab["on"]), "s", 1, 4), per_run["on"], f"{on / off:.4f}"]])
        res["ab"] = {"off": summary(ab["off"]), "on_every_1s": summary(ab["on"]), "ratio": on / off,
                     "per_run": per_run}
        print(f"\nthe {steps}-step run's metrics: {out_prom}")
        write_json(args.out, res)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    t0 = time.monotonic()
    rc = main()
    print(f"({time.monotonic() - t0:.0f} s)")
    raise SystemExit(rc)
