"""``foldhpc goodput``: real supervised runs with a SIGKILL after a checkpoint (the same figures with
and without train.log: goodput reads events.jsonl), a plain run, and a hand-written Slurm history
with a requeue (queue wait from jobs.jsonl's submitted -> started, the trainers' events.jsonl)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, TINY, foldhpc_cmd, run_foldhpc, set_args, tiny_overrides
from foldhpc.monitor.goodput import compute
from foldhpc.monitor.timeline import CATEGORIES, build_timeline
from foldhpc.records.events import VERSION, check_fields, read_events

STEPS = 30  # configs/tiny.toml
CKPT_EVERY = 10
FAIL_AT = 25  # SIGKILL right after this step: the newest checkpoint is step 20


def train(run: Path, env: dict[str, str] | None = None, supervise: bool = True) -> subprocess.CompletedProcess:
    args = ["train", "--config", str(TINY),
            *set_args(tiny_overrides(run, **{"checkpoint.every_steps": CKPT_EVERY, "fault.restart_backoff": "0.2s"}))]
    p = subprocess.run(foldhpc_cmd(*args, "--supervise" if supervise else "--no-supervise"), cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, **(env or {})))
    assert p.returncode == 0, p.stderr[-3000:]
    return p


_KILLED: list[Path] = []


def killed_run(tmp_path: Path) -> Path:
    """A supervised tiny run SIGKILLed once right after step FAIL_AT, restarted from step 20.

    Trained once per session, in the first caller's ``tmp_path`` (two trainer processes, ~11 s),
    and shared: a caller may add outputs (goodput's TensorBoard folder, timeline.png), and one that
    changes what the run recorded puts it back (the run's files name its directory: a copy would
    be read through those paths, so no copy)."""
    if not _KILLED:
        run = tmp_path / "killed"
        train(run, {"FOLDHPC_FAIL_AT_STEP": str(FAIL_AT), "FOLDHPC_FAIL_KIND": "kill",
                    "FOLDHPC_FAIL_ONCE": str(tmp_path / "fired")})
        _KILLED.append(run)
    return _KILLED[0]


def goodput_json(run: Path, *flags: str) -> dict:
    p = run_foldhpc("goodput", str(run), "--json", "--no-sacct", *flags)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def assert_adds_up(g: dict) -> None:
    assert set(g["seconds"]) == set(CATEGORIES)
    assert all(v >= 0 for v in g["seconds"].values()), g["seconds"]
    assert sum(g["seconds"].values()) == pytest.approx(g["wall_s"], rel=0.01)
    assert g["allocated_s"] == pytest.approx(g["wall_s"] - g["seconds"]["queue_wait"], rel=1e-6)
    for row in g["processes"] + g["jobs"]:
        assert row["goodput"] is None or 0 <= row["goodput"] <= 1


def test_sigkill_after_a_checkpoint_counts_the_recomputed_steps(tmp_path):
    run = killed_run(tmp_path)
    events, scan = read_events(run)
    assert scan.notes() == []
    resumed = [e for e in events if e.kind == "resumed"]
    # it resumed from the newest checkpoint before the kill
    assert [(Path(e["path"]).name, e["step"]) for e in resumed] == [("step_00000020.ckpt", 20)]
    g = goodput_json(run, "--tensorboard")
    assert_adds_up(g)
    ckpt = FAIL_AT // CKPT_EVERY * CKPT_EVERY
    assert g["steps"]["recomputed"] == FAIL_AT - ckpt == 5
    assert g["steps"]["productive"] == STEPS
    # every step executed (one progress record each; the step the trainer died in has none) is counted once
    logged = sum(e["steps"] for e in events if e.kind == "progress")
    assert g["steps"]["executed"] == logged + 1 == STEPS + FAIL_AT - ckpt
    assert g["seconds"]["recomputed"] > 0 and g["seconds"]["productive"] > 0 and g["seconds"]["startup"] > 0
    # the supervisor's 0.2 s restart back-off, less what the segments' edges round off: they come
    # from the records' times and from durations the trainer reports (CI once measured 0.1997 s)
    assert g["seconds"]["idle"] >= 0.18
    assert g["seconds"]["queue_wait"] == 0 and g["jobs"] == []  # no Slurm here
    first, second = g["processes"]
    assert (first["start_step"], first["last_step"], second["start_step"], second["last_step"]) == (0, FAIL_AT, ckpt, STEPS)
    assert "SIGKILL" in first["outcome"] and second["outcome"] == "completed"
    assert first["steps"]["recomputed"] == 5 and second["steps"]["recomputed"] == 0
    assert second["startup"]["checkpoint_load_s"] >= 0 and "process_to_first_step_s" in first["startup"]
    assert g["goodput"] == pytest.approx(g["seconds"]["productive"] / g["allocated_s"])
    # --tensorboard: the same figures, read back with TensorBoard's reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard" / "goodput"))
    acc.Reload()
    assert acc.Scalars("goodput/fraction")[-1].value == pytest.approx(g["goodput"], rel=1e-5)
    assert acc.Scalars("goodput/recomputed_steps")[-1].value == 5
    assert acc.Scalars("goodput/recomputed_steps")[-1].step == STEPS
    # the human table says the same
    p = run_foldhpc("goodput", str(run), "--no-sacct")
    assert p.returncode == 0
    assert re.search(r"^recomputed +[\d.]+ +[\d.]+% +5$", p.stdout, re.M), p.stdout
    assert "goodput = productive / allocated" in p.stdout


def test_goodput_of_a_killed_run_does_not_need_train_log(tmp_path):
    """Acceptance (issue 20): goodput reads events.jsonl, never train.log: the same steps and wall
    time with the log and without it (before: without it, wall 0 s and no steps)."""
    run = killed_run(tmp_path)
    with_log = goodput_json(run)
    (run / "train.log").rename(tmp_path / "train.log.aside")
    try:
        without = goodput_json(run)
    finally:
        (tmp_path / "train.log.aside").rename(run / "train.log")  # the shared run as it was
    assert with_log["steps"] == without["steps"] == {"productive": STEPS, "recomputed": FAIL_AT - 20,
                                                     "executed": STEPS + FAIL_AT - 20}
    assert without["wall_s"] > 0
    assert without["wall_s"] == pytest.approx(with_log["wall_s"], rel=0.01)
    assert_adds_up(without)
    assert without["seconds"] == pytest.approx(with_log["seconds"], abs=1e-6)
    assert [p["outcome"] for p in without["processes"]] == [p["outcome"] for p in with_log["processes"]]
    assert "train.log" not in without["sources"] and "events.jsonl" in without["sources"]
    assert not any("events" in n for n in without["notes"]), without["notes"]


def test_uninterrupted_run(tmp_path):
    run = tmp_path / "plain"
    train(run, supervise=False)
    g = goodput_json(run)
    assert_adds_up(g)
    assert g["steps"] == {"productive": STEPS, "recomputed": 0, "executed": STEPS}
    assert g["seconds"]["recomputed"] == 0 and g["seconds"]["queue_wait"] == 0
    assert len(g["processes"]) == 1 and g["processes"][0]["outcome"] == "completed"
    assert not g["running"] and 0 < g["goodput"] < 1
    # the startup the trainer measured is what goodput counts for it (process start to first step)
    st = json.loads((run / "status.json").read_text())["startup"]
    assert g["processes"][0]["seconds"]["startup"] == pytest.approx(st["process_to_first_step_s"], abs=0.02)


# ------------------------------------------------------------------ a Slurm history, by hand
JOB = "424242"


def event(t: float, pid: int, kind: str, rank: int | None = 0, **fields: object) -> dict:
    """One events.jsonl record as a trainer (rank 0) or the supervisor (rank None) writes it; its
    fields checked against the schema as EventLog checks them."""
    check_fields(kind, fields)
    return {"v": VERSION, "t": t, "pid": pid, "rank": rank, "kind": kind, **fields}


def write_events(run: Path, records: list[dict]) -> None:
    """``run/events.jsonl`` with ``records`` in time order (as the processes appended them)."""
    with open(run / "events.jsonl", "w") as f:
        for r in sorted(records, key=lambda r: r["t"]):
            f.write(json.dumps(r) + "\n")


def progress(t: float, pid: int, step: int, max_steps: int, samples_per_s: float, data_wait_frac: float,
             steps: int = 1) -> dict:
    return event(t, pid, "progress", step=step, max_steps=max_steps, loss=4.0, lr=1e-3, grad_norm=0.5,
                 samples_per_s=samples_per_s, data_wait_frac=data_wait_frac, steps=steps)


def write_requeue_fixture(run: Path, base: float = 1_790_000_000.0) -> dict[str, float]:
    """A run of job JOB: submitted, 30 s in the queue, trains steps 0..4, SIGUSR1, checkpoint, requeued,
    12 s in the queue again, resumes at 4, completes at 10. Returns the instants it used."""
    run.mkdir(parents=True)
    t = {"submitted": base, "started0": base + 30, "p1": base + 30.5, "requeued": base + 40,
         "started1": base + 52, "p2": base + 52.5, "end": base + 60}
    history = [("submitted", t["submitted"], {"backend": "slurm"}), ("started", t["started0"], {"restart_count": 0}),
               ("requeued", t["requeued"], {"step": 4, "signal": "SIGUSR1", "restart_count": 0}),
               ("started", t["started1"], {"restart_count": 1}), ("completed", t["end"], {"step": 10})]
    with open(run / "jobs.jsonl", "w") as f:
        for ev, when, extra in history:
            f.write(json.dumps({"event": ev, "time": when, "job_id": JOB, "host": "n1", **extra}) + "\n")
    records: list[dict] = []

    def trainer(pid: int, p0: float, s0: int, s1: int, resumed: bool) -> float:
        records.append(event(p0 + 0.5, pid, "process_start", process_start_t=p0, max_steps=10))
        if resumed:
            records.append(event(p0 + 1.4, pid, "resumed", path=f"ck/step_{s0:08d}.ckpt", step=s0, restarts=1))
        records.append(event(p0 + 1.5, pid, "training", first=s0, last=10, batch=2))
        records.append(event(p0 + 2.0, pid, "first_step", step=s0 + 1, step_s=0.5, after_start_s=2.0,
                             timings={"imports_s": 1.0, "data_s": 0.1, "setup_s": 0.4, "first_step_s": 0.5,
                                      "process_to_first_step_s": 2.0}))
        for i, s in enumerate(range(s0 + 1, s1 + 1)):  # 0.5 s a step, 10 % of it waiting for data
            records.append(progress(p0 + 2.0 + 0.5 * i, pid, s, 10, 4.0, 0.1))
        return p0 + 2.0 + 0.5 * (s1 - s0 - 1)

    last = trainer(101, t["p1"], 0, 4, False)
    records.append(event(last + 0.1, 101, "signal", signal="SIGUSR1", step=4))
    records.append(event(last + 0.4, 101, "checkpoint_durable", step=4, after_boundary_s=0.3))
    records.append(event(last + 0.4, 101, "checkpointed", step=4, signal="SIGUSR1"))
    last = trainer(202, t["p2"], 4, 10, True)
    records.append(event(last + 0.2, 202, "checkpoint_committed", step=10, reason="final", bytes=300_000,
                         write_s=0.2, path="ck/step_00000010.ckpt"))
    records.append(event(last + 0.3, 202, "completed", step=10))
    write_events(run, records)
    (run / "status.json").write_text(json.dumps({"state": "completed", "step": 10, "max_steps": 10, "pid": 202,
                                                 "host": "n1", "finished_at": last + 0.35}))
    return t


def test_queue_wait_from_jobs_jsonl_with_a_requeue(tmp_path):
    run = tmp_path / "slurm-run"
    t = write_requeue_fixture(run)
    tl = build_timeline(run, use_sacct=False)
    g = compute(tl)
    queue = (t["started0"] - t["submitted"]) + (t["started1"] - t["requeued"])
    assert g.seconds["queue_wait"] == pytest.approx(queue, abs=1e-6) == 42
    assert g.start == t["submitted"] and not g.running
    assert sum(g.seconds.values()) == pytest.approx(g.wall_s, rel=1e-9)
    assert g.allocated_s == pytest.approx(g.wall_s - queue)
    assert g.steps == {"productive": 10, "recomputed": 0, "executed": 10}  # a checkpoint on the signal: nothing lost
    assert g.seconds["checkpoint"] == pytest.approx(0.3 + 0.2, abs=0.01)  # the signal's and the final save
    assert g.seconds["data_wait"] == pytest.approx(0.1 * 0.5 * 8, abs=0.01)  # 8 windows after the first steps
    # startup: launch to the trainer's start (0.5 s per job run) + each trainer's 2 s to its first step
    assert g.seconds["startup"] == pytest.approx(2 * (0.5 + 2.0), abs=0.01)
    assert [(j.label, j.seconds["queue_wait"]) for j in g.jobs] == [(f"job {JOB}", 30), (f"job {JOB} run 1", 12)]
    assert [p.label for p in g.processes] == [f"job {JOB} · pid 101", f"job {JOB} run 1 · pid 202"]
    assert [p.outcome for p in g.processes] == ["checkpointed", "completed"]
    kinds = [m.kind for m in tl.marks]
    assert kinds.count("submitted") == 1 and kinds.count("requeue") == 1 and "signal" in kinds
    # the CLI on it, without sacct
    p = run_foldhpc("goodput", str(run), "--no-sacct")
    assert p.returncode == 0, p.stderr
    assert re.search(r"^queue_wait +42\.000 ", p.stdout, re.M), p.stdout
    assert f"job {JOB} run 1" in p.stdout


def test_not_a_run_directory(tmp_path):
    p = run_foldhpc("goodput", str(tmp_path / "nope"))
    assert p.returncode == 2 and "no such run directory" in p.stderr
    (tmp_path / "empty").mkdir()
    p = run_foldhpc("goodput", str(tmp_path / "empty"))
    assert p.returncode == 2 and "not a foldhpc run directory" in p.stderr
