"""The node health check: is this node fit to train on, before the trainer starts here?

At cluster scale most interruptions are hardware (a GPU that fails to initialise, a full or
read-only local mount, a node whose clock drifted): a run that starts there crashes, is restarted
there, and crashes again until its restart budget is gone. The supervisor
(:mod:`foldhpc.resilience.supervisor`) therefore runs :func:`check_node` before the first start of
the trainer on its node and before every restart; a node that fails is not trained on: the
supervisor records each failing check (:func:`record`: a ``node_unhealthy`` event of
events.jsonl and an entry of status.json's ``bad_nodes``) and exits 75, so that a Slurm job hands
the run over to a job that excludes the node (:mod:`foldhpc.cluster.nodes`,
:func:`foldhpc.slurm.requeue.maybe_requeue`).

The checks, each a :class:`Problem` (node, check, detail) when it fails:

``devices``
    every GPU the job was given initialises and runs a small kernel, in a subprocess (the
    supervisor must hold no CUDA context: it would keep GPU memory for the whole job, and a
    hung driver call must not hang the supervisor) under a timeout. Skipped, with a note, where
    ``train.device = "cpu"``, where no NVIDIA device is visible, or where torch has no CUDA.
``writable``
    the run directory and the checkpoint directory can be written from this node: a probe file
    is created, written, fsynced and removed in each (a directory that does not exist yet is
    created, as the trainer would). A stale NFS handle, a read-only remount or a path under a
    regular file fails here, not in the first checkpoint save an hour later.
``free_mem``
    MemAvailable of /proc/meminfo, and what the job's cgroup still allows where it has a
    limit, at least ``health.min_free_mem``.
``free_disk``
    free space in each of the two directories' file systems at least ``health.min_free_disk``.
    Only a node-local file system can fail the node: a full *shared* one (NFS, Lustre, GPFS, ...)
    is full for every node, and excluding nodes one after another would only end the run. It is
    a warning (the report's notes, the log); the trainer's own save preflight
    (``checkpoint.min_free_mb``) and full-disk handling take it from there.
``clock``
    the probe file's mtime against this node's clock around its write. On a shared file system
    the server stamps the file, so a node whose clock is off the server's (and so the other
    nodes') by more than ``health.max_clock_skew`` shows; a skewed clock makes checkpoint ages,
    lock staleness and heartbeats wrong. On a local file system the stamp is the node's own
    clock: the check cannot see a skew, and says so in a note.
``command``
    ``health.command``, a site's own check (``/usr/local/sbin/gpu-burnin --quick``), run by the
    shell with ``FOLDHPC_HEALTH_NODE`` set, killed after ``health.command_timeout``; a non-zero
    exit or the timeout fails the node, with the tail of its stderr as the detail.
``fault_hook``
    ``FOLDHPC_FAIL_HEALTH_ON_NODE`` (:mod:`foldhpc.faults`) names this node: a bad node for
    tests and ``foldhpc chaos``; never set in a normal run.

Budget: 2 s in all (``benchmarks/bench_health.py``; docs/measurements/health-2026-12-03.md has
the figures). Each check is bounded by its own timeout where it can block (the device subprocess,
the site command); the file system checks are a few system calls each.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from foldhpc.config import Config, parse_duration, parse_size
from foldhpc.records.envvars import FAIL_HEALTH_ON_NODE, HEALTH_NODE_ENV
from foldhpc.records.events import EventSink
from foldhpc.records.layout import HEALTH_PROBE_PREFIX

log = logging.getLogger(__name__)

#: the device check's subprocess: CUDA init, then a small kernel and a synchronize on every visible GPU
DEVICE_TIMEOUT_S = 1.5
#: how much of a site command's stderr is the detail
STDERR_TAIL = 400
_DEVICE_SCRIPT = r"""
import sys
import torch
if not torch.cuda.is_available():
    print("no-cuda"); sys.exit(0)
