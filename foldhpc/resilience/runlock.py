"""One writer per run directory: ``<run.dir>/lock/``.

A trainer (rank 0 of it) takes the lock before it writes anything to the run directory
(``config.toml``, ``status.json``, ``train.log``, checkpoints) and gives it back on every way
out, exit 75 included. A second trainer -- another Slurm job, a local ``foldhpc train`` -- on a
run directory whose holder is alive refuses to start (:class:`RunDirLocked`, exit status 2),
naming the holder: host, pid, Slurm job id, since when, last heartbeat. A holder that is gone is
taken over, with a log line saying why it counts as gone.

How a lock is held (made for shared file systems, where ``flock`` cannot be trusted alone):

* The lock is a *generation*: a file ``lock/gen-NNNNNNNN`` holding a JSON record (host, boot
  id, pid and its start time, Slurm job id, restart count and cluster, user, since, token). It
  is created complete, under its final name, by ``link(2)`` of a private temporary file -- the
  classic NFS-safe lock recipe (``open(2)``: "create a unique file on the same file system ...
  link(2) ... if link() returns 0 [or the unique file's link count is 2] the lock is held"); where
  hard links are not supported, by ``open(O_CREAT|O_EXCL)``. Both are atomic on a local file
  system, on NFSv3 and later and on Lustre (a single MDS operation): of two processes creating
  the same name, exactly one succeeds.
* The newest generation is the lock. Taking over a gone holder of generation N means creating
  generation N+1 -- the same exclusive create, so of two contenders taking over at the same time
  exactly one wins and the other sees a live holder and refuses. No file is ever replaced,
  renamed over or deleted while it may still be the lock: nothing can be lost to a race between
  "this holder is gone" and "remove its lock". A released lock is renamed ``gen-N.released`` (kept
  so that generation numbers only grow); a new holder deletes the generations below its own.
* The holder refreshes the file's modification time every ``fault.lock_stale_after`` / 6 (at
  most 30 s, at least 0.2 s) from a small thread: the *heartbeat*. The same thread notices when
  the lock was taken over (a newer generation, or its own file gone) and the trainer then stops at
  its next step boundary without writing anything more (:meth:`RunLock.check`).
* ``flock(LOCK_EX)`` on the generation file is held as well, as a hint: where it is coherent
  across processes (local file systems; NFS, where Linux maps it to a POSIX lock on the server;
  Lustre mounted with ``-o flock``) a contender that cannot get it knows the holder is alive. It
  never decides the other way: on Lustre with ``localflock`` it only sees the own node, with
  ``noflock`` (or NFS ``nolock``) it fails, and that is fine.

When is a holder gone (checked in this order; the first that applies decides)?

1. it is an earlier run of *this* Slurm job (same job id and cluster, lower restart count): a
   requeued job takes its own lock back at once;
2. someone holds its ``flock`` (see above): alive -- asked before a pid may say "gone", since a
   holder in another PID namespace (a container on this host) has a pid this /proc does not show. A
   forked child of the holder (a DataLoader worker) closes its copy of the lock file at once, so
   a dead holder's flock is gone with it;
3. it ran on this host (same host name and boot id) in this PID namespace (recorded as
   ``pid_ns``; a record without it predates the field and is trusted): gone exactly when its pid
   is not running (or is now another process: the start time differs; or a zombie). A live
   process on this host is never taken over -- a restart of the trainer inside the same job (the
   supervisor) takes over its dead predecessor at once. In another PID namespace its pid says
   nothing: the next rules decide;
4. it was a Slurm job of this cluster and ``scontrol`` says that job is no longer running
   (ended, requeued and pending again, restarted since, or unknown to slurmctld any more): gone;
   a job that is ``COMPLETING`` is still saving: alive (a contender waits up to a minute for it);
5. its heartbeat is older than ``fault.lock_stale_after`` (default 5 min; "0" = never stale by
   age): gone. Otherwise alive.

A record whose fields do not have their types (``restart_count: "x"``: crafted or damaged) is
unreadable as a whole: only its age can retire it (rule 5).

On NFS, attribute caching (``acregmax``, 60 s by default) can make a heartbeat look up to a
minute older than it is, and the clocks of the holder's file server and the contender's node are
compared: keep ``lock_stale_after`` at a few minutes there (the default is fine). Lustre's
metadata is coherent across clients.

In a multi-rank run rank 0 holds the lock; the other ranks do not look at it (if rank 0 is
refused, the rendezvous fails and the launcher ends them).

**A supervisor's lock, handed down** (``foldhpc supervise -- CMD``, ``foldhpc submit -- CMD``):
the supervisor of a command foldhpc did not write holds the lock itself, from before the command's
first start to after its last exit, so that no other trainer can take the run directory between
two restarts of a command that writes no lock of its own. Its record says ``supervises: true``. A
process under it that wants the lock too (a :class:`foldhpc.Session` or ``foldhpc train`` inside
the command, maybe below a shell) does not take a generation of its own: :func:`acquire` finds that
the holder is one of its own ancestors (same host, boot id and PID namespace; the pid and its start
time on this process's chain of parents) and returns an :class:`InheritedLock` on the same
generation -- it writes no lock file and does not beat (the supervisor does), and it watches for a
takeover like a holder. One such descendant at a time: it holds an ``flock`` on
``lock/gen-NNNNNNNN.child`` (all of them run on the supervisor's node, where ``flock`` is
coherent), and a second one running at the same time is refused like any other contender. Nobody
else is an ancestor: a second supervisor or trainer is refused as before (the supervisor is a live
process).
"""

