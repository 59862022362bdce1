"""Hostile inputs on the real cluster (issue 19 item 20): a follow-up job of a job whose working
directory and output path have spaces, and whose output directory has the job id's digits in its
name. The predecessor is held (never runs); the successor waits on it (afterany) and is cancelled
first, so neither takes a CPU."""

from __future__ import annotations

import pytest

from foldhpc.slurm.followup import SbatchFollowUp
from foldhpc.slurm.history import read_history
from .helpers import cancel_all_jobs, run, sbatch


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
