"""The submitit job is an executor of the payload it is given: foldhpc.slurm knows no trainer.

``foldhpc submit`` passes ``foldhpc.cli.train_in_job``; submitit pickles the job with it (and
re-submits it from ``checkpoint()``), so the job, its payload and its follow-up must pickle.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import cloudpickle
import pytest
import submitit

from conftest import ROOT, TINY
from test_architecture import import_graph


def test_slurm_imports_no_trainer_and_no_supervisor():
    bad = sorted(f"{a} -> {b}" for a, bs in import_graph().items() if a.startswith("foldhpc.slurm")
                 for b in bs if b.startswith(("foldhpc.train", "foldhpc.resilience")))
    assert bad == []


def test_slurm_modules_import_one_way():
    """followup < requeue < job < submit < sweep: each imports only those before it."""
    order = ["followup", "requeue", "job", "submit", "sweep"]
    edges = import_graph()
    up = sorted(f"{a} -> {b}" for i, a in enumerate(order) for b in edges.get(f"foldhpc.slurm.{a}", ())
                if b.startswith("foldhpc.slurm.") and order.index(b.rsplit(".", 1)[1]) > i)
    assert up == []


def _cfg(tmp_path):
    from foldhpc.config import load_config

    return load_config(str(TINY), [f"run.dir={tmp_path / 'run'}"])


def test_job_pickles_with_its_payload_and_checkpoint_keeps_it(tmp_path):
    from foldhpc.cli import train_in_job
    from foldhpc.slurm.job import SlurmJob
    from foldhpc.slurm.submit import SubmititFollowUp, job_for

    job = job_for(_cfg(tmp_path), train_in_job)
    assert isinstance(job, submitit.helpers.Checkpointable)
    data = cloudpickle.dumps(job)  # as submitit writes the job's pickle
    assert b"foldhpc.cli" in data and b"train_in_job" in data  # the payload by reference, not its code
    again = pickle.loads(data)
    assert isinstance(again, SlurmJob) and again.payload is train_in_job
    assert isinstance(again.followup, SubmititFollowUp) and again.followup.payload is train_in_job
    assert again.cfg.run_dir == job.cfg.run_dir
    delayed = again.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    fresh = delayed.function
    assert isinstance(fresh, SlurmJob) and fresh is not again
    assert (fresh.payload, fresh.cfg) == (train_in_job, again.cfg) and fresh.followup is again.followup
    pickle.loads(cloudpickle.dumps(delayed))


_RUN = """
import json, sys
from foldhpc.config import load_config
from foldhpc.slurm.job import JobOutcome, SlurmJob

def completed(cfg, env, job_id):
    return JobOutcome("completed", 7, metrics={"loss": 1.5})

def checkpointed(cfg, env, job_id):
    return JobOutcome("checkpointed", 3, "SIGUSR1")

def fails(cfg, env, job_id):
    raise ValueError("payload failed")

cfg = load_config(sys.argv[3], ["run.dir=" + sys.argv[2]])
print("RESULT", json.dumps(SlurmJob(cfg, globals()[sys.argv[1]])()))
"""


@pytest.mark.parametrize("payload,rc", [("completed", 0), ("checkpointed", 75), ("fails", 1)])
def test_job_runs_its_payload_and_tells_the_story(tmp_path, payload, rc):
    """Outside Slurm (no job id): started, then completed / stopped (not_slurm, exit 75) / failed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_", "RANK", "WORLD_SIZE"))}
    run = tmp_path / "run"
    p = subprocess.run([sys.executable, "-c", _RUN, payload, str(run), str(TINY)],
                       capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert p.returncode == rc, p.stderr
    events = [json.loads(ln) for ln in (run / "jobs.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events][0] == "started" and events[0]["job_id"] is None
    last = events[-1]
    if payload == "completed":
        assert "RESULT " + json.dumps({"step": 7, "metrics": {"loss": 1.5}}) in p.stdout
        assert (last["event"], last["step"]) == ("completed", 7)
    elif payload == "checkpointed":
        assert (last["event"], last["why"], last["step"], last["signal"]) == ("stopped", "not_slurm", 3, "SIGUSR1")
    else:
        assert (last["event"], last["error"]) == ("failed", "ValueError: payload failed")
        assert "rank" not in last
