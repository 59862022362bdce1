"""Bit-exact resume: interrupted runs end with exactly the weights of an uninterrupted run.

Each scenario starts ``foldhpc train`` as a subprocess, interrupts it at a point read from its
log (SIGUSR1, SIGTERM or SIGKILL), resumes it in the same run directory, and compares the final
model and optimizer tensors with ``torch.equal`` (zero tolerance) and by state digest.

The interrupted run is a real process (signals, kills); the uninterrupted reference and the
resumed run train in-process with the Trainer a plain ``foldhpc train`` runs (resume "auto"),
which saves ~5 s of imports per run. It is no weaker: the pytest process's global RNG has been
used by other tests (a fresh process starts from torch's fixed default seed), so the resume must
restore every generator to end bit-exact.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT, TINY, foldhpc_cmd, read_json, set_args, tiny_overrides
from foldhpc.checkpoint.manager import CheckpointManager
from foldhpc.config import load_config
from foldhpc.train.loop import Trainer

STEPS = 60
# A slower tiny model (~40 ms/step) so that interruptions land mid-run.
SLOW = {"train.max_steps": STEPS, "data.crop_size": 48, "model.d_pair": 32, "model.n_blocks": 2,
        "train.warmup_steps": 5}


def overrides(run: Path, **extra: object) -> list[str]:
    return tiny_overrides(run, **{**SLOW, **extra})


def start(run: Path, env: dict[str, str] | None = None, **extra: object) -> subprocess.Popen:
    return subprocess.Popen(foldhpc_cmd("train", "--config", str(TINY), *set_args(overrides(run, **extra))),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, **(env or {})))


def wait_for_log(run: Path, pattern: str, proc: subprocess.Popen, timeout: float = 120) -> re.Match:
    deadline = time.monotonic() + timeout
    log = run / "train.log"
    while time.monotonic() < deadline:
        if log.exists():
            m = re.search(pattern, log.read_text())
            if m:
                return m
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited ({proc.returncode}) before {pattern!r}: {proc.stderr.read()}")
        time.sleep(0.005)
    proc.kill()
    raise AssertionError(f"timed out waiting for {pattern!r}")


def finish(run: Path, **extra: object) -> None:
    """Train ``run`` to its end in-process, resuming from its newest good checkpoint (see the module docstring)."""
    result = Trainer(load_config(TINY, overrides(run, **extra)), resume="auto").run()
    assert result.state == "completed" and result.step == STEPS, result


def finish_in_a_process(run: Path, **extra: object) -> None:
    """:func:`finish` as a ``foldhpc train`` process, for runs that fork DataLoader workers (a fork
    of the multi-threaded pytest process could inherit a lock held by another thread)."""
    p = subprocess.run(foldhpc_cmd("train", "--config", str(TINY), *set_args(overrides(run, **extra))),
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]


def final_state(run: Path) -> tuple[dict, str]:
    mgr = CheckpointManager(run / "checkpoints")
    loaded = mgr.load_latest()
    assert loaded.entry.step == STEPS
    return loaded.state, loaded.entry.digest


def assert_identical(a: dict, b: dict) -> None:
    ma, mb = a["model"], b["model"]
    assert ma.keys() == mb.keys()
    for k in ma:
        assert torch.equal(ma[k], mb[k]), f"model tensor {k} differs"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), f"optimizer state {i}/{k} differs"


def last_logged_step(run: Path) -> int:
    return max(int(s) for s in re.findall(rf"step (\d+)/{STEPS} loss", (run / "train.log").read_text()))


def loss_curve(run: Path) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars("train/loss")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    finish(run)
    state, digest = final_state(run)
    return run, state, digest


@pytest.mark.parametrize("sig,at", [
    (signal.SIGUSR1, r"step 3/"),           # early
    (signal.SIGTERM, r"step 27/"),          # mid-epoch, mid-run
    (signal.SIGUSR2, r"step 41/"),          # a configurable signal (submitit's default)
])
def test_signal_saves_at_step_boundary_and_resume_is_bit_exact(tmp_path, reference, sig, at):
    ref_run, ref_state, ref_digest = reference
    run = tmp_path / "run"
    sigs = ["SIGUSR1", "SIGTERM", "SIGUSR2"]
    proc = start(run, **{"checkpoint.signals": sigs})
    wait_for_log(run, at, proc)
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == 75  # checkpointed, please requeue
    st = read_json(run / "status.json")
    assert st["state"] == "checkpointed" and st["signal"] == sig.name
    ckpt = CheckpointManager(run / "checkpoints").load_latest()
    # zero steps lost: the checkpoint holds the last completed step
    assert ckpt.entry.step == last_logged_step(run) == st["step"]
    assert 0 < ckpt.entry.step < STEPS
    assert ckpt.entry.reason == f"signal:{sig.name}"
    finish(run, **{"checkpoint.signals": sigs})
    state, digest = final_state(run)
    assert_identical(state, ref_state)
    assert digest == ref_digest
    assert loss_curve(run) == loss_curve(ref_run)  # TensorBoard: same steps, same values, no duplicates


def test_sigkill_resumes_from_last_durable_checkpoint_and_replays(tmp_path, reference):
    ref_run, ref_state, ref_digest = reference
    run = tmp_path / "run"
    proc = start(run, **{"checkpoint.every_steps": 10})
    m = wait_for_log(run, r"checkpoint step 20 saved", proc)
    assert m
    wait_for_log(run, r"step 24/", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    killed_at = last_logged_step(run)
    durable = CheckpointManager(run / "checkpoints").load_latest().entry.step
    assert durable < killed_at  # steps after it are replayed
    finish(run, **{"checkpoint.every_steps": 10})
    state, digest = final_state(run)
    assert_identical(state, ref_state)
    assert digest == ref_digest
    curve = loss_curve(run)
    steps = [s for s, _ in curve]
    assert steps == sorted(set(steps)) == list(range(1, STEPS + 1))  # no duplicated / out-of-order steps
    assert curve == loss_curve(ref_run)
    assert "resumed from" in (run / "train.log").read_text()
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("run/restarts")] == [(durable, 1.0)]  # restart marker
    assert [e.step for e in acc.Scalars("checkpoint/write_s")]  # checkpoint durations are logged


def test_signal_just_after_timed_save_and_during_async_save(tmp_path, reference):
    """Timed saves every 1 s; a signal right after one is committed, then one while one is in flight.

    In-flight is proven, not hoped for: the second process slows every write by 1 s (the checkpoint
    manager's FOLDHPC_DEBUG_WRITE_DELAY_S hook); the signal is sent after the save has started, and
    when the trainer handles it (after it arrived) it finds that save still in flight and says so.
    """
    _, ref_state, ref_digest = reference
    run = tmp_path / "run"
    proc = start(run, **{"checkpoint.interval": "1s"})
    wait_for_log(run, r"checkpoint step (\d+) saved \(timer", proc)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=120) == 75
    first = read_json(run / "status.json")["step"]
    proc = start(run, env={"FOLDHPC_DEBUG_WRITE_DELAY_S": "1"}, **{"checkpoint.interval": "1s"})
    wait_for_log(run, r"resumed from", proc)
    log_len = len((run / "train.log").read_text())
    # the next background write after the resume: signal it the moment the snapshot is taken
    deadline = time.monotonic() + 60
    while not (m := re.search(r"checkpoint step (\d+): staging and writing in the background",
                              (run / "train.log").read_text()[log_len:])):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.002)
    in_flight_step = int(m.group(1))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 75
    second = read_json(run / "status.json")["step"]
    assert first < in_flight_step <= second < STEPS
    log = (run / "train.log").read_text()[log_len:]
    assert re.search(rf"received SIGTERM: saving a checkpoint at step {second}, then exiting for requeue "
                     r"\(waiting for the background save in flight first\)", log), log[-2000:]
    assert in_flight_step in {e.step for e in CheckpointManager(run / "checkpoints").entries()}  # it committed
    assert CheckpointManager(run / "checkpoints").load_latest().entry.step == second
    finish(run, **{"checkpoint.interval": "1s"})
    state, digest = final_state(run)
    assert_identical(state, ref_state)
    assert digest == ref_digest


def test_synchronous_saves_resume_bit_exact(tmp_path, reference):
    """checkpoint.async_save = false: step saves written on the training thread, then a signal."""
    ref_run, ref_state, ref_digest = reference
    run = tmp_path / "run"
    sync = {"checkpoint.async_save": False, "checkpoint.every_steps": 10}
    proc = start(run, **sync)
    wait_for_log(run, r"step 24/", proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 75
    log = (run / "train.log").read_text()
    assert re.search(r"checkpoint step 20 saved \(steps", log)
    assert "in the background" not in log  # every save really was synchronous
    signal_step = CheckpointManager(run / "checkpoints").load_latest().entry.step
    assert signal_step == last_logged_step(run) >= 24
    finish(run, **sync)
    state, digest = final_state(run)
    assert_identical(state, ref_state)
    assert digest == ref_digest
    assert loss_curve(run) == loss_curve(ref_run)


def test_timed_saves_follow_the_interval(tmp_path, monkeypatch):
    """The tiny model with every step padded to >= 30 ms (the debug hook): 100 steps last >= 3 s
    on any machine, so >= 2 timer saves, however fast the steps themselves are."""
    run = tmp_path / "run"
    monkeypatch.setenv("FOLDHPC_DEBUG_STEP_DELAY_S", "0.03")
    cfg = load_config(TINY, tiny_overrides(run, **{"checkpoint.interval": "1s", "train.max_steps": 100,
                                                   "checkpoint.keep_last": 50}))
    assert Trainer(cfg).run().state == "completed"
    timer = [e for e in CheckpointManager(run / "checkpoints").entries() if e.reason == "timer"]
    assert len(timer) >= 2
    gaps = [b.saved_at - a.saved_at for a, b in zip(timer, timer[1:])]
    assert all(g >= 0.9 for g in gaps), gaps


def test_second_signal_while_saving_changes_nothing(tmp_path, reference):
    _, ref_state, ref_digest = reference
    run = tmp_path / "run"
    proc = start(run)
    wait_for_log(run, r"step 15/", proc)
    proc.send_signal(signal.SIGUSR1)
    wait_for_log(run, r"received SIGUSR1", proc)
    for _ in range(3):
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            break
    assert proc.wait(timeout=120) == 75
    assert CheckpointManager(run / "checkpoints").load_latest().entry.reason == "signal:SIGUSR1"
    finish(run)
    assert final_state(run)[1] == ref_digest


def test_dataloader_workers_survive_the_signal(tmp_path, reference):
    """Signal the whole process group (as Slurm does): workers ignore it, the trainer saves."""
    _, _, ref_digest = reference
    run = tmp_path / "run"
    proc = subprocess.Popen(foldhpc_cmd("train", "--config", str(TINY),
                                        *set_args(overrides(run, **{"data.num_workers": 2}))),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    wait_for_log(run, r"step 10/", proc)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 75, proc.stderr.read()[-2000:]
    finish_in_a_process(run, **{"data.num_workers": 2})
    assert final_state(run)[1] == ref_digest
