"""foldhpc's metrics through the real monitoring path: node_exporter's textfile collector, scraped by
Prometheus, which evaluates configs/prometheus/foldhpc-alerts.yml (issue 25, item 4).

Debian's /usr/bin/prometheus and /usr/bin/prometheus-node-exporter run on 127.0.0.1 on free ports
(tests/prometheus/servers.py); the tests ask Prometheus's HTTP API what it sees. Skipped where the
binaries are missing, a failure instead with FOLDHPC_REQUIRE_PROMETHEUS=1 (.ci/run sets it as root,
after apt-get installs both packages).

Duration: ~45 s for the file on an idle 2-core machine (`pytest tests/test_prometheus_e2e.py
--durations=8`): ~6 s per test to start the servers (5 of them Prometheus's first target discovery,
which it batches every 5 s), ~11 s per end-to-end body (trainer start overlapped with the servers',
6 s of a running run with the alert quiet, ~3 s from SIGSTOP to firing, the clear after SIGCONT).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT, TINY, foldhpc_cmd, set_args, tiny_overrides
from prometheus.servers import REQUIRE_ENV, RULES_FILE, Stack, missing_binaries, poll, running_stack

HUNG = "FoldhpcRunHung"


@pytest.fixture
def servers_installed() -> None:
    """Skip (fail with FOLDHPC_REQUIRE_PROMETHEUS=1) where Debian's binaries are missing, before
    anything is started."""
    missing = missing_binaries()
    if missing:
        reason = f"not installed: {', '.join(missing)} (apt-get install prometheus prometheus-node-exporter)"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but {reason}", pytrace=False)
        pytest.skip(f"{reason}; set {REQUIRE_ENV}=1 to make this a failure")


@pytest.fixture
def stack(servers_installed: None, tmp_path: Path) -> Iterator[Stack]:
    """node_exporter on tmp_path/textfile + Prometheus with foldhpc's rules, both ended by PID after the test."""
    # rule_files are globs to Prometheus: a missing file is no error there, so it is checked here
    assert RULES_FILE.is_file(), f"{RULES_FILE} is missing"
    with running_stack(tmp_path / "servers", tmp_path / "textfile", [RULES_FILE]) as s:
        names = s.api.rule_names()
        assert HUNG in names, f"{RULES_FILE} has no alert {HUNG} (Prometheus loaded: {sorted(names)})\n{s.logs()}"
        yield s


def write_prom(directory: Path, name: str, text: str) -> None:
    """Atomically replace ``directory/name`` (the way a textfile writer must: node_exporter may read at any time)."""
    tmp = directory / f".{name}.tmp"
    tmp.write_text(text)
    os.replace(tmp, directory / name)


def static_run_metrics(run: str, step: int, last_step_ts: float, bound_s: float) -> str:
    return (f'# TYPE foldhpc_run_step gauge\nfoldhpc_run_step{{run="{run}"}} {step}\n'
            f'# TYPE foldhpc_run_state gauge\nfoldhpc_run_state{{run="{run}",state="running"}} 1\n'
            f'foldhpc_run_state{{run="{run}",state="completed"}} 0\n'
            f'# TYPE foldhpc_run_last_step_timestamp_seconds gauge\n'
            f'foldhpc_run_last_step_timestamp_seconds{{run="{run}"}} {last_step_ts}\n'
            f'# TYPE foldhpc_run_hang_bound_seconds gauge\nfoldhpc_run_hang_bound_seconds{{run="{run}"}} {bound_s}\n')


def test_harness_two_runs_on_one_node_only_the_stuck_one_is_hung(stack: Stack) -> None:
    """The servers without foldhpc (hand-written files): a .prom file in the textfile directory
    reaches Prometheus and a rewrite of it is seen; of two runs published on one node (one target,
    so the same instance and job labels) the hung alert fires for the one whose last step is older
    than its bound, not for the fresh one. Where the end-to-end test below fails, this one says
    whether the servers or foldhpc are to blame."""
    now = time.time()
    write_prom(stack.textfile_dir, "fresh.prom", static_run_metrics("/runs/fresh", 5, now, 3600))
    poll(lambda: stack.api.values("foldhpc_run_step"), lambda v: v.get("/runs/fresh") == 5,
         "foldhpc_run_step 5 of /runs/fresh", timeout=15)
    write_prom(stack.textfile_dir, "fresh.prom", static_run_metrics("/runs/fresh", 7, now, 3600))
    write_prom(stack.textfile_dir, "stuck.prom", static_run_metrics("/runs/stuck", 3, now - 600, 60))
    poll(lambda: stack.api.values("foldhpc_run_step"), lambda v: v == {"/runs/fresh": 7, "/runs/stuck": 3},
         "the rewritten file and the second run", timeout=15)
    poll(lambda: stack.api.alert_states(HUNG, run="/runs/stuck"), lambda s: s == ["firing"],
         f"{HUNG} firing for /runs/stuck", timeout=15)
    assert stack.api.alert_states(HUNG, run="/runs/fresh") == []


HANG_AFTER_S = 3  # monitor.hang_after of the e2e run: short, but > 10 steps of ~0.2 s


