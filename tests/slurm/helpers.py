"""Helpers for tests that talk to the real local Slurm cluster (tests/slurm/cluster.sh).

Everything shells out to the Slurm client tools with timeouts; nothing is mocked.
sacct lags slurmctld by a second or two, so the pollers here look at both.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

CLUSTER_SH = Path(__file__).with_name("cluster.sh")

SACCT_FIELDS = (
    "JobID,JobName,State,ExitCode,Elapsed,Start,End,Submit,NodeList,Reason,DerivedExitCode,Partition,AllocTRES"
)

#: states after which a job (this run of it) will not change any more
TERMINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "OUT_OF_MEMORY",
        "NODE_FAIL",
        "BOOT_FAIL",
        "DEADLINE",
        "PREEMPTED",
        "REVOKED",
    }
)


def run(cmd: list[str], timeout: float = 30, check: bool = True) -> str:
    """Run a command, return stdout; raise with stderr on failure."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} -> rc {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}")
    return p.stdout


def sbatch(*args: str, timeout: float = 30) -> str:
    """`sbatch --parsable ARGS...` -> job id (str)."""
    out = run(["sbatch", "--parsable", *args], timeout=timeout).strip()
    return out.split(";")[0]


def _first_word(state: str) -> str:
    # sacct writes e.g. "CANCELLED by 0": the state is the first word
    return state.split()[0] if state.strip() else ""


def sacct_state(job_id: str | int) -> str | None:
    """Current state of the allocation in sacct (latest run), first word only; None if unknown yet."""
    out = run(["sacct", "-j", str(job_id), "-X", "-n", "-P", "--format=State"], timeout=30, check=False)
    lines = [ln for ln in out.splitlines() if ln.strip()]
    return _first_word(lines[-1]) if lines else None


def scontrol_job(job_id: str | int) -> dict[str, str]:
    """`scontrol show job -o ID` as a dict (empty if slurmctld no longer knows the job)."""
    out = run(["scontrol", "show", "job", "-o", str(job_id)], timeout=30, check=False)
    fields: dict[str, str] = {}
    for m in re.finditer(r"(\S+?)=(\S*)", out.strip()):
        fields.setdefault(m.group(1), m.group(2))
    return fields


def scontrol_state(job_id: str | int) -> str | None:
    st = scontrol_job(job_id).get("JobState")
    return st or None


def job_state(job_id: str | int) -> str | None:
    """Best current state: slurmctld's view if it still has the job, else sacct's."""
    return scontrol_state(job_id) or sacct_state(job_id)


def wait_for_state(
    job_id: str | int, states: str | Iterable[str], timeout: float = 60, poll: float = 0.5
) -> str:
    """Poll scontrol and sacct until the job is in one of `states`; return that state.

    Raises TimeoutError (with both views and the job record) if it does not get there in time.
    """
    wanted = {states} if isinstance(states, str) else set(states)
    deadline = time.monotonic() + timeout
    while True:
        sc, sa = scontrol_state(job_id), sacct_state(job_id)
        for st in (sc, sa):
            if st in wanted:
                return st
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"job {job_id} not in {sorted(wanted)} after {timeout}s: scontrol={sc} sacct={sa}\n"
                f"{run(['scontrol', 'show', 'job', str(job_id)], check=False)}"
            )
        time.sleep(poll)


def sacct_rows(job_id: str | int, duplicates: bool = True, fields: str = SACCT_FIELDS) -> list[dict[str, str]]:
    """sacct rows for the job (allocation + steps) as dicts.

    With duplicates=True the earlier runs of a requeued job (PREEMPTED / REQUEUED rows) are included.
    """
    cmd = ["sacct", "-j", str(job_id), "--parsable2", "--noheader", f"--format={fields}"]
    if duplicates:
        cmd.append("--duplicates")
    out = run(cmd, timeout=30)
    names = fields.split(",")
    rows = []
    for line in out.splitlines():
        if not line.strip():
            continue
        rows.append(dict(zip(names, line.split("|"))))
    return rows


def job_nodes(job_id: str | int) -> str:
    """NodeList of a running job from slurmctld (e.g. "n1" or "n[1-2]"); RuntimeError if it has none yet."""
    nodes = scontrol_job(job_id).get("NodeList", "")
    if not nodes or nodes == "(null)":
        raise RuntimeError(f"job {job_id} has no nodes (not running?): {scontrol_job(job_id)}")
    return nodes


def preempt(job_id: str | int, cpus: int, seconds: int = 3) -> tuple[str, str]:
    """A real partition preemption of ``job_id``: a ``high`` job that needs every CPU of the node it
    runs on, pinned there (the cluster has two nodes; an unpinned one would start on the idle
    one). Returns (the preemptor's job id, the node)."""
    node = job_nodes(job_id)
    hi = sbatch("--partition=high", f"--nodelist={node}", f"--cpus-per-task={cpus}", "--mem=1G",
                "--output=/dev/null", f"--wrap=sleep {seconds}")
    return hi, node


def job_restarts(job_id: str | int) -> int:
    """Restarts=N from `scontrol show job -o` (sacct 22.05 has no Restarts field)."""
    value = scontrol_job(job_id).get("Restarts")
    if value is None:
        raise LookupError(f"scontrol does not know job {job_id} (MinJobAge passed?)")
    return int(value)


def cancel_all_jobs(job_ids: Iterable[str | int] | None = None, wait: float = 30) -> None:
    """scancel the given jobs, or every job of the current user if job_ids is None; wait until they are gone."""
    if job_ids is None:
        import getpass

        run(["scancel", "-u", getpass.getuser()], timeout=30, check=False)
        ids = run(["squeue", "-h", "-u", getpass.getuser(), "-o", "%i"], timeout=30, check=False).split()
    else:
        ids = [str(j) for j in job_ids]
        if not ids:
            return
        run(["scancel", *ids], timeout=30, check=False)
    deadline = time.monotonic() + wait
    while ids and time.monotonic() < deadline:
        alive = run(["squeue", "-h", "-o", "%i", "-j", ",".join(ids)], timeout=30, check=False).split()
        if not alive:
            return
        time.sleep(0.5)


def wait_sacct_row(
    job_id: str | int, states: str | Iterable[str], timeout: float = 60, poll: float = 0.5
) -> dict[str, str]:
    """Wait until sacct's allocation row for the latest run of the job is in `states` AND complete; return it.

    Measured on 22.05: right after a short job ends, sacct already shows COMPLETED but Partition is
    still empty for ~1-2 s, so "complete" here means the Partition field is filled in too.
    """
    wanted = {states} if isinstance(states, str) else set(states)
    deadline = time.monotonic() + timeout
    while True:
        rows = [r for r in sacct_rows(job_id) if r["JobID"] == str(job_id)]
        if rows:
            row = rows[-1]
            if _first_word(row["State"]) in wanted and row["Partition"]:
                return row
        if time.monotonic() > deadline:
            raise TimeoutError(f"sacct: job {job_id} not in {sorted(wanted)} (complete) after {timeout}s: {rows}")
        time.sleep(poll)


def notes_of(tmp_path: Path) -> tuple[dict[str, object], Path]:
    """A ``monitor.on_state_change`` that appends "STATE JOB STEP" to a file, and that file."""
    script, notes = tmp_path / "note.sh", tmp_path / "notes"
    script.write_text(f'echo "$FOLDHPC_STATE $FOLDHPC_JOB_ID $FOLDHPC_STEP" >> {notes}\n')
    return {"monitor.on_state_change": f"sh {script}"}, notes
