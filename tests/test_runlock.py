"""One writer per run directory (foldhpc.resilience.runlock), with real processes.

* two ``foldhpc train`` on one run directory: the second refuses at once (exit 2, one line naming
  the holder's host, pid and start time), writes nothing there, and the first's lock is given back
  on its exit 75;
* a holder that is gone is taken over with a log line: a SIGKILLed trainer on this host (dead
  pid), a holder on another host whose heartbeat is stale; a live one elsewhere is not;
* a requeued run of the same Slurm job takes its own lock back at once;
* several processes taking over one stale lock at the same moment: exactly one wins, every time;
* a holder whose lock was taken over notices (heartbeat) and stops without writing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TINY, foldhpc_cmd, read_json, set_args, tiny_overrides, wait_for
from foldhpc.resilience import runlock

SLOW = {"train.max_steps": 10**6, "run.log_every": 1, "checkpoint.interval": "0"}


def train_cmd(run: Path, *flags: str, **extra: object) -> list[str]:
    return foldhpc_cmd("train", "--config", str(TINY), *set_args(tiny_overrides(run, **extra)), "--no-supervise",
                       *flags)



def log_text(run: Path) -> str:
    p = run / "train.log"
    return p.read_text() if p.exists() else ""


def lock_files(run: Path) -> list[str]:
    return sorted(os.listdir(run / "lock"))


def foreign_holder(run: Path, age_s: float, gen: int = 1, **fields: object) -> Path:
    """A lock record of a trainer on another host (nothing local can vouch for it), heartbeat ``age_s`` old."""
    d = run / "lock"
    d.mkdir(parents=True, exist_ok=True)
    rec = {"host": "elsewhere", "boot_id": "x", "pid": 4242, "pid_start": 1, "user": "someone", "job_id": None,
           "restart_count": 0, "since": time.time() - age_s - 60, "token": "feedface", **fields}
    path = d / f"gen-{gen:08d}"
    path.write_text(json.dumps(rec))
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


def test_second_trainer_refuses_naming_the_holder_and_writes_nothing(tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(train_cmd(run, **SLOW), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    try:
        wait_for(lambda: "step 3/" in log_text(run), "the first trainer did not train")
        before = {p.name: p.read_bytes() for p in (run / "config.toml", run / "lock" / "gen-00000001")}
        t0 = time.monotonic()
        second = subprocess.Popen(train_cmd(run, **{**SLOW, "train.seed": 7}), cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        _, err = second.communicate(timeout=120)
        refused_in = time.monotonic() - t0
        assert second.returncode == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err
        msg = lines[0]
        host = os.uname().nodename
        assert msg.startswith(f"foldhpc: run directory {run} is in use by another trainer: pid {first.pid} on "
                              f"host {host}"), msg
        assert " since " in msg and "is running" in msg, msg
        # nothing of the second trainer in the run directory
        assert {p.name: p.read_bytes() for p in (run / "config.toml", run / "lock" / "gen-00000001")} == before
        assert "seed = 7" not in (run / "config.toml").read_text()
        assert f"[pid {second.pid}]" not in log_text(run)
        assert lock_files(run) == ["gen-00000001"]
        assert read_json(run / "status.json")["pid"] == first.pid
        assert not (run / "jobs.jsonl").exists()  # no Slurm job: nothing to record
        # exit 75 gives the lock back
        first.send_signal(signal.SIGUSR1)
        assert first.wait(timeout=60) == 75, first.stderr.read()[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert lock_files(run) == ["gen-00000001.released"]
    assert refused_in < 30, refused_in  # imports included; the lock check itself is milliseconds
    with runlock.acquire(run, "5m") as lock:
        assert lock.gen == 2 and lock.took_over is None
    assert lock_files(run) == ["gen-00000002.released"]


def test_killed_trainer_on_this_host_is_taken_over(tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(train_cmd(run, **SLOW), cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    wait_for(lambda: "step 2/" in log_text(run), "the first trainer did not train")
    first.kill()
    first.wait()
    assert lock_files(run) == ["gen-00000001"]  # SIGKILL: nothing was given back
    from foldhpc.config import load_config
    from foldhpc.train.loop import Trainer

    # the next trainer, in-process (a process of its own would add only its imports)
    assert Trainer(load_config(TINY, tiny_overrides(run, **{"train.max_steps": 3}))).run().state == "completed"
    log = log_text(run)
    assert f"run directory lock: took over pid {first.pid} on host {os.uname().nodename}" in log, log[-3000:]
    assert f"its process {first.pid} on this host is gone" in log
    assert lock_files(run) == ["gen-00000002.released"]


def test_stale_heartbeat_elsewhere_is_taken_over_fresh_one_is_not(tmp_path):
    run = tmp_path / "run"
    foreign_holder(run, age_s=5)
    with pytest.raises(runlock.RunDirLocked) as e:
        runlock.acquire(run, "1m")
    assert "pid 4242 on host elsewhere (user someone)" in str(e.value) and "heartbeat 5s ago" in str(e.value)
    with runlock.acquire(run, "2s") as lock:  # 5 s without a heartbeat is stale at 2 s
        assert lock.gen == 2
        assert "pid 4242 on host elsewhere" in lock.took_over and "no heartbeat for 5s" in lock.took_over
        assert lock_files(run) == ["gen-00000002"]  # the superseded generation is cleaned up
    # "0": a heartbeat never goes stale
    foreign_holder(run, age_s=10**6, gen=3)
    with pytest.raises(runlock.RunDirLocked):
        runlock.acquire(run, "0")


def test_requeued_run_of_the_same_job_takes_its_lock_back_at_once(tmp_path, monkeypatch):
    run = tmp_path / "run"
    foreign_holder(run, age_s=0, job_id="777", restart_count=0, cluster="c1")
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_CLUSTER_NAME", "c1")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    t0 = time.monotonic()
    with runlock.acquire(run, "5m") as lock:
        assert time.monotonic() - t0 < 1.0
        assert "this same Slurm job 777" in lock.took_over, lock.took_over
        assert lock.record["job_id"] == "777" and lock.record["restart_count"] == 1


RACER = r"""
import sys, time
from pathlib import Path
from foldhpc.resilience import runlock
run, start = Path(sys.argv[1]), float(sys.argv[2])
while time.time() < start:
    pass