from __future__ import annotations

import errno
import fcntl
import getpass
import json
import logging
import math
import os
import re
import secrets
import signal
import socket
import threading
import time
from foldhpc.records.exitcodes import ExitCode
from foldhpc.records.layout import LOCK_CHILD_SUFFIX, LOCK_DIR, OWNER_FILE
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_GEN_RE = re.compile(r"^gen-(\d+)(\.released)?$")
#: Slurm job states in which the holder's processes may still be alive
ALIVE_JOB_STATES = frozenset({"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED", "RESIZING",
                              "SIGNALING", "STAGE_OUT"})
ENDING_WAIT_S = 60.0  # how long a contender waits for a holder whose Slurm job is COMPLETING
SCONTROL_TIMEOUT_S = 10.0
_ATTEMPTS = 50


class RunDirLocked(RuntimeError):
    """Another live trainer holds the run directory (or has taken it over from this one)."""

    exit_code = ExitCode.LOCKED

    def __init__(self, message: str, holder: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.holder = holder or {}


# ------------------------------------------------------------------ who am I
def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def proc_start(pid: int | str) -> tuple[int, str] | None:
    """(start time in clock ticks since boot, state letter) of a process on this host; None if none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19]), fields[0]
    except (OSError, IndexError, ValueError):
        return None


def _pid_ns() -> str:
    """This process's PID namespace (``pid:[4026531836]``); "" where /proc does not say.

    Two containers on one host share the host name and boot id but not their pids: a pid
    recorded in another namespace means nothing in this one's /proc (see :func:`judge`).
    """
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def identity() -> dict[str, Any]:
    """This process, as a lock record describes its holder."""
    env = os.environ
    job = env.get("SLURM_JOB_ID")
    if env.get("SLURM_ARRAY_JOB_ID"):
        job = f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '')}"
    start = proc_start("self")  # not /proc/<getpid()>: in a container that may be another process
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return {"host": socket.gethostname(), "boot_id": _boot_id(), "pid": os.getpid(), "pid_ns": _pid_ns(),
            "pid_start": start[0] if start else None, "user": user,
            "job_id": job, "restart_count": int(env.get("SLURM_RESTART_COUNT", "0") or 0),
            "cluster": env.get("SLURM_CLUSTER_NAME") if job else None,
            "node": env.get("SLURMD_NODENAME") if job else None}


# ------------------------------------------------------------------ the lock directory
def _generations(lock_dir: Path) -> dict[int, bool]:
    """{generation: released} of the files in ``lock_dir``."""
    gens: dict[int, bool] = {}
    try:
        names = os.listdir(lock_dir)
    except FileNotFoundError:
        return gens
    for name in names:
        m = _GEN_RE.match(name)
        if m:
            n = int(m.group(1))
            gens[n] = gens.get(n, False) or bool(m.group(2))
    return gens


def _gen_path(lock_dir: Path, n: int, released: bool = False) -> Path:
    return lock_dir / (f"gen-{n:08d}" + (".released" if released else ""))


def _child_path(lock_dir: Path, n: int) -> Path:
    """The flock file of the descendant that uses generation ``n`` of a supervisor (:class:`InheritedLock`)."""
    return lock_dir / (f"gen-{n:08d}" + LOCK_CHILD_SUFFIX)


def _top(lock_dir: Path) -> int:
    """The newest generation: from a listing, then by name upwards (a cached listing may lag)."""
    gens = _generations(lock_dir)
    n = max(gens, default=0)
    while _gen_path(lock_dir, n + 1).exists() or _gen_path(lock_dir, n + 1, True).exists():
        n += 1
    return n


def _read(lock_dir: Path, n: int) -> tuple[dict[str, Any] | None, os.stat_result | None, bool]:
    """(record, stat, released) of generation ``n``; (None, None, True) if it is gone."""
    for released in (False, True):
        path = _gen_path(lock_dir, n, released)
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                raw = f.read(65536)
        except FileNotFoundError:
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return {}, st, released
        return _coerce(rec), st, released
    return None, None, True


# The fields judge() and describe() read, by type; a record whose field cannot be read as its
# type is unreadable as a whole ({}): a crafted or damaged file must not decide anything.
_STR_FIELDS = ("host", "boot_id", "pid_ns", "user", "job_id", "cluster", "node", "token")
_INT_FIELDS = ("pid", "pid_start", "restart_count")
_FLOAT_FIELDS = ("since", "heartbeat_interval_s")


def _coerce(rec: Any) -> dict[str, Any]:
    """``rec`` with every known field of its type (``"3"`` -> 3 for a count); {} if one cannot be."""
    if not isinstance(rec, dict):
        return {}
    out = dict(rec)
    for key in _STR_FIELDS:
        v = rec.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            return {}
        out[key] = str(v)
    for key in _INT_FIELDS:
        v = rec.get(key)
        if v is None:
            continue
        if isinstance(v, str) and v.isdigit():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            return {}
        out[key] = v
    for key in _FLOAT_FIELDS:
        v = rec.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return {}
        out[key] = float(v)
    return out


def read_holder(run_dir: Path) -> dict[str, Any] | None:
    """The current holder's record, with ``heartbeat_age_s`` and ``generation``; None if the run
    directory is not locked (for ``foldhpc status``; judges nothing)."""
    lock_dir = Path(run_dir) / LOCK_DIR
    n = _top(lock_dir)
    if n == 0:
        return None
    rec, st, released = _read(lock_dir, n)
    if rec is None or st is None or released:
        return None
    return {**rec, "generation": n, "heartbeat_age_s": max(0.0, time.time() - st.st_mtime)}


# ------------------------------------------------------------------ is the holder alive?
@dataclass(frozen=True)
class Verdict:
    alive: bool
    why: str
    ending: bool = False  # alive, but its Slurm job is ending (worth waiting for)


def _flock_held(path: Path) -> bool:
    """True if another open file description holds an flock on ``path`` (see the module docstring)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _local_cluster() -> str | None:
    name = os.environ.get("SLURM_CLUSTER_NAME")
    if name:
        return name
    from foldhpc.cluster.command import SlurmCommandError, run_command

    try:
        out = run_command(["scontrol", "show", "config"], timeout=SCONTROL_TIMEOUT_S)
    except SlurmCommandError:
        return None
    m = re.search(r"^ClusterName\s*=\s*(\S+)", out, re.M)
    return m.group(1) if m else None


def slurm_job_state(job_id: str) -> tuple[str | None, int | None]:
    """(JobState, Restarts) from slurmctld; ("GONE", None) if it no longer knows the job; (None, None)
    if it does not answer."""
    from foldhpc.cluster.command import SlurmCommandError
    from foldhpc.cluster.sacct import scontrol_job

    try:
        info = scontrol_job(job_id, SCONTROL_TIMEOUT_S)
    except SlurmCommandError as e:
        if "invalid job id" in str(e).lower():
            return "GONE", None
        return None, None
    if not info:
        return "GONE", None
    restarts = info.get("Restarts", "")
    return info.get("JobState", "").upper() or None, int(restarts) if restarts.isdigit() else None


def judge(rec: dict[str, Any], mtime: float, stale_after_s: float, me: dict[str, Any] | None = None,
          path: Path | None = None, now: float | None = None) -> Verdict:
    """Is the holder described by ``rec`` (lock file modified at ``mtime``) alive? See the module docstring."""
    me = identity() if me is None else me
    now = time.time() if now is None else now
    age = max(0.0, now - mtime)
    job, cluster = rec.get("job_id"), rec.get("cluster")
    same_cluster = not (cluster and me.get("cluster") and cluster != me.get("cluster"))
    if not rec:
        if stale_after_s > 0 and age > stale_after_s:
            return Verdict(False, f"its lock record is unreadable and {age:.0f}s old")
        return Verdict(True, "its lock record is being written or unreadable")
    if job and job == me.get("job_id") and same_cluster and int(rec.get("restart_count") or 0) < me["restart_count"]:
        return Verdict(False, f"it was run {rec.get('restart_count')} of this same Slurm job {job}, which Slurm "
                              f"has restarted since (this is restart {me['restart_count']})")
    pid = rec.get("pid")
    same_host = rec.get("host") == me["host"] and me["boot_id"] and rec.get("boot_id") == me["boot_id"]
    # A pid means something here only in the PID namespace it was recorded in (containers on one
    # host share its name and boot id). A record without the field predates it: trusted as before.
    ns = rec.get("pid_ns")
    other_ns = bool(same_host and ns is not None and (me.get("pid_ns") or None) != ns)
    local_pid = bool(same_host and isinstance(pid, int) and not other_ns)
    if local_pid and pid == me["pid"] and rec.get("pid_start") == me["pid_start"]:
        return Verdict(False, "it is this very process (a lock left by an earlier run in it)")
    # The flock before the pids: a live holder that this /proc cannot see (another PID namespace,
    # a pid recorded wrongly) still holds it, and "its pid is gone" must not win over that.
    flock = path is not None and _flock_held(path)
    if local_pid:
        assert isinstance(pid, int)  # local_pid says so
        proc = proc_start(pid)
        if proc is not None and proc[1] not in ("Z", "X") and rec.get("pid_start") in (None, proc[0]):
            return Verdict(True, f"its process {pid} on this host is running")
        if not flock:
            if proc is None or proc[1] in ("Z", "X"):
                return Verdict(False, f"its process {pid} on this host is gone")
            return Verdict(False, f"its process {pid} on this host is gone (the pid now belongs to another process)")
    if flock:
        return Verdict(True, "it holds the lock file's flock")
    if other_ns and not job:
        return _by_heartbeat(age, stale_after_s, f"it runs on this host in another PID namespace ({ns}), where "
                                                 "its pid cannot be checked")
    if job and same_cluster:
        if cluster and not me.get("cluster"):
            local = _local_cluster()
            if local and local != cluster:  # another cluster's job id means nothing to our slurmctld
                return _by_heartbeat(age, stale_after_s, f"its Slurm job {job} runs on cluster {cluster}")
        state, restarts = slurm_job_state(str(job))
        if state == "GONE":
            return Verdict(False, f"its Slurm job {job} is no longer known to slurmctld (ended)")
        if state is not None and state not in ALIVE_JOB_STATES:
            return Verdict(False, f"its Slurm job {job} is {state}")
        if state is not None and restarts is not None and restarts > int(rec.get("restart_count") or 0):
            return Verdict(False, f"its Slurm job {job} has been restarted since (restart {restarts})")
        if state == "COMPLETING":
            return Verdict(True, f"its Slurm job {job} is COMPLETING (still saving?)", ending=True)
        if state is not None:
            return _by_heartbeat(age, stale_after_s, f"its Slurm job {job} is {state}")
    return _by_heartbeat(age, stale_after_s, "")


def _by_heartbeat(age: float, stale_after_s: float, context: str) -> Verdict:
    prefix = f"{context}, but " if context else ""
    if stale_after_s > 0 and age > stale_after_s:
        return Verdict(False, f"{prefix}no heartbeat for {age:.0f}s (fault.lock_stale_after = {stale_after_s:g}s)")
    return Verdict(True, (f"{context}; " if context else "") + f"heartbeat {age:.0f}s ago")


def describe(rec: dict[str, Any], run_dir: Path | None = None, age: float | None = None) -> str:
    """``pid 12 on host n1 (Slurm job 34, restart 0) since 2026-11-27 10:00:01 (3m ago)``."""
    from foldhpc.records.fmt import format_age

    who = f"pid {rec.get('pid', '?')} on host {rec.get('host', '?')}"
    if rec.get("supervises") is True:
        who = f"pid {rec.get('pid', '?')} (a foldhpc supervisor) on host {rec.get('host', '?')}"
    if rec.get("user"):
        who += f" (user {rec['user']})"
    if rec.get("job_id"):
        who += f", Slurm job {rec['job_id']}" + (f" restart {rec['restart_count']}" if rec.get("restart_count") else "")
        if rec.get("node") and rec.get("node") != rec.get("host"):
            who += f" on node {rec['node']}"
    since = rec.get("since")
    if isinstance(since, (int, float)):
        who += (f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))} "
                f"({format_age(time.time() - since)} ago)")
    if age is not None:
        who += f", heartbeat {format_age(age)} ago"
    return who


