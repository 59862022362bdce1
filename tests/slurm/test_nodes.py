"""Bad nodes and crash loops on the real local two-node cluster (issue 23; docs/nodes.md).

* a bad node (the health-check fault hook ``FOLDHPC_FAIL_HEALTH_ON_NODE=n1``): the supervisor does
  not train on n1, the job hands the run over excluding n1 -- a follow-up job with ``--exclude``
  (``slurm.resume=chain``) or the same job requeued with ``ExcNodeList=n1`` (``slurm.resume=requeue``,
  set right after ``scontrol requeue``: slurmctld refuses it for a running job) -- and the run
  completes on n2, bit-exact with an uninterrupted run; ``foldhpc status`` names the node and why;
  the sbatch template's requeue (``python -m foldhpc.slurm.requeue``) excludes it the same way;
* a crash loop (a supervised command that fails at once every time, each time differently, so the
  "same failure twice" rule does not end it first): the breaker ends the job with exit 93, state
  ``crash_loop``, one job and no requeue or follow-up, in both resume modes;
* a dead node (issue 23 item 3, the node back): a two-node job loses n2 (its processes killed, the
  node DOWN and kept out); Slurm requeues the job, it waits for n2, and once n2 is back the run
  resumes from the newest durable checkpoint and ends bit-exact. Every node a test takes out is
  RESUMEd after it.

The first job lands on n1: with both nodes idle Slurm's node selection takes the first one (a
test asserts it rather than assume it).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TINY, run_foldhpc, set_args, tiny_overrides, wait_for
from foldhpc.checkpoint.manager import CheckpointManager
from foldhpc.records.history import read_history
from foldhpc.chaos.slurm import job_processes

from .helpers import cancel_all_jobs, job_restarts, run, sacct_rows, sbatch, scontrol_job, wait_sacct_row

log = logging.getLogger(__name__)

TEMPLATE = ROOT / "sbatch" / "train.sbatch"

STEPS = 30
BAD = "n1"
JOB = {"slurm.gpus": 1, "slurm.cpus_per_task": 1, "slurm.mem": "2G", "slurm.time": "10m",
       "slurm.signal_lead": "60s", "slurm.partition": "debug", "train.max_steps": STEPS, "run.log_every": 5}
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "PREEMPTED"}


@pytest.fixture
def jobs(slurm_cluster):
    started: list[str] = []
    yield started
    cancel_all_jobs(started)


@pytest.fixture(scope="module")
def reference_digest(tmp_path_factory) -> str:
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    p = run_foldhpc("train", "--config", str(TINY), *set_args(tiny_overrides(run_dir, **JOB)))
    assert p.returncode == 0, p.stderr[-3000:]
    return _digest(run_dir)


def _digest(run_dir: Path) -> str:
    e = CheckpointManager(run_dir / "checkpoints").entries()[-1]
    assert e.step == STEPS
    return e.digest


def _submit(run_dir: Path, *command: str, env: dict[str, str] | None = None, **extra: object) -> str:
    p = run_foldhpc("submit", "--config", str(TINY), *set_args(tiny_overrides(run_dir, **{**JOB, **extra})),
                    *(["--", *command] if command else []), env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout.split("submitted job ")[1].split()[0]


def _events(run_dir: Path) -> list[dict]:
    return read_history(run_dir)[0]


def _status(run_dir: Path) -> dict:
    p = run_foldhpc("status", str(run_dir), "--json")
    (r,) = json.loads(p.stdout)["runs"]
    return r


def _rows(job: str) -> list[tuple[str, str, str]]:
    """(State, ExitCode, NodeList) of each run of ``job`` itself (a requeued job has several)."""
    return [(r["State"].split()[0], r["ExitCode"], r["NodeList"]) for r in sacct_rows(job) if r["JobID"] == job]


def _assert_bad_node_named(run_dir: Path) -> None:
    r = _status(run_dir)
    assert r["state"] == "completed" and r["excluded_nodes"] == [BAD], r
    assert [(b["node"], b["check"]) for b in r["bad_nodes"]] == [(BAD, "fault_hook")], r
    text = run_foldhpc("status", str(run_dir)).stdout
    assert f"excluded: run: {BAD} (fault_hook: " in text, text


def test_a_bad_node_is_excluded_by_the_follow_up_and_the_run_completes_bit_exact(tmp_path, jobs, reference_digest):
    run_dir = tmp_path / "run"
    jobs.append(j1 := _submit(run_dir, env={"FOLDHPC_FAIL_HEALTH_ON_NODE": BAD}, **{"slurm.resume": "chain"}))
    j2 = wait_for(lambda: next((str(e["followup_job_id"]) for e in _events(run_dir) if e["event"] == "followup"),
                               None), "no follow-up job after the failed health check", timeout=120)
    jobs.append(j2)
    wait_sacct_row(j2, FINAL, timeout=180)
    assert _digest(run_dir) == reference_digest
    assert scontrol_job(j2)["ExcNodeList"] == BAD
    rows1, rows2 = _rows(j1), _rows(j2)
    assert [r[2] for r in rows1] == [BAD], rows1  # the first job did land on the bad node
    assert rows2 == [("COMPLETED", "0:0", "n2")], rows2
    follow = next(e for e in _events(run_dir) if e["event"] == "followup")
    assert follow["step"] == 0 and "excluding the bad node(s) n1 (fault_hook" in follow["reason"], follow
    # the run never trained on n1: its only spawn record is n2's
    kinds = [json.loads(ln) for ln in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["node"] for e in kinds if e["kind"] == "node_unhealthy"] == [BAD]
    _assert_bad_node_named(run_dir)


def test_a_bad_node_is_excluded_from_the_requeued_job_and_the_run_completes_bit_exact(tmp_path, jobs,
                                                                                      reference_digest):
    run_dir = tmp_path / "run"
    jobs.append(job := _submit(run_dir, env={"FOLDHPC_FAIL_HEALTH_ON_NODE": BAD}, **{"slurm.resume": "requeue"}))
    wait_for(lambda: _rows(job) and _rows(job)[-1][0] == "COMPLETED", "the requeued job did not complete",
             timeout=180, poll=1.0)
    wait_sacct_row(job, FINAL, timeout=60)
    assert _digest(run_dir) == reference_digest
    rows = _rows(job)
    assert [(s, n) for s, _, n in rows] == [("REQUEUED", BAD), ("COMPLETED", "n2")], rows
    assert job_restarts(job) == 1 and scontrol_job(job)["ExcNodeList"] == BAD
    ev = [(e["event"], e.get("why")) for e in _events(run_dir)]
    assert ev == [("submitted", None), ("started", None), ("requeued", "requeue"), ("started", None),
                  ("completed", None)], ev
    log = (run_dir / "slurm").glob(f"{job}_*_log.*")
    assert any(f"requeued job {job} excludes {BAD}" in p.read_text(errors="replace") for p in log)
    _assert_bad_node_named(run_dir)


def test_the_sbatch_template_in_requeue_mode_excludes_a_bad_node_too(tmp_path, jobs, reference_digest):
    """``sbatch/train.sbatch`` (``python -m foldhpc.slurm.requeue`` decides, in the batch shell's
    job): the same requeue with ``ExcNodeList``, the run completes on n2 bit-exact."""
    run_dir, out = tmp_path / "run", tmp_path / "slurm-%j.out"
    jobs.append(job := sbatch("--partition=debug", "--cpus-per-task=1", "--mem=2G", "--time=10", f"--output={out}",
                              f"--export=ALL,FOLDHPC_PYTHON={sys.executable},FOLDHPC_FAIL_HEALTH_ON_NODE={BAD}",
                              str(TEMPLATE), str(TINY),
                              *set_args(tiny_overrides(run_dir, **{**JOB, "slurm.resume": "requeue"}))))
    wait_for(lambda: _rows(job) and _rows(job)[-1][0] in FINAL and len(_rows(job)) > 1, "the requeued job did not "
             "end", timeout=180, poll=1.0)
    rows = _rows(job)
    assert [(s, n) for s, _, n in rows] == [("REQUEUED", BAD), ("COMPLETED", "n2")], rows
    assert _digest(run_dir) == reference_digest
    assert scontrol_job(job)["ExcNodeList"] == BAD
    assert f"requeued job {job} excludes {BAD}" in Path(str(out).replace("%j", job)).read_text()


# a different exit status each time: never "the same failure twice" (which ends a run as failed, exit 1)
_FAILING = ("import sys, pathlib; c = pathlib.Path({count!r}); n = len(c.read_text()) if c.exists() else 0\n"
            "c.write_text('x' * (n + 1)); sys.exit(4 + n)\n")


@pytest.mark.parametrize("mode", ["chain", "requeue"])
def test_a_crash_loop_ends_the_job_with_exit_93_and_is_never_requeued(tmp_path, jobs, mode):
    run_dir, count = tmp_path / "run", tmp_path / "count"
    jobs.append(job := _submit(run_dir, sys.executable, "-c", _FAILING.format(count=str(count)), **{
        "slurm.resume": mode, "fault.max_restarts": 6, "fault.crash_loop_restarts": 2,
        "fault.node_crash_limit": 0, "fault.restart_backoff": 0.05}))
    wait_sacct_row(job, FINAL, timeout=120)
    assert count.read_text() == "xxx"  # 2 restarts without a new checkpoint, then the third failure ends it
    assert _rows(job) == [("FAILED", "93:0", _rows(job)[0][2])], sacct_rows(job)
    time.sleep(3)  # a wrongful requeue or follow-up would be on its way by now
    assert job_restarts(job) == 0
    assert run(["squeue", "-h", "-o", "%i", "-j", job], check=False).split() == []
    ev = [e["event"] for e in _events(run_dir)]
    assert ev.count("submitted") == 1 and not {"requeued", "followup"} & set(ev), ev
    assert "gave_up" in ev, ev
    r = _status(run_dir)
    assert r["state"] == "crash_loop" and "crash loop" in r["reason"], r


# ------------------------------------------------------------------ a dead node (issue 23 item 3)
MN_STEPS = 120
MN = {"train.max_steps": MN_STEPS, "data.crop_size": 48, "model.d_pair": 32, "model.n_blocks": 2,
      "train.warmup_steps": 5, "train.batch_size": 2, "checkpoint.every_steps": 10, "run.log_every": 1}
MN_JOB = {"slurm.nodes": 2, "slurm.gpus": 1, "slurm.cpus_per_task": 1, "slurm.mem": "1500M", "slurm.time": "10m",
          "slurm.signal_lead": "60s", "slurm.partition": "debug"}
DEAD = "n2"


@pytest.fixture
def dead_node(slurm_cluster):
    """Whatever happens, the node is back in service after the test (``State=RESUME``)."""
    yield DEAD
    run(["scontrol", "update", f"NodeName={DEAD}", "State=RESUME"], check=False)


def _job_processes_on(job: str, node: str) -> list[int]:
    """The job's processes on ``node`` (the ranks' supervisors and trainers there, the batch shell
    too), as the chaos runner's node_down finds them."""
    shells, others = job_processes(job, node)
    return shells + others


