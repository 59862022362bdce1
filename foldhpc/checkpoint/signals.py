"""Preemption signals: record them in the handler, act on them at the next step boundary.

Saving inside a signal handler could snapshot a half-done optimizer step; so the handler only
remembers which signal arrived and the training loop checks :attr:`PreemptionSignals.received`
between steps. A second signal during the save is recorded too and changes nothing.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Callable, Iterable

log = logging.getLogger(__name__)

_Handler = Callable[[int, FrameType | None], object] | int | signal.Handlers | None


class PreemptionSignals:
    """Installs handlers for ``signals`` (e.g. SIGUSR1, SIGTERM) for the lifetime of a ``with``."""

    def __init__(self, signals: Iterable[signal.Signals]) -> None:
        self.signals = list(signals)
        self.received: signal.Signals | None = None  # the first one
        self._previous: dict[signal.Signals, _Handler] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:  # noqa: ARG002
        if self.received is None:
            self.received = signal.Signals(signum)

    def __enter__(self) -> "PreemptionSignals":
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, old in self._previous.items():
            signal.signal(s, old)
        self._previous.clear()


def ignore_signals(signals: Iterable[signal.Signals]) -> None:
    """For DataLoader workers: a preemption signal is the main process's to handle.

    Slurm signals every process of a job step; a worker killed by SIGTERM would take the
    DataLoader, and with it the emergency save, down with it.
    """
    for s in signals:
        signal.signal(s, signal.SIG_IGN)
