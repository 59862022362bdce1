"""Sweeps without Slurm: the grid, task names, what is refused, `foldhpc status` on a sweep directory,
and the sbatch array's per-task run directory. The job array itself: tests/slurm/test_sweep.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, TINY, run_foldhpc, tiny_overrides
from foldhpc.config import ConfigError, load_config
from foldhpc.slurm.sweep import MAX_NAME, grid, parse_axes, plan


def names(*specs: str) -> list[str]:
    return [t.name for t in grid(parse_axes(list(specs)))]


def test_cartesian_product_first_axis_slowest_readable_names():
    tasks = grid(parse_axes(["train.lr=1e-3,5e-4", "train.seed=1,2"]))
    assert [t.name for t in tasks] == ["lr=1e-3,seed=1", "lr=1e-3,seed=2", "lr=5e-4,seed=1", "lr=5e-4,seed=2"]
    assert tasks[2].overrides == ["train.lr=5e-4", "train.seed=1"] and [t.index for t in tasks] == [0, 1, 2, 3]


def test_names_are_filesystem_safe_and_unique():
    assert names("data.path=/data/a b,x/../y") == ["path=_data_a_b", "path=x_.._y"]
    assert names("train.seed=1", "data.split_seed=2") == ["seed=1,split_seed=2"]
    assert names("model.dropout=0.1", "train.seed=1") == ["dropout=0.1,seed=1"]
    assert names("data.path=a/b,a_b") == ["path=a_b", "path=a_b-1"]  # equal once made safe
    long = names("data.path=" + "x" * 300)[0]
    assert len(long) == MAX_NAME and "/" not in long


@pytest.mark.parametrize("spec, words", [
    ("run.dir=a,b", "run directory"), ("slurm.gpus=1,2", "one set of resources"), ("train.lr", "expected"),
    ("train.lr=1,,2", "expected"), ("train.lr=1,1", "twice"), ("lr=1,2", "expected"),
])
def test_bad_sweeps_are_refused(spec, words):
    with pytest.raises(ConfigError, match=words):
        parse_axes([spec])


def test_an_axis_given_twice_is_refused():
    with pytest.raises(ConfigError, match="given twice"):
        parse_axes(["train.lr=1", "train.lr=2"])


def test_plan_validates_every_task_and_gives_each_its_own_dirs(tmp_path):
    root, planned = plan(str(TINY), [f"run.dir={tmp_path}", f"checkpoint.dir={tmp_path}/ck"],
                         ["train.lr=1e-3,5e-4", "train.seed=1,2"])
    assert root.run_dir == tmp_path
    dirs = [str(c.run_dir) for _, c in planned]
    assert dirs == [str(tmp_path / t.name) for t, _ in planned] and len(set(dirs)) == 4
    assert [str(c.checkpoint_dir) for _, c in planned] == [str(tmp_path / "ck" / t.name) for t, _ in planned]
    assert [(c.train.lr, c.train.seed) for _, c in planned] == [(1e-3, 1), (1e-3, 2), (5e-4, 1), (5e-4, 2)]
    with pytest.raises(ConfigError, match="sweep task lr=-1: train.lr"):
        plan(str(TINY), [], ["train.lr=-1,2"])


@pytest.mark.parametrize("args, words", [
    (["--sweep", "slurm.gpus=1,2"], "one set of resources"),
    (["--sweep", "train.seed=1,2", "--local"], "needs Slurm"),
    (["--max-parallel", "2"], "needs --sweep"),
    (["--sweep", "train.max_step=1,2"], "unknown key"),
])
def test_submit_sweep_user_errors(tmp_path, args, words):
    p = run_foldhpc("submit", "--config", str(TINY), "--set", f"run.dir={tmp_path / 's'}", *args)
    assert p.returncode == 2 and words in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_a_sweep_never_reuses_a_single_run_or_another_sweep(tmp_path):
    run = tmp_path / "single"
    run.mkdir()
    (run / "status.json").write_text("{}")
    p = run_foldhpc("submit", "--config", str(TINY), "--set", f"run.dir={run}", "--sweep", "train.seed=1,2")
    assert p.returncode == 2 and "single run's directory" in p.stderr, p.stderr
    other = tmp_path / "other"
    other.mkdir()
    (other / "sweep.json").write_text(json.dumps({"tasks": [{"name": "lr=1"}, {"name": "lr=2"}]}))
    p = run_foldhpc("submit", "--config", str(TINY), "--set", f"run.dir={other}", "--sweep", "train.seed=1,2")
    assert p.returncode == 2 and "holds another sweep" in p.stderr, p.stderr


def test_status_of_a_sweep_directory(tmp_path):
    """One row per task (state, step, loss, best validation), a summary line, --json."""
    sweep = tmp_path / "sweep"
    tasks = grid(parse_axes(["train.seed=1,2"]))
    sweep.mkdir()
    (sweep / "sweep.json").write_text(json.dumps({"array_job_id": None, "tasks": [
        {"index": t.index, "name": t.name, "overrides": t.overrides} for t in tasks]}))
    from foldhpc.train.loop import Trainer

    # the completed task's run, trained in-process (what is tested is `foldhpc status` of the sweep)
    assert Trainer(load_config(TINY, tiny_overrides(sweep / "seed=1", **{"train.seed": 1, "train.max_steps": 4}))
                   ).run().state == "completed"
    (sweep / "seed=2").mkdir()
    (sweep / "seed=2" / "status.json").write_text(json.dumps(
        {"state": "failed", "step": 3, "max_steps": 4, "error": "boom", "val": {"distogram_loss": 9.5}, "val_step": 2}))
    p = run_foldhpc("status", str(sweep), "--json")
    assert p.returncode == 1, p.stderr  # a task failed
    doc = json.loads(p.stdout)
    assert [r["name"] for r in doc["runs"]] == ["seed=1", "seed=2"]
    assert [r["state"] for r in doc["runs"]] == ["completed", "failed"]
    best = doc["runs"][0]["best_val"]
    assert best["step"] == 4 and best["source"] == "tensorboard" and best["value"] < 9.5
    assert doc["runs"][1]["best_val"]["value"] == 9.5  # no curves: status.json's latest validation
    (s,) = doc["sweeps"]
    assert s["tasks_total"] == 2 and s["states"] == {"completed": 1, "failed": 1} and s["best"]["task"] == "seed=1"
    p = run_foldhpc("status", str(sweep))
    lines = p.stdout.splitlines()
    assert "BEST VAL" in lines[0], lines
    assert lines[1].startswith("seed=1") and f"{best['value']:.4f}@4" in lines[1]
    assert any(ln.startswith(f"sweep {sweep}: array job ?, 2 tasks: 1 completed, 1 failed; best val loss")
               for ln in lines), lines
    # the runs root lists the sweep's tasks too
    p = run_foldhpc("status", "--set", f"run.dir={tmp_path / 'x'}", "--json")
    assert [r["name"] for r in json.loads(p.stdout)["runs"]] == ["seed=1", "seed=2"]


def test_sbatch_array_task_run_dir():
    env = dict(os.environ, SLURM_ARRAY_TASK_ID="3")
    p = subprocess.run([sys.executable, "-m", "foldhpc.slurm.sweep", "--array-task-dir", "--config", str(TINY),
                        "--set", "run.dir=/scratch/r", "--no-resume"], capture_output=True, text=True, env=env,
                       cwd=ROOT)
    assert p.returncode == 0 and p.stdout.strip() == "/scratch/r/task-3", p.stderr
    env["SLURM_ARRAY_TASK_ID"] = ""
    p = subprocess.run([sys.executable, "-m", "foldhpc.slurm.sweep", "--array-task-dir"], capture_output=True,
                       text=True, env=env, cwd=ROOT)
    assert p.returncode == 2 and "not a task number" in p.stderr


def test_pending_array_tasks_are_known_by_their_own_ids():
    """slurmctld lists an array's not-yet-started tasks as one record (ArrayTaskId=0-2%2); `foldhpc
    status` of a sweep asks for 123_1: it must be pending, not unknown."""
    from foldhpc.cluster.sacct import parse_scontrol

    jobs = parse_scontrol("JobId=123 ArrayJobId=123 ArrayTaskId=1-2%2 JobState=PENDING Reason=JobArrayTaskLimit\n"
                          "JobId=124 ArrayJobId=123 ArrayTaskId=0 JobState=RUNNING\n"
                          "JobId=130 ArrayJobId=130 ArrayTaskId=2,5-9:2 JobState=PENDING\n")
    assert sorted(jobs) == ["123_0", "123_1", "123_2", "130_2", "130_5", "130_7", "130_9"]
    assert jobs["123_2"]["JobState"] == "PENDING" and jobs["123_0"]["JobState"] == "RUNNING"