bad = []
for i in range(torch.cuda.device_count()):
    try:
        x = torch.arange(1024, device=f"cuda:{i}", dtype=torch.float32)
        s = float((x * 2).sum().item())
        torch.cuda.synchronize(i)
        if s != 1047552.0:
            bad.append(f"cuda:{i}: a kernel computed {s}, not 1047552")
    except Exception as e:
        bad.append(f"cuda:{i}: {type(e).__name__}: {e}")
print(f"ok {torch.cuda.device_count()}")
if bad:
    print("; ".join(bad), file=sys.stderr); sys.exit(1)
"""


@dataclass(frozen=True)
class Problem:
    """One failing check on one node: what ``foldhpc status`` shows and ``--exclude`` is built from."""

    node: str
    check: str  # devices | writable | free_mem | free_disk | clock | command | fault_hook | crashes
    detail: str


@dataclass
class HealthReport:
    """The outcome of :func:`check_node`: ``problems`` empty means healthy."""

    node: str
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # checks skipped and why
    seconds: float = 0.0
    checks: dict[str, float] = field(default_factory=dict)  # each check's seconds

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if self.ok:
            return f"node {self.node} is healthy ({self.seconds * 1000:.0f} ms)"
        return f"node {self.node} failed its health check: " + "; ".join(
            f"{p.check}: {p.detail}" for p in self.problems)


def node_name() -> str:
    """This node's name as Slurm knows it (``SLURMD_NODENAME``, what ``--exclude`` takes), else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def hooked_nodes(env: dict[str, str] | None = None) -> set[str]:
    """The nodes ``FOLDHPC_FAIL_HEALTH_ON_NODE`` makes fail (comma-separated names)."""
    value = (os.environ if env is None else env).get(FAIL_HEALTH_ON_NODE, "")
    return {n.strip() for n in value.split(",") if n.strip()}


# ------------------------------------------------------------------ the checks
def _gpus_visible() -> str | None:
    """Why there are no GPUs to check (None: some are visible)."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None and cvd.strip() in ("", "-1", "NoDevFiles"):
        return f"CUDA_VISIBLE_DEVICES={cvd!r}: no GPU given to this job"
    if not Path("/proc/driver/nvidia").exists() and not Path("/dev/nvidia0").exists():
        return "no NVIDIA driver or device on this node"
    return None


def check_devices(cfg: Config, report: HealthReport, timeout_s: float = DEVICE_TIMEOUT_S) -> None:
    """CUDA init and a small kernel on every visible GPU, in a subprocess under ``timeout_s``."""
    if cfg.train.device == "cpu":
        report.notes.append("devices: skipped (train.device = \"cpu\")")
        return
    why = _gpus_visible()
    if why:
        report.notes.append(f"devices: skipped ({why})")
        return
    try:
        p = subprocess.run([sys.executable, "-c", _DEVICE_SCRIPT], capture_output=True, text=True,
                           timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        report.problems.append(Problem(report.node, "devices", f"CUDA init and a small kernel took longer than "
                                                               f"{timeout_s:.1f}s (a hung GPU or driver?)"))
        return
    except OSError as e:
        report.problems.append(Problem(report.node, "devices", f"cannot start {sys.executable}: {e}"))
        return
    if p.returncode != 0:
        tail = " ".join((p.stderr or p.stdout).split())[-STDERR_TAIL:]
        report.problems.append(Problem(report.node, "devices", tail or f"exit status {p.returncode}"))
    elif p.stdout.strip() == "no-cuda":
        if cfg.train.device.startswith("cuda"):
            report.problems.append(Problem(report.node, "devices", f"train.device = {cfg.train.device!r} but torch "
                                                                   "sees no CUDA device on this node"))
        else:
            report.notes.append("devices: skipped (torch has no CUDA here)")


def _probe(directory: Path, node: str) -> tuple[float, float, float]:
    """Create, write, fsync and remove a probe file in ``directory`` (created if missing):
    (this node's time before the write, after it, the file's mtime). Raises OSError."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{HEALTH_PROBE_PREFIX}{node}-{os.getpid()}"
    before = time.time()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, b"foldhpc health probe\n")
        os.fsync(fd)
        mtime = os.fstat(fd).st_mtime
    finally:
        os.close(fd)
        after = time.time()
        try:
            path.unlink()
        except FileNotFoundError:
            pass
    return before, after, mtime


