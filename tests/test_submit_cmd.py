"""``foldhpc submit [--local] -- CMD``: a command foldhpc did not write, as a job, under the supervisor
(issue "Any model, any loop", item 3).

``--local`` runs the same submitit job without Slurm (tests/slurm/test_submit_cmd.py submits it to
the real cluster): the command runs where it was submitted, is restarted after a crash, its exit 75
ends the job as "checkpointed", and the job's story is in jobs.jsonl. The job's payload carries the
command, so a requeue or a follow-up job (which pickles the same payload) runs the same one again.
Bad usage is one line, exit 2, and submits nothing.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import read_json, wait_for

#: counts to N in a file, one step every 20 ms; crashes once (exit 3) at step CRASH_AT if given;
#: exits 75 ("checkpointed, requeue me") at once on SIGUSR1 or when it reaches STOP_AT
SCRIPT = """\
import pathlib, signal, sys, time
count, total = pathlib.Path(sys.argv[1]), int(sys.argv[2])
crash_at = int(sys.argv[3]) if len(sys.argv) > 3 else -1
stop_at = int(sys.argv[4]) if len(sys.argv) > 4 else -1
signal.signal(signal.SIGUSR1, lambda *a: sys.exit(75))
n = int(count.read_text()) if count.exists() else 0
with open("starts.log", "a") as f:
    f.write(f"{n}\\n")
while n < total:
    time.sleep(0.02)
    n += 1
    count.write_text(str(n))
    if n == crash_at and not pathlib.Path("crashed").exists():
        pathlib.Path("crashed").touch()
        sys.exit(3)
    if n == stop_at:
        sys.exit(75)
"""


def _submit(cwd: Path, run: Path, *opts: str, cmd: list[str]) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "foldhpc", "submit", "--local", "--set", f"run.dir={run}",
            "--set", "fault.restart_backoff=0.05", *opts, "--", *cmd]
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def _jobs(run: Path) -> list[dict[str, Any]]:
    path = run / "jobs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _ended(run: Path) -> list[dict[str, Any]]:
    return [e for e in _jobs(run) if e["event"] in ("completed", "failed", "stopped", "gave_up")]


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A submission directory with the script, named relative to it (the job must run it from there)."""
    (tmp_path / "steps.py").write_text(SCRIPT)
    return tmp_path


def test_local_job_runs_the_command_where_submitted_restarted_after_a_crash(work: Path) -> None:
    run = work / "run"
    r = _submit(work, run, "--set", "fault.max_restarts=2", cmd=["python3", "steps.py", "count", "30", "12"])
    assert r.returncode == 0, r.stderr
    assert "submitted job" in r.stdout and "command python3 steps.py count 30 12" in r.stdout, r.stdout
    wait_for(lambda: _ended(run), "the local job's end", timeout=60, poll=0.1)
    assert (work / "count").read_text() == "30"
    assert (work / "starts.log").read_text().split() == ["0", "12"]  # the restart went on from the file
    assert [e["event"] for e in _jobs(run)] == ["submitted", "started", "restarted", "completed"], _jobs(run)
    status = read_json(run / "status.json")
    assert status["state"] == "completed" and status["in_job_restarts"] == 1, status
    assert read_json(run / "slurm" / "command.json")["command"] == ["python3", "steps.py", "count", "30", "12"]
    assert read_json(run / "slurm" / "command.json")["cwd"] == str(work)
    assert sorted(os.listdir(run / "lock")) == ["gen-00000001.released"]  # one holder for both starts: the supervisor
    st = subprocess.run([sys.executable, "-m", "foldhpc", "status", str(run), "--json"], capture_output=True,
                        text=True, timeout=60)
    assert st.returncode == 0, st.stderr
    (row,) = json.loads(st.stdout)["runs"]
    assert row["state"] == "completed", row
    gp = subprocess.run([sys.executable, "-m", "foldhpc", "goodput", str(run), "--json"], capture_output=True,
                        text=True, timeout=60)
    assert gp.returncode == 0, gp.stderr
    report = json.loads(gp.stdout)
    starts = report["processes"]  # the two starts of the command; no steps (it records none)
    assert report["wall_s"] > 0 and [p["outcome"] for p in starts] == ["trainer exit status 3", "completed"], report
    assert report["goodput"] is None


