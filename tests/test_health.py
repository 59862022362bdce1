"""The node health check (foldhpc.resilience.health), the bad-node records and exclusion
(foldhpc.cluster.nodes), and the supervisor's use of both (issue 23 items 1 and 2).

Each check fails by a real cause here: a directory that cannot be created (under a regular file:
CI runs as root, so chmod would not do), thresholds above what this machine has, a site command
that exits 1 or outlives its timeout, the fault hook naming this node. The supervisor runs for
real (``foldhpc supervise -- CMD``); a "Slurm job" there is one with ``SLURM_JOB_ID`` in its
environment, which is all the supervisor reads to know it runs in one.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, read_json

from foldhpc.cluster.nodes import Exclusion, bad_nodes, exclusion, merge_exclude
from foldhpc.config import ConfigError, load_config
from foldhpc.records.events import EventLog
from foldhpc.records.exitcodes import ExitCode
from foldhpc.records.status import StatusFile
from foldhpc.resilience import health
from foldhpc.resilience.health import check_node, record

NODE = "testnode7"


def _cfg(run_dir: Path, *overrides: str) -> Any:
    return load_config(None, [f"run.dir={run_dir}", *overrides])


def _checks(rep: Any) -> list[str]:
    return [p.check for p in rep.problems]


def test_a_healthy_node_passes_and_notes_what_it_skipped(tmp_path: Path) -> None:
    rep = check_node(_cfg(tmp_path / "run"), NODE)
    assert rep.ok, rep.summary()
    assert rep.node == NODE and set(rep.checks) == {"devices", "directories", "free_mem", "command"}
    if not Path("/dev/nvidia0").exists():
        assert any(n.startswith("devices: skipped") for n in rep.notes), rep.notes
    assert (tmp_path / "run" / "checkpoints").is_dir()  # created, as the trainer would
    assert not [p for p in (tmp_path / "run").rglob(".foldhpc-health-*")]  # the probe files are gone


def test_directories_that_cannot_be_created_fail_writable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("a regular file")
    rep = check_node(_cfg(tmp_path / "file" / "run"), NODE)
    assert _checks(rep) == ["writable", "writable"], rep.problems
    assert "run directory" in rep.problems[0].detail and "Not a directory" in rep.problems[0].detail
    assert "checkpoint directory" in rep.problems[1].detail


def test_a_checkpoint_dir_elsewhere_is_checked_too(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    rep = check_node(_cfg(tmp_path / "run", f"checkpoint.dir={tmp_path / 'file' / 'ck'}"), NODE)
    assert _checks(rep) == ["writable"] and "checkpoint directory" in rep.problems[0].detail


def test_fs_type_takes_the_longest_mount_point() -> None:
    mounts = ("/dev/vda / ext4 rw,relatime 0 0\n"
              "srv:/export /shared nfs4 rw,vers=4.2 0 0\n"
              "tmpfs /shared/tmp tmpfs rw 0 0\n"
              "lustre@tcp:/fs /lus lustre rw 0 0\n")
    assert health.fs_type(Path("/shared/runs/a"), mounts) == "nfs4"
    assert health.fs_type(Path("/shared/tmp/x"), mounts) == "tmpfs"
    assert health.fs_type(Path("/sharedother"), mounts) == "ext4"  # a prefix of the name is not the mount
    assert health.fs_type(Path("/lus"), mounts) == "lustre"
    assert health.fs_type(Path("/x"), "") == ""
    assert health.fs_type(Path("/"), None) != ""  # this machine's own /proc/mounts


def test_a_full_shared_file_system_is_not_the_nodes_fault(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every node sees a full NFS/Lustre directory: failing the node would exclude one node after
    another until the run stops. It is a note and a warning instead. No shared file system is
    mounted on this machine, so the mount table's answer is replaced, not the check."""
    cfg = _cfg(tmp_path / "run", "health.min_free_disk=1000T")
    assert _checks(check_node(cfg, NODE)) == ["free_disk"]  # local: the node fails
    monkeypatch.setattr(health, "fs_type", lambda path, mounts=None: "nfs4")
    rep = check_node(cfg, NODE)
    assert rep.ok, rep.problems
    assert any(n.startswith("free_disk:") and "shared file system (nfs4)" in n for n in rep.notes), rep.notes


