"""The timeline from events.jsonl (issue 20): a supervised run with a SIGKILL, hangs and failures as
records; bad lines skipped, counted and noted; a clock stepped back; a large file streamed; a run
made before foldhpc recorded events (train.log only) gets its wall time with a note, or a one-line
error when nothing else is there -- never a silent 0."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import run_foldhpc
from foldhpc.monitor.goodput import compute, goodput_of
from foldhpc.monitor.timeline import NO_EVENTS_NOTE, build_timeline
from test_goodput import JOB, event, progress, write_events, write_requeue_fixture

BASE = 1_790_000_000.0
STARTUP = {"imports_s": 1.0, "data_s": 0.1, "setup_s": 0.4, "first_step_s": 0.1, "process_to_first_step_s": 2.0}


def trainer(pid: int, p0: float, s0: int, s1: int, max_steps: int, step_s: float = 0.1, resumed: bool = False,
            checkpoint_every: int = 0, write_s: float = 0.01) -> tuple[list[dict], float]:
    """The records of one trainer process (rank 0) started at ``p0``: steps s0+1..s1 of ``step_s``
    each, a background save every ``checkpoint_every`` steps. Returns them and the last step's time."""
    recs = [event(p0 + 0.5, pid, "process_start", process_start_t=p0, max_steps=max_steps)]
    if resumed:
        recs.append(event(p0 + 1.4, pid, "resumed", path=f"ck/step_{s0:08d}.ckpt", step=s0, restarts=1))
    recs.append(event(p0 + 1.5, pid, "training", first=s0, last=max_steps, batch=2))
    t = p0 + 2.0
    recs.append(event(t, pid, "first_step", step=s0 + 1, step_s=step_s, after_start_s=2.0, timings=STARTUP))
    for s in range(s0 + 1, s1 + 1):
        t = p0 + 2.0 + step_s * (s - s0 - 1)
        recs.append(progress(t, pid, s, max_steps, 2 / step_s, 0.0))
        if checkpoint_every and s % checkpoint_every == 0:
            recs.append(event(t + 0.001, pid, "checkpoint_staged", step=s, reason="steps"))
            recs.append(event(t + 0.002 + write_s, pid, "checkpoint_committed", step=s, reason="steps", bytes=1000,
                              write_s=write_s, path=f"ck/step_{s:08d}.ckpt"))
    return recs, t


def killed_run_records(run: Path) -> dict[str, float]:
    """A supervised run as events.jsonl records it: the trainer (pid 101) is SIGKILLed while working
    on step 26 (its newest checkpoint: step 20), the supervisor restarts it after 0.2 s, the new
    trainer (pid 202) resumes at 20 and completes step 30."""
    run.mkdir(parents=True)
    recs = [event(BASE, 11, "supervisor_spawn", rank=None, pids=[101], nproc=1, restarts=0)]
    first, last = trainer(101, BASE, 0, 25, 30, checkpoint_every=10)
    recs += first
    died = last + 0.1
    recs.append(event(died, 11, "supervisor_failure", rank=None, failed_rank=None, step=26,
                      reason="trainer killed by SIGKILL", cause="trainer killed by SIGKILL"))
    recs.append(event(died + 0.01, 11, "supervisor_restart", rank=None, restarts=1, delay_s=0.2))
    respawn = died + 0.21
    recs.append(event(respawn, 11, "supervisor_spawn", rank=None, pids=[202], nproc=1, restarts=1))
    second, last = trainer(202, respawn, 20, 30, 30, resumed=True, checkpoint_every=10)
    recs += second
    recs.append(event(last + 0.05, 202, "checkpoint_committed", step=30, reason="final", bytes=1000, write_s=0.04,
                      path="ck/step_00000030.ckpt"))
    recs.append(event(last + 0.06, 202, "completed", step=30))
    write_events(run, recs)
    return {"died": died, "respawn": respawn, "end": last + 0.06}


