"""The requeue decision and the sbatch template's signal handling, on the real local Slurm cluster.

* the template holds a signal that arrives before the trainer listens (no exit 138), does not
  forward one that arrives after training finished, keeps the trainer's real exit status, reads
  ``slurm.max_requeues`` from the job's config, and does not replay ``--no-resume`` on a requeue;
* ``python -m foldhpc.slurm.requeue`` does not requeue an ``scancel``-ed job while sacct lags
  (made real: slurmdbd stopped across the ``scancel`` and restarted, so slurmctld's CANCELLED
  record reaches the database ~18 s late);
* a failed ``scontrol requeue`` is retried and the whole thing ends by its deadline;
* a submitit job whose training has returned ignores a late preemption signal (no requeue).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TINY, read_json, run_foldhpc, set_args, tiny_overrides, wait_for
from foldhpc.records.history import read_history
from .helpers import CLUSTER_SH, cancel_all_jobs, notes_of, run, sacct_rows, sbatch, scontrol_state, wait_for_state, \
    wait_sacct_row

TEMPLATE = ROOT / "sbatch" / "train.sbatch"
TRAIN = {"data.crop_size": 48, "model.d_pair": 32, "model.n_blocks": 2, "train.warmup_steps": 5,
         "run.log_every": 1, "slurm.resume": "requeue"}


@pytest.fixture
def jobs(slurm_cluster):
    started: list[str] = []
    yield started
    cancel_all_jobs(started)


def template_job(tmp_path: Path, run_dir: Path, *args: str, env: str = "", **extra: object) -> tuple[str, Path]:
    """sbatch the template on the tiny config; (job id, its output file)."""
    out = tmp_path / "slurm-%j.out"
    job = sbatch("--partition=debug", "--cpus-per-task=1", "--mem=2G", "--time=15", f"--output={out}",
                 f"--export=ALL,FOLDHPC_PYTHON={sys.executable}{env}", str(TEMPLATE), str(TINY),
                 *set_args(tiny_overrides(run_dir, **{**TRAIN, **extra})), *args)
    return job, Path(str(out).replace("%j", job))



def text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def step_in_log(run_dir: Path, step: int) -> bool:
    return re.search(rf"step {step}/", text(run_dir / "train.log")) is not None


def events(run_dir: Path) -> list[dict]:
    return read_history(run_dir)[0]


# ------------------------------------------------------------------ sbatch template (item 6)
def test_template_holds_a_signal_sent_before_the_trainer_listens(tmp_path, jobs):
    """USR1 while the trainer is still starting: held until the trainer listens, then saved (exit
    75), and with slurm.max_requeues=0 from the config it is not requeued. The interpreter the
    template runs is slowed down by 2 s (a wrapper script), so that the signal surely arrives
    before the trainer (whose supervisor starts in ~0.3 s, without importing torch) listens."""
    run_dir = tmp_path / "run"
    slow = tmp_path / "slow-python"
    slow.write_text(f"#!/bin/sh\nsleep 2\nexec {sys.executable} \"$@\"\n")
    slow.chmod(0o755)
    job, out = template_job(tmp_path, run_dir, env=f",FOLDHPC_PYTHON={slow}",
                            **{"train.max_steps": 10**6, "slurm.max_requeues": 0})
    jobs.append(job)
    wait_for(lambda: "foldhpc: job" in text(out), "batch script did not start", timeout=60, poll=0.02)
    time.sleep(0.3)  # the traps are set; the trainer's interpreter is still sleeping
    run(["scancel", "--signal=USR1", "--batch", job])
    row = wait_sacct_row(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=120)
    log = text(out)
    assert "holding it" in log, log
    assert "exited with status 75" in log, log
    assert row["State"] == "FAILED" and row["ExitCode"] == "75:0", row
    st = read_json(run_dir / "status.json")
    assert st["state"] == "checkpointed" and st["signal"] == "SIGUSR1", st
    last = events(run_dir)[-1]
    assert (last["event"], last["why"]) == ("stopped", "requeue_limit"), last
    assert [r["State"] for r in sacct_rows(job) if r["JobID"] == job] == ["FAILED"]  # never requeued


def test_template_late_signal_after_training_is_not_fatal(tmp_path, jobs):
    """A signal after training finished (trainer still exiting) must not turn a completed run into 138."""
    run_dir = tmp_path / "run"
    job, out = template_job(tmp_path, run_dir, env=",FOLDHPC_DEBUG_HOLD_AFTER_TRAIN_S=6",
                            **{"train.max_steps": 5})
    jobs.append(job)
    wait_for(lambda: "staying alive" in text(run_dir / "train.log"), "training did not finish", timeout=120)
    run(["scancel", "--signal=USR1", "--batch", job])
    time.sleep(0.5)
    run(["scancel", "--signal=USR1", job], check=False)  # and straight to the trainer: ignored too
    row = wait_sacct_row(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=60)
    log = text(out)
    assert "exited with status 0" in log, log
    assert row["State"] == "COMPLETED", (row, log)
    assert read_json(run_dir / "status.json")["state"] == "completed"


def test_template_requeue_limit_and_no_resume_not_replayed(tmp_path, jobs):
    """slurm.max_requeues=1 from the config; --no-resume applies to the first run only; the second
    signal stops the run at the limit, and `foldhpc status` says so (not "failed; exit 75")."""
    run_dir = tmp_path / "run"
    notify, notes = notes_of(tmp_path)
    job, out = template_job(tmp_path, run_dir, "--no-resume", **{"train.max_steps": 10**6,
                                                                 "slurm.max_requeues": 1, **notify})
    jobs.append(job)
    wait_for(lambda: step_in_log(run_dir, 8), "step 8 not reached")
    run(["scancel", "--signal=USR1", "--batch", job])
    wait_for(lambda: "(restart #1" in text(run_dir / "train.log"), "the requeued job did not resume", timeout=120)
    tlog = text(run_dir / "train.log")
    assert "--no-resume is ignored: this is restart 1" in text(out), text(out)
    assert "resumed from" in tlog and "(restart #1" in tlog
    saved = int(re.search(r"received SIGUSR1: saving a checkpoint at step (\d+)", tlog).group(1))
    wait_for(lambda: step_in_log(run_dir, saved + 3), "not training after the requeue")
    run(["scancel", "--signal=USR1", "--batch", job])
    row = wait_sacct_row(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=120)
    assert row["State"] == "FAILED" and row["ExitCode"] == "75:0", row
    time.sleep(7)  # a wrongful third run would be pending/running again within cred_expire
    states = [r["State"].split()[0] for r in sacct_rows(job) if r["JobID"] == job]
    assert states == ["REQUEUED", "FAILED"], states
    ev = [(e["event"], e.get("why")) for e in events(run_dir)]
    assert ev == [("started", None), ("requeued", "requeue"), ("started", None), ("stopped", "requeue_limit")], ev
    p = run_foldhpc("status", str(run_dir), "--json")
    (r,) = json.loads(p.stdout)["runs"]
    assert r["state"] == "stopped" and r["restarts"] == 1, r
    assert "requeue limit" in r["reason"] and "exit 75" not in r["reason"], r
    assert p.returncode == 3, (p.returncode, r)
    # monitor.on_state_change, from the batch script's requeue decision (foldhpc.slurm.requeue)
    told = wait_for(lambda: (t := notes.read_text().split("\n")[:-1] if notes.exists() else []) and len(t) >= 2 and t,
                    "two notifications")
    assert [ln.split()[:2] for ln in told] == [["requeued", job], ["stopped", job]], told
    assert told[0].split()[2] == str(saved), told


# ------------------------------------------------------------------ requeue decision (item 7)
def _stop_slurmdbd() -> None:
    pid = int(Path("/run/slurm/slurmdbd.pid").read_text())
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2],
             "slurmdbd did not stop", timeout=20, poll=0.05)


def _start_slurmdbd() -> None:
    p = subprocess.run(["bash", str(CLUSTER_SH), "up"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


def test_requeue_decision_ignores_lagging_sacct_after_scancel(tmp_path, jobs):
    """scancel while slurmdbd is down; by the time the job decides, slurmdbd answers again but still
    says RUNNING (slurmctld's record is queued): slurmctld's COMPLETING must win, no requeue."""
    go, decided = tmp_path / "go", tmp_path / "decided"
    script = tmp_path / "job.sh"
    script.write_text(f"""#!/bin/bash
decide() {{
  for i in $(seq 1 80); do [ -e {go} ] && break; sleep 0.1; done
  echo "sacct then: $(sacct -j $SLURM_JOB_ID -X -n -P --format=State)" > {decided}.log
  {sys.executable} -m foldhpc.slurm.requeue 5 >> {decided}.log 2>&1
  echo "rc=$?" >> {decided}.log
  mv {decided}.log {decided}
}}
trap decide TERM
sleep 300 &
wait
""")
    job = sbatch("--partition=debug", "--requeue", "--mem=200M", f"--output={tmp_path / 'out'}",
                 f"--chdir={ROOT}", str(script))
    jobs.append(job)
    wait_for_state(job, "RUNNING", timeout=60)
    wait_for(
        lambda: run(["sacct", "-j", job, "-X", "-n", "-P", "--format=State"], check=False).strip() == "RUNNING",
        "sacct does not show the job running", timeout=30)
    _stop_slurmdbd()
    try:
        run(["scancel", job])
    finally:
        _start_slurmdbd()
    go.touch()
    log = wait_for(lambda: text(decided), "the job did not decide", timeout=30)
    assert "sacct then: RUNNING" in log, log  # the lag was real at decision time
    assert "rc=3" in log and "COMPLETING" in log, log
    wait_sacct_row(job, "CANCELLED", timeout=60)
    time.sleep(7)
    assert scontrol_state(job) in ("CANCELLED", None), scontrol_state(job)
    assert [r["State"].split()[0] for r in sacct_rows(job) if r["JobID"] == job] == ["CANCELLED"]


def test_failed_scontrol_requeue_is_retried_within_the_deadline(slurm_cluster):
    from foldhpc.slurm import requeue

    code = ("import logging, time; logging.basicConfig(level=logging.INFO); from foldhpc.slurm import requeue; "
            "t = time.monotonic(); ok = requeue.requeue('999999999', time.monotonic() + 3); "
            "print('ok', ok, 'took', round(time.monotonic() - t, 1))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert "ok False" in p.stdout, p.stdout + p.stderr
    took = float(p.stdout.split("took")[1])
    assert 1.0 <= took < 3.0 + requeue.CALL_TIMEOUT_S, p.stdout  # stops before a pause would pass the deadline
    assert len(re.findall(r"retrying in", p.stderr)) >= 2, p.stderr
    assert "giving up (deadline)" in p.stderr, p.stderr


# ------------------------------------------------------------------ submitit, completed path (item 14)
def test_submitit_late_signal_after_training_does_not_requeue(tmp_path, jobs):
    run_dir = tmp_path / "run"
    over = tiny_overrides(run_dir, **{**TRAIN, "train.max_steps": 5, "slurm.gpus": 1, "slurm.cpus_per_task": 1,
                                      "slurm.mem": "2G", "slurm.time": "15m", "slurm.signal_lead": "60s",
                                      "slurm.partition": "debug"})
    p = run_foldhpc("submit", "--config", str(TINY), *set_args(over),
                    env={"FOLDHPC_DEBUG_HOLD_AFTER_TRAIN_S": "8"})
    assert p.returncode == 0, p.stderr
    jobs.append(job := re.search(r"submitted job (\d+)", p.stdout).group(1))
    wait_for(lambda: any(e["event"] == "completed" for e in events(run_dir)), "training did not complete")
    run(["scancel", "--signal=USR1", job])  # submitit's preemption signal, to the srun step
    row = wait_sacct_row(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=60)
    time.sleep(7)  # a requeue would show up as a second run within cred_expire
    states = [r["State"].split()[0] for r in sacct_rows(job) if r["JobID"] == job]
    assert states == ["COMPLETED"], (states, row)
    assert [e["event"] for e in events(run_dir)] == ["submitted", "started", "completed"]
