"""CUDA paths: bit-exact resume on a GPU (deterministic, bf16 autocast, torch.compile), a signal
during an async save, pinned staging. Skipped without a CUDA GPU; benchmarks/gpu_check.sh runs
them on one and records the result."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY, foldhpc_cmd, read_json, set_args, tiny_overrides
from foldhpc.checkpoint.manager import CheckpointManager

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

STEPS = 40


def _over(run: Path, **extra: object) -> list[str]:
    return tiny_overrides(run, **{"train.device": "cuda", "train.max_steps": STEPS, "train.val_every": 0,
                                  "model.dropout": 0.1, **extra})


def _train(run: Path, env: dict[str, str] | None = None, **extra: object) -> subprocess.Popen:
    return subprocess.Popen(foldhpc_cmd("train", "--config", str(TINY), *set_args(_over(run, **extra))), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, **(env or {})))


def _wait_log(run: Path, pattern: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        log = run / "train.log"
        if log.exists() and re.search(pattern, log.read_text()):
            return
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"timed out waiting for {pattern!r}")


def _digest(run: Path) -> str:
    loaded = CheckpointManager(run / "checkpoints").load_latest()
    assert loaded is not None and loaded.entry.step == STEPS
    return loaded.entry.digest


def _interrupted_equals_uninterrupted(tmp_path: Path, env: dict[str, str] | None = None, **extra: object) -> None:
    ref = tmp_path / "ref"
    p = _train(ref, env, **extra)
    assert p.wait(timeout=600) == 0, p.stderr.read()[-3000:]
    run = tmp_path / "run"
    p = _train(run, env, **extra)
    _wait_log(run, r"step 17/", p)
    p.send_signal(signal.SIGUSR1)
    assert p.wait(timeout=600) == 75, p.stderr.read()[-3000:]
    assert 17 <= read_json(run / "status.json")["step"] < STEPS
    p = _train(run, env, **extra)
    assert p.wait(timeout=600) == 0, p.stderr.read()[-3000:]
    assert _digest(run) == _digest(ref)


def test_resume_is_bit_exact_on_gpu_deterministic(tmp_path):
    _interrupted_equals_uninterrupted(tmp_path)


def test_resume_is_bit_exact_with_bf16_autocast(tmp_path):
    _interrupted_equals_uninterrupted(tmp_path, **{"train.amp": True})


def test_resume_is_bit_exact_with_compile(tmp_path):
    _interrupted_equals_uninterrupted(tmp_path, **{"train.compile": True})


def test_signal_during_async_save_on_gpu(tmp_path):
    """A write slowed to 2 s is provably in flight when SIGUSR1 arrives; the run still resumes exactly."""
    env = {"FOLDHPC_DEBUG_WRITE_DELAY_S": "2"}
    ref = tmp_path / "ref"
    p = _train(ref, **{"checkpoint.every_steps": 10})
    assert p.wait(timeout=600) == 0
    run = tmp_path / "run"
    p = _train(run, env, **{"checkpoint.every_steps": 10})
    _wait_log(run, r"checkpoint step 10: staging and writing in the background", p)
    p.send_signal(signal.SIGUSR1)
    assert p.wait(timeout=600) == 75, p.stderr.read()[-3000:]
    log = (run / "train.log").read_text()
    assert "checkpoint step 10 saved" in log  # the in-flight save finished, then the signal save
    steps = [e.step for e in CheckpointManager(run / "checkpoints").entries()]
    assert steps[0] == 10 and steps[-1] == read_json(run / "status.json")["step"] >= 10
    p = _train(run, {}, **{"checkpoint.every_steps": 10})
    assert p.wait(timeout=600) == 0
    assert _digest(run) == _digest(ref)


def test_staging_buffers_are_pinned_and_copies_complete(tmp_path):
    t = torch.randn(4096, 4096, device="cuda")
    m = CheckpointManager(tmp_path, async_save=True)
    m.save(1, {"model": {"w": t}, "optimizer": {}}, {})
    m.wait()
    assert all(b.is_pinned() for b in m._staging.values())
    assert torch.equal(m.load_latest().state["model"]["w"], t.cpu())
