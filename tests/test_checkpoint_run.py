"""Checkpointing as a run sees it: bad directories, failed saves, --resume PATH, --verify.

The runs that only make checkpoints to look at train in-process (the Trainer a ``foldhpc train``
process runs, with the resume choice its flags map to; ~0.5 s instead of ~5 s of imports per
process); ``foldhpc checkpoints`` and the run whose directory vanishes mid-run stay real processes.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

from conftest import ROOT, TINY, foldhpc_cmd, read_json, run_foldhpc, set_args, tiny_overrides
from foldhpc.config import load_config
from foldhpc.train.loop import Trainer

FAILED_SAVES_STEPS = 100  # saves at 40, 60, 80 fail in the background while training goes on, then the final one


def test_unusable_checkpoint_dir_fails_at_preflight(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    run = tmp_path / "run"
    p = run_foldhpc("train", "--config", str(TINY),
                    *set_args(tiny_overrides(run, **{"checkpoint.dir": str(blocker / "ckpt")})))
    assert p.returncode == 2  # a user error: one line, no traceback (tests/test_cli_errors.py)
    assert "cannot create checkpoint directory" in p.stderr and "checkpoint.dir" in p.stderr
    assert read_json(run / "status.json")["state"] == "failed"
    assert "step 1/" not in (run / "train.log").read_text()  # found out before training, not after


def test_failed_saves_are_reported_and_earlier_checkpoints_survive(tmp_path):
    """The checkpoint directory vanishes mid-run (think: a scratch filesystem unmounted)."""
    run = tmp_path / "run"
    ckpt = run / "checkpoints"
    proc = subprocess.Popen(foldhpc_cmd("train", "--config", str(TINY), *set_args(tiny_overrides(
        run, **{"train.max_steps": FAILED_SAVES_STEPS, "checkpoint.every_steps": 20, "data.crop_size": 48}))),
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run / "train.log").exists() or "checkpoint step 20 saved" not in (run / "train.log").read_text():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    moved = tmp_path / "moved-checkpoints"
    ckpt.rename(moved)
    ckpt.write_text("the directory is gone")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    log = (run / "train.log").read_text()
    assert "FAILED, previous checkpoint kept" in log  # background failures reported while training went on
    n = FAILED_SAVES_STEPS
    assert re.search(rf"step {n}/{n}", log)  # training itself was not interrupted by failed background saves
    st = read_json(run / "status.json")
    assert st["state"] == "failed" and f"checkpoint at step {n} failed" in st["error"]
    assert f"checkpoint at step {n} failed" in err
    # the checkpoints written before the failure are intact
    (run / "checkpoints").unlink()
    moved.rename(run / "checkpoints")
    p = run_foldhpc("checkpoints", str(run), "--verify", "--json")
    rows = json.loads(p.stdout)
    assert p.returncode == 0 and rows and all(r["verified"] for r in rows)


def _train(run: Path, resume: str = "auto", force_resume: bool = False, **overrides: object) -> int:
    """``foldhpc train`` in-process: ``--resume PATH`` is ``resume=PATH``, ``--no-resume``
    ``resume="never"``; returns the exit code the command would (an exception fails the test)."""
    over = tiny_overrides(run, **{"train.max_steps": 12, "checkpoint.every_steps": 4, "train.val_every": 0,
                                  **overrides})
    return Trainer(load_config(TINY, over), resume=resume, force_resume=force_resume).run().exit_code


def test_resume_from_explicit_path_and_verify_flags_damage(tmp_path):
    run = tmp_path / "run"
    assert _train(run, **{"checkpoint.keep_last": 5}) == 0
    other = tmp_path / "other"
    assert _train(other, resume=str(run / "checkpoints" / "step_00000008.ckpt"), **{"checkpoint.every_steps": 0}) == 0
    assert "at step 8" in (other / "train.log").read_text()
    # damage one file: --verify names it and exits 1
    f = run / "checkpoints" / "step_00000008.ckpt"
    data = bytearray(f.read_bytes())
    data[100] ^= 0xFF
    f.write_bytes(bytes(data))
    p = run_foldhpc("checkpoints", str(run), "--verify")
    assert p.returncode == 1
    assert re.search(r"BAD .*step_00000008\.ckpt.*checksum mismatch", p.stdout), p.stdout
    p = run_foldhpc("checkpoints", str(tmp_path / "nope"))
    assert p.returncode == 2 and "no such run directory" in p.stderr


def test_corrupt_manifest_resumes_from_the_files_and_no_resume_works(tmp_path):
    """Issue 13 items 1-2: a corrupt index loses nothing; --no-resume (the advice) does not crash."""
    run = tmp_path / "run"
    assert _train(run) == 0
    (run / "checkpoints" / "manifest.json").write_text("{ this is not json")
    assert _train(run, force_resume=True, **{"train.max_steps": 16}) == 0  # train on: 4 more steps
    log = (run / "train.log").read_text()
    assert "resumed from" in log and "step_00000012.ckpt" in log  # the newest file, not step 0
    assert "from their own headers" in log
    (run / "checkpoints" / "manifest.json").write_text("{ corrupt again")
    assert _train(run, resume="never", **{"train.max_steps": 16}) == 0  # an exception would fail the test
    aside = list(tmp_path.glob("run/checkpoints/old-*"))  # moved inside it, by rename
    assert len(aside) == 1 and (aside[0] / "step_00000016.ckpt").is_file()  # moved aside, not deleted


def test_checkpoints_command_works_from_any_directory(tmp_path, monkeypatch):
    """Issue 13 item 3: a run trained with a relative run.dir is listed from elsewhere by its path."""
    work = tmp_path / "work"
    work.mkdir()
    with monkeypatch.context() as m:
        m.chdir(work)
        assert _train(Path("runs/rel")) == 0
    run = work / "runs" / "rel"
    assert (run / "checkpoints").is_dir()
    p = run_foldhpc("checkpoints", str(run), "--verify", "--json")  # cwd is the repository, not work/
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)
    assert [r["step"] for r in rows] == [4, 8, 12] and all(r["verified"] for r in rows)
    # damage one: --verify says so and exits 1
    ck = run / "checkpoints" / "step_00000008.ckpt"
    data = bytearray(ck.read_bytes())
    data[len(data) // 2] ^= 0x04
    ck.write_bytes(bytes(data))
    p = run_foldhpc("checkpoints", str(run), "--verify")
    assert p.returncode == 1 and "BAD" in p.stdout and "checksum mismatch" in p.stdout
