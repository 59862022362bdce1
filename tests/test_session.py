"""foldhpc.Session: a user's own loop (examples/own_loop.py) gets exact resume, signals, the run lock.

The signal and the kill run the example script in a subprocess (they are the point); the rest runs in-process.
"""

from __future__ import annotations

import copy
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
from foldhpc.checkpoint import CheckpointError, CheckpointManager
from foldhpc.config import Config
from foldhpc.resilience.runlock import RunDirLocked
from foldhpc.session import StatesMismatch

from conftest import ROOT, read_json, wait_for, assert_same_state, latest_checkpoint

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


_latest, _assert_same = latest_checkpoint, assert_same_state


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
    # goodput counts the session's steps from its own records: every step once as productive, the
    # steps the kill lost (beyond the checkpoint the second start resumed from) as recomputed
    from foldhpc.monitor.goodput import goodput_of
    from foldhpc.records.events import read_events

    events, _ = read_events(run)
    killed_at = max(e["step"] for e in events if e.kind == "progress" and e.t < min(
        e2.t for e2 in events if e2.kind == "resumed"))
    resumed = next(e["step"] for e in events if e.kind == "resumed")
    g = goodput_of(run, use_sacct=False)
    assert g.steps["productive"] == N and g.steps["recomputed"] >= killed_at - resumed > 0, (g.steps, g.notes)
    assert not [n for n in g.notes if "skipped" in n], g.notes


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


def _steps_of(run_dir: Path) -> list[tuple[int, str]]:
    return [(e.step, e.reason) for e in CheckpointManager(run_dir / "checkpoints").entries()]


