"""``foldhpc status JOB_ID...`` against real jobs on the local Slurm cluster (tests/slurm/cluster.sh).

One module-scoped set of plain ``sbatch --wrap`` jobs, started together so the file stays short
(~90 s, dominated by the time-limit kill, which lands 8-26 s after a 1-minute limit):

* timeout   ``-p high --time=1``, sleeps: started first, checked last;
* completed / failed (exit 3) / cancelled (scancel while running) in ``debug``;
* preempted -> requeued -> completed: a ``--requeue`` job in ``debug`` that finishes on its second
  run, pushed out by a ``high`` job needing every CPU the timeout job leaves free. The timeout job,
  the victim and the preemptor are all pinned to the first node (``--nodelist``): the cluster has
  two, and an unpinned preemptor would simply start on the idle one.

Each is checked in both the table and the ``--json`` output, state and restart count, plus the exit
status of the command. The status command runs in a subprocess through ``foldhpc.monitor.report.main``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from .helpers import cancel_all_jobs, run, sbatch, wait_for_state, wait_sacct_row

STATUS = [sys.executable, "-c", "import sys; from foldhpc.monitor.report import main; sys.exit(main(sys.argv[1:]))"]
# second run of the job (SLURM_RESTART_COUNT=1) ends after a few seconds, the first one waits to be preempted
REQUEUE_SCRIPT = 'if [ "${SLURM_RESTART_COUNT:-0}" -ge 1 ]; then sleep 3; exit 0; fi; sleep 300'


def status(*ids: str) -> tuple[int, dict, str]:
    """(exit status, --json report, table) of ``foldhpc status IDS``.

    Two processes, so a job may change state in between: retried until both say the same.
    """
    for _ in range(5):
        pj = subprocess.run([*STATUS, "--json", *ids], capture_output=True, text=True, timeout=60)
        pt = subprocess.run([*STATUS, *ids], capture_output=True, text=True, timeout=60)
        assert "Traceback" not in pj.stderr + pt.stderr, pj.stderr + pt.stderr
        report = json.loads(pj.stdout)
        table_rows = {cols[1]: cols[2:4] for cols in (ln.split() for ln in pt.stdout.splitlines()) if len(cols) > 3}
        json_rows = {r["job_id"]: [r["state"], "?" if r["restarts"] is None else str(r["restarts"])]
                     for r in report["runs"]}
        if pj.returncode == pt.returncode and all(table_rows.get(j) == v for j, v in json_rows.items()):
            return pj.returncode, report, pt.stdout
    raise AssertionError(f"table and JSON disagree 5 times:\n{pt.stdout}\n{pj.stdout}")


def row_of(report: dict, table: str, job_id: str) -> tuple[dict, list[str]]:
    """The job's JSON entry and its table row (RUN JOB STATE RESTARTS ... split on whitespace)."""
    entries = [r for r in report["runs"] if r["job_id"] == job_id]
    assert len(entries) == 1, report
    lines = [ln.split() for ln in table.splitlines() if ln.split()[1:2] == [job_id]]
    assert len(lines) == 1, table
    return entries[0], lines[0]


def assert_status(job_id: str, state: str, restarts: int, rc: int) -> dict:
    code, report, table = status(job_id)
    entry, cols = row_of(report, table, job_id)
    assert (entry["state"], entry["restarts"], entry["source"]) == (state, restarts, "sacct"), (entry, table)
    assert cols[2:4] == [state, str(restarts)], table
    assert code == rc == report["exit_status"], (code, table)
    return entry