@dataclass
class Training:
    proc: subprocess.Popen[bytes]  # `foldhpc train`: the trainer itself, or its supervisor
    supervised: bool
    run_dir: Path
    log_path: Path  # its stdout and stderr

    def pid(self, timeout: float = 30) -> int:
        """The PID of the process that trains: ``proc``, or the supervisor's only child (from /proc)."""
        if not self.supervised:
            return self.proc.pid
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        kids = poll(lambda: [int(c) for c in path.read_text().split()], lambda c: len(c) == 1,
                    f"the trainer child of supervisor {self.proc.pid}", timeout=timeout)
        return kids[0]

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(params=["no-supervise", "supervise"])
def trainer(request: pytest.FixtureRequest, servers_installed: None,
            tmp_path: Path) -> Iterator[Training]:
    """A real `foldhpc train` (foldhpc's own watchdog off) whose .prom file is rewritten every second,
    and that would run for hours (steps slowed to ~0.2 s): alone (the trainer publishes) or under its
    supervisor (the supervisor publishes, as in a Slurm job, and goes on doing so while the trainer
    is stopped). Started before the servers so its start-up overlaps theirs; ended by its PID
    (SIGCONT, SIGTERM, SIGKILL) after the test."""
    from foldhpc.records.envvars import STEP_DELAY

    run_dir, textfile = tmp_path / "run", tmp_path / "textfile"
    textfile.mkdir()
    overrides = tiny_overrides(run_dir, **{"train.max_steps": 100_000, "monitor.textfile_dir": str(textfile),
                                           "monitor.textfile_every": "1s", "fault.hang_timeout": "0",
                                           "monitor.hang_after": f"{HANG_AFTER_S}s"})
    log_path = tmp_path / "trainer.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(foldhpc_cmd("train", "--config", str(TINY), *set_args(overrides), f"--{request.param}"),
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                                env=dict(os.environ, **{STEP_DELAY: "0.2"}))
    try:
        yield Training(proc, request.param == "supervise", run_dir, log_path)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.terminate()  # a preemption signal to foldhpc: it saves and exits 75
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.mark.timeout(180)
def test_real_run_step_advances_then_sigstop_fires_hung_alert(
        trainer: Training, stack: Stack) -> None:
    """The issue's end-to-end check: Prometheus, through node_exporter, sees a real run's step advance;
    the hung alert stays quiet while it runs (for longer than its hang bound), fires once the trainer
    is SIGSTOPped (foldhpc's own watchdog is off, so only the monitoring can notice), and clears again
    after SIGCONT."""
    proc, run_dir = trainer.proc, trainer.run_dir
    run = str(run_dir)
    t0 = time.monotonic()

    def step() -> float | None:
        assert proc.poll() is None, f"the trainer exited with {proc.returncode}:\n{trainer.tail()}"
        return stack.api.values("foldhpc_run_step").get(run)

    def hung_states() -> list[str]:
        return stack.api.alert_states(HUNG, run=run)

    try:
        first = poll(step, lambda v: v is not None and v > 0, f"foldhpc_run_step{{run={run!r}}} > 0", timeout=60)
    except TimeoutError as e:
        files = sorted(p.name for p in stack.textfile_dir.iterdir())
        raise AssertionError(f"{e}\ntextfile dir: {files}\nall series: {stack.api.values('foldhpc_run_step')}\n"
                             f"trainer log:\n{trainer.tail()}\n{stack.logs()}") from None
    published = sorted(stack.textfile_dir.glob("*.prom"))
    assert [p.name.startswith(f"foldhpc-{run_dir.name}-") for p in published] == [True], published
    # in production node_exporter runs as its own user (Debian: prometheus), not as the trainer's
    assert published[0].stat().st_mode & 0o004, f"{published[0]} is not world-readable"
    # Running: the step keeps advancing, and for longer than the hang bound the alert stays inactive
    # (a rule that fired on a healthy run, or one that read a value frozen in the file, fails here).
    quiet_from = time.monotonic()
    quiet_until = quiet_from + HANG_AFTER_S + 3
    assert first is not None
    seen: list[float] = [first]
    while time.monotonic() < quiet_until or len(seen) < 2:
        assert hung_states() == [], f"{HUNG} active for a running run (steps seen {seen}):\n{stack.api.alerts()}"
        v = step()
        if v is not None and v > seen[-1]:
            seen.append(v)
        assert time.monotonic() - quiet_from < 30, f"step did not advance past {seen} in 30 s"
        time.sleep(0.5)
    assert seen == sorted(seen) and len(seen) >= 2, seen
    bound = stack.api.values("foldhpc_run_hang_bound_seconds").get(run)
    assert bound == HANG_AFTER_S, f"foldhpc_run_hang_bound_seconds of {run}: {bound} (monitor.hang_after)"

    pid = trainer.pid()
    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        poll(hung_states, lambda s: s == ["firing"], f"{HUNG} firing for {run} after SIGSTOP",
             timeout=HANG_AFTER_S + 20)
        fired_after = time.monotonic() - stopped_at
        frozen = step()

        def staleness() -> float:  # how much newer the published figures are than the run's last step
            got = stack.api.values("foldhpc_run_metrics_timestamp_seconds - foldhpc_run_last_step_timestamp_seconds")
            return got.get(run, -1.0)

        if trainer.supervised:  # the supervisor publishes on while its trainer is stopped
            poll(staleness, lambda d: d > HANG_AFTER_S, "the supervisor's figures newer than the stopped step",
                 timeout=10)
        else:  # the trainer published its own figures: they froze with it
            assert 0 <= staleness() < HANG_AFTER_S, staleness()
        alert = next(a for a in stack.api.alerts() if a["labels"].get("alertname") == HUNG)
        assert alert["labels"].get("run") == run and alert["labels"].get("severity") == "critical", alert
    finally:
        os.kill(pid, signal.SIGCONT)
    # Resumed: the step moves past where it froze and the alert clears.
    poll(step, lambda v: v is not None and frozen is not None and v > frozen, "step advancing after SIGCONT",
         timeout=20)
    poll(hung_states, lambda s: s == [], f"{HUNG} cleared after SIGCONT", timeout=HANG_AFTER_S + 15)
    print(f"steps seen {seen}, {HUNG} firing {fired_after:.1f} s after SIGSTOP (bound {HANG_AFTER_S} s), "
          f"test body {time.monotonic() - t0:.1f} s")
