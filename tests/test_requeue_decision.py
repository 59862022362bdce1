"""The requeue decision (foldhpc.slurm.requeue.decide_from) for every case Slurm can present.

The states are the ones measured on the local Slurm 22.05 cluster (see the module docstring):
``scancel`` -> slurmctld COMPLETING while sacct may still say RUNNING (lag) or fail (slurmdbd
down); ``--signal``/time limit/preemption signal -> RUNNING in both. The decision is pure, so
these run without Slurm; tests/slurm/test_requeue.py checks the same on the real cluster.
"""

from __future__ import annotations

import pytest

from foldhpc.slurm import requeue
from foldhpc.records.exitcodes import ExitCode
from foldhpc.slurm.requeue import budget_s, decide_from


def test_not_under_slurm_never_requeues():
    d = decide_from(None, 0, 20, "RUNNING", "RUNNING")
    assert (d.requeue, d.kind) == (False, "not_slurm")


def test_time_limit_or_user_signal_requeues():
    d = decide_from("42", 0, 20, "RUNNING", "RUNNING")
    assert (d.requeue, d.kind) == (True, "requeue"), d


def test_sacct_unavailable_but_slurmctld_running_requeues():
    """slurmdbd down during a time-limit signal: slurmctld alone is enough to tell it is not a cancel."""
    d = decide_from("42", 0, 20, "RUNNING", None)
    assert d.requeue, d


@pytest.mark.parametrize("acct", ["RUNNING", None, "CANCELLED by 0", "PREEMPTED"])
def test_completing_is_never_requeued_whatever_sacct_says(acct):
    """scancel (or the TERM of a preemption Slurm requeues itself): slurmctld says COMPLETING at once;
    a lagging sacct that still says RUNNING must not win."""
    d = decide_from("42", 0, 20, "COMPLETING", acct)
    assert (d.requeue, d.kind) == (False, "ending"), d
    assert "COMPLETING" in d.reason


def test_cancelled_in_slurmctld_is_not_requeued():
    assert not decide_from("42", 0, 20, "CANCELLED", "RUNNING").requeue


def test_cancelled_in_sacct_is_not_requeued_even_if_slurmctld_lags():
    d = decide_from("42", 0, 20, "RUNNING", "CANCELLED by 1000")
    assert (d.requeue, d.kind) == (False, "cancelled"), d


def test_slurmctld_unavailable_does_not_resurrect():
    d = decide_from("42", 0, 20, None, "RUNNING")
    assert (d.requeue, d.kind) == (False, "unknown"), d


@pytest.mark.parametrize("ctl", ["PENDING", "REQUEUED", "SUSPENDED"])
def test_not_running_in_slurmctld_is_not_requeued_again(ctl):
    assert not decide_from("42", 0, 20, ctl, "RUNNING").requeue


@pytest.mark.parametrize("restarts,limit,expected", [(0, 1, True), (1, 1, False), (2, 1, False), (0, 0, False),
                                                     (19, 20, True), (20, 20, False)])
def test_restart_count_boundary(restarts, limit, expected):
    """max_requeues=N allows N requeues: restart counts 0..N-1 requeue, N stops."""
    d = decide_from("42", restarts, limit, "RUNNING", "RUNNING")
    assert d.requeue is expected, d
    if not expected:
        assert d.kind == "requeue_limit" and f"slurm.max_requeues={limit}" in d.reason


def test_budget_fits_in_what_is_left_of_the_lead():
    # signal 30 s ago, lead 120 s: 120 - 30 - margin
    assert budget_s(120, signal_at=1000.0, now=1030.0) == pytest.approx(120 - 30 - requeue.SAFETY_MARGIN_S)
    # lead used up by a long save: still a minimal budget (the kill lands late), never negative
    assert budget_s(60, signal_at=1000.0, now=1100.0) == requeue.MIN_BUDGET_S
    # signal time unknown: at most half the lead
    assert budget_s(120, signal_at=None, now=0.0) == 60
    assert budget_s(3600, signal_at=None, now=0.0) == requeue.MAX_BUDGET_S


