"""``<run.dir>/events.jsonl`` (foldhpc.records.events) as the runtime writes it: every event beside
the train.log line that says the same, with the same values, from real trainers and supervisors.

``foldhpc goodput``/``plot`` and ``foldhpc chaos`` read these records instead of the log, so each
test checks an event against what the log line (or status.json, or the checkpoint index) says.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY, foldhpc_cmd, read_json, set_args, tiny_overrides, wait_for
from foldhpc.checkpoint.manager import CheckpointManager
from foldhpc.config import load_config
from foldhpc.records.events import EVENTS_FILE, KINDS, Event, EventLog, read_events
from foldhpc.train.loop import Trainer

STEPS = 20


def kinds_of(events: list[Event], kind: str) -> list[Event]:
    return [e for e in events if e.kind == kind]


def strict_lines(run: Path) -> list[dict]:
    """Every line of events.jsonl as standard JSON (no NaN/Infinity: any parser must read it)."""
    def no_constant(c: str) -> None:
        raise AssertionError(f"non-standard JSON constant {c} in {EVENTS_FILE}")

    return [json.loads(line, parse_constant=no_constant) for line in (run / EVENTS_FILE).read_text().splitlines()]


def train_in_process(run: Path, **extra: object):
    cfg = load_config(TINY, tiny_overrides(run, **{"train.max_steps": STEPS, "run.log_every": 5,
                                                  "checkpoint.every_steps": 10, "checkpoint.keep_last": 1, **extra}))
    return Trainer(cfg).run()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny run of 20 steps (validation at 0, 10 and the end; a background save at step 10, the
    final one at 20, keep_last 1), then started again: it resumes at the end, validates and completes."""
    run = tmp_path_factory.mktemp("events") / "run"
    assert train_in_process(run, **{"train.val_every": 10}).state == "completed"
    assert train_in_process(run, **{"train.val_every": 10}).state == "completed"
    return run


