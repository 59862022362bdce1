"""Which nodes a run avoids (foldhpc.cluster.nodes): issue 24's link into issue 23.

A node suspect of silent data corruption twice (an ``sdc_suspect_node`` record in events.jsonl,
written by the trainer's replay attribution) is a bad node like one that failed its health check:
the run's next job excludes it. Pure: the records are written with the run's own EventLog, no Slurm.
"""

from __future__ import annotations

from pathlib import Path

from foldhpc.cluster.nodes import SDC_CHECK, bad_nodes, exclusion
from foldhpc.records.events import EventLog


def test_a_node_suspect_of_sdc_twice_is_a_bad_node(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    events = EventLog(run)
    events.emit("sdc_attribution", step=40, trigger="mismatch", verdict="rank", reproducible=True, ranks=[1],
                nodes=["n2"], samples=[])  # suspect once: not bad yet (no sdc_suspect_node record)
    assert bad_nodes(run) == {}
    events.emit("node_unhealthy", node="n1", check="free_disk", detail="10 MiB free", job_id="7")
    events.emit("sdc_suspect_node", node="n2", suspected=2, steps=[40, 80])
    bad = bad_nodes(run)
    assert sorted(bad) == ["n1", "n2"]
    assert bad["n2"]["check"] == SDC_CHECK == "sdc"
    assert bad["n2"]["detail"] == "suspect of silent data corruption twice (steps 40, 80)"
    assert bad["n1"]["check"] == "free_disk"  # the health check's record is read as before
    ex = exclusion(run, 5.0, partition=None, job_nodes=1)  # sinfo may answer here or not: the nodes are known
    assert ex.nodes == ("n1", "n2") and ex.why["n2"].startswith("sdc: suspect of silent data corruption twice")


def test_an_sdc_record_without_a_node_or_steps_is_read_safely(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    events = EventLog(run)
    events.emit("sdc_suspect_node", node="", suspected=2, steps=[3])  # no node: nothing to exclude
    events.emit("sdc_suspect_node", node="n9", suspected=3, steps=None)
    assert bad_nodes(run) == {"n9": {"check": "sdc", "detail": "suspect of silent data corruption 3 times",
                                     "t": bad_nodes(run)["n9"]["t"], "job_id": None}}


def test_a_node_failure_that_slurm_requeues_is_told_as_such() -> None:
    """A job that lost a node: slurmctld COMPLETING, sacct NODE_FAIL, Restarts already advanced
    (measured on the local cluster): Slurm requeues it itself, and the record says so."""
    from foldhpc.slurm.requeue import decide_from

    d = decide_from("22", 0, 20, "COMPLETING", "NODE_FAIL", requeue_allowed=True, slurm_requeues=True)
    assert (d.requeue, d.kind) == (False, "node_fail") and "lost a node" in d.reason
    # not requeued by Slurm (Requeue=0): the job is ending, as before
    assert decide_from("22", 0, 20, "COMPLETING", "NODE_FAIL", slurm_requeues=False).kind == "ending"
