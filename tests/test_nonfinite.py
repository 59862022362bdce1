"""The non-finite guard (foldhpc.resilience.nonfinite), with real trainer processes.

NaN is injected through foldhpc.faults (``FOLDHPC_NAN_AT_STEPS``, ``_KIND``, ``_ON_RANK``,
``_ONCE``): a skipped step is counted and the run completes; K skips in a row roll back to the
newest checkpoint and a transient fault then ends bit for bit like a clean run; the same streak
at the same place again fails the run with the reason; on two ranks a NaN on one rank is skipped
on both; no checkpoint ever holds a NaN, and an exit checkpoint that would is refused (exit 1,
never 75).

Runs that are signalled and the two-rank runs are real processes; the others train in-process
(the same Trainer and the same fault hooks, read from the environment at each step), which saves
~5 s of imports per run; a failed run raises the error the process would die of.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT, TINY, foldhpc_cmd, read_json, set_args, tiny_overrides
from foldhpc import faults
from foldhpc.checkpoint.manager import CheckpointError, CheckpointManager
from foldhpc.checkpoint.finite import nonfinite_tensors
from foldhpc.config import load_config
from foldhpc.resilience.nonfinite import NonFiniteError
from foldhpc.train.loop import Trainer
from test_resume import SLOW, assert_identical, loss_curve, wait_for_log

STEPS = 40
BASE = {**SLOW, "train.max_steps": STEPS, "checkpoint.every_steps": 5, "checkpoint.keep_last": 100}


def cmd(run: Path, nproc: int = 1, **extra: object) -> list[str]:
    args = foldhpc_cmd("train", "--config", str(TINY), *set_args(tiny_overrides(run, **{**BASE, **extra})))
    return args + (["--nproc", str(nproc)] if nproc > 1 else [])


def nan_env(steps: str, **more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FOLDHPC_NAN_")}
    env[faults.NAN_AT_STEPS] = steps
    env.update(more)
    return env


def train(run: Path, env: dict[str, str] | None = None, nproc: int = 1, **extra: object) -> subprocess.CompletedProcess:
    return subprocess.run(cmd(run, nproc, **extra), cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=env if env is not None else nan_env(""))


def train_here(run: Path, nan_steps: str = "", env: dict[str, str] | None = None, **extra: object) -> str:
    """:func:`train` in-process: the run's final state ("completed"); the fault hooks' variables
    are set for the run only (``nan_env``'s, then ``env``)."""
    with pytest.MonkeyPatch.context() as m:
        for k in [k for k in os.environ if k.startswith("FOLDHPC_NAN_")]:
            m.delenv(k)
        m.setenv(faults.NAN_AT_STEPS, nan_steps)
        for k, v in (env or {}).items():
            m.setenv(k, v)
        cfg = load_config(TINY, tiny_overrides(run, **{**BASE, **extra}))
        return Trainer(cfg).run().state


def final(run: Path, step: int = STEPS) -> tuple[dict, str]:
    loaded = CheckpointManager(run / "checkpoints").load_latest()
    assert loaded.entry.step == step
    return loaded.state, loaded.entry.digest


def assert_all_checkpoints_finite(run: Path) -> list[int]:
    mgr = CheckpointManager(run / "checkpoints")
    steps = []
    for p in sorted((run / "checkpoints").glob("step_*.ckpt")):
        state = mgr.load_file(p)["state"]
        assert nonfinite_tensors(state) == [], p
        steps.append(int(state["train"]["step"]))
    return steps


def scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """An uninterrupted run without any NaN."""
    run = tmp_path_factory.mktemp("clean") / "run"
    assert train_here(run) == "completed"
    return run, *final(run)


# ---------------------------------------------------------------------------- pieces
def test_nonfinite_tensors_names_what_is_not_finite():
    state = {"model": {"ok": torch.ones(4), "w": torch.tensor([1.0, float("nan"), float("inf")]),
                       "huge": torch.full((8,), 3e38)},  # finite, though its sum overflows
             "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.tensor([-float("inf")])}}},
             "rng": {"torch": torch.zeros(16, dtype=torch.uint8)}, "train": {"loss": float("nan")}}
    assert nonfinite_tensors(state) == ["model/w: 1 NaN, 1 inf of 3 values",
                                        "optimizer/state/0/exp_avg: 0 NaN, 1 inf of 1 values"]
    assert nonfinite_tensors({"model": {"w": torch.randn(10), "b": torch.zeros(0)}}) == []


def test_manager_never_writes_a_nonfinite_state(tmp_path, caplog):
    mgr = CheckpointManager(tmp_path / "ck", keep_last=3, async_save=True)
    mgr.dir.mkdir()
    good = {"model": {"w": torch.ones(3)}, "train": {"step": 1}}
    assert mgr.save(1, good, {}, blocking=True)
    bad = {"model": {"w": torch.tensor([1.0, float("nan"), 2.0])}, "train": {"step": 2}}
    with pytest.raises(CheckpointError, match=r"refused: the state holds non-finite values \(model/w: 1 NaN"):
        mgr.save(2, bad, {}, blocking=True)
    assert mgr.save(3, lambda: bad, {})  # in the background: reported once, training goes on
    mgr.wait()
    err = mgr.poll_error()
    assert isinstance(err, CheckpointError) and "non-finite" in str(err) and mgr.poll_error() is None
    assert [e.step for e in mgr.entries()] == [1] and mgr.last_committed.step == 1
    assert sorted(p.name for p in mgr.dir.iterdir()) == ["manifest.json", "step_00000001.ckpt"]  # no temporaries
    assert "checkpoint at step 2 REFUSED" in caplog.text and "checkpoint at step 3 REFUSED" in caplog.text


def test_nan_steps_spec():
    assert faults._steps("12") == {12}
    assert faults._steps("5, 12-14,") == {5, 12, 13, 14}
    assert faults._steps("x,3") == {3}


# ---------------------------------------------------------------------------- skip
def test_a_nan_step_is_skipped_counted_and_the_run_completes(tmp_path, clean):
    run = tmp_path / "run"
    assert train_here(run, "12") == "completed"
    st = read_json(run / "status.json")
    assert st["state"] == "completed" and st["step"] == STEPS
    assert st["nonfinite"]["skipped"] == 1 and st["nonfinite"]["rollbacks"] == [] and st["nonfinite"]["streak"] == 0
    log = (run / "train.log").read_text()
    assert re.search(r"step 12: non-finite loss \(gradient norm nan\): update skipped \(1 skipped in all, 1 in a row", log)
    assert "rolled back" not in log
    assert scalars(run, "fault/nonfinite_skipped") == [(12, 1.0)]
    curve = dict(loss_curve(run))
    assert 12 not in curve and len(curve) == STEPS - 1  # a window of only a skipped step draws no loss
    clean_curve = dict(loss_curve(clean[0]))
    assert all(curve[s] == clean_curve[s] for s in range(1, 12))  # the same run up to the skip...
    assert curve[13] != clean_curve[13]  # ...then one update fewer
    assert assert_all_checkpoints_finite(run) == list(range(5, STEPS + 1, 5))
    state, _ = final(run)
    assert state["train"]["nonfinite"]["skipped"] == 1


def test_a_run_with_a_skipped_step_resumes_bit_exact(tmp_path):
    ref = tmp_path / "ref"
    assert train_here(ref, "12") == "completed"
    run = tmp_path / "run"
    slowed = nan_env("12", **{faults.STEP_DELAY: "0.05"})  # time to signal mid-run; changes no number
    proc = subprocess.Popen(cmd(run), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=slowed)
    wait_for_log(run, r"step 1[4-9]/", proc)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=120) == 75
    stopped = read_json(run / "status.json")["step"]
    assert 12 < stopped < STEPS
    assert train_here(run, "12") == "completed"
    (state, digest), (ref_state, ref_digest) = final(run), final(ref)
    assert_identical(state, ref_state)
    assert digest == ref_digest
    assert loss_curve(run) == loss_curve(ref)
    assert read_json(run / "status.json")["nonfinite"]["skipped"] == 1  # counted once, carried by the checkpoint


