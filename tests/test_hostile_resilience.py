"""Issue 19 (hostile and broken inputs), the resilience side: two runs on one checkpoint directory
(item 2), a crafted lock record (item 10), a live lock holder in another PID namespace (item 12),
a full ``/dev/shm`` (item 13), a first step slower than ``hang_floor`` and a save that blocks the
training thread (item 14), an exit 2 in an in-job restart and unrelated failures at startup
(item 15), a trainer that SIGKILL does not end and a save in flight when the lock is taken over
(item 21). Real files, processes, mounts and namespaces; root is needed for the last two, which
are skipped with the reason where they cannot be made.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import (GOOD_DATA, ROOT, TINY, fill_fs, foldhpc_cmd, read_json, run_foldhpc, set_args, tiny_overrides,
                      wait_for)
from foldhpc import faults
from foldhpc.checkpoint.manager import CheckpointManager
from foldhpc.config import load_config
from foldhpc.resilience import heartbeat as hb
from foldhpc.resilience import runlock
from foldhpc.resilience.supervisor import Supervisor, transient_io
from foldhpc.train.loop import Trainer
from test_runlock import foreign_holder, lock_files, log_text
from test_supervisor import events

FAST = {"checkpoint.every_steps": 5, "fault.restart_backoff": "0.2s"}




def tiny(run: Path, **extra: object):
    return load_config(TINY, tiny_overrides(run, **extra))


def supervised(run: Path, **extra: object) -> list[str]:
    return foldhpc_cmd("train", "--config", str(TINY), *set_args(tiny_overrides(run, **{**FAST, **extra})),
                       "--supervise")


def need_root(what: str) -> None:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip(f"{what} needs root and unshare(1)")


# ------------------------------------------------------------------ item 2: one checkpoint.dir, two run dirs
def test_checkpoint_dir_of_another_run_dir_is_refused_naming_its_owner(tmp_path):
    """The review's reproduction: run A finished with checkpoint.dir = X; run B (another run.dir,
    the same trajectory keys) pointed at X resumed A's weights. Now B stops, exit 2, one line
    naming A and what to do, and neither X nor B's run directory gets anything of B."""
    shared, a, b = tmp_path / "shared-ckpt", tmp_path / "a", tmp_path / "b"
    assert Trainer(tiny(a, **{"train.max_steps": 4, "checkpoint.dir": str(shared)})).run().step == 4
    assert read_json(shared / "OWNER.json")["run_dir"] == str(a.resolve())
    before = {p.name: p.read_bytes() for p in shared.iterdir()}
    p = run_foldhpc("train", "--config", str(TINY),
                    *set_args(tiny_overrides(b, **{"train.max_steps": 4, "checkpoint.dir": str(shared)})),
                    "--no-supervise", timeout=120)
    assert p.returncode == 2, p.stderr[-3000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert (f"checkpoint.dir {shared.resolve()} belongs to run directory {a.resolve()}" in lines[0]
            and f"not to this run's {b.resolve()}" in lines[0] and "delete" in lines[0]), lines[0]
    assert {p.name: p.read_bytes() for p in shared.iterdir()} == before
    assert not (b / "status.json").exists() and not (b / "config.toml").exists()
    assert lock_files(b) == ["gen-00000001.released"]
    # its owner goes on with it
    assert Trainer(tiny(a, **{"train.max_steps": 4, "checkpoint.dir": str(shared)})).run().step == 4
    assert f"resumed from {shared / 'step_00000004.ckpt'}" in log_text(a)


def test_checkpoint_dir_ownership_inside_the_run_dir_and_crafted_records(tmp_path, records):
    run = tmp_path / "run"
    # the default <run.dir>/checkpoints is the run's, whatever a record there says (a moved run dir)
    inside = run / "checkpoints"
    assert runlock.claim_checkpoint_dir(inside, run) is None
    assert read_json(inside / "OWNER.json")["run_dir"] == str(run.resolve())
    (inside / "OWNER.json").write_text(json.dumps({"run_dir": "/old/place/of/run"}))
    level, note = runlock.claim_checkpoint_dir(inside, run)
    assert level == logging.WARNING and "/old/place/of/run" in note and "this run's now" in note
    assert read_json(inside / "OWNER.json")["run_dir"] == str(run.resolve())
    # outside the run dir: claimed once, then only by that run
    outside = tmp_path / "scratch" / "ck"
    assert "claimed for this run directory" in runlock.claim_checkpoint_dir(outside, run)[1]
    assert runlock.claim_checkpoint_dir(outside, run) is None
    with pytest.raises(runlock.CheckpointDirOwned, match=f"belongs to run directory {run.resolve()}") as e:
        runlock.claim_checkpoint_dir(outside, tmp_path / "other")
    assert e.value.exit_code == 2
    # a crafted record outside the run dir decides nothing and takes nothing over: refused, with the fix
    for crafted in ("{not json", json.dumps({"run_dir": 7}), json.dumps(["x"])):
        (outside / "OWNER.json").write_text(crafted)
        with pytest.raises(runlock.CheckpointDirOwned, match="delete .*OWNER.json"):
            runlock.claim_checkpoint_dir(outside, run)
        assert (outside / "OWNER.json").read_text() == crafted


# ------------------------------------------------------------------ item 10: a crafted lock record
def test_crafted_lock_record_is_unreadable_not_a_crash(tmp_path, monkeypatch):
    """``restart_count: "x"`` in a record of this very Slurm job raised ValueError in acquire()."""
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_CLUSTER_NAME", "c1")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    run = tmp_path / "run"
    foreign_holder(run, age_s=0, job_id="777", cluster="c1", restart_count="x")
    with pytest.raises(runlock.RunDirLocked, match="unreadable"):
        runlock.acquire(run, "5m")
    assert runlock.read_holder(run)["generation"] == 1  # `foldhpc status` reads it too
    for bad in ({"pid_start": "x"}, {"pid": [1]}, {"since": "yesterday"}, {"restart_count": 1e400}):
        foreign_holder(run, age_s=0, **bad)
        with pytest.raises(runlock.RunDirLocked, match="unreadable"):
            runlock.acquire(run, "5m")
    # unreadable retires only by age
    foreign_holder(run, age_s=10, job_id="777", cluster="c1", restart_count="x")
    with runlock.acquire(run, "2s") as lock:
        assert "unreadable and 10s old" in lock.took_over, lock.took_over
    # a count written as a string is still a count
    foreign_holder(run, age_s=0, gen=3, job_id="777", cluster="c1", restart_count="0")
    with runlock.acquire(run, "5m") as lock:
        assert "this same Slurm job 777" in lock.took_over


# ------------------------------------------------------------------ item 12: PID namespaces
HOLDER = r"""
import sys, time
from pathlib import Path
from foldhpc.resilience import runlock
lock = runlock.acquire(Path(sys.argv[1]), "5m")
print("GOT", lock.record["pid"], lock.record["pid_ns"], flush=True)
time.sleep(120)
"""


def test_live_holder_in_another_pid_namespace_is_not_taken_over(tmp_path):
    """Same host and boot id, another PID namespace (a container): its pid (1 there) names
    another process in this /proc. The flock says it is alive."""
    need_root("a PID namespace")
    run = tmp_path / "run"
    holder = subprocess.Popen(["unshare", "--pid", "--kill-child", sys.executable, "-c", HOLDER, str(run)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = holder.stdout.readline().split()
        if not line:
            pytest.skip(f"unshare --pid failed here: {holder.stderr.read()[-500:]}")
        assert line[:2] == ["GOT", "1"] and line[2] != os.readlink("/proc/self/ns/pid"), line
        with pytest.raises(runlock.RunDirLocked, match="holds the lock file's flock"):
            runlock.acquire(run, "5m")
        assert lock_files(run) == ["gen-00000001"]
    finally:
        holder.kill()
        holder.wait()


def test_pid_of_another_namespace_is_not_trusted_without_a_flock(tmp_path):
    """No flock to ask (a file system without it): a record from another PID namespace on this
    host is judged by its heartbeat, not by a pid that means nothing here."""
    run = tmp_path / "run"
    me = runlock.identity()
    foreign_holder(run, age_s=0, host=me["host"], boot_id=me["boot_id"], pid=4194000, pid_start=1,
                   pid_ns="pid:[4026500001]")
    with pytest.raises(runlock.RunDirLocked, match="another PID namespace"):
        runlock.acquire(run, "5m")
    # the same record in this namespace: its pid is gone, taken over at once
    foreign_holder(run, age_s=0, gen=2, host=me["host"], boot_id=me["boot_id"], pid=4194000, pid_start=1,
                   pid_ns=me["pid_ns"])
    with runlock.acquire(run, "5m") as lock:
        assert "its process 4194000 on this host is gone" in lock.took_over


FORKER = r"""
import os, sys, time
from pathlib import Path
from foldhpc.resilience import runlock
lock = runlock.acquire(Path(sys.argv[1]), "5m")
child = os.fork()
if child == 0:  # a DataLoader worker that outlives the trainer by a while
    os.close(1)
    os.close(2)
    time.sleep(60)
    os._exit(0)
print("GOT", child, flush=True)
os._exit(0)  # the trainer dies (nothing released)
"""


def test_forked_child_does_not_keep_a_dead_holders_lock(tmp_path):
    """The flock is asked first now; a forked child must not keep it alive for its dead parent."""
    run = tmp_path / "run"
    p = subprocess.run([sys.executable, "-c", FORKER, str(run)], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    got, child = p.stdout.split()
    assert got == "GOT", p.stderr
    try:
        assert Path(f"/proc/{child}").exists()  # the worker is still there
        with runlock.acquire(run, "5m") as lock:
            assert "on this host is gone" in lock.took_over, lock.took_over
    finally:
        os.kill(int(child), signal.SIGKILL)


# ------------------------------------------------------------------ item 13: a full /dev/shm
@pytest.fixture
def small_tmpfs(tmpfs):
    return tmpfs("64k")


def test_beat_file_prepared_before_the_tmpfs_fills_keeps_beating(small_tmpfs, records):
    prepared = small_tmpfs / "rank-0"
    hb.prepare(prepared)
    empty = small_tmpfs / "rank-1"
    empty.touch()  # how the supervisor made it before
    fill_fs(small_tmpfs)
    beat = hb.Heartbeat(prepared)
    beat.beat(3, "train")
    assert hb.read(prepared) == hb.Beat(1, 3, "train")
    assert not records.messages()
    silent = hb.Heartbeat(empty)
    silent.beat(1)
    silent.beat(2)
    assert hb.read(empty).count == 0
    (err,) = records.messages()
    assert f"heartbeat to {empty} failed (No space left on device)" in err and "hung" in err
    with pytest.raises(OSError) as e:  # the supervisor notices before starting the trainer
        hb.prepare(small_tmpfs / "rank-2")
    assert e.value.errno == errno.ENOSPC


def test_full_dev_shm_heartbeats_fall_back_and_the_healthy_trainer_is_not_killed(tmp_path):
    """The review's case: /dev/shm full, every beat failed unseen, the trainer was killed as hung
    at startup twice and the run failed. Here /dev/shm is a full 64 KiB tmpfs in a private mount
    namespace (nobody else sees it). The steps alone (20 x 0.5 s) outlast the 10 s startup
    timeout, so a trainer whose beats went unseen would be killed."""
    need_root("mounting a tmpfs over /dev/shm")
    run = tmp_path / "run"
    script = ('mount -t tmpfs -o size=64k tmpfs /dev/shm || exit 99; '
              '(dd if=/dev/zero of=/dev/shm/fill bs=4096 2>/dev/null; true); exec "$@"')
    cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
           *supervised(run, **{"fault.startup_timeout": "10s", "train.max_steps": 20})]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, FOLDHPC_DEBUG_STEP_DELAY_S="0.5"))
    if p.returncode == 99:
        pytest.skip(f"cannot mount a tmpfs over /dev/shm here: {p.stderr[-500:]}")
    assert p.returncode == 0, p.stderr[-3000:]
    log = log_text(run)
    assert "supervisor: cannot write heartbeat files in /dev/shm (No space left on device); using " in log, log[-3000:]
    assert read_json(run / "status.json")["in_job_restarts"] == 0
    assert not [e for e in events(run) if e["event"] == "restarted"]


# ------------------------------------------------------------------ item 14: a slow first step, a slow save
def test_first_step_slower_than_hang_floor_is_judged_by_the_startup_allowance(tmp_path):
    """A first step of 5 s (torch.compile, cold CUDA kernels: 58 s measured on an H200) against a
    2 s hang floor: killed twice and failed before; now the startup allowance covers it."""
    run = tmp_path / "run"
    p = subprocess.run(supervised(run, **{"fault.hang_floor": "2s", "train.max_steps": 12}), cwd=ROOT,
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, FOLDHPC_DEBUG_FIRST_STEP_DELAY_S="5"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert read_json(run / "status.json")["in_job_restarts"] == 0
    assert not [e for e in events(run) if e["event"] == "restarted"]
    assert "a slow first step (debug hook)" in log_text(run)


def test_training_thread_beats_while_a_save_still_reads_the_state(tmp_path):
    """A large CPU state is read by the write itself (passed through, not staged): the training
    thread waits for it before optimizer.step(). It beats while it waits."""
    path = tmp_path / "beat"
    hb.prepare(path)

    def slow_state() -> dict:
        time.sleep(2.5)  # as long as reading gigabytes takes on a slow file system
        return {"w": torch.ones(4)}

    t = Trainer.__new__(Trainer)  # only what _wait_staged uses
    t.hb, t.step = hb.Heartbeat(path), 41
    t.ckpt = CheckpointManager(tmp_path / "ck", keep_last=2)
    t.ckpt.preflight(1 << 16)
    assert t.ckpt.save(41, slow_state, {}, blocking=False)
    t0 = time.monotonic()
    t._wait_staged()
    assert time.monotonic() - t0 >= 2.0
    beat = hb.read(path)
    assert beat.count >= 3 and beat.step == 42 and beat.phase == "checkpoint", beat  # one a second while waiting
    t.ckpt.wait()
    assert t.ckpt.last_committed.step == 41


# ------------------------------------------------------------------ item 15: exit 2 in a restart, causes
def test_data_path_missing_during_an_in_job_restart_is_retried(tmp_path):
    """The review's case: the trainer crashed, and while it was restarted its data path was
    missing for a while (a remount): the restart's exit 2 ended the run. Now it is a failure
    like another, retried with a longer back-off, never "deterministic"."""
    data = tmp_path / "data"
    shutil.copytree(GOOD_DATA, data, ignore=shutil.ignore_patterns(".foldhpc-cache"))
    away = tmp_path / "data.away"
    run = tmp_path / "run"
    fired = tmp_path / "fired"
    proc = subprocess.Popen(supervised(run, **{"data.path": str(data), "data.cache_dir": str(tmp_path / "cache"),
                                               "fault.restart_backoff": "0.4s"}),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, FOLDHPC_FAIL_AT_STEP="12", FOLDHPC_FAIL_ONCE=str(fired)))
    try:
        wait_for(fired.exists, "the fault did not fire")
        data.rename(away)  # gone before the restarted trainer loads it (0.4 s back-off + imports)
        wait_for(lambda: len([e for e in events(run) if e["event"] == "restarted"]) >= 2 or proc.poll() is not None,
                 "no second restart")
        assert proc.poll() is None, proc.stderr.read()[-3000:]  # before: exit 2
        away.rename(data)
        assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    finally:
        if away.exists():
            away.rename(data)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    first, second = [e for e in events(run) if e["event"] == "restarted"][:2]
    assert first["reason"] == "trainer exit status 1" and first["step"] == 12
    assert second["reason"].startswith("trainer exit status 2") and second["step"] == -1
    log = log_text(run)
    assert "does not exist" in log and "a longer back-off" in log
    assert read_json(run / "status.json")["state"] == "completed"


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def test_two_unrelated_failures_at_startup_are_not_deterministic(tmp_path):
    """SIGKILL, then SIGABRT, both before the first step (step -1): not "the same failure twice"."""
    run = tmp_path / "run"
    proc = subprocess.Popen(supervised(run, **{"train.max_steps": 6}), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        killed: list[int] = []
        for sig in (signal.SIGKILL, signal.SIGABRT):
            child = wait_for(lambda: [c for c in _children(proc.pid) if c not in killed] or proc.poll() is not None,
                             "no trainer started")
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            os.kill(child[0], sig)  # still importing: a startup failure
            killed.append(child[0])
        assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    restarted = [e for e in events(run) if e["event"] == "restarted"]
    assert [(e["step"], e["reason"]) for e in restarted] == [(-1, "trainer killed by SIGKILL"),
                                                             (-1, "trainer killed by SIGABRT")]


def test_exit_2_of_a_first_start_is_final_unless_its_cause_is_io():
    assert transient_io(f"CheckpointError: /x/step_00000010.ckpt: cannot be read: {os.strerror(errno.EIO)}")
    assert transient_io(f"DataError: ... {os.strerror(errno.ESTALE)}")
    assert not transient_io("DataError: data path /x does not exist. To get going: ...")
    assert not transient_io("ConfigError: train.lr = -1: must be > 0")


# ------------------------------------------------------------------ item 21: SIGKILL that does not end it; a lost lock's save
class Unkillable(subprocess.Popen):
    """A real process that signals do not end, as one in uninterruptible sleep (D state) behaves."""

    def send_signal(self, sig: int) -> None:  # noqa: ARG002
        pass


def test_supervisor_goes_on_when_a_killed_trainer_does_not_exit(tmp_path, records):
    sup = Supervisor(tiny(tmp_path / "run"), [], [])
    stuck = Unkillable(["sleep", "60"])
    try:
        sup.procs, sup.kill_wait_s = [stuck], 0.5
        t = threading.Thread(target=sup._kill_all, daemon=True)
        t.start()
        t.join(timeout=10)
        assert not t.is_alive(), "_kill_all waits forever for a trainer that does not die"
        assert any(f"trainer pid {stuck.pid} has not exited" in m and "going on without it" in m
                   for m in records.messages(logging.ERROR)), records.messages()
    finally:
        os.kill(stuck.pid, signal.SIGKILL)
        stuck.wait()


def test_save_in_flight_when_the_lock_is_taken_over_commits_and_prunes_nothing(tmp_path, monkeypatch):
    run = tmp_path / "run"
    lock = runlock.acquire(run, "5m")
    try:
        monkeypatch.setenv(faults.WRITE_DELAY, "1.0")  # every write waits 1 s before its rename
        mgr = CheckpointManager(run / "checkpoints", keep_last=1, owner_check=lock.verify)
        mgr.preflight(1 << 16)
        mgr.save(1, {"w": torch.ones(3)}, {}, blocking=True)
        assert mgr.save(2, {"w": torch.zeros(3)}, {}, blocking=False)
        foreign_holder(run, age_s=0, gen=lock.gen + 1)  # taken over while the write is in flight
        mgr.wait()
        err = mgr.poll_error()
        assert isinstance(err, runlock.RunDirLocked) and "taken over by pid 4242 on host elsewhere" in str(err)
        assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000001.ckpt"]
        assert [e.step for e in CheckpointManager(run / "checkpoints").entries()] == [1]
    finally:
        lock.release()


def test_trainer_whose_lock_is_taken_over_mid_save_leaves_the_checkpoints_alone(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(foldhpc_cmd("train", "--config", str(TINY), *set_args(tiny_overrides(
        run, **{"train.max_steps": 10**6, "checkpoint.every_steps": 5, "checkpoint.keep_last": 1,
                "fault.lock_stale_after": "1s"})), "--no-supervise"),
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, FOLDHPC_DEBUG_WRITE_DELAY_S="3"))
    staged = re.compile(r"checkpoint step (\d+): staging and writing in the background")
    try:  # the second background save is in flight: the first is committed (one at a time)
        wait_for(lambda: len(staged.findall(log_text(run))) >= 2 or proc.poll() is not None, "no second save")
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        foreign_holder(run, age_s=0, gen=2)
        assert proc.wait(timeout=60) == 2, proc.stderr.read()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    first, second = (int(s) for s in staged.findall(log_text(run))[:2])
    names = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert names == [f"step_{first:08d}.ckpt"], (names, second)  # the second not committed, the first not pruned
    assert "run directory lock lost" in log_text(run)
