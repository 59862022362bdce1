"""foldhpc chaos: the seeded schedule, the verdict, and real chaos runs on the tiny config.

The real runs drive actual ``foldhpc train --supervise`` processes: one run with one fault of
every kind must recover from all of them and end bit-exact with its reference (the storage kinds
-- a checkpoint missing for a moment, forged headers, a FIFO, a full run directory -- in runs of
their own); a run whose
reference deliberately lacks the non-finite steps the chaos run gets (a trajectory that really
differs) must be reported as NOT bit-exact, with exit status 1 -- the tool cannot pass vacuously.
"""

from __future__ import annotations

import json
import os
import zlib
from collections import Counter

import pytest
import torch

from conftest import GOOD_DATA, TINY, run_foldhpc
from foldhpc.chaos import local, report, storage
from foldhpc.chaos.eventtail import EventTail
from foldhpc.chaos.kinds import DEFAULT_KINDS, KINDS
from foldhpc.checkpoint import CheckpointManager, fileformat
from foldhpc.chaos.local import FaultRecord
from foldhpc.chaos.schedule import Plan, PlanError, PlannedFault, make_plan, parse_kinds, parse_weights
from foldhpc.records.events import EventLog
from foldhpc.records.layout import EVENTS_FILE


# ---------------------------------------------------------------------- schedule
def test_same_seed_same_plan_and_faults_are_sequential():
    a, b = make_plan(60, seed=7), make_plan(60, seed=7)
    assert a.faults == b.faults and a.max_steps == b.max_steps
    assert make_plan(60, seed=8).faults != a.faults
    steps = [f.at_step for f in a.faults]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    assert all(y - x >= 12 for x, y in zip(steps, steps[1:]))
    assert steps[0] > a.every_steps  # a checkpoint exists before the first fault
    assert a.max_steps > steps[-1]
    assert a.nan_steps == [f.at_step for f in a.faults if f.kind == "nan"]
    assert all(f.variant in KINDS[f.kind].variants for f in a.faults)


def test_weights_are_respected():
    plan = make_plan(2000, seed=1, kinds=["sigkill", "nan", "hang"], weights={"sigkill": 3, "nan": 1, "hang": 0})
    counts = Counter(f.kind for f in plan.faults)
    assert counts["hang"] == 0
    assert 0.70 < counts["sigkill"] / 2000 < 0.80  # 3:1
    assert counts["sigkill"] + counts["nan"] == 2000


def test_kinds_filter_and_bad_specs():
    plan = make_plan(100, seed=3, kinds=parse_kinds("crash,corrupt_checkpoint"))
    assert {f.kind for f in plan.faults} == {"crash", "corrupt_checkpoint"}
    assert parse_kinds(None) == list(DEFAULT_KINDS) and "dead_rank" not in DEFAULT_KINDS  # needs --nproc
    with pytest.raises(PlanError, match="unknown kind"):
        parse_kinds("sigkill,meteor")
    assert parse_weights("sigkill=3, nan=0.5") == {"sigkill": 3.0, "nan": 0.5}
    for bad in ("sigkill", "sigkill=x", "meteor=1", "nan=-1"):
        with pytest.raises(PlanError):
            parse_weights(bad)
    with pytest.raises(PlanError, match="not among the selected"):
        make_plan(5, 0, kinds=["nan"], weights={"sigkill": 1})
    with pytest.raises(PlanError, match="all weights are 0"):
        make_plan(5, 0, kinds=["nan"], weights={"nan": 0})


def test_storage_kinds_are_drawn_and_the_last_span_is_trained():
    for kind in ("missing_file", "crafted_header", "fifo", "full_status_fs"):
        assert kind in DEFAULT_KINDS
    plan = make_plan(1, seed=0, kinds=["full_status_fs"])
    f = plan.faults[0]
    assert plan.max_steps >= f.at_step + KINDS["full_status_fs"].span + 20  # its handling ends before training
    assert {f.variant for f in make_plan(60, seed=2, kinds=["crafted_header"]).faults} == \
        set(KINDS["crafted_header"].variants)


