"""Issue 19 (hostile and broken inputs), the run directory's side: who may write in it (item 4), a
forced resume that a crash must not undo (item 16), a full run.dir file system (item 17b), step saves
a slow writer must not swallow (item 18), and ``foldhpc goodput`` on a huge or clock-stepped log."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from conftest import TINY, tiny_overrides
from foldhpc.config import load_config
from foldhpc.monitor import status as status_mod
from foldhpc.train.loop import Trainer


class Records(logging.Handler):
    """Every record of the ``foldhpc`` logger (it does not propagate, so caplog sees nothing)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, level: int = logging.WARNING) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= level]


@pytest.fixture
def records():
    h = Records()
    logger = logging.getLogger("foldhpc")
    logger.addHandler(h)
    yield h
    logger.removeHandler(h)


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
    assert mode(run) == status_mod.PRIVATE_DIR_MODE == 0o750
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
