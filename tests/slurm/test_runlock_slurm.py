"""The run-directory lock (foldhpc.resilience.runlock) with real Slurm jobs as holders.

* a second job on a run directory in use fails at once (exit 2) naming the holder's job, writes
  nothing there but a "refused" line in jobs.jsonl, and ``foldhpc status`` keeps showing the holder;
* a holder whose Slurm job is running (on "another host", fresh heartbeat) is not taken over; once
  the job has ended, it is, at once (no waiting for the heartbeat to go stale).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TINY, read_json, run_foldhpc, set_args
from foldhpc.resilience import runlock
from foldhpc.records.history import read_history
from .helpers import cancel_all_jobs, sacct_rows, sbatch, scontrol_state, wait_for_state, wait_sacct_row
from .test_submit import overrides, wait_for_step

TEMPLATE = ROOT / "sbatch" / "train.sbatch"


@pytest.fixture
def jobs(slurm_cluster):
    started: list[str] = []
    yield started
    cancel_all_jobs(started)


def template_job(tmp_path: Path, run_dir: Path, **extra: object) -> str:
    return sbatch("--partition=debug", "--cpus-per-task=1", "--mem=2G", "--time=15",
                  f"--output={tmp_path / 'slurm-%j.out'}", f"--export=ALL,FOLDHPC_PYTHON={sys.executable}",
                  str(TEMPLATE), str(TINY), *set_args(overrides(run_dir, **extra)))


def test_second_job_on_a_run_dir_in_use_refuses_naming_the_holder(tmp_path, jobs):
    run_dir = tmp_path / "run"
    jobs.append(j1 := template_job(tmp_path, run_dir, **{"train.max_steps": 10**6, "run.log_every": 5}))
    wait_for_step(run_dir, 5)
    config = (run_dir / "config.toml").read_text()
    jobs.append(j2 := template_job(tmp_path, run_dir, **{"train.max_steps": 10**6, "train.seed": 9}))
    row = wait_sacct_row(j2, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=120)
    assert row["State"] == "FAILED" and row["ExitCode"] == "2:0", row
    out = (tmp_path / f"slurm-{j2}.out").read_text()
    assert "is in use by another trainer: pid " in out and f"Slurm job {j1}" in out, out
    assert "Traceback" not in out, out
    assert scontrol_state(j1) == "RUNNING"
    assert (run_dir / "config.toml").read_text() == config  # the refused job wrote nothing there
    st = read_json(run_dir / "status.json")
    assert st["slurm_job_id"] == j1 and st["state"] == "running", st
    refused = [e for e in read_history(run_dir)[0] if e["event"] == "refused"]
    assert len(refused) == 1 and refused[0]["job_id"] == j2 and refused[0]["holder"]["job_id"] == j1, refused
    p = run_foldhpc("status", str(run_dir), "--json")
    (r,) = json.loads(p.stdout)["runs"]
    assert r["job_id"] == j1 and r["state"] == "running", r
    assert any(n.startswith(f"job {j2} refused to start: run directory") for n in r["notes"]), r["notes"]


def test_holder_with_a_running_slurm_job_is_kept_an_ended_one_taken_over(tmp_path, jobs, monkeypatch):
    for var in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "SLURM_CLUSTER_NAME"):
        monkeypatch.delenv(var, raising=False)
    run_dir = tmp_path / "run"
    jobs.append(job := sbatch("--partition=debug", "--mem=100M", "--output=/dev/null", "--wrap=sleep 120"))
    wait_for_state(job, "RUNNING", timeout=60)
    lock_dir = run_dir / "lock"
    lock_dir.mkdir(parents=True)
    rec = {"host": "some-other-node", "boot_id": "x", "pid": 7, "pid_start": 1, "job_id": job, "restart_count": 0,
           "since": time.time(), "token": "t"}
    (lock_dir / "gen-00000001").write_text(json.dumps(rec))
    with pytest.raises(runlock.RunDirLocked, match=rf"Slurm job {job}.*its Slurm job {job} is RUNNING; heartbeat"):
        runlock.acquire(run_dir, "5m")
    cancel_all_jobs([job])
    assert [r["State"].split()[0] for r in sacct_rows(job) if r["JobID"] == job] == ["CANCELLED"]
    t0 = time.monotonic()
    with runlock.acquire(run_dir, "5m") as lock:  # the heartbeat is fresh: the job's end decides
        assert time.monotonic() - t0 < 5
        assert f"its Slurm job {job} is CANCELLED" in lock.took_over, lock.took_over
