"""File primitives every writer of a run directory shares.

Atomic replace (temp file + fsync + rename, so a reader sees the old or the new file, never a mix),
directory fsync (POSIX needs it for a rename to be durable), private folders (see
:data:`PRIVATE_DIR_MODE`) and a pid check. Nothing here imports anything of foldhpc.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

#: Mode of the folders a run writes (``run.dir``, the checkpoint directory, submitit's folder): the
#: owner writes; the group may read and enter (colleagues on a shared project run ``foldhpc status``
#: or ``goodput`` on it) but not write, since a group member who can write there can edit the
#: manifest, swap a checkpoint, or replace the pickles a Slurm job unpickles; others get nothing.
PRIVATE_DIR_MODE = 0o750
#: Mode of the files :func:`atomic_write_text` creates (before the umask, which can only remove bits).
PRIVATE_FILE_MODE = 0o644
#: Bits the process umask always holds once :func:`make_private_dir` ran: whatever the user's
#: umask (``002`` is common with setgid project folders), no file or folder the run creates
#: afterwards is group- or world-writable.
NO_SHARED_WRITE = stat.S_IWGRP | stat.S_IWOTH
_warned_shared: set[str] = set()


def atomic_write_text(path: Path, text: str, *, fsync: bool = True) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new file, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        # an explicit mode: the file is never group/world-writable, whatever the umask
        with open(tmp, "w", encoding="utf-8", opener=lambda p, flags: os.open(p, flags, PRIVATE_FILE_MODE)) as f:
            f.write(text)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:  # a full file system: leave no half-written temporary behind
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise
    if fsync:
        fsync_dir(path.parent)


def restrict_umask() -> None:
    """Add :data:`NO_SHARED_WRITE` to this process's umask (its children inherit it).

    Explicit modes on the folders alone are not enough: a group-writable file in a private
    folder can still be rewritten in place (a checkpoint, the manifest, a submitit pickle), and
    the files come from many writers (the checkpoint writer, logging, TensorBoard, submitit).
    """
    old = os.umask(0o077)  # reading the umask means setting it; 077 is the safe value meanwhile
    os.umask(old | NO_SHARED_WRITE)


def make_private_dir(path: Path) -> Path:
    """Create ``path`` (with missing parents) as :data:`PRIVATE_DIR_MODE`, and restrict the umask
    (:func:`restrict_umask`) so that what is written in it is not group/world-writable either.

    An existing folder is left as it is (its owner may have reasons), but if it is group- or
    world-writable a WARNING names it and the ``chmod`` that fixes it, once per process.
    """
    restrict_umask()
    path = Path(path)
    try:
        path.mkdir(mode=PRIVATE_DIR_MODE, parents=True)  # the umask can only make it stricter
    except FileExistsError:
        if not path.is_dir():
            raise
        warn_if_shared(path)
    return path


def warn_if_shared(path: Path) -> None:
    """Log once per process that ``path`` is group/world-writable, with the fix."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return
    key = str(path.resolve())
    if not mode & NO_SHARED_WRITE or key in _warned_shared:
        return
    _warned_shared.add(key)
    who = " and ".join(w for w, bit in (("group", stat.S_IWGRP), ("world", stat.S_IWOTH)) if mode & bit)
    log.warning("%s is %s-writable (mode %04o): anyone who can write there can edit the checkpoint index, swap a "
                "checkpoint or replace the job files a Slurm job unpickles. Fix it with: chmod -R go-w %s",
                path, who, mode, path)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (it may belong to another user).

    A zombie -- dead, not yet reaped by its parent: a rank SIGKILLed a moment ago whose supervisor
    has not polled yet -- is not alive: it will never answer, write or release anything again.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:  # Linux: the state is the field after the command name, which ends at the last ")"
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return True  # no /proc (not Linux), or gone this instant: kill(0) said it existed
    return raw[raw.rfind(b")") + 2:][:1] not in (b"Z", b"X")


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (POSIX needs the directory itself synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def process_age_s() -> float:
    """Seconds since this process started: /proc/uptime minus the process's start time (both
    since boot, in sub-second units; /proc/stat's boot time has whole seconds only). 0 where
    /proc is unavailable."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0
