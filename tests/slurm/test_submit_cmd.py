"""``foldhpc submit -- CMD`` on the real local Slurm cluster: a command foldhpc did not write (a small
python script that counts steps in a file and exits 75 on SIGUSR1), submitted in chain mode, signalled
once (``scancel --signal=USR1``, Slurm's preemption/time-limit signal) and continued by its follow-up
job, which runs the same command, in the same directory, to the end; ``foldhpc status`` shows the chain.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import read_json, wait_for
from .helpers import cancel_all_jobs, run, sacct_rows, wait_sacct_row
from .test_followup import events, followup_of

STEPS = 150  # 0.1 s a step: ~15 s of work
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "PREEMPTED", "TIMEOUT"}
JOB = {"slurm.gpus": 0, "slurm.cpus_per_task": 1, "slurm.mem": "1G", "slurm.time": "10m",
       "slurm.signal_lead": "60s", "slurm.partition": "debug", "slurm.resume": "chain"}
#: counts to argv[2] in the file argv[1] (resuming from it), logs each start with its job and count,
#: and exits 75 ("saved, requeue me") at the step boundary after a SIGUSR1
SCRIPT = """\
import os, pathlib, signal, sys, time
count, total = pathlib.Path(sys.argv[1]), int(sys.argv[2])
stop = []
signal.signal(signal.SIGUSR1, lambda *a: stop.append(1))
n = int(count.read_text()) if count.exists() else 0
with open("starts.log", "a") as f:
    f.write(f"{os.environ.get('SLURM_JOB_ID')} {n}\\n")
while n < total:
    if stop:
        sys.exit(75)
    time.sleep(0.1)
    n += 1
    count.write_text(str(n))
"""


@pytest.fixture
def jobs(slurm_cluster):
    started: list[str] = []
    yield started
    cancel_all_jobs(started)


def _count(work: Path) -> int:
    try:
        return int((work / "count").read_text() or 0)
    except (OSError, ValueError):
        return 0


@pytest.mark.timeout(180)
def test_submitted_command_signalled_continues_in_its_followup(tmp_path, jobs):
    work, run_dir = tmp_path, tmp_path / "run"
    (work / "steps.py").write_text(SCRIPT)
    sets = [a for k, v in {"run.dir": "run", **JOB}.items() for a in ("--set", f"{k}={v}")]
    cmd = [sys.executable, "steps.py", "count", str(STEPS)]  # relative: the job runs it where it was submitted
    p = subprocess.run([sys.executable, "-m", "foldhpc", "submit", *sets, "--", *cmd], cwd=work,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    j1 = re.search(r"submitted job (\d+)", p.stdout).group(1)
    jobs.append(j1)
    wait_for(lambda: _count(work) >= 20, "the command at step 20", timeout=90, poll=0.05)
    run(["scancel", "--signal=USR1", j1])
    j2 = wait_for(lambda: followup_of(run_dir, j1), "no follow-up job was submitted", timeout=60)
    jobs.append(j2)
    assert wait_sacct_row(j2, FINAL, timeout=120)["State"] == "COMPLETED", sacct_rows(j2)
    assert _count(work) == STEPS
    starts = [line.split() for line in (work / "starts.log").read_text().splitlines()]
    assert [s[0] for s in starts] == [j1, j2], starts  # the same command, once in each job
    assert starts[0][1] == "0" and 20 <= int(starts[1][1]) < STEPS, starts  # the follow-up went on from the file
    ev = [(e["event"], str(e.get("job_id"))) for e in events(run_dir)]
    assert ev == [("submitted", j1), ("started", j1), ("submitted", j2), ("followup", j1), ("started", j2),
                  ("completed", j2)], ev
    (fu,) = [e for e in events(run_dir) if e["event"] == "followup"]
    assert fu["chain_restarts"] == 1 and "step" not in fu, fu  # the command reports no step: unknown
    status = read_json(run_dir / "status.json")
    assert status["state"] == "completed", status
    st = subprocess.run([sys.executable, "-m", "foldhpc", "status", str(run_dir), "--json"], capture_output=True,
                        text=True, timeout=60)
    assert st.returncode == 0, st.stderr
    (row,) = json.loads(st.stdout)["runs"]
    assert row["state"] == "completed" and str(row["job_id"]) == j2 and row["chain"] == [j1, j2], row
    assert read_json(run_dir / "slurm" / "command.json")["command"] == cmd
