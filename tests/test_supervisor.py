"""In-allocation restarts and the hang watchdog (foldhpc.resilience.supervisor), with real processes.

Faults come from foldhpc.faults (env vars). ``FOLDHPC_FAIL_ONCE`` makes a fault transient: the
restarted trainer passes the step, and the run must end bit for bit like one that never failed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ROOT, TINY, foldhpc_cmd, read_json, set_args
from foldhpc.checkpoint.manager import CheckpointManager
from foldhpc.config import load_config
from foldhpc.train.loop import Trainer
from foldhpc.records.fsio import pid_alive
from test_resume import STEPS, assert_identical, overrides, wait_for_log

FAST = {"checkpoint.every_steps": 10, "fault.restart_backoff": "0.2s"}


def cmd(run: Path, *flags: str, **extra: object) -> list[str]:
    return foldhpc_cmd("train", "--config", str(TINY), *set_args(overrides(run, **{**FAST, **extra})), "--supervise",
                       *flags)


def start(run: Path, env: dict[str, str] | None = None, *flags: str, **extra: object) -> subprocess.Popen:
    return subprocess.Popen(cmd(run, *flags, **extra), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, **(env or {})))


def run_to_end(run: Path, env: dict[str, str] | None = None, timeout: float = 300, **extra: object):
    return subprocess.run(cmd(run, **extra), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


def final(run: Path) -> tuple[dict, str]:
    loaded = CheckpointManager(run / "checkpoints").load_latest()
    assert loaded.entry.step == STEPS
    return loaded.state, loaded.entry.digest


def events(run: Path) -> list[dict]:
    import json

    path = run / "jobs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same training, uninterrupted and unsupervised, in-process (a supervisor changes no
    number: that is what the tests below check)."""
    run = tmp_path_factory.mktemp("sref") / "run"
    assert Trainer(load_config(TINY, overrides(run, **FAST))).run().state == "completed"
    return final(run)


@pytest.mark.parametrize("kind", ["exception", "segfault", "kill"])
def test_crash_restarts_in_place_and_ends_bit_exact(tmp_path, reference, kind):
    ref_state, ref_digest = reference
    run = tmp_path / "run"
    p = run_to_end(run, {"FOLDHPC_FAIL_AT_STEP": "25", "FOLDHPC_FAIL_KIND": kind,
                         "FOLDHPC_FAIL_ONCE": str(tmp_path / "fired")})
    assert p.returncode == 0, p.stderr[-3000:]
    state, digest = final(run)
    assert_identical(state, ref_state)
    assert digest == ref_digest
    restarted = [e for e in events(run) if e["event"] == "restarted"]
    want = {"exception": "exit status 1", "segfault": "killed by SIGSEGV", "kill": "killed by SIGKILL"}[kind]
    assert [(e["attempt"], e["reason"]) for e in restarted] == [(1, f"trainer {want}")]
    st = read_json(run / "status.json")
    assert st["state"] == "completed" and st["in_job_restarts"] == 1
    log = (run / "train.log").read_text()
    assert "resumed from" in log and "step_00000020.ckpt" in log  # from the newest good checkpoint


def test_sigkill_of_the_trainer_from_outside_is_restarted(tmp_path, reference):
    ref_state, ref_digest = reference
    run = tmp_path / "run"
    proc = start(run)
    wait_for_log(run, r"checkpoint step 10 saved", proc)
    trainer = read_json(run / "status.json")["pid"]
    assert trainer != proc.pid  # the trainer is the supervisor's child
    os.kill(trainer, signal.SIGKILL)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    state, digest = final(run)
    assert_identical(state, ref_state)
    assert digest == ref_digest


def test_deterministic_failure_stops_after_the_second_time(tmp_path):
    run = tmp_path / "run"
    p = run_to_end(run, {"FOLDHPC_FAIL_AT_STEP": "15"})
    assert p.returncode == 1
    st = read_json(run / "status.json")
    assert st["state"] == "failed" and st["in_job_restarts"] == 1
    assert "injected failure at step 15" in st["error"] and "deterministic" in st["error"]
    assert [e["event"] for e in events(run)] == ["restarted", "gave_up"]