def _lose_node(job: str, node: str) -> float:
    """``node`` dies under ``job``: the job's processes there SIGKILLed, the node set DOWN, then
    DRAIN so that it stays out (a DOWN node whose slurmd answers is back in service at once here:
    ReturnToService=2). Returns when (time.time())."""
    victims = _job_processes_on(job, node)
    assert victims, f"no process of job {job} on {node}"
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    t = time.time()
    run(["scontrol", "update", f"NodeName={node}", "State=DOWN", "Reason=foldhpc test: node lost"])
    run(["scontrol", "update", f"NodeName={node}", "State=DRAIN", "Reason=foldhpc test: node lost"])
    return t


def _wait_log(run_dir: Path, pattern: str, timeout: float = 120) -> None:
    wait_for(lambda: re.search(pattern, (run_dir / "train.log").read_text() if (run_dir / "train.log").exists()
                               else ""), pattern, timeout=timeout, poll=0.05)


def _resumed(run_dir: Path) -> tuple[float, int]:
    """(when, from which step) rank 0 resumed, from train.log (whole seconds: its clock)."""
    text = (run_dir / "train.log").read_text()
    m = re.search(r"(\S+ \S+) INFO \[pid \d+\] \[rank 0\] foldhpc.train.loop: resumed from \S+step_(\d+)\.ckpt", text)
    assert m, text[-3000:]
    return time.mktime(time.strptime(m.group(1).split(".")[0], "%Y-%m-%d %H:%M:%S")), int(m.group(2))