# ------------------------------------------------------------------ taking and holding it
def _create(lock_dir: Path, n: int, record: dict[str, Any]) -> int:
    """Create generation ``n`` holding ``record``, exclusively; an fd open on it. FileExistsError if taken."""
    data = json.dumps(record, sort_keys=True).encode() + b"\n"
    return _create_new(_gen_path(lock_dir, n), data, lock_dir / f".tmp-{record['token']}-{n}")


def _create_new(target: Path, data: bytes, tmp: Path) -> int:
    """Create ``target`` holding ``data``, complete and exclusively (link of ``tmp``, see the module
    docstring); an fd open on it. FileExistsError if it exists."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        try:
            os.link(tmp, target)
        except FileExistsError:
            raise
        except OSError as e:
            if e.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS, errno.EXDEV):
                return _create_excl(target, data)  # no hard links here (some FUSE/object mounts)
            if os.stat(tmp).st_nlink != 2:  # NFS: a retransmitted LINK may report an error that did succeed
                raise
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
    return os.open(target, os.O_RDWR)


def _create_excl(target: Path, data: bytes) -> int:
    fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, data)
    os.fsync(fd)
    return fd


# Lock files held by this process. A forked child (a DataLoader worker) closes its copies at
# once: a flock belongs to the open file description, so a worker outliving a SIGKILLed trainer
# by a few seconds would otherwise keep its lock "alive" (judge() trusts the flock first).
_held_fds: set[int] = set()


def _close_held_fds() -> None:  # pragma: no cover - runs in forked children
    for fd in list(_held_fds):
        try:
            os.close(fd)  # never LOCK_UN: that would release the parent's lock too
        except OSError:
            pass
    _held_fds.clear()


os.register_at_fork(after_in_child=_close_held_fds)


def heartbeat_interval_s(stale_after_s: float) -> float:
    return 30.0 if stale_after_s <= 0 else max(0.2, min(30.0, stale_after_s / 6))


class RunLock:
    """A held run-directory lock (see :func:`acquire`)."""

    def __init__(self, run_dir: Path, lock_dir: Path, gen: int, fd: int, record: dict[str, Any],
                 stale_after_s: float, took_over: str | None) -> None:
        self.run_dir, self.lock_dir, self.gen, self.fd, self.record = run_dir, lock_dir, gen, fd, record
        self.path = _gen_path(lock_dir, gen)
        self.ino = os.fstat(fd).st_ino
        self.stale_after_s = stale_after_s
        self.took_over = took_over  # what was taken over, and why it counted as gone
        self.notes: list[tuple[int, str]] = []  # (level, message): logged with the acquisition, once logging is set up
        self.lost: str | None = None  # set by the heartbeat thread when someone took it over
        self._stop = threading.Event()
        self._released = False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.flock = True
        except OSError:
            self.flock = False  # unsupported here (noflock, nolock): the generation file is the lock
        _held_fds.add(fd)
        self._thread = threading.Thread(target=self._beat_loop, name="foldhpc-runlock", daemon=True)
        self._thread.start()

    def describe(self) -> str:
        return f"{self.path} (generation {self.gen}{', flock held' if self.flock else ', no flock here'})"

    def log_acquired(self) -> None:
        if self.took_over:
            log.warning("run directory lock: took over %s", self.took_over)
        log.info("run directory lock: holding %s", self.describe())
        for level, note in self.notes:
            log.log(level, "%s", note)

    def _beat_loop(self) -> None:
        # Signals are the main thread's business (preemption handlers, faulthandler dumps of a hung
        # trainer): the kernel must not pick this thread to take a process-directed one.
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        interval = heartbeat_interval_s(self.stale_after_s)
        warned = False
        while not self._stop.wait(interval):
            try:
                self._beat()
            except OSError as e:
                if not warned:
                    log.warning("run directory lock: heartbeat failed (%s); retrying", e)
                    warned = True
            if self.lost:
                log.error("run directory lock lost: %s", self.lost)
                return

    def _beat(self) -> None:
        self._detect_takeover()
        if not self.lost:
            os.utime(self.fd)

    def _detect_takeover(self) -> None:
        """Set :attr:`lost` if a newer generation exists or this one's file is gone or replaced."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None
        newer = _top(self.lock_dir)
        if st is None or st.st_ino != self.ino or newer > self.gen:
            rec, fst, _ = _read(self.lock_dir, newer) if newer > self.gen else (None, None, False)
            who = describe(rec or {}) if rec else "another trainer"
            self.lost = f"{self.run_dir} was taken over by {who} (generation {newer}; this one held {self.gen})"

    def check(self) -> None:
        """Raise :class:`RunDirLocked` if the lock was taken over (call at step boundaries)."""
        if self.lost:
            raise RunDirLocked(f"run directory lock lost: {self.lost}; stopping without writing anything more")

    def verify(self) -> None:
        """:meth:`check`, looking at the lock directory now rather than at the heartbeat's last look.

        The checkpoint writer calls it right before a commit and before pruning
        (``CheckpointManager.owner_check``): a save in flight when the lock was taken over must not
        become the new holder's newest checkpoint, nor delete its files. A stat and a listing.
        """
        if not self.lost and not self._released:
            try:
                self._detect_takeover()
            except OSError:
                pass  # cannot look now: the heartbeat's verdict stands
        self.check()

    def release(self) -> None:
        """Give the lock back (idempotent). A lock that was taken over is left to its new holder."""
        if self._released:
            return
        self._released = True
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        try:
            if not self.lost:
                if self.record.get("supervises") is True:  # its descendants are gone with it
                    _child_path(self.lock_dir, self.gen).unlink(missing_ok=True)
                os.rename(self.path, _gen_path(self.lock_dir, self.gen, released=True))
        except OSError as e:
            if e.errno != errno.ENOENT:
                log.warning("run directory lock: could not release %s: %s", self.path, e)
        finally:
            _held_fds.discard(self.fd)
            try:
                os.close(self.fd)  # drops the flock
            except OSError:
                pass

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class InheritedLock(RunLock):
    """The lock of a supervisor (an ancestor of this process), used by this process: see "A
    supervisor's lock, handed down" in the module docstring.

    It is the supervisor's generation: nothing is written to it, the supervisor beats it and gives
    it back. This object holds the flock of ``lock/gen-N.child`` (the one descendant using the lock)
    and watches, from the same small thread as a holder, for a takeover of the supervisor's
    generation (:meth:`check`, :meth:`verify` as for a holder). :meth:`release` drops the flock only.
    """

    def __init__(self, run_dir: Path, lock_dir: Path, gen: int, claim_fd: int, record: dict[str, Any],
                 stale_after_s: float) -> None:
        self.run_dir, self.lock_dir, self.gen, self.fd, self.record = run_dir, lock_dir, gen, claim_fd, record
        self.path = _gen_path(lock_dir, gen)
        self.ino = os.stat(self.path).st_ino
        self.stale_after_s = stale_after_s
        self.took_over = None
        self.notes = []
        self.lost = None
        self.flock = True
        self._stop = threading.Event()
        self._released = False
        _held_fds.add(claim_fd)  # a forked child (a DataLoader worker) must not keep the claim
        self._thread = threading.Thread(target=self._beat_loop, name="foldhpc-runlock", daemon=True)
        self._thread.start()

    def describe(self) -> str:
        return (f"{self.path} (generation {self.gen}) of its supervisor pid {self.record.get('pid')}, handed down to "
                f"this process (pid {os.getpid()})")

    def _beat(self) -> None:
        self._detect_takeover()  # the supervisor refreshes the file, not this process

    def release(self) -> None:
        """Stop using the supervisor's lock (idempotent): the flock on the claim file goes; the lock stays the supervisor's."""
        if self._released:
            return
        self._released = True
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        _held_fds.discard(self.fd)
        try:
            os.close(self.fd)  # drops the flock; the file stays (unlinking a flock file races a waiting opener)
        except OSError:
            pass


