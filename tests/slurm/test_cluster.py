"""The local Slurm test cluster itself works: two nodes, partitions, jobs, fake GPUs, a two-node
job, failures, preemption.

Real daemons, real jobs (tests/slurm/cluster.sh: nodes n1 and n2 on this host). About 45 s in all,
most of it the preemption test (debug's GraceTime=20 s before the preempted job is killed and
requeued).
"""

from __future__ import annotations

import subprocess
import time

import pytest

from .helpers import (
    CLUSTER_SH,
    cancel_all_jobs,
    job_nodes,
    job_restarts,
    run,
    sacct_rows,
    sbatch,
    wait_for_state,
    wait_sacct_row,
)


@pytest.fixture(scope="module")
def jobs(slurm_cluster):
    """Job ids started by this module; all cancelled at the end."""
    started: list[str] = []
    yield started
    cancel_all_jobs(started)


def test_cluster_is_up(slurm_cluster):
    out = run(["sinfo", "-h", "-o", "%P|%a|%T"])
    parts = {}
    for line in out.splitlines():
        p, avail, state = line.split("|")
        parts[p.rstrip("*")] = (avail, state)
    assert set(parts) >= {"debug", "high"}, out
    for p in ("debug", "high"):
        assert parts[p][0] == "up", out
        assert parts[p][1] in {"idle", "mixed", "allocated", "completing"}, out
    assert "debug*" in out  # default partition
    # both nodes in both partitions, each with the advertised CPUs and fake GPUs
    nodes = run(["sinfo", "-N", "-h", "-o", "%N|%P|%c|%G"]).split()
    want = {f"{n}|{p}|{slurm_cluster.cpus}|gpu:{slurm_cluster.gpus}" if slurm_cluster.gpus else
            f"{n}|{p}|{slurm_cluster.cpus}|(null)" for n in ("n1", "n2") for p in ("debug*", "high")}
    assert slurm_cluster.nodes == ("n1", "n2") and set(nodes) == want, nodes
    status = subprocess.run(["bash", str(CLUSTER_SH), "status"], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr


def test_trivial_job_completes(slurm_cluster, jobs, tmp_path):
    out = tmp_path / "hi.out"
    jid = sbatch("-J", "t_hi", "-o", str(out), "--wrap", "echo hi")
    jobs.append(jid)
    wait_for_state(jid, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=60)
    row = wait_sacct_row(jid, "COMPLETED")
    assert out.read_text().strip() == "hi"
    assert (row["ExitCode"], row["Partition"]) == ("0:0", "debug"), row
    assert row["NodeList"] in slurm_cluster.nodes, row  # one node, not the host name


def test_gpu_job_sees_cuda_visible_devices(slurm_cluster, jobs, tmp_path):
    out = tmp_path / "gpu.out"
    jid = sbatch("-J", "t_gpu", "--gres=gpu:1", "-o", str(out), "--wrap", 'echo "CVD=$CUDA_VISIBLE_DEVICES"')
    jobs.append(jid)
    row = wait_sacct_row(jid, "COMPLETED")
    cvd = out.read_text().strip().removeprefix("CVD=")
    assert cvd in {str(i) for i in range(slurm_cluster.gpus)}, out.read_text()
    assert "gres/gpu=1" in row["AllocTRES"], row


def test_two_node_job_runs_one_task_per_node_each_with_its_own_gpu(slurm_cluster, jobs, tmp_path):
    """`sbatch -N 2 --ntasks-per-node=1 --gpus-per-node=1` + srun: rank 0 on n1, rank 1 on n2, each
    task with one fake GPU of its own node (the index is per node, so both see GPU 0)."""
    out = tmp_path / "two.out"
    gpu = ["--gpus-per-node=1"] if slurm_cluster.gpus else []
    task = ('echo "TASK node=$SLURMD_NODENAME rank=$SLURM_PROCID nodelist=$SLURM_JOB_NODELIST '
            'ntasks=$SLURM_NTASKS cvd=${CUDA_VISIBLE_DEVICES-unset} stepgpus=${SLURM_STEP_GPUS-unset}"')
    jid = sbatch("-J", "t_two", "-N", "2", "--ntasks-per-node=1", *gpu, "-o", str(out),
                 "--wrap", f"srun bash -c '{task}'")
    jobs.append(jid)
    row = wait_sacct_row(jid, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=60)
    assert (row["State"], row["ExitCode"], row["NodeList"]) == ("COMPLETED", "0:0", "n[1-2]"), row
    tasks = {}
    for line in out.read_text().splitlines():
        if line.startswith("TASK "):
            kv = dict(item.split("=", 1) for item in line.split()[1:])
            tasks[kv["node"]] = kv
    assert sorted(tasks) == ["n1", "n2"], out.read_text()
    assert {n: t["rank"] for n, t in tasks.items()} == {"n1": "0", "n2": "1"}, tasks  # block distribution
    for t in tasks.values():
        assert (t["nodelist"], t["ntasks"]) == ("n[1-2]", "2"), tasks
        if slurm_cluster.gpus:
            assert t["cvd"] == t["stepgpus"] == "0", tasks  # exactly one GPU, its node's own
        else:
            assert t["stepgpus"] == "unset", tasks
    step = [r for r in sacct_rows(jid, duplicates=False) if r["JobID"] == f"{jid}.0"]
    assert len(step) == 1 and step[0]["State"] == "COMPLETED" and step[0]["NodeList"] == "n[1-2]", step
    assert "node=2" in step[0]["AllocTRES"], step
    if slurm_cluster.gpus:
        assert "gres/gpu=2" in row["AllocTRES"] and "gres/gpu=2" in step[0]["AllocTRES"], (row, step)


def test_failing_job_is_failed_with_exit_code(slurm_cluster, jobs, tmp_path):
    jid = sbatch("-J", "t_fail", "-o", str(tmp_path / "fail.out"), "--wrap", "echo failing; exit 3")
    jobs.append(jid)
    row = wait_sacct_row(jid, "FAILED")
    assert row["ExitCode"] == "3:0", row


def test_debug_job_is_preempted_and_requeued_by_high_job(slurm_cluster, jobs, tmp_path):
    # both jobs on one node: unpinned, the high job would just start on the other, idle node
    node = slurm_cluster.nodes[0]
    low = sbatch(
        "-J", "t_low", "-p", slurm_cluster.default_partition, f"--nodelist={node}", "--requeue",
        "--open-mode=append", "-o", str(tmp_path / "low.out"),
        "--wrap", 'echo "run restart=${SLURM_RESTART_COUNT:-0}"; sleep 300',
    )  # fmt: skip
    jobs.append(low)
    wait_for_state(low, "RUNNING", timeout=30)
    assert job_nodes(low) == node
    # the high job needs every CPU of that node, so the running debug job must go
    high = sbatch(
        "-J", "t_high", "-p", slurm_cluster.high_partition, f"--nodelist={node}", "-c", str(slurm_cluster.cpus),
        "-o", str(tmp_path / "high.out"), "--wrap", "sleep 2",
    )  # fmt: skip
    jobs.append(high)
    # GraceTime=20 s on debug, then TERM (sleep dies at once), then the high job starts
    wait_for_state(high, {"RUNNING", "COMPLETED"}, timeout=60)
    assert wait_sacct_row(high, "COMPLETED", timeout=30)["NodeList"] == node

    assert job_restarts(low) >= 1
    deadline = time.monotonic() + 30
    while True:
        states = [r["State"].split()[0] for r in sacct_rows(low) if "." not in r["JobID"]]
        if {"PREEMPTED", "REQUEUED"} & set(states):
            break
        assert time.monotonic() < deadline, f"sacct --duplicates shows no PREEMPTED/REQUEUED row: {states}"
        time.sleep(0.5)
    if slurm_cluster.profile == "fast":
        # cred_expire=5 + sched_interval=1: the requeued job runs again within seconds
        wait_for_state(low, "RUNNING", timeout=30)
        deadline = time.monotonic() + 10
        while "restart=1" not in (tmp_path / "low.out").read_text():
            assert time.monotonic() < deadline, (tmp_path / "low.out").read_text()
            time.sleep(0.2)
    cancel_all_jobs([low])