def test_a_sigkilled_supervised_run_from_its_records(tmp_path):
    """The acceptance scenario's logic on hand-made records: 5 steps recomputed (21..25; step 26
    died with the process and counts too, as one executed step), the back-off idle."""
    run = tmp_path / "run"
    t = killed_run_records(run)
    tl = build_timeline(run, use_sacct=False)
    g = compute(tl)
    assert g.steps == {"productive": 30, "recomputed": 6, "executed": 36}
    assert g.wall_s == pytest.approx(t["end"] - BASE)
    assert sum(g.seconds.values()) == pytest.approx(g.wall_s, rel=1e-9)
    assert g.seconds["idle"] == pytest.approx(0.21 + 0.06 - 0.05, abs=0.02)  # back-off + the exit after the save
    assert g.seconds["startup"] == pytest.approx(2 * 2.0, abs=0.01)
    assert g.seconds["checkpoint"] == pytest.approx(0.05, abs=0.01)  # the final save (blocking)
    first, second = g.processes
    assert (first.pid, first.start_step, first.last_step, first.outcome) == (101, 0, 26, "trainer killed by SIGKILL")
    assert (second.pid, second.start_step, second.last_step, second.outcome) == (202, 20, 30, "completed")
    assert second.startup == STARTUP
    assert {m.kind for m in tl.marks} >= {"crash", "restart"}
    assert [w.step for w in tl.writes] == [10, 20, 30, 30]
    assert tl.sources == ["events.jsonl"] and tl.notes == [] and tl.steps_known


def test_hang_and_failure_records(tmp_path):
    """A hang (the supervisor's record: step and phase) and a trainer's own failure record."""
    run = tmp_path / "run"
    run.mkdir()
    recs = [event(BASE, 11, "supervisor_spawn", rank=None, pids=[101], nproc=1, restarts=0)]
    first, last = trainer(101, BASE, 0, 8, 20)
    recs += first + [event(last + 5, 11, "supervisor_hang", rank=None, failed_rank=None, step=9, phase="train",
                           silent_s=5.0)]
    recs.append(event(last + 6, 11, "supervisor_spawn", rank=None, pids=[202], nproc=1, restarts=1))
    second, last = trainer(202, last + 6, 0, 4, 20)
    recs += second + [event(last + 0.1, 202, "failed", step=4, error="ValueError: bad batch")]
    write_events(run, recs)
    g = goodput_of(run, use_sacct=False)
    assert [p.outcome for p in g.processes] == ["hung at step 9 in train", "failed: ValueError: bad batch"]
    assert g.steps["recomputed"] == 9  # 1..8 and the step it hung in, all redone by the second start


def test_bad_lines_are_skipped_counted_and_noted(tmp_path):
    """A garbage line, a record of another version, one of an unknown kind, one whose fields are
    not what its kind says, and a truncated last line (a process killed mid-write): each skipped
    and counted, the figures those of the clean file, one note per reason, exit 0."""
    clean, run = tmp_path / "clean", tmp_path / "damaged"
    write_requeue_fixture(clean)
    write_requeue_fixture(run)
    good = compute(build_timeline(clean, use_sacct=False))
    lines = (run / "events.jsonl").read_text().splitlines(keepends=True)
    bad_progress = json.loads(lines[5]) | {"step": "six"}
    lines[3:3] = ["not json at all\n", json.dumps({"v": 99, "t": BASE + 40, "kind": "progress"}) + "\n",
                  json.dumps({"v": 1, "t": BASE + 40, "pid": 1, "rank": 0, "kind": "warp_drive"}) + "\n",
                  json.dumps(bad_progress) + "\n", "\x00\xff\n"]
    lines.append('{"v": 1, "t": 1790000061.0, "pid": 202, "rank": 0, "kind": "prog')  # no newline: cut short
    (run / "events.jsonl").write_text("".join(lines))
    g = compute(build_timeline(run, use_sacct=False))
    assert g.steps == good.steps and g.seconds == pytest.approx(good.seconds, abs=1e-9)
    assert [p.outcome for p in g.processes] == [p.outcome for p in good.processes]
    notes = "\n".join(g.notes)
    assert "skipped 3 unreadable line(s)" in notes  # the garbage, the NUL bytes, the truncated last line
    assert "skipped 1 record(s) of an unknown version" in notes
    assert "skipped 1 record(s) of an unknown kind" in notes
    assert "skipped 1 record(s) whose fields are not what their kind says" in notes
    p = run_foldhpc("goodput", str(run), "--no-sacct")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "note: events.jsonl: skipped 3 unreadable line(s)" in p.stdout