def _ancestors(limit: int = 256) -> list[int]:
    """This process's parent, its parent, ... up to (without) pid 1, from /proc; [] where /proc does not say."""
    out: list[int] = []
    pid = os.getppid()
    while pid > 1 and len(out) < limit:
        out.append(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            pid = int(stat[1])
        except (OSError, IndexError, ValueError):
            break
    return out


def is_my_supervisor(rec: dict[str, Any], me: dict[str, Any] | None = None) -> bool:
    """Whether ``rec`` is the lock record of a supervisor that is an ancestor of this process (its
    lock is then this process's to use: :class:`InheritedLock`). The pid alone would not do: it is
    checked with its start time, on this host (boot id) and in this PID namespace."""
    me = identity() if me is None else me
    pid = rec.get("pid")
    if rec.get("supervises") is not True or not isinstance(pid, int):
        return False
    if rec.get("host") != me["host"] or not me["boot_id"] or rec.get("boot_id") != me["boot_id"]:
        return False
    if (rec.get("pid_ns") or None) != (me.get("pid_ns") or None) or pid not in _ancestors():
        return False
    proc = proc_start(pid)
    return proc is not None and rec.get("pid_start") is not None and proc[0] == rec.get("pid_start")


def _inherit(run_dir: Path, lock_dir: Path, n: int, rec: dict[str, Any], stale_after_s: float) -> InheritedLock:
    """Use generation ``n``, the lock of this process's supervisor; :class:`RunDirLocked` if another
    descendant of it uses the lock now."""
    path = _child_path(lock_dir, n)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunDirLocked(
            f"run directory {run_dir} is in use by another process under the same supervisor "
            f"({describe(rec)}): one writer per run directory; start one trainer per run.dir", {**rec, "generation": n}
        ) from None
    except OSError:
        pass  # no flock on this file system: the supervisor's lock still keeps every other trainer out
    try:
        return InheritedLock(run_dir, lock_dir, n, fd, rec, stale_after_s)
    except OSError:  # the supervisor's generation vanished meanwhile: it gave the lock back
        os.close(fd)
        raise


class NoLock:
    """What ranks other than 0 hold: nothing."""

    took_over = None
    lost = None

    def log_acquired(self) -> None:
        pass

    def check(self) -> None:
        pass

    def verify(self) -> None:
        pass

    def release(self) -> None:
        pass


def _clean(lock_dir: Path, gen: int) -> None:
    """Delete the generations below ``gen`` and temporary files older than an hour (crashed creators)."""
    for old, released in _generations(lock_dir).items():
        if old < gen:
            for path in {_gen_path(lock_dir, old, released), _gen_path(lock_dir, old), _child_path(lock_dir, old)}:
                try:
                    os.unlink(path)
                except OSError:
                    pass
    for tmp in lock_dir.glob(".tmp-*"):
        try:
            if time.time() - tmp.stat().st_mtime > 3600:
                tmp.unlink()
        except OSError:
            pass


def acquire(run_dir: Path, stale_after: float | str, ending_wait_s: float = ENDING_WAIT_S,
            supervises: bool = False) -> RunLock:
    """Take ``<run_dir>/lock``, taking over a holder that is gone; :class:`RunDirLocked` if one is alive.

    ``stale_after``: ``fault.lock_stale_after`` (seconds or a duration such as ``"5m"``; 0 = a
    heartbeat never goes stale). Creates ``run_dir/lock/`` and nothing else. Logs nothing: call
    :meth:`RunLock.log_acquired` once logging to the run directory is set up.

    ``supervises``: the caller is a supervisor that hands its lock down to the processes under it
    (recorded as ``supervises: true``). Where the holder is such a supervisor above this process,
    the result is an :class:`InheritedLock` on its generation (see the module docstring).
    """
    from foldhpc.config import parse_duration

    stale_after_s = parse_duration(stale_after)
    run_dir = Path(run_dir)
    lock_dir = run_dir / LOCK_DIR
    lock_dir.mkdir(parents=True, exist_ok=True)
    me = identity()
    record = {**me, "since": time.time(), "token": secrets.token_hex(8),
              "heartbeat_interval_s": heartbeat_interval_s(stale_after_s),
              **({"supervises": True} if supervises else {})}
    wait_until = time.monotonic() + ending_wait_s
    n = _top(lock_dir)
    took_over: str | None
    for _ in range(_ATTEMPTS):
        took_over = None
        if n > 0:
            rec, st, released = _read(lock_dir, n)
            if rec is None:  # generation n vanished: a newer holder has cleaned it up
                newer = _top(lock_dir)
                if newer > n:
                    n = newer
                    continue
            elif not released:
                if not rec:  # the O_EXCL fallback writes after creating: give it a moment
                    time.sleep(0.2)
                    rec, st, released = _read(lock_dir, n)
                    if rec is None or released:
                        continue
                assert st is not None
                if not supervises and is_my_supervisor(rec, me):
                    try:
                        return _inherit(run_dir, lock_dir, n, rec, stale_after_s)
                    except FileNotFoundError:  # it gave the lock back meanwhile: look again
                        n = max(n, _top(lock_dir))
                        continue
                v = judge(rec, st.st_mtime, stale_after_s, me, _gen_path(lock_dir, n))
                if v.alive:
                    if v.ending and time.monotonic() < wait_until:
                        time.sleep(1.0)
                        n = max(n, _top(lock_dir))
                        continue
                    age = max(0.0, time.time() - st.st_mtime)
                    raise RunDirLocked(
                        f"run directory {run_dir} is in use by another trainer: {describe(rec, age=age)} "
                        f"({v.why}). Wait for it to end (or scancel its job), or train into another run.dir",
                        {**rec, "generation": n})
                took_over = f"{describe(rec)}: {v.why}"
        try:
            fd = _create(lock_dir, n + 1, record)
        except FileExistsError:
            n = max(n + 1, _top(lock_dir))
            continue
        lock = RunLock(run_dir, lock_dir, n + 1, fd, record, stale_after_s, took_over)
        _clean(lock_dir, lock.gen)
        return lock
    raise RunDirLocked(f"run directory {run_dir}: could not take its lock after {_ATTEMPTS} attempts "
                       "(several trainers starting at once?)")


# ------------------------------------------------------------------ the checkpoint directory


class CheckpointDirOwned(RunDirLocked):
    """``checkpoint.dir`` belongs to another run directory (its owner record names it)."""


def _read_owner(path: Path) -> tuple[str | None, dict[str, Any], str | None]:
    """(owning run directory, record, what is wrong with it) of an owner record; (None, {}, None) if there is none."""
    try:
        raw = path.read_bytes()[:65536]
    except (FileNotFoundError, NotADirectoryError):  # no directory yet (or a file there: the preflight says so)
        return None, {}, None
    except OSError as e:
        return None, {}, f"cannot be read: {e.strerror or e}"
    try:
        rec = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, {}, f"not JSON: {e}"
    owner = rec.get("run_dir") if isinstance(rec, dict) else None
    if not isinstance(owner, str) or not owner:
        return None, {}, "it names no run directory (run_dir)"
    return owner, rec, None


def claim_checkpoint_dir(ckpt_dir: Path, run_dir: Path) -> tuple[int, str] | None:
    """Make ``ckpt_dir`` the checkpoint directory of ``run_dir``, or refuse: :class:`CheckpointDirOwned`
    (exit 2) if its owner record ``OWNER.json`` names another run directory.

    Why: the run lock covers ``run.dir`` only. Two runs pointed at one ``checkpoint.dir`` resume
    each other's weights (same trajectory keys: silently) or overwrite and prune each other's
    files. The owner record names the run directory (absolute, symlinks resolved) that trains
    into it; it stays when that run has finished, so a new run directory is refused then too.
    A checkpoint directory inside the run directory (the default ``<run.dir>/checkpoints``) is
    the run's by construction: its record is written, or rewritten after the run directory was
    moved, so that other runs see whose it is. Returns (level, note) for the log, or None. Writes only
    the record; a directory that cannot be created or written is left to the checkpoint
    preflight to report. Call while holding the run lock, before anything is written there.
    """
    run = Path(run_dir).resolve()
    ck = Path(ckpt_dir).resolve()
    path = ck / OWNER_FILE
    inside = ck.is_relative_to(run)
    owner, rec, problem = _read_owner(path)
    if owner == str(run):
        return None
    if not inside:
        if problem:
            raise CheckpointDirOwned(
                f"checkpoint.dir {ck} has an owner record {path} that {problem}: it may be another run's. "
                f"If only run directory {run} trains into {ck}, delete {path}; otherwise point checkpoint.dir "
                "elsewhere (unset, it is <run.dir>/checkpoints)", rec)
        if owner is not None:
            since = rec.get("since")
            when = (f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}"
                    if isinstance(since, (int, float)) and not isinstance(since, bool) else "")
            raise CheckpointDirOwned(
                f"checkpoint.dir {ck} belongs to run directory {owner} ({path}{when}), not to this run's {run}: "
                f"resuming from it would continue that run's weights. Point checkpoint.dir elsewhere (unset, it "
                f"is <run.dir>/checkpoints), or train in run.dir = {owner}; if that run no longer uses {ck}, "
                f"delete {path} to hand the directory over", rec)
    me = identity()
    record = {"run_dir": str(run), "host": me["host"], "user": me["user"], "pid": me["pid"], "job_id": me["job_id"],
              "since": time.time()}
    data = json.dumps(record, sort_keys=True).encode() + b"\n"
    from foldhpc.records.fsio import atomic_write_text, make_private_dir

    try:
        make_private_dir(ck)  # as the checkpoint preflight would (0750)
        if inside and (owner is not None or problem):
            atomic_write_text(path, data.decode())
            return logging.WARNING, (f"checkpoint directory {ck}: owner record {OWNER_FILE} named "
                                     f"{owner or 'nobody readable'} ({problem or 'moved run directory?'}); it is "
                                     "inside this run directory, so it is this run's now")
        tmp = ck / f".{OWNER_FILE}.tmp-{me['host']}-{me['pid']}"  # the manager's name for temporaries
        tmp.unlink(missing_ok=True)  # a dead process's, with this pid
        os.close(_create_new(path, data, tmp))
    except FileExistsError:  # another run claimed it a moment ago
        return claim_checkpoint_dir(ckpt_dir, run_dir)
    except OSError:
        return None  # the preflight names what is wrong with the directory
    if not inside:
        return logging.INFO, f"checkpoint directory {ck}: claimed for this run directory ({path})"
    return None


def record_refusal(run_dir: Path, err: RunDirLocked) -> None:
    """A refused Slurm job in ``jobs.jsonl`` (``foldhpc status`` then keeps showing the holder's job
    as the run's current one); nothing for a run outside Slurm, which has no job story."""
    me = identity()
    if not me["job_id"]:
        return
    from foldhpc.records.history import Refused, write_event

    holder = {k: err.holder.get(k) for k in ("host", "pid", "job_id", "since") if err.holder.get(k) is not None}
    try:
        write_event(run_dir, Refused(job_id=me["job_id"], restart_count=me["restart_count"], holder=holder,
                                     reason=str(err)))
    except OSError as e:
        log.warning("cannot record the refusal in %s: %s", run_dir, e)
