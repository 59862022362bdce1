"""The typed records at the seams of foldhpc.records: status.json's schema (RunStatus), and the
Protocols that the real writers and their null stand-ins share (StatusSink, ScalarSink).

The conformance is checked twice: at run time here (runtime_checkable isinstance), and statically
by mypy through tests/test_lint.py, which type-checks foldhpc.records (the assignments to
Protocol-typed names below are what mypy verifies: a missing or re-typed method fails it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from foldhpc.records.events import EventLog, EventSink, NullEventLog
from foldhpc.records.status import (
    STATUS_FIELDS,
    NullStatus,
    RunStatus,
    StatusFile,
    StatusSink,
    read_run_status,
    read_status,
)
from foldhpc.records.tensorboard import NullWriter, RunWriter, ScalarSink


def test_unknown_field_is_refused_with_its_name(tmp_path: Path) -> None:
    status = StatusFile(tmp_path)
    status.update(state="running", step=3)
    with pytest.raises(TypeError, match="'stpe'"):
        status.update(stpe=4, step=4)
    # nothing of the refused update is recorded, in memory or on disk
    assert read_status(tmp_path) == status.data
    assert status.data["step"] == 3 and "stpe" not in status.data
    with pytest.raises(TypeError, match="'stpe'"):
        NullStatus().update(stpe=4)  # the same typo fails on ranks that write nothing


def test_every_declared_field_can_be_written(tmp_path: Path) -> None:
    status = StatusFile(tmp_path)
    status.update(**{name: None for name in STATUS_FIELDS})
    assert set(read_status(tmp_path) or {}) == set(STATUS_FIELDS)
    assert "extra" not in STATUS_FIELDS  # RunStatus's own, not a field of the file


def test_written_status_reads_back_typed(tmp_path: Path) -> None:
    status = StatusFile(tmp_path)
    status.update(state="completed", step=10, max_steps=10, loss=2, metrics={"distogram_loss": 3.5},
                  nodes=["n1"], last_checkpoint={"step": 10, "file": "step_10.pt", "saved_at": 1.0})
    rs = read_run_status(tmp_path)
    assert rs is not None
    assert (rs.state, rs.step, rs.max_steps, rs.metrics, rs.nodes) == ("completed", 10, 10, {"distogram_loss": 3.5},
                                                                      ["n1"])
    assert rs.loss == 2.0 and isinstance(rs.loss, float)  # JSON's 2 is the float field's 2.0
    assert isinstance(rs.pid, int) and isinstance(rs.host, str) and isinstance(rs.updated_at, float)
    assert rs.extra == {} and rs.to_dict() == read_status(tmp_path)


def test_typed_read_of_an_older_file_with_fewer_fields(tmp_path: Path) -> None:
    (tmp_path / "status.json").write_text('{"state": "running", "step": 40, "max_steps": 100}')
    rs = read_run_status(tmp_path)
    assert rs == RunStatus(state="running", step=40, max_steps=100)
    assert rs.in_job_restarts is None and rs.nodes is None and rs.extra == {}


def test_typed_read_of_a_newer_file_with_an_extra_field(tmp_path: Path) -> None:
    (tmp_path / "status.json").write_text(json.dumps({"state": "completed", "step": 3, "gpu_hours": 1.5}))
    rs = read_run_status(tmp_path)
    assert rs is not None and (rs.state, rs.step) == ("completed", 3)
    assert rs.extra == {"gpu_hours": 1.5}
    assert rs.to_dict() == {"state": "completed", "step": 3, "gpu_hours": 1.5}
    # a StatusFile of this version keeps the newer field it loaded while it updates known ones
    status = StatusFile(tmp_path)
    status.update(step=4)
    assert (read_status(tmp_path) or {})["gpu_hours"] == 1.5


def test_typed_read_of_a_wrongly_typed_field_is_none(tmp_path: Path) -> None:
    (tmp_path / "status.json").write_text('{"state": 7, "step": true, "loss": "nan?", "max_steps": 5}')
    rs = read_run_status(tmp_path)
    assert rs == RunStatus(max_steps=5)


def test_typed_read_missing_and_corrupt(tmp_path: Path) -> None:
    assert read_run_status(tmp_path) is None
    (tmp_path / "status.json").write_text('{"state": ')
    with pytest.raises(ValueError, match="corrupt"):
        read_run_status(tmp_path)


def test_null_objects_conform_to_their_protocols(tmp_path: Path) -> None:
    # statically checked by mypy (tests/test_lint.py); at run time by runtime_checkable isinstance
    sinks: list[StatusSink] = [StatusFile(tmp_path), NullStatus()]
    writer = RunWriter(tmp_path / "tb")
    try:
        scalars: list[ScalarSink] = [writer, NullWriter()]
        assert all(isinstance(s, ScalarSink) for s in scalars)
    finally:
        writer.close()
    events: list[EventSink] = [EventLog(tmp_path), NullEventLog()]
    assert all(isinstance(s, StatusSink) for s in sinks)
    assert len(events) == 2
    # the Protocols are not vacuous: an object without their methods is neither
    assert not isinstance(object(), StatusSink) and not isinstance(object(), ScalarSink)
    # a NullStatus of one rank does not share its (empty) record with another's
    a, b = NullStatus(), NullStatus()
    a.data["x"] = 1
    assert b.data == {}


def test_pid_alive_says_no_for_a_zombie() -> None:
    """A child that exited but was not reaped yet still has its pid: it is dead all the same
    (a SIGKILLed rank before its supervisor polls; ranks.culprits must blame it)."""
    import os
    import subprocess
    import sys
    import time

    from foldhpc.records.fsio import pid_alive

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        assert pid_alive(os.getpid()) and pid_alive(live.pid)
        deadline = time.monotonic() + 30
        while pid_alive(dead.pid) and time.monotonic() < deadline:  # exited, never waited for
            time.sleep(0.05)
        assert not pid_alive(dead.pid)
        assert os.waitpid(dead.pid, os.WNOHANG)[0] == dead.pid  # it was a zombie: still ours to reap
    finally:
        live.kill()
        live.wait()
