"""A trainer's sign of life, written for its supervisor at every step and around long phases.

The supervisor (:mod:`foldhpc.resilience.supervisor`) passes the path of a small file in
``$FOLDHPC_HEARTBEAT_FILE`` (on tmpfs, ``/dev/shm``, where there is one: never the shared file
system, a beat costs one ``pwrite`` of 20 bytes). The trainer overwrites it with (beat counter,
step, phase). The supervisor only compares successive reads, with its own clock, so nothing
depends on two processes' clocks agreeing.

The supervisor creates the file holding a record (:func:`prepare`), so its page is allocated
before the trainer starts: a beat overwrites it in place and cannot fail on a full ``/dev/shm``
(where it cannot be created, the supervisor uses another directory). A beat that fails anyway
is logged, once: a trainer whose beats do not arrive is taken for hung and killed.

Phases: ``startup`` (imports, data, checkpoint load: before the first step; the supervisor
allows ``fault.startup_timeout``, until the first step's forward and backward are done),
``train`` (at each step boundary and after each backward), ``validation`` (one per batch),
``checkpoint`` (before a blocking write, and every ``WAIT_BEAT_S`` while waiting for a
background one), ``done`` (training returned: the process is exiting; the startup allowance
again).
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from foldhpc.records.envvars import HEARTBEAT_ENV

log = logging.getLogger(__name__)

#: ``first``: the step boundary of a process's first step (its forward and backward are start-up:
#: cold kernels, ``torch.compile``); every later step beats ``train``, and so does the first step
#: once its backward is done. So one ``train`` beat tells the supervisor that start-up is over,
#: even where it polled too slowly to see the beats before it. Appended: the codes stay stable.
PHASES = ("startup", "train", "validation", "checkpoint", "done", "first")
_FMT = struct.Struct("<QqI")
WAIT_BEAT_S = 1.0  # a trainer blocked on something slow but sane (a checkpoint write) beats this often


@dataclass(frozen=True)
class Beat:
    count: int  # 0: no beat yet
    step: int
    phase: str


class Heartbeat:
    """The trainer's side: ``beat(step, phase)``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        self._count = 0
        self._failing = False

    def beat(self, step: int, phase: str = "train") -> None:
        self._count += 1
        code = PHASES.index(phase) if phase in PHASES else 0  # an unknown phase still counts as a beat
        try:
            os.pwrite(self._fd, _FMT.pack(self._count, step, code), 0)
        except OSError as e:  # a sign of life must never fail the training, but must not fail unseen
            if not self._failing:
                log.error("heartbeat to %s failed (%s): the supervisor may take this trainer for hung and kill it",
                          self.path, e.strerror or e)
            self._failing = True
        else:
            if self._failing:
                log.warning("heartbeat to %s works again", self.path)
            self._failing = False


class NoHeartbeat:
    """Not supervised: beats go nowhere."""

    def beat(self, step: int, phase: str = "train") -> None:
        pass


_current: Heartbeat | NoHeartbeat | None = None


def heartbeat() -> Heartbeat | NoHeartbeat:
    """This process's heartbeat (from ``$FOLDHPC_HEARTBEAT_FILE``), made once."""
    global _current
    if _current is None:
        path = os.environ.get(HEARTBEAT_ENV)
        _current = Heartbeat(Path(path)) if path else NoHeartbeat()
    return _current


def prepare(path: Path) -> None:
    """Create (or reset) the beat file holding a "no beat yet" record, without truncating it.

    On tmpfs a file's page is allocated by its first write; the trainer's beats then overwrite
    it in place and cannot fail with ENOSPC when ``/dev/shm`` fills up. Raises OSError where the
    record cannot be written (a full ``/dev/shm``): the caller picks another directory.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        if os.pwrite(fd, _FMT.pack(0, -1, 0), 0) != _FMT.size:
            raise OSError(f"short write to {path}")
    finally:
        os.close(fd)


def read(path: Path) -> Beat:
    """The newest beat in ``path`` (count 0 if there is none yet)."""
    try:
        with open(path, "rb") as f:
            data = f.read(_FMT.size)
    except OSError:
        data = b""
    if len(data) < _FMT.size:
        return Beat(0, -1, "startup")
    count, step, phase = _FMT.unpack(data)
    if count == 0:
        return Beat(0, -1, "startup")
    return Beat(count, step, PHASES[phase] if phase < len(PHASES) else "startup")


_stack_file = None


def enable_stack_dump(path: Path) -> None:
    """On SIGQUIT (sent by the supervisor to a hung trainer) write every thread's Python stack to
    ``path`` (appended). faulthandler does it in C, so it works even when the GIL is held by a
    deadlocked thread."""
    import faulthandler
    import signal
    import time

    global _stack_file
    if _stack_file is None:
        _stack_file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the handler
        _stack_file.write(f"# stacks of pid {os.getpid()} (started {time.strftime('%Y-%m-%d %H:%M:%S')}) follow "
                          "when its supervisor found it hung\n")
        _stack_file.flush()
    faulthandler.register(signal.SIGQUIT, file=_stack_file, all_threads=True)