@pytest.fixture(scope="module")
def jobs(slurm_cluster, tmp_path_factory):
    """Submit every job at once (the time-limit one first); cancel all of them at the end."""
    out = tmp_path_factory.mktemp("status_jobs")
    started: dict[str, str] = {}

    def submit(key: str, *args: str) -> None:
        started[key] = sbatch("-J", f"st_{key}", "-o", str(out / f"{key}.out"), *args)

    try:
        node = f"--nodelist={slurm_cluster.nodes[0]}"  # timeout, low and the preemptor share it
        submit("timeout", "-p", slurm_cluster.high_partition, node, "--time=1", "--wrap", "sleep 300")
        submit("completed", "--wrap", "true")
        submit("failed", "--wrap", "echo failing; exit 3")
        submit("cancelled", "--wrap", "sleep 300")
        submit("low", "-p", slurm_cluster.default_partition, node, "--requeue", "--wrap", REQUEUE_SCRIPT)
        yield started
    finally:
        cancel_all_jobs(list(started.values()))


def test_completed(jobs):
    wait_sacct_row(jobs["completed"], "COMPLETED", timeout=60)
    entry = assert_status(jobs["completed"], "completed", 0, rc=0)
    assert entry["reason"] is None


def test_failed_shows_exit_code(jobs):
    wait_sacct_row(jobs["failed"], "FAILED", timeout=60)
    entry = assert_status(jobs["failed"], "failed", 0, rc=1)
    assert entry["exit_code"] == "3:0" and "exit 3" in entry["reason"], entry


def test_cancelled(jobs):
    wait_for_state(jobs["cancelled"], "RUNNING", timeout=30)
    run(["scancel", jobs["cancelled"]])
    wait_sacct_row(jobs["cancelled"], "CANCELLED", timeout=30)
    entry = assert_status(jobs["cancelled"], "cancelled", 0, rc=3)  # stopped, not a success
    assert entry["slurm_state"] == f"CANCELLED by {os.getuid()}", entry
    assert entry["reason"] == f"cancelled by uid {os.getuid()}", entry


def test_preempted_requeued_completed(slurm_cluster, jobs, tmp_path):
    low = jobs["low"]
    wait_for_state(low, "RUNNING", timeout=30)
    wait_for_state(jobs["timeout"], "RUNNING", timeout=30)
    # every CPU of their node but the timeout job's: the running debug job has to go
    # (GraceTime=20 s, then requeue)
    jobs["preemptor"] = sbatch("-J", "st_preemptor", "-p", slurm_cluster.high_partition,
                               f"--nodelist={slurm_cluster.nodes[0]}", "-c", str(slurm_cluster.cpus - 1),
                               "-o", str(tmp_path / "high.out"), "--wrap", "sleep 1")
    seen: list[tuple[str, int | None]] = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        code, report, table = status(low)
        entry, cols = row_of(report, table, low)
        assert cols[2] == entry["state"], table
        seen.append((entry["state"], entry["restarts"]))
        if entry["state"] == "requeued":
            assert entry["restarts"] == 1 and code == 0, (entry, table)
            assert entry["reason"].startswith("pending after"), entry  # "preemption" once sacct has the row
            if slurm_cluster.profile != "fast":
                return  # Slurm's default cred_expire keeps it pending ~150 s: the requeue is what counts here
        if entry["state"] == "completed":
            break
        time.sleep(0.5)
    assert ("requeued", 1) in seen, f"never saw the job pending after its requeue: {seen}"
    wait_sacct_row(low, "COMPLETED", timeout=30)
    entry = assert_status(low, "completed", 1, rc=0)
    assert [r["state"] for r in entry["slurm"]["runs"]] == ["preempted", "completed"], entry


def test_timeout_then_all_together(jobs):
    wait_sacct_row(jobs["timeout"], "TIMEOUT", timeout=150)
    entry = assert_status(jobs["timeout"], "timeout", 0, rc=1)
    assert entry["reason"].startswith("time limit reached"), entry
    code, report, table = status(*(jobs[k] for k in ("completed", "failed", "cancelled", "timeout")), "999999999")
    assert code == 2, table  # the unknown job id wins: the query itself was wrong
    states = {r["job_id"]: r["state"] for r in report["runs"]}
    assert states == {jobs["completed"]: "completed", jobs["failed"]: "failed",
                      jobs["cancelled"]: "cancelled", jobs["timeout"]: "timeout", "999999999": "unknown"}, table
