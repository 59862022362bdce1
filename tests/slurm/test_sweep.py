"""Sweeps as Slurm job arrays on the real local cluster (foldhpc.slurm.sweep), and the sbatch
template run as an array.

One 3-task sweep (train.seed=1,2,3, slurm.max_requeues=1) covers the issue's cases at once, so the
file stays short in wall time (~1.5-2 min here): tasks 0 and 1 are each sent the preemption signal
(`scancel --signal=USR1 <array>_<task>`) once, save, requeue *themselves* and complete bit-exact
with their own uninterrupted local run (computed meanwhile in the background); with
max_requeues=1 that both are requeued shows the limit counts per task, not per array. Task 2 is
cancelled with `scancel <array>_<task>` and stays cancelled while the others complete.
`foldhpc status` on the sweep shows one row per task and the summary.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, TINY, foldhpc_cmd, read_json, run_foldhpc, set_args, tiny_overrides
from foldhpc.checkpoint.manager import CheckpointManager
from foldhpc.records.history import read_history
from .helpers import cancel_all_jobs, run, sacct_rows, sbatch, wait_sacct_row

STEPS = 150
SLOW = {"train.max_steps": STEPS, "data.crop_size": 48, "model.d_pair": 32, "model.n_blocks": 2,
        "train.warmup_steps": 5, "run.log_every": 1}
# gpus = 0: the three tasks fit on the two nodes at once (one fake GPU per node)
JOB = {"slurm.gpus": 0, "slurm.cpus_per_task": 1, "slurm.mem": "2G", "slurm.time": "15m",
       "slurm.signal_lead": "60s", "slurm.partition": "debug", "slurm.max_requeues": 1, "slurm.resume": "requeue"}
SEEDS = (1, 2, 3)
ACT_AT = 20  # step at which each task is signalled / cancelled
END = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"}


def reached(run_dir: Path, step: int) -> bool:
    log = run_dir / "train.log"
    return log.exists() and re.search(rf"step {step}/", log.read_text()) is not None


def final_digest(run_dir: Path) -> str:
    e = CheckpointManager(run_dir / "checkpoints").entries()[-1]
    assert e.step == STEPS, (run_dir, e)
    return e.digest


def test_sweep_array_preempted_tasks_requeue_themselves_cancelled_stays_cancelled(tmp_path, slurm_cluster):
    sweep_dir = tmp_path / "sweep"
    umask = os.umask(0o002)  # a setgid project folder's umask: the sweep's folders are private all the same
    try:
        p = run_foldhpc("submit", "--config", str(TINY), *set_args(tiny_overrides(sweep_dir, **SLOW, **JOB)),
                        "--sweep", "train.seed=" + ",".join(map(str, SEEDS)), "--max-parallel", "3")
    finally:
        os.umask(umask)
    assert p.returncode == 0, p.stderr
    array = re.search(r"submitted job array (\d+) \(3 tasks\)", p.stdout).group(1)
    # the uninterrupted references, on this machine while the array runs (CPU, deterministic)
    refs = {s: subprocess.Popen(foldhpc_cmd("train", "--config", str(TINY), *set_args(
        tiny_overrides(tmp_path / f"ref-{s}", **SLOW, **{"train.seed": s}))), cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for s in SEEDS[:2]}
    try:
        sweep = json.loads((sweep_dir / "sweep.json").read_text())
        tasks = {t["index"]: sweep_dir / t["name"] for t in sweep["tasks"]}
        assert [d.name for d in tasks.values()] == ["seed=1", "seed=2", "seed=3"]
        assert [t["job_id"] for t in sweep["tasks"]] == [f"{array}_{i}" for i in range(3)]
        script = (sweep_dir / "slurm" / f"{array}_submission.sh").read_text()
        assert "#SBATCH --array=0-2%3" in script and "#SBATCH --requeue" in script, script
        for i, d in tasks.items():  # each task's resolved config is there from submission on
            assert f"seed = {SEEDS[i]}" in (d / "config.toml").read_text()
            assert stat.S_IMODE(d.stat().st_mode) == 0o750, d  # issue 19 item 4: was 0775 under umask 002
        assert stat.S_IMODE(sweep_dir.stat().st_mode) == 0o750

        # act on each task as soon as it is at step ACT_AT: USR1 to tasks 0 and 1, scancel task 2
        todo = dict(tasks)
        deadline = time.monotonic() + 150
        while todo:
            assert time.monotonic() < deadline, f"tasks {sorted(todo)} never reached step {ACT_AT}"
            for i, d in list(todo.items()):
                if reached(d, ACT_AT):
                    run(["scancel", "--signal=USR1", f"{array}_{i}"] if i < 2 else ["scancel", f"{array}_{i}"])
                    del todo[i]
            time.sleep(0.05)
        rows = {i: wait_sacct_row(f"{array}_{i}", END, timeout=240) for i in range(3)}
        assert rows[0]["State"] == "COMPLETED" and rows[1]["State"] == "COMPLETED", rows
        assert rows[2]["State"].startswith("CANCELLED"), rows

        # bit-exact, each with its own uninterrupted run
        for s, proc in refs.items():
            _, err = proc.communicate(timeout=180)
            assert proc.returncode == 0, err[-3000:]
        for i in (0, 1):
            assert final_digest(tasks[i]) == final_digest(tmp_path / f"ref-{SEEDS[i]}"), f"task {i}"
            events = read_history(tasks[i])[0]
            assert [e["event"] for e in events] == ["submitted", "started", "requeued", "started", "completed"]
            assert {e["job_id"] for e in events} == {f"{array}_{i}"}  # its own requeue, nobody else's
            assert [e["restart_count"] for e in events if e["event"] == "started"] == [0, 1]
            log = (tasks[i] / "train.log").read_text()
            saved = int(re.search(r"received SIGUSR1: saving a checkpoint at step (\d+)", log).group(1))
            assert ACT_AT <= saved < STEPS and f"at step {saved} (restart #1" in log
        assert final_digest(tasks[0]) != final_digest(tasks[1])  # distinct runs in distinct directories

        # the cancelled task stays cancelled (its checkpoint is durable), and is not requeued later
        st = read_json(tasks[2] / "status.json")
        assert st["state"] == "checkpointed" and ACT_AT <= st["step"] < STEPS
        assert [e["event"] for e in read_history(tasks[2])[0]][-1] == "stopped"
        time.sleep(3)  # with the waits above, > 8 s after the cancel: a wrongful requeue would show by now
        assert [r["State"].split()[0] for r in sacct_rows(f"{array}_2") if r["JobID"] == f"{array}_2"] == ["CANCELLED"]

        # foldhpc status on the sweep: one row per task and a summary; exit 3 (a task was cancelled)
        p = run_foldhpc("status", str(sweep_dir), "--json")
        assert p.returncode == 3, p.stderr
        doc = json.loads(p.stdout)
        runs = doc["runs"]
        assert [r["name"] for r in runs] == ["seed=1", "seed=2", "seed=3"]
        assert [r["state"] for r in runs] == ["completed", "completed", "cancelled"], runs
        assert [r["restarts"] for r in runs] == [1, 1, 0] and [r["step"] for r in runs[:2]] == [STEPS, STEPS]
        assert all(r["best_val"]["step"] == STEPS for r in runs[:2]) and runs[2]["best_val"] is None
        (summary,) = doc["sweeps"]
        assert summary["array_job_id"] == array and summary["tasks_total"] == 3
        assert summary["states"] == {"completed": 2, "cancelled": 1}
        assert summary["best"]["task"] in ("seed=1", "seed=2")
        p = run_foldhpc("status", str(sweep_dir))
        assert f"sweep {sweep_dir}: array job {array}, 3 tasks: 2 completed, 1 cancelled; best val loss" in p.stdout
        assert "BEST VAL" in p.stdout.splitlines()[0]
    finally:
        cancel_all_jobs([array])
        for proc in refs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_sbatch_template_as_an_array_gives_each_task_its_own_run_dir(tmp_path, slurm_cluster):
    run_dir = tmp_path / "run"
    out = tmp_path / "slurm-%A_%a.out"
    job = sbatch("--array=0-1", "--partition=debug", "--cpus-per-task=1", "--mem=2G", "--time=15",
                 f"--output={out}", f"--export=ALL,FOLDHPC_PYTHON={sys.executable}",
                 str(ROOT / "sbatch" / "train.sbatch"), str(TINY),
                 *set_args(tiny_overrides(run_dir, **{"train.max_steps": 8})))
    try:
        for i in (0, 1):
            row = wait_sacct_row(f"{job}_{i}", END, timeout=180)
            assert row["State"] == "COMPLETED", (row, Path(str(out).replace("%A", job).replace("%a", str(i)))
                                                 .read_text()[-3000:])
        for i in (0, 1):
            task = run_dir / f"task-{i}"
            assert read_json(task / "status.json")["state"] == "completed"
            assert CheckpointManager(task / "checkpoints").entries()[-1].step == 8
            assert {e["job_id"] for e in read_history(task)[0]} == {f"{job}_{i}"}
        assert not (run_dir / "checkpoints").exists() and not (run_dir / "status.json").exists()
    finally:
        cancel_all_jobs([job])