def test_thresholds_above_what_the_machine_has_fail(tmp_path: Path) -> None:
    rep = check_node(_cfg(tmp_path / "run", "health.min_free_mem=1000T", "health.min_free_disk=1000T"), NODE)
    assert sorted(_checks(rep)) == ["free_disk", "free_mem"], rep.problems
    mem = next(p for p in rep.problems if p.check == "free_mem")
    assert "health.min_free_mem = 1000T" in mem.detail and "MiB available" in mem.detail


def test_a_site_command_that_exits_1_fails_with_its_stderr_tail(tmp_path: Path) -> None:
    cmd = 'echo "checking $FOLDHPC_HEALTH_NODE"; echo "ECC errors on GPU 3" >&2; exit 1'
    rep = check_node(_cfg(tmp_path / "run", f"health.command={json.dumps(cmd)}"), NODE)
    assert _checks(rep) == ["command"], rep.problems
    assert "exited with 1" in rep.problems[0].detail and rep.problems[0].detail.endswith("ECC errors on GPU 3")
    ok = check_node(_cfg(tmp_path / "run", 'health.command="test \\"$FOLDHPC_HEALTH_NODE\\" = testnode7"'), NODE)
    assert ok.ok, ok.problems  # the command is told which node it checks


def test_a_site_command_past_its_timeout_fails_and_is_killed(tmp_path: Path) -> None:
    marker = tmp_path / "survived"
    cmd = f"sleep 3; touch {marker}"
    rep = check_node(_cfg(tmp_path / "run", f"health.command={json.dumps(cmd)}", "health.command_timeout=0.2s"), NODE)
    assert _checks(rep) == ["command"] and "health.command_timeout = 0.2s" in rep.problems[0].detail
    assert rep.seconds < 3
    subprocess.run(["sleep", "3.5"])
    assert not marker.exists()  # its process group was killed, not left to run on


def test_the_fault_hook_fails_the_node_it_names_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FOLDHPC_FAIL_HEALTH_ON_NODE", f"other,{NODE}")
    assert _checks(check_node(_cfg(tmp_path / "run"), NODE)) == ["fault_hook"]
    assert check_node(_cfg(tmp_path / "run"), "n2").ok


def test_bad_health_config_is_refused_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"health.min_free_mem = 'lots'.*not a size"):
        _cfg(tmp_path, "health.min_free_mem=lots")
    with pytest.raises(ConfigError, match=r"health.command_timeout = '0'"):
        _cfg(tmp_path, "health.command_timeout=0")
    with pytest.raises(ConfigError, match=r"fault.crash_loop_jobs = 0"):
        _cfg(tmp_path, "fault.crash_loop_jobs=0")


def test_a_failed_check_is_recorded_and_read_back_as_a_bad_node(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (tmp_path / "file").write_text("")
    rep = check_node(_cfg(run, f"checkpoint.dir={tmp_path / 'file' / 'ck'}", "health.min_free_mem=1000T"), NODE)
    run.mkdir(exist_ok=True)
    record(rep, EventLog(run), StatusFile(run), job_id="41")
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in events] == ["health_check", "node_unhealthy", "node_unhealthy"]
    assert events[0]["ok"] is False and events[1]["node"] == NODE and events[1]["job_id"] == "41"
    st = read_json(run / "status.json")
    assert {(b["node"], b["check"]) for b in st["bad_nodes"]} == {(NODE, "writable"), (NODE, "free_mem")}
    bad = bad_nodes(run)
    assert list(bad) == [NODE] and bad[NODE]["check"] == "free_mem"  # the newest record of the node
    ex = exclusion(run, 5.0, job_nodes=1)  # sinfo may answer here or not: the nodes are known either way
    assert ex.nodes == (NODE,)


