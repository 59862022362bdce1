"""What Slurm says about jobs: ``sacct`` first, ``scontrol``/``squeue`` when accounting is unavailable.

``foldhpc status`` needs the *job's* side of the story (pending, preempted, timed out, out of memory,
how often it was requeued); the run directory only knows the training side. Facts this module is
built on (Slurm 22.05.8, see tests/fixtures/sacct/):

* A requeued job keeps its job id. ``sacct --duplicates`` prints one allocation row per run of it,
  oldest first: the earlier ones PREEMPTED or REQUEUED, the last one the current run. Without
  ``--duplicates`` only the last run is shown, so restarts would be invisible.
* sacct 22.05 has no ``Restarts`` field. Restarts = number of earlier allocation rows, cross-checked
  with ``scontrol show job`` ``Restarts=`` while slurmctld still holds the job (MinJobAge).
* States can carry extra words (``CANCELLED by 0``): the state is the first word.
* Step rows (``123.batch``, ``123.0``, ``123.extern``) belong to the allocation row printed before
  them; they are used for exit codes and OOM detection only, never shown as jobs.
* sacct lags slurmctld by a second or two; a job it does not know yet is "unknown", not a guess.

Nothing here raises on bad Slurm output: malformed lines and unknown states become ``problems`` and
``"unknown"`` states with the raw text kept, so the caller can say what it could not read.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

from foldhpc.cluster.command import SlurmCommandError, run_command

log = logging.getLogger(__name__)

SACCT_FIELDS = ("JobID", "JobName", "State", "ExitCode", "DerivedExitCode", "Elapsed", "Start", "End",
                "Submit", "Partition", "NodeList", "Reason")
#: squeue columns for the fallback (same order as tests/fixtures/sacct/squeue_h_o.txt)
SQUEUE_FORMAT = "%i|%j|%P|%T|%r|%M|%l|%D|%R"
SQUEUE_FIELDS = ("JobID", "JobName", "Partition", "State", "Reason", "Elapsed", "TimeLimit", "Nodes", "NodeList")

# Normalised states shown by ``foldhpc status``.
PENDING, RUNNING, COMPLETING, SUSPENDED = "pending", "running", "completing", "suspended"
COMPLETED, FAILED, PREEMPTED, REQUEUED = "completed", "failed", "preempted", "requeued"
TIMEOUT, CANCELLED, NODE_FAIL, OUT_OF_MEMORY, UNKNOWN = "timeout", "cancelled", "node_fail", "out_of_memory", "unknown"
#: pending but held (``scontrol requeuehold``/``hold``): it will not run until released
HELD = "held"
#: Reasons of a held pending job (measured after ``scontrol requeuehold``: slurmctld says PENDING with
#: Reason=job_requeued_in_held_state, squeue "job requeued in held state", sacct PENDING JobHeldUser)
HELD_REASONS = frozenset({"job_requeued_in_held_state", "job requeued in held state", "JobHeldUser",
                          "JobHeldAdmin", "held_state"})

#: Slurm job state (first word, upper case) -> normalised state. Anything else maps to "unknown".
STATE_MAP: dict[str, str] = {
    "PENDING": PENDING, "RESV_DEL_HOLD": PENDING,
    "REQUEUED": REQUEUED, "REQUEUE_HOLD": HELD, "REQUEUE_FED": REQUEUED,
    "RUNNING": RUNNING, "CONFIGURING": RUNNING, "RESIZING": RUNNING, "SIGNALING": RUNNING,
    "POWER_UP_NODE": RUNNING,
    "COMPLETING": COMPLETING, "STAGE_OUT": COMPLETING,
    "SUSPENDED": SUSPENDED, "STOPPED": SUSPENDED,
    "COMPLETED": COMPLETED,
    "FAILED": FAILED, "LAUNCH_FAILED": FAILED, "RECONFIG_FAIL": FAILED, "SPECIAL_EXIT": FAILED,
    "PREEMPTED": PREEMPTED,
    "TIMEOUT": TIMEOUT, "DEADLINE": TIMEOUT,
    "CANCELLED": CANCELLED, "REVOKED": CANCELLED,
    "NODE_FAIL": NODE_FAIL, "BOOT_FAIL": NODE_FAIL,
    "OUT_OF_MEMORY": OUT_OF_MEMORY,
}
#: States after which this run of the job will not change any more.
FINAL_STATES = frozenset({COMPLETED, FAILED, PREEMPTED, TIMEOUT, CANCELLED, NODE_FAIL, OUT_OF_MEMORY})

_JOB_ID_RE = re.compile(r"^(\d+(?:[_+][\w\[\]\-,%]+)?)(?:\.(.+))?$")  # 123, 123_4, 123+0, 123.batch


def map_state(raw: str) -> str:
    """Normalised state of a Slurm state string (``"CANCELLED by 0"`` -> ``"cancelled"``)."""
    word = raw.strip().split(" ", 1)[0].upper().rstrip("+")  # squeue may append "+" to some states
    return STATE_MAP.get(word, UNKNOWN)


def held_or(state: str, reason: str) -> str:
    """``held`` for a pending job whose reason is a hold, else ``state``."""
    return HELD if state == PENDING and reason.strip() in HELD_REASONS else state


def parse_time(text: str) -> float | None:
    """Epoch seconds of sacct's local ``2026-11-27T03:32:26``; None for Unknown/None/empty."""
    try:
        return time.mktime(time.strptime(text.strip(), "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


def parse_elapsed(text: str) -> int | None:
    """Seconds from Slurm's ``[D-]HH:MM:SS``, ``MM:SS`` or ``MM:SS.mmm``; None if unreadable."""
    m = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)(?:\.\d+)?", text.strip())
    if not m:
        return None
    d, h, mi, s = (int(g) if g else 0 for g in m.groups())
    return ((d * 24 + h) * 60 + mi) * 60 + s


def parse_exit_code(text: str) -> tuple[int, int] | None:
    """(exit code, signal) from ``"3:0"``; None if empty or unreadable."""
    m = re.fullmatch(r"(\d+):(\d+)", text.strip())
    return (int(m.group(1)), int(m.group(2))) if m else None


@dataclass
class SacctRow:
    """One line of ``sacct --parsable2``: an allocation (step None) or one of its steps."""

    job_id: str  # allocation id: "123", "123_4"
    step: str | None  # "batch", "extern", "0", ... ; None for the allocation row
    raw_state: str  # as printed, e.g. "CANCELLED by 0"
    state: str  # normalised (STATE_MAP), "unknown" if not recognised
    fields: dict[str, str]

    def get(self, name: str) -> str:
        return self.fields.get(name, "")


@dataclass
class JobRun:
    """One run of a job id: the allocation row plus its steps (a requeue starts a new run)."""

    row: SacctRow
    steps: list[SacctRow] = field(default_factory=list)

    @property
    def state(self) -> str:
        return self.row.state

    def exit_code(self) -> str:
        """The allocation's ExitCode, or the first non-zero one of its steps if that is 0:0."""
        code = self.row.get("ExitCode")
        if parse_exit_code(code) in (None, (0, 0)):
            for s in self.steps:
                if parse_exit_code(s.get("ExitCode")) not in (None, (0, 0)):
                    return f"{s.get('ExitCode')} (step {s.step})"
        return code

    def oom(self) -> bool:
        return any(s.state == OUT_OF_MEMORY for s in self.steps)

    def to_dict(self) -> dict[str, Any]:
        r = self.row
        return {"state": self.state, "slurm_state": r.raw_state, "exit_code": self.exit_code(),
                "elapsed_s": parse_elapsed(r.get("Elapsed")), "start": r.get("Start") or None,
                "end": r.get("End") or None, "partition": r.get("Partition") or None,
                "steps": {s.step: {"state": s.state, "slurm_state": s.raw_state, "exit_code": s.get("ExitCode")}
                          for s in self.steps}}


@dataclass
class SlurmJob:
    """Everything known about one job id, from one source."""

    job_id: str
    source: str  # "sacct", "scontrol", "squeue" or "none"
    state: str = UNKNOWN
    raw_state: str = ""
    name: str = ""
    restarts: int | None = None  # None: the source cannot tell
    elapsed_s: int | None = None  # of the current run
    total_elapsed_s: int | None = None  # over all runs
    exit_code: str = ""  # "3:0" (exit code 3) or "0:15" (signal 15)
    reason: str = ""  # Slurm's Reason (pending reason, ...)
    partition: str = ""
    runs: list[JobRun] = field(default_factory=list)  # sacct only, oldest first
    notes: list[str] = field(default_factory=list)
    tasks: dict[str, str] = field(default_factory=dict)  # array parent only: task id -> state

    @property
    def known(self) -> bool:
        return self.source != "none"

    def to_dict(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "source": self.source, "state": self.state, "slurm_state": self.raw_state,
                "name": self.name or None, "restarts": self.restarts, "elapsed_s": self.elapsed_s,
                "total_elapsed_s": self.total_elapsed_s, "exit_code": self.exit_code or None,
                "slurm_reason": self.reason or None, "partition": self.partition or None,
                "runs": [r.to_dict() for r in self.runs], "notes": list(self.notes),
                "tasks": dict(self.tasks) or None}


@dataclass
class SlurmQuery:
    """Result of :func:`query_jobs`: one SlurmJob per requested id, plus what went wrong on the way."""

    jobs: dict[str, SlurmJob]
    source: str  # where the states came from: "sacct", "scontrol", "squeue" or "none"
    notes: list[str] = field(default_factory=list)  # sacct unavailable, malformed lines, ...


# ------------------------------------------------------------------ parsing
def parse_sacct(text: str, fields: tuple[str, ...] = SACCT_FIELDS) -> tuple[list[SacctRow], list[str]]:
    """Rows of ``sacct --parsable2`` output (with or without its header line) and a list of problems.

    A header line (first field ``JobID``) overrides ``fields``. Lines with the wrong number of fields
    or an unreadable JobID are reported in the problems, not guessed at.
    """
    rows: list[SacctRow] = []
    problems: list[str] = []
    names = list(fields)
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("|")
        if parts[0] == "JobID":
            names = parts
            continue
        if len(parts) != len(names):
            problems.append(f"sacct line {n}: expected {len(names)} fields, got {len(parts)}: {line[:120]!r}")
            continue
        values = dict(zip(names, parts))
        m = _JOB_ID_RE.match(values.get("JobID", ""))
        if not m:
            problems.append(f"sacct line {n}: unreadable JobID {values.get('JobID', '')!r}")
            continue
        raw = values.get("State", "")
        state = map_state(raw)
        if state == UNKNOWN:
            problems.append(f"sacct line {n}: unknown Slurm state {raw!r} (job {values['JobID']})")
        rows.append(SacctRow(job_id=m.group(1), step=m.group(2), raw_state=raw, state=state, fields=values))
    return rows, problems


def group_runs(rows: list[SacctRow]) -> dict[str, list[JobRun]]:
    """Allocation rows grouped by job id, oldest run first; each step attached to the run before it."""
    runs: dict[str, list[JobRun]] = {}
    for r in rows:
        if r.step is None:
            runs.setdefault(r.job_id, []).append(JobRun(r))
        elif r.job_id in runs:
            runs[r.job_id][-1].steps.append(r)
    return runs


def job_from_runs(job_id: str, runs: list[JobRun]) -> SlurmJob:
    """The job as sacct sees it: current state = newest run, restarts = number of earlier runs."""
    cur = runs[-1]
    state = held_or(cur.state, cur.row.get("Reason"))
    notes = []
    if state == FAILED and cur.oom():
        state = OUT_OF_MEMORY
        notes.append("a step ran out of memory")
    elapsed = [parse_elapsed(r.row.get("Elapsed")) for r in runs]
    return SlurmJob(
        job_id=job_id, source="sacct", state=state, raw_state=cur.row.raw_state, name=cur.row.get("JobName"),
        restarts=len(runs) - 1, elapsed_s=elapsed[-1],
        total_elapsed_s=None if None in elapsed else sum(e for e in elapsed if e is not None),
        exit_code=cur.exit_code(), reason=_reason(cur.row.get("Reason")), partition=cur.row.get("Partition"),
        runs=runs, notes=notes)


#: ``scontrol show job`` keys whose values may hold spaces (a job name, a path, a comment). In the
#: multi-line format (no ``--oneliner``; measured on 22.05.8) each is the last field of its line, so
#: its value runs to the end of the line; in a one-liner it runs to the next key of
#: :data:`SCONTROL_JOB_KEYS` (``WorkDir=/home/alice/My Project StdErr=...``).
SCONTROL_FREE_TEXT_KEYS = frozenset({"JobName", "Command", "WorkDir", "StdErr", "StdIn", "StdOut", "Comment",
                                     "AdminComment", "SystemComment", "BurstBuffer", "Container", "Extra"})
#: the keys of a job record that Slurm 22.05-23.x print (src/api/job_info.c): where a free-text
#: value of a one-liner ends. Any other ``Key=`` still starts a field outside free text.
SCONTROL_JOB_KEYS = frozenset("""
    JobId ArrayJobId ArrayTaskId ArrayTaskThrottle HetJobId HetJobOffset HetJobIdSet JobName UserId GroupId
    MCS_label Priority Nice Account QOS WCKey JobState Reason Dependency Requeue Restarts BatchFlag Reboot
    ExitCode DerivedExitCode RunTime TimeLimit TimeMin SubmitTime EligibleTime AccrueTime StartTime EndTime
    Deadline SuspendTime SecsPreSuspend LastSchedEval Scheduler PreemptEligibleTime PreemptTime ResizeTime
    Partition AllocNode:Sid ReqNodeList ExcNodeList NodeList SchedNodeList BatchHost NumNodes NumCPUs NumTasks
    CPUs/Task ReqB:S:C:T TRES Socks/Node NtasksPerN:B:S:C CoreSpec ThreadSpec JOB_GRES Nodes CPU_IDs Mem GRES
    MinCPUsNode MinMemoryNode MinMemoryCPU MinTmpDiskNode Features ClusterFeatures Cluster DelayBoot
    Reservation OverSubscribe Contiguous Licenses Network Command WorkDir AdminComment SystemComment Comment
    StdErr StdIn StdOut BurstBuffer BurstBufferState CpuFreqMin CpuFreqMax CpuFreqGov Power TresBind TresFreq
    TresPerJob TresPerNode TresPerSocket TresPerTask MailUser MailType NtasksPerTRES CPUs/TRES MemPerTres
    FedOrigin FedViableSiblings FedActiveSiblings KillOInInvalidDependent SelinuxContext Container
    ContainerID Switches Wait-for-Switch Extra OOMKillStep Prolog Epilog ReqSwitch LicensesAlloc
""".split())
_KEY_TOKEN = re.compile(r"([A-Za-z][A-Za-z0-9_:/-]*)=(.*)", re.S)


def _scontrol_fields(line: str, info: dict[str, str], to_line_end: bool) -> None:
    """The ``Key=value`` fields of one line into ``info`` (the first value of a key wins).

    Split at single spaces (so ``My  Project``'s two spaces survive); a token that is no
    ``Key=`` continues a free-text value (:data:`SCONTROL_FREE_TEXT_KEYS`) and is ignored after
    any other key. Inside free text only a known key (:data:`SCONTROL_JOB_KEYS`) starts a field,
    or none at all when ``to_line_end`` (the multi-line format: free text is last on its line).
    """
    key: str | None = None
    parts: list[str] = []

    def flush() -> None:
        if key is not None:
            value = " ".join(parts)
            info.setdefault(key, value.rstrip() if key in SCONTROL_FREE_TEXT_KEYS else value)

    for token in line.split(" "):
        m = _KEY_TOKEN.fullmatch(token)
        free = key in SCONTROL_FREE_TEXT_KEYS
        if m and not (free and (to_line_end or m.group(1) not in SCONTROL_JOB_KEYS)):
            flush()
            key, parts = m.group(1), [m.group(2)]
        elif free:
            parts.append(token)
    flush()


def parse_scontrol(text: str) -> dict[str, dict[str, str]]:
    """``scontrol show job`` -> {job id: {Key: value}}, from either format: one job per line
    (``--oneliner``) or the default one, a record per job (its first line ``JobId=...``, then
    indented lines, a blank line after it). Values with spaces are kept whole
    (:data:`SCONTROL_FREE_TEXT_KEYS`); the multi-line format is the one to ask for them, where
    line ends bound them."""
    records: list[tuple[list[str], bool]] = []
    for line in text.splitlines():
        if line.startswith("JobId="):
            records.append(([line], False))
        elif line.strip() and line[:1].isspace() and records:
            records[-1][0].append(line.lstrip())
            records[-1] = (records[-1][0], True)
    jobs: dict[str, dict[str, str]] = {}
    for lines, multi in records:
        info: dict[str, str] = {}
        for line in lines:
            _scontrol_fields(line, info, to_line_end=multi)
        jid = info.get("JobId")
        if jid:
            if info.get("ArrayTaskId") and info.get("ArrayJobId"):
                jid = f"{info['ArrayJobId']}_{info['ArrayTaskId']}"
                # the array's tasks that have not started yet share one record ("0-3%2", "2,5-7"):
                # each is known by its own id instead (foldhpc status of a sweep asks for 123_2)
                pending = _array_task_ids(info["ArrayTaskId"])
                for task in pending:
                    jobs.setdefault(f"{info['ArrayJobId']}_{task}", info)
                if pending:
                    continue
            jobs[jid] = info
    return jobs


def _array_task_ids(spec: str, limit: int = 10000) -> list[int]:
    """Task ids of a pending array record's ``ArrayTaskId`` (``0-3%2``, ``2,5-7:2``); [] for one task."""
    spec = spec.split("%", 1)[0]
    if spec.isdigit():
        return []
    out: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?", part)
        if not m:
            return []
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        out += range(lo, min(hi, lo + limit) + 1, int(m.group(3) or 1))
    return out[:limit]


def job_from_scontrol(job_id: str, info: dict[str, str]) -> SlurmJob:
    raw = info.get("JobState", "")
    restarts = info.get("Restarts", "")
    return SlurmJob(job_id=job_id, source="scontrol", state=held_or(map_state(raw), info.get("Reason", "")),
                    raw_state=raw,
                    name=info.get("JobName", ""), restarts=int(restarts) if restarts.isdigit() else None,
                    elapsed_s=parse_elapsed(info.get("RunTime", "")), exit_code=info.get("ExitCode", ""),
                    reason=_reason(info.get("Reason", "")), partition=info.get("Partition", ""))


def parse_squeue(text: str) -> tuple[dict[str, SlurmJob], list[str]]:
    """``squeue -h -o SQUEUE_FORMAT`` -> {job id: SlurmJob} (no restart count: squeue cannot tell)."""
    jobs: dict[str, SlurmJob] = {}
    problems = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("|")
        if len(parts) != len(SQUEUE_FIELDS):
            problems.append(f"squeue line {n}: expected {len(SQUEUE_FIELDS)} fields, got {len(parts)}: "
                            f"{line[:120]!r}")
            continue
        v = dict(zip(SQUEUE_FIELDS, parts))
        jobs[v["JobID"]] = SlurmJob(job_id=v["JobID"], source="squeue",
                                    state=held_or(map_state(v["State"]), v["Reason"]),
                                    raw_state=v["State"], name=v["JobName"], elapsed_s=parse_elapsed(v["Elapsed"]),
                                    reason=_reason(v["Reason"]), partition=v["Partition"])
    return jobs, problems


def _reason(text: str) -> str:
    return "" if text in ("", "None", "(null)") else text


# ------------------------------------------------------------------ querying
def sacct_jobs(job_ids: list[str]) -> tuple[dict[str, SlurmJob], list[str]]:
    """sacct's view of the jobs (all runs, ``--duplicates``) and parse problems; raises SlurmCommandError."""
    out = run_command(["sacct", "--jobs", ",".join(job_ids), "--duplicates", "--parsable2",
                       f"--format={','.join(SACCT_FIELDS)}"])
    rows, problems = parse_sacct(out)
    return {jid: job_from_runs(jid, runs) for jid, runs in group_runs(rows).items()}, problems


def scontrol_job(job_id: str, timeout: float, oneliner: bool = True) -> dict[str, str]:
    """slurmctld's record of one job (``scontrol show job``), {} if it does not hold the job;
    raises SlurmCommandError if slurmctld does not answer (for a job it has forgotten, scontrol
    exits non-zero with "Invalid job id specified"). ``oneliner=False`` reads the multi-line
    format, where a path with spaces (WorkDir, StdOut, ...) is whole (:func:`parse_scontrol`)."""
    cmd = ["scontrol", "show", "job", *(["--oneliner"] if oneliner else []), job_id]
    return parse_scontrol(run_command(cmd, timeout=timeout)).get(job_id, {})


def ctl_job(job_id: str, timeout: float) -> dict[str, str] | None:
    """:func:`scontrol_job` for a decision that must go on without slurmctld: None (logged) if it
    does not answer, {} if it does not hold the job."""
    try:
        return scontrol_job(job_id, timeout)
    except SlurmCommandError as e:
        log.warning("scontrol unavailable for the requeue decision: %s", e)
        return None


def ctl_state(job_id: str, timeout: float) -> str | None:
    """The job's ``JobState`` as slurmctld says it now (e.g. ``RUNNING``, ``COMPLETING``); None if
    slurmctld does not answer or does not hold the job. The requeue decision and the follow-up's
    last look at its predecessor both ask this (foldhpc.slurm.requeue, foldhpc.slurm.followup)."""
    info = ctl_job(job_id, timeout)
    return info.get("JobState") if info is not None else None


def acct_state(job_id: str, timeout: float) -> str | None:
    """sacct State of the newest run of the job (e.g. ``CANCELLED by 0``); None (logged) if sacct
    fails or does not know it yet."""
    try:
        out = run_command(["sacct", "--jobs", job_id, "--allocations", "--duplicates", "--parsable2",
                           "--noheader", "--format=JobID,State"], timeout=timeout)
    except SlurmCommandError as e:
        log.warning("sacct unavailable for the requeue decision: %s", e)
        return None
    rows = [r for r in parse_sacct(out, ("JobID", "State"))[0] if r.job_id == job_id and r.step is None]
    return rows[-1].raw_state if rows else None


def scontrol_jobs() -> dict[str, dict[str, str]]:
    """Every job slurmctld still holds (one call); raises SlurmCommandError."""
    return parse_scontrol(run_command(["scontrol", "show", "job", "--oneliner"]))


def squeue_jobs() -> tuple[dict[str, SlurmJob], list[str]]:
    return parse_squeue(run_command(["squeue", "--noheader", "--all", "--states=all", "-o", SQUEUE_FORMAT]))


def query_jobs(job_ids: list[str]) -> SlurmQuery:
    """One SlurmJob per id: from sacct (restarts cross-checked with scontrol), else scontrol, else squeue.

    A job no source knows gets state "unknown" with a note saying why; nothing is inferred.
    """
    ids = list(dict.fromkeys(job_ids))
    if not ids:
        return SlurmQuery({}, "none")
    notes: list[str] = []
    found: dict[str, SlurmJob] = {}
    source = "none"
    try:
        found, problems = sacct_jobs(ids)
        notes += problems
        source = "sacct"
    except SlurmCommandError as e:
        notes.append(f"sacct unavailable ({e})")
    live: dict[str, dict[str, str]] | None  # None: scontrol did not answer
    try:
        live = scontrol_jobs()
    except SlurmCommandError as e:
        live = None
        notes.append(f"scontrol unavailable ({e})")
    if source == "sacct":
        for jid, sjob in found.items():
            if live and jid in live:
                _cross_check(sjob, live[jid])
        for jid in ids:  # submitted a moment ago: slurmdbd has not recorded it yet
            if jid not in found and live and jid in live:
                found[jid] = job_from_scontrol(jid, live[jid])
                found[jid].notes.append("not in sacct yet; state from slurmctld")
    elif live is not None:
        source = "scontrol"
        notes.append("states from scontrol: slurmctld knows only queued, running and recently finished jobs")
        found = {jid: job_from_scontrol(jid, info) for jid, info in live.items() if jid in ids}
    else:
        try:
            found, problems = squeue_jobs()
            notes += problems
            source = "squeue"
            notes.append("states from squeue: no restart counts, finished jobs are not shown")
        except SlurmCommandError as e:
            notes.append(f"squeue unavailable ({e}): no Slurm state can be shown")
    jobs = {}
    for jid in ids:
        job = found.get(jid)
        if "_" not in jid:
            # an array parent id: its tasks (sacct's where it has them; slurmctld's while sacct lags,
            # when it shows the parent as one job named "allocation" for ~2 s, measured)
            tasks = {k: job_from_scontrol(k, v) for k, v in (live or {}).items() if k.startswith(f"{jid}_")}
            # sacct's one row for the tasks still pending ("123_[2-5%2]") only where slurmctld, which
            # lists them one by one (parse_scontrol), did not answer
            tasks.update({k: v for k, v in found.items() if k.startswith(f"{jid}_") and not (live and "[" in k)})
            parent = array_parent(jid, tasks)
            if parent is not None:
                if job is not None:
                    parent.notes.append(f"sacct still shows {jid} as a single job (it lags): tasks from slurmctld")
                job = parent
        if job is None:
            job = SlurmJob(job_id=jid, source="none")
            job.notes.append(_unknown_note(jid, source))
        jobs[jid] = job
    return SlurmQuery(jobs, source, notes)


#: order in which an array's task states decide the parent's: a failure first (it needs attention even
#: while other tasks run), then activity, then the rest; completed only when every task completed
_ARRAY_ORDER = (OUT_OF_MEMORY, FAILED, NODE_FAIL, TIMEOUT, RUNNING, COMPLETING, SUSPENDED, HELD, REQUEUED, PENDING,
                PREEMPTED, CANCELLED, UNKNOWN, COMPLETED)


def array_parent(job_id: str, tasks: dict[str, SlurmJob]) -> SlurmJob | None:
    """The array job ``job_id`` summed up from its tasks (``123_1``, ``123_[2-5]``); None without tasks.

    ``sacct -j 123`` and ``scontrol show job 123`` answer for an array parent with its tasks only,
    so without this the parent would be "unknown" although Slurm knows it well.
    """
    if not tasks:
        return None
    by_state: dict[str, list[str]] = {}
    for tid, t in sorted(tasks.items()):
        by_state.setdefault(t.state, []).append(tid)
    state = next((s for s in _ARRAY_ORDER if s in by_state), UNKNOWN)
    counts = ", ".join(f"{len(v)} {k}" for k, v in sorted(by_state.items(), key=lambda kv: _ARRAY_ORDER.index(kv[0])
                                                                  if kv[0] in _ARRAY_ORDER else 99))
    restarts = [t.restarts for t in tasks.values()]
    any_task = next(iter(tasks.values()))
    job = SlurmJob(job_id=job_id, source=any_task.source, state=state, raw_state=f"array ({counts})",
                   name=any_task.name, restarts=None if None in restarts else sum(r for r in restarts if r),
                   partition=any_task.partition, tasks={tid: t.state for tid, t in sorted(tasks.items())})
    job.notes.append(f"array job: {len(tasks)} task record(s): {counts}"
                     + (f"; {state}: {', '.join(by_state[state][:5])}" if state in FINAL_STATES - {COMPLETED} else ""))
    return job


def bound_runs(job: SlurmJob, submitted_at: float | None = None, started_at: float | None = None,
               slack_s: float = 60.0) -> SlurmJob:
    """Drop sacct runs that belong to an *earlier, unrelated* job with the same id.

    Job ids start again after a cluster's state is reset, and ``sacct --duplicates`` then lists the
    old job's rows under the same id. A run of *this* job was submitted after the run's own
    submission (a requeued run gets a new Submit time, measured) and ended after the run's first
    start; rows that fail either bound are another job's, and are not counted as restarts.
    """
    if job.source != "sacct" or len(job.runs) < 2 or (submitted_at is None and started_at is None):
        return job
    kept = []
    for r in job.runs:
        submit, end = parse_time(r.row.get("Submit")), parse_time(r.row.get("End"))
        if submitted_at is not None and submit is not None and submit < submitted_at - slack_s:
            continue
        if started_at is not None and end is not None and end < started_at - slack_s:
            continue
        kept.append(r)
    if not kept or len(kept) == len(job.runs):
        return job
    if job.restarts != len(job.runs) - 1:
        return job  # the count came from slurmctld, which knows only this job
    bounded = job_from_runs(job.job_id, kept)
    bounded.state, bounded.raw_state = job.state, job.raw_state  # the newest run is kept, and any correction
    bounded.notes = job.notes + [f"{len(job.runs) - len(kept)} older sacct record(s) of job id {job.job_id} are "
                                 "from before this run was submitted (the id was reused): not counted"]
    return bounded


def _cross_check(job: SlurmJob, info: dict[str, str]) -> None:
    """Correct sacct's view with slurmctld's while it still holds the job, where sacct is behind.

    sacct lags slurmctld by a second or two (captured: a running job shown as PENDING named
    "allocation"; a requeue not yet recorded), so slurmctld's ``Restarts=`` always wins, and its
    JobState wins when sacct has not recorded a newer run or has no final state for the current one.
    A final sacct state is kept: on ``scancel`` accounting says CANCELLED while slurmctld still says
    COMPLETING (foldhpc.slurm.requeue relies on that).
    """
    live = job_from_scontrol(job.job_id, info)
    behind = live.restarts is not None and job.restarts is not None and live.restarts > job.restarts
    if live.restarts is not None and live.restarts != job.restarts:
        job.notes.append(f"sacct shows {job.restarts} earlier run(s), slurmctld Restarts={live.restarts} "
                         "(sacct lags): restarts from slurmctld")
        job.restarts = live.restarts
    if live.state == UNKNOWN or live.state == job.state or not (behind or job.state not in FINAL_STATES):
        return
    job.notes.append(f"sacct says {job.raw_state or '?'}, slurmctld {live.raw_state} (sacct lags): "
                     "state from slurmctld")
    job.state, job.raw_state = live.state, live.raw_state
    job.reason, job.elapsed_s = live.reason, live.elapsed_s
    job.exit_code = live.exit_code or job.exit_code


def _unknown_note(job_id: str, source: str) -> str:
    if source == "sacct":
        return f"sacct does not know job {job_id} (wrong id, another cluster, or not recorded yet)"
    if source in ("scontrol", "squeue"):
        return f"{source} does not know job {job_id} (finished before slurmctld's MinJobAge, or wrong id)"
    return f"no Slurm command answered: state of job {job_id} unknown"

