"""When Slurm will not requeue: follow-up jobs (foldhpc.slurm.followup), and preemption by SIGTERM
alone, on the real local cluster.

Slurm's refusal is real: a job with ``Requeue=0`` (submitted with ``--no-requeue``, or changed
with ``scontrol update JobId=N Requeue=0``) gets "Requested operation is presently disabled" from
``scontrol requeue``, exactly what every job without ``--requeue`` gets on a cluster with
``JobRequeue=0`` -- without reconfiguring (and restarting) the shared test cluster.

* sbatch template, ``--no-requeue``: a USR1 saves, the follow-up job (same script, same
  resources, afterany) resumes and completes bit-exact; ``--no-resume`` is not replayed;
  ``foldhpc status`` shows the chain as one run;
* submitit, ``Requeue=0``: the follow-up comes through the same submission code; with
  ``slurm.max_requeues=1`` the follow-up's own signal stops at the limit (counted across the chain);
* ``scancel`` of such a job: no follow-up; a cancel that lands while the follow-up is being
  submitted cancels the follow-up;
* preemption of a job that has no ``--signal`` (no ``preempt_send_user_signal`` for it): SIGTERM
  after GraceTime, checkpoint, Slurm requeues, the run resumes and ends bit-exact.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TINY, read_json, run_foldhpc, set_args, wait_for
from foldhpc.records.history import read_history
from .helpers import cancel_all_jobs, preempt, run, sacct_rows, sbatch, scontrol_job, wait_for_state, \
    wait_sacct_row
from .test_submit import STEPS, final_digest, overrides, reference_digest, submit, wait_for_step  # noqa: F401

TEMPLATE = ROOT / "sbatch" / "train.sbatch"


@pytest.fixture
def jobs(slurm_cluster):
    started: list[str] = []
    yield started
    cancel_all_jobs(started)


def events(run_dir: Path) -> list[dict]:
    return read_history(run_dir)[0]



def followup_of(run_dir: Path, job: str) -> str | None:
    return next((str(e["followup_job_id"]) for e in events(run_dir)
                 if e["event"] == "followup" and str(e["job_id"]) == job), None)


def status_of(run_dir: Path) -> tuple[dict, int]:
    p = run_foldhpc("status", str(run_dir), "--json")
    (r,) = json.loads(p.stdout)["runs"]
    return r, p.returncode


def template_job(tmp_path: Path, run_dir: Path, *args: str, sbatch_args: tuple[str, ...] = (), **extra) -> str:
    out = tmp_path / "slurm-%j.out"
    return sbatch("--partition=debug", "--cpus-per-task=1", "--mem=2G", "--time=15", f"--output={out}",
                  f"--export=ALL,FOLDHPC_PYTHON={sys.executable}", *sbatch_args, str(TEMPLATE), str(TINY),
                  *set_args(overrides(run_dir, **extra)), *args)


def test_template_job_slurm_will_not_requeue_continues_in_a_followup(tmp_path, jobs, reference_digest):
    run_dir = tmp_path / "run"
    jobs.append(j1 := template_job(tmp_path, run_dir, "--no-resume", sbatch_args=("--no-requeue",)))
    wait_for_step(run_dir, 20)
    assert scontrol_job(j1)["Requeue"] == "0"
    run(["scancel", "--signal=USR1", "--batch", j1])
    j2 = wait_for(lambda: followup_of(run_dir, j1), "no follow-up job was submitted", timeout=60)
    jobs.append(j2)
    wait_sacct_row(j2, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=240)
    assert final_digest(run_dir) == reference_digest
    # the first job ended normally (exit 0: the run goes on), and was never requeued
    assert [r["State"] for r in sacct_rows(j1) if r["JobID"] == j1] == ["COMPLETED"]
    assert [r["State"] for r in sacct_rows(j2) if r["JobID"] == j2] == ["COMPLETED"]
    # same resources, same script and arguments, but --no-resume only for the first job
    info = scontrol_job(j2)
    assert (info["Partition"], info["NumCPUs"], info["MinMemoryNode"], info["TimeLimit"], info["Requeue"]) == \
        ("debug", "1", "2G", "00:15:00", "0"), info
    assert info["StdOut"] == str(tmp_path / f"slurm-{j2}.out")
    out2 = (tmp_path / f"slurm-{j2}.out").read_text()
    assert "--no-resume is ignored" not in out2 and "exited with status 0" in out2, out2
    log = (run_dir / "train.log").read_text()
    saved = int(re.search(r"received SIGUSR1: saving a checkpoint at step (\d+)", log).group(1))
    assert f"resumed from {run_dir / 'checkpoints'}/step_{saved:08d}.ckpt at step {saved}" in log
    assert not list((run_dir / "checkpoints").glob("old-*"))  # nothing moved aside again
    ev = [(e["event"], str(e.get("job_id"))) for e in events(run_dir)]
    assert ev[:4] == [("started", j1), ("submitted", j2), ("followup", j1), ("started", j2)], ev
    link = next(e for e in events(run_dir) if e["event"] == "followup")
    assert link["chain_restarts"] == 1 and "Requeue=0" in link["reason"], link
    r, rc = status_of(run_dir)
    assert (r["state"], r["job_id"], r["chain"], r["restarts"], rc) == ("completed", j2, [j1, j2], 1, 0), r
    table = run_foldhpc("status", str(run_dir)).stdout
    assert f"chain: run: jobs {j1} -> {j2}" in table, table


def test_submitit_job_followup_and_requeue_limit_across_the_chain(tmp_path, jobs):
    run_dir = tmp_path / "run"
    jobs.append(j1 := submit(run_dir, **{"slurm.max_requeues": 1, "train.max_steps": 10**6, "run.log_every": 5}))
    wait_for_state(j1, "RUNNING", timeout=60)
    run(["scontrol", "update", f"JobId={j1}", "Requeue=0"])  # Slurm will now refuse to requeue it
    wait_for_step(run_dir, 15)
    run(["scancel", "--signal=USR1", j1])
    j2 = wait_for(lambda: followup_of(run_dir, j1), "no follow-up job was submitted", timeout=60)
    jobs.append(j2)
    wait_for(lambda: "(restart #1" in (run_dir / "train.log").read_text(), "the follow-up did not resume")
    script = (run_dir / "slurm" / f"{j2}_submission.sh").read_text()
    assert f"#SBATCH --dependency=afterany:{j1}" in script and "#SBATCH --partition=debug" in script, script
    saved = int(re.findall(r"received SIGUSR1: saving a checkpoint at step (\d+)",
                           (run_dir / "train.log").read_text())[-1])
    wait_for_step(run_dir, (saved // 5 + 2) * 5)  # progress is logged every 5 steps
    # J2 may be requeued by Slurm (submitit asks for --requeue), but the chain has used its one restart
    run(["scancel", "--signal=USR1", j2])
    wait_sacct_row(j2, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=120)
    time.sleep(3)  # a wrongful third job would be recorded by now
    ev = [(e["event"], str(e.get("job_id")), e.get("why")) for e in events(run_dir)]
    assert ev == [("submitted", j1, None), ("started", j1, None), ("submitted", j2, None), ("followup", j1, None),
                  ("started", j2, None), ("stopped", j2, "requeue_limit")], ev
    stop = events(run_dir)[-1]
    assert "already restarted 1 times, 1 of them in earlier jobs of its chain" in stop["reason"], stop
    assert [r["State"] for r in sacct_rows(j2) if r["JobID"] == j2] == ["FAILED"]  # exit 75, not requeued
    r, rc = status_of(run_dir)
    assert (r["state"], r["job_id"], r["chain"], r["restarts"], rc) == ("stopped", j2, [j1, j2], 1, 3), r
    assert "requeue limit (1 restart(s)" in r["reason"], r


def test_scancel_of_a_job_that_cannot_requeue_gets_no_followup(tmp_path, jobs):
    run_dir = tmp_path / "run"
    jobs.append(j1 := template_job(tmp_path, run_dir, sbatch_args=("--no-requeue",),
                                   **{"train.max_steps": 10**6, "run.log_every": 5}))
    wait_for_step(run_dir, 10)
    run(["scancel", j1])
    wait_sacct_row(j1, {"CANCELLED", "COMPLETED", "FAILED"}, timeout=60)
    # the batch script decides after the trainer's exit, within KillWait (10 s)
    wait_for(lambda: events(run_dir)[-1]["event"] != "started", "no decision recorded", timeout=30)
    time.sleep(2)
    ev = [e["event"] for e in events(run_dir)]
    assert "followup" not in ev and "submitted" not in ev, ev
    assert ev[-1] == "stopped" and events(run_dir)[-1]["why"] == "ending", events(run_dir)[-1]
    assert read_json(run_dir / "status.json")["state"] == "checkpointed"


def test_a_cancel_during_the_followup_submission_cancels_the_followup(tmp_path, jobs):
    """The race made real: the job is cancelled after the decision but before the hand-over looks
    again; the follow-up (which afterany would start) is cancelled and recorded."""
    from foldhpc.slurm.followup import SbatchFollowUp, hand_over

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    jobs.append(j1 := sbatch("--partition=debug", "--mem=100M", "--output=/dev/null", "--wrap=sleep 120"))
    wait_for_state(j1, "RUNNING", timeout=60)
    run(["scancel", j1])
    wait_for(lambda: scontrol_job(j1).get("JobState") in ("COMPLETING", "CANCELLED"), "not cancelled", timeout=30)
    script = tmp_path / "next.sh"
    script.write_text("#!/bin/bash\nsleep 60\n")
    j2 = hand_over(SbatchFollowUp(run_dir, script, ["cfg.toml", "--no-resume"]), j1, 0, "test")
    jobs.append(j2)
    wait_sacct_row(j2, "CANCELLED", timeout=60)
    assert [e["event"] for e in events(run_dir)] == ["submitted", "followup", "followup_cancelled"]
    r, rc = status_of(run_dir)
    assert r["job_id"] == j2 and r["state"] == "cancelled" and rc == 3, r


def test_sigterm_only_preemption_is_requeued_and_resumes_bit_exact(tmp_path, jobs, reference_digest, slurm_cluster):
    """A job without --signal: preemption sends nothing at first, then CONT+TERM after GraceTime
    (20 s) while Slurm already requeues it (measured: JobState COMPLETING, Restarts=1), then KILL
    after KillWait (10 s). The trainer saves on TERM, Slurm requeues, the next run resumes."""
    run_dir = tmp_path / "run"
    train = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "foldhpc", "train", "--config", str(TINY),
                                              *set_args(overrides(run_dir))])
    jobs.append(job := sbatch("--partition=debug", "--requeue", "--cpus-per-task=1", "--mem=2G", "--time=15",
                              f"--output={tmp_path / 'out-%j.txt'}", f"--chdir={ROOT}",
                              "--export=ALL,FOLDHPC_DEBUG_STEP_DELAY_S=0.15", f"--wrap=exec {train}"))
    wait_for_step(run_dir, 5)
    hi, node = preempt(job, slurm_cluster.cpus, seconds=2)
    jobs.append(hi)
    wait_for(lambda: "(restart #1" in (run_dir / "train.log").read_text(), "not requeued and resumed", timeout=150)
    wait_sacct_row(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=180)
    states = [r["State"].split()[0] for r in sacct_rows(job) if r["JobID"] == job]
    assert states[-1] == "COMPLETED" and states[0] == "PREEMPTED", states
    log = (run_dir / "train.log").read_text()
    assert "received SIGUSR1" not in log
    saved = int(re.search(r"received SIGTERM: saving a checkpoint at step (\d+)", log).group(1))
    assert f"at step {saved} (restart #1" in log
    assert final_digest(run_dir) == reference_digest
    assert [e["restart_count"] for e in events(run_dir) if e["event"] == "started"] == [0, 1]
