"""Two-node training on the real local Slurm cluster: two slurmd (n1, n2) on this host, one rank
per node (1 fake GPU each), gloo on CPU, deterministic tiny config.

* a submitit job (``slurm.nodes = 2``) signalled with ``scancel --signal=USR1`` (every rank gets
  it) saves, requeues itself and finishes bit for bit like a local ``foldhpc train --nproc 2``
  (same world size: the Slurm ranks are the local ranks), its two ranks on n1 and n2;
* ``sbatch/train_multinode.sbatch`` with USR1 sent to ONE rank only (``kill -USR1`` of rank 1):
  every rank stops at the same step, requeued, bit-exact;
* a real partition preemption (a ``high`` job that needs both nodes) of the template job:
  requeued once (no duplicate run), finishes bit-exact;
* rank 1 SIGKILLed with ``fault.max_restarts = 0``: the job is FAILED in sacct within a bound,
  status.json and ``foldhpc status`` name rank 1 and its node, and no rank process is left;
* rank 1 SIGKILLed with the default in-job restarts: both ranks' supervisors restart their
  trainers on their nodes, the job completes without a requeue, bit-exact;
* ``scancel`` of a running two-node job: CANCELLED, stays cancelled, no process left.

Every job and process a test starts is ended by the test (the ``jobs`` fixture cancels its jobs).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TINY, read_json, run_foldhpc, set_args, tiny_overrides, wait_for
from foldhpc.checkpoint.manager import CheckpointManager
from foldhpc.records.fsio import pid_alive
from foldhpc.records.history import read_history
from .helpers import cancel_all_jobs, job_restarts, run, sacct_rows, sbatch, wait_sacct_row

NODES = ("n1", "n2")
TEMPLATE = ROOT / "sbatch" / "train_multinode.sbatch"
STEPS = 40
# slow enough per step (~0.1 s with one sample per rank on this 2-core host) that a signal lands mid-run
SLOW = {"train.max_steps": STEPS, "data.crop_size": 48, "model.d_pair": 32, "model.n_blocks": 2,
        "train.warmup_steps": 5, "train.batch_size": 2}
JOB = {"slurm.nodes": 2, "slurm.gpus": 1, "slurm.cpus_per_task": 1, "slurm.mem": "1500M", "slurm.time": "15m",
       "slurm.signal_lead": "60s", "slurm.partition": "debug", "slurm.resume": "requeue"}
FINAL = {"COMPLETED", "FAILED", "CANCELLED"}


def overrides(run_dir: Path, **extra: object) -> list[str]:
    return tiny_overrides(run_dir, **{**SLOW, **JOB, **extra})


@pytest.fixture(scope="module")
def two_nodes(slurm_cluster) -> dict[str, int]:
    """CPUs of n1 and n2; fails (FOLDHPC_REQUIRE_SLURM=1) or skips if the cluster has not got them."""
    out = run(["sinfo", "-N", "-h", "-o", "%N %c"], check=False)
    cpus = {name: int(c.rstrip("+")) for name, c in (ln.split() for ln in out.splitlines() if ln.strip())}
    if not set(NODES) <= set(cpus):
        msg = f"the local cluster has nodes {sorted(cpus)}, not the two-node layout {NODES} (tests/slurm/cluster.sh)"
        if os.environ.get("FOLDHPC_REQUIRE_SLURM") == "1":
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    return {n: cpus[n] for n in NODES}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
    """Digest of an uninterrupted local 2-rank run (``foldhpc train --nproc 2``) at STEPS."""
    run_dir = tmp_path_factory.mktemp("mnref") / "run"
    p = run_foldhpc("train", "--config", str(TINY), *set_args(overrides(run_dir)), "--nproc", "2", timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return final_digest(run_dir)


@pytest.fixture
def jobs(two_nodes):
    started: list[str] = []
    yield started
    cancel_all_jobs(started)


# ------------------------------------------------------------------ helpers
def final_digest(run_dir: Path) -> str:
    loaded = CheckpointManager(run_dir / "checkpoints").load_latest()
    assert loaded is not None and loaded.entry.step == STEPS, loaded and loaded.entry
    return loaded.entry.digest


def text(path: Path) -> str:
    return path.read_text() if path.exists() else ""



def wait_for_step(run_dir: Path, step: int, timeout: float = 180) -> None:
    wait_for(lambda: re.search(rf"step {step}/", text(run_dir / "train.log")), f"step {step} not reached in "
             f"{run_dir}/train.log:\n{text(run_dir / 'train.log')[-3000:]}", timeout=timeout, poll=0.05)


def rank_record(run_dir: Path, rank: int, job: str) -> dict:
    """The running record of ``rank`` written by this job (ranks/rank-N.json)."""
    path = run_dir / "ranks" / f"rank-{rank}.json"

    def current():
        try:
            rec = read_json(path)
        except (OSError, ValueError):
            return None
        return rec if rec.get("slurm_job_id") == job and rec.get("state") == "running" else None

    return wait_for(current, f"no running record of rank {rank} of job {job}", timeout=60, poll=0.05)


def submit(run_dir: Path, **extra: object) -> str:
    p = run_foldhpc("submit", "--config", str(TINY), *set_args(overrides(run_dir, **extra)))
    assert p.returncode == 0, p.stderr
    m = re.search(r"submitted job (\d+)", p.stdout)
    assert m, p.stdout
    return m.group(1)


def template_job(tmp_path: Path, run_dir: Path, *args: str, env: str = "", **extra: object) -> tuple[str, Path]:
    """sbatch the multi-node template (its #SBATCH defaults: 2 nodes x 1 task x 1 GPU); (job id, output)."""
    out = tmp_path / "slurm-%j.out"
    job = sbatch("--partition=debug", "--cpus-per-task=1", "--mem=1500M", "--time=15", f"--output={out}",
                 f"--export=ALL,FOLDHPC_PYTHON={sys.executable}{env}", str(TEMPLATE), str(TINY),
                 *set_args(overrides(run_dir, **extra)), *args)
    return job, Path(str(out).replace("%j", job))


def job_rows(job: str) -> list[str]:
    return [r["State"].split()[0] for r in sacct_rows(job) if r["JobID"] == job]


def started_runs(run_dir: Path) -> list[int]:
    """restart_count of each start of the job recorded in jobs.jsonl (one per start, whatever the ranks)."""
    return sorted({e["restart_count"] for e in read_history(run_dir)[0] if e["event"] == "started"})


def processes_of(run_dir: Path) -> list[str]:
    """Processes on this host whose command line names the run directory (ranks, srun, batch shells)."""
    needle = str(run_dir).encode()
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in cmd and state != "Z":
            words = cmd.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{d.name}: {words[:200]}")
    return found


def assert_no_process_left(run_dir: Path, pids: list[int], timeout: float = 30) -> float:
    """Every rank pid gone and nothing running for this run dir; returns how long that took."""
    t0 = time.monotonic()
    wait_for(lambda: not any(pid_alive(p) for p in pids) and not processes_of(run_dir),
             f"processes left: pids {[p for p in pids if pid_alive(p)]}, {processes_of(run_dir)}", timeout=timeout,
             poll=0.2)
    return time.monotonic() - t0


def assert_ranks_on_both_nodes(run_dir: Path, job: str) -> None:
    recs = [read_json(run_dir / "ranks" / f"rank-{r}.json") for r in (0, 1)]
    assert sorted(r["node"] for r in recs) == list(NODES), recs
    assert all(r["slurm_job_id"] == job and r["world_size"] == 2 for r in recs), recs
    st = read_json(run_dir / "status.json")
    assert st["world_size"] == 2 and st["nodes"] == list(NODES), st
    assert sorted(r["node"] for r in st["ranks"]) == list(NODES), st["ranks"]


def stop_steps(log: str) -> set[int]:
    """Steps at which the ranks said they stop on a signal (rank 0 logs at INFO+, the others WARNING+)."""
    return {int(s) for s in re.findall(r"saving a checkpoint at step (\d+)", log)}


# ------------------------------------------------------------------ tests
def test_submitit_two_nodes_usr1_requeues_and_finishes_bit_exact(tmp_path, jobs, reference):
    run_dir = tmp_path / "run"
    jobs.append(job := submit(run_dir))
    wait_for_step(run_dir, 10)
    run(["scancel", "--signal=USR1", job])  # every step: both ranks get it
    wait_sacct_row(job, FINAL, timeout=240)
    assert job_rows(job) == ["REQUEUED", "COMPLETED"], sacct_rows(job)
    assert job_restarts(job) == 1
    log = text(run_dir / "train.log")
    (saved,) = stop_steps(log)
    assert 10 <= saved < STEPS
    assert f"step_{saved:08d}.ckpt at step {saved} (restart #1" in log, log[-3000:]
    assert final_digest(run_dir) == reference  # Slurm's ranks on two nodes == two local ranks, bit for bit
    assert_ranks_on_both_nodes(run_dir, job)
    events = [(e["event"], e.get("restart_count")) for e in read_history(run_dir)[0]]
    assert [e for e, _ in events] == ["submitted", "started", "requeued", "started", "completed"], events
    p = run_foldhpc("status", str(run_dir), "--json")
    (r,) = json.loads(p.stdout)["runs"]
    assert (r["state"], r["restarts"], r["world_size"], r["nodes"]) == ("completed", 1, 2, list(NODES)), r
    assert p.returncode == 0
    table = run_foldhpc("status", str(run_dir)).stdout
    assert "2 on n1,n2" in table, table


def test_template_signal_to_one_rank_stops_all_at_one_step_and_chains(tmp_path, jobs, reference):
    """slurm.resume=chain (the default) in the multi-node template: the follow-up job gets the same
    two nodes' worth of tasks (read from scontrol) and finishes bit-exact."""
    run_dir = tmp_path / "run"
    job, out = template_job(tmp_path, run_dir, **{"slurm.resume": "chain"})
    jobs.append(job)
    wait_for_step(run_dir, 10)
    rec = rank_record(run_dir, 1, job)
    assert rec["node"] == "n2", rec
    os.kill(int(rec["pid"]), signal.SIGUSR1)  # rank 1 only (same host)
    nxt = wait_for(lambda: next((str(e["followup_job_id"]) for e in read_history(run_dir)[0]
                                 if e["event"] == "followup"), None), "no follow-up job", timeout=60)
    jobs.append(nxt)
    wait_sacct_row(nxt, FINAL, timeout=240)
    assert job_rows(job) == ["COMPLETED"] and job_rows(nxt) == ["COMPLETED"], (sacct_rows(job), sacct_rows(nxt))
    log = text(run_dir / "train.log")
    (saved,) = stop_steps(log)  # both ranks: the same step
    assert len(re.findall(rf"saving a checkpoint at step {saved}\b", log)) == 2, log[-3000:]
    assert re.search(rf"\[rank 0\] .*another rank received SIGUSR1: stopping at step {saved} with it", log), log
    assert f"at step {saved} (restart #1" in log
    o = text(out)
    assert "ranks exited with status 75" in o and "continues in a follow-up job" in o, o
    assert "forwarding" not in o  # nothing went through the batch shell
    assert final_digest(run_dir) == reference
    assert_ranks_on_both_nodes(run_dir, nxt)
    assert [e["job_id"] for e in read_history(run_dir)[0] if e["event"] == "started"] == [job, nxt]


def test_template_partition_preemption_requeues_once_and_finishes(tmp_path, jobs, reference, two_nodes):
    run_dir = tmp_path / "run"
    job, out = template_job(tmp_path, run_dir)
    jobs.append(job)
    wait_for_step(run_dir, 10)
    # a high-priority job that needs every CPU of both nodes preempts the training job
    cpus = min(two_nodes.values())
    jobs.append(hi := sbatch("--partition=high", "--nodes=2", "--ntasks-per-node=1", f"--cpus-per-task={cpus}",
                             "--mem=100M", "--output=/dev/null", "--wrap=srun sleep 3"))
    wait_sacct_row(hi, "COMPLETED", timeout=120)
    wait_sacct_row(job, FINAL, timeout=300)
    rows = job_rows(job)
    assert rows[-1] == "COMPLETED" and len(rows) == 2 and rows[0] in {"PREEMPTED", "REQUEUED"}, sacct_rows(job)
    assert job_restarts(job) == 1
    o, log = text(out), text(run_dir / "train.log")
    assert "forwarding it to the 2 ranks" in o, o
    assert len(stop_steps(log)) == 1, log[-3000:]
    assert started_runs(run_dir) == [0, 1]  # no duplicate run
    assert log.count("(restart #1") == 1 and "(restart #2" not in log
    assert final_digest(run_dir) == reference


def test_template_sigkill_of_one_rank_fails_the_job_and_names_it(tmp_path, jobs):
    """fault.max_restarts=0: no in-job restart (foldhpc.resilience), so the SIGKILL ends the job."""
    run_dir = tmp_path / "run"
    job, out = template_job(tmp_path, run_dir, **{"train.max_steps": 10**6, "fault.max_restarts": 0})
    jobs.append(job)
    wait_for_step(run_dir, 5)
    recs = [rank_record(run_dir, r, job) for r in (0, 1)]
    pids = [int(r["pid"]) for r in recs]
    t0 = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    row = wait_sacct_row(job, FINAL, timeout=120)
    failed_s = time.monotonic() - t0
    print(f"SIGKILL of rank 1 -> job {row['State']} in sacct after {failed_s:.1f}s")
    assert row["State"] == "FAILED", (row, text(out))
    assert failed_s < 60, failed_s
    st = read_json(run_dir / "status.json")
    assert st["state"] == "failed", st
    assert [(f["rank"], f["node"], f["pid"]) for f in st["failed_ranks"]] == [(1, "n2", pids[1])], st
    assert "rank 1 on n2" in st["error"] and "killed by a signal" in st["error"], st["error"]
    p = run_foldhpc("status", str(run_dir), "--json")
    (r,) = json.loads(p.stdout)["runs"]
    assert p.returncode == 1 and r["state"] == "failed", r
    assert r["failed_ranks"][0]["rank"] == 1 and r["failed_ranks"][0]["node"] == "n2", r
    assert "rank 1 on n2" in r["reason"], r["reason"]
    table = run_foldhpc("status", str(run_dir)).stdout
    print(table)
    assert f"failed rank: run: rank 1 on n2 (host {recs[1]['host']}, pid {pids[1]})" in table, table
    left_s = assert_no_process_left(run_dir, pids)
    print(f"no process left {left_s:.1f}s after sacct said FAILED")
    assert job_rows(job) == ["FAILED"]  # never requeued


def test_template_sigkill_of_one_rank_restarts_both_in_the_job_bit_exact(tmp_path, jobs, reference):
    """The default (fault.max_restarts = 3): rank 1's supervisor restarts its trainer, rank 0's restarts
    its own when the collective fails; both resume on their nodes from the newest checkpoint, inside
    the same allocation (no requeue), and the run ends bit for bit like the local reference."""
    run_dir = tmp_path / "run"
    job, out = template_job(tmp_path, run_dir, **{"checkpoint.every_steps": 10})
    jobs.append(job)
    wait_for_step(run_dir, 12)
    pid = int(rank_record(run_dir, 1, job)["pid"])
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    resumed = re.compile(r"resumed from \S+step_00000010\.ckpt at step 10")
    wait_for(lambda: resumed.search(text(run_dir / "train.log")), "the ranks did not resume", timeout=120)
    print(f"SIGKILL of rank 1 -> both ranks resumed at step 10 after {time.monotonic() - t0:.1f}s")
    row = wait_sacct_row(job, FINAL, timeout=120)
    assert row["State"] == "COMPLETED", (row, text(out))
    assert job_rows(job) == ["COMPLETED"], sacct_rows(job)  # restarted in place, never requeued
    o = text(out)
    assert "trainer killed by SIGKILL" in o and o.count("restarting the trainer") >= 2, o[-3000:]
    assert final_digest(run_dir) == reference
    assert_ranks_on_both_nodes(run_dir, job)


def test_scancel_of_a_two_node_job_is_cancelled_for_good(tmp_path, jobs):
    run_dir = tmp_path / "run"
    jobs.append(job := submit(run_dir, **{"train.max_steps": 10**6}))
    wait_for_step(run_dir, 5)
    pids = [int(rank_record(run_dir, r, job)["pid"]) for r in (0, 1)]
    t0 = time.monotonic()
    run(["scancel", job])
    row = wait_sacct_row(job, FINAL, timeout=120)
    print(f"scancel -> {row['State']} in sacct after {time.monotonic() - t0:.1f}s")
    assert row["State"].startswith("CANCELLED"), row
    assert_no_process_left(run_dir, pids)
    time.sleep(8)  # a wrongful requeue would be pending/running again within cred_expire
    assert job_rows(job) == ["CANCELLED"], sacct_rows(job)
    st = read_json(run_dir / "status.json")
    assert st["state"] == "checkpointed" and st["signal"] == "SIGTERM", st  # saved on the way out
    assert CheckpointManager(run_dir / "checkpoints").entries()[-1].step == st["step"] >= 5
    assert [e["event"] for e in read_history(run_dir)[0]][-1] == "stopped"
    assert not processes_of(run_dir)