# ---------------------------------------------------------------------------- the trainer
def test_a_tiny_run_writes_each_trainer_event_with_the_log_lines_values(tiny_run):
    run = tiny_run
    events, scan = read_events(run)
    assert scan.bad_lines == scan.unknown_version == scan.unknown_kind == 0
    assert all(e.pid == os.getpid() and e.rank == 0 for e in events)
    log = (run / "train.log").read_text()
    first_start = [i for i, e in enumerate(events) if e.kind == "process_start"]
    assert len(first_start) == 2  # one per start
    one, two = events[:first_start[1]], events[first_start[1]:]

    (ps,) = kinds_of(one, "process_start")
    assert ps["max_steps"] == STEPS and ps["host"] == socket.gethostname() and ps["world_size"] == 1
    assert ps["process_start_t"] <= ps.t and ps.t - ps["process_start_t"] < 3600  # this process's start
    (tr,) = kinds_of(one, "training")
    assert (tr["first"], tr["last"], tr["batch"]) == (0, STEPS, 2)
    (fs,) = kinds_of(one, "first_step")
    assert fs["step"] == 1 and {"imports_s", "data_s", "setup_s", "first_step_s"} <= set(fs["timings"])
    m = re.search(r"first step \(1\) done in ([\d.]+)s; ([\d.]+)s after process start", log)
    assert f"{fs['step_s']:.3f}" == m.group(1) and f"{fs['after_start_s']:.2f}" == m.group(2)

    progress = kinds_of(one, "progress")
    logged = re.findall(r"step (\d+)/20 loss ([\d.]+) lr (\S+) gnorm ([\d.]+) \| ([\d.]+) samples/s, "
                        r"data wait ([\d.]+)%", log)
    assert [e["step"] for e in progress] == [int(s) for s, *_ in logged] == [5, 10, 15, 20]
    for e, (_, loss, lr, gnorm, sps, wait) in zip(progress, logged):
        assert (f"{e['loss']:.4f}", f"{e['lr']:.2e}", f"{e['grad_norm']:.3f}") == (loss, lr, gnorm)
        assert f"{e['samples_per_s']:.1f}" == sps and f"{100 * e['data_wait_frac']:.1f}" == wait
        assert e["max_steps"] == STEPS and e["steps"] == 5

    assert [e["step"] for e in kinds_of(one, "validation_start")] == [0, 10, 20]
    ends = kinds_of(one, "validation_end")
    assert [(e["step"], e["stopped"]) for e in ends] == [(0, False), (10, False), (20, False)]
    assert all(e["batches"] > 0 for e in kinds_of(one, "validation_start"))

    staged = kinds_of(one, "checkpoint_staged")
    committed = kinds_of(one, "checkpoint_committed")
    assert [(e["step"], e["reason"]) for e in staged] == [(10, "steps")]
    assert [(e["step"], e["reason"]) for e in committed] == [(10, "steps"), (20, "final")]
    saved = re.findall(r"checkpoint step (\d+) saved \((\w+), [\d.]+ MiB, ([\d.]+)s\) -> (\S+)", log)
    assert [(str(e["step"]), e["reason"], f"{e['write_s']:.2f}", e["path"]) for e in committed] == saved[:2]
    assert committed[0].t >= staged[0].t
    assert [e["path"] for e in kinds_of(one, "checkpoint_pruned")] == ["step_00000010.ckpt"]  # keep_last = 1
    (done,) = kinds_of(one, "completed")
    m = re.search(r"training completed at step 20: (.*)", log)
    assert done["step"] == STEPS and done["metrics"] == json.loads(m.group(1))

    # the second start resumed from the first one's final checkpoint
    (res,) = kinds_of(two, "resumed")
    assert res["path"] == str(run / "checkpoints" / "step_00000020.ckpt") and res["step"] == STEPS
    assert res["restarts"] == 1
    assert f"resumed from {res['path']} at step 20 (restart #1" in log
    (tr2,) = kinds_of(two, "training")
    assert (tr2["first"], tr2["last"]) == (STEPS, STEPS)
    assert kinds_of(two, "completed")[0]["step"] == STEPS
    assert kinds_of(two, "completed")[0]["metrics"] == read_json(run / "status.json")["metrics"]


def test_events_of_a_run_are_read_past_a_truncated_line_garbage_and_unknown_versions(tiny_run, tmp_path):
    run = tmp_path / "copy"
    run.mkdir()
    original = (tiny_run / EVENTS_FILE).read_bytes()
    good, _ = read_events(tiny_run)
    assert len(good) == len(strict_lines(tiny_run)) > 20  # every line standard JSON
    (run / EVENTS_FILE).write_bytes(original + b"not json at all\n"
                                    + json.dumps({"v": 99, "t": 1.0, "kind": "progress", "step": 1}).encode() + b"\n"
                                    + json.dumps({"v": 1, "t": 2.0, "kind": "from_the_future"}).encode() + b"\n"
                                    + original.splitlines(keepends=True)[5][:17])  # killed mid-write
    events, scan = read_events(run)
    assert [(e.kind, e.t, e.data) for e in events] == [(e.kind, e.t, e.data) for e in good]
    assert (scan.bad_lines, scan.unknown_version, scan.unknown_kind) == (2, 1, 1)
    assert len(scan.notes()) == 3


