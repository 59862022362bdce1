"""``foldhpc status`` for job states the main status module does not produce: a job held after a
requeue (``scontrol requeuehold``) and an array job asked for by its parent id. Real jobs on the
local cluster, ~15 s."""

from __future__ import annotations

import json
import subprocess
import sys

from .helpers import cancel_all_jobs, run, sbatch, wait_for_state

STATUS = [sys.executable, "-c", "import sys; from foldhpc.monitor.report import main; sys.exit(main(sys.argv[1:]))"]


def status_json(*ids: str) -> tuple[int, dict]:
    p = subprocess.run([*STATUS, "--json", *ids], capture_output=True, text=True, timeout=60)
    assert "Traceback" not in p.stderr, p.stderr
    return p.returncode, json.loads(p.stdout)


def test_requeue_hold_is_shown_as_held_not_pending(slurm_cluster, tmp_path):
    job = sbatch("--mem=100M", f"--output={tmp_path / 'out'}", "--wrap", "sleep 120")
    try:
        wait_for_state(job, "RUNNING", timeout=60)
        run(["scontrol", "requeuehold", job])
        wait_for_state(job, "PENDING", timeout=30)
        code, doc = status_json(job)
        (r,) = doc["runs"]
        assert r["state"] == "held", r
        assert "pending after" not in (r["reason"] or "") and f"scontrol release {job}" in r["reason"], r
        assert code == 3, (code, r)  # not going on by itself
    finally:
        cancel_all_jobs([job])


def test_array_parent_id_is_summed_up_from_its_tasks(slurm_cluster, tmp_path):
    parent = sbatch("--mem=100M", "--array=1-2", f"--output={tmp_path / 'out_%a'}", "--wrap",
                    'if [ "$SLURM_ARRAY_TASK_ID" = 2 ]; then exit 3; fi; sleep 120')
    try:
        wait_for_state(f"{parent}_1", "RUNNING", timeout=60)
        wait_for_state(f"{parent}_2", "FAILED", timeout=60)
        code, doc = status_json(parent)
        (r,) = doc["runs"]
        assert r["state"] == "failed", r  # a failed task needs attention even while another runs
        assert r["slurm"]["tasks"] == {f"{parent}_1": "running", f"{parent}_2": "failed"}, (r["slurm"], r["notes"])
        assert "1 running" in r["reason"] and "1 failed" in r["reason"], r
        assert code == 1, (code, r)
    finally:
        cancel_all_jobs([parent])