def test_cli_usage_errors_exit_2(tmp_path):
    p = run_foldhpc("chaos", "--config", str(TINY), "--faults", "3", "--kinds", "meteor", "--out", str(tmp_path))
    assert p.returncode == 2 and "unknown kind" in p.stderr
    p = run_foldhpc("chaos", "--config", str(TINY), "--faults", "3", "--set", "checkpoint.every_steps=0",
                    "--out", str(tmp_path))
    assert p.returncode == 2 and "every_steps" in p.stderr


def test_crafted_headers_keep_a_valid_footer_and_crc(tmp_path):
    """A forged header must reach the parser: footer, offsets and crc32 are those of an intact
    file, the tensor bytes are untouched; only what the header says is hostile."""
    m = CheckpointManager(tmp_path, async_save=False)
    m.save(7, {"model": {"w": torch.arange(12.0).reshape(3, 4)}, "step": 7}, {}, blocking=True)
    data = (tmp_path / "step_00000007.ckpt").read_bytes()
    footer = fileformat._FOOTER
    hoff = footer.unpack(data[-footer.size:])[0]
    for variant in KINDS["crafted_header"].variants:
        out, what = storage.craft_checkpoint(data, variant)
        off, hlen, crc, tail = footer.unpack(out[-footer.size:])
        raw = out[off:off + hlen]
        assert tail == fileformat.TAIL and off == hoff and off + hlen + footer.size == len(out)
        assert zlib.crc32(raw) == crc and out[:hoff] == data[:hoff] and "crc32 valid" in what
        if variant == "deep_nesting":
            assert b"[" * storage.DEEP + b"]" * storage.DEEP in raw
            continue
        header = json.loads(raw)
        node = header["state"]["D"][0][1]["D"][0][1]["T"]
        if variant == "negative_nbytes":
            assert node[3] == -8
        else:
            assert isinstance(header["info"]["step"], str) and isinstance(header["meta"], list) and node[0] == 7
    with pytest.raises(ValueError, match="unknown"):
        storage.craft_checkpoint(data, "meteor")


def test_fill_leaves_no_byte_free(tmp_path):
    method, why = storage.tmpfs_method(tmp_path)
    if method is None:
        pytest.skip(why)
    d = tmp_path / "fs"
    storage.mount_tmpfs(d, size_mb=2)
    try:
        (d / "kept.txt").write_text("written before\n")
        assert storage.fill(d) > 1_900_000
        with pytest.raises(OSError, match="No space left"):
            (d / "new.json").write_text("x")
        storage.unfill(d)
        (d / "new.json").write_text("x")
    finally:
        storage.unmount_keeping(d)
    assert not os.path.ismount(d)
    assert (d / "kept.txt").read_text() == "written before\n" and not (d / storage.FILLER).exists()


# ---------------------------------------------------------------------- reading events.jsonl
def test_event_tail_reads_complete_records_as_they_come(tmp_path):
    """What the runner sees of a run: each complete record once, with the time it was read; a
    half-written last line waits for its end; garbage and other ranks' records are left out."""
    tail = EventTail(tmp_path / EVENTS_FILE)
    assert tail.poll() == []  # no file yet
    trainer, sup = EventLog(tmp_path, rank=0), EventLog(tmp_path, rank=None)
    trainer.emit("resumed", path=str(tmp_path / "checkpoints" / "step_00000010.ckpt"), step=10, restarts=1)
    trainer.emit("progress", step=11, max_steps=50, loss=1.0, lr=0.1, grad_norm=1.0, samples_per_s=9.0,
                 data_wait_frac=0.0, steps=1)
    EventLog(tmp_path, rank=1).emit("progress", step=11, max_steps=50, loss=1.0, lr=0.1, grad_norm=1.0,
                                    samples_per_s=9.0, data_wait_frac=0.0, steps=1)
    sup.emit("supervisor_restart", restarts=1, delay_s=0.0)
    line = (tmp_path / EVENTS_FILE).read_bytes().splitlines(keepends=True)[-1]
    with open(tmp_path / EVENTS_FILE, "ab") as f:
        f.write(b"not json\n" + line[:20])  # garbage, then a record cut mid-write
    got = tail.poll()
    assert [e.kind for e in got] == ["resumed", "progress", "supervisor_restart"]
    assert got[0].name == "step_00000010.ckpt" and got[0].step == 10 and got[2].step == -1 and got[2].rank is None
    assert tail.timeline == [(got[1].seen, 11)] and got[1].seen >= got[1].t
    assert tail.other_ranks == 1 and tail.scan.bad_lines == 1
    with open(tmp_path / EVENTS_FILE, "ab") as f:
        f.write(line[20:])  # the rest of the cut record
    assert tail.poll()[0].kind == "supervisor_restart" and tail.poll() == []
    assert [e.kind for e in tail.since(1)] == ["progress", "supervisor_restart", "supervisor_restart"]
    assert tail.last("supervisor_restart", before=3) is got[2] and tail.last_position_of(got[0].pid) == 3
    with pytest.raises(ValueError, match="unknown event kind"):
        tail.since(0, "saved")  # a train.log pattern's name, not an event kind: never silently empty


