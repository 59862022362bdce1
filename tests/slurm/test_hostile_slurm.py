"""Hostile inputs on the real cluster (issue 19 items 20 and 21).

* a follow-up job of a job whose working directory and output path have spaces, and whose output
  directory has the job id's digits in its name (the predecessor is held, never runs; the
  successor waits on it, afterany, and is cancelled first, so neither takes a CPU);
* a chain of the sbatch template whose CONFIG file is edited while it runs: the follow-up trains
  with the config the run started with (bit-exact with an uninterrupted run), without
  ``--force-resume``;
* a chain whose signal always comes before the first step: it stops after 3 jobs in a row
  without progress, and ``foldhpc status`` says why.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TINY, run_foldhpc, wait_for
from foldhpc.config import config_to_toml, load_config
from foldhpc.slurm.followup import SbatchFollowUp
from foldhpc.records.history import read_history
from .helpers import cancel_all_jobs, run, sacct_rows, sbatch, wait_sacct_row
from .test_submit import final_digest, overrides, reference_digest, wait_for_step  # noqa: F401

TEMPLATE = ROOT / "sbatch" / "train.sbatch"


@pytest.fixture
def jobs(slurm_cluster):
    started: list[str] = []
    yield started
    cancel_all_jobs(list(reversed(started)))  # the successor first: afterany would start it


def record(job_id: str) -> dict[str, str]:
    """scontrol's multi-line record read by line (each path is alone on its line), independent of
    foldhpc's parser."""
    info: dict[str, str] = {}
    for line in run(["scontrol", "show", "job", job_id]).splitlines():
        line = line.strip()
        for key in ("WorkDir", "StdOut", "Command", "Dependency"):
            if line.startswith(f"{key}="):
                info[key] = line.split("=", 1)[1]
        if line.startswith("JobId="):
            info["JobName"] = line.split(" JobName=", 1)[1]
        elif " Dependency=" in line:
            info["Dependency"] = line.split(" Dependency=", 1)[1].split(" ")[0]
    return info


def test_follow_up_of_a_job_in_a_directory_with_spaces(tmp_path, jobs):
    work = tmp_path / "My Project"
    script = work / "job script.sh"
    work.mkdir()
    script.write_text("#!/bin/bash\nsleep 1\n")
    first = sbatch("--hold", "--time=1", "--mem=50M", "--job-name=fold hpc", f"--chdir={work}", str(script))
    jobs.append(first)
    # an output directory named after the job id's digits, and the id once more in the file name
    out_dir = work / f"run{first}"
    out_dir.mkdir()
    run(["scontrol", "update", f"JobId={first}", f"StdOut={out_dir}/slurm-{first}.out"])

    new = SbatchFollowUp(tmp_path, script, ["cfg.toml", "--no-resume"]).submit(first, followup_of=first)
    jobs.append(new)
    info = record(new)
    assert info["WorkDir"] == str(work)
    assert info["JobName"] == "fold hpc"
    assert info["StdOut"] == f"{out_dir}/slurm-{new}.out", info["StdOut"]  # run<first>/ kept, the file is the new job's
    assert info["Dependency"].startswith(f"afterany:{first}")
    assert info["Command"] == f"{script} cfg.toml"  # --no-resume is for the first job only
    assert [e["job_id"] for e in read_history(tmp_path)[0] if e["event"] == "submitted"] == [new]


def events(run_dir: Path) -> list[dict]:
    return read_history(run_dir)[0]


def template_job(tmp_path: Path, config: Path, *args: str) -> str:
    return sbatch("--partition=debug", "--cpus-per-task=1", "--mem=2G", "--time=15",
                  f"--output={tmp_path}/slurm-%j.out", f"--export=ALL,FOLDHPC_PYTHON={sys.executable}",
                  str(TEMPLATE), str(config), *args)


def config_file(path: Path, run_dir: Path, **extra: object) -> Path:
    """Everything in one file, no --set: what the test then edits is what the job reads."""
    path.write_text(config_to_toml(load_config(TINY, overrides(run_dir, **{"slurm.resume": "chain", **extra}))))
    return path


def test_an_edited_config_file_does_not_move_the_chain(tmp_path, jobs, reference_digest):
    run_dir = tmp_path / "run"
    cfg = config_file(tmp_path / "my.toml", run_dir)
    jobs.append(j1 := template_job(tmp_path, cfg, "--force-resume"))
    wait_for_step(run_dir, 20)
    edited, n = re.subn(r"(?m)^lr = .*$", "lr = 0.5", cfg.read_text())  # would change the trajectory
    assert n == 1
    cfg.write_text(edited)
    run(["scancel", "--signal=USR1", "--batch", j1])
    j2 = wait_for(lambda: next((str(e["followup_job_id"]) for e in events(run_dir) if e["event"] == "followup"), None),
                  "no follow-up job was submitted", timeout=60)
    jobs.append(j2)
    wait_sacct_row(j2, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=240)
    assert final_digest(run_dir) == reference_digest  # the run's own lr, bit for bit
    assert record(j2)["Command"].endswith(f"slurm_script {(run_dir / 'config.toml').resolve()}")  # $0: Slurm's copy
    out2 = (tmp_path / f"slurm-{j2}.out").read_text()
    assert "exited with status 0" in out2 and "force" not in (run_dir / "train.log").read_text().split(j2)[-1]


def test_a_chain_whose_signal_always_comes_before_the_first_step_stops(tmp_path, jobs):
    """Each job gets USR1 as soon as it records its start (the trainer holds it and saves at its
    first step boundary, the step it resumed at): 3 jobs in a row without progress
    (fault.crash_loop_jobs) end the chain as a crash loop (exit 93, never requeued), well before
    slurm.max_requeues=8."""
    run_dir = tmp_path / "run"
    cfg = config_file(tmp_path / "my.toml", run_dir, **{"fault.max_restarts": 0, "slurm.max_requeues": 8})
    jobs.append(template_job(tmp_path, cfg))
    signalled: set[str] = set()
    deadline = time.monotonic() + 300
    while not any(e["event"] == "stopped" for e in events(run_dir)):
        assert time.monotonic() < deadline, events(run_dir)
        for e in events(run_dir):
            jid = str(e.get("job_id"))
            if e["event"] == "started" and jid not in signalled:
                signalled.add(jid)  # the batch shell and the trainer: the trainer has it before it listens
                run(["scancel", "--batch", "--full", "--signal=USR1", jid], check=False)
            if e["event"] == "submitted" and jid not in jobs:
                jobs.append(jid)
        time.sleep(0.2)
    ev = events(run_dir)
    assert [e["step"] for e in ev if e["event"] == "followup"] == [0, 0, 0]
    stop = ev[-1]
    assert (stop["event"], stop["why"], stop["step"]) == ("stopped", "no_progress", 0), stop
    assert len(signalled) == 4 and stop["job_id"] == jobs[-1]
    wait_sacct_row(jobs[-1], {"COMPLETED", "FAILED", "CANCELLED"}, timeout=60)
    p = run_foldhpc("status", str(run_dir), "--json")
    (r,) = json.loads(p.stdout)["runs"]
    # the chain's crash-loop breaker (fault.crash_loop_jobs): state crash_loop, the job's exit 93
    assert r["state"] == "crash_loop" and "no progress" in r["reason"], r
    assert [row["ExitCode"] for row in sacct_rows(jobs[-1]) if row["JobID"] == jobs[-1]] == ["93:0"]