def test_main_reads_max_requeues_from_the_config(tmp_path, monkeypatch):
    """The template passes --config and --set (and the trainer's --no-resume): all accepted."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    args = requeue.build_parser().parse_args(
        ["--config", "configs/tiny.toml", "--set", "slurm.max_requeues=3", "--no-resume", "--resume", "x"])
    assert (args.config, args.overrides, args.no_resume) == ("configs/tiny.toml", ["slurm.max_requeues=3"], True)
    assert args.max_requeues is None
    assert requeue.main(["--set", f"run.dir={tmp_path}", "--set", "slurm.max_requeues=3"]) == ExitCode.NOT_REQUEUED
    assert not (tmp_path / "jobs.jsonl").exists()  # not a Slurm job: nothing recorded
    assert requeue.main(["--set", "slurm.max_requeues=-1"]) == ExitCode.USAGE


# ---------------------------------------------------------------- slurm.resume = "chain"; PreemptMode=CANCEL
def test_chain_mode_continues_in_a_followup_where_a_requeue_would_be_right():
    d = decide_from("42", 3, 20, "RUNNING", "RUNNING", mode="chain")
    assert (d.requeue, d.kind) == (False, "chain") and "slurm.resume=chain" in d.reason, d


@pytest.mark.parametrize("ctl, acct, restarts, kind", [
    ("COMPLETING", "CANCELLED by 0", 0, "ending"),  # scancel: never a follow-up, whatever the mode
    ("RUNNING", "CANCELLED by 0", 0, "cancelled"),
    ("RUNNING", "RUNNING", 20, "requeue_limit"),  # the limit counts in chain mode too
    (None, "RUNNING", 0, "unknown"),
])
def test_chain_mode_keeps_every_reason_not_to_continue(ctl, acct, restarts, kind):
    assert decide_from("42", restarts, 20, ctl, acct, mode="chain").kind == kind


@pytest.mark.parametrize("mode", ["requeue", "chain"])
def test_preemption_that_cancels_the_job_gets_a_followup(mode):
    """PreemptMode=CANCEL, SIGTERM only (measured: COMPLETING, Restarts unchanged, sacct PREEMPTED):
    nothing else would resume the run."""
    d = decide_from("42", 0, 20, "COMPLETING", "PREEMPTED", slurm_requeues=False, mode=mode)
    assert (d.requeue, d.kind) == (False, "preempted_cancel") and "PreemptMode=CANCEL" in d.reason, d
    assert decide_from("42", 20, 20, "COMPLETING", "PREEMPTED", slurm_requeues=False).kind == "requeue_limit"


@pytest.mark.parametrize("slurm_requeues", [True, None])
def test_preemption_that_slurm_requeues_itself_gets_nothing_more(slurm_requeues):
    """PreemptMode=REQUEUE (measured: Restarts already one more than SLURM_RESTART_COUNT), or unknown."""
    d = decide_from("42", 0, 20, "COMPLETING", "PREEMPTED", slurm_requeues=slurm_requeues, mode="chain")
    assert d.kind == "ending", d


def test_decide_tells_slurm_requeueing_from_restarts(monkeypatch):
    """``decide`` compares slurmctld's Restarts with this job's own SLURM_RESTART_COUNT (not the chain's)."""
    import time as _time

    monkeypatch.setattr(requeue, "ctl_job", lambda j, t: {"JobState": "COMPLETING", "Restarts": "2", "Requeue": "1"})
    monkeypatch.setattr(requeue, "acct_state", lambda j, t: "PREEMPTED")
    deadline = _time.monotonic() + 10
    assert requeue.decide("42", 5, 20, deadline, chain_restarts=3, own_restarts=2).kind == "preempted_cancel"
    assert requeue.decide("42", 4, 20, deadline, chain_restarts=3, own_restarts=1).kind == "ending"


def test_resume_mode_is_validated():
    from foldhpc.config import ConfigError, load_config

    assert load_config(None, []).slurm.resume == "chain"
    with pytest.raises(ConfigError, match=r"slurm.resume = 'later': must be one of chain, requeue"):
        load_config(None, ["slurm.resume=later"])