# ---------------------------------------------------------------------- verdict
def _rec(i: int, ok: bool = True) -> FaultRecord:
    return FaultRecord(i, "sigkill", "", 20 + i, step=20 + i, injected_at=1.0, recovered=ok, steps_lost=3,
                       time_to_resume_s=4.0, problems=[] if ok else ["resumed from step 0"])


def test_judge_passes_only_with_everything_right():
    good = report.judge(2, [_rec(0), _rec(1)], "abc", "abc", True, True, 100, 100)
    assert good.passed and good.exit_code == 0 and good.recovery_rate == 1.0 and good.bit_exact
    differs = report.judge(2, [_rec(0), _rec(1)], "abc", "abd", True, True, 100, 100)
    assert not differs.passed and differs.exit_code == 1 and not differs.bit_exact
    assert any("NOT bit-exact" in p for p in differs.problems)
    lost = report.judge(2, [_rec(0), _rec(1, ok=False)], "abc", "abc", True, True, 100, 100)
    assert not lost.passed and lost.recovery_rate == 0.5 and any("fault 1" in p for p in lost.problems)
    assert not report.judge(3, [_rec(0), _rec(1)], "abc", "abc", True, True, 100, 100).passed  # one not run
    assert not report.judge(2, [_rec(0), _rec(1)], None, None, True, True, 100, 100).passed  # no digest at all
    assert not report.judge(2, [_rec(0), _rec(1)], "abc", "abc", True, False, 100, 100).passed
    assert not report.judge(2, [_rec(0), _rec(1)], "abc", "abc", True, True, 90, 100).passed


def test_percentile():
    assert report.percentile([], 50) is None
    assert report.percentile([3.0], 95) == 3.0
    assert report.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert report.percentile(list(map(float, range(101))), 95) == 95.0


# ---------------------------------------------------------------------- real runs
def _plan(kinds: list[tuple[str, str]], gap: int = 15) -> Plan:
    faults, step = [], 15
    for i, (kind, variant) in enumerate(kinds):
        faults.append(PlannedFault(i, kind, step, variant))
        step += gap + KINDS[kind].span
    return Plan(seed=5, faults=faults, max_steps=step + 20, every_steps=10)


def _judge(outcome: local.ChaosOutcome, plan: Plan) -> report.Verdict:
    return report.judge(len(plan.faults), outcome.records, outcome.reference.digest, outcome.chaos.digest,
                        outcome.reference.completed, outcome.chaos.completed, outcome.chaos.final_step,
                        plan.max_steps)


def test_one_fault_of_every_kind_is_recovered_bit_exact(tmp_path):
    plan = _plan([("sigkill", ""), ("nan", ""), ("exception", ""), ("sigusr1", ""), ("crash", "SIGSEGV"),
                  ("kill_during_write", ""), ("hang", "stop"), ("corrupt_checkpoint", "truncate"),
                  ("unwritable_dir", ""), ("sigterm", ""), ("crash", "SIGKILL")])
    method, _ = local.unwritable_method(tmp_path)
    assert method is not None  # chmod as a user, chattr +i as root
    outcome = local.run(str(TINY), [f"data.path={GOOD_DATA}"], plan, tmp_path, unwritable=method)
    verdict = _judge(outcome, plan)
    assert verdict.passed, verdict.problems
    assert verdict.recovery_rate == 1.0 and verdict.bit_exact
    recs = {(r.kind, r.variant): r for r in outcome.records}
    for kind in ("sigusr1", "sigterm"):
        assert recs[(kind, "")].steps_lost == 0 and recs[(kind, "")].launch_exit == 75
    for key in (("sigkill", ""), ("crash", "SIGSEGV"), ("kill_during_write", ""), ("hang", "stop")):
        r = recs[key]
        assert r.steps_lost is not None and 0 <= r.steps_lost <= r.step - r.newest_durable_step, r
        assert r.time_to_resume_s is not None and r.time_to_resume_s > 0
    corrupt = recs[("corrupt_checkpoint", "truncate")]
    assert corrupt.rejected == [f"step_{corrupt.step:08d}.ckpt"] and corrupt.resumed_step < corrupt.step
    assert recs[("exception", "")].resumed_step is not None
    # the report: json, markdown and the figure
    doc = report.build(outcome, plan, verdict, command=["foldhpc", "chaos", "(test)"], config=str(TINY),
                       overrides=[], backend="local", load_start=(0.0, 0.0, 0.0), load_end=(0.0, 0.0, 0.0),
                       skipped_kinds={})
    paths = report.write(doc, tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["verdict"]["passed"] and data["verdict"]["recovery_rate"] == 1.0
    assert set(data["per_kind"]) == {k for k, _ in recs}
    assert "PASSED" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "chaos.png") in paths and (tmp_path / "chaos.png").stat().st_size > 10_000


