"""Read ``<run.dir>/events.jsonl`` as it grows: the typed records chaos watches a run by.

Every process of the run (trainer ranks, the supervisor) appends its records there, across
restarts, each tagged with its process id (:mod:`foldhpc.records.events`); reading them is how
the runner knows, without touching the processes, when a step was done, which checkpoint a start
resumed from, which ones it rejected, when a save failed. ``train.log`` is prose for people and is
not read.

Each record also gets the time the runner *saw* it (polled every few ms): that, not the record's
own ``t``, is the clock for time to resume, so the runner's marks (``injected_at``, taken with
the same clock in this process) and its readings are measured alike whatever a record's writer
did between taking ``t`` and its write.

Only records of rank 0 and of rank-less processes (the supervisor) are kept: rank 0 tells the
run's story, as in ``train.log``; the runner names "the trainer" by the pid of rank 0's records,
and another rank's ``first_step`` must never be taken for a new trainer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from foldhpc.records.events import KINDS, Event, EventScan, parse_event


@dataclass(frozen=True, slots=True)
class SeenEvent:
    """One record of events.jsonl and when the runner read it."""

    seen: float  # time.time() when the runner read the line
    event: Event

    @property
    def kind(self) -> str:
        return self.event.kind

    @property
    def pid(self) -> int:
        return self.event.pid

    @property
    def rank(self) -> int | None:
        return self.event.rank

    @property
    def t(self) -> float:
        return self.event.t

    @property
    def step(self) -> int:
        """The record's ``step`` field, -1 where it has none (or not an integer)."""
        s = self.event.get("step")
        return s if isinstance(s, int) and not isinstance(s, bool) else -1

    @property
    def name(self) -> str:
        """The file name of the record's ``path`` field ('' where it has none)."""
        p = self.event.get("path")
        return Path(p).name if isinstance(p, str) and p else ""

    def get(self, key: str, default: Any = None) -> Any:
        return self.event.get(key, default)


def _known(kind: str) -> str:
    """A kind the runner asks for must be one the schema has: a misspelt one would only never match."""
    if kind not in KINDS:
        raise ValueError(f"unknown event kind {kind!r} (foldhpc.records.events.KINDS)")
    return kind


@dataclass
class EventTail:
    path: Path
    events: list[SeenEvent] = field(default_factory=list)
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (seen, step) of every progress record
    # kind -> [(position in events, event)]: lookups stay cheap in a file of tens of thousands of records
    by_kind: dict[str, list[tuple[int, SeenEvent]]] = field(default_factory=dict)
    scan: EventScan = field(default_factory=EventScan)  # lines skipped (bad, unknown version or kind)
    other_ranks: int = 0  # records of ranks other than 0, left out
    _offset: int = 0
    _partial: bytes = b""

    def poll(self) -> list[SeenEvent]:
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
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()  # an incomplete last line waits for the rest
        now = time.time()
        new: list[SeenEvent] = []
        for raw in lines:
            if not raw.strip():
                continue
            ev = parse_event(raw, self.scan)
            if ev is None:
                continue
            if ev.rank not in (None, 0):
                self.other_ranks += 1
                continue
            se = SeenEvent(now, ev)
            self.by_kind.setdefault(ev.kind, []).append((len(self.events) + len(new), se))
            new.append(se)
            if ev.kind == "progress":
                self.timeline.append((now, se.step))
        self.events.extend(new)
        return new

    def since(self, index: int, kind: str | None = None, pid: int | None = None) -> list[SeenEvent]:
        """Events from position ``index`` of :attr:`events` on, optionally of one kind / process."""
        if kind is None:
            return [e for e in self.events[index:] if pid is None or e.pid == pid]
        out: list[SeenEvent] = []
        for i, e in reversed(self.by_kind.get(_known(kind), [])):
            if i < index:
                break
            if pid is None or e.pid == pid:
                out.append(e)
        return out[::-1]

    def of_kind(self, kind: str) -> list[SeenEvent]:
        return [e for _, e in self.by_kind.get(_known(kind), [])]

    def last(self, kind: str, before: int | None = None, pid: int | None = None) -> SeenEvent | None:
        """The newest event of ``kind`` (of process ``pid``) before position ``before``."""
        for i, e in reversed(self.by_kind.get(_known(kind), [])):
            if (before is None or i < before) and (pid is None or e.pid == pid):
                return e
        return None

    def last_position_of(self, pid: int) -> int:
        """Position of the newest event of process ``pid`` (-1 if none)."""
        for i in range(len(self.events) - 1, -1, -1):
            if self.events[i].pid == pid:
                return i
        return -1
