"""foldhpc on the real local Slurm cluster: submitit jobs and the sbatch template.

Every job trains the tiny config (deterministic, 1 thread) so that the final state digest of a
preempted/requeued job can be compared with an uninterrupted foreground run of the same config.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TINY, read_json, run_foldhpc, set_args, tiny_overrides
from foldhpc.checkpoint.manager import CheckpointManager
from foldhpc.records.history import read_history
from .helpers import cancel_all_jobs, job_restarts, preempt, run, sacct_rows, sbatch, wait_sacct_row

STEPS = 150
SLOW = {"train.max_steps": STEPS, "data.crop_size": 48, "model.d_pair": 32, "model.n_blocks": 2,
        "train.warmup_steps": 5, "run.log_every": 1}
JOB = {"slurm.gpus": 1, "slurm.cpus_per_task": 1, "slurm.mem": "2G", "slurm.time": "15m",
       "slurm.signal_lead": "60s", "slurm.partition": "debug", "slurm.resume": "requeue"}


def overrides(run_dir: Path, **extra: object) -> list[str]:
    return tiny_overrides(run_dir, **{**SLOW, **JOB, **extra})


def submit(run_dir: Path, env: dict[str, str] | None = None, **extra: object) -> str:
    p = run_foldhpc("submit", "--config", str(TINY), *set_args(overrides(run_dir, **extra)), env=env)
    assert p.returncode == 0, p.stderr
    m = re.search(r"submitted job (\d+)", p.stdout)
    assert m, p.stdout
    return m.group(1)


def wait_for_step(run_dir: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    pat = re.compile(rf"step {step}/")
    while time.monotonic() < deadline:
        log = run_dir / "train.log"
        if log.exists() and pat.search(log.read_text()):
            return
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached in {run_dir}/train.log")


def final_digest(run_dir: Path) -> str:
    e = CheckpointManager(run_dir / "checkpoints").entries()[-1]
    assert e.step == STEPS
    return e.digest


@pytest.fixture(scope="module")
def reference_digest(tmp_path_factory) -> str:
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    p = run_foldhpc("train", "--config", str(TINY), *set_args(overrides(run_dir)))
    assert p.returncode == 0, p.stderr
    return final_digest(run_dir)


@pytest.fixture
def jobs(slurm_cluster):
    started: list[str] = []
    yield started
    cancel_all_jobs(started)


def started_restart_counts(run_dir: Path) -> list[int]:
    return [e["restart_count"] for e in read_history(run_dir)[0] if e["event"] == "started"]


def test_submit_tiny_completes(tmp_path, jobs, reference_digest):
    run_dir = tmp_path / "run"
    jobs.append(job := submit(run_dir))
    row = wait_sacct_row(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=180)
    assert row["State"] == "COMPLETED", row
    assert read_json(run_dir / "status.json")["state"] == "completed"
    assert final_digest(run_dir) == reference_digest
    events = [e["event"] for e in read_history(run_dir)[0]]
    assert events == ["submitted", "started", "completed"]
    script = (run_dir / "slurm" / f"{job}_submission.sh").read_text()
    for flag in ("#SBATCH --requeue", "#SBATCH --signal=USR1@60", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --open-mode=append", "#SBATCH --partition=debug"):
        assert flag in script, script


def test_user_sent_usr1_requeues_and_finishes_bit_exact(tmp_path, jobs, reference_digest):
    """`scancel --signal=USR1`: a user-sent copy of the job's preemption/time-limit signal, *not* a
    preemption (the real partition preemption is the next test). The job saves, requeues itself
    and finishes bit-exact."""
    run_dir = tmp_path / "run"
    jobs.append(job := submit(run_dir))
    wait_for_step(run_dir, 20)
    run(["scancel", "--signal=USR1", job])
    wait_sacct_row(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=240)
    states = [r["State"] for r in sacct_rows(job) if r["JobID"] == job]
    assert states[-1] == "COMPLETED" and "REQUEUED" in states[0], states
    assert job_restarts(job) == 1
    assert started_restart_counts(run_dir) == [0, 1]  # SLURM_RESTART_COUNT advanced
    ck = [e for e in CheckpointManager(run_dir / "checkpoints").entries()]
    log = (run_dir / "train.log").read_text()
    saved = int(re.search(r"received SIGUSR1: saving a checkpoint at step (\d+)", log).group(1))
    assert 20 <= saved < STEPS
    assert f"resumed from {run_dir / 'checkpoints'}/step_{saved:08d}.ckpt at step {saved}" in log
    assert ck[-1].step == STEPS
    assert final_digest(run_dir) == reference_digest
    # foldhpc status tells the same story from sacct + the run directory
    p = run_foldhpc("status", str(run_dir), "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    (r,) = doc["runs"] if "runs" in doc else doc
    assert r["state"] == "completed" and r["restarts"] == 1 and str(r["job_id"]) == job, r


def test_partition_preemption_requeues_and_finishes_bit_exact(tmp_path, jobs, reference_digest, slurm_cluster):
    run_dir = tmp_path / "run"
    jobs.append(job := submit(run_dir))
    wait_for_step(run_dir, 15)
    # a high-priority job that needs the whole node the training job runs on preempts it (pinned
    # there: the cluster has two nodes, and an unpinned one would just start on the idle one)
    hi, node = preempt(job, slurm_cluster.cpus)
    jobs.append(hi)
    assert wait_sacct_row(hi, "COMPLETED", timeout=120)["NodeList"] == node
    wait_sacct_row(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=300)
    states = [r["State"] for r in sacct_rows(job) if r["JobID"] == job]
    assert states[-1] == "COMPLETED" and len(states) >= 2, states
    assert states[0] in {"PREEMPTED", "REQUEUED"}, states
    log = (run_dir / "train.log").read_text()
    assert re.search(r"received SIG(USR1|TERM): saving a checkpoint", log)
    assert final_digest(run_dir) == reference_digest


def test_scancel_saves_and_is_not_requeued(tmp_path, jobs):
    run_dir = tmp_path / "run"
    jobs.append(job := submit(run_dir))
    wait_for_step(run_dir, 20)
    run(["scancel", job])
    row = wait_sacct_row(job, {"CANCELLED", "COMPLETED", "FAILED"}, timeout=120)
    assert row["State"].startswith("CANCELLED"), row
    time.sleep(8)  # a wrongful requeue would show up as PENDING/RUNNING again within cred_expire
    assert [r["State"].split()[0] for r in sacct_rows(job) if r["JobID"] == job] == ["CANCELLED"]
    st = read_json(run_dir / "status.json")
    assert st["state"] == "checkpointed" and st["signal"] == "SIGTERM"
    assert CheckpointManager(run_dir / "checkpoints").entries()[-1].step == st["step"] >= 20
    assert [e["event"] for e in read_history(run_dir)[0]][-1] == "stopped"


def test_crash_is_failed_with_reason_in_status(tmp_path, jobs):
    run_dir = tmp_path / "run"
    jobs.append(job := submit(run_dir, env={"FOLDHPC_FAIL_AT_STEP": "9"}))
    row = wait_sacct_row(job, {"FAILED", "COMPLETED", "CANCELLED"}, timeout=180)
    assert row["State"] == "FAILED", row
    st = read_json(run_dir / "status.json")
    assert st["state"] == "failed" and st["step"] == 9 and "injected failure at step 9" in st["error"]


def test_sbatch_template_preempt_requeue_complete(tmp_path, jobs, reference_digest):
    run_dir = tmp_path / "run $(touch INJECTED)"  # a hostile path: must be passed, never executed
    out = tmp_path / "slurm-%j.out"
    jobs.append(job := sbatch("--partition=debug", "--cpus-per-task=1", "--mem=2G", "--time=15",
                              f"--output={out}", f"--export=ALL,FOLDHPC_PYTHON={sys.executable}",
                              str(ROOT / "sbatch" / "train.sbatch"), str(TINY),
                              *set_args(overrides(run_dir))))
    wait_for_step(run_dir, 20)
    run(["scancel", "--signal=USR1", "--batch", job])
    wait_sacct_row(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=240)
    states = [r["State"] for r in sacct_rows(job) if r["JobID"] == job]
    assert states[-1] == "COMPLETED" and states[0] == "REQUEUED", states
    log = Path(str(out).replace("%j", job)).read_text()
    assert "forwarding to the trainer" in log and "exited with status 75" in log
    assert final_digest(run_dir) == reference_digest
    assert not list(tmp_path.rglob("INJECTED")) and not (ROOT / "INJECTED").exists()


def test_requeue_limit_is_respected(tmp_path, jobs):
    """slurm.max_requeues=1: the first signal requeues, the second only saves and stops."""
    run_dir = tmp_path / "run"
    jobs.append(job := submit(run_dir, **{"slurm.max_requeues": 1}))
    wait_for_step(run_dir, 15)
    run(["scancel", "--signal=USR1", job])
    wait_for_step(run_dir, 40, timeout=180)  # requeued and training again
    run(["scancel", "--signal=USR1", job])
    deadline = time.monotonic() + 120
    while [e["event"] for e in read_history(run_dir)[0]][-1] not in ("stopped", "completed"):
        assert time.monotonic() < deadline, read_history(run_dir)
        time.sleep(0.5)
    events = [e["event"] for e in read_history(run_dir)[0]]
    assert events == ["submitted", "started", "requeued", "started", "stopped"], events
    assert "already restarted 1 times (slurm.max_requeues=1)" in (run_dir / "train.log").read_text()
    time.sleep(8)  # no third run appears
    assert [e["event"] for e in read_history(run_dir)[0]] == events
    st = read_json(run_dir / "status.json")
    assert st["state"] == "checkpointed" and 40 <= st["step"] < STEPS


def test_time_limit_signal_requeues_a_short_job(tmp_path, jobs):
    """A real time limit: --time=1 with the signal 40 s before it (Slurm delivers it 20-30 s after
    the start: its limit check runs every ~30 s). submitit alone would count this short job's signal as a timeout; foldhpc saves at a
    step boundary and requeues, and the next run resumes from that step. (Runs that complete after
    a requeue are covered above; this job would train for hours, so the test cancels it.)"""
    run_dir = tmp_path / "run"
    jobs.append(job := submit(run_dir, **{"slurm.time": "1m", "slurm.signal_lead": "40s",
                                          "train.max_steps": 10**6, "run.log_every": 50}))
    deadline = time.monotonic() + 240
    while "(restart #1" not in ((run_dir / "train.log").read_text() if (run_dir / "train.log").exists() else ""):
        assert time.monotonic() < deadline, "the requeued job did not resume"
        time.sleep(0.5)
    log = (run_dir / "train.log").read_text()
    saved = int(re.search(r"received SIGUSR1: saving a checkpoint at step (\d+)", log).group(1))
    assert f"at step {saved} (restart #1" in log
    assert started_restart_counts(run_dir) == [0, 1]
    assert [e["event"] for e in read_history(run_dir)[0]][:3] == ["submitted", "started", "requeued"]
    assert job_restarts(job) == 1
    assert sacct_rows(job)[0]["State"] == "REQUEUED"
