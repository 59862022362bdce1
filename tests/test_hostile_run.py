"""Issue 19 (hostile and broken inputs), the run directory's side: who may write in it (item 4), a
forced resume that a crash must not undo (item 16), a full run.dir file system (item 17b), step saves
a slow writer must not swallow (item 18), and ``foldhpc goodput`` on a huge or clock-stepped log."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from conftest import TINY, fill_fs, tiny_overrides
from foldhpc.config import load_config
from foldhpc.records import fsio
from foldhpc.train.loop import Trainer


@pytest.fixture
def umask_002():
    """The user's umask on a setgid project folder; restored afterwards (the trainer tightens it)."""
    old = os.umask(0o002)
    yield
    os.umask(old)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def tiny(run: Path, **extra: object):
    return load_config(TINY, tiny_overrides(run, **extra))


# ------------------------------------------------------------------ item 4: group-writable run files
def test_run_files_are_not_group_writable_under_umask_002(tmp_path, umask_002):
    """Under ``umask 002`` a group member could edit the manifest or swap a checkpoint: run.dir and
    the checkpoint directory are 0750 and nothing the run writes is group/world-writable."""
    run = tmp_path / "run"
    ckdir = tmp_path / "elsewhere" / "ckpts"
    result = Trainer(tiny(run, **{"train.max_steps": 4, "checkpoint.every_steps": 2,
                                  "checkpoint.dir": str(ckdir)})).run()
    assert result.state == "completed"
    assert mode(run) == fsio.PRIVATE_DIR_MODE == 0o750
    assert mode(ckdir) == 0o750
    written = [p for d in (run, ckdir) for p in [d, *d.rglob("*")]]
    assert any(p.name == "manifest.json" for p in written) and any(p.suffix == ".ckpt" for p in written)
    assert any(p.name.startswith("events.out.tfevents") for p in written)
    shared = [f"{p} {mode(p):04o}" for p in written if mode(p) & (stat.S_IWGRP | stat.S_IWOTH)]
    assert not shared, shared


def test_existing_group_writable_run_dir_is_warned_about_once(tmp_path, umask_002, records):
    run = tmp_path / "shared"
    run.mkdir()
    run.chmod(0o775)
    cfg = tiny(run, **{"train.max_steps": 2})
    Trainer(cfg).run()
    Trainer(cfg).run()  # the same process again: not a second time
    warned = [m for m in records.messages() if "group-writable" in m]
    assert len(warned) == 1, warned
    assert str(run) in warned[0] and f"chmod -R go-w {run}" in warned[0]
    assert mode(run) == 0o775  # the owner's folder is left as it is


def test_submitit_folder_is_private(tmp_path, umask_002):
    """submitit's folder holds the pickles a job unpickles: 0750 (also a ``%j`` logs_dir's fixed part)."""
    from foldhpc.slurm.submit import executor_for

    pytest.importorskip("submitit")
    cfg = tiny(tmp_path / "run")
    executor_for(cfg, local=True)
    assert mode(tmp_path / "run" / "slurm") == 0o750
    logs = tmp_path / "logs"
    executor_for(load_config(TINY, tiny_overrides(tmp_path / "run2", **{"slurm.logs_dir": f"{logs}/%j"})),
                 local=True)
    assert mode(logs) == 0o750 and not (logs / "%j").exists()


# ------------------------------------------------------------------ item 16: a crash right after a chosen resume
@pytest.mark.parametrize("forced", [False, True], ids=["resume-old", "resume-old-force"])
def test_crash_after_resume_of_an_old_checkpoint_restarts_from_the_choice(tmp_path, monkeypatch, forced):
    """``--resume OLD [--force-resume]``, then a crash before the next save: the restart ("auto", as
    the supervisor and a requeue do it) continues the chosen line, not the abandoned newest checkpoint
    (before: refused for its old lr, or silently continued from step 30 with an unchanged config)."""
    from foldhpc import faults

    run = tmp_path / "run"
    base = {"train.max_steps": 30, "checkpoint.every_steps": 10}
    assert Trainer(tiny(run, **base)).run().step == 30
    old = run / "checkpoints" / "step_00000010.ckpt"
    cfg = tiny(run, **base, **({"train.lr": 1e-3} if forced else {}))
    monkeypatch.setenv(faults.FAIL_AT_STEP, "15")  # after the chosen start, before its first step save (20)
    with pytest.raises(faults.InjectedFailure):
        Trainer(cfg, resume=str(old), force_resume=forced).run()
    monkeypatch.delenv(faults.FAIL_AT_STEP)
    restarted = Trainer(cfg, resume="auto")
    assert restarted.run().step == 30
    log = (run / "train.log").read_text()
    resumes = [ln for ln in log.splitlines() if "resumed from" in ln]
    assert len(resumes) == 2 and all("at step 10 " in ln for ln in resumes), resumes
    assert "checkpoint step 10 saved (resume-choice" in log