def test_a_broken_recovery_is_detected(tmp_path):
    """The chaos run gets two non-finite steps the reference does not: its trajectory really
    differs, every fault looks recovered, and the verdict must still fail on the digest."""
    plan = _plan([("nan", ""), ("nan", "")])
    outcome = local.run(str(TINY), [f"data.path={GOOD_DATA}"], plan, tmp_path, mirror_nan_in_reference=False)
    verdict = _judge(outcome, plan)
    assert verdict.recovered == 2  # the faults themselves were handled
    assert outcome.reference.completed and outcome.chaos.completed
    assert not verdict.bit_exact and not verdict.passed and verdict.exit_code == 1
    assert any("NOT bit-exact" in p for p in verdict.problems)


def test_two_ranks_dead_rank_and_hook_faults(tmp_path):
    """--nproc 2 (the reference too: bit-exact needs the same world size): a killed rank 1, an
    exception on every rank and a crash of rank 0, each followed by a restart of both ranks; and
    a bit flip on rank 1, found by the replica check and healed by the replay in process."""
    plan = _plan([("dead_rank", "SIGKILL"), ("exception", ""), ("crash", "SIGSEGV"), ("bitflip", "")])
    outcome = local.run(str(TINY), [f"data.path={GOOD_DATA}"], plan, tmp_path, nproc=2)
    verdict = _judge(outcome, plan)
    assert verdict.passed, verdict.problems
    dead = outcome.records[0]
    assert dead.kind == "dead_rank" and dead.notes[0].startswith("killed rank 1")
    assert dead.steps_lost is not None and dead.time_to_resume_s is not None
    assert outcome.in_job_restarts == 3  # the bit flip restarts nothing
    flip = outcome.records[3]
    assert flip.kind == "bitflip" and flip.steps_lost == 0 and flip.notes[0].startswith("attributed: transient, rank(s) [1]")


def test_storage_faults_are_recovered_bit_exact(tmp_path):
    """The newest checkpoint missing for a moment around a restart, three forged headers, a FIFO
    named like the newest checkpoint of all: every restart picks a real, good checkpoint, nothing
    crashes or hangs, a good file is never deleted, and the final state is the reference's."""
    plan = _plan([("missing_file", ""), ("crafted_header", "negative_nbytes"), ("fifo", ""),
                  ("crafted_header", "deep_nesting"), ("crafted_header", "wrong_types")])
    outcome = local.run(str(TINY), [f"data.path={GOOD_DATA}"], plan, tmp_path)
    verdict = _judge(outcome, plan)
    assert verdict.passed, verdict.problems
    assert outcome.in_job_restarts == 0  # no trainer crashed on what it found
    missing, *rest = outcome.records
    assert missing.kind == "missing_file" and missing.launch_exit == 75
    assert missing.resumed_step is not None and missing.resumed_step < missing.step  # it was not there
    assert any("missing for" in n for n in missing.notes)
    for r in (x for x in rest if x.kind == "crafted_header"):
        assert r.rejected == [f"step_{r.step:08d}.ckpt"] and r.resumed_step < r.step, r
    fifo = next(r for r in rest if r.kind == "fifo")
    assert fifo.steps_lost == 0 and fifo.launch_exit == 75 and fifo.checkpoint_used == f"step_{fifo.step:08d}.ckpt"
    assert not list((tmp_path / "runs" / "chaos" / "checkpoints").glob(f"step_{plan.max_steps + 10_000:08d}*"))


