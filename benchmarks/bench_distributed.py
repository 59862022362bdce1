"""Multi-rank training on CPU/gloo (issue 9): what the stop agreement costs, and scaling.

D1  the per-step stop agreement: one ``agree()`` (a 2-int64 MAX all-reduce on the gloo control
    group) between 2 real ranks, timed over many calls, against the step time of the default
    model with 2 ranks measured in D2 of the same run. Also the per-step pair-count sum that
    weighs each rank's loss (the other collective a multi-rank step adds besides DDP's own).
    Goal: agreement <= 1 % of step time.
D2  scaling: samples/s (global) of the default config, same per-rank batch (4), interleaved:
    1 rank x 1 thread, 1 rank x 2 threads (both cores, the fair single-process baseline here)
    and 2 ranks x 1 thread (``foldhpc train --nproc 2``). Medians of the log windows (rank 0's
    ``progress`` records in events.jsonl) after the first (warm-up) one.

    python benchmarks/bench_distributed.py [--rounds 2] [--steps 120] [--calls 2000] [--quick]

2 cores here: two ranks cannot beat two threads by much; the figure is the machinery's overhead,
not the GPU-cluster scaling.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import (DEFAULT_CONFIG, REPO, default_out, environment, fmt_summary, print_table,
                     progress_records, summary, verdict, write_json)


def agree_worker(calls: int, out: Path) -> None:
    """One rank of D1 (run under RANK/WORLD_SIZE/MASTER_* from the parent)."""
    import torch

    from foldhpc.distributed.env import from_environ
    from foldhpc.distributed.group import open_group

    torch.set_num_threads(1)
    g = open_group(from_environ(), "gloo", "cpu", 120)
    for _ in range(200):  # warm-up
        g.agree(0, False)
    t_agree, t_sum = [], []
    for i in range(calls):
        t0 = time.perf_counter()
        g.agree(0, i % 97 == 0)
        t_agree.append(time.perf_counter() - t0)
        x = torch.tensor(123.0)
        t0 = time.perf_counter()
        g.sum_(x)
        t_sum.append(time.perf_counter() - t0)
    g.barrier()
    if g.rank == 0:
        out.write_text(f"{statistics.median(t_agree)} {statistics.median(t_sum)} "
                       f"{sorted(t_agree)[int(0.95 * len(t_agree))]}\n")
    g.close()


def measure_agree(calls: int) -> dict[str, float]:
    from foldhpc.resilience.supervisor import free_port

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "agree.txt"
        port = str(free_port())
        procs = [subprocess.Popen([sys.executable, __file__, "--agree-worker", str(calls), str(out)], cwd=REPO,
                                  env=dict(os.environ, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                           MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                                           PYTHONPATH=str(REPO))) for r in range(2)]
        for p in procs:
            assert p.wait(timeout=600) == 0, "agree worker failed"
        a, s, p95 = (float(x) for x in out.read_text().split())
    return {"agree_median_s": a, "agree_p95_s": p95, "pair_sum_median_s": s}


def train_rate(work: Path, name: str, nproc: int, threads: int, steps: int, batch_per_rank: int) -> list[float]:
    run = work / name
    cmd = [sys.executable, "-m", "foldhpc", "train", "--config", str(DEFAULT_CONFIG),
           "--set", f"run.dir={run}", "--set", f"train.max_steps={steps}", "--set", "run.log_every=10",
           "--set", f"train.batch_size={batch_per_rank * nproc}", "--set", f"train.threads={threads}",
           "--set", "train.val_every=0", "--set", "train.val_max_samples=1", "--set", "checkpoint.interval=0",
           "--no-resume"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    with open(f"{run}.console", "ab") as console:
        rc = subprocess.run(cmd, cwd=REPO, stdout=console, stderr=subprocess.STDOUT, timeout=1800).returncode
    assert rc == 0, f"{name}: exit {rc}; see {run}.console"
    windows = progress_records(run)  # rank 0's windows (samples/s of the global batch)
    return [w["samples_per_s"] for w in windows[1:]]  # the first window includes warm-up


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--agree-worker":
        agree_worker(int(sys.argv[2]), Path(sys.argv[3]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--quick", action="store_true", help="a short plumbing run (CI-sized), no verdicts")
    ap.add_argument("--out", type=Path, default=default_out("bench_distributed"))
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.steps, a.calls = 1, 30, 200
    env = environment()
    agree = measure_agree(a.calls)
    rates: dict[str, list[float]] = {"1 rank x 1 thread": [], "1 rank x 2 threads": [], "2 ranks x 1 thread": []}
    with tempfile.TemporaryDirectory(prefix="bench-dist-") as d:
        work = Path(d)
        for r in range(a.rounds):
            for name, nproc, threads in (("1 rank x 1 thread", 1, 1), ("2 ranks x 1 thread", 2, 1),
                                         ("1 rank x 2 threads", 1, 2)):
                rates[name] += train_rate(work, f"{name.replace(' ', '_')}-{r}", nproc, threads, a.steps, 4)
    s = {k: summary(v) for k, v in rates.items()}
    base1, base2, two = (s[k]["median"] for k in rates)
    step_2rank_s = 8 / two  # global batch 8 per step
    frac = agree["agree_median_s"] / step_2rank_s
    print_table("D1 stop agreement (2 ranks, gloo, median over calls)", ["what", "figure"], [
        ["agree() per step", f"{agree['agree_median_s'] * 1e6:.0f} us (p95 {agree['agree_p95_s'] * 1e6:.0f} us)"],
        ["pair-count sum per step", f"{agree['pair_sum_median_s'] * 1e6:.0f} us"],
        ["2-rank step time (D2)", f"{step_2rank_s * 1e3:.1f} ms"],
        ["agreement / step time", f"{100 * frac:.2f} % (goal <= 1 %: "
                                  f"{'n/a (quick)' if a.quick else verdict(frac <= 0.01, frac)})"],
    ])
    print_table("D2 samples/s, default model, 4 samples per rank per step", ["layout", "samples/s", "vs 1 rank x 1"], [
        [k, fmt_summary(s[k], digits=1), f"{s[k]['median'] / base1:.2f}x"] for k in rates])
    print(f"\n2 ranks x 1 thread vs 1 rank x 2 threads (both use both cores): {two / base2:.2f}x")
    write_json(a.out, {"env": env, "args": vars(a), "agree": agree, "rates": rates, "summary": s,
                       "step_2rank_s": step_2rank_s, "agree_frac": frac})
    return 0


if __name__ == "__main__":
    sys.exit(main())
