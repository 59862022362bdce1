"""``foldhpc chaos --backend slurm`` on the real local cluster: one fault of every Slurm kind
(a user's USR1, USR1 to the whole job, a real partition preemption, an admin's requeue, a trainer crash, a user's
scancel, a node that dies under the job, a node that goes bad under the job) against one submitted run in the
default resume mode (chain); every fault recovered, no two jobs of the run running at once, the final state
bit-exact with the local reference, and both nodes back in service at the end."""

from __future__ import annotations

import json

from conftest import GOOD_DATA, TINY, run_foldhpc
from foldhpc.chaos import report
from foldhpc.chaos import slurm as slurm_backend
from foldhpc.chaos.kinds import KINDS
from foldhpc.chaos.schedule import Plan, PlannedFault
from foldhpc.records.history import read_history
from .helpers import cancel_all_jobs, run



def test_one_fault_of_every_slurm_kind_recovered_bit_exact(tmp_path, slurm_cluster):
    kinds = [("scancel_signal", ""), ("crash", "SIGKILL"), ("whole_job_signal", ""), ("preempt", ""), ("scancel", ""),
             ("requeue", ""), ("node_down", ""), ("bad_node", "")]
    faults, step = [], 15
    for i, (kind, variant) in enumerate(kinds):
        faults.append(PlannedFault(i, kind, step, variant))
        step += 15 + KINDS[kind].span
    plan = Plan(seed=7, faults=faults, max_steps=step + 20, every_steps=10)
    try:
        outcome = slurm_backend.run(str(TINY), [f"data.path={GOOD_DATA}", "slurm.partition=debug"], plan, tmp_path)
    finally:  # the run's own jobs only (the runner cancels them too): never other tests' jobs
        events = read_history(tmp_path / "runs" / "chaos")[0] if (tmp_path / "runs" / "chaos").exists() else []
        cancel_all_jobs({str(e["job_id"]) for e in events if e.get("job_id")})
    verdict = report.judge(len(plan.faults), outcome.records, outcome.reference.digest, outcome.chaos.digest,
                           outcome.reference.completed, outcome.chaos.completed, outcome.chaos.final_step,
                           plan.max_steps)
    assert verdict.passed, verdict.problems
    recs = {r.kind: r for r in outcome.records}
    for kind in ("scancel_signal", "whole_job_signal", "preempt", "scancel", "requeue"):
        assert recs[kind].steps_lost == 0 and recs[kind].time_to_resume_s is not None, recs[kind]
    for kind in ("crash", "node_down", "bad_node"):
        crash = recs[kind]
        assert 0 <= crash.steps_lost <= crash.step - crash.newest_durable_step, crash
    # chain (the default): USR1, the whole-job USR1 and the preemption each made a follow-up job; the
    # requeue kept its job id; scancel ended the run and the runner resubmitted it; the bad node's job handed
    # over to a follow-up that excludes the node; Slurm requeued the job that lost its node (same id): 1 + 3 + 1 + 1 = 6 jobs
    assert len(outcome.slurm_jobs) == 6 and outcome.max_jobs_running == 1, (outcome.slurm_jobs, outcome.records)
    assert any("requeued" in n for n in recs["requeue"].notes), recs["requeue"].notes
    assert any("ended the run" in n for n in recs["scancel"].notes), recs["scancel"].notes
    down = recs["node_down"]
    assert any(n.startswith("node ") and "requeued by Slurm (" in n and "NODE_FAIL" in n for n in down.notes), down
    bad = recs["bad_node"]
    assert any(n.startswith("bad node ") and "follow-up" in n for n in bad.notes), bad.notes
    doc = report.build(outcome, plan, verdict, command=["foldhpc", "chaos", "(test)"], config=str(TINY),
                       overrides=[], backend="slurm", load_start=(0.0, 0.0, 0.0), load_end=(0.0, 0.0, 0.0),
                       skipped_kinds={})
    report.write(doc, tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["verdict"]["passed"]
    assert "slurm backend" in (tmp_path / "report.md").read_text()
    st = json.loads(run_foldhpc("status", str(tmp_path / "runs" / "chaos"), "--json").stdout)["runs"][0]
    assert st["state"] == "completed" and str(st["job_id"]) == outcome.slurm_jobs[-1], st
    # every node node_down took out is back in service (DOWN/DRAIN would leave "down"/"drain"/"drng")
    states = run(["sinfo", "--noheader", "--Node", "--format=%N %t"]).split("\n")
    assert not [ln for ln in states if any(w in ln for w in ("down", "drain", "drng"))], states