try:
    lock = runlock.acquire(run, "2s")
except runlock.RunDirLocked as e:
    print("REFUSED", e, flush=True)
else:
    print("GOT", lock.gen, flush=True)
    time.sleep(1.5)  # alive and beating while the others look
    lock.release()
"""


def test_contenders_taking_over_one_stale_lock_exactly_one_wins(tmp_path):
    for round_ in range(4):
        run = tmp_path / f"run{round_}"
        foreign_holder(run, age_s=60)
        start = time.time() + 1.5
        procs = [subprocess.Popen([sys.executable, "-c", RACER, str(run), str(start)], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(6)]
        outs = [p.communicate(timeout=60) for p in procs]
        got = [o for o, _ in outs if o.startswith("GOT")]
        refused = [o for o, _ in outs if o.startswith("REFUSED")]
        assert len(got) == 1 and len(refused) == 5, outs
        assert got[0].split() == ["GOT", "2"]
        assert all("is in use by another trainer" in r and "on host" in r for r in refused), refused
        assert lock_files(run) == ["gen-00000002.released"]


def test_holder_notices_a_takeover_and_leaves_the_new_lock_alone(tmp_path):
    run = tmp_path / "run"
    lock = runlock.acquire(run, "1s")  # heartbeat every 0.2 s
    try:
        lock.check()
        newer = foreign_holder(run, age_s=0, gen=lock.gen + 1)
        wait_for(lambda: lock.lost, "the takeover was not noticed", timeout=5)
        with pytest.raises(runlock.RunDirLocked, match="was taken over by pid 4242 on host elsewhere"):
            lock.check()
    finally:
        lock.release()
    assert newer.exists() and lock_files(run) == ["gen-00000001", "gen-00000002"]


def test_holder_record_and_heartbeat(tmp_path):
    run = tmp_path / "run"
    with runlock.acquire(run, "1.2s") as lock:
        rec = runlock.read_holder(run)
        assert rec["pid"] == os.getpid() and rec["host"] == os.uname().nodename and rec["generation"] == 1
        assert rec["pid_start"] and rec["boot_id"] and rec["token"]
        time.sleep(1.0)
        assert runlock.read_holder(run)["heartbeat_age_s"] < 0.6  # refreshed every 0.2 s
        assert lock.flock  # a local file system
    assert runlock.read_holder(run) is None


# A descendant that wants the lock: prints what it got (an inherited lock or a refusal), then holds
# it until its stdin closes. argv: run dir, "orphan:PID" to first wait until its parent PID (a shell
# that started it in the background) has exited, so that the supervisor is no ancestor of it any more.
DESCENDANT = """
import os, sys, time
from foldhpc.resilience import runlock
if sys.argv[2].startswith("orphan:"):
    while os.getppid() == int(sys.argv[2].split(":")[1]):
        time.sleep(0.01)
