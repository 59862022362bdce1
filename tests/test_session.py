"""foldhpc.Session: a user's own loop (examples/own_loop.py) gets exact resume, signals, the run lock.

The signal and the kill run the example script in a subprocess (they are the point); the rest runs in-process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import foldhpc
from foldhpc.checkpoint import CheckpointManager
from foldhpc.config import Config
from foldhpc.resilience.runlock import RunDirLocked
from foldhpc.session import StatesMismatch

from conftest import ROOT, read_json, wait_for

EXAMPLE = ROOT / "examples" / "own_loop.py"
N = 6000  # steps of the example: ~2 s on this machine, so a signal or a kill lands mid-run
EVERY = 500


def _config(tmp: Path) -> Path:
    path = tmp / "session.toml"
    path.write_text(f"[checkpoint]\nevery_steps = {EVERY}\nkeep_last = 2\n")
    return path


def _start(run_dir: Path, steps: int, config: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")  # the same thread count in every run: the same bits
    return subprocess.Popen([sys.executable, str(EXAMPLE), str(run_dir), str(steps), str(config)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(p: subprocess.Popen[str]) -> tuple[int, str]:
    out, _ = p.communicate(timeout=120)
    return p.returncode, out


def _committed(run_dir: Path) -> bool:
    events = run_dir / "events.jsonl"
    return events.is_file() and '"kind":"checkpoint_committed"' in events.read_text()


def _latest(run_dir: Path) -> Any:
    loaded = CheckpointManager(run_dir / "checkpoints").load_latest()
    assert loaded is not None, f"no checkpoint in {run_dir}"
    return loaded


def _assert_same(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _assert_bit_identical(run: Path, ref: Path) -> None:
    got, want = _latest(run), _latest(ref)
    assert got.entry.step == want.entry.step == N
    assert got.entry.digest == want.entry.digest  # model + optimizer, as `foldhpc checkpoints` shows it
    for key in ("model", "optimizer", "scheduler"):
        _assert_same(got.state[key], want.state[key], key)
    # torch's generator (dropout) is seeded by the script; python's and numpy's start from the OS's
    # entropy in every process and the script draws nothing from them, so theirs are not comparable
    _assert_same(got.state["foldhpc"]["rng"]["torch"], want.state["foldhpc"]["rng"]["torch"], "rng/torch")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example run to N steps without interruption."""
    tmp = tmp_path_factory.mktemp("session-ref")
    rc, out = _finish(_start(tmp / "run", N, _config(tmp)))
    assert rc == 0, out
    return tmp / "run"


def test_example_resumes_bit_exactly_after_sigusr1(tmp_path: Path, reference: Path) -> None:
    run, cfg = tmp_path / "run", _config(tmp_path)
    p = _start(run, N, cfg)
    wait_for(lambda: _committed(run) or p.poll() is not None, "a first checkpoint", timeout=60, poll=0.02)
    p.send_signal(signal.SIGUSR1)
    rc, out = _finish(p)
    assert rc == 75, out
    status = read_json(run / "status.json")
    assert status["state"] == "checkpointed" and status["signal"] == "SIGUSR1"
    stopped = _latest(run).entry
    assert stopped.reason == "signal:SIGUSR1" and EVERY <= stopped.step < N
    assert status["step"] == stopped.step
    rc, out = _finish(_start(run, N, cfg))
    assert rc == 0, out
    assert read_json(run / "status.json")["state"] == "completed"
    kinds = [json.loads(line)["kind"] for line in (run / "events.jsonl").read_text().splitlines()]
    for kind in ("process_start", "signal", "checkpoint_durable", "checkpointed", "resumed", "completed"):
        assert kind in kinds, kind
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))  # run.log_scalars drew the curves
    _assert_bit_identical(run, reference)


def test_example_resumes_bit_exactly_after_sigkill(tmp_path: Path, reference: Path) -> None:
    run, cfg = tmp_path / "run", _config(tmp_path)
    p = _start(run, N, cfg)
    wait_for(lambda: _committed(run) or p.poll() is not None, "a first checkpoint", timeout=60, poll=0.02)
    p.kill()
    rc, out = _finish(p)
    assert rc == -signal.SIGKILL, out
    assert read_json(run / "status.json")["state"] == "running"  # killed: nothing recorded the end
    assert _latest(run).entry.step < N
    rc, out = _finish(_start(run, N, cfg))  # the dead holder's lock is taken over (same host, pid gone)
    assert rc == 0, out
    _assert_bit_identical(run, reference)


# ---------------------------------------------------------------------------------------- in-process

def _states(seed: int = 0, width: int = 8) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = nn.Linear(4, width)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return {"model": model, "optimizer": opt}


def _train(run: Any, states: dict[str, Any], total: int, signal_at: int | None = None) -> None:
    model, opt = states["model"], states["optimizer"]
    for step in run.steps(total):
        loss = model(torch.full((2, 4), float(step))).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        run.wait_staged()
        opt.step()
        if step == signal_at:
            os.kill(os.getpid(), signal.SIGUSR1)


