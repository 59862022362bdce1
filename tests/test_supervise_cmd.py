"""``foldhpc supervise -- CMD``: a command foldhpc did not write, under the supervisor (issue 21 item 3).

Restarts after a crash within ``fault.max_restarts``, giving up after them, exit 75 honoured
without a restart, a preemption signal forwarded to the child, and a :class:`foldhpc.Session`
script restarted after a SIGKILL ending bit-identical with an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, read_json, wait_for, assert_same_state, latest_checkpoint

EXAMPLE = ROOT / "examples" / "own_loop.py"
FAST = ["--set", "fault.restart_backoff=0.05"]


def _supervise(run_dir: Path, *opts: str, cmd: list[str]) -> list[str]:
    return [sys.executable, "-m", "foldhpc", "supervise", "--set", f"run.dir={run_dir}", *FAST, *opts, "--", *cmd]


def _run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def _events(run_dir: Path, kind_prefix: str = "supervisor_") -> list[dict[str, Any]]:
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["kind"].startswith(kind_prefix)]


def _jobs(run_dir: Path) -> list[str]:
    return [json.loads(line)["event"] for line in (run_dir / "jobs.jsonl").read_text().splitlines()]


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_crash_once_then_success_is_restarted(tmp_path: Path) -> None:
    run, marker = tmp_path / "run", tmp_path / "crashed"
    code = (f"import os, sys, pathlib; m = pathlib.Path({str(marker)!r})\n"
            "if not m.exists(): m.touch(); sys.exit(3)\n"
            "assert os.environ['FOLDHPC_SUPERVISED'] == '1' and os.environ['FOLDHPC_HEARTBEAT_FILE']\n")
    r = _run(_supervise(run, "--set", "fault.max_restarts=2", cmd=_py(code)))
    assert r.returncode == 0, r.stderr
    kinds = [e["kind"] for e in _events(run)]
    assert kinds.count("supervisor_spawn") == 2, kinds
    assert "supervisor_failure" in kinds and "supervisor_restart" in kinds, kinds
    assert _events(run)[0]["command"] == _py(code)
    assert "restarted" in _jobs(run)
    status = read_json(run / "status.json")
    assert status["state"] == "completed" and status["in_job_restarts"] == 1


def test_always_failing_command_gives_up(tmp_path: Path) -> None:
    run, count = tmp_path / "run", tmp_path / "count"
    # a different exit status each time: not "the same failure twice" (deterministic, given up at once)
    code = (f"import sys, pathlib; c = pathlib.Path({str(count)!r}); n = len(c.read_text()) if c.exists() else 0\n"
            "c.write_text('x' * (n + 1)); sys.exit(4 + n)\n")
    r = _run(_supervise(run, "--max-restarts", "2", cmd=_py(code)))
    assert r.returncode == 1, r.stderr
    kinds = [e["kind"] for e in _events(run)]
    assert kinds.count("supervisor_spawn") == 3 and "supervisor_give_up" in kinds, kinds
    jobs = _jobs(run)
    assert jobs.count("restarted") == 2 and jobs[-1] == "gave_up", jobs
    status = read_json(run / "status.json")
    assert status["state"] == "failed" and "exit status 6" in status["error"]
    assert "fault.max_restarts = 2" in status["error"]


def test_exit_75_is_handed_over_without_restart(tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = _run(_supervise(run, "--max-restarts", "3", cmd=_py("import sys; sys.exit(75)")))
    assert r.returncode == 75, r.stderr
    kinds = [e["kind"] for e in _events(run)]
    assert kinds.count("supervisor_spawn") == 1 and "supervisor_restart" not in kinds, kinds
    assert read_json(run / "status.json")["state"] == "checkpointed"


def test_sigusr1_is_forwarded_to_the_command(tmp_path: Path) -> None:
    run, ready = tmp_path / "run", tmp_path / "ready"
    code = ("import signal, sys, time, pathlib\n"
            "signal.signal(signal.SIGUSR1, lambda *a: sys.exit(75))\n"
            f"pathlib.Path({str(ready)!r}).touch()\n"
            "time.sleep(60)\nsys.exit(1)\n")
    p = subprocess.Popen(_supervise(run, "--max-restarts", "2", cmd=_py(code)), cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: ready.exists() or p.poll() is not None, "the child's handler", timeout=30, poll=0.02)
        p.send_signal(signal.SIGUSR1)
        out, _ = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 75, out
    forwarded = [e for e in _events(run) if e["kind"] == "supervisor_forwarded"]
    assert len(forwarded) == 1 and forwarded[0]["signal"] == "SIGUSR1", _events(run)


def test_usage_error_without_command(tmp_path: Path) -> None:
    r = _run([sys.executable, "-m", "foldhpc", "supervise", "--set", f"run.dir={tmp_path / 'run'}"])
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--" in r.stderr, r.stderr
    r = _run([sys.executable, "-m", "foldhpc", "supervise", "--help"])
    assert r.returncode == 0 and "-- CMD" in r.stdout


_latest, _assert_same = latest_checkpoint, assert_same_state


@pytest.mark.timeout(120)
def test_session_script_restarted_after_sigkill_is_bit_identical(tmp_path: Path) -> None:
    steps, every = 3000, 250
    cfg = tmp_path / "session.toml"
    cfg.write_text(f"[checkpoint]\nevery_steps = {every}\nkeep_last = 2\n")
    run, ref = tmp_path / "run", tmp_path / "ref"
    script = [sys.executable, str(EXAMPLE)]
    p = subprocess.Popen(_supervise(run, "--config", str(cfg), "--max-restarts", "2",
                                    cmd=[*script, str(run), str(steps), str(cfg)]),
                         cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def committed() -> bool:
            events = run / "events.jsonl"
            return events.is_file() and '"kind":"checkpoint_committed"' in events.read_text()

        wait_for(lambda: committed() or p.poll() is not None, "a first checkpoint", timeout=60, poll=0.01)
        assert p.poll() is None, p.communicate()[0]
        child = _events(run, "supervisor_spawn")[0]["pids"][0]
        os.kill(child, signal.SIGKILL)
        out, _ = p.communicate(timeout=90)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, out
    kinds = [e["kind"] for e in _events(run)]
    assert kinds.count("supervisor_spawn") == 2 and "supervisor_restart" in kinds, kinds
    assert "killed by SIGKILL" in next(e for e in _events(run) if e["kind"] == "supervisor_failure")["reason"]
    r = _run([*script, str(ref), str(steps), str(cfg)], timeout=90)
    assert r.returncode == 0, r.stderr
    got, want = _latest(run), _latest(ref)
    assert got.entry.step == want.entry.step == steps
    assert got.entry.digest == want.entry.digest
    for key in ("model", "optimizer", "scheduler"):
        _assert_same(got.state[key], want.state[key], key)
    _assert_same(got.state["foldhpc"]["rng"]["torch"], want.state["foldhpc"]["rng"]["torch"], "rng/torch")


def test_run_dir_held_by_a_live_writer_is_refused(tmp_path: Path) -> None:
    from foldhpc.resilience import runlock

    run, ran = tmp_path / "run", tmp_path / "ran"
    run.mkdir()
    with runlock.acquire(run, "5m"):  # this test process: alive, on this host
        r = _run(_supervise(run, cmd=_py(f"import pathlib; pathlib.Path({str(ran)!r}).touch()")))
    assert r.returncode == 2 and "in use by another" in r.stderr, r.stderr
    assert not ran.exists()


def _holder(run_dir: Path) -> dict[str, Any] | None:
    from foldhpc.resilience import runlock

    return runlock.read_holder(run_dir)


def test_supervisor_holds_the_lock_across_restarts_and_refuses_a_second_writer(tmp_path: Path) -> None:
    """The lock of a command that takes none is the supervisor's, from before its first start to after its
    last exit: a second ``foldhpc supervise`` or ``foldhpc train`` on the run directory is refused (exit 2),
    also between two starts of the command."""
    from conftest import TINY, set_args, tiny_overrides

    run, gate = tmp_path / "run", tmp_path / "gate"
    # start 1: "started-1", wait for the gate, crash; start 2: "started-2", wait for the gate to go, done
    code = (f"import pathlib, sys, time; t = pathlib.Path({str(tmp_path)!r}); g = t / 'gate'\n"
            "n = 2 if (t / 'started-1').exists() else 1; (t / f'started-{n}').touch()\n"
            "while g.exists() != (n == 1): time.sleep(0.02)\n"
            "sys.exit(3 if n == 1 else 0)\n")
    p = subprocess.Popen(_supervise(run, "--max-restarts", "1", cmd=_py(code)), cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (tmp_path / "started-1").exists() or p.poll() is not None, "the first start", timeout=30)
        first = _holder(run)
        assert first and first["pid"] == p.pid and first["supervises"] is True, first
        second = _run(_supervise(run, cmd=_py("pass")))
        assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1, second.stderr
        assert f"pid {p.pid} (a foldhpc supervisor)" in second.stderr, second.stderr
        train = _run([sys.executable, "-m", "foldhpc", "train", "--no-supervise", "--config", str(TINY),
                      *set_args(tiny_overrides(run))], timeout=120)
        assert train.returncode == 2 and "in use by another trainer" in train.stderr, train.stderr
        gate.touch()  # start 1 crashes; start 2 runs under the same lock
        wait_for(lambda: (tmp_path / "started-2").exists() or p.poll() is not None, "the restart", timeout=30)
        again = _holder(run)
        assert again and (again["generation"], again["token"]) == (first["generation"], first["token"]), again
        gate.unlink()
        out, _ = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, out
    assert _holder(run) is None  # given back at the end
    assert sorted(os.listdir(run / "lock")) == [f"gen-{first['generation']:08d}.released"]


@pytest.mark.timeout(120)
def test_session_below_a_shell_uses_the_supervisors_lock(tmp_path: Path) -> None:
    """A :class:`foldhpc.Session` in the command (here below a shell, not the supervisor's own child)
    finds its supervisor among its ancestors and trains under its lock, taking none of its own."""
    run = tmp_path / "run"
    cfg = tmp_path / "session.toml"
    cfg.write_text("[checkpoint]\nevery_steps = 50\n")
    # the python is not the shell's last command: the shell forks it, it does not exec it
    shell = f"{sys.executable} {EXAMPLE} {run} 100 {cfg}; rc=$?; exit $rc"
    r = _run(_supervise(run, "--config", str(cfg), cmd=["sh", "-c", shell]), timeout=90)
    assert r.returncode == 0, r.stderr
    assert read_json(run / "status.json")["state"] == "completed"
    assert sorted(os.listdir(run / "lock")) == ["gen-00000001.released"]  # the supervisor's, and no other
    log = (run / "train.log").read_text()
    assert "handed down to this process" in log, log


def test_a_shells_programs_get_the_signal_and_their_time_to_save(tmp_path: Path) -> None:
    """A signal is forwarded to the command's whole process group: the program below a shell gets it
    too (as on Slurm) and, though the shell dies of it at once, is given the time to finish its save."""
    run, ready, saved = tmp_path / "run", tmp_path / "ready", tmp_path / "saved"
    prog = (f"import pathlib, signal, sys, time\n"
            f"def save(*a):\n    time.sleep(1.0); pathlib.Path({str(saved)!r}).touch(); sys.exit(75)\n"
            "signal.signal(signal.SIGUSR1, save)\n"
            f"pathlib.Path({str(ready)!r}).touch()\ntime.sleep(60)\n")
    (tmp_path / "prog.py").write_text(prog)
    shell = f"{sys.executable} {tmp_path / 'prog.py'}; exit $?"  # no trap: the shell dies of SIGUSR1
    p = subprocess.Popen(_supervise(run, "--max-restarts", "2", cmd=["sh", "-c", shell]), cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: ready.exists() or p.poll() is not None, "the program's handler", timeout=30, poll=0.02)
        p.send_signal(signal.SIGUSR1)
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 75, out
    assert saved.exists(), out  # its save was not cut short when the shell died


def test_a_shells_background_job_does_not_outlive_the_command(tmp_path: Path) -> None:
    """What a shell command started is killed with it: a crashed attempt leaves nothing running into the
    next one (nor after the supervisor gave up)."""
    run, pids = tmp_path / "run", tmp_path / "pids"
    shell = f"{sys.executable} -c 'import time; time.sleep(300)' & echo $! >> {pids}; sleep 0.3; exit 3"
    r = _run(_supervise(run, "--max-restarts", "1", cmd=["sh", "-c", shell]), timeout=60)
    assert r.returncode == 1, r.stderr
    started = [int(x) for x in pids.read_text().split()]
    assert len(started) == 2  # one background job per attempt

    def gone() -> bool:
        from foldhpc.resilience.runlock import proc_start

        return all(proc_start(pid) is None or proc_start(pid)[1] in "ZX" for pid in started)

    wait_for(gone, f"background jobs {started} still running", timeout=10, poll=0.05)


def test_a_hang_right_after_the_first_seen_training_beat_is_judged_by_the_hang_timeout(tmp_path: Path) -> None:
    """Steps faster than the supervisor's poll: the first beat it sees is already a later step's
    "train" beat (the burst below). A hang right then must be caught by fault.hang_timeout (2 s
    here), not by fault.startup_timeout (10 min): before heartbeat's "first" phase the supervisor
    needed a second observed beat to end start-up, and this one never comes."""
    run = tmp_path / "run"
    code = ("import time\nfrom foldhpc.resilience import heartbeat as hb\nb = hb.heartbeat()\n"
            "b.beat(1, 'first'); b.beat(1, 'train')\n"
            "for s in range(2, 40): b.beat(s, 'train'); b.beat(s, 'train')\n"
            "time.sleep(600)\n")
    r = _run(_supervise(run, "--set", "fault.max_restarts=0", "--set", "fault.hang_timeout=2s",
                        "--set", "fault.hang_floor=1s", "--set", "fault.startup_timeout=10m", cmd=_py(code)),
             timeout=120)
    assert r.returncode != 0, r.stderr
    hung = [e for e in _events(run) if e["kind"] == "supervisor_hang"]
    assert len(hung) == 1 and hung[0]["source"] == "fault.hang_timeout", hung
    assert hung[0]["step"] == 39 and hung[0]["timeout_s"] == 2.0, hung
