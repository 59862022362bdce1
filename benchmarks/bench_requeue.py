"""P6: preemption -> training again, on the real local Slurm cluster.

Submits a tiny foldhpc training job with ``foldhpc submit``, waits until it trains, sends the
preemption signal (``scancel --signal=USR1``, what Slurm sends ``signal_lead`` before a time limit
or on partition preemption with ``preempt_send_user_signal``) and measures, from the signal:

* ``durable_s``   the checkpoint is committed in checkpoints/manifest.json
* ``running_s``   Slurm runs the requeued job again (squeue state R)
* ``resumed_s``   the first resumed training step is done (train.log)

for the cluster profile with Slurm's defaults and with the documented settings
(``AuthInfo=cred_expire=5``, ``SchedulerParameters=bf_interval=1,sched_interval=1``, KillWait=10).
Goal: resumed_s < 180 s with defaults, <= 20 s with the documented settings.

    python benchmarks/bench_requeue.py [--repeats 3] [--profiles fast,defaults] [--quick]

Needs root (it switches the local cluster's profile with tests/slurm/cluster.sh, which drops queued
jobs) and leaves the cluster in the "fast" profile.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"


def sh(*cmd: str, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
                       cwd=ROOT, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr[-2000:]}")
    return p.stdout


def poll(fn, timeout: float, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(every)
    raise TimeoutError(fn.__doc__ or "poll timed out")


def one_trial(workdir: Path) -> dict[str, float]:
    run_dir = workdir / f"run-{time.monotonic_ns()}"
    sets = {"run.dir": str(run_dir), "data.path": str(ROOT / "tests/data/good"), "train.max_steps": 100000,
            "run.log_every": 1, "train.threads": 1, "slurm.gpus": 1, "slurm.cpus_per_task": 1,
            "slurm.mem": "2G", "slurm.time": "30m", "slurm.signal_lead": "60s", "slurm.partition": "debug"}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    out = sh(sys.executable, "-m", "foldhpc", "submit", "--config", str(ROOT / "configs/tiny.toml"), *args)
    job = re.search(r"submitted job (\d+)", out).group(1)
    log = run_dir / "train.log"

    def training() -> bool:
        """job trains"""
        return log.exists() and re.search(r"step 20/", log.read_text()) is not None

    try:
        poll(training, 180)
        manifest = run_dir / "checkpoints" / "manifest.json"
        before = manifest.read_text() if manifest.exists() else ""
        t0 = time.monotonic()
        sh("scancel", "--signal=USR1", job)

        def durable() -> bool:
            """checkpoint committed"""
            return manifest.exists() and manifest.read_text() != before

        poll(durable, 60, 0.005)
        t_durable = time.monotonic() - t0

        def running_again() -> bool:
            """requeued job running"""
            st = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T|%r"], capture_output=True, text=True).stdout
            restarts = re.search(r"Restarts=(\d+)", subprocess.run(["scontrol", "show", "job", "-o", job],
                                                                  capture_output=True, text=True).stdout)
            return st.startswith("RUNNING") and restarts is not None and int(restarts.group(1)) >= 1

        poll(running_again, 400, 0.1)
        t_running = time.monotonic() - t0

        def resumed() -> bool:
            """first resumed step logged"""
            text = log.read_text()
            i = text.find("resumed from")
            return i >= 0 and "first step" in text[i:]

        poll(resumed, 120, 0.02)
        t_resumed = time.monotonic() - t0
        startup = json.loads((run_dir / "status.json").read_text()).get("startup", {})
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    return {"durable_s": t_durable, "running_s": t_running, "resumed_s": t_resumed,
            "job_start_to_first_step_s": startup.get("process_to_first_step_s", float("nan"))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profiles", default="fast,defaults")
    ap.add_argument("--quick", action="store_true", help="one trial, fast profile only")
    ap.add_argument("--out", default=str(ROOT / "bench-out" / "requeue.json"))
    args = ap.parse_args()
    profiles = ["fast"] if args.quick else args.profiles.split(",")
    repeats = 1 if args.quick else args.repeats
    results: dict[str, list[dict[str, float]]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-requeue-") as tmp:
            for prof in profiles:
                sh("bash", str(CLUSTER), "up", env={"FOLDHPC_SLURM_PROFILE": prof})
                n = repeats if prof == "fast" else max(1, repeats - 2)  # each defaults trial waits ~150 s
                results[prof] = [one_trial(Path(tmp)) for _ in range(n)]
    finally:
        sh("bash", str(CLUSTER), "up", env={"FOLDHPC_SLURM_PROFILE": "fast"})
    goal = {"fast": 20.0, "defaults": 180.0}
    print(f"{'profile':<9} {'n':>2} {'durable_s':>10} {'running_s':>10} {'resumed_s':>10} "
          f"{'job->1st step':>14} {'goal':>6}  ratio")
    summary = {}
    for prof, rows in results.items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        summary[prof] = {"n": len(rows), "median": med, "min_resumed_s": min(r["resumed_s"] for r in rows),
                         "max_resumed_s": max(r["resumed_s"] for r in rows), "trials": rows, "goal_s": goal[prof]}
        print(f"{prof:<9} {len(rows):>2} {med['durable_s']:>10.2f} {med['running_s']:>10.2f} "
              f"{med['resumed_s']:>10.2f} {med['job_start_to_first_step_s']:>14.2f} {goal[prof]:>6.0f}  "
              f"{med['resumed_s'] / goal[prof]:.2f} of goal")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
