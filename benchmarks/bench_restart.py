"""Issue 10: a crash -> training again inside the allocation (the supervisor's restart).

Runs the default config under ``foldhpc train --supervise`` with a transient fault injected after
step 30 (``FOLDHPC_FAIL_AT_STEP``/``FOLDHPC_FAIL_KIND``/``FOLDHPC_FAIL_ONCE``, foldhpc.faults) and
measures, from the moment of the fault (written by the fault hook into its marker file), the time
until the restarted trainer has finished its first resumed step (its ``first_step`` record in
events.jsonl, polled every 5 ms).
Kinds: an exception, SIGSEGV, SIGKILL (the OOM killer's signal). Default back-off 2 s included.
Goal: median <= 10 s.

    python benchmarks/bench_restart.py [--rounds 3] [--kinds exception,segfault,kill]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import (DEFAULT_CONFIG, REPO, default_out, environment, event_tail, fmt_summary, print_table, summary,
                     verdict, write_json)

FAIL_AT = 30


def one(work: Path, kind: str, i: int) -> dict[str, float]:
    run = work / f"{kind}-{i}"
    marker = work / f"{kind}-{i}.fired"
    env = dict(os.environ, FOLDHPC_FAIL_AT_STEP=str(FAIL_AT), FOLDHPC_FAIL_KIND=kind, FOLDHPC_FAIL_ONCE=str(marker))
    cmd = [sys.executable, "-m", "foldhpc", "train", "--config", str(DEFAULT_CONFIG), "--supervise",
           "--set", f"run.dir={run}", "--set", "train.max_steps=45", "--set", "checkpoint.every_steps=25",
           "--set", "train.val_every=0", "--set", "train.val_max_samples=1", "--set", "run.log_every=5"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resumed_at = None
    tail = event_tail(run)
    while proc.poll() is None:
        if resumed_at is None and marker.exists():
            tail.poll()
            if len(tail.of_kind("first_step")) >= 2:
                resumed_at = time.time()
        time.sleep(0.005)
    assert proc.returncode == 0 and resumed_at is not None, f"{kind}: exit {proc.returncode}; see {run / 'train.log'}"
    fault_at = float(re.search(r" at ([\d.]+)", marker.read_text()).group(1))  # the fault hook's marker file
    tail.poll()
    last = tail.of_kind("first_step")[-1]
    return {"fault_to_resumed_step_s": resumed_at - fault_at,
            "resumed_process_to_first_step_s": float(last.get("after_start_s")), "resumed_at_step": last.step}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kinds", default="exception,segfault,kill")
    ap.add_argument("--out", type=Path, default=default_out("bench_restart"))
    a = ap.parse_args()
    env = environment()
    kinds = a.kinds.split(",")
    res: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory(prefix="bench-restart-") as d:
        for i in range(a.rounds):
            for k in kinds:  # interleaved
                res[k].append(one(Path(d), k, i))
    rows, all_s = [], []
    for k in kinds:
        s = summary(r["fault_to_resumed_step_s"] for r in res[k])
        p = summary(r["resumed_process_to_first_step_s"] for r in res[k])
        all_s += [r["fault_to_resumed_step_s"] for r in res[k]]
        rows.append([k, fmt_summary(s, "s", digits=2), fmt_summary(p, "s", digits=2)])
    total = summary(all_s)
    rows.append(["all", fmt_summary(total, "s", digits=2), ""])
    print_table("fault -> first resumed step inside the allocation (default config, back-off 2 s)",
                ["fault", "fault -> resumed step", "of which: new process start -> first step"], rows)
    print(f"\ngoal median <= 10 s: {verdict(total['median'] <= 10, total['median'])} ({total['median']:.2f} s)")
    write_json(a.out, {"env": env, "args": vars(a), "results": res, "summary": total})
    return 0


if __name__ == "__main__":
    sys.exit(main())