def test_the_exclusion_is_bounded_by_the_cluster() -> None:
    why = {"n1": "fault_hook: x", "n2": "crashes: y"}
    assert not Exclusion(("n1",), why, cluster_nodes=2, job_nodes=1).over
    assert Exclusion(("n1", "n2"), why, cluster_nodes=2, job_nodes=1).over  # nothing would be left
    assert Exclusion(("n1",), why, cluster_nodes=2, job_nodes=2).over  # a two-node job needs both
    assert not Exclusion(("n1", "n2"), why, cluster_nodes=None, job_nodes=1).over  # unknown: not stopped
    from foldhpc.slurm.requeue import bad_nodes_stop

    d = bad_nodes_stop(Exclusion(("n1", "n2"), why, cluster_nodes=2, job_nodes=1), "77")
    assert d is not None and d.kind == "bad_nodes" and not d.continues and d.event == "stopped"
    assert "n1 (fault_hook: x), n2 (crashes: y)" in d.reason
    assert bad_nodes_stop(Exclusion(("n1",), why, 2, 1), "77") is None


def test_exclude_lists_merge_with_the_jobs_own() -> None:
    assert merge_exclude("n[1-2],m3", "m3,n9") == "n[1-2],m3,n9"
    assert merge_exclude("(null)", "n1") == "n1" and merge_exclude(None, "") == ""
    from foldhpc.slurm.followup import SbatchFollowUp

    fu = SbatchFollowUp(Path("/tmp/run"), "/spool/job.sh", ["cfg.toml"])
    cmd = fu.command("12", {"ExcNodeList": "n5", "NumNodes": "1"}, ("n1",))
    assert "--exclude=n5,n1" in cmd and cmd[-2:] == ["/spool/job.sh", "cfg.toml"]
    assert not any(a.startswith("--exclude") for a in fu.command("12", {"NumNodes": "1"}))


# ------------------------------------------------------------------ the supervisor
def _supervise(run_dir: Path, code: str, *opts: str, env: dict[str, str] | None = None,
               ) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "foldhpc", "supervise", "--set", f"run.dir={run_dir}", "--set",
            "fault.restart_backoff=0.05", *opts, "--", sys.executable, "-c", code]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "FOLDHPC_"))}
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(base, OMP_NUM_THREADS="1", **(env or {})))


def _kinds(run_dir: Path) -> list[str]:
    return [json.loads(line)["kind"] for line in (run_dir / "events.jsonl").read_text().splitlines()]


def test_the_supervisor_does_not_start_on_a_bad_node(tmp_path: Path) -> None:
    run, marker = tmp_path / "run", tmp_path / "started"
    r = _supervise(run, f"open({str(marker)!r}, 'w')",
                   env={"FOLDHPC_FAIL_HEALTH_ON_NODE": socket.gethostname()})
    assert r.returncode == ExitCode.CHECKPOINTED, r.stderr[-2000:]
    assert not marker.exists()  # never trained here
    assert "supervisor_spawn" not in _kinds(run) and "node_unhealthy" in _kinds(run)
    st = read_json(run / "status.json")
    assert st["state"] == "checkpointed" and "failed its health check" in st["warning"]
    assert st["bad_nodes"][0]["check"] == "fault_hook"
    assert "Outside a Slurm job nothing hands the run over" in r.stderr and "health.enabled = false" in r.stderr
    # and on a good node it starts, after a check of a few milliseconds
    r = _supervise(tmp_path / "run2", f"open({str(marker)!r}, 'w')")
    assert r.returncode == 0 and marker.exists(), r.stderr[-2000:]
    checks = [json.loads(line) for line in (tmp_path / "run2" / "events.jsonl").read_text().splitlines()
              if '"health_check"' in line]
    assert len(checks) == 1 and checks[0]["ok"] is True