#: file system types that several nodes share (their server stamps mtimes; full for every node at once)
SHARED_FS_TYPES = ("nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "ceph", "fuse.glusterfs", "fuse.sshfs",
                   "9p", "virtiofs")


def fs_type(path: Path, mounts: str | None = None) -> str:
    """The type of the file system ``path`` is on: the longest mount point of ``mounts`` (the
    text of /proc/mounts, read when None) that contains it; "" where none does or it is unreadable."""
    if mounts is None:
        try:
            with open("/proc/mounts") as f:
                mounts = f.read()
        except OSError:
            return ""
    best, fstype = "", ""
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) >= 3 and (str(path) + "/").startswith(parts[1].rstrip("/") + "/") and len(parts[1]) >= len(best):
            best, fstype = parts[1], parts[2]
    return fstype


def _local_fs(path: Path) -> bool:
    """Whether ``path`` is on a node-local file system (the node's own clock stamps its files)."""
    return fs_type(path) not in SHARED_FS_TYPES


def check_directories(cfg: Config, report: HealthReport) -> None:
    """``writable``, ``free_disk`` and ``clock`` for the run and checkpoint directories."""
    need_disk = parse_size(cfg.health.min_free_disk)
    max_skew = parse_duration(cfg.health.max_clock_skew)
    seen: set[str] = set()
    local_clock = True
    t0 = time.perf_counter()
    for what, directory in (("run directory", cfg.run_dir), ("checkpoint directory", cfg.checkpoint_dir)):
        directory = Path(os.path.abspath(directory))
        try:
            before, after, mtime = _probe(directory, report.node)
        except OSError as e:
            report.problems.append(Problem(report.node, "writable", f"the {what} {directory} is not writable from "
                                                                    f"this node: {e.strerror or e}"
                                                                    + (f" ({e.filename})" if e.filename else "")))
            continue
        if mtime < before - 2.0 or mtime > after + 2.0:  # mtime has the file system's granularity (up to 1-2 s)
            skew = mtime - (before + after) / 2
            if abs(skew) > max_skew:
                report.problems.append(Problem(report.node, "clock", f"this node's clock is {skew:+.1f}s off the "
                                                                     f"file server's (a file written in the {what} "
                                                                     "got that mtime); health.max_clock_skew = "
                                                                     f"{cfg.health.max_clock_skew}"))
        local_clock = local_clock and _local_fs(directory)
        try:
            st = os.statvfs(directory)
        except OSError as e:
            report.problems.append(Problem(report.node, "free_disk", f"cannot stat the {what} {directory}: {e}"))
            continue
        key = f"{st.f_fsid}"
        if key in seen:
            continue
        seen.add(key)
        free = st.f_bavail * st.f_frsize
        if free < need_disk:
            detail = f"{_mib(free)} free in the {what} {directory}, health.min_free_disk = {cfg.health.min_free_disk}"
            if _local_fs(directory):
                report.problems.append(Problem(report.node, "free_disk", detail))
            else:  # full for every node: not this node's fault (see the module docstring)
                report.notes.append(f"free_disk: {detail}, on a shared file system ({fs_type(directory)}): not "
                                    "this node's fault, so it is not excluded; free space there")
                log.warning("health check: %s on a shared file system: not counted against node %s", detail,
                            report.node)
    report.checks["directories"] = time.perf_counter() - t0
    if local_clock:
        report.notes.append("clock: the directories are on a local file system, whose mtimes are this node's own "
                            "clock: a skew against the other nodes cannot be seen here")


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def available_memory() -> tuple[int | None, str]:
    """(bytes this node's processes may still allocate, from where): the smaller of MemAvailable and
    what the job's cgroup (v2 memory.max - memory.current) still allows; None if unknown."""
    avail: int | None = None
    where = "MemAvailable"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        pass
    try:
        rel = next((ln.strip().split(":", 2)[2] for ln in Path("/proc/self/cgroup").read_text().splitlines()
                    if ln.startswith("0::")), None)
        if rel is not None:
            base = Path("/sys/fs/cgroup") / rel.lstrip("/")
            limit = (base / "memory.max").read_text().strip()
            if limit != "max":
                left = int(limit) - int((base / "memory.current").read_text())
                if avail is None or left < avail:
                    avail, where = left, f"the cgroup's memory.max ({_mib(int(limit))})"
    except (OSError, ValueError, StopIteration):
        pass
    return avail, where