# ------------------------------------------------------------------ item 17b: run.dir full, checkpoints elsewhere
@pytest.fixture
def tiny_fs(tmpfs):
    """A 4 MiB tmpfs of its own (root only; skipped where mount is not permitted)."""
    return tmpfs("4m")


def test_full_run_dir_never_ends_training(tiny_fs, tmp_path, monkeypatch, records):
    """run.dir's file system fills up at step 2 (checkpoint.dir elsewhere has room) and is freed at
    step 32 (long enough for TensorBoard's events to outgrow the slack of their file's last page): status.json, train.log and TensorBoard failures are one warning each, training completes
    and every one of them is written again afterwards (before: OSError from status.json, run failed)."""
    import threading

    from conftest import wait_for
    from foldhpc import faults
    from foldhpc.records import tensorboard as tb_mod

    monkeypatch.setattr(tb_mod, "RETRY_S", 0.0)  # retry at once (a new event file), not after 30 s
    monkeypatch.setenv(faults.STEP_DELAY, "0.05")
    run, ckpts = tiny_fs / "run", tmp_path / "ckpts"
    trainer = Trainer(tiny(run, **{"train.max_steps": 40, "checkpoint.every_steps": 5,
                                   "checkpoint.dir": str(ckpts)}))
    events: dict[str, int] = {}

    def disk() -> None:
        wait_for(lambda: trainer.step >= 2, "step 2", timeout=60, poll=0.005)
        filler = fill_fs(tiny_fs)
        events["full"] = trainer.step
        wait_for(lambda: trainer.step >= 32, "step 32", timeout=60, poll=0.005)
        events["freed"] = trainer.step
        filler.unlink()

    t = threading.Thread(target=disk, daemon=True)
    t.start()
    result = trainer.run()
    t.join(10)
    assert events["full"] < 10 and events["freed"] < 38, events
    assert result.state == "completed" and result.step == 40
    assert (ckpts / "step_00000040.ckpt").is_file()
    warned = records.messages()
    for what in ("status.json", "train.log", "TensorBoard events"):
        assert len([m for m in warned if m.startswith("cannot write") and what in m]) == 1, (what, warned)
    # written again once there was room
    from conftest import read_json

    assert read_json(run / "status.json")["state"] == "completed"
    log = (run / "train.log").read_text()
    assert "line(s) could not be written" in log and "training completed at step 40" in log
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps[:2] == [1, 2] and steps[-1] == 40, steps


# ------------------------------------------------------------------ item 18: step saves behind a slow writer
def test_every_steps_saves_are_caught_up_behind_a_slow_writer(tmp_path, monkeypatch):
    """A save takes many steps (write delay 1 s, steps of >= 0.05 s), every_steps = 5: a multiple of
    5 that finds the writer busy is logged as deferred and saved at the first boundary after that
    write is durable (before: dropped without a word; only multiples of 5 were ever saved)."""
    import re

    from foldhpc import faults

    monkeypatch.setenv(faults.WRITE_DELAY, "1.0")
    monkeypatch.setenv(faults.STEP_DELAY, "0.05")
    run = tmp_path / "run"
    Trainer(tiny(run, **{"train.max_steps": 60, "checkpoint.every_steps": 5, "checkpoint.keep_last": 50})).run()
    started: list[int] = []  # steps of the background ("steps") saves, in order
    done_at: dict[int, int] = {}  # save's step -> the training step logged last before it was durable
    deferred: list[int] = []
    cur = 0
    for ln in (run / "train.log").read_text().splitlines():
        if m := re.search(r"loop: step (\d+)/60 ", ln):
            cur = int(m.group(1))
        elif m := re.search(r"checkpoint step (\d+): staging and writing in the background \(steps\)", ln):
            started.append(int(m.group(1)))
        elif m := re.search(r"checkpoint step (\d+) saved \(steps", ln):
            done_at[int(m.group(1))] = cur
        elif m := re.search(r"every_steps = 5: the save at step (\d+) is deferred", ln):
            deferred.append(int(m.group(1)))
    assert deferred, started  # the writer was busy at some multiple of 5
    for k in deferred:
        busy = max(x for x in started if x < k)  # the save in flight at step k
        after = next((x for x in started if x > busy), 60)  # 60: the final save
        assert after <= done_at[busy] + 1, (k, busy, after, done_at, started)  # caught up at once
    # (a catch-up usually lands between two multiples of 5; it lands on one when the write happens to
    # become durable just before a multiple, so that is not asserted: the bound above is the rule)