try:
    lock = runlock.acquire(sys.argv[1], "5m")
except runlock.RunDirLocked as e:
    print("REFUSED", e, flush=True)
    sys.exit(2)
print("GOT", type(lock).__name__, lock.gen, flush=True)
sys.stdin.read()
lock.check()
lock.release()
print("RELEASED", flush=True)
"""


def _descendant(run, mode="child", **kw):
    return subprocess.Popen([sys.executable, "-c", DESCENDANT, str(run), mode], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_a_supervisors_lock_is_handed_down_to_one_descendant_at_a_time(tmp_path):
    """A supervisor (this test process) holds the lock with ``supervises=True``: a process under it gets
    the same generation (an InheritedLock: no file of its own), a second one at the same time is refused,
    and once the first has let go the next one gets it; the supervisor's lock is untouched throughout."""
    run = tmp_path / "run"
    sup = runlock.acquire(run, "5m", supervises=True)
    try:
        first = _descendant(run)
        assert first.stdout.readline().split() == ["GOT", "InheritedLock", str(sup.gen)]
        second = _descendant(run)
        out, err = second.communicate(timeout=60)
        assert second.returncode == 2, err
        assert out.startswith(f"REFUSED run directory {run} is in use by another process under the same supervisor "
                              f"(pid {os.getpid()} (a foldhpc supervisor) on host"), out
        out, err = first.communicate("", timeout=60)
        assert first.returncode == 0 and out.split() == ["RELEASED"], err
        third = _descendant(run)
        out, err = third.communicate("", timeout=60)
        assert third.returncode == 0 and out.split()[:2] == ["GOT", "InheritedLock"], err
        sup.check()
        assert runlock.read_holder(run)["pid"] == os.getpid()
    finally:
        sup.release()
    assert lock_files(run) == ["gen-00000001.released"]  # the supervisor's claim file went with its lock


def test_a_supervisors_lock_is_not_handed_to_a_process_outside_it(tmp_path):
    """Only the supervisor's descendants use its lock: a process it started that has left its tree (a
    shell's background job, reparented when the shell exited) is refused like any other trainer, and so
    is a process under a holder that does not supervise (a plain trainer starting a subprocess)."""
    run = tmp_path / "run"
    with runlock.acquire(run, "5m", supervises=True):
        shell = subprocess.run(["sh", "-c", f'{sys.executable} -c "$0" {run} orphan:$$ > {tmp_path / "out"} 2>&1 &',
                                DESCENDANT], cwd=ROOT, timeout=30)
        assert shell.returncode == 0
        out = wait_for(lambda: (tmp_path / "out").read_text(), "the orphan's answer", timeout=30)
        assert out.startswith(f"REFUSED run directory {run} is in use by another trainer: pid {os.getpid()} "
                              "(a foldhpc supervisor)"), out
    with runlock.acquire(run / "plain", "5m"):
        out, _ = _descendant(run / "plain").communicate("", timeout=60)
        assert out.startswith("REFUSED") and "is running" in out, out
