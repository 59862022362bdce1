"""A model nobody here wrote, on the real local Slurm cluster: fair-esm's ESM-2 as a ``[task]``
(examples/esm_contacts.py) submitted with ``foldhpc submit``, signalled once (``scancel
--signal=USR1``, Slurm's preemption/time-limit signal), continued by its follow-up job
(``slurm.resume = "chain"``) from the checkpoint saved on the signal, and ending with the bits of an
uninterrupted local run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import ROOT, assert_same_state, latest_checkpoint, run_foldhpc, set_args, wait_for
from foldhpc.records.envvars import STEP_DELAY
from .helpers import cancel_all_jobs, run, sacct_rows, wait_sacct_row
from .test_followup import events, followup_of

CONFIG = ROOT / "examples" / "esm_contacts.toml"
STEPS = 300  # ~30 ms a step in the job (FOLDHPC_DEBUG_STEP_DELAY_S): ~10 s of training
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "PREEMPTED", "TIMEOUT"}
JOB = {"slurm.gpus": 0, "slurm.cpus_per_task": 1, "slurm.mem": "2G", "slurm.time": "15m",
       "slurm.signal_lead": "60s", "slurm.partition": "debug", "slurm.resume": "chain"}


def _sets(run_dir: Path) -> list[str]:
    items = {"run.dir": run_dir, "train.max_steps": STEPS, "checkpoint.every_steps": 50, "run.log_every": 1, **JOB}
    return set_args([f"{k}={v}" for k, v in items.items()])


def _train_events(run_dir: Path, kind: str) -> list[dict]:
    path = run_dir / "events.jsonl"
    out = []
    for line in (path.read_text().splitlines() if path.is_file() else []):
        try:
            e = json.loads(line)
        except ValueError:  # a record being written
            continue
        if e["kind"] == kind:
            out.append(e)
    return out


@pytest.fixture
def jobs(slurm_cluster):
    started: list[str] = []
    yield started
    cancel_all_jobs(started)


@pytest.mark.timeout(300)
def test_esm_task_signalled_continues_in_its_followup_bit_exact(tmp_path, jobs):
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    # a slower step (a sleep in each; the state is the same) so that the signal lands early in the run
    p = run_foldhpc("submit", "--config", str(CONFIG), *_sets(run_dir), env={STEP_DELAY: "0.02"})
    assert p.returncode == 0, p.stderr
    j1 = re.search(r"submitted job (\d+)", p.stdout).group(1)
    jobs.append(j1)
    wait_for(lambda: any(e["step"] >= 20 for e in _train_events(run_dir, "progress")), "the job at step 20",
             timeout=120, poll=0.02)
    run(["scancel", "--signal=USR1", j1])
    j2 = wait_for(lambda: followup_of(run_dir, j1), "no follow-up job was submitted", timeout=60)
    jobs.append(j2)
    # the uninterrupted run, here, while the follow-up job waits for its node and trains
    r = run_foldhpc("train", "--no-supervise", "--config", str(CONFIG), *_sets(ref_dir), timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert wait_sacct_row(j2, FINAL, timeout=180)["State"] == "COMPLETED", sacct_rows(j2)
    (sig,) = _train_events(run_dir, "signal")
    saved = sig["step"]
    assert sig["signal"] == "SIGUSR1" and 20 <= saved <= STEPS // 2, sig  # the follow-up trained most of the run
    (resumed,) = _train_events(run_dir, "resumed")
    assert resumed["step"] == saved and resumed["path"].endswith(f"step_{saved:08d}.ckpt")  # 0 steps lost
    ev = [(e["event"], str(e.get("job_id"))) for e in events(run_dir)]
    assert ev == [("submitted", j1), ("started", j1), ("submitted", j2), ("followup", j1), ("started", j2),
                  ("completed", j2)], ev
    got, want = latest_checkpoint(run_dir), latest_checkpoint(ref_dir)
    assert got.entry.step == want.entry.step == STEPS
    assert got.entry.digest == want.entry.digest
    for key in ("model", "optimizer"):
        assert_same_state(got.state[key], want.state[key], key)
    assert_same_state(got.state["foldhpc"]["rng"]["torch"], want.state["foldhpc"]["rng"]["torch"], "rng/torch")
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "completed" and status["metrics"] == \
        json.loads((ref_dir / "status.json").read_text())["metrics"]
