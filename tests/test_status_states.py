"""``foldhpc status`` decisions from real captured Slurm output (tests/fixtures/sacct/): restarts
bounded by the run's own submission, and the exit status of stopped-but-not-failed runs.
The live counterparts are in tests/slurm/test_status*.py and tests/slurm/test_requeue.py."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from foldhpc.monitor import report as status
from foldhpc.slurm import sacct

FIX = Path(__file__).parent / "fixtures" / "sacct"


def jobs_of(name: str, keep=None) -> dict[str, sacct.SlurmJob]:
    text = (FIX / name).read_text()
    if keep is not None:
        text = "\n".join(line for n, line in enumerate(text.splitlines()) if keep(n, line))
    rows, problems = sacct.parse_sacct(text)
    assert not problems
    return {jid: sacct.job_from_runs(jid, runs) for jid, runs in sacct.group_runs(rows).items()}


def local(stamp: str) -> float:
    return time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S"))


def test_reused_job_id_rows_before_the_runs_submission_are_not_restarts():
    job = jobs_of("sacct_reused_job_id.txt")["15"]
    assert job.restarts == 2  # what --duplicates alone says: the old job's row counts
    view = status.RunView(name="run", run_dir="/x", job_id="15", submitted_at=local("2026-11-27T03:32:26") + 0.7)
    status.merge(view, job)
    assert view.restarts == 1, view  # preempted once, then the current run
    assert [r["state"] for r in view.slurm["runs"]] == ["preempted", "cancelled"]
    assert any("id was reused" in n for n in view.notes), view.notes


def test_reused_job_id_bounded_by_first_start_when_no_submission_is_recorded():
    """sbatch template runs record "started" (restart 0), not "submitted": bound by the old rows' End."""
    job = jobs_of("sacct_reused_job_id.txt")["15"]
    bounded = sacct.bound_runs(job, started_at=local("2026-11-27T03:32:41"))
    assert bounded.restarts == 1 and len(bounded.runs) == 2


def test_rows_of_this_run_are_all_kept():
    job = jobs_of("sacct_reused_job_id.txt", keep=lambda n, line: n == 0 or not line.startswith("15|fx_failed")
                  and "2026-11-26" not in line)["15"]
    assert sacct.bound_runs(job, submitted_at=local("2026-11-27T03:32:26") + 0.7).restarts == 1 == job.restarts


@pytest.mark.parametrize("jid,state,code", [("5", "cancelled", status.EXIT_STOPPED),
                                            ("7", "preempted", status.EXIT_STOPPED),
                                            ("3", "failed", status.EXIT_FAILED),
                                            ("2", "completed", status.EXIT_OK)])
def test_exit_status_of_final_states(jid, state, code):
    """Cancelled and preempted-not-requeued must not look like success to a script (exit 3)."""
    # job 7's first run alone: PREEMPTED is then its last (final) row, as for a job that is not requeued
    jobs = jobs_of("sacct_all_duplicates.txt", keep=lambda n, line: "RUNNING" not in line
                   and not (line.startswith("7|") and "COMPLETED" in line) and not line.startswith("7.batch|batch|COMPLETED"))
    view = status.merge(status.RunView(name="-", job_id=jid), jobs[jid])
    assert view.state == state, view
    assert status.StatusReport([view]).exit_status == code
    if state == "preempted":
        assert view.reason == "preempted, not requeued"


def test_failed_run_beats_stopped_and_unknown_beats_all():
    mk = lambda s, found=True: status.RunView(name="r", state=s, found=found)  # noqa: E731
    assert status.StatusReport([mk("cancelled"), mk("failed")]).exit_status == status.EXIT_FAILED
    assert status.StatusReport([mk("held"), mk("running")]).exit_status == status.EXIT_STOPPED
    assert status.StatusReport([mk("stopped"), mk("unknown", found=False)]).exit_status == status.EXIT_USAGE
    assert status.StatusReport([mk("requeued"), mk("completed")]).exit_status == status.EXIT_OK


def test_stopped_at_the_requeue_limit_is_not_failed_exit_75():
    """A job that saved on its signal and stopped at slurm.max_requeues exits 75: sacct says FAILED 75:0."""
    row = "15|foldhpc|FAILED|75:0|0:0|00:01:00|2026-11-27T03:33:49|2026-11-27T03:34:49|2026-11-27T03:33:43|debug|vm|None"
    head = (FIX / "sacct_reused_job_id.txt").read_text().splitlines()[0]
    rows, _ = sacct.parse_sacct(head + "\n" + row)
    job = sacct.job_from_runs("15", sacct.group_runs(rows)["15"])
    job.restarts = 1
    view = status.RunView(name="run", run_dir="/x", job_id="15", last_checkpoint={"step": 42},
                          stop_event={"event": "stopped", "why": "requeue_limit", "reason": "already restarted 1 times"})
    status.merge(view, job)
    assert view.state == "stopped", view
    assert "requeue limit" in view.reason and "exit 75" not in view.reason and "step 42" in view.reason, view.reason
    assert status.StatusReport([view]).exit_status == status.EXIT_STOPPED
    # without the run's record of it, exit 75 stays a failure (nothing says it was deliberate)
    bare = status.merge(status.RunView(name="-", job_id="15"), job)
    assert bare.state == "failed"
