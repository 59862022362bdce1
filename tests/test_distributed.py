"""Several ranks on one machine (``foldhpc train --nproc 2``, gloo on CPU): the same guarantees.

Real processes, a real gloo process group: a signal to one rank or to all stops every rank at the
same step boundary, rank 0 commits one checkpoint, and the resumed run ends bit for bit like an
uninterrupted 2-rank run; a checkpoint moves between world sizes; a rank that dies or raises fails
the run quickly, with the rank named. The Slurm side (srun, two nodes) is in tests/slurm/.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY, foldhpc_cmd, read_json, set_args, tiny_overrides
from foldhpc.checkpoint.manager import CheckpointManager
from foldhpc.data.dataset import TrainBatches
from foldhpc.distributed.env import DistEnv, _expand_nodelist_py, from_environ, port_for_job
from foldhpc.records.fsio import pid_alive
from test_resume import SLOW, assert_identical, loss_curve, wait_for_log

STEPS = 40


def overrides(run: Path, **extra: object) -> list[str]:
    # batch 4: two samples per rank
    return tiny_overrides(run, **{**SLOW, "train.max_steps": STEPS, "train.batch_size": 4, **extra})


def cmd(run: Path, nproc: int, *flags: str, **extra: object) -> list[str]:
    return foldhpc_cmd("train", "--config", str(TINY), *set_args(overrides(run, **extra)), "--nproc", str(nproc),
                       *flags)


def start(run: Path, nproc: int = 2, env: dict[str, str] | None = None, **extra: object) -> subprocess.Popen:
    return subprocess.Popen(cmd(run, nproc, **extra), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, **(env or {})), start_new_session=True)


def finish(run: Path, nproc: int, **extra: object) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd(run, nproc, **extra), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def final(run: Path) -> tuple[dict, str]:
    loaded = CheckpointManager(run / "checkpoints").load_latest()
    assert loaded.entry.step == STEPS
    return loaded.state, loaded.entry.digest


def rank_pid(run: Path, rank: int, proc: subprocess.Popen) -> int:
    deadline = time.monotonic() + 60
    path = run / "ranks" / f"rank-{rank}.json"
    while time.monotonic() < deadline:
        if path.exists():
            rec = read_json(path)
            if rec.get("state") == "running":
                return int(rec["pid"])
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.01)
    raise AssertionError(f"no record of rank {rank}")


_REFERENCE: list[tuple[Path, dict, str]] = []


def two_rank_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    """The uninterrupted 2-rank run (its dir, final state, digest), trained once per session:
    tests/test_supervisor.py compares a restarted 2-rank run with the same one."""
    if not _REFERENCE:
        run = tmp_path_factory.mktemp("dref") / "run"
        finish(run, 2)
        _REFERENCE.append((run, *final(run)))
    return _REFERENCE[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return two_rank_reference(tmp_path_factory)


# ---------------------------------------------------------------------------- who am I
def test_env_reads_torchrun_slurm_step_and_ignores_a_batch_shell():
    env = from_environ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1",
                        "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.launcher) == \
        (1, 2, 1, "10.0.0.1", 1234, "env")
    slurm = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "4", "SLURM_JOB_ID": "4711",
             "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "MASTER_ADDR": "127.0.0.1",
             "SLURMD_NODENAME": "n2"}
    env = from_environ(slurm)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.node, env.launcher) == \
        (3, 4, 1, 2, "n2", "slurm")
    assert env.master_port == port_for_job("4711") == from_environ(dict(slurm, SLURM_PROCID="0")).master_port
    # the batch shell of a 4-task job is one process, not rank 0 of 4
    single = from_environ({"SLURM_JOB_ID": "4711", "SLURM_NTASKS": "4", "SLURM_PROCID": "0"})
    assert single == DistEnv(node=single.node) and not single.distributed
    assert _expand_nodelist_py("n[1-2],gpu[07-09],login") == ["n1", "n2", "gpu07", "gpu08", "gpu09", "login"]


def test_rank_shards_are_the_global_batch_with_the_same_crops():
    from foldhpc.data.cache import load_dataset
    from foldhpc.config import load_config
    from conftest import GOOD_DATA

    recs = load_dataset(load_config(None, [f"data.path={GOOD_DATA}"]).data).records
    one = TrainBatches(recs, 4, 32, seed=3)
    shards = [TrainBatches(recs, 4, 32, seed=3, rank=r, world_size=2) for r in range(2)]
    for step in (0, 1, 7, 50):
        whole = one[step]
        parts = [s[step] for s in shards]
        for k in whole:
            assert torch.equal(whole[k], torch.cat([p[k] for p in parts])), (step, k)
    with pytest.raises(ValueError, match="cannot be split"):
        TrainBatches(recs, 3, 32, seed=3, rank=0, world_size=2)


def test_nproc_rejects_a_batch_that_does_not_split(tmp_path):
    p = subprocess.run(cmd(tmp_path / "run", 3), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "multiple of the number of ranks" in p.stderr


# ---------------------------------------------------------------------------- stopping together
@pytest.mark.parametrize("who", ["rank1", "all"])
def test_signal_stops_all_ranks_at_one_step_and_resume_is_bit_exact(tmp_path, reference, who):
    _, ref_state, ref_digest = reference
    run = tmp_path / "run"
    proc = start(run)
    pid1 = rank_pid(run, 1, proc)
    wait_for_log(run, r"step 1[2-9]/", proc)
    if who == "rank1":
        os.kill(pid1, signal.SIGUSR1)  # rank 0 never sees a signal
    else:
        proc.send_signal(signal.SIGTERM)  # the launcher forwards it to every rank, like srun
    assert proc.wait(timeout=120) == 75, proc.stderr.read()
    st = read_json(run / "status.json")
    ckpt = CheckpointManager(run / "checkpoints").load_latest()
    assert st["state"] == "checkpointed" and st["step"] == ckpt.entry.step and 0 < ckpt.entry.step < STEPS
    assert ckpt.entry.reason == ("signal:SIGUSR1" if who == "rank1" else "signal:SIGTERM")
    records = [read_json(run / "ranks" / f"rank-{r}.json") for r in range(2)]
    assert [(r["state"], r["result"], r["step"]) for r in records] == [("done", "checkpointed", ckpt.entry.step)] * 2
    log = (run / "train.log").read_text()
    if who == "rank1":
        assert "another rank received SIGUSR1" in log  # rank 0 stopped because rank 1 was told to
    finish(run, 2)
    state, digest = final(run)
    assert_identical(state, ref_state)
    assert digest == ref_digest


# ---------------------------------------------------------------------------- world size changes
@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)])
def test_checkpoint_resumes_on_another_world_size(tmp_path, reference, first, then):
    """Same samples per step and the same loss (pair-weighted over the global batch): the run
    continues as the same training, equal up to float summation order, and says it is not bit-exact."""
    ref_run, _, _ = reference
    run = tmp_path / "run"
    # fault.max_restarts = 0: the failure at step 21 ends the first run at once (a restart would
    # only fail at step 21 again, after a back-off)
    p = subprocess.run(cmd(run, first, **{"train.max_steps": STEPS, "checkpoint.every_steps": 20,
                                          "fault.max_restarts": 0}),
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, FOLDHPC_FAIL_AT_STEP="21"))
    assert p.returncode != 0 and CheckpointManager(run / "checkpoints").load_latest().entry.step == 20
    finish(run, then)
    final(run)
    log = (run / "train.log").read_text()
    assert f"ranks: {first} -> {then}" in log and "not bit-identically" in log
    # Every step's loss (over the global batch, logged at every step) equals the uninterrupted
    # 2-rank run's to float precision. (Weights are compared through the loss: Adam turns
    # 1e-9 differences in near-zero gradients into visible ones in a few parameters.)
    got, want = loss_curve(run), loss_curve(ref_run)
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, STEPS + 1))
    for (step, a), (_, b) in zip(got, want):
        assert abs(a - b) <= 1e-5 * abs(b), (step, a, b)


# ---------------------------------------------------------------------------- a rank dies
def test_killed_rank_fails_the_run_quickly_and_is_named(tmp_path):
    """Without in-job restarts (fault.max_restarts = 0); with them, see tests/test_supervisor.py."""
    run = tmp_path / "run"
    proc = start(run, **{"train.max_steps": 100000, "fault.max_restarts": 0})
    pids = [rank_pid(run, r, proc) for r in range(2)]
    wait_for_log(run, r"step 5/", proc)
    t0 = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    rc = proc.wait(timeout=120)
    took = time.monotonic() - t0
    assert rc == 1, proc.stderr.read()
    assert took < 30, f"the run took {took:.1f}s to fail after a rank died"
    assert not any(pid_alive(p) for p in pids)
    st = read_json(run / "status.json")
    assert st["state"] == "failed"
    assert [r["rank"] for r in st["failed_ranks"]] == [1]
    assert "rank 1 on" in st["error"] and "died without reporting an error" in st["error"]
    assert read_json(run / "ranks" / "rank-0.json")["state"] == "aborted"


def test_rank_that_raises_is_named_with_its_error(tmp_path):
    """fault.max_restarts = 0: the supervisor gives up on the first failure, its verdict in status
    (each restart would only fail at step 7 again, after 2 + 4 + 8 s of back-off: ~50 s)."""
    run = tmp_path / "run"
    p = subprocess.run(cmd(run, 2, **{"fault.max_restarts": 0}), cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, FOLDHPC_FAIL_AT_STEP="7", FOLDHPC_FAIL_ON_RANK="1"))
    assert p.returncode == 1
    st = read_json(run / "status.json")
    assert st["state"] == "failed" and [r["rank"] for r in st["failed_ranks"]] == [1]
    assert "injected failure at step 7" in st["error"] and st["error"].startswith("rank 1 on")
    assert "[rank 1]" in (run / "train.log").read_text()  # rank 1's error reached the run log, marked
    from foldhpc.records.events import read_events

    events, _ = read_events(run)
    named = [e for e in events if e.kind == "failed_ranks"]  # the failing rank, and rank 0, name the one to blame
    assert named and all([r["rank"] for r in e["ranks"]] == [1] for e in named), named
    assert any(st["error"].startswith(e["error"]) for e in named)  # status adds the supervisor's verdict
    assert "in-job restarts used up: 0 of fault.max_restarts = 0" in st["error"]
    assert {(e.rank, e["step"]) for e in events if e.kind == "fault_injected"} == {(1, 7)}  # once per start
