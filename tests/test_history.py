"""jobs.jsonl: typed events write the lines the untyped ``record_event`` wrote (readers read dicts)."""

from __future__ import annotations

import json

import pytest

from foldhpc.cluster.env import SlurmEnv
from foldhpc.records import history
from foldhpc.records.history import (ABSENT, EVENTS, Completed, Failed, FollowedUp, FollowupCancelled, Refused,
                                     Requeued, Started, Stopped, Submitted, or_absent, read_history, record_event,
                                     record_started, write_event)
from foldhpc.records.layout import HISTORY_FILE

#: each typed event beside the record_event call it replaces (the call shapes written before the types)
PAIRS = [
    (Submitted(job_id="7", backend="slurm", partition=""),
     ("submitted", dict(job_id="7", backend="slurm", partition=""))),
    (Submitted(job_id="8", backend="slurm", partition=None, followup_of="7", chain_restarts=2),
     ("submitted", dict(job_id="8", backend="slurm", partition=None, followup_of="7", chain_restarts=2))),
    (Submitted(job_id="9_1", backend="slurm", partition="debug", sweep="/s", array_task=1),
     ("submitted", dict(job_id="9_1", backend="slurm", partition="debug", sweep="/s", array_task=1))),
    (Started(job_id=None, restart_count=0), ("started", dict(job_id=None, restart_count=0))),
    (Started(job_id="7", restart_count=1, world_size=4), ("started", dict(job_id="7", restart_count=1, world_size=4))),
    (Started(job_id="7", restart_count=0, backend="sbatch", supervised=True),
     ("started", dict(job_id="7", restart_count=0, backend="sbatch", supervised=True))),
    (Completed(job_id="7", step=40), ("completed", dict(job_id="7", step=40))),
    (Failed(job_id=None, error="RuntimeError: x"), ("failed", dict(job_id=None, error="RuntimeError: x"))),
    (Failed(job_id="7", error="E: y", rank=1, node="n2"), ("failed", dict(job_id="7", error="E: y", rank=1, node="n2"))),
    # the submitit job's decision: step and signal always (a null signal too)
    (Stopped(job_id="7", restart_count=0, why="ending", reason="r", step=5, signal=None),
     ("stopped", dict(job_id="7", step=5, signal=None, restart_count=0, why="ending", reason="r"))),
    # python -m foldhpc.slurm.requeue: no signal, step only where known
    (Requeued(job_id="7", restart_count=1, why="requeue", reason="r", step=or_absent(None)),
     ("requeued", dict(job_id="7", restart_count=1, why="requeue", reason="r"))),
    (FollowedUp(job_id="7", followup_job_id="8", chain_restarts=1, restart_count=0, reason="r", step=3),
     ("followup", dict(job_id="7", followup_job_id="8", chain_restarts=1, restart_count=0, reason="r", step=3))),
    (FollowupCancelled(job_id="8", followup_of="7", reason="r"),
     ("followup_cancelled", dict(job_id="8", followup_of="7", reason="r"))),
    (Refused(job_id="7", restart_count=0, holder={"pid": 3}, reason="in use"),
     ("refused", dict(job_id="7", restart_count=0, holder={"pid": 3}, reason="in use"))),
    (history.Restarted(job_id="7", attempt=1, step=4, reason="crash", rank=1),
     ("restarted", dict(job_id="7", attempt=1, step=4, reason="crash", rank=1))),
    (history.GaveUp(job_id=None, reason="r", step=4, in_job_restarts=2),
     ("gave_up", dict(job_id=None, reason="r", step=4, in_job_restarts=2))),
]


def _lines(run_dir) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / HISTORY_FILE).read_text().splitlines()]


@pytest.mark.parametrize("typed,untyped", PAIRS, ids=[f"{p[1][0]}-{i}" for i, p in enumerate(PAIRS)])
def test_typed_event_writes_the_untyped_line(tmp_path, typed, untyped, monkeypatch):
    monkeypatch.setattr(history.time, "time", lambda: 1700000000.25)
    write_event(tmp_path / "a", typed)
    record_event(tmp_path / "b", untyped[0], **untyped[1])
    a, b = (tmp_path / "a" / HISTORY_FILE).read_bytes(), (tmp_path / "b" / HISTORY_FILE).read_bytes()
    assert a == b
    assert read_history(tmp_path / "a") == ([json.loads(a)], 0)


def test_absent_is_left_out_and_none_is_null(tmp_path):
    """Readers tell them apart: the no-progress count skips a decision whose line has no "step"."""
    write_event(tmp_path, Stopped(job_id="7", restart_count=0, why="x", reason="r", signal=None))
    (e,) = _lines(tmp_path)
    assert "step" not in e and e["signal"] is None
    assert or_absent(None) is ABSENT and or_absent(0) == 0


def test_every_event_written_today_has_a_type():
    assert set(EVENTS) == {"submitted", "started", "completed", "failed", "requeued", "stopped", "followup",
                           "followup_cancelled", "refused", "restarted", "gave_up"}
    with pytest.raises(TypeError):
        Started(job_id="7", restart_count=0, step=3)  # type: ignore[call-arg]  # a field it does not have


def test_record_started_is_the_one_home_of_the_started_event(tmp_path):
    record_started(tmp_path, SlurmEnv("42", 2), backend="sbatch", supervised=True)
    record_started(tmp_path, SlurmEnv(None, 0))
    first, second = _lines(tmp_path)
    assert {k: v for k, v in first.items() if k not in ("time", "host")} == {
        "event": "started", "job_id": "42", "restart_count": 2, "backend": "sbatch", "supervised": True}
    assert {k: v for k, v in second.items() if k not in ("time", "host")} == {
        "event": "started", "job_id": None, "restart_count": 0}


def test_started_is_written_through_record_started_only():
    """No caller spells the "started" event itself (cli.py wrote it twice and slurm/job.py once)."""
    import ast

    from conftest import ROOT

    def name(call: ast.Call) -> str:
        return getattr(call.func, "id", None) or getattr(call.func, "attr", "")

    spelled = []
    for path in (ROOT / "foldhpc").rglob("*.py"):
        if path.name == "history.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and (name(node) == "Started" or name(node) == "record_event" and any(
                    isinstance(a, ast.Constant) and a.value == "started" for a in node.args)):
                spelled.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert spelled == []
