"""P6: preemption -> training again, on the real local Slurm cluster, in both resume modes.

Submits a tiny foldhpc training job with ``foldhpc submit``, waits until it trains, sends the
preemption signal (``scancel --signal=USR1``, what Slurm sends ``signal_lead`` before a time limit
or on partition preemption with ``preempt_send_user_signal``) and measures, from the signal:

* ``durable_s``   the checkpoint is committed in checkpoints/manifest.json
* ``running_s``   the job that continues the run is RUNNING: the requeued job itself
                  (``slurm.resume = "requeue"``) or the follow-up job (``"chain"``)
* ``resumed_s``   the first resumed training step is done (a ``first_step`` record after the
                  ``resumed`` one in events.jsonl)

for each mode (trials interleaved: requeue, chain, requeue, ...) on the cluster profile with
Slurm's defaults and on the one with the documented settings (``AuthInfo=cred_expire=5``,
``SchedulerParameters=bf_interval=1,sched_interval=1``, KillWait=10). Goals: resumed_s < 180 s
in every case, <= 20 s with Slurm's defaults in chain mode (issue 12).

    python benchmarks/bench_requeue.py [--repeats 3] [--profiles fast,defaults] [--modes requeue,chain] [--quick]

Needs root (it switches the local cluster's profile with tests/slurm/cluster.sh, which drops queued
jobs: run it alone) and leaves the cluster in the "fast" profile.
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

from _common import event_tail

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


def followup_job(run_dir: Path, job: str) -> str | None:
    """The follow-up job of ``job`` recorded in jobs.jsonl (chain mode)."""
    path = run_dir / "jobs.jsonl"
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("event") == "followup" and str(e.get("job_id")) == job:
            return str(e["followup_job_id"])
    return None


def one_trial(workdir: Path, mode: str) -> dict[str, float]:
    run_dir = workdir / f"run-{time.monotonic_ns()}"
    sets = {"run.dir": str(run_dir), "data.path": str(ROOT / "tests/data/good"), "train.max_steps": 100000,
            "run.log_every": 1, "train.threads": 1, "slurm.gpus": 1, "slurm.cpus_per_task": 1,
            "slurm.mem": "2G", "slurm.time": "30m", "slurm.signal_lead": "60s", "slurm.partition": "debug",
            "slurm.resume": mode}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    out = sh(sys.executable, "-m", "foldhpc", "submit", "--config", str(ROOT / "configs/tiny.toml"), *args)
    job = re.search(r"submitted job (\d+)", out).group(1)
    tail = event_tail(run_dir)

    def training() -> bool:
        """job trains"""
        tail.poll()
        return any(e.step >= 20 for e in tail.of_kind("progress"))

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

        jobs = [job]

        def running_again() -> bool:
            """the job that continues the run is running"""
            if mode == "chain":
                nxt = followup_job(run_dir, job)
                if nxt is None:
                    return False
                if nxt not in jobs:
                    jobs.append(nxt)
                st = subprocess.run(["squeue", "-h", "-j", nxt, "-o", "%T"], capture_output=True, text=True).stdout
                return st.startswith("RUNNING")
            st = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T|%r"], capture_output=True, text=True).stdout
            restarts = re.search(r"Restarts=(\d+)", subprocess.run(["scontrol", "show", "job", "-o", job],
                                                                  capture_output=True, text=True).stdout)
            return st.startswith("RUNNING") and restarts is not None and int(restarts.group(1)) >= 1

        poll(running_again, 400, 0.1)
        t_running = time.monotonic() - t0

        def resumed() -> bool:
            """first resumed step recorded"""
            tail.poll()
            starts = tail.by_kind.get("resumed", [])  # [(position in tail.events, record)]
            return bool(starts) and bool(tail.since(starts[0][0], "first_step"))

        poll(resumed, 120, 0.02)
        t_resumed = time.monotonic() - t0
        startup = json.loads((run_dir / "status.json").read_text()).get("startup", {})
    finally:
        subprocess.run(["scancel", *jobs], capture_output=True)
    return {"mode": mode, "durable_s": t_durable, "running_s": t_running, "resumed_s": t_resumed,
            "job_start_to_first_step_s": startup.get("process_to_first_step_s", float("nan"))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profiles", default="fast,defaults")
    ap.add_argument("--modes", default="requeue,chain", help="slurm.resume modes, interleaved")
    ap.add_argument("--quick", action="store_true", help="one trial per mode, fast profile only")
    ap.add_argument("--out", default=str(ROOT / "bench-out" / "requeue.json"))
    args = ap.parse_args()
    profiles = ["fast"] if args.quick else args.profiles.split(",")
    modes = args.modes.split(",")
    repeats = 1 if args.quick else args.repeats
    results: dict[tuple[str, str], list[dict]] = {}
    load = [os.getloadavg()[0]]
    try:
        with tempfile.TemporaryDirectory(prefix="bench-requeue-", ignore_cleanup_errors=True) as tmp:
            for prof in profiles:
                sh("bash", str(CLUSTER), "up", env={"FOLDHPC_SLURM_PROFILE": prof})
                for _ in range(repeats):
                    for mode in modes:
                        results.setdefault((prof, mode), []).append(one_trial(Path(tmp), mode))
                        load.append(os.getloadavg()[0])
    finally:
        sh("bash", str(CLUSTER), "up", env={"FOLDHPC_SLURM_PROFILE": "fast"})
    goal = {("fast", "requeue"): 20.0, ("fast", "chain"): 20.0, ("defaults", "requeue"): 180.0,
            ("defaults", "chain"): 20.0}
    print(f"bench_requeue: {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, load average (1 min) "
          f"{min(load):.1f}..{max(load):.1f}; medians [min..max] in seconds from the signal")
    print(f"{'profile':<9} {'mode':<8} {'n':>2} {'durable_s':>10} {'running_s':>10} {'resumed_s':>22} "
          f"{'job->1st step':>14} {'goal':>6}")
    summary = {}
    for (prof, mode), rows in results.items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "mode"}
        lo, hi = min(r["resumed_s"] for r in rows), max(r["resumed_s"] for r in rows)
        summary[f"{prof}/{mode}"] = {"n": len(rows), "median": med, "min_resumed_s": lo, "max_resumed_s": hi,
                                     "trials": rows, "goal_s": goal[(prof, mode)]}
        print(f"{prof:<9} {mode:<8} {len(rows):>2} {med['durable_s']:>10.2f} {med['running_s']:>10.2f} "
              f"{med['resumed_s']:>8.2f} [{lo:5.1f}..{hi:5.1f}] {med['job_start_to_first_step_s']:>14.2f} "
              f"{goal[(prof, mode)]:>6.0f}")
    for prof in profiles:
        if f"{prof}/requeue" in summary and f"{prof}/chain" in summary:
            r, c = summary[f"{prof}/requeue"]["median"]["resumed_s"], summary[f"{prof}/chain"]["median"]["resumed_s"]
            print(f"{prof}: chain / requeue = {c / r:.2f} (resumed_s medians)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