def check_memory(cfg: Config, report: HealthReport) -> None:
    need = parse_size(cfg.health.min_free_mem)
    avail, where = available_memory()
    if avail is None:
        report.notes.append("free_mem: skipped (no /proc/meminfo)")
    elif avail < need:
        report.problems.append(Problem(report.node, "free_mem", f"{_mib(avail)} available ({where}), "
                                                                f"health.min_free_mem = {cfg.health.min_free_mem}"))


def check_command(cfg: Config, report: HealthReport) -> None:
    """``health.command`` under its timeout (its process group killed after it)."""
    command = cfg.health.command.strip()
    if not command:
        return
    timeout = parse_duration(cfg.health.command_timeout)
    env = dict(os.environ, **{HEALTH_NODE_ENV: report.node})
    p = subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, env=env, start_new_session=True)
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.communicate()
        report.problems.append(Problem(report.node, "command", f"health.command {command!r} did not finish within "
                                                               f"health.command_timeout = {cfg.health.command_timeout}"))
        return
    if p.returncode != 0:
        tail = re.sub(r"\s+", " ", err.decode(errors="replace")).strip()[-STDERR_TAIL:]
        report.problems.append(Problem(report.node, "command", f"health.command {command!r} exited with "
                                                               f"{p.returncode}" + (f": {tail}" if tail else "")))


def check_node(cfg: Config, node: str | None = None) -> HealthReport:
    """Every check of the module docstring for this node; never raises for a failing check."""
    report = HealthReport(node or node_name())
    start = time.perf_counter()
    if report.node in hooked_nodes():
        report.problems.append(Problem(report.node, "fault_hook", f"{FAIL_HEALTH_ON_NODE} names this node"))
    for name, check in (("devices", check_devices), ("directories", check_directories), ("free_mem", check_memory),
                        ("command", check_command)):
        t0 = time.perf_counter()
        try:
            check(cfg, report)
        except Exception as e:  # noqa: BLE001 - a check that breaks is the node's problem, not the supervisor's end
            report.problems.append(Problem(report.node, name, f"the check itself failed: {type(e).__name__}: {e}"))
        report.checks.setdefault(name, time.perf_counter() - t0)
    report.seconds = time.perf_counter() - start
    return report


# ------------------------------------------------------------------ recording
def record(report: HealthReport, events: EventSink, status: Any | None = None, job_id: str | None = None) -> None:
    """The report in events.jsonl (``health_check``, and one ``node_unhealthy`` per problem) and,
    with ``status`` (a :class:`foldhpc.records.status.StatusFile`), each problem in status.json's
    ``bad_nodes`` (the newest per node and check)."""
    events.emit("health_check", node=report.node, ok=report.ok, seconds=round(report.seconds, 4),
                checks={k: round(v, 4) for k, v in report.checks.items()}, notes=report.notes)
    now = time.time()
    for p in report.problems:
        events.emit("node_unhealthy", **asdict(p), job_id=job_id)
    if status is not None and report.problems:
        add_bad_nodes(status, report.problems, job_id, now)


def add_bad_nodes(status: Any, problems: list[Problem], job_id: str | None, now: float | None = None) -> None:
    """Add ``problems`` to status.json's ``bad_nodes`` (one entry per node and check, the newest)."""
    now = time.time() if now is None else now
    known = [b for b in (status.data.get("bad_nodes") or []) if isinstance(b, dict)]
    new = {(p.node, p.check) for p in problems}
    kept = [b for b in known if (b.get("node"), b.get("check")) not in new]
    try:
        status.update(bad_nodes=kept + [{**asdict(p), "t": now, "job_id": job_id} for p in problems])
    except (OSError, ValueError) as e:
        log.warning("cannot record the bad node in status.json: %s", e)
