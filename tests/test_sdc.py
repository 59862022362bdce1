"""Silent data corruption and stragglers (issue 24; foldhpc.train.sdc, foldhpc.train.straggler).

The pieces in-process (the vote, the recomputed update, the spike rule, the verdicts, the
straggler rule), then the acceptance runs: ``foldhpc train --nproc 2`` with a bit flip on rank 1
at step 30 (transient and persistent), a loss spike, a slowed rank -- each ending with the digest
of an uninterrupted 2-rank run.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY, foldhpc_cmd, read_json, set_args, tiny_overrides
from foldhpc import faults
from foldhpc.checkpoint.manager import CheckpointManager
from foldhpc.records.events import read_events
from foldhpc.train.sdc import (DETERMINISTIC, RANK, TRANSIENT, SPIKE_MIN_HISTORY, Replay, SdcMonitor, Snapshot,
                               replica_digest, same_trace, state_tensors, trace, vote)
from foldhpc.train.straggler import StragglerMonitor
from test_nonfinite import scalars

STEPS = 50
BASE = {"train.max_steps": STEPS, "checkpoint.every_steps": 5, "checkpoint.keep_last": 100,
        "fault.sdc_check_every": 10, "fault.straggler_window": 10}
LAYOUT = [{"rank": 0, "node": "n1"}, {"rank": 1, "node": "n2"}, {"rank": 2, "node": "n2"}]


# ---------------------------------------------------------------------------- pieces
def test_vote_two_ranks_without_a_majority_trusts_the_recomputed_update():
    assert vote(["a", "b"], ["a", "a"]) == ("a", [1])  # rank 1's state is not what its update gives
    assert vote(["b", "a"], ["a", "a"]) == ("a", [0])
    assert vote(["a", "a", "c"], ["a", "a", "a"]) == ("a", [2])
    # a rank whose recomputation is itself wrong is outvoted by the others'
    assert vote(["a", "a", "c"], ["a", "a", "c"]) == ("a", [2])


def _model_and_opt() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for _ in range(3):  # some optimizer state and a scheduled learning rate
        model(torch.randn(4, 8)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    model(torch.randn(4, 8)).pow(2).mean().backward()
    return model, opt


def test_snapshot_recomputes_the_update_and_changes_nothing():
    model, opt = _model_and_opt()
    snap = Snapshot(model, opt)
    opt.step()
    good = replica_digest(model, opt)
    with torch.no_grad():  # corrupt the result: one weight off
        next(model.parameters()).view(-1)[3] += 0.5
    bad = replica_digest(model, opt)
    assert bad != good
    lr = opt.param_groups[0]["lr"]
    opt.param_groups[0]["lr"] = lr * 0.5  # what the scheduler does after the update
    assert snap.recompute_digest(model, opt) == good  # the update redone from the snapshot
    assert replica_digest(model, opt) == bad  # and the current state left as it was
    assert opt.param_groups[0]["lr"] == lr * 0.5


def test_a_trace_sees_a_change_too_small_for_the_loss():
    model, _ = _model_and_opt()
    loss = torch.tensor(2.5)
    before = trace(loss, model).tolist()
    assert len(before) == 1 + len(list(model.parameters())) and before[0] == 2.5
    assert same_trace(before, trace(loss, model).tolist())
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-6  # nothing a float32 loss would show
    after = trace(loss, model).tolist()
    assert not same_trace(before, after) and after[0] == before[0]
    assert same_trace([float("nan")], [float("nan")]) and not same_trace([1.0], [1.0, 2.0])
    assert trace(loss, None).tolist() == [2.5]  # one rank: the loss only


def test_state_tensors_cover_weights_and_moments_in_the_same_order():
    model, opt = _model_and_opt()
    tensors = state_tensors(model, opt)
    params = list(model.parameters())
    # each weight, then its AdamW step counter, exp_avg and exp_avg_sq (on the CPU the counters share
    # the weights' device; on a GPU they stay on the CPU and are left out)
    assert len(tensors) == len(params) * 4
    assert all(t.data_ptr() == p.data_ptr() for t, p in zip(tensors, params))  # the live storage: a repair writes it
    assert not any(isinstance(t, torch.nn.Parameter) for t in tensors)
    assert [t.shape for t in tensors[len(params):]] == [v.shape for p in params for _, v in sorted(opt.state[p].items())]


def test_spike_needs_history_and_compares_with_the_recent_maximum():
    mon = SdcMonitor(10, 5.0, False, 0, 2)
    for s in range(1, SPIKE_MIN_HISTORY):
        assert not mon.spike(s, 100.0 if s == 1 else 1.0)  # too little history yet
    assert not mon.spike(SPIKE_MIN_HISTORY, 1.0)
    assert not mon.spike(SPIKE_MIN_HISTORY + 1, 50.0)  # the 100 of step 1 is in the window
    for s in range(SPIKE_MIN_HISTORY + 2, 80):
        mon.spike(s, 1.0)
    assert mon.spike(80, 5.5) and not mon.spike(81, float("nan"))
    assert not SdcMonitor(10, 0.0, False, 0, 2).spike(100, 1e9)  # off


def _replay(trigger: str = "mismatch", **kw: object) -> Replay:
    fields: dict = {"digests": ["a", "b", "a"], **kw}  # the first pass's digests: rank 1 differed
    return Replay(trigger=trigger, first=21, last=30, path="ck20", traces={}, global_loss=None, **fields)


def test_verdicts():
    mon = SdcMonitor(10, 0.0, False, 0, 3)
    # a mismatch that does not come back: the rank whose first-pass state differs from the replay's
    rec = mon.conclude(_replay(), ["a", "a", "a"], [None, None, None], [False] * 3, LAYOUT, ["X"], 0.5)
    assert (rec["verdict"], rec["ranks"], rec["nodes"], rec["reproducible"], rec["step"]) == \
        (TRANSIENT, [1], ["n2"], False, 30)
    assert rec["samples"] == [] and mon.verified == 30 and mon.replay is None
    # diverging again during the replay: the outvoted rank, reproducible on it only
    rec = mon.conclude(_replay(diverged=27, suspects=[2]), ["a"] * 3, [None] * 3, [True] * 3, LAYOUT, ["X"], 0.5)
    assert (rec["verdict"], rec["ranks"], rec["nodes"], rec["step"]) == (RANK, [2], ["n2"], 27)
    # a loss spike that comes back on every rank: the data, with the batch named
    rec = mon.conclude(_replay("loss_spike", digests=["a"] * 3), ["a"] * 3, [None] * 3, [True] * 3, LAYOUT,
                       ["1UBI_A", "1K6P_A"], 0.2)
    assert (rec["verdict"], rec["ranks"], rec["samples"]) == (DETERMINISTIC, [], ["1UBI_A", "1K6P_A"])
    # a spike that does not come back: the rank whose loss differed
    rec = mon.conclude(_replay("loss_spike", digests=["a"] * 3), ["a"] * 3, [None, 29, None], [False] * 3, LAYOUT,
                       [], 0.2)
    assert (rec["verdict"], rec["ranks"], rec["step"], rec["first_deviation"]) == (TRANSIENT, [1], 29, 29)
    # a flip on rank 1 after step 23, seen by the check at 30: rank 1's trace deviates first (its weights after
    # step 23), the others' a step later through the all-reduced gradient, and every first-pass state differs
    # from the replay's
    rec = mon.conclude(_replay(digests=["x", "y", "a"]), ["a"] * 3, [24, 23, 24], [False] * 3, LAYOUT, [], 0.3)
    assert (rec["verdict"], rec["ranks"], rec["step"], rec["detected"]) == (TRANSIENT, [1], 23, 30)
    assert mon.suspect_nodes == {"n2": 4}
    assert [a["verdict"] for a in mon.summary()["attributions"]] == [TRANSIENT, RANK, DETERMINISTIC, TRANSIENT,
                                                                     TRANSIENT]


def test_history_survives_a_rollback_and_a_new_process_takes_the_checkpoints():
    mon = SdcMonitor(10, 0.0, False, 0, 2)
    mon.checks = 3
    mon.conclude(_replay(), ["a", "a"], [None, None], [False, False], LAYOUT, [], 0.1)
    saved = mon.state_dict()
    older = {"verified": 20, "checks": 2, "mismatches": [], "attributions": [], "suspect_nodes": {}}
    mon.load_state_dict(older, 20)  # an in-process rollback to an older checkpoint
    assert mon.verified == 20 and len(mon.attributions) == 1 and mon.suspect_nodes == {"n2": 1}
    fresh = SdcMonitor(10, 0.0, False, 0, 2)
    fresh.load_state_dict(saved, 40)  # a resume
    assert fresh.attributions == mon.attributions and fresh.suspect_nodes == {"n2": 1} and fresh.verified == 30
    fresh2 = SdcMonitor(10, 0.0, False, 0, 2)
    fresh2.load_state_dict(None, 40)  # a checkpoint from before the check existed
    assert fresh2.verified == 40 and fresh2.attributions == []


def test_straggler_rule_needs_two_windows_and_compares_with_the_others():
    mon = StragglerMonitor(1.5, 10, 3)
    assert mon.judge([(1.0, 0.1), (1.0, 0.1), (2.0, 0.0)], LAYOUT, 10) == []  # one window is a blip
    named = mon.judge([(1.0, 0.1), (1.1, 0.1), (2.0, 0.0)], LAYOUT, 20)
    assert [(n["rank"], n["node"], n["step"]) for n in named] == [(2, "n2", 20)] and named[0]["ratio"] > 1.8
    assert mon.judge([(1.0, 0.1), (1.0, 0.1), (1.2, 0.0)], LAYOUT, 30) == []  # recovered
    even = StragglerMonitor(1.5, 10, 2)
    for step in (10, 20, 30):
        assert even.judge([(1.0, 0.2), (1.3, 0.0)], LAYOUT, step) == []
    acc = StragglerMonitor(1.5, 2, 2)
    acc.add(0.5, 0.2)
    acc.add(0.3, 0.1)
    assert acc.due(2) and not acc.due(3)
    assert acc.mine() == pytest.approx((0.25, 0.15)) and not acc.due(2)  # a new window starts
    assert not StragglerMonitor(1.5, 2, 1).due(2)  # one rank: nothing to compare


# ---------------------------------------------------------------------------- two ranks, for real
def _env(**hooks: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FOLDHPC_BITFLIP", "FOLDHPC_LOSS_SPIKE",
                                                                    "FOLDHPC_DEBUG_STEP_DELAY"))}
    env.update(hooks)
    return env


def train2(run: Path, env: dict[str, str], **extra: object) -> subprocess.CompletedProcess:
    args = foldhpc_cmd("train", "--config", str(TINY), "--nproc", "2",
                       *set_args(tiny_overrides(run, **{**BASE, **extra})))
    p = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def digest(run: Path) -> str:
    loaded = CheckpointManager(run / "checkpoints").load_latest()
    assert loaded is not None and loaded.entry.step == STEPS
    return loaded.entry.digest


def sdc_status(run: Path) -> dict:
    """``foldhpc status RUN --json``: what a user reads."""
    p = subprocess.run(foldhpc_cmd("status", str(run), "--json"), cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    import json

    return json.loads(p.stdout)["runs"][0]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, str]:
    run = tmp_path_factory.mktemp("sdc") / "ref"
    train2(run, _env())
    return run, digest(run)


def test_an_even_run_agrees_at_every_check_and_names_no_straggler(uninterrupted):
    run, _ = uninterrupted
    status = read_json(run / "status.json")
    assert status["sdc"]["checks"] == STEPS // 10 and status["sdc"]["mismatches"] == []
    assert status["sdc"]["verified"] == STEPS and status["sdc"]["last"] is None
    assert status["stragglers"] == []
    assert [e for e in read_events(run)[0] if e.kind.startswith(("sdc_", "straggler"))] == []


def test_a_transient_bit_flip_is_caught_attributed_to_rank_1_and_healed(tmp_path, uninterrupted):
    _, ref = uninterrupted
    run = tmp_path / "run"
    train2(run, _env(**{faults.BITFLIP_AT_STEP: "30", faults.BITFLIP_ONCE: str(tmp_path / "fired")}))
    assert (tmp_path / "fired").exists()
    events = list(read_events(run)[0])
    mismatch = next(e for e in events if e.kind == "sdc_mismatch")
    assert mismatch["step"] <= 40 and len(set(mismatch["digests"])) == 2
    view = sdc_status(run)
    last = view["sdc"]["last"]
    node = read_json(run / "status.json")["ranks"][1]["node"]
    assert (last["verdict"], last["reproducible"], last["ranks"], last["nodes"], last["step"]) == \
        (TRANSIENT, False, [1], [node], mismatch["step"])
    assert last["first"] <= 30 <= last["last"]  # the replay covered the flip
    assert view["sdc"]["attributions"] == 1 and view["sdc"]["mismatches"] == [mismatch["step"]]
    assert [e["verdict"] for e in events if e.kind == "sdc_attribution"] == [TRANSIENT] * 2  # one per rank
    assert digest(run) == ref  # the run goes on from a state equal to the uninterrupted run's
    assert [v for _, v in scalars(run, "sdc/suspect_ranks")] == [1.0]


def test_a_persistent_flip_on_rank_1_is_reproducible_on_that_rank_only(tmp_path, uninterrupted):
    _, ref = uninterrupted
    run = tmp_path / "run"
    train2(run, _env(**{faults.BITFLIP_AT_STEP: "30"}))  # every pass through step 30 flips again
    last = sdc_status(run)["sdc"]["last"]
    node = read_json(run / "status.json")["ranks"][1]["node"]
    assert (last["verdict"], last["reproducible"], last["ranks"], last["nodes"], last["step"]) == \
        (RANK, True, [1], [node], 30)
    log = (run / "train.log").read_text()
    assert "rank(s) [1] outvoted" in log
    assert digest(run) == ref  # the outvoted rank took the majority's state


def test_a_loss_spike_replays_as_deterministic_and_names_its_batch(tmp_path, uninterrupted):
    _, ref = uninterrupted
    run = tmp_path / "run"
    train2(run, _env(**{faults.LOSS_SPIKE_AT_STEP: "33"}), **{"fault.loss_spike_factor": 5})
    replay = next(e for e in read_events(run)[0] if e.kind == "sdc_replay")
    assert (replay["trigger"], replay["last"], replay["first"]) == ("loss_spike", 33, 31)
    last = read_json(run / "status.json")["sdc"]["last"]
    assert (last["verdict"], last["reproducible"], last["ranks"], last["step"]) == (DETERMINISTIC, True, [], 33)
    assert len(last["samples"]) == 2 and all("_" in s for s in last["samples"])  # the chains of step 33's batch
    assert digest(run) == ref  # the spike is in the measured value only: the state is the uninterrupted one's


def test_a_slowed_rank_is_named_as_a_straggler(tmp_path, uninterrupted):
    run = tmp_path / "run"
    train2(run, _env(FOLDHPC_DEBUG_STEP_DELAY_S="0.05", FOLDHPC_DEBUG_STEP_DELAY_ON_RANK="1"),
           **{"train.max_steps": 30})
    named = read_json(run / "status.json")["stragglers"]
    node = read_json(run / "status.json")["ranks"][1]["node"]
    assert [(n["rank"], n["node"]) for n in named] == [(1, node)] and named[0]["ratio"] > 1.5
    events = [e for e in read_events(run)[0] if e.kind == "straggler"]
    assert events and {e["straggler_rank"] for e in events} == {1}
    assert scalars(run, "straggler/count")[-1][1] == 1.0
    assert sdc_status(run)["stragglers"][0]["rank"] == 1


def test_a_skipped_nonfinite_step_starts_an_attribution_too(tmp_path):
    """fault.sdc_on_nonfinite (one rank, in-process): a NaN loss that every replay sees again is
    deterministic, with its batch; one that fires once is transient; both end at the clean digest."""
    from test_nonfinite import train_here

    extra = {**BASE, "fault.sdc_on_nonfinite": True, "train.max_steps": 40}
    ref = tmp_path / "ref"
    assert train_here(ref, **extra) == "completed"
    clean = CheckpointManager(ref / "checkpoints").load_latest().entry.digest
    for name, env, verdict in (("always", {}, DETERMINISTIC),
                               ("once", {faults.NAN_ONCE: str(tmp_path / "fired")}, TRANSIENT)):
        run = tmp_path / name
        assert train_here(run, "23", env, **extra) == "completed"
        last = read_json(run / "status.json")["sdc"]["last"]
        assert (last["trigger"], last["verdict"], last["first"], last["last"]) == ("nonfinite", verdict, 21, 23), name
        assert len(last["samples"]) == (2 if verdict == DETERMINISTIC else 0)
        if verdict == DETERMINISTIC:  # the skipped step is part of the training: the reference has none
            assert read_json(run / "status.json")["nonfinite"]["skipped"] >= 1
        else:  # replayed without the NaN: the update of step 23 is applied, as in the clean run
            assert CheckpointManager(run / "checkpoints").load_latest().entry.digest == clean