def test_signal_in_process_stops_at_the_next_boundary_and_resume_continues(tmp_path: Path) -> None:
    states = _states()
    with foldhpc.Session(tmp_path / "run", states=states) as run:
        _train(run, states, 10, signal_at=3)
    assert run.exit_code == 75 and run.step == 4  # step 3 was done: its checkpoint holds 4 steps
    assert _latest(tmp_path / "run").entry.step == 4
    again = _states(seed=1)  # different weights: the checkpoint's must win
    with foldhpc.Session(tmp_path / "run", states=again) as run2:
        assert run2.step == 4 and run2.restarts == 1
        assert torch.equal(again["model"].weight, states["model"].weight)
        _train(run2, again, 10)
    assert run2.exit_code == 0 and _latest(tmp_path / "run").entry.step == 10


def test_saves_every_n_steps_on_the_timer_and_at_the_end(tmp_path: Path) -> None:
    cfg = Config()
    cfg.checkpoint.every_steps, cfg.checkpoint.keep_last, cfg.checkpoint.async_save = 2, 10, False
    states = _states()
    with foldhpc.Session(tmp_path / "steps", states=states, config=cfg) as run:
        _train(run, states, 5)
    entries = CheckpointManager(tmp_path / "steps" / "checkpoints").entries()
    assert [(e.step, e.reason) for e in entries] == [(2, "steps"), (4, "steps"), (5, "final")]

    cfg.checkpoint.every_steps, cfg.checkpoint.interval = 0, "0.1s"
    states = _states()
    with foldhpc.Session(tmp_path / "timer", states=states, config=cfg) as run:
        for _ in run.steps(4):
            time.sleep(0.06)
    reasons = [e.reason for e in CheckpointManager(tmp_path / "timer" / "checkpoints").entries()]
    assert reasons[-1] == "final" and "timer" in reasons[:-1]


def test_a_states_value_without_state_dict_is_refused_naming_its_key(tmp_path: Path) -> None:
    states = _states()
    with pytest.raises(TypeError, match=r"states\['batches'\].*state_dict"):
        foldhpc.Session(tmp_path / "run", states={**states, "batches": [1, 2, 3]})
    with pytest.raises(TypeError, match=r"states\['loader'\].*load_state_dict"):
        foldhpc.Session(tmp_path / "run", states={**states, "loader": type("Half", (), {"state_dict": dict})()})
    assert not (tmp_path / "run").exists()  # refused before anything is written


def _files(ckpt_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(ckpt_dir.iterdir()) if p.is_file()}


def test_a_checkpoint_whose_keys_do_not_match_is_refused_and_nothing_is_overwritten(tmp_path: Path) -> None:
    states = _states()
    with foldhpc.Session(tmp_path / "run", states=states) as run:
        _train(run, states, 3)
    before = _files(tmp_path / "run" / "checkpoints")

    other = _states(seed=1)
    untouched = other["model"].weight.detach().clone()
    sched = torch.optim.lr_scheduler.StepLR(other["optimizer"], step_size=1)
    with pytest.raises(StatesMismatch, match=r"missing from the checkpoint: 'scheduler'; in the checkpoint but not in states: 'optimizer'"):
        with foldhpc.Session(tmp_path / "run", states={"model": other["model"], "scheduler": sched}) as run:
            pytest.fail("entered a session on a mismatched checkpoint")
    assert torch.equal(other["model"].weight, untouched)  # nothing loaded

    wide = _states(seed=1, width=16)  # the same keys, a tensor of another shape
    with pytest.raises(StatesMismatch, match=r"states\['model'\]\.load_state_dict\(\) refused"):
        with foldhpc.Session(tmp_path / "run", states=wide):
            pass
    assert _files(tmp_path / "run" / "checkpoints") == before  # nothing written, nothing pruned
    assert read_json(tmp_path / "run" / "status.json")["state"] == "failed"


def test_a_second_session_on_a_live_run_directory_is_refused(tmp_path: Path) -> None:
    states = _states()
    with foldhpc.Session(tmp_path / "run", states=states) as run:
        with pytest.raises(RunDirLocked):
            with foldhpc.Session(tmp_path / "run", states=_states(seed=1), config=Config()):
                pytest.fail("two sessions hold one run directory")
        _train(run, states, 2)
    assert run.exit_code == 0 and _latest(tmp_path / "run").entry.step == 2


def test_a_session_on_a_run_directory_another_process_trains_in_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    p = _start(run, N, _config(tmp_path))
    try:
        wait_for(lambda: _committed(run) or p.poll() is not None, "the example training", timeout=60, poll=0.02)
        assert p.poll() is None, "the example ended before the test could try its run directory"
        with pytest.raises(RunDirLocked, match=rf"pid {p.pid}\b"):
            with foldhpc.Session(run, states=_states()):
                pytest.fail("two processes hold one run directory")
    finally:
        p.kill()
        _finish(p)


def test_import_foldhpc_stays_torch_free() -> None:
    code = "import sys, foldhpc; assert 'torch' not in sys.modules, 'torch imported'; print(foldhpc.__version__)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    from foldhpc.session import Session

    assert foldhpc.Session is Session
