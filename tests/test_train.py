"""End-to-end training on real structures: run directory, logs, status, TensorBoard, failures."""

from __future__ import annotations

import re

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TINY, read_json, run_foldhpc, set_args, tiny_overrides
from foldhpc.config import load_config
from foldhpc.train.loop import Trainer


def scalars(run_dir, tag):
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_tiny_run_produces_run_directory_logs_status_and_tensorboard(tmp_path):
    run = tmp_path / "run"
    cfg = load_config(TINY, tiny_overrides(run, **{"train.max_steps": 60, "run.log_every": 10,
                                                  "train.val_every": 30}))
    result = Trainer(cfg).run()
    assert result.state == "completed" and result.step == 60

    # resolved config round-trips
    assert load_config(run / "config.toml") == cfg
    # log file has every progress line with the expected fields
    log = (run / "train.log").read_text()
    steps = [int(m) for m in re.findall(r"step (\d+)/60 loss [\d.]+ lr [\d.e+-]+ gnorm [\d.]+ \| "
                                        r"[\d.]+ samples/s, data wait [\d.]+% \| ETA", log)]
    assert steps == [10, 20, 30, 40, 50, 60]
    assert "validation at step 30" in log and "training completed at step 60" in log
    # status file
    st = read_json(run / "status.json")
    assert st["state"] == "completed" and st["step"] == 60 and st["max_steps"] == 60
    assert st["last_checkpoint"]["step"] == 60 and st["error"] is None
    assert set(st["metrics"]) >= {"distogram_loss", "precision_long"}
    # TensorBoard, read back with tensorboard's own reader
    loss = scalars(run, "train/loss")
    assert [s for s, _ in loss] == [10, 20, 30, 40, 50, 60]
    assert loss[-1][1] < loss[0][1]  # it learns
    for tag in ("train/lr", "train/grad_norm", "perf/samples_per_s", "perf/data_wait_frac"):
        assert [s for s, _ in scalars(run, tag)] == [10, 20, 30, 40, 50, 60]
    assert [s for s, _ in scalars(run, "val/precision_long")] == [0, 30, 60]  # 0: untrained baseline
    # final checkpoint
    assert (run / "checkpoints" / "step_00000060.ckpt").is_file()


def test_loss_decreases_on_a_tiny_run(tmp_path):
    cfg = load_config(TINY, tiny_overrides(tmp_path / "r", **{"train.max_steps": 80, "run.log_every": 20,
                                                             "train.lr": 3e-3}))
    Trainer(cfg).run()
    loss = [v for _, v in scalars(tmp_path / "r", "train/loss")]
    assert loss[-1] < 0.95 * loss[0], loss


def test_cli_train_and_checkpoints_listing(tmp_path):
    run = tmp_path / "cli"
    p = run_foldhpc("train", "--config", str(TINY), *set_args(tiny_overrides(run, **{"train.max_steps": 12})))
    assert p.returncode == 0, p.stderr
    p = run_foldhpc("checkpoints", str(run), "--verify")
    assert p.returncode == 0, p.stderr
    assert re.search(r"^\s+12 .* ok\s+[0-9a-f]{16}\s+step_00000012\.ckpt", p.stdout, re.M), p.stdout


def test_bad_config_is_rejected_before_any_work(tmp_path):
    run = tmp_path / "never"
    p = run_foldhpc("train", "--config", str(TINY), "--set", f"run.dir={run}", "--set", "train.max_stepz=3")
    assert p.returncode == 2
    assert "train.max_stepz" in p.stderr and "train.max_steps" in p.stderr
    assert not run.exists()  # nothing was started


def test_missing_dataset_fails_clearly_and_records_why(tmp_path):
    run = tmp_path / "run"
    p = run_foldhpc("train", "--config", str(TINY), "--set", f"run.dir={run}",
                    "--set", f"data.path={tmp_path / 'no-such-data'}")
    assert p.returncode == 2
    assert "no-such-data" in p.stderr and "does not exist" in p.stderr
    st = read_json(run / "status.json")
    assert st["state"] == "failed" and "no-such-data" in st["error"]


def test_crash_mid_training_is_recorded_in_status(tmp_path, monkeypatch):
    """In-process: the exception a ``foldhpc train`` process dies of (exit 1, its traceback:
    tests/test_cli_errors.py) leaves the run's status and log behind it."""
    from foldhpc import faults

    run = tmp_path / "run"
    monkeypatch.setenv(faults.FAIL_AT_STEP, "7")
    with pytest.raises(faults.InjectedFailure, match="injected failure at step 7"):
        Trainer(load_config(TINY, tiny_overrides(run, **{"train.max_steps": 20}))).run()
    st = read_json(run / "status.json")
    assert st["state"] == "failed" and st["step"] == 7
    assert "injected failure at step 7" in st["error"]
    assert "run failed at step 7" in (run / "train.log").read_text()


def test_incompatible_resume_is_refused_unless_forced(tmp_path):
    run = tmp_path / "run"
    base = tiny_overrides(run, **{"train.max_steps": 5})
    assert Trainer(load_config(TINY, base)).run().state == "completed"  # the checkpoints to resume (in-process)
    changed = base + ["model.d_pair=8", "train.max_steps=8"]
    p = run_foldhpc("train", "--config", str(TINY), *set_args(changed))
    assert p.returncode == 2  # a user error: nothing was lost, a restart cannot fix it
    assert "model.d_pair: 16 -> 8" in p.stderr and "--force-resume" in p.stderr
    # --no-resume keeps the old checkpoints aside instead of deleting them
    p = run_foldhpc("train", "--config", str(TINY), "--no-resume", *set_args(changed))
    assert p.returncode == 0, p.stderr
    aside = list(tmp_path.glob("run/checkpoints/old-*/step_00000005.ckpt"))
    assert len(aside) == 1


@pytest.mark.parametrize("workers", [0, 2])
def test_data_loader_workers_give_identical_training(tmp_path, workers):
    """Batches are a function of (seed, step): worker processes change nothing."""
    from foldhpc.checkpoint.manager import CheckpointManager

    cfg = load_config(TINY, tiny_overrides(tmp_path / f"w{workers}", **{"train.max_steps": 6,
                                                                        "data.num_workers": workers}))
    Trainer(cfg).run()
    digest = CheckpointManager(cfg.checkpoint_dir).entries()[-1].digest
    ref = load_config(TINY, tiny_overrides(tmp_path / "ref", **{"train.max_steps": 6}))
    Trainer(ref).run()
    assert digest == CheckpointManager(ref.checkpoint_dir).entries()[-1].digest