def test_resume_never_starts_afresh_and_keeps_the_old_checkpoints_aside(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    states = _states()
    with foldhpc.Session(run_dir, states=states) as run:
        _train(run, states, 3)
    old = _latest(run_dir).path
    old_bytes = old.read_bytes()
    fresh = _states(seed=1)
    start = fresh["model"].weight.detach().clone()
    with foldhpc.Session(run_dir, states=fresh, resume="never") as run:
        assert run.step == 0 and run.restarts == 0 and run.resumed_from is None
        assert torch.equal(fresh["model"].weight, start)  # nothing loaded
        _train(run, fresh, 2)
    assert _steps_of(run_dir) == [(2, "final")]
    aside = [d for d in (run_dir / "checkpoints").iterdir() if d.is_dir() and d.name.startswith("old-")]
    assert len(aside) == 1 and (aside[0] / old.name).read_bytes() == old_bytes  # kept, whole


def test_resume_path_goes_back_to_that_checkpoint_and_makes_it_the_newest(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = Config()
    cfg.checkpoint.every_steps, cfg.checkpoint.keep_last, cfg.checkpoint.async_save = 2, 10, False
    states = _states()
    with foldhpc.Session(run_dir, states=states, config=cfg) as run:
        _train(run, states, 6)
    at_2 = next(e for e in CheckpointManager(run_dir / "checkpoints").entries() if e.step == 2)
    back = _states(seed=1)
    with foldhpc.Session(run_dir, states=back, config=cfg, resume=run_dir / "checkpoints" / at_2.file) as run:
        assert run.step == 2 and run.resumed_from == run_dir / "checkpoints" / at_2.file
    # left at once, without a step: the chosen state was committed as the newest checkpoint, so
    # a restart (which resumes from the newest) continues the chosen line, not the abandoned one
    assert _steps_of(run_dir)[-1] == (2, "resume-choice")
    again = _states(seed=2)
    with foldhpc.Session(run_dir, states=again, config=cfg) as run:
        assert run.step == 2
        _train(run, again, 6)
    ref = _states()
    with foldhpc.Session(tmp_path / "ref", states=ref, config=cfg) as run:
        _train(run, ref, 6)
    _assert_same(_latest(run_dir).state["model"], _latest(tmp_path / "ref").state["model"], "model")


def test_resume_choices_apply_to_the_first_start_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A restart by `foldhpc supervise` replays the same command: resume="never" there would throw
    the run's work away, a path would go back to the old file again."""
    run_dir = tmp_path / "run"
    states = _states()
    with foldhpc.Session(run_dir, states=states) as run:
        _train(run, states, 3)
    monkeypatch.setenv("FOLDHPC_RESTART_INFO", json.dumps({"in_job_restarts": 1, "last_failure": None}))
    for choice in ("never", str(tmp_path / "nowhere.ckpt")):
        with foldhpc.Session(run_dir, states=_states(seed=1), resume=choice) as run:
            assert run.step == 3 and run.restarts == 1
    assert [d for d in (run_dir / "checkpoints").iterdir() if d.is_dir()] == []  # nothing moved aside


def test_a_resume_path_that_is_not_a_checkpoint_is_a_user_error_and_nothing_is_written(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    states = _states()
    with foldhpc.Session(run_dir, states=states) as run:
        _train(run, states, 3)
    before = _files(run_dir / "checkpoints")
    with pytest.raises(CheckpointError, match=r"resume='.*nowhere\.ckpt': no such checkpoint file"):
        with foldhpc.Session(run_dir, states=_states(seed=1), resume=tmp_path / "nowhere.ckpt"):
            pytest.fail("entered a session on a missing checkpoint")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    session = foldhpc.Session(run_dir, states=_states(seed=1), resume=junk)
    with pytest.raises(CheckpointError, match="junk.ckpt"):
        with session:
            pytest.fail("entered a session on a file that is not a checkpoint")
    assert session.exit_code == 2  # the user's to fix: a supervisor does not retry it
    assert _files(run_dir / "checkpoints") == before
    with pytest.raises(TypeError, match=r"resume=3: expected"):
        foldhpc.Session(run_dir, states=_states(), resume=3)  # type: ignore[arg-type]


def test_import_foldhpc_stays_torch_free() -> None:
    code = "import sys, foldhpc; assert 'torch' not in sys.modules, 'torch imported'; print(foldhpc.__version__)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    from foldhpc.session import Session

    assert foldhpc.Session is Session


# ---------------------------------------------------------------------------------------- StepBatches

def _indices_in_a_fresh_process(n: int, batch: int, seed: int, steps: list[int]) -> list[list[int]]:
    code = ("import json, sys; from foldhpc.session import StepBatches; "
            f"b = StepBatches(list(range({n})), {batch}, seed={seed}); "
            f"print(json.dumps([b.indices(s) for s in {steps!r}]))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    return list(json.loads(p.stdout))


def test_step_batches_are_a_pure_function_of_seed_and_step_and_cover_each_epoch() -> None:
    from foldhpc.data.dataset import StepSampler, TrainBatches
    from foldhpc.session import StepBatches

    n, b = 24, 4
    data = [torch.full((3,), float(i)) for i in range(n)]
    batches = StepBatches(data, b, seed=7)
    steps = [0, 1, 5, 6, 13, 1000]
    here = [batches.indices(s) for s in steps]
    assert here == _indices_in_a_fresh_process(n, b, 7, steps)  # no state: another process draws the same
    assert here == [StepBatches(data, b, seed=7).indices(s) for s in steps]  # nor call order
    assert here != [StepBatches(data, b, seed=8).indices(s) for s in steps]
    assert batches.indices(0) != batches.indices(1)
    for epoch in range(3):  # every index once per epoch, in another order each epoch
        drawn = [i for s in range(epoch * n // b, (epoch + 1) * n // b) for i in batches.indices(s)]
        assert sorted(drawn) == list(range(n))
        assert batches.epoch_of(epoch * n // b) == epoch
    assert batches.indices(0) + batches.indices(1) != batches.indices(6) + batches.indices(7)
    records = TrainBatches(data, b, 1, 7)  # type: ignore[arg-type]  # only len() of the records is read
    assert here == [records.indices(s) for s in steps]  # the built-in trainer's stream, not a second one
    x = batches[5]  # default_collate: the step's samples stacked
    assert torch.equal(x, torch.stack([data[i] for i in batches.indices(5)]))

    assert batches.num_samples == n
    loader: Any = torch.utils.data.DataLoader(batches, sampler=StepSampler(3, 7), batch_size=None)  # type: ignore[arg-type]
    for step, got in zip(range(3, 7), loader, strict=True):  # a DataLoader over steps, as the trainer's
        assert torch.equal(got, batches[step])

    halves = [StepBatches(data, b, seed=7, rank=r, world_size=2) for r in (0, 1)]
    assert halves[0].indices(5) + halves[1].indices(5) == batches.indices(5)  # ranks split the global batch
    with pytest.raises(ValueError, match="world_size"):
        StepBatches(data, 3, seed=7, rank=0, world_size=2)
    with pytest.raises(ValueError, match="empty"):
        StepBatches([], 3, seed=7)
    with pytest.raises(IndexError, match="step"):
        batches.indices(-1)


def test_run_batches_resume_with_the_same_indices_seeded_from_train_seed(tmp_path: Path) -> None:
    data = torch.utils.data.TensorDataset(torch.arange(40.0).reshape(20, 2), torch.arange(20))
    cfg = Config()
    cfg.train.seed = 3

    def loop(total: int, signal_at: int | None = None) -> tuple[Any, list[list[int]]]:
        states = _states()
        seen: list[list[int]] = []
        with foldhpc.Session(tmp_path / "run", states=states, config=cfg) as run:
            batches = run.batches(data, 5)
            for step in run.steps(total):
                x, idx = batches[step]  # TensorDataset + default_collate: (features, labels)
                assert torch.equal(x, data.tensors[0][idx])
                seen.append(idx.tolist())
                run.wait_staged()
                if step == signal_at:
                    os.kill(os.getpid(), signal.SIGUSR1)
        return run, seen

    run, first = loop(12, signal_at=4)
    assert run.exit_code == 75 and len(first) == 5
    run, rest = loop(12)
    assert run.restarts == 1 and len(rest) == 7
    from foldhpc.session import StepBatches

    reference = StepBatches(data, 5, seed=3)
    assert first + rest == [reference.indices(s) for s in range(12)]  # resumed at step 5 with step 5's batch
    assert first + rest != [StepBatches(data, 5, seed=0).indices(s) for s in range(12)]


# ---------------------------------------------------------------------------------------- capture at the boundary

class _ManySmall:
    """A state of many small tensors, listed before the model: staging them on the writer thread takes
    long enough that the loop's next forward pass runs first (what a slow host or a big state does)."""

    def __init__(self, count: int = 4000) -> None:
        self.tensors = {f"t{i}": torch.zeros(1) for i in range(count)}

    def state_dict(self) -> dict[str, Any]:
        return dict(self.tensors)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tensors = dict(state_dict)


def _bn_states() -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return {"padding": _ManySmall(), "model": model, "optimizer": opt}


def _bn_train(run: Any, states: dict[str, Any], total: int, signal_at: int | None = None) -> None:
    model, opt = states["model"], states["optimizer"]
    for step in run.steps(total):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(16, 4, generator=g) * (step + 1)  # running statistics move a lot every step
        loss = model(x).pow(2).mean()  # the forward pass updates BatchNorm's running_mean/var in place
        opt.zero_grad()
        loss.backward()
        run.wait_staged()
        opt.step()
        if step == signal_at:
            os.kill(os.getpid(), signal.SIGUSR1)


def _by_step(ckpt_dir: Path) -> dict[int, dict[str, Any]]:
    mgr = CheckpointManager(ckpt_dir)
    return {e.step: mgr.load_file(ckpt_dir / e.file)["state"] for e in mgr.entries()}


def test_background_saves_capture_batchnorm_statistics_at_the_boundary_and_resume_bit_exactly(tmp_path: Path) -> None:
    ref_cfg = Config()
    ref_cfg.checkpoint.every_steps, ref_cfg.checkpoint.keep_last, ref_cfg.checkpoint.async_save = 1, 20, False
    states = _bn_states()
    with foldhpc.Session(tmp_path / "ref", states=states, config=ref_cfg) as run:
        _bn_train(run, states, 12)
    reference = _by_step(tmp_path / "ref" / "checkpoints")  # in place: nothing runs while they are written
    assert sorted(reference) == list(range(1, 13))

    def same_as_reference(saved: dict[int, dict[str, Any]]) -> None:
        for step, state in saved.items():
            for key in ("model", "optimizer"):
                _assert_same(state[key], reference[step][key], f"step {step} {key}")

    cfg = copy.deepcopy(ref_cfg)
    cfg.checkpoint.every_steps, cfg.checkpoint.async_save = 3, True
    states = _bn_states()
    with foldhpc.Session(tmp_path / "run", states=states, config=cfg) as run:
        _bn_train(run, states, 12, signal_at=7)
    assert run.exit_code == 75 and run.step == 8
    entries = CheckpointManager(tmp_path / "run" / "checkpoints").entries()
    assert entries[0].reason == "steps" and entries[0].step == 3  # written while step 3's forward pass ran
    assert entries[-1].reason == "signal:SIGUSR1" and entries[-1].step == 8
    same_as_reference(_by_step(tmp_path / "run" / "checkpoints"))

    states = _bn_states()
    with foldhpc.Session(tmp_path / "run", states=states, config=cfg) as run:
        assert run.step == 8
        _bn_train(run, states, 12)
    assert run.exit_code == 0
    final = _by_step(tmp_path / "run" / "checkpoints")
    assert 12 in final
    same_as_reference(final)


def test_a_capture_state_dict_hook_is_what_a_background_save_writes(tmp_path: Path) -> None:
    class Counter:
        """Changed in place by the loop before wait_staged(): only its hook's copy is safe."""

        def __init__(self) -> None:
            self.count = torch.zeros(4000)  # many small tensors are staged before it (see _ManySmall)
            self.captured = 0

        def state_dict(self) -> dict[str, Any]:
            return {"count": self.count}

        def capture_state_dict(self) -> dict[str, Any]:
            self.captured += 1
            return {"count": self.count.clone()}

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            self.count = state_dict["count"].clone()

    cfg = Config()
    cfg.checkpoint.every_steps, cfg.checkpoint.keep_last = 2, 10
    counter = Counter()
    with foldhpc.Session(tmp_path / "run", states={"padding": _ManySmall(), "counter": counter}, config=cfg) as run:
        for step in run.steps(6):
            counter.count += 1  # before wait_staged(): a background save may be reading it
            run.wait_staged()
    entries = CheckpointManager(tmp_path / "run" / "checkpoints").entries()
    background = [e.step for e in entries if e.reason == "steps"]
    assert background[:1] == [2] and entries[-1].step == 6 and entries[-1].reason == "final"
    assert counter.captured == len(background)  # a blocking save (the final one) captures nothing
    saved = _by_step(tmp_path / "run" / "checkpoints")
    for step, state in saved.items():
        assert torch.equal(state["counter"]["count"], torch.full((4000,), float(step))), step


# ---------------------------------------------------------------------------------------- non-finite guard

def _guarded(run: Any, states: dict[str, Any], total: int) -> list[int]:
    """The in-process loop with the guard; returns the steps whose update was skipped."""
    model, opt = states["model"], states["optimizer"]
    skipped = []
    for step in run.steps(total):
        loss = model(torch.full((2, 4), float(step % 7))).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        gnorm = nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        run.wait_staged()
        if run.check_finite(loss, gnorm):
            opt.step()
        else:
            skipped.append(step + 1)
    return skipped


def _guard_config(every: int = 5) -> Config:
    cfg = Config()
    cfg.checkpoint.every_steps, cfg.checkpoint.keep_last = every, 10
    # saves in place: exactly at the multiples of `every` (a background writer may lag behind a loop of
    # microsecond steps, and the newest checkpoint then holds the streak's first skips)
    cfg.checkpoint.async_save = False
    cfg.fault.nonfinite_rollback = 3
    return cfg


def test_a_non_finite_step_is_skipped_and_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from foldhpc.records.envvars import NAN_AT_STEPS

    monkeypatch.setenv(NAN_AT_STEPS, "7")
    states = _states()
    with foldhpc.Session(tmp_path / "run", states=states, config=_guard_config()) as run:
        skipped = _guarded(run, states, 12)
    assert skipped == [7] and run.exit_code == 0 and run.step == 12
    assert read_json(tmp_path / "run" / "status.json")["nonfinite"]["skipped"] == 1
    # skipped: the same weights as a run that never applied step 7's update
    monkeypatch.delenv(NAN_AT_STEPS)
    ref = _states()
    model, opt = ref["model"], ref["optimizer"]
    for step in range(12):
        loss = model(torch.full((2, 4), float(step % 7))).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if step + 1 != 7:
            opt.step()
    assert torch.equal(ref["model"].weight, states["model"].weight)


def test_a_transient_non_finite_streak_rolls_back_and_replays_bit_for_bit(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from foldhpc.records.envvars import NAN_AT_STEPS, NAN_ONCE

    ref_states = _states()
    with foldhpc.Session(tmp_path / "ref", states=ref_states, config=_guard_config()) as ref:
        assert _guarded(ref, ref_states, 20) == []
    monkeypatch.setenv(NAN_AT_STEPS, "12-14")
    monkeypatch.setenv(NAN_ONCE, str(tmp_path / "nan-once"))  # transient: the replay is clean
    states = _states()
    with foldhpc.Session(tmp_path / "run", states=states, config=_guard_config()) as run:
        skipped = _guarded(run, states, 20)
    assert skipped == [12, 13, 14] and run.exit_code == 0 and run.step == 20
    status = read_json(tmp_path / "run" / "status.json")
    assert status["nonfinite"]["rollbacks"] == [{"first": 12, "at": 14, "to": 10}]
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert kinds.count("nonfinite_skip") == 3 and kinds.count("rollback") == 1
    got, want = _latest(tmp_path / "run"), _latest(tmp_path / "ref")
    assert got.entry.step == want.entry.step == 20
    for key in ("model", "optimizer"):
        _assert_same(got.state[key], want.state[key], key)
    assert got.state["foldhpc"]["nonfinite"]["rollbacks"][0]["to"] == 10  # remembered across a resume


def test_a_deterministic_non_finite_streak_fails_the_run_after_one_rollback(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from foldhpc.records.envvars import NAN_AT_STEPS
    from foldhpc.resilience.nonfinite import NonFiniteError

    monkeypatch.setenv(NAN_AT_STEPS, "7-9")  # every time: the replay hits them again
    states = _states()
    run = foldhpc.Session(tmp_path / "run", states=states, config=_guard_config())
    with pytest.raises(NonFiniteError, match="again after rolling back from step 9 to step 5"):
        with run:
            _guarded(run, states, 20)
    assert run.exit_code == 1
    status = read_json(tmp_path / "run" / "status.json")
    assert status["state"] == "failed" and "deterministic" in status["error"]
    assert _latest(tmp_path / "run").entry.step == 5  # no NaN reached a checkpoint


# ---------------------------------------------------------------------------------------- several ranks

DDP_SCRIPT = """
import sys, time
import torch
from torch import nn
import foldhpc

run_dir, total = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
g = torch.Generator().manual_seed(1)
data = torch.utils.data.TensorDataset(torch.randn(256, 8, generator=g), torch.randn(256, 1, generator=g))
cfg = foldhpc.Config()
cfg.checkpoint.every_steps = 20
with foldhpc.Session(run_dir, states={"model": model, "optimizer": opt}, config=cfg) as run:
    ddp = nn.parallel.DistributedDataParallel(model)   # the session opened the process group
    batches = run.batches(data, batch_size=16)          # this rank's half of each global batch
    for step in run.steps(total):
        x, y = batches[step]
        loss = nn.functional.mse_loss(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        run.wait_staged()
        opt.step()
        time.sleep(0.01)
sys.exit(run.exit_code)
"""
RANKS_N = 150


def _start_ranks(tmp: Path, run_dir: Path, port: int, **extra: str) -> list[subprocess.Popen[str]]:
    script = tmp / "ddp.py"
    script.write_text(DDP_SCRIPT)
    procs = []
    for rank in range(2):
        env = dict(os.environ, OMP_NUM_THREADS="1", RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **extra)
        procs.append(subprocess.Popen([sys.executable, str(script), str(run_dir), str(RANKS_N)], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_ranks_stop_together_on_a_signal_to_one_and_resume_bit_for_bit(tmp_path: Path) -> None:
    """A signal to rank 1 alone: both ranks agree at the next boundary, rank 0 saves, both exit 75;
    the resumed pair ends with the weights of an uninterrupted pair."""
    ref = tmp_path / "ref"
    outs = [_finish(p) for p in _start_ranks(tmp_path, ref, _free_port())]
    assert [rc for rc, _ in outs] == [0, 0], outs
    run = tmp_path / "run"
    procs = _start_ranks(tmp_path, run, _free_port())
    wait_for(lambda: _committed(run) or procs[0].poll() is not None, "a first checkpoint", timeout=90, poll=0.02)
    procs[1].send_signal(signal.SIGUSR1)
    outs = [_finish(p) for p in procs]
    assert [rc for rc, _ in outs] == [75, 75], outs
    stopped = _latest(run).entry
    assert stopped.reason == "signal:SIGUSR1" and stopped.step < RANKS_N
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    signals = {e["rank"]: e for e in events if e["kind"] == "signal"}
    assert signals[0]["from_peer"] is True and signals[1]["from_peer"] is False  # rank 0 heard it from rank 1
    assert signals[0]["step"] == signals[1]["step"] == stopped.step
    outs = [_finish(p) for p in _start_ranks(tmp_path, run, _free_port())]
    assert [rc for rc, _ in outs] == [0, 0], outs
    got, want = _latest(run), _latest(ref)
    assert got.entry.step == want.entry.step == RANKS_N
    assert got.meta["world_size"] == 2
    for key in ("model", "optimizer"):
        _assert_same(got.state[key], want.state[key], key)


def test_a_rank_that_dies_is_named_by_the_survivor(tmp_path: Path) -> None:
    """Rank 1 is SIGKILLed mid-run (as the OOM killer does): rank 0's next collective fails, and
    status.json and the events name rank 1, its node and why, not "a collective failed"."""
    run = tmp_path / "run"
    procs = _start_ranks(tmp_path, run, _free_port(), FOLDHPC_FAIL_AT_STEP="30", FOLDHPC_FAIL_ON_RANK="1",
                         FOLDHPC_FAIL_KIND="kill")
    outs = [_finish(p) for p in procs]
    assert [rc for rc, _ in outs] == [1, -signal.SIGKILL], outs
    status = read_json(run / "status.json")
    assert status["state"] == "failed", status
    [blamed] = status["failed_ranks"]
    assert blamed["rank"] == 1 and blamed["node"] and "died without reporting an error" in blamed["why"], blamed
    assert status["error"].startswith("rank 1 on "), status["error"]
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    [said] = [e for e in events if e["kind"] == "failed_ranks"]
    assert said["rank"] == 0 and [r["rank"] for r in said["ranks"]] == [1]
    records = {r["rank"]: r["state"] for r in (json.loads(f.read_text()) for f in (run / "ranks").glob("rank-*.json"))}
    assert records == {0: "aborted", 1: "running"}  # rank 1 had no chance to write