def test_health_check_off_starts_anyway(tmp_path: Path) -> None:
    run, marker = tmp_path / "run", tmp_path / "started"
    r = _supervise(run, f"open({str(marker)!r}, 'w')", "--set", "health.enabled=false",
                   env={"FOLDHPC_FAIL_HEALTH_ON_NODE": socket.gethostname()})
    assert r.returncode == 0 and marker.exists(), r.stderr[-2000:]
    assert "health_check" not in _kinds(run)


# a different exit status each time: never "the same failure twice" (deterministic)
_FAILING = ("import sys, pathlib; c = pathlib.Path({count!r}); n = len(c.read_text()) if c.exists() else 0\n"
            "c.write_text('x' * (n + 1)); sys.exit(4 + n)\n")


def test_crashes_without_progress_in_a_slurm_job_blame_the_node(tmp_path: Path) -> None:
    run, count = tmp_path / "run", tmp_path / "count"
    r = _supervise(run, _FAILING.format(count=str(count)), "--set", "fault.max_restarts=5",
                   env={"SLURM_JOB_ID": "999999", "SLURMD_NODENAME": NODE})
    assert r.returncode == ExitCode.CHECKPOINTED, r.stderr[-2000:]
    assert count.read_text() == "xx"  # fault.node_crash_limit = 2 failures, then handed over
    bad = bad_nodes(run)
    assert list(bad) == [NODE] and bad[NODE]["check"] == "crashes" and "exit status 5" in bad[NODE]["detail"]
    st = read_json(run / "status.json")
    assert st["state"] == "checkpointed" and st["bad_nodes"][0]["check"] == "crashes"


def test_restarts_without_progress_end_as_a_crash_loop(tmp_path: Path) -> None:
    run, count = tmp_path / "run", tmp_path / "count"
    r = _supervise(run, _FAILING.format(count=str(count)), "--set", "fault.max_restarts=6", "--set",
                   "fault.crash_loop_restarts=2")
    assert r.returncode == ExitCode.CRASH_LOOP, r.stderr[-2000:]
    assert count.read_text() == "xxx"  # 2 restarts without a new checkpoint, then the third failure ends it
    st = read_json(run / "status.json")
    assert st["state"] == "crash_loop" and "fault.crash_loop_restarts = 2" in st["error"]
    # without the breaker fault.max_restarts decides, as before (exit 1)
    count.unlink()
    r = _supervise(tmp_path / "run2", _FAILING.format(count=str(count)), "--set", "fault.max_restarts=2",
                   "--set", "fault.crash_loop_restarts=0")
    assert r.returncode == ExitCode.FAILED and count.read_text() == "xxx", r.stderr[-2000:]


def test_foldhpc_status_shows_the_bad_and_excluded_nodes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    st = StatusFile(run)
    st.update(state="checkpointed", step=12, excluded_nodes=["n1"], bad_nodes=[
        {"node": "n1", "check": "fault_hook", "detail": "FOLDHPC_FAIL_HEALTH_ON_NODE names this node", "t": 1.0,
         "job_id": "51"},
        {"node": "n3", "check": "free_disk", "detail": "10 MiB free", "t": 2.0, "job_id": "50"}])
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    p = subprocess.run([sys.executable, "-m", "foldhpc", "status", str(run)], cwd=ROOT, capture_output=True,
                       text=True, timeout=60, env=env)
    assert "excluded: run: n1 (fault_hook: FOLDHPC_FAIL_HEALTH_ON_NODE names this node; job 51)" in p.stdout, p.stdout
    assert "bad node: run: n3 (free_disk: 10 MiB free; job 50)" in p.stdout, p.stdout
    p = subprocess.run([sys.executable, "-m", "foldhpc", "status", str(run), "--json"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60, env=env)
    (r,) = json.loads(p.stdout)["runs"]
    assert r["excluded_nodes"] == ["n1"] and [b["node"] for b in r["bad_nodes"]] == ["n1", "n3"]