def test_exit_75_ends_the_local_job_checkpointed_without_a_restart(work: Path) -> None:
    run = work / "run"
    r = _submit(work, run, "--set", "fault.max_restarts=2", cmd=["python3", "steps.py", "count", "30", "-1", "5"])
    assert r.returncode == 0, r.stderr
    (end,) = wait_for(lambda: _ended(run), "the local job's end", timeout=60, poll=0.1)
    assert end["event"] == "stopped" and end["why"] == "not_slurm", end  # no Slurm: nothing to requeue
    assert "step" not in end  # the command reports no step: unknown, not 0
    assert (work / "count").read_text() == "5"
    assert read_json(run / "status.json")["state"] == "checkpointed"
    assert [e["event"] for e in _jobs(run)] == ["submitted", "started", "stopped"]


@pytest.mark.parametrize("args, words", [
    (["--"], "needs the command after '--'"),
    (["--sweep", "train.seed=1,2", "--", "true"], "--sweep cannot submit a command"),
    (["--", "no-such-program-here"], "is not on PATH"),
    (["--", "./steps.py"], "is not an executable file"),
    (["--set", "slurm.nodes=2", "--", "true"], "slurm.tasks_per_node = 1"),
])
def test_bad_usage_is_one_line_exit_2_and_submits_nothing(work: Path, args: list[str], words: str) -> None:
    run = work / "run"
    r = subprocess.run([sys.executable, "-m", "foldhpc", "submit", "--local", "--set", f"run.dir={run}", *args],
                       cwd=work, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], r.stderr
    assert not (run / "jobs.jsonl").exists()


def test_the_payload_carries_the_command_to_a_requeue_and_a_follow_up(tmp_path: Path) -> None:
    """The job submitit pickles (and re-runs on a requeue), its ``checkpoint()`` resubmission and the
    follow-up's payload all run the command given at submission, in its directory."""
    from foldhpc.cli import CommandPayload
    from foldhpc.config import load_config
    from foldhpc.slurm.submit import job_for

    cfg = load_config(None, [f"run.dir={tmp_path / 'run'}"])
    job = pickle.loads(pickle.dumps(job_for(cfg, CommandPayload(["python3", "x.py", "--lr", "1e-3"], "/data/w"))))
    again = job.checkpoint().function  # what submitit submits when the job is preempted before listening
    assert job.followup is not None
    for payload in (job.payload, again.payload, job.followup.payload):  # type: ignore[attr-defined]
        assert isinstance(payload, CommandPayload)
        assert (payload.command, payload.cwd) == (["python3", "x.py", "--lr", "1e-3"], "/data/w")


def test_payload_outcome_in_process(tmp_path: Path) -> None:
    """What the job gets from the supervised command: completed, checkpointed with the step unknown
    (no Session wrote one), or an error naming the command."""
    from foldhpc.cli import CommandPayload
    from foldhpc.config import load_config
    from foldhpc.distributed.env import from_environ

    def outcome(code: str, run: str) -> Any:
        cfg = load_config(None, [f"run.dir={tmp_path / run}", "fault.max_restarts=0"])
        return CommandPayload([sys.executable, "-c", code], str(tmp_path))(cfg, from_environ(), None)

    done = outcome("pass", "a")
    assert done.state == "completed"
    ck = outcome("import sys; sys.exit(75)", "b")
    assert ck.state == "checkpointed" and ck.step is None and ck.signal is None
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"exit status 4"):
        outcome("import sys; sys.exit(4)", "c")
    assert time.monotonic() - t0 < 30
