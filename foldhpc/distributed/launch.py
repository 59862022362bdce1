"""``foldhpc train --nproc N``: N ranks on this machine, for development without Slurm.

What ``srun`` does for a job step, in small: start N copies of ``foldhpc train`` with the
``env://`` variables (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT`` on a free local
port), forward preemption signals to all of them, and wait. If a rank fails, the others fail
too once their next collective notices (at once for a dead rank on gloo, after
``distributed.timeout`` for a hung one); ranks still alive ``distributed.timeout`` + 30 s after a
failure are killed, so the launcher never hangs. ``torchrun --nproc-per-node N -m foldhpc train``
works as well; this launcher only saves typing and knows foldhpc's exit codes.

Exit status: the first failing rank's (a rank killed by signal S counts as 128+S), else 75 if
the ranks stopped on a preemption signal, else 0.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from types import FrameType

log = logging.getLogger(__name__)

FORWARDED = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
EXIT_CHECKPOINTED = 75


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status(rc: int) -> int:
    return 128 - rc if rc < 0 else rc


def launch(train_args: list[str], nproc: int, timeout_s: float) -> int:
    """Run ``foldhpc train *train_args`` as ``nproc`` ranks; see the module docstring."""
    port = free_port()
    node = socket.gethostname()
    procs: list[subprocess.Popen[bytes]] = []
    for rank in range(nproc):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                   LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   FOLDHPC_NODE=node)
        procs.append(subprocess.Popen([sys.executable, "-m", "foldhpc", "train", *train_args], env=env))
    log.info("started %d ranks (pids %s), rendezvous 127.0.0.1:%d", nproc, " ".join(str(p.pid) for p in procs), port)

    def forward(signum: int, frame: FrameType | None) -> None:  # noqa: ARG001
        for p in procs:
            if p.poll() is None:
                try:
                    p.send_signal(signum)
                except ProcessLookupError:
                    pass

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    first_failure: tuple[int, int] | None = None  # (rank, status)
    failed_at = 0.0
    try:
        while any(p.poll() is None for p in procs):
            for rank, p in enumerate(procs):
                rc = p.poll()
                if first_failure is None and rc is not None and rc not in (0, EXIT_CHECKPOINTED):
                    first_failure, failed_at = (rank, _status(rc)), time.monotonic()
                    how = f"was killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited with status {rc}"
                    log.error("rank %d (pid %d) %s; the other ranks stop when their next collective fails "
                              "(killed after %.0fs if they do not)", rank, p.pid, how, timeout_s + 30)
            if first_failure is not None and time.monotonic() - failed_at > timeout_s + 30:
                for p in procs:
                    if p.poll() is None:
                        log.error("killing rank pid %d: still running %.0fs after another rank failed", p.pid,
                                  timeout_s + 30)
                        p.kill()
            time.sleep(0.1)
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
    codes = [_status(p.returncode) for p in procs]
    if first_failure is None:
        bad = [(r, c) for r, c in enumerate(codes) if c not in (0, EXIT_CHECKPOINTED)]
        first_failure = bad[0] if bad else None
    if first_failure is not None:
        log.error("ranks exited with %s: failed (rank %d first)", codes, first_failure[0])
        return first_failure[1]
    return EXIT_CHECKPOINTED if EXIT_CHECKPOINTED in codes else 0
