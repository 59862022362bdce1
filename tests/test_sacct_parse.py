"""sacct/scontrol/squeue parsing, state mapping, merging and rendering of ``foldhpc status`` (fast, no Slurm).

Fixtures in tests/fixtures/sacct/ are real output of **Slurm 22.05.8** (slurm-wlm, Debian 12) from the
local test cluster (see its README.md). Two were captured for this module while a ``--requeue`` job
(55) in ``debug`` was preempted by a ``-p high -c 4`` job, polling ``sacct --duplicates --parsable2
--format=<foldhpc.cluster.sacct.SACCT_FIELDS>``:

* ``sacct_lag_just_started.txt``: 1 s after start, sacct still had the allocation as PENDING, named
  "allocation", Partition empty, while its batch step was already RUNNING (sacct lags slurmctld);
* ``sacct_preempted_pending.txt``: right after the preemption: PREEMPTED row, then a PENDING row
  (Reason BeginTime) for the requeued run; scontrol said Restarts=1.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from foldhpc.monitor import report as st
from foldhpc.cluster import sacct
from foldhpc.cluster.command import SlurmCommandError
from foldhpc.cluster.sacct import group_runs, job_from_runs, map_state, parse_sacct

FIX = Path(__file__).parent / "fixtures" / "sacct"


def fixture(name: str) -> str:
    return (FIX / name).read_text()


def jobs_of(text: str) -> dict[str, sacct.SlurmJob]:
    rows, problems = parse_sacct(text)
    assert problems == []
    return {jid: job_from_runs(jid, runs) for jid, runs in group_runs(rows).items()}


# ------------------------------------------------------------------ parsing real output
def test_duplicates_fixture_states_restarts_and_exit_codes():
    jobs = jobs_of(fixture("sacct_all_duplicates.txt"))
    assert list(jobs) == ["1", "2", "3", "4", "5", "6", "7", "8"]  # steps (7.batch, 2.0 ...) are not jobs
    got = {j: (v.state, v.restarts) for j, v in jobs.items()}
    assert got == {"1": ("timeout", 0), "2": ("completed", 0), "3": ("failed", 0), "4": ("completed", 0),
                   "5": ("cancelled", 0), "6": ("completed", 0), "7": ("completed", 1), "8": ("completed", 0)}
    assert jobs["5"].raw_state == "CANCELLED by 0"
    assert jobs["3"].exit_code == "3:0"
    assert jobs["1"].exit_code == "0:15 (step batch)"  # allocation 0:0, the batch step got SIGTERM
    # requeued job 7: one run per row, oldest first; the current run is the newest
    j7 = jobs["7"]
    assert [r.state for r in j7.runs] == ["preempted", "completed"]
    assert (j7.elapsed_s, j7.total_elapsed_s) == (30, 55)
    assert [s.step for s in j7.runs[0].steps] == ["batch"] and j7.runs[0].steps[0].state == "cancelled"
    assert j7.name == "fx_requeue" and j7.partition == "debug"


def test_without_duplicates_the_restart_is_invisible():
    """Why sacct must be called with --duplicates: the PREEMPTED row of job 7 is gone otherwise."""
    jobs = jobs_of(fixture("sacct_all_no_duplicates.txt"))
    assert (jobs["7"].state, jobs["7"].restarts) == ("completed", 0)


def test_header_of_the_output_decides_the_columns():
    jobs = jobs_of(fixture("sacct_without_restarts_field.txt"))  # JobID|State|ExitCode|Elapsed|Start|End only
    assert (jobs["7"].state, jobs["7"].restarts, jobs["7"].name) == ("completed", 1, "")
    assert jobs["5"].state == "cancelled"


def test_preempted_then_pending_is_a_restart():
    j = jobs_of(fixture("sacct_preempted_pending.txt"))["55"]
    assert (j.state, j.restarts, j.reason, j.raw_state) == ("pending", 1, "BeginTime", "PENDING")
    assert j.runs[0].state == "preempted"


def test_step_rows_only_feed_exit_codes_and_oom():
    text = ("JobID|State|ExitCode\n"
            "9|FAILED|0:125\n9.batch|OUT_OF_MEMORY|0:125\n9.extern|COMPLETED|0:0\n"
            "10|COMPLETED|0:0\n10.0|OUT_OF_MEMORY|0:125\n")
    jobs = jobs_of(text)
    assert list(jobs) == ["9", "10"]
    assert jobs["9"].state == "out_of_memory" and "ran out of memory" in jobs["9"].notes[0]
    assert jobs["10"].state == "completed"  # the job itself finished: a step OOM does not make it fail


# ------------------------------------------------------------------ bad input
def test_malformed_lines_are_reported_and_skipped():
    text = fixture("sacct_all_duplicates.txt").splitlines()
    text[3:3] = ["2|short|line", "abc|fx|COMPLETED|0:0|00:00:00|x|x|x|vm|None|0:0|debug|", "", "garbage"]
    rows, problems = parse_sacct("\n".join(text))
    assert len(problems) == 3, problems
    assert "line 4: expected 13 fields, got 3" in problems[0]
    assert "unreadable JobID 'abc'" in problems[1]
    assert "got 1" in problems[2]
    assert len(rows) == len(fixture("sacct_all_duplicates.txt").splitlines()) - 1  # every real row kept


def test_unknown_state_keeps_the_raw_text():
    rows, problems = parse_sacct("JobID|State|ExitCode\n11|WIBBLE by 3|0:0\n11.batch|COMPLETED|0:0\n")
    assert problems == ["sacct line 2: unknown Slurm state 'WIBBLE by 3' (job 11)"]
    job = job_from_runs("11", group_runs(rows)["11"])
    assert (job.state, job.raw_state, job.to_dict()["slurm_state"]) == ("unknown", "WIBBLE by 3", "WIBBLE by 3")


@pytest.mark.parametrize("raw, state", [
    ("CANCELLED by 0", "cancelled"), ("CANCELLED by 1234", "cancelled"), ("PENDING", "pending"),
    ("RUNNING", "running"), ("COMPLETED", "completed"), ("FAILED", "failed"), ("TIMEOUT", "timeout"),
    ("PREEMPTED", "preempted"), ("REQUEUED", "requeued"), ("REQUEUE_HOLD", "held"),
    ("NODE_FAIL", "node_fail"), ("BOOT_FAIL", "node_fail"), ("OUT_OF_MEMORY", "out_of_memory"),
    ("DEADLINE", "timeout"), ("COMPLETING", "completing"), ("SUSPENDED", "suspended"),
    ("completed", "completed"), ("", "unknown"), ("NOT_A_STATE", "unknown"),
])
def test_map_state(raw, state):
    assert map_state(raw) == state


@pytest.mark.parametrize("text, seconds", [
    ("00:01:15", 75), ("1-02:03:04", 93784), ("05:06", 306), ("00:00:01.500", 1), ("INVALID", None), ("", None),
])
def test_parse_elapsed(text, seconds):
    assert sacct.parse_elapsed(text) == seconds


def test_scontrol_and_squeue_fixtures():
    live = sacct.parse_scontrol(fixture("scontrol_show_job_requeued_pending.txt"))
    job = sacct.job_from_scontrol("7", live["7"])
    assert (job.state, job.restarts, job.reason, job.source) == ("pending", 1, "BeginTime", "scontrol")
    queued, problems = sacct.parse_squeue(fixture("squeue_h_o.txt") + "broken|line\n")
    assert {j: (v.state, v.restarts, v.elapsed_s) for j, v in queued.items()} == {
        "7": ("running", None, 1), "1": ("running", None, 40)}
    assert problems and "squeue line 3" in problems[0]


# ------------------------------------------------------------------ querying, with fake Slurm commands
def fake_slurm(monkeypatch, *, sacct_out=None, scontrol_out=None, squeue_out=None) -> list[list[str]]:
    """Answer run_command from strings; None = that command fails (not installed / accounting off)."""
    calls: list[list[str]] = []
    answers = {"sacct": sacct_out, "scontrol": scontrol_out, "squeue": squeue_out}

    def run_command(cmd, timeout=30.0):
        calls.append(cmd)
        out = answers[cmd[0]]
        if out is None:
            raise SlurmCommandError(f"{cmd[0]} exited with 1: Slurm accounting storage is disabled")
        return out

    monkeypatch.setattr(sacct, "run_command", run_command)
    return calls


def test_query_uses_duplicates_and_cross_checks_restarts(monkeypatch):
    calls = fake_slurm(monkeypatch, sacct_out=fixture("sacct_preempted_pending.txt"),
                       scontrol_out=fixture("scontrol_show_job_requeued_pending.txt").replace("JobId=7 ", "JobId=55 "))
    q = sacct.query_jobs(["55", "55"])
    assert "--duplicates" in calls[0] and "--parsable2" in calls[0] and calls[0][0] == "sacct"
    assert (q.source, q.notes, list(q.jobs)) == ("sacct", [], ["55"])
    job = q.jobs["55"]
    assert (job.state, job.restarts, job.notes) == ("pending", 1, [])


def test_query_prefers_slurmctld_while_sacct_lags(monkeypatch):
    # sacct still shows the first run as RUNNING; slurmctld already requeued it
    lagging = "\n".join(fixture("sacct_preempted_pending.txt").splitlines()[:2]).replace("PREEMPTED", "RUNNING")
    fake_slurm(monkeypatch, sacct_out=lagging,
               scontrol_out=fixture("scontrol_show_job_requeued_pending.txt").replace("JobId=7 ", "JobId=55 "))
    job = sacct.query_jobs(["55"]).jobs["55"]
    assert (job.state, job.restarts, job.source) == ("pending", 1, "sacct")
    assert any("sacct lags" in n for n in job.notes)
    # and the "allocation" PENDING row of a job that already runs
    fake_slurm(monkeypatch, sacct_out=fixture("sacct_lag_just_started.txt"),
               scontrol_out="JobId=55 JobName=fx_req JobState=RUNNING Reason=None Restarts=0 RunTime=00:00:01\n")
    assert sacct.query_jobs(["55"]).jobs["55"].state == "running"


def test_final_sacct_state_beats_completing(monkeypatch):
    """On scancel, accounting says CANCELLED while slurmctld still says COMPLETING: keep CANCELLED."""
    cancelled = "\n".join(ln for ln in fixture("sacct_all_duplicates.txt").splitlines() if ln[:2] in ("Jo", "5|", "5."))
    fake_slurm(monkeypatch, sacct_out=cancelled,
               scontrol_out="JobId=5 JobName=fx_cancelled JobState=COMPLETING Reason=None Restarts=0\n")
    job = sacct.query_jobs(["5"]).jobs["5"]
    assert (job.state, job.raw_state, job.notes) == ("cancelled", "CANCELLED by 0", [])


def test_sacct_unavailable_falls_back_and_says_so(monkeypatch):
    fake_slurm(monkeypatch, sacct_out=None, scontrol_out=fixture("scontrol_show_job_requeued_running.txt"))
    q = sacct.query_jobs(["7", "8"])
    assert q.source == "scontrol"
    assert any("sacct unavailable" in n for n in q.notes) and any("states from scontrol" in n for n in q.notes)
    assert (q.jobs["7"].state, q.jobs["7"].restarts, q.jobs["7"].source) == ("running", 1, "scontrol")
    assert (q.jobs["8"].state, q.jobs["8"].source) == ("unknown", "none")
    assert "MinJobAge" in q.jobs["8"].notes[0]

    fake_slurm(monkeypatch, sacct_out=None, scontrol_out=None, squeue_out=fixture("squeue_h_o.txt"))
    q = sacct.query_jobs(["1"])
    assert (q.source, q.jobs["1"].state, q.jobs["1"].restarts) == ("squeue", "running", None)

    fake_slurm(monkeypatch)
    q = sacct.query_jobs(["1"])
    assert (q.source, q.jobs["1"].state) == ("none", "unknown")
    assert any("squeue unavailable" in n for n in q.notes)


def test_job_unknown_to_sacct_is_unknown(monkeypatch):
    fake_slurm(monkeypatch, sacct_out="JobID|JobName|State\n", scontrol_out="")
    job = sacct.query_jobs(["123"]).jobs["123"]
    assert (job.state, job.known) == ("unknown", False)
    assert "sacct does not know job 123" in job.notes[0]


# ------------------------------------------------------------------ foldhpc status: crafted run dirs
def make_run(root: Path, name: str, status: dict | str | None, job_id: str | None = None) -> Path:
    run = root / name
    run.mkdir(parents=True)
    if isinstance(status, dict):
        (run / "status.json").write_text(json.dumps(status))
    elif isinstance(status, str):
        (run / "status.json").write_text(status)
    if job_id:
        (run / "jobs.jsonl").write_text(json.dumps({"event": "submitted", "job_id": job_id, "time": 1}) + "\n"
                                        + "{torn line\n")
    else:
        (run / "config.toml").write_text("")
    return run


@pytest.fixture
def runs(tmp_path, monkeypatch):
    """runs/ with a requeued run, a failed one, a corrupt and a missing status file; Slurm faked."""
    root = tmp_path / "runs"
    make_run(root, "requeued", {"state": "checkpointed", "step": 120, "max_steps": 1000, "loss": 2.31415,
                                "last_checkpoint": {"step": 120, "file": "step_00000120.ckpt", "saved_at": 0},
                                "slurm_job_id": "55"}, job_id="55")
    make_run(root, "crashed", {"state": "failed", "step": 7, "max_steps": 10, "error": "RuntimeError: boom"},
             job_id="3")
    make_run(root, "corrupt", '{"state": "runn', job_id="2")
    make_run(root, "nostatus", None)
    # job 55 from the preemption capture, jobs 2 and 3 from the other one, in the columns of the first
    lines = fixture("sacct_preempted_pending.txt").splitlines()
    extra = jobs_of(fixture("sacct_all_duplicates.txt"))
    fake_slurm(monkeypatch, sacct_out="\n".join(lines) + "\n" + _as_fields(extra, ["2", "3"], lines[0].split("|")),
               scontrol_out="")
    monkeypatch.chdir(tmp_path)
    return root


def _as_fields(jobs: dict[str, sacct.SlurmJob], ids: list[str], names: list[str]) -> str:
    out = []
    for jid in ids:
        for run in jobs[jid].runs:
            for row in [run.row, *run.steps]:
                out.append("|".join(row.fields.get(n, "") for n in names))
    return "\n".join(out) + "\n"


def test_status_of_all_runs_table(runs, capsys):
    rc = st.main([])
    out, err = capsys.readouterr()
    assert rc == 1, out  # the crashed run failed
    lines = out.splitlines()
    assert lines[0].split() == ["RUN", "JOB", "STATE", "RESTARTS", "ELAPSED", "STEP", "LOSS", "CHECKPOINT", "REASON"]
    table = {ln.split()[0]: ln for ln in lines[1:5]}
    assert set(table) == {"corrupt", "crashed", "nostatus", "requeued"}
    assert table["requeued"].split()[1:8] == ["55", "requeued", "1", "0:00:00", "120/1000", "2.3142", "120"]
    assert "pending after preemption (BeginTime); resumes from step 120" in table["requeued"]
    assert table["crashed"].split()[1:4] == ["3", "failed", "0"]
    assert "exit 3; run error: RuntimeError: boom" in table["crashed"]
    assert table["corrupt"].split()[1:3] == ["2", "completed"]
    assert table["nostatus"].split()[1:3] == ["-", "unknown"]
    assert "note: corrupt: status file unreadable:" in out and "corrupt status file" in out
    assert "note: nostatus: no status.json" in out
    assert "note: requeued: 1 unreadable line(s) in jobs.jsonl" in out
    assert err == "" and "Traceback" not in out


def test_status_json(runs, capsys):
    rc = st.main(["--json", "runs/requeued", "3", str(runs / "corrupt")])
    report = json.loads(capsys.readouterr().out)
    assert rc == report["exit_status"] == 1
    by_name = {r["name"]: r for r in report["runs"]}
    req = by_name["requeued"]
    assert (req["state"], req["restarts"], req["source"], req["slurm_state"]) == ("requeued", 1, "sacct", "PENDING")
    assert (req["run_state"], req["step"], req["max_steps"], req["last_checkpoint"]["step"]) == (
        "checkpointed", 120, 1000, 120)
    assert [r["state"] for r in req["slurm"]["runs"]] == ["preempted", "pending"]
    assert by_name["crashed"]["exit_code"] == "3:0"  # job id 3 was found in crashed/jobs.jsonl
    assert by_name["crashed"]["error"] == "RuntimeError: boom"
    assert by_name["corrupt"]["run_state"] is None and "corrupt status file" in by_name["corrupt"]["notes"][0]


def test_bad_arguments_exit_2_with_a_message(runs, capsys):
    rc = st.main(["/no/such/dir", "12.batch", "999", str(runs / "requeued" / "status.json")])
    out, err = capsys.readouterr()
    assert rc == 2
    assert "/no/such/dir: no such run directory, and not a job id" in err
    assert "12.batch: is a job step; give the job id (12)" in err
    assert "status.json: not a directory" in err
    assert out.splitlines()[1].split()[:3] == ["-", "999", "unknown"]
    assert "sacct does not know job 999" in out


def test_missing_runs_root_and_config_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert st.main([]) == 2
    assert "no runs root runs/" in capsys.readouterr().err
    assert st.main(["--set", "run.dri=x"]) == 2
    assert "config error: --set: unknown key 'run.dri'" in capsys.readouterr().err
    (tmp_path / "elsewhere" / "a").mkdir(parents=True)
    (tmp_path / "elsewhere" / "a" / "config.toml").write_text("")
    fake_slurm(monkeypatch, sacct_out="", scontrol_out="")
    assert st.main(["--set", "run.dir=elsewhere/x"]) == 0  # runs root = parent of run.dir
    assert capsys.readouterr().out.splitlines()[1].split()[:3] == ["a", "-", "unknown"]


def test_sacct_unavailable_is_said_in_table_and_json(runs, monkeypatch, capsys):
    fake_slurm(monkeypatch, sacct_out=None,
               scontrol_out=fixture("scontrol_show_job_requeued_pending.txt").replace("JobId=7 ", "JobId=55 "))
    st.main(["runs/requeued", "runs/crashed"])
    out = capsys.readouterr().out
    assert "note: sacct unavailable (sacct exited with 1: Slurm accounting storage is disabled)" in out
    assert "note: sacct was not available: Slurm states above come from scontrol" in out
    rows = {ln.split()[0]: ln.split()[1:4] for ln in out.splitlines()[1:3]}
    assert rows == {"requeued": ["55", "requeued", "1"], "crashed": ["3", "unknown", "?"]}  # never the run's guess
    st.main(["--json", "runs/requeued"])
    report = json.loads(capsys.readouterr().out)
    assert report["source"] == "scontrol" and report["runs"][0]["source"] == "scontrol"


def test_local_run_without_slurm_uses_its_own_record(tmp_path, monkeypatch, capsys):
    run = make_run(tmp_path, "local", {"state": "completed", "step": 10, "max_steps": 10, "loss": 0.5})
    calls = fake_slurm(monkeypatch)
    assert st.main([str(run)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].split()[:3] == ["local", "-", "completed"]
    assert "no Slurm job recorded for this run" in out and calls == []  # no job id: Slurm not asked


def test_watch_refreshes_until_interrupted(runs, monkeypatch, capsys):
    ticks = iter([None, KeyboardInterrupt()])

    def sleep(_s):
        t = next(ticks)
        if t:
            raise t

    monkeypatch.setattr(st.time, "sleep", sleep)
    assert st.main(["--watch", "0.5", "runs/requeued"]) == 0
    out = capsys.readouterr().out
    assert out.count("foldhpc status  ") == 2 and out.count("requeued") >= 4
    assert st.main(["--watch=0", "runs/requeued"]) == 2
    assert "--watch SECONDS must be > 0" in capsys.readouterr().err


@pytest.mark.parametrize("code, text", [("3:0", "exit 3"), ("0:9", "signal 9 (SIGKILL)"), ("0:200", "signal 200"),
                                        ("0:15 (step batch)", "signal 15 (SIGTERM) (step batch)"), ("", "")])
def test_describe_exit(code, text):
    assert st.describe_exit(code) == text