def test_a_clock_stepped_back(tmp_path, records):
    """The wall clock goes back an hour at step 51 of 100 (0.1 s steps): noted and warned, the
    records from there on follow on; no negative segment, the categories add up to a wall of 2 s
    startup + 99 x 0.1 s (the step across the clock step takes no time) + the 0.1 s exit."""
    run = tmp_path / "run"
    run.mkdir()
    recs, last = trainer(77, BASE, 0, 100, 100)
    for r in recs:
        if r["kind"] == "progress" and r["step"] >= 51:
            r["t"] -= 3600
    recs.append(event(last - 3600 + 0.1, 77, "completed", step=100))
    with open(run / "events.jsonl", "w") as f:  # in the order written, not sorted by time
        f.writelines(json.dumps(r) + "\n" for r in recs)
    tl = build_timeline(run, use_sacct=False)
    assert all(s.end >= s.start for s in tl.segments)
    g = compute(tl)
    assert g.steps["productive"] == 100
    assert g.wall_s == pytest.approx(2.0 + 9.8 + 0.1, abs=0.01)
    assert sum(g.seconds.values()) == pytest.approx(g.wall_s, abs=1e-6)
    assert all(v >= 0 for v in g.seconds.values())
    assert any("clock went back 3599.9 s" in n for n in g.notes), g.notes
    assert any("clock went back" in m for m in records.messages())