def test_a_nonfinite_streak_writes_each_skip_and_the_rollback(tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setenv("FOLDHPC_NAN_AT_STEPS", "12-14")
    monkeypatch.setenv("FOLDHPC_NAN_ONCE", str(tmp_path / "fired"))
    assert train_in_process(run, **{"fault.nonfinite_rollback": 3, "checkpoint.keep_last": 3,
                                    "checkpoint.every_steps": 5, "checkpoint.async_save": False}).state == "completed"
    events, _ = read_events(run)
    skips = kinds_of(events, "nonfinite_skip")
    assert [(e["step"], e["what"], e["streak"]) for e in skips] == [(12, "loss", 1), (13, "loss", 2), (14, "loss", 3)]
    assert all(e["grad_norm"] is None for e in skips)  # NaN: null in JSON
    (rb,) = kinds_of(events, "rollback")
    assert (rb["first"], rb["at"], rb["to"], rb["rollbacks"]) == (12, 14, 10, 1)
    assert rb["path"] == str(run / "checkpoints" / "step_00000010.ckpt")
    assert read_json(run / "status.json")["nonfinite"]["rollbacks"] == [{"first": 12, "at": 14, "to": 10}]
    log = (run / "train.log").read_text()
    assert f"rolled back to the checkpoint at step 10 ({rb['path']})" in log
    # the replay after it: steps 11.. again, up to the end
    after = [e for e in events if e.t >= rb.t and e.kind == "progress"]
    assert [e["step"] for e in after] == [15, 20]
    assert len(strict_lines(run)) == len(events)


def test_a_failed_run_writes_failed_with_the_logged_error(tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setenv("FOLDHPC_FAIL_AT_STEP", "7")
    with pytest.raises(RuntimeError, match="injected failure at step 7"):
        train_in_process(run)
    events, _ = read_events(run)
    (failed,) = kinds_of(events, "failed")
    assert failed["step"] == 7 and failed["error"] == read_json(run / "status.json")["error"]
    assert failed["error_type"] == "InjectedFailure"
    assert f"run failed at step 7: {failed['error']}" in (run / "train.log").read_text()
    assert not kinds_of(events, "completed")
    (fault,) = kinds_of(events, "fault_injected")  # the hook says what it injected, before the failure
    assert (fault["step"], fault["what"]) == (7, "FOLDHPC_FAIL_AT_STEP=7 FOLDHPC_FAIL_KIND=exception")
    assert fault.t <= failed.t


# ---------------------------------------------------------------------------- the checkpoint manager
def test_the_manager_writes_no_events_unless_given_a_sink_then_its_own(tmp_path):
    state = {"w": torch.arange(4.0)}
    quiet = CheckpointManager(tmp_path / "quiet", keep_last=2, async_save=False)
    quiet.preflight(1 << 10)
    quiet.save(1, state, {}, reason="test")
    assert not list(tmp_path.rglob(EVENTS_FILE))  # a tool's or a test's manager: no run directory

    run = tmp_path / "run"
    run.mkdir()
    ckdir = run / "checkpoints"
    ckdir.mkdir()
    stale = ckdir / f".step_00000009.ckpt.tmp-{socket.gethostname()}-{2**22 + 12345}"  # a dead writer's
    stale.write_bytes(b"x" * 100)
    ck = CheckpointManager(ckdir, keep_last=2, async_save=False, events=EventLog(run, 0))
    ck.preflight(1 << 10)
    for step in (1, 2, 3):
        ck.save(step, state, {}, reason="test")
    newest = ckdir / "step_00000003.ckpt"
    newest.write_bytes(newest.read_bytes()[:-40])  # truncated: bad
    again = CheckpointManager(ckdir, keep_last=2, async_save=False, events=EventLog(run, 0))
    assert again.load_latest().entry.step == 2
    again.save(4, state, {}, reason="test")  # deletes the bad file, prunes step 1
    events, _ = read_events(run)
    assert [e["path"] for e in kinds_of(events, "checkpoint_stale_tmp")] == [str(stale)]
    assert [(e["step"], e["reason"]) for e in kinds_of(events, "checkpoint_committed")] == \
        [(1, "test"), (2, "test"), (3, "test"), (4, "test")]
    assert [e["path"] for e in kinds_of(events, "checkpoint_pruned")] == ["step_00000001.ckpt"]
    (rej,) = kinds_of(events, "checkpoint_rejected")
    assert (rej["path"], rej["step"], rej["problem"]) == ("step_00000003.ckpt", 3, "BAD")
    (deleted,) = kinds_of(events, "checkpoint_deleted")
    assert deleted["path"] == "step_00000003.ckpt" and deleted["reason"] == rej["reason"]
    assert not kinds_of(events, "checkpoint_staged")  # written in place: no background staging

    # a failing write: checkpoint_failed with the error the log line has
    def lost_mount() -> None:
        raise OSError(5, "Input/output error")

    again.owner_check = lost_mount
    ok = again.save(5, state, {}, reason="test")
    assert ok and isinstance(again.poll_error(), OSError)
    (failed,) = kinds_of(read_events(run)[0], "checkpoint_failed")
    assert failed["step"] == 5 and "Input/output error" in failed["error"]


# ---------------------------------------------------------------------------- the supervisor
SUPERVISED = {"train.max_steps": 30, "checkpoint.every_steps": 10, "fault.restart_backoff": "0.2s"}


def supervised(run: Path, env: dict[str, str], **extra: object) -> list[str]:
    return foldhpc_cmd("train", "--config", str(TINY), *set_args(tiny_overrides(run, **{**SUPERVISED, **extra})),
                       "--supervise")


def run_supervised(run: Path, env: dict[str, str], **extra: object) -> subprocess.CompletedProcess:
    return subprocess.run(supervised(run, env, **extra), cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, **env))


def test_a_supervised_crash_writes_spawn_failure_restart_and_the_trainers_events(tmp_path):
    run = tmp_path / "run"
    p = run_supervised(run, {"FOLDHPC_FAIL_AT_STEP": "15", "FOLDHPC_FAIL_ONCE": str(tmp_path / "fired")})
    assert p.returncode == 0, p.stderr[-3000:]
    events, scan = read_events(run)
    assert scan.bad_lines == 0
    sup = [e for e in events if e.kind.startswith("supervisor_")]
    assert all(e.rank is None for e in sup)  # a one-process run: the supervisor has no rank
    assert [e.kind for e in sup] == ["supervisor_spawn", "supervisor_failure", "supervisor_restart",
                                     "supervisor_spawn"]
    spawn1, fail, restart, spawn2 = sup
    trainers = [e.pid for e in kinds_of(events, "process_start")]
    assert [spawn1["pids"], spawn2["pids"]] == [[trainers[0]], [trainers[1]]]
    assert (spawn1["restarts"], spawn2["restarts"], spawn1["nproc"]) == (0, 1, 1)
    assert fail["failed_rank"] is None and fail["reason"] == "trainer exit status 1"
    assert fail["cause"].startswith("InjectedFailure: injected failure at step 15")
    log = (run / "train.log").read_text()
    assert f"supervisor: trainer exit status 1 at step {fail['step']} ({fail['phase']})" in log
    assert (restart["restarts"], restart["delay_s"]) == (1, 0.2)
    (failed,) = kinds_of(events, "failed")
    assert failed.pid == trainers[0] and failed["step"] == 15
    (res,) = kinds_of(events, "resumed")
    assert res.pid == trainers[1] and res["step"] == 10
    assert kinds_of(events, "completed")[0]["step"] == 30


def test_a_deterministic_failure_writes_give_up(tmp_path):
    run = tmp_path / "run"
    p = run_supervised(run, {"FOLDHPC_FAIL_AT_STEP": "5"}, **{"fault.max_restarts": 0})
    assert p.returncode == 1
    events, _ = read_events(run)
    (gave_up,) = kinds_of(events, "supervisor_give_up")
    assert gave_up["reason"] == read_json(run / "status.json")["error"]
    assert "in-job restarts used up" in gave_up["reason"]
    assert f"supervisor: giving up: {gave_up['reason']}" in (run / "train.log").read_text()
    assert not kinds_of(events, "supervisor_restart")


def test_a_hung_trainer_writes_supervisor_hang(tmp_path):
    run = tmp_path / "run"
    p = run_supervised(run, {"FOLDHPC_FAIL_AT_STEP": "15", "FOLDHPC_FAIL_KIND": "hang",
                             "FOLDHPC_FAIL_ONCE": str(tmp_path / "fired")}, **{"fault.hang_timeout": "3s"})
    assert p.returncode == 0, p.stderr[-3000:]
    events, _ = read_events(run)
    (hang,) = kinds_of(events, "supervisor_hang")
    assert hang["failed_rank"] is None and hang["step"] == 15 and hang["phase"] == "train"
    assert 3 <= hang["silent_s"] < 30 and hang["timeout_s"] == 3
    assert f"supervisor: {hang['reason']}" in (run / "train.log").read_text()
    assert not kinds_of(events, "supervisor_failure")  # a hang is its own kind
    (restart,) = kinds_of(events, "supervisor_restart")
    assert restart["reason"] == hang["reason"]
    assert kinds_of(events, "completed")[0]["step"] == 30


def test_sigusr1_writes_forwarded_signal_and_checkpoint_durable(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(supervised(run, {}, **{"train.max_steps": 400}), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, FOLDHPC_DEBUG_STEP_DELAY_S="0.02"))
    try:
        wait_for(lambda: any(e.kind == "progress" for e in read_events(run)[0]), "a progress event", timeout=120)
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(timeout=120) == 75, proc.stderr.read()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    events, _ = read_events(run)
    (trainer,) = [e.pid for e in kinds_of(events, "process_start")]
    (fwd,) = kinds_of(events, "supervisor_forwarded")
    assert fwd["signal"] == "SIGUSR1" and fwd["trainer_pid"] == trainer and fwd.rank is None
    (sig,) = kinds_of(events, "signal")
    assert sig["signal"] == "SIGUSR1" and sig.pid == trainer and sig["from_peer"] is False
    (durable,) = kinds_of(events, "checkpoint_durable")
    assert durable["step"] == sig["step"] > 0 and durable["after_boundary_s"] >= 0
    assert durable.t >= sig.t
    (saved,) = [e for e in kinds_of(events, "checkpoint_committed") if e["reason"] == "signal:SIGUSR1"]
    assert saved["step"] == sig["step"]
    (out,) = kinds_of(events, "checkpointed")
    assert out["step"] == sig["step"] and out["signal"] == "SIGUSR1"
    log = (run / "train.log").read_text()
    assert f"received SIGUSR1: saving a checkpoint at step {sig['step']}" in log
    assert f"checkpoint at step {sig['step']} durable {durable['after_boundary_s']:.2f}s after" in log


def test_every_kind_the_runtime_writes_is_in_the_schema():
    """The kinds the code emits, found in its source, are all in KINDS (a misspelt one fails there only at
    run time, when the line is reached)."""
    src = "".join((ROOT / "foldhpc" / p).read_text() for p in (
        "train/loop.py", "checkpoint/manager.py", "resilience/supervisor.py", "resilience/nonfinite.py"))
    emitted = set(re.findall(r"\.emit\(\"(\w+)\"", src))
    assert emitted <= set(KINDS)
    assert len(emitted) >= 27  # every kind above: the trainer's, the manager's, the supervisor's


def test_a_record_cut_short_stays_a_line_of_its_own(tmp_path):
    """A fragment left by a short write (a full disk) or a killed writer does not swallow the next
    record, whichever process writes it: the writer ends the fragment first."""
    from foldhpc.records.events import EventLog, read_events

    log = EventLog(tmp_path, rank=0)
    log.emit("signal", signal="SIGUSR1", step=1)
    with open(tmp_path / "events.jsonl", "ab") as f:
        f.write(b'{"v":1,"t":1.0,"pid":1,"rank":0,"kind":"sig')  # cut mid-record
    EventLog(tmp_path, rank=1).emit("signal", signal="SIGTERM", step=2)
    events, scan = read_events(tmp_path)
    assert [(e.rank, e["signal"]) for e in events] == [(0, "SIGUSR1"), (1, "SIGTERM")]
    assert scan.bad_lines == 1
