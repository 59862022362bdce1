"""``slurm.resume = "chain"`` (the default) on the real local cluster: a signalled job saves,
submits its successor (``--dependency=afterany:<itself>``, same run directory and resources) and
exits; the successor starts as soon as it has ended -- no requeue hold.

* submitit: a user's ``scancel --signal=USR1``, then a real partition preemption of the follow-up
  (PreemptMode=REQUEUE, the preemption signal during GraceTime): three jobs, one live at a time,
  none requeued by Slurm, no stray job, bit-exact with an uninterrupted run, ``foldhpc status``
  shows the chain;
* sbatch template: a real time-limit signal continues in a follow-up; a plain ``scancel`` of that
  one ends the run (no follow-up);
* PreemptMode=CANCEL with SIGTERM only (nothing else would ever resume the run): a follow-up.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest

from conftest import read_json, run_foldhpc, wait_for
from .helpers import cancel_all_jobs, job_restarts, notes_of, preempt, run, sacct_rows, scontrol_job, \
    wait_sacct_row
from .test_followup import events, followup_of, status_of, template_job
from .test_submit import STEPS, final_digest, reference_digest, submit, wait_for_step  # noqa: F401

CHAIN = {"slurm.resume": "chain"}
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "PREEMPTED", "TIMEOUT"}


@pytest.fixture
def jobs(slurm_cluster):
    started: list[str] = []
    yield started
    cancel_all_jobs(started)


def own_rows(job: str) -> list[str]:
    """sacct State of each run of ``job`` itself (a requeued job has several)."""
    return [r["State"].split()[0] for r in sacct_rows(job) if r["JobID"] == job]


def live_jobs(job_ids: list[str]) -> list[str]:
    out = run(["squeue", "--noheader", "--format=%i", "--jobs", ",".join(job_ids)], check=False)
    return out.split()


def saved_steps(run_dir: Path, sig: str = "SIG(?:USR1|TERM)") -> list[int]:
    log = (run_dir / "train.log").read_text()
    return [int(s) for s in re.findall(rf"received {sig}: saving a checkpoint at step (\d+)", log)]


def test_submitit_chain_user_signal_then_partition_preemption_bit_exact(tmp_path, jobs, reference_digest,
                                                                         slurm_cluster):
    run_dir = tmp_path / "run"
    notify, notes = notes_of(tmp_path)
    jobs.append(j1 := submit(run_dir, **CHAIN, **notify))
    wait_for_step(run_dir, 20)
    run(["scancel", "--signal=USR1", j1])
    j2 = wait_for(lambda: followup_of(run_dir, j1), "no follow-up job was submitted", timeout=60)
    jobs.append(j2)
    wait_for(lambda: "(restart #1" in (run_dir / "train.log").read_text(), "the follow-up did not resume", timeout=90)
    first = saved_steps(run_dir)[0]
    wait_for_step(run_dir, first + 10)
    # a real partition preemption of the follow-up (PreemptMode=REQUEUE; USR1 at the start of GraceTime)
    hi, node = preempt(j2, slurm_cluster.cpus)
    jobs.append(hi)
    j3 = wait_for(lambda: followup_of(run_dir, j2), "no follow-up after the preemption", timeout=60)
    jobs.append(j3)
    wait_sacct_row(j3, FINAL, timeout=240)
    assert wait_sacct_row(hi, "COMPLETED", timeout=60)["NodeList"] == node
    assert final_digest(run_dir) == reference_digest
    # one run of each job: Slurm requeued none of them (no duplicate job of the run), none left behind
    assert [own_rows(j) for j in (j1, j2, j3)] == [["FAILED"], ["FAILED"], ["COMPLETED"]], \
        [sacct_rows(j) for j in (j1, j2, j3)]
    assert [job_restarts(j) for j in (j1, j2)] == [0, 0]
    assert scontrol_job(j1).get("Requeue") == "0"  # made non-requeueable before the hand-over
    assert live_jobs([j1, j2, j3]) == []
    ev = [(e["event"], str(e.get("job_id"))) for e in events(run_dir)]
    assert ev == [("submitted", j1), ("started", j1), ("submitted", j2), ("followup", j1), ("started", j2),
                  ("submitted", j3), ("followup", j2), ("started", j3), ("completed", j3)], ev
    links = [e for e in events(run_dir) if e["event"] == "followup"]
    assert [e["chain_restarts"] for e in links] == [1, 2] and all("slurm.resume=chain" in e["reason"] for e in links)
    steps = saved_steps(run_dir)
    log = (run_dir / "train.log").read_text()
    for n, s in enumerate(steps, 1):
        assert f"at step {s} (restart #{n}" in log, (steps, log[-3000:])
    r, rc = status_of(run_dir)
    assert (r["state"], r["job_id"], r["chain"], r["restarts"], rc) == ("completed", j3, [j1, j2, j3], 2, 0), r
    assert f"chain: run: jobs {j1} -> {j2} -> {j3}" in run_foldhpc("status", str(run_dir)).stdout
    # monitor.on_state_change was told each hand-over and the end, by the job whose decision it was
    told = wait_for(lambda: (t := notes.read_text().split("\n")[:-1] if notes.exists() else []) and len(t) >= 3 and t,
                    "three notifications", timeout=30)
    assert [ln.split()[:2] for ln in told] == [["handed_over", j1], ["handed_over", j2], ["completed", j3]], told
    assert told[0].split()[2] == str(steps[0]) and told[2].split()[2] == str(STEPS), told
    # foldhpc metrics, with sacct: the chain's newest job and its state, the hand-overs, the resumes
    text = run_foldhpc("metrics", str(run_dir)).stdout
    assert f'foldhpc_run_slurm_job{{run="{run_dir}",slurm_job_id="{j3}",state="completed"}} 1.0' in text, text
    assert f'foldhpc_run_requeues_total{{run="{run_dir}"}} 2.0' in text, text
    assert f'foldhpc_run_restarts_total{{run="{run_dir}"}} 2.0' in text, text


def test_template_chain_time_limit_signal_then_scancel_ends_the_run(tmp_path, jobs):
    """--time=1 with the signal 40 s before: Slurm sends it ~20-30 s after the start. The follow-up
    (same 1-minute limit) resumes; a plain scancel of it saves and stops: no third job."""
    run_dir = tmp_path / "run"
    jobs.append(j1 := template_job(tmp_path, run_dir, "--no-resume", sbatch_args=("--time=1", "--signal=B:USR1@40"),
                                   **{**CHAIN, "train.max_steps": 10**6, "run.log_every": 5,
                                      "slurm.signal_lead": "40s"}))
    j2 = wait_for(lambda: followup_of(run_dir, j1), "no follow-up after the time-limit signal", timeout=120)
    jobs.append(j2)
    wait_for(lambda: "(restart #1" in (run_dir / "train.log").read_text(), "the follow-up did not resume", timeout=90)
    assert scontrol_job(j2)["TimeLimit"] == "00:01:00"  # the job's own resources, copied
    run(["scancel", j2])
    wait_sacct_row(j2, FINAL, timeout=60)
    wait_for(lambda: events(run_dir)[-1]["event"] == "stopped", "no decision recorded for the cancelled job",
             timeout=30)
    time.sleep(2)  # a wrongful follow-up would be recorded by now
    ev = [(e["event"], str(e.get("job_id")), e.get("why")) for e in events(run_dir)]
    assert ev == [("started", j1, None), ("submitted", j2, None), ("followup", j1, None), ("started", j2, None),
                  ("stopped", j2, "ending")], ev
    assert own_rows(j1) == ["COMPLETED"] and own_rows(j2) == ["CANCELLED"], (sacct_rows(j1), sacct_rows(j2))
    assert live_jobs([j1, j2]) == []
    (first,) = saved_steps(run_dir, "SIGUSR1")
    assert f"at step {first} (restart #1" in (run_dir / "train.log").read_text()
    assert read_json(run_dir / "status.json")["state"] == "checkpointed"


@pytest.fixture
def cancel_preemption(slurm_cluster):
    """The debug partition with PreemptMode=CANCEL for one test (restored afterwards)."""
    run(["scontrol", "update", "PartitionName=debug", "PreemptMode=CANCEL"])
    try:
        yield
    finally:
        run(["scontrol", "update", "PartitionName=debug", "PreemptMode=REQUEUE"])


def test_preemption_that_cancels_the_job_continues_in_a_followup(tmp_path, jobs, reference_digest, slurm_cluster,
                                                                  cancel_preemption):
    """PreemptMode=CANCEL and no preemption signal the trainer listens to (SIGURG, ignored): SIGTERM
    after GraceTime (20 s), the job COMPLETING and sacct PREEMPTED with Restarts unchanged. Slurm
    will never run it again: the decision submits a follow-up within KillWait (10 s)."""
    run_dir = tmp_path / "run"
    slow = f"--export=ALL,FOLDHPC_PYTHON={sys.executable},FOLDHPC_DEBUG_STEP_DELAY_S=0.2"  # outlast GraceTime
    jobs.append(j1 := template_job(tmp_path, run_dir, sbatch_args=("--signal=B:URG@60", slow), **CHAIN))
    wait_for_step(run_dir, 10)
    hi, node = preempt(j1, slurm_cluster.cpus)
    jobs.append(hi)
    j2 = wait_for(lambda: followup_of(run_dir, j1), "no follow-up for the cancelled job", timeout=90)
    jobs.append(j2)
    wait_sacct_row(j2, FINAL, timeout=240)
    assert final_digest(run_dir) == reference_digest
    assert own_rows(j1) == ["PREEMPTED"] and own_rows(j2) == ["COMPLETED"], (sacct_rows(j1), sacct_rows(j2))
    link = next(e for e in events(run_dir) if e["event"] == "followup")
    assert "PreemptMode=CANCEL" in link["reason"], link
    (saved,) = saved_steps(run_dir, "SIGTERM")
    assert f"at step {saved} (restart #1" in (run_dir / "train.log").read_text()
    assert wait_sacct_row(hi, "COMPLETED", timeout=60)["NodeList"] == node


@pytest.mark.parametrize("mode", ["chain", "requeue"])
def test_whole_job_signal_resumes_bit_exact(tmp_path, jobs, reference_digest, mode):
    """``scancel --full --signal=USR1``: the batch shell gets the signal too (issue 23 item 4). It
    used to die of it (FAILED 0:10), the requeue decision saw COMPLETING and stopped; now the
    shell traps it, the trainer saves, and the run continues in a follow-up (chain) or the same job
    requeued, bit-exact."""
    run_dir = tmp_path / "run"
    jobs.append(j1 := submit(run_dir, **{"slurm.resume": mode}))
    wait_for_step(run_dir, 20)
    run(["scancel", "--full", "--signal=USR1", j1])
    last = j1
    if mode == "chain":
        jobs.append(last := wait_for(lambda: followup_of(run_dir, j1), "no follow-up job was submitted", timeout=60))
    wait_sacct_row(last, FINAL, timeout=240)
    assert final_digest(run_dir) == reference_digest
    if mode == "chain":  # the first job handed over and ended with the trainer's 75, not killed by the signal
        assert own_rows(j1) == ["FAILED"] and own_rows(last) == ["COMPLETED"], (sacct_rows(j1), sacct_rows(last))
        assert [r["ExitCode"] for r in sacct_rows(j1) if r["JobID"] == j1] == ["75:0"], sacct_rows(j1)
    else:
        assert own_rows(j1) == ["REQUEUED", "COMPLETED"], sacct_rows(j1)
    r, rc = status_of(run_dir)
    assert (r["state"], rc) == ("completed", 0), r


def test_template_whole_job_signal_resumes_bit_exact(tmp_path, jobs, reference_digest):
    """The sbatch template under a whole-job signal: its shell traps USR1 and forwards it while the
    trainer got its own copy from slurmd; one save, one follow-up, bit-exact."""
    run_dir = tmp_path / "run"
    jobs.append(j1 := template_job(tmp_path, run_dir, "--no-resume", **CHAIN))
    wait_for_step(run_dir, 20)
    run(["scancel", "--full", "--signal=USR1", j1])
    jobs.append(j2 := wait_for(lambda: followup_of(run_dir, j1), "no follow-up job was submitted", timeout=60))
    wait_sacct_row(j2, FINAL, timeout=240)
    assert final_digest(run_dir) == reference_digest
    assert own_rows(j1) == ["COMPLETED"] and own_rows(j2) == ["COMPLETED"], (sacct_rows(j1), sacct_rows(j2))
    assert len(saved_steps(run_dir, "SIGUSR1")) == 1, saved_steps(run_dir, "SIGUSR1")