def test_restart_budget_is_bounded(tmp_path):
    run = tmp_path / "run"
    p = run_to_end(run, {"FOLDHPC_FAIL_AT_STEP": "15"}, **{"fault.max_restarts": 0})
    assert p.returncode == 1
    assert "restarts used up: 0 of fault.max_restarts = 0" in read_json(run / "status.json")["error"]


def test_hung_trainer_is_detected_dumped_and_restarted(tmp_path, reference):
    ref_state, ref_digest = reference
    run = tmp_path / "run"
    t0 = time.monotonic()
    p = run_to_end(run, {"FOLDHPC_FAIL_AT_STEP": "25", "FOLDHPC_FAIL_KIND": "stop",  # SIGSTOP: no more beats
                         "FOLDHPC_FAIL_ONCE": str(tmp_path / "fired")}, **{"fault.hang_timeout": "3s"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert time.monotonic() - t0 < 120
    state, digest = final(run)
    assert_identical(state, ref_state)
    assert digest == ref_digest
    (restarted,) = [e for e in events(run) if e["event"] == "restarted"]
    assert restarted["reason"].startswith("hung at step 25 in train: no heartbeat for")
    stacks = (run / "stacks.log").read_text()
    assert "Current thread" in stacks or "Thread 0x" in stacks  # faulthandler's dump of the stopped trainer
    assert "foldhpc/faults.py" in stacks


def test_slow_but_beating_trainer_is_never_killed(tmp_path):
    """Steps of 1.2 s (3.6 s in all) and validations (at steps 0 and 3) of 2 x 1.2 s, with a fixed
    2 s hang timeout: every step and every validation batch beats, so nothing is ever silent for 2 s."""
    run = tmp_path / "run"
    p = run_to_end(run, {"FOLDHPC_DEBUG_STEP_DELAY_S": "1.2", "FOLDHPC_DEBUG_VAL_BATCH_DELAY_S": "1.2"},
                   **{"fault.hang_timeout": "2s", "train.max_steps": 3, "train.val_every": 3,
                      "train.val_max_samples": 2, "train.batch_size": 1})
    assert p.returncode == 0, p.stderr[-3000:]
    assert read_json(run / "status.json")["in_job_restarts"] == 0
    assert not [e for e in events(run) if e["event"] == "restarted"]


def test_signal_during_the_restart_backoff_is_honoured(tmp_path):
    run = tmp_path / "run"
    proc = start(run, {"FOLDHPC_FAIL_AT_STEP": "15"}, **{"fault.restart_backoff": "20s"})
    deadline = time.monotonic() + 120
    while not any(e["event"] == "restarted" for e in events(run)):
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=60) == 75  # requeue me: the newest checkpoint (step 10) is durable
    assert time.monotonic() - t0 < 5
    assert CheckpointManager(run / "checkpoints").load_latest().entry.step == 10


def test_two_ranks_restart_together_after_one_is_killed(tmp_path, tmp_path_factory):
    from test_distributed import cmd as dcmd, final as dfinal, two_rank_reference

    run = tmp_path / "run"
    _, ref_state, ref_digest = two_rank_reference(tmp_path_factory)  # test_distributed's, when it ran first
    proc = subprocess.Popen(dcmd(run, 2, **{"checkpoint.every_steps": 10, "fault.restart_backoff": "0.2s"}),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_log(run, r"checkpoint step 10 saved", proc)
    rank1 = read_json(run / "ranks" / "rank-1.json")["pid"]
    os.kill(rank1, signal.SIGKILL)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    state, digest = dfinal(run)
    assert_identical(state, ref_state)
    assert digest == ref_digest
    (restarted,) = [e for e in events(run) if e["event"] == "restarted"]
    assert restarted["rank"] == 1 and restarted["reason"] == "trainer killed by SIGKILL"
    assert not pid_alive(rank1)


def test_nonfinite_failure_is_not_restarted(tmp_path):
    """The non-finite guard has already rolled back and replayed: a restart could only repeat it."""
    run = tmp_path / "run"
    p = run_to_end(run, {"FOLDHPC_NAN_AT_STEPS": "12-14"})
    assert p.returncode == 1
    st = read_json(run / "status.json")
    assert st["state"] == "failed" and st["error"].startswith("NonFiniteError") and "cannot cure it" in st["error"]
    assert [e["event"] for e in events(run)] == ["gave_up"]  # no restart
