"""TensorBoard curves are as durable as the checkpoints: a SIGKILL leaves no gap before the newest one.

A real ``foldhpc train`` process on the tiny config, saving every 10 steps, is killed with SIGKILL the
moment a checkpoint is logged as saved. The event files are read back *before* anything resumes;
the resume then trains in-process (the Trainer a plain ``foldhpc train`` runs, resume "auto").
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT, TINY, foldhpc_cmd, set_args, tiny_overrides
from foldhpc.checkpoint.manager import CheckpointManager
from foldhpc.config import load_config
from foldhpc.train.loop import Trainer

STEPS = 60
OVERRIDES = {"train.max_steps": STEPS, "checkpoint.every_steps": 10, "train.val_every": 10}


def scalar_steps(run: Path, tag: str) -> list[int]:
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def test_sigkill_after_a_checkpoint_leaves_the_curves_up_to_it_on_disk(tmp_path):
    run = tmp_path / "run"
    cmd = foldhpc_cmd("train", "--config", str(TINY), *set_args(tiny_overrides(run, **OVERRIDES)))
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = run / "train.log"
    deadline = time.monotonic() + 120
    while not (log.exists() and re.search(r"checkpoint step 30 saved", log.read_text())):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint at step 30"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    durable = CheckpointManager(run / "checkpoints").load_latest().entry.step
    assert durable >= 30
    # nothing has resumed yet: what the killed process left on disk covers every step up to the
    # durable checkpoint (log_every = 1), and the validations at 0, 10, 20, 30
    assert set(range(1, durable + 1)) <= set(scalar_steps(run, "train/loss"))
    assert set(range(0, durable + 1, 10)) <= set(scalar_steps(run, "val/distogram_loss"))
    # the resume purges only what lies after the checkpoint, so the curve has no gap and no repeats
    assert Trainer(load_config(TINY, tiny_overrides(run, **OVERRIDES)), resume="auto").run().step == STEPS
    assert scalar_steps(run, "train/loss") == list(range(1, STEPS + 1))