def test_a_node_lost_mid_job_the_run_comes_back_from_the_newest_checkpoint_when_it_returns(tmp_path, jobs, dead_node):
    """A two-node job loses n2: its processes there are SIGKILLed (the node died) and it is set
    DOWN, then DRAIN so that it stays out (a DOWN node whose slurmd answers is back in service at
    once here: ReturnToService=2). Slurm requeues the job (NODE_FAIL); it waits while n2 is out; once
    n2 is RESUMEd it runs again, resumes from the newest durable checkpoint and ends bit-exact with
    an uninterrupted two-rank run."""
    ref = tmp_path / "ref"
    p = run_foldhpc("train", "--config", str(TINY), *set_args(tiny_overrides(ref, **MN)), "--nproc", "2", timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    reference = CheckpointManager(ref / "checkpoints").entries()[-1]
    assert reference.step == MN_STEPS
    run_dir = tmp_path / "run"
    jobs.append(job := _submit(run_dir, **{**MN, **MN_JOB}))
    _wait_log(run_dir, r"step 35/")
    t_lost = _lose_node(job, dead_node)
    wait_for(lambda: scontrol_job(job).get("JobState") == "PENDING", "the job was not requeued by Slurm", timeout=60)
    time.sleep(12)  # past the BeginTime hold: with n2 out the job must keep waiting
    assert scontrol_job(job).get("JobState") == "PENDING", scontrol_job(job)
    assert _job_processes_on(job, dead_node) == []
    newest = CheckpointManager(run_dir / "checkpoints").entries()[-1].step
    run(["scontrol", "update", f"NodeName={dead_node}", "State=RESUME"])
    t_back = time.time()
    wait_sacct_row(job, FINAL, timeout=240)
    assert [s for s, _, _ in _rows(job)] == ["NODE_FAIL", "COMPLETED"], _rows(job)
    stop = next(e for e in _events(run_dir) if e["event"] == "stopped")  # rank 0's decision: Slurm requeues it
    assert stop["why"] == "node_fail" and "lost a node" in stop["reason"], stop
    final = CheckpointManager(run_dir / "checkpoints").entries()[-1]
    assert (final.step, final.digest) == (MN_STEPS, reference.digest)
    resumed_at, step = _resumed(run_dir)
    assert step == newest <= 36, (step, newest)
    # node lost -> training again, measured from the node's return (the job waited for it)
    log.warning("node lost -> resumed: %.0fs; node back -> resumed: %.0fs (whole seconds: train.log's clock)",
                resumed_at - t_lost, resumed_at - t_back)