def test_full_run_directory_is_survived_bit_exact(tmp_path):
    """The run directory's file system (a tmpfs) full while checkpoints go elsewhere: training goes
    on and checkpoints commit; then a SIGKILL and a damaged checkpoint in that layout."""
    method, why = storage.tmpfs_method(tmp_path)
    if method is None:
        pytest.skip(f"full_status_fs is left out here: {why}")
    plan = _plan([("full_status_fs", ""), ("sigkill", ""), ("corrupt_checkpoint", "flip")])
    outcome = local.run(str(TINY), [f"data.path={GOOD_DATA}"], plan, tmp_path, run_fs=method)
    verdict = _judge(outcome, plan)
    assert verdict.passed, verdict.problems
    full = outcome.records[0]
    assert full.steps_lost == 0 and full.time_to_resume_s is not None
    assert any("checkpoints of steps" in n for n in full.notes) and any("lost the records" in n for n in full.notes)
    run_dir = tmp_path / "runs" / "chaos"
    assert not os.path.ismount(run_dir) and (run_dir / EVENTS_FILE).stat().st_size > 0  # copied back
    assert not (run_dir / "checkpoints").exists() and list((tmp_path / "runs" / "chaos-checkpoints").glob("step_*"))


# ---------------------------------------------------------------------- a [task] of the user's
ESM_TASK = TINY.parents[1] / "examples" / "esm_contacts.toml"  # fair-esm's ESM-2 (tests/test_esm_task.py)

UNGUARDED_TASK = """
import torch, foldhpc

def build(cfg):
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = foldhpc.StepBatches(torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randn(32, 1)), 8, 0)

    def step(run, s):
        x, y = batches[s]
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        run.wait_staged()
        opt.step()  # no run.check_finite(loss): a NaN loss is applied like any other

    return foldhpc.Task(states={"model": model, "optimizer": opt}, step=step)
"""


def test_nan_on_a_task_without_a_non_finite_guard_is_refused_after_the_reference(tmp_path):
    """The nan kind tests the non-finite guard; a task whose step never calls run.check_finite has
    none: the reference run shows it (no skipped update at the planned step), and chaos says so in
    one line (exit 2) instead of waiting for a skip that never comes."""
    (tmp_path / "unguarded.py").write_text(UNGUARDED_TASK)
    cfg = tmp_path / "task.toml"
    cfg.write_text(f'[train]\nthreads = 1\n[task]\nfactory = "{tmp_path / "unguarded.py"}:build"\n')
    out = tmp_path / "out"
    r = run_foldhpc("chaos", "--config", str(cfg), "--faults", "1", "--kinds", "nan", "--out", str(out), timeout=120)
    assert r.returncode == 2, (r.stdout + r.stderr)[-3000:]
    line = r.stderr.strip().splitlines()[-1]
    assert "no non-finite guard" in line and "run.check_finite(loss)" in line and "--kinds" in line, line
    assert "made step(s) 15 non-finite" in line, line
    assert not (out / "runs" / "chaos").exists()  # the chaos run never started


@pytest.mark.timeout(400)
def test_a_task_of_the_users_survives_a_small_chaos_bit_exact(tmp_path):
    """A trainer crash (restarted by the supervisor), a SIGKILL of the job (started again) and a
    non-finite step (skipped by the task's run.check_finite, the reference's too) on the ESM-2
    task: every fault recovered, the final state the reference's."""
    out = tmp_path / "chaos"
    r = run_foldhpc("chaos", "--config", str(ESM_TASK), "--faults", "3", "--kinds", "crash,sigkill,nan", "--seed", "14",
                    "--out", str(out), timeout=380)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    data = json.loads((out / "report.json").read_text())
    assert data["verdict"]["passed"] and data["verdict"]["bit_exact"] and data["verdict"]["recovered"] == 3
    assert sorted(f["kind"] for f in data["faults"]) == ["crash", "nan", "sigkill"]
    assert all(f["resumed_step"] > 0 for f in data["faults"] if f["kind"] != "nan")