# ---------------------------------------------------------------------------- rollback
def test_k_nan_steps_roll_back_and_a_transient_fault_ends_bit_exact(tmp_path, clean):
    clean_run, clean_state, clean_digest = clean
    run = tmp_path / "run"
    assert train_here(run, "12-14", {"FOLDHPC_NAN_ONCE": str(tmp_path / "fired")},
                      **{"fault.nonfinite_rollback": 3}) == "completed"
    log = (run / "train.log").read_text()
    assert re.search(r"3 consecutive non-finite steps \(steps 12-14\): rolled back to the checkpoint at step 10 ", log)
    st = read_json(run / "status.json")
    assert st["state"] == "completed"
    assert st["nonfinite"]["skipped"] == 3 and st["nonfinite"]["rollbacks"] == [{"first": 12, "at": 14, "to": 10}]
    state, digest = final(run)
    assert_identical(state, clean_state)  # the replay is the clean run, bit for bit
    assert digest == clean_digest
    assert loss_curve(run) == loss_curve(clean_run)  # the rolled-back steps' events were purged
    assert scalars(run, "fault/rollbacks") == [(10, 1.0)]
    assert assert_all_checkpoints_finite(run) == list(range(5, STEPS + 1, 5))


def test_the_same_streak_again_at_the_same_place_fails_the_run(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError, match="again after rolling back"):  # a process dies of it: exit 1
        train_here(run, "12-14", **{"fault.nonfinite_rollback": 3})
    st = read_json(run / "status.json")
    assert st["state"] == "failed" and st["step"] == 14
    assert st["error"].startswith("NonFiniteError: 3 consecutive non-finite steps (steps 12-14) again after "
                                  "rolling back from step 14 to step 10"), st["error"]
    assert st["nonfinite"]["rollbacks"] == [{"first": 12, "at": 14, "to": 10}]
    assert "rolled back to the checkpoint at step 10" in (run / "train.log").read_text()
    assert assert_all_checkpoints_finite(run) == [5, 10]


