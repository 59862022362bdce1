"""``foldhpc status`` decisions from real captured Slurm output (tests/fixtures/sacct/): restarts
bounded by the run's own submission, and the exit status of stopped-but-not-failed runs.
The live counterparts are in tests/slurm/test_status*.py and tests/slurm/test_requeue.py."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from foldhpc.monitor import report as status
from foldhpc.records.exitcodes import ExitCode
from foldhpc.cluster import sacct

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


@pytest.mark.parametrize("jid,state,code", [("5", "cancelled", ExitCode.STOPPED),
                                            ("7", "preempted", ExitCode.STOPPED),
                                            ("3", "failed", ExitCode.FAILED),
                                            ("2", "completed", ExitCode.OK)])
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
    assert status.StatusReport([mk("cancelled"), mk("failed")]).exit_status == ExitCode.FAILED
    assert status.StatusReport([mk("held"), mk("running")]).exit_status == ExitCode.STOPPED
    assert status.StatusReport([mk("stopped"), mk("unknown", found=False)]).exit_status == ExitCode.USAGE
    assert status.StatusReport([mk("requeued"), mk("completed")]).exit_status == ExitCode.OK


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
    assert status.StatusReport([view]).exit_status == ExitCode.STOPPED
    # without the run's record of it, exit 75 stays a failure (nothing says it was deliberate)
    bare = status.merge(status.RunView(name="-", job_id="15"), job)
    assert bare.state == "failed"


# ------------------------------------------------------------------ multi-rank runs (hand-written run dirs)
def _multirank_run(tmp_path: Path, state: str, **extra) -> Path:
    """A run dir as a 2-rank run leaves it: status.json (rank 0's layout) and ranks/rank-N.json."""
    import json

    recs = extra.pop("_records", None) or [("running", 101, "h1"), ("running", 202, "h2")]
    run = tmp_path / "run"
    (run / "ranks").mkdir(parents=True)
    layout = [{"rank": 0, "node": "n1", "host": "h1", "pid": 101, "device": "cpu"},
              {"rank": 1, "node": "n2", "host": "h2", "pid": 202, "device": "cpu"}]
    st = {"state": state, "step": 7, "max_steps": 10, "world_size": 2, "nodes": ["n1", "n2"], "ranks": layout,
          "host": "h1", "pid": 101, "updated_at": time.time(), **extra}
    (run / "status.json").write_text(json.dumps(st))
    for rank, (rstate, pid, host) in enumerate(recs):
        (run / "ranks" / f"rank-{rank}.json").write_text(json.dumps(
            {"rank": rank, "world_size": 2, "node": f"n{rank + 1}", "host": host, "pid": pid, "state": rstate,
             "updated_at": time.time()}))
    return run


def test_multirank_run_shows_its_ranks_and_nodes(tmp_path):
    run = _multirank_run(tmp_path, "completed", _records=[("done", 101, "h1"), ("done", 999, "h2")])
    view = status.merge(status.read_run(run), None)
    assert (view.state, view.world_size, view.nodes, view.ranks_text) == ("completed", 2, ["n1", "n2"], "2 on n1,n2")
    # rank 0's record is of the same process as the layout; rank 1's (pid 999) is of another start
    assert [(r["rank"], r["node"], r.get("state")) for r in view.ranks] == [(0, "n1", "done"), (1, "n2", None)]
    report = status.StatusReport([view])
    lines = status.format_table(report).splitlines()
    assert lines[0].split() == ["RUN", "JOB", "STATE", "RESTARTS", "ELAPSED", "STEP", "LOSS", "CHECKPOINT", "RANKS",
                                "REASON"]
    assert "2 on n1,n2" in lines[1] and lines[1].split()[:3] == ["run", "-", "completed"]
    d = report.to_dict()["runs"][0]
    assert (d["world_size"], d["nodes"], d["failed_ranks"]) == (2, ["n1", "n2"], None)
    assert [r["pid"] for r in d["ranks"]] == [101, 202]


def test_single_rank_runs_keep_the_table_without_a_ranks_column(tmp_path):
    run = tmp_path / "one"
    run.mkdir()
    (run / "status.json").write_text('{"state": "completed", "step": 3, "max_steps": 3, "world_size": 1}')
    view = status.merge(status.read_run(run), None)
    assert (view.world_size, view.ranks_text, view.ranks, view.nodes) == (1, "1", None, None)
    assert "RANKS" not in status.format_table(status.StatusReport([view])).splitlines()[0]


def test_failed_multirank_run_names_the_failed_rank_with_its_node(tmp_path):
    """What the trainer writes when rank 1 was SIGKILLed: rank 0's collective failed and it blamed rank 1."""
    why = "died without reporting an error (killed by a signal such as SIGKILL, the OOM killer, or a crash in native code)"
    run = _multirank_run(tmp_path, "failed", error=f"rank 1 on n2 (pid 202): {why}",
                         failed_ranks=[{"rank": 1, "node": "n2", "host": "h2", "pid": 202, "why": why}])
    job = jobs_of("sacct_all_duplicates.txt")["3"]  # a real FAILED job (exit 3)
    view = status.merge(status.read_run(run, "3"), job)
    assert view.state == "failed", view
    assert "run error: rank 1 on n2 (pid 202): died without reporting an error" in view.reason, view.reason
    assert view.reason.count("rank 1 on n2") == 1, view.reason  # the error names it: not repeated
    report = status.StatusReport([view])
    assert report.exit_status == ExitCode.FAILED
    table = status.format_table(report)
    assert f"failed rank: run: rank 1 on n2 (host h2, pid 202): {why}" in table, table
    d = report.to_dict()["runs"][0]
    assert d["failed_ranks"] == [{"rank": 1, "node": "n2", "host": "h2", "pid": 202, "why": why}]
    # without Slurm (foldhpc train --nproc): the run's own record says the same
    local_view = status.merge(status.read_run(run), None)
    assert local_view.state == "failed" and local_view.reason.startswith("rank 1 on n2 (pid 202)"), local_view


def test_failed_rank_is_named_even_if_the_error_does_not_name_it(tmp_path):
    run = _multirank_run(tmp_path, "failed", error="PeerFailure: the stop agreement failed",
                         failed_ranks=[{"rank": 1, "node": "n2", "host": "h2", "pid": 202, "why": "RuntimeError: x"}])
    view = status.merge(status.read_run(run), None)
    assert view.reason == ("PeerFailure: the stop agreement failed; failed: rank 1 on n2 (host h2, pid 202): "
                           "RuntimeError: x"), view.reason


def test_running_multirank_run_notes_a_rank_gone_on_this_host(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me = socket.gethostname()
    run = _multirank_run(tmp_path, "running", host=me, pid=os.getpid(),
                         ranks=[{"rank": 0, "node": "n1", "host": me, "pid": os.getpid(), "device": "cpu"},
                                {"rank": 1, "node": "n1", "host": me, "pid": dead.pid, "device": "cpu"}],
                         _records=[("running", os.getpid(), me), ("running", dead.pid, me)])
    view = status.merge(status.read_run(run), None)
    assert view.state == "running"
    assert any(f"rank 1 on n1 (pid {dead.pid}) is gone" in n for n in view.notes), view.notes


def test_restarts_inside_the_job_are_shown_with_their_cause(tmp_path):
    """What the supervisor leaves in status.json after restarting a crashed trainer."""
    run = tmp_path / "crashy"
    run.mkdir()
    (run / "status.json").write_text('{"state": "running", "step": 40, "max_steps": 100, "in_job_restarts": 2, '
                                     '"last_failure": {"rank": 0, "step": 31, "phase": "train", '
                                     '"reason": "trainer killed by SIGSEGV"}}')
    view = status.merge(status.read_run(run), None)
    assert (view.in_job_restarts, view.last_failure["step"]) == (2, 31)
    table = status.format_table(status.StatusReport([view]))
    assert "restarted in job: crashy: 2 time(s); latest after: trainer killed by SIGSEGV at step 31" in table, table
    quiet = tmp_path / "quiet"
    quiet.mkdir()
    (quiet / "status.json").write_text('{"state": "completed", "step": 3, "max_steps": 3, "in_job_restarts": 0}')
    assert "restarted in job" not in status.format_table(status.StatusReport([status.merge(status.read_run(quiet),
                                                                                          None)]))