def test_a_large_events_file_is_streamed(tmp_path):
    """events.jsonl is read record by record: the peak memory is what the timeline keeps per
    progress record and window (measured: 1.55x the file's 6 MB), not the file's parsed records
    (read_events alone, every record in a list: 5.1x)."""
    import tracemalloc

    run = tmp_path / "big"
    run.mkdir()
    recs, last = trainer(77, BASE, 0, 30_000, 30_000, step_s=0.01, checkpoint_every=1000)
    recs.append(event(last + 0.1, 77, "completed", step=30_000))
    write_events(run, recs)
    del recs
    size = (run / "events.jsonl").stat().st_size
    assert size > 5_000_000
    tracemalloc.start()
    try:
        g = goodput_of(run, use_sacct=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert g.steps["productive"] == 30_000
    assert peak < 2.5 * size, f"peak {peak / 2**20:.1f} MiB for a {size / 2**20:.1f} MiB file"


# ------------------------------------------------------------------ runs made before events.jsonl
def old_log(run: Path) -> None:
    """A train.log as foldhpc wrote it before it recorded events (never parsed now)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(BASE))
    (run / "train.log").write_text(f"{stamp}.000 INFO [pid 77] foldhpc.train.loop: training steps 0..10, batch 2\n"
                                   f"{stamp}.500 INFO [pid 77] foldhpc.train.loop: step 1/10 loss 4.0 lr 1.00e-03 "
                                   "gnorm 0.5 | 4.0 samples/s, data wait 0.0% | ETA 0m01s\n")


def test_old_local_run_gets_its_wall_time_and_a_note(tmp_path):
    """train.log and status.json, no events.jsonl: the wall time of status.json's process start,
    step figures and goodput null, and the note, in the JSON, the table and on stderr (before:
    wall 0 s, goodput null, exit 0, no word)."""
    run = tmp_path / "old"
    run.mkdir()
    old_log(run)
    (run / "status.json").write_text(json.dumps({"state": "completed", "step": 10, "max_steps": 10, "pid": 77,
                                                 "host": "n1", "started_at": BASE, "updated_at": BASE + 50,
                                                 "finished_at": BASE + 50.5}))
    p = run_foldhpc("goodput", str(run), "--json", "--no-sacct")
    assert p.returncode == 0, p.stderr[-2000:]
    g = json.loads(p.stdout)
    assert g["wall_s"] == pytest.approx(50.5) and g["allocated_s"] == pytest.approx(50.5)
    assert g["steps"] == {"productive": None, "recomputed": None, "executed": None} and g["goodput"] is None
    assert g["seconds"]["queue_wait"] == 0 and g["seconds"]["productive"] is None
    assert g["notes"] == [NO_EVENTS_NOTE] and "step figures are unknown" in NO_EVENTS_NOTE
    assert "made before foldhpc recorded events" in p.stderr
    assert [(r["label"], r["outcome"]) for r in g["processes"]] == [("pid 77 (no events.jsonl)", "completed")]
    p = run_foldhpc("goodput", str(run), "--no-sacct")
    assert p.returncode == 0 and "goodput = productive / allocated = -" in p.stdout
    assert f"note: {NO_EVENTS_NOTE}" in p.stdout
    p = run_foldhpc("plot", str(run), "-o", str(tmp_path / "old.png"))
    assert p.returncode == 0 and (tmp_path / "old.png").stat().st_size > 0, p.stderr[-2000:]


def test_old_slurm_run_gets_its_queue_wait_and_job_runs(tmp_path):
    """The requeued Slurm run without its events.jsonl: wall time, queue wait and job runs from
    jobs.jsonl; steps unknown."""
    run = tmp_path / "slurm-run"
    t = write_requeue_fixture(run)
    (run / "events.jsonl").unlink()
    old_log(run)
    g = goodput_of(run, use_sacct=False)
    assert g.wall_s == pytest.approx(t["end"] - t["submitted"]) and g.seconds["queue_wait"] == pytest.approx(42)
    assert g.allocated_s == pytest.approx(g.wall_s - 42)
    assert [j.label for j in g.jobs] == [f"job {JOB}", f"job {JOB} run 1"]
    assert [j.seconds["queue_wait"] for j in g.jobs] == [30, 12]
    assert g.steps["productive"] is None and g.goodput is None and NO_EVENTS_NOTE in g.notes


def test_a_pending_job_without_events_has_zero_steps_not_unknown(tmp_path):
    """Submitted, not started: no trainer has run, so no events.jsonl is expected and no note."""
    run = tmp_path / "pending"
    run.mkdir()
    (run / "jobs.jsonl").write_text(json.dumps({"event": "submitted", "time": time.time() - 5, "job_id": JOB,
                                                "backend": "slurm"}) + "\n")
    g = goodput_of(run, use_sacct=False)
    assert g.running and g.steps == {"productive": 0, "recomputed": 0, "executed": 0}
    assert g.seconds["queue_wait"] == pytest.approx(g.wall_s) and g.notes == []


@pytest.mark.parametrize("what", ["train.log only", "garbage events.jsonl"])
def test_nothing_to_go_on_is_a_one_line_error(tmp_path, what):
    run = tmp_path / "run"
    run.mkdir()
    if what == "train.log only":
        old_log(run)
    else:
        (run / "events.jsonl").write_text("garbage\n{\"v\": 7, \"t\": 1, \"kind\": \"progress\"}\n")
    p = run_foldhpc("goodput", str(run), "--no-sacct")
    assert p.returncode == 2 and p.stdout == ""
    err = p.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("foldhpc goodput: ") and "events.jsonl" in err
    assert ("made before foldhpc recorded events" if what == "train.log only" else "no readable record") in err