def test_no_checkpoint_to_roll_back_to_fails_the_run(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError, match="no checkpoint to roll back to"):  # a process dies of it: exit 1
        train_here(run, "3-4", **{"fault.nonfinite_rollback": 2, "checkpoint.every_steps": 0})
    st = read_json(run / "status.json")
    assert st["state"] == "failed"
    assert st["error"] == ("NonFiniteError: 2 consecutive non-finite steps (steps 3-4) and there is no checkpoint "
                           "to roll back to"), st["error"]


# ---------------------------------------------------------------------------- non-finite weights
def test_nonfinite_weights_are_never_checkpointed_and_an_exit_save_fails_clearly(tmp_path):
    """A weight turns NaN during step 7 and stays: every later step is skipped (no rollback before
    50 in a row), the step saves at 10 and 15 are refused and logged while training goes on, and
    the exit checkpoint on a signal is refused: exit 1 with the reason, never 75."""
    run = tmp_path / "run"
    proc = subprocess.Popen(cmd(run, **{"fault.nonfinite_rollback": 50}), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=nan_env("7", FOLDHPC_NAN_KIND="weights"))
    wait_for_log(run, r"checkpoint at step 15 REFUSED", proc)
    wait_for_log(run, r"step 17/", proc)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=120) == 1
    st = read_json(run / "status.json")
    assert st["state"] == "failed" and "refused: the state holds non-finite values (model/" in st["error"], st
    log = (run / "train.log").read_text()
    assert re.search(r"checkpoint at step 10 REFUSED: non-finite values in model/\S+: 1 NaN", log)
    assert "step 16: non-finite loss" in log
    assert st["nonfinite"]["skipped"] >= 10
    assert assert_all_checkpoints_finite(run) == [5]


# ---------------------------------------------------------------------------- two ranks
def test_nan_on_one_rank_is_skipped_and_rolled_back_on_both(tmp_path):
    """Rank 1's loss *value* is NaN at steps 12-14 while its gradients stay finite: only the
    shared loss flag tells rank 0 to skip too. Both ranks skip, roll back together and end like a
    clean 2-rank run, bit for bit."""
    extra = {"train.batch_size": 4, "fault.nonfinite_rollback": 3}
    ref = tmp_path / "ref"
    p = train(ref, nproc=2, **extra)
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "run"
    env = nan_env("12-14", FOLDHPC_NAN_ON_RANK="1", FOLDHPC_NAN_KIND="value",
                  FOLDHPC_NAN_ONCE=str(tmp_path / "fired"))
    p = train(run, env, nproc=2, **extra)
    assert p.returncode == 0, p.stderr[-3000:]
    log = (run / "train.log").read_text()
    for step in (12, 13, 14):
        for rank in (0, 1):  # both ranks skip it
            assert re.search(rf"\[rank {rank}\] foldhpc.resilience.nonfinite: step {step}: non-finite loss", log), step
    assert len(re.findall(r"rolled back to the checkpoint at step 10", log)) == 2  # once per rank
    assert "run failed" not in log and "resumed from" not in log  # in process, not by a restart
    records = [read_json(run / "ranks" / f"rank-{r}.json") for r in range(2)]
    assert [(r["state"], r["result"], r["step"]) for r in records] == [("done", "completed", STEPS)] * 2
    (state, digest), (ref_state, ref_digest) = final(run), final(ref)
    assert_identical(state, ref_state)
    assert digest == ref_digest
