"""Resume compatibility: config changes that alter the trajectory are refused unless forced.

Real ``foldhpc train`` processes on the tiny config: train to a checkpoint, then start again in the
same run directory with a changed config.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TINY, run_foldhpc, set_args, tiny_overrides
from foldhpc.checkpoint.manager import CheckpointManager
from foldhpc.config import TrainConfig
from foldhpc.train.compat import NUMERICS, TRAJECTORY, classify, diff_configs
from foldhpc.train.schedule import lr_factor

FIRST, SECOND = 10, 20


def train(run: Path, *extra_args: str, **overrides: object):
    return run_foldhpc("train", "--config", str(TINY), *extra_args,
                       *set_args(tiny_overrides(run, **{"train.max_steps": FIRST, **overrides})))


def newest_step(run: Path) -> int:
    return CheckpointManager(run / "checkpoints").entries()[-1].step


def lr_curve(run: Path) -> dict[int, float]:
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/lr")}


def test_every_train_key_has_a_deliberate_resume_class():
    """A new train.* key must be placed in compat's classes; only these two are 'harmless'."""
    harmless = {f.name for f in dataclasses.fields(TrainConfig)
                if classify("train", f.name) not in (TRAJECTORY, NUMERICS)}
    assert harmless == {"val_every", "val_max_samples"}
    assert {f.name for f in dataclasses.fields(TrainConfig) if classify("train", f.name) == NUMERICS} == {
        "device", "deterministic", "compile", "threads"}
    d = diff_configs({"train": {"lr": 0.002, "threads": 1}, "run": {"log_every": 1}},
                     {"train": {"lr": 0.001, "threads": 2, "new_key": 3}, "run": {"log_every": 5}})
    assert d.trajectory == ["train.lr: 0.002 -> 0.001"]
    assert d.numerics == ["train.threads: 1 -> 2"]
    assert d.harmless == ["run.log_every: 1 -> 5", "train.new_key: <unset> -> 3"]


def test_trajectory_change_is_refused_naming_keys_and_force_resume_applies_it(tmp_path):
    run = tmp_path / "run"
    assert train(run).returncode == 0
    changed = {"train.max_steps": SECOND, "train.lr": 1e-3, "train.seed": 3, "train.warmup_steps": 2}
    p = train(run, **changed)
    assert p.returncode == 2, p.stderr[-2000:]  # refused before training: a user error
    for item in ("train.lr: 0.002 -> 0.001", "train.seed: 0 -> 3", f"train.max_steps: {FIRST} -> {SECOND}",
                 "train.warmup_steps: 5 -> 2"):
        assert item in p.stderr, (item, p.stderr[-2000:])
    assert "--force-resume" in p.stderr and "--no-resume" in p.stderr
    assert "Traceback" not in p.stderr
    assert newest_step(run) == FIRST  # refused before any training step
    assert f"step {FIRST + 1}/" not in (run / "train.log").read_text()

    p = train(run, "--force-resume", **changed)
    assert p.returncode == 0, p.stderr[-2000:]
    log = (run / "train.log").read_text()
    assert "--force-resume: checkpoint" in log and "train.lr: 0.002 -> 0.001" in log
    assert re.search(rf"resumed from \S+ at step {FIRST} ", log)  # forced: continued, not restarted
    assert newest_step(run) == SECOND
    # the new lr and schedule really are in effect after the resume (not the checkpoint's)
    lrs = lr_curve(run)
    for step in range(FIRST + 1, SECOND + 1):
        want = 1e-3 * lr_factor(step - 1, warmup_steps=2, max_steps=SECOND, min_lr_ratio=0.1)
        assert math.isclose(lrs[step], want, rel_tol=1e-6), (step, lrs[step], want)


def test_harmless_changes_resume_bit_exact_and_numerics_changes_warn(tmp_path):
    ref = tmp_path / "ref"
    assert train(ref, **{"train.max_steps": SECOND}).returncode == 0
    ref_digest = CheckpointManager(ref / "checkpoints").entries()[-1].digest

    run = tmp_path / "run"
    # interrupted without changing its config (a smaller max_steps would change the schedule):
    # an injected crash at step FIRST + 2, with a checkpoint every 5 steps
    p = run_foldhpc("train", "--config", str(TINY),
                    *set_args(tiny_overrides(run, **{"train.max_steps": SECOND, "checkpoint.every_steps": 5})),
                    env={"FOLDHPC_FAIL_AT_STEP": str(FIRST + 2)})
    assert p.returncode == 1
    assert newest_step(run) == FIRST
    p = train(run, **{"train.max_steps": SECOND, "train.val_every": 4, "run.log_every": 3,
                      "checkpoint.keep_last": 5})
    assert p.returncode == 0, p.stderr[-2000:]
    log = (run / "train.log").read_text()
    m = re.search(r"config changed since checkpoint \S+ \(does not affect training\): (.*)", log)
    assert m, log[-3000:]
    for item in ("train.val_every: 0 -> 4", "run.log_every: 1 -> 3", "checkpoint.keep_last: 3 -> 5",
                 "checkpoint.every_steps: 5 -> 0"):
        assert item in m.group(1)
    assert CheckpointManager(run / "checkpoints").entries()[-1].digest == ref_digest

    # a numerics key (how, not what, is computed) resumes with a warning that says so
    p = train(run, **{"train.max_steps": SECOND, "train.threads": 2})
    assert p.returncode == 0, p.stderr[-2000:]
    assert re.search(r"WARNING .*config changed since checkpoint \S+: train\.threads: 1 -> 2\. .*"
                     r"no longer bit-identical", (run / "train.log").read_text())
