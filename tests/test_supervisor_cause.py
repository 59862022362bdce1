"""The supervisor's "deterministic failure" verdict over several ranks: the same failure at the same
step is the same even though each start's culprit has another pid (it was restarted up to
fault.max_restarts times, with doubling back-off: 51 s instead of 9 s in tests/test_distributed.py)."""

from __future__ import annotations

from pathlib import Path

from foldhpc.config import Config
from foldhpc.resilience.supervisor import Failure, Supervisor


def _supervisor(tmp_path: Path) -> Supervisor:
    cfg = Config()
    cfg.run.dir = str(tmp_path / "run")
    return Supervisor(cfg, [], [], nproc=2)


def test_the_same_rank_failure_with_another_pid_is_deterministic(tmp_path: Path) -> None:
    sup = _supervisor(tmp_path)
    first = Failure(1, 12, "train", "rank 1 failed", cause="rank 1 on vm (pid 8043): RuntimeError: boom")
    again = Failure(1, 12, "train", "rank 1 failed", cause="rank 1 on vm (pid 9120): RuntimeError: boom")
    sup.failures = [first, again]
    assert sup._deterministic(again)


def test_another_cause_or_step_is_not(tmp_path: Path) -> None:
    sup = _supervisor(tmp_path)
    first = Failure(1, 12, "train", "x", cause="rank 1 on vm (pid 8043): RuntimeError: boom")
    for other in (Failure(1, 13, "train", "x", cause="rank 1 on vm (pid 9120): RuntimeError: boom"),
                  Failure(1, 12, "train", "x", cause="rank 1 on vm (pid 9120): OSError: disk"),
                  Failure(0, 12, "train", "x", cause="rank 0 on vm (pid 9120): RuntimeError: boom")):
        sup.failures = [first, other]
        assert not sup._deterministic(other), other
