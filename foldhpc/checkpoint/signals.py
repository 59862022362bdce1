"""Preemption signals: record them in the handler, act on them at the next step boundary.

Saving inside a signal handler could snapshot a half-done optimizer step; so the handler only
remembers which signal arrived and the training loop checks :attr:`PreemptionSignals.received`
between steps. A second signal during the save is recorded too and changes nothing.

Two gaps around the ``with`` block would otherwise let a preemption signal kill the trainer
(exit 138 for SIGUSR1) instead of saving, or reach another handler (submitit's, which requeues):

* before it: the process is still importing and loading. :func:`hold_early_signals` records
  such a signal and the next :class:`PreemptionSignals` acts on it at its first step boundary;
  and when ``$FOLDHPC_READY_FILE`` is set (``sbatch/train.sbatch`` sets it), that file exists
  exactly while the handlers are installed, so the batch script holds a signal until then;
* after it: training is over (completed or checkpointed). :func:`ignore_after_training` makes
  ``__exit__`` ignore the signals instead of restoring the previous handlers, so a late signal
  neither kills a finished trainer nor requeues a finished job.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from types import FrameType
from typing import Callable, Iterable
from foldhpc.records.envvars import READY_FILE_ENV

log = logging.getLogger(__name__)

_Handler = Callable[[int, FrameType | None], object] | int | signal.Handlers | None

#: env var: a file that exists while PreemptionSignals' handlers are installed

_early: list[signal.Signals] = []  # signals recorded by hold_early_signals, not yet taken over
_ignore_on_exit = False
_last_signal_at: float | None = None  # time.time() of the newest preemption signal


def _note_time() -> None:
    global _last_signal_at
    _last_signal_at = time.time()


def last_signal_time() -> float | None:
    """``time.time()`` when the newest preemption signal arrived (to budget what is left of the lead)."""
    return _last_signal_at


def _record_early(signum: int, frame: FrameType | None) -> None:  # noqa: ARG001
    _note_time()
    _early.append(signal.Signals(signum))


def hold_early_signals(signals: Iterable[signal.Signals]) -> None:
    """Until training listens, record these signals instead of dying of them (see the module docstring)."""
    for s in signals:
        signal.signal(s, _record_early)


def ignore_after_training() -> None:
    """Make every later :meth:`PreemptionSignals.__exit__` ignore its signals instead of restoring."""
    global _ignore_on_exit
    _ignore_on_exit = True


class PreemptionSignals:
    """Installs handlers for ``signals`` (e.g. SIGUSR1, SIGTERM) for the lifetime of a ``with``."""

    def __init__(self, signals: Iterable[signal.Signals]) -> None:
        self.signals = list(signals)
        self.received: signal.Signals | None = None  # the first one
        self.received_at: float | None = None  # time.time() of the first one
        self._previous: dict[signal.Signals, _Handler] = {}
        self._ready: Path | None = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:  # noqa: ARG002
        _note_time()
        if self.received is None:
            self.received = signal.Signals(signum)
            self.received_at = _last_signal_at

    def __enter__(self) -> "PreemptionSignals":
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        early = [s for s in _early if s in self.signals]
        _early.clear()
        if early and self.received is None:
            self.received, self.received_at = early[0], _last_signal_at
            log.warning("%s arrived before training was listening: saving at the first step boundary", early[0].name)
        ready = os.environ.get(READY_FILE_ENV)
        if ready:
            try:
                Path(ready).touch()
                self._ready = Path(ready)
            except OSError as e:
                log.warning("cannot create the ready file %s (%s): the batch script will forward signals after "
                            "its timeout only", ready, e)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._ready is not None:  # first: from now on the batch script must not forward to us
            self._ready.unlink(missing_ok=True)
            self._ready = None
        for s, old in self._previous.items():
            signal.signal(s, signal.SIG_IGN if _ignore_on_exit else old)
        self._previous.clear()


def ignore_signals(signals: Iterable[signal.Signals]) -> None:
    """For DataLoader workers: a preemption signal is the main process's to handle.

    Slurm signals every process of a job step; a worker killed by SIGTERM would take the
    DataLoader, and with it the emergency save, down with it.
    """
    for s in signals:
        signal.signal(s, signal.SIG_IGN)
