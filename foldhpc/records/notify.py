"""``monitor.on_state_change``: a command of the user's run when the run's state changes.

The way users attach mail or chat to a run without a monitoring server: ``on_state_change =
"mail -s \\"$FOLDHPC_STATE: $FOLDHPC_RUN_DIR\\" me@lab.org < /dev/null"``. It runs through the shell,
detached (a session of its own, stdin closed, output appended to ``<run.dir>/notify.log``), with
the state in its environment (:data:`STATES`; ``FOLDHPC_STATE``, ``FOLDHPC_RUN_DIR``,
``FOLDHPC_STEP``, ``FOLDHPC_JOB_ID``, ``FOLDHPC_REASON``). Its failure never affects training: it is
not waited for (a watcher thread logs a non-zero exit and kills it after :data:`TIMEOUT_S`), and
an error starting it is a warning.

Who calls it: the process whose decision the state is -- the trainer or its supervisor at the end
(completed, failed; a supervisor for a hang), the requeue decision of a Slurm job (requeued,
stopped), the hand-over to a follow-up job (handed_over). A site that has no config at hand passes
none and the command is read from the run's ``config.toml`` (the resolved config of its latest
start).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from pathlib import Path

from foldhpc.records.envvars import (NOTIFY_JOB_ENV, NOTIFY_REASON_ENV, NOTIFY_RUN_DIR_ENV, NOTIFY_STATE_ENV,
                                     NOTIFY_STEP_ENV)
from foldhpc.records.layout import NOTIFY_LOG

log = logging.getLogger(__name__)

COMPLETED, FAILED, HUNG, REQUEUED, HANDED_OVER, STOPPED = (
    "completed", "failed", "hung", "requeued", "handed_over", "stopped")
#: the states a notification names
STATES = (COMPLETED, FAILED, HUNG, REQUEUED, HANDED_OVER, STOPPED)
TIMEOUT_S = 60.0  # a notification command still running after this long is killed
_REASON_MAX = 500  # characters of the reason passed in the environment


def notify(run_dir: Path, state: str, *, command: str, step: int | None = None,
           job_id: str | None = None, reason: str | None = None) -> subprocess.Popen[bytes] | None:
    """Start ``command`` (the run's ``monitor.on_state_change``) for ``state``; nothing if it is
    empty. Returns its process (tests wait for it). Never raises."""
    try:
        cmd = command
        if not cmd:
            return None
        env = {**os.environ, NOTIFY_STATE_ENV: state, NOTIFY_RUN_DIR_ENV: str(Path(run_dir).absolute()),
               NOTIFY_STEP_ENV: "" if step is None else str(step), NOTIFY_JOB_ENV: job_id or "",
               NOTIFY_REASON_ENV: (reason or "")[:_REASON_MAX]}
        with open(Path(run_dir) / NOTIFY_LOG, "ab") as out:
            p = subprocess.Popen(cmd, shell=True, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    except Exception as e:  # noqa: BLE001 - a notification must never touch the training
        log.warning("monitor.on_state_change for %s could not be started: %s", state, e)
        return None
    log.info("monitor.on_state_change: notified %s (pid %d)", state, p.pid)
    threading.Thread(target=_watch, args=(p, state), name="foldhpc-notify", daemon=True).start()
    return p


def _watch(p: subprocess.Popen[bytes], state: str) -> None:
    try:
        rc = p.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        log.warning("monitor.on_state_change for %s still runs after %.0fs: killed", state, TIMEOUT_S)
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            pass
        p.wait()
        return
    if rc:
        log.warning("monitor.on_state_change for %s exited with status %d (its output: %s)", state, rc, NOTIFY_LOG)
