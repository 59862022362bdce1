"""Validation and preemption: a signal does not wait for a validation pass; curves stay exact.

Real ``foldhpc train`` processes on the tiny config with ``train.val_every`` on. To deliver a signal
while a validation is demonstrably in progress, the first process runs with the trainer's debug hook
``FOLDHPC_DEBUG_VAL_BATCH_DELAY_S`` (a sleep before each validation batch; the validation itself is
the real one). The resumed run, the reference and the run without validation train in-process
(the Trainer a plain ``foldhpc train`` runs, resume "auto"; ~5 s of imports less each), without it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT, TINY, foldhpc_cmd, read_json, set_args, tiny_overrides
from foldhpc.checkpoint.manager import CheckpointManager
from foldhpc.config import load_config
from foldhpc.train.loop import Trainer

STEPS = 40
VAL = {"train.max_steps": STEPS, "train.val_every": 20}
DELAY_S = 0.5  # per validation batch in the interrupted process; the validation split has 2 batches
VAL_TAGS = ("val/distogram_loss", "val/precision_long", "val/n_proteins")


def cmd(run: Path, **extra: object) -> list[str]:
    return foldhpc_cmd("train", "--config", str(TINY), *set_args(tiny_overrides(run, **{**VAL, **extra})))


def start(run: Path, delay: float = 0.0, **extra: object) -> subprocess.Popen:
    env = dict(os.environ, FOLDHPC_DEBUG_VAL_BATCH_DELAY_S=str(delay))
    return subprocess.Popen(cmd(run, **extra), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def finish(run: Path, **extra: object) -> None:
    """Train ``run`` to its end in-process, resuming from its newest checkpoint if it has one."""
    result = Trainer(load_config(TINY, tiny_overrides(run, **{**VAL, **extra})), resume="auto").run()
    assert result.state == "completed" and result.step == STEPS, result


def wait_for_log(run: Path, pattern: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = run / "train.log"
        if log.exists() and re.search(pattern, log.read_text()):
            return
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited ({proc.returncode}) before {pattern!r}: {proc.stderr.read()}")
        time.sleep(0.005)
    proc.kill()
    raise AssertionError(f"timed out waiting for {pattern!r}")


def newest(run: Path):
    return CheckpointManager(run / "checkpoints").load_latest()


def curves(run: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in ("train/loss", *VAL_TAGS)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run with validation, and its final digest."""
    run = tmp_path_factory.mktemp("valref") / "run"
    finish(run)
    return run, newest(run).entry.digest


def test_validation_consumes_no_training_randomness(tmp_path, reference):
    """Same weights with and without validation: validation cannot shift the training trajectory."""
    _, ref_digest = reference
    run = tmp_path / "noval"
    finish(run, **{"train.val_every": 0})
    assert newest(run).entry.digest == ref_digest


@pytest.mark.parametrize("val_step", [0, 20])  # the untrained baseline, a periodic validation
def test_signal_during_validation_saves_at_once_and_the_validation_is_redone(tmp_path, reference, val_step):
    ref_run, ref_digest = reference
    run = tmp_path / "run"
    proc = start(run, delay=DELAY_S)
    wait_for_log(run, rf"validating at step {val_step} \(2 batches\)", proc)
    t_signal = time.monotonic()
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=120) == 75, proc.stderr.read()[-2000:]
    signal_to_exit = time.monotonic() - t_signal
    log = (run / "train.log").read_text()
    # the save did not wait for the rest of the validation: it was stopped between batches ...
    assert re.search(rf"validation at step {val_step} stopped by a preemption signal after [01] of 2 batches",
                     log), log[-3000:]
    assert not re.search(rf"validation at step {val_step} \(", log)  # ... never completed ...
    assert signal_to_exit < 2 * DELAY_S + 10  # (a loose bound: interpreter exit included)
    # ... and the checkpoint holds exactly the step the validation belonged to
    ckpt = newest(run)
    assert ckpt.entry.step == val_step and ckpt.entry.reason == "signal:SIGUSR1"
    assert ckpt.state["train"]["val_step"] == {0: -1, 20: 0}[val_step]  # the last completed one (-1: none)
    st = read_json(run / "status.json")
    assert st["state"] == "checkpointed" and st["step"] == val_step

    n_before = len(log)
    finish(run)
    resumed = (run / "train.log").read_text()[n_before:]
    assert re.search(rf"resumed from \S+ at step {val_step} ", resumed)
    assert re.search(rf"validation at step {val_step} \(", resumed)  # redone first
    assert newest(run).entry.digest == ref_digest
    # the curves equal those of the uninterrupted run: the cut validation left no point, the redone
    # one is there exactly once, with the same values
    assert curves(run) == curves(ref_run)
    assert [s for s, _ in curves(run)["val/precision_long"]] == [0, 20, 40]


def test_signal_between_validations_resumes_bit_exact_with_validation_on(tmp_path, reference):
    """Bit-exact resume with train.val_every > 0: weights, optimizer digest and every curve."""
    ref_run, ref_digest = reference
    run = tmp_path / "run"
    proc = start(run)
    wait_for_log(run, r"step 27/", proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 75, proc.stderr.read()[-2000:]
    assert 27 <= newest(run).entry.step < STEPS
    finish(run)
    assert newest(run).entry.digest == ref_digest
    assert curves(run) == curves(ref_run)
