"""Read ``<run.dir>/train.log`` as it grows and turn the lines chaos cares about into events.

The log is the trainer's own account (the supervisor writes into it too), appended across
restarts, each line tagged with its process id; reading it is how the runner knows, without
touching the processes, when a step was done, which checkpoint a start resumed from, which ones
it rejected, when a save failed. Log timestamps have one-second resolution, so each event also
gets the time the runner *saw* it (polled every few ms): that is the clock for time to resume.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

_PID = re.compile(r"\[pid (\d+)\]")
_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("progress", re.compile(r"foldhpc\.train\.loop: step (\d+)/\d+ loss")),
    ("first_step", re.compile(r"first step \((\d+)\) done in [\d.]+s; ([\d.]+)s after process start")),
    ("resumed", re.compile(r"resumed from (.+) at step (\d+) \(restart")),
    ("rejected", re.compile(r"CHECKPOINT (\S+) \(step (\d+)\) IS [A-Z]+: (.*) -- falling back")),
    ("saved", re.compile(r"checkpoint step (\d+) saved \(([^,]+)")),
    ("save_failed", re.compile(r"checkpoint at step (\d+) FAILED")),
    ("signal_save", re.compile(r"received (SIG\w+): saving a checkpoint at step (\d+)")),
    ("stale_tmp", re.compile(r"removed stale temporary checkpoint file (\S+)")),
    ("deleted_bad", re.compile(r"deleted bad checkpoint (\S+) \(")),
    ("pruned", re.compile(r"pruned checkpoint (\S+) \(step (\d+)")),
    ("nonfinite", re.compile(r"step (\d+): non-finite .*update skipped")),
    ("hung", re.compile(r"supervisor: (?:rank \d+ )?hung at step (-?\d+)")),
    ("restarting", re.compile(r"supervisor: restarting the trainer")),
    ("gave_up", re.compile(r"supervisor: giving up: (.*)")),
    ("completed", re.compile(r"training completed at step (\d+)")),
    ("run_failed", re.compile(r"run failed(?: at step (\d+))?: (.*)")),
]


@dataclass
class LogEvent:
    seen: float  # time.time() when the runner read the line
    pid: int
    kind: str
    step: int = -1
    text: str = ""
    groups: tuple[str, ...] = ()


@dataclass
class LogTail:
    path: Path
    events: list[LogEvent] = field(default_factory=list)
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (seen, step) of every progress line
    # kind -> [(position in events, event)]: lookups stay cheap in a log of tens of thousands of lines
    by_kind: dict[str, list[tuple[int, LogEvent]]] = field(default_factory=dict)
    _offset: int = 0
    _partial: bytes = b""

    def poll(self) -> list[LogEvent]:
        """Parse what was appended since the last call; returns the new events."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        if not data:
            return []
        self._offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()  # an incomplete last line waits for the rest
        now = time.time()
        new: list[LogEvent] = []
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            m = _PID.search(line)
            pid = int(m.group(1)) if m else -1
            for kind, pat in _PATTERNS:
                mm = pat.search(line)
                if not mm:
                    continue
                groups = tuple(g or "" for g in mm.groups())
                step = -1
                if kind in ("progress", "first_step", "saved", "save_failed", "nonfinite", "hung", "completed"):
                    step = int(groups[0])
                elif kind in ("resumed", "rejected", "signal_save", "pruned"):
                    step = int(groups[1])
                elif kind == "run_failed" and groups[0]:
                    step = int(groups[0])
                ev = LogEvent(now, pid, kind, step, line, groups)
                self.by_kind.setdefault(kind, []).append((len(self.events) + len(new), ev))
                new.append(ev)
                if kind == "progress":
                    self.timeline.append((now, step))
                break
        self.events.extend(new)
        return new

    def since(self, index: int, kind: str | None = None, pid: int | None = None) -> list[LogEvent]:
        """Events from position ``index`` of :attr:`events` on, optionally of one kind / process."""
        if kind is None:
            return [e for e in self.events[index:] if pid is None or e.pid == pid]
        out: list[LogEvent] = []
        for i, e in reversed(self.by_kind.get(kind, [])):
            if i < index:
                break
            if pid is None or e.pid == pid:
                out.append(e)
        return out[::-1]

    def of_kind(self, kind: str) -> list[LogEvent]:
        return [e for _, e in self.by_kind.get(kind, [])]

    def last(self, kind: str, before: int | None = None, pid: int | None = None) -> LogEvent | None:
        """The newest event of ``kind`` (of process ``pid``) before position ``before``."""
        for i, e in reversed(self.by_kind.get(kind, [])):
            if (before is None or i < before) and (pid is None or e.pid == pid):
                return e
        return None

    def last_position_of(self, pid: int) -> int:
        """Position of the newest event of process ``pid`` (-1 if none)."""
        for i in range(len(self.events) - 1, -1, -1):
            if self.events[i].pid == pid:
                return i
        return -1
