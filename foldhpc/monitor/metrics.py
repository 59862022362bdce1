"""``foldhpc metrics [RUN_DIR...]``: a run's figures in the Prometheus text format, for a site's monitoring.

Everything comes from the run's records (status.json, events.jsonl, jobs.jsonl, the run lock,
config.toml; sacct for the job's state where it answers), as ``foldhpc status`` and ``goodput`` read
them: the figures say what those commands say, and no trainer is asked anything. Three ways out:

* ``foldhpc metrics RUN_DIR...`` prints them (a run dir, a sweep, or a folder of run dirs);
* ``--serve HOST:PORT`` answers Prometheus's scrapes over HTTP (127.0.0.1 unless told otherwise),
  collecting at each scrape, so a run that appears under a served folder is picked up;
* ``monitor.textfile_dir`` in the config: the process that runs the training (the supervisor where
  there is one, otherwise rank 0's trainer) rewrites ``<dir>/foldhpc-<run>-<hash>.prom`` atomically
  every ``monitor.textfile_every`` (:class:`TextfilePublisher`) for node_exporter's textfile
  collector -- the usual way to publish per-job figures on a cluster without opening a port.
  ``--textfile-dir DIR`` does the same once from the command line.

:data:`METRICS` is the metric set: name, type, labels and meaning (the README's table, the alert
rules in ``configs/prometheus/`` and ``docs/runbook.md`` use these names). Every per-run series has
the label ``run``, the run directory's absolute path (one per run: a bounded label). A figure the
records do not give is absent, never a made-up 0. Times are unix timestamps, so a rule can ask for
``time() - foldhpc_run_last_step_timestamp_seconds``: that keeps growing while a stopped trainer
writes nothing, which is how a hang outside foldhpc's own watchdog shows.

The client library (prometheus_client) renders the text; nothing here formats exposition lines.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import re
import signal
import statistics
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from foldhpc.cluster import sacct
from foldhpc.config import Config, ConfigError, load_config, parse_duration
from foldhpc.records.events import EventScan, parse_event
from foldhpc.records.exitcodes import ExitCode
from foldhpc.records.fsio import atomic_write_text
from foldhpc.records.history import read_history
from foldhpc.records.layout import CONFIG_FILE, EVENTS_FILE

log = logging.getLogger(__name__)

GAUGE, COUNTER = "gauge", "counter"


@dataclass(frozen=True)
class MetricDef:
    """One metric of the set: its name (a counter's without ``_total``: the client adds it), type,
    labels besides ``run``, and what it means (the HELP text and the README's table)."""

    name: str
    kind: str
    help: str
    labels: tuple[str, ...] = ()

    @property
    def exposed(self) -> str:
        """The name a query uses (``..._total`` for a counter)."""
        return f"{self.name}_total" if self.kind == COUNTER else self.name


#: the states ``foldhpc_run_state`` enumerates: the run's own (status.json) and Slurm's (sacct), as
#: ``foldhpc status`` shows them -- a fixed set, so the ``state`` label stays bounded
STATES = ("pending", "running", "restarting", "checkpointed", "completed", "failed", "requeued", "stopped",
          "preempted", "timeout", "cancelled", "node_fail", "out_of_memory", "held", "completing", "suspended",
          "unknown")

_DEFS = [
    MetricDef("foldhpc_run_info", GAUGE, "1 for each run; name: run.name or the run directory's name", ("name",)),
    MetricDef("foldhpc_run_state", GAUGE, "1 for the run's state now (as foldhpc status shows it), 0 for the "
              "others", ("state",)),
    MetricDef("foldhpc_run_step", GAUGE, "optimizer steps completed"),
    MetricDef("foldhpc_run_max_steps", GAUGE, "the steps the run trains for (train.max_steps)"),
    MetricDef("foldhpc_run_last_step_timestamp_seconds", GAUGE, "unix time of the newest step the records show "
              "(a progress window's end, a first step, a resume)"),
    MetricDef("foldhpc_run_seconds_since_last_step", GAUGE, "seconds from that step to the collection"),
    MetricDef("foldhpc_run_step_seconds", GAUGE, "median seconds per step over the recent progress windows"),
    MetricDef("foldhpc_run_hang_bound_seconds", GAUGE, "no step for longer than this counts as hung "
              "(monitor.hang_after)"),
    MetricDef("foldhpc_run_started_timestamp_seconds", GAUGE, "unix time the current trainer process started"),
    MetricDef("foldhpc_run_last_checkpoint_timestamp_seconds", GAUGE, "unix time the newest durable checkpoint "
              "was saved"),
    MetricDef("foldhpc_run_seconds_since_last_checkpoint", GAUGE, "seconds from that checkpoint to the "
              "collection"),
    MetricDef("foldhpc_run_last_checkpoint_step", GAUGE, "the step of the newest durable checkpoint"),
    MetricDef("foldhpc_run_checkpoint_write_seconds", GAUGE, "seconds the newest committed checkpoint took to "
              "write"),
    MetricDef("foldhpc_run_checkpoint_interval_seconds", GAUGE, "checkpoint.interval (0: no timed saves)"),
    MetricDef("foldhpc_run_restarts_in_job", GAUGE, "restarts of a crashed or hung trainer by the supervisor in "
              "the current job"),
    MetricDef("foldhpc_run_restarts", COUNTER, "resumes from a checkpoint over the run's life (requeues, "
              "follow-up jobs and in-job restarts)"),
    MetricDef("foldhpc_run_failures", COUNTER, "trainer failures: crashes and hangs a supervisor saw, failures "
              "an unsupervised trainer recorded"),
    MetricDef("foldhpc_run_requeues", COUNTER, "requeues and follow-up jobs over the run's chain of jobs"),
    MetricDef("foldhpc_run_queue_wait_seconds", GAUGE, "seconds the run has waited in the queue, all jobs"),
    MetricDef("foldhpc_run_pending_seconds", GAUGE, "seconds the current job has been pending (0 when it is "
              "not pending)"),
    MetricDef("foldhpc_run_goodput_ratio", GAUGE, "productive / allocated time (foldhpc goodput); scope: run "
              "(the whole run) or job (the current job run, else the current process start)", ("scope",)),
    MetricDef("foldhpc_run_samples_per_second", GAUGE, "training throughput of the newest progress window"),
    MetricDef("foldhpc_run_nonfinite_skipped", COUNTER, "steps skipped by the non-finite guard"),
    MetricDef("foldhpc_run_rollbacks", COUNTER, "rollbacks to a checkpoint by the non-finite guard"),
    MetricDef("foldhpc_run_lock_held", GAUGE, "1 if a live process holds the run lock (one writer per run)"),
    MetricDef("foldhpc_run_lock_holder", GAUGE, "1 for the node (host) of the run lock's holder", ("node",)),
    MetricDef("foldhpc_run_slurm_job", GAUGE, "1 for the run's current Slurm job; state: Slurm's (sacct), or "
              "unknown (slurm_job_id: Prometheus's own label job names the scrape job)", ("slurm_job_id", "state")),
    MetricDef("foldhpc_run_node_failures", COUNTER, "trainer failures attributed to a node (where the failing "
              "rank ran); 0 for each node the run is on, so that a first failure is an increase", ("node",)),
    MetricDef("foldhpc_run_metrics_timestamp_seconds", GAUGE, "unix time these figures were collected (a stale "
              "textfile shows here)"),
]
#: the metric set, by name (see :class:`MetricDef`)
METRICS: dict[str, MetricDef] = {d.name: d for d in _DEFS}

#: events.jsonl kinds that mark the step counter moving (or being set by a resume)
_STEP_KINDS = frozenset({"progress", "first_step", "resumed", "training", "rollback", "completed"})
_FAILURE_KINDS = frozenset({"supervisor_failure", "supervisor_hang"})
#: the share of the time a publishing process may spend on goodput (see :class:`RunCollector`)
GOODPUT_SHARE = 0.0005
#: progress windows kept for the median step time
_WINDOWS = 16
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


# ------------------------------------------------------------------ reading events.jsonl incrementally
@dataclass
class EventTally:
    """What the metrics need of events.jsonl, read on from where the last collection stopped (a
    file of gigabytes is read once, not at every scrape); a file that shrank is read afresh."""

    path: Path
    offset: int = 0
    last_step: tuple[float, int] | None = None  # (t, step) of the newest step-moving record
    windows: deque[tuple[int, float, int]] = field(default_factory=lambda: deque(maxlen=_WINDOWS))  # pid, t, step
    write_s: float | None = None  # newest checkpoint_committed's
    failures: int = 0
    node_failures: Counter[str] = field(default_factory=Counter)
    supervised_pids: set[int] = field(default_factory=set)
    unsupervised_failed: list[int] = field(default_factory=list)  # pids of trainers' "failed" records
    nonfinite_skips: int = 0
    rollbacks: int = 0
    scan: EventScan = field(default_factory=EventScan)

    def read(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(0, 2)
                size = f.tell()
                if size < self.offset:  # replaced or truncated: start again
                    self.__init__(self.path)  # type: ignore[misc]
                f.seek(self.offset)
                for line in f:
                    if not line.endswith(b"\n"):
                        break  # a record being written: read it next time
                    self.offset += len(line)
                    if line.strip():
                        self._add(line)
        except FileNotFoundError:
            return

    def _add(self, line: bytes) -> None:
        ev = parse_event(line, self.scan)
        if ev is None:
            return
        k = ev.kind
        if k in _STEP_KINDS:
            step = ev.get("step", ev.get("first", ev.get("to")))
            if isinstance(step, int) and not isinstance(step, bool):
                self.last_step = (ev.t, step)
            if k == "progress" and isinstance(ev.get("step"), int):
                self.windows.append((ev.pid, ev.t, ev["step"]))
        elif k == "checkpoint_committed" and isinstance(ev.get("write_s"), (int, float)):
            self.write_s = float(ev["write_s"])
        elif k in _FAILURE_KINDS:
            self.failures += 1
            node = ev.get("node")
            if isinstance(node, str) and node:
                self.node_failures[node] += 1
        elif k == "supervisor_spawn":
            self.supervised_pids.update(p for p in ev.get("pids") or [] if isinstance(p, int))
        elif k == "failed":
            self.unsupervised_failed.append(ev.pid)
        elif k == "nonfinite_skip":
            self.nonfinite_skips += 1
        elif k == "rollback":
            self.rollbacks += 1

    @property
    def total_failures(self) -> int:
        """The supervisor's failure and hang records, plus the failures of trainers no supervisor
        ran (a supervised one's own "failed" record is the same failure)."""
        return self.failures + sum(1 for p in self.unsupervised_failed if p not in self.supervised_pids)

    def step_seconds(self) -> float | None:
        """Median seconds per step of consecutive progress windows of one process."""
        per: list[float] = []
        w = list(self.windows)
        for (p0, t0, s0), (p1, t1, s1) in zip(w, w[1:]):
            if p0 == p1 and s1 > s0 and t1 >= t0:
                per.append((t1 - t0) / (s1 - s0))
        return statistics.median(per) if per else None


# ------------------------------------------------------------------ one run's figures
@dataclass
class RunFigures:
    """The figures of one run at one collection; None = unknown (the series is left out)."""

    run: str
    name: str
    state: str
    collected_at: float
    step: int | None = None
    max_steps: int | None = None
    last_step_at: float | None = None
    step_s: float | None = None
    hang_bound_s: float | None = None
    started_at: float | None = None
    checkpoint_at: float | None = None
    checkpoint_step: int | None = None
    checkpoint_write_s: float | None = None
    checkpoint_interval_s: float | None = None
    in_job_restarts: int | None = None
    restarts: int | None = None
    failures: int = 0
    requeues: int = 0
    queue_wait_s: float | None = None
    pending_s: float | None = None
    goodput_run: float | None = None
    goodput_job: float | None = None
    samples_per_s: float | None = None
    nonfinite_skipped: int | None = None
    rollbacks: int | None = None
    lock_node: str | None = None
    lock_held: bool | None = None
    job_id: str | None = None
    job_state: str | None = None
    node_failures: dict[str, int] = field(default_factory=dict)
    nodes: list[str] = field(default_factory=list)  # where the run is now (its ranks' nodes, else the lock's)
    notes: list[str] = field(default_factory=list)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def run_config(run_dir: Path) -> Config:
    """The run's config.toml (the resolved config of its latest start); the defaults if it has none
    or it does not load (an older or newer foldhpc wrote it)."""
    path = run_dir / CONFIG_FILE
    if path.is_file():
        try:
            return load_config(path)
        except (ConfigError, OSError, ValueError) as e:
            log.debug("%s: %s; the metrics use the defaults", path, e)
    return Config()


def hang_bound_s(cfg: Config, step_s: float | None) -> float:
    """``monitor.hang_after``: a duration, or "auto" = ``fault.hang_timeout`` where that is a
    duration (and not 0), else the larger of ``fault.hang_floor``, 20 steps and 3 log windows
    (the records move once a window)."""
    if cfg.monitor.hang_after != "auto":
        return parse_duration(cfg.monitor.hang_after)
    if cfg.fault.hang_timeout != "auto" and parse_duration(cfg.fault.hang_timeout) > 0:
        return parse_duration(cfg.fault.hang_timeout)
    floor = parse_duration(cfg.fault.hang_floor)
    if step_s is None:
        return floor
    return max(floor, 20 * step_s, 3 * cfg.run.log_every * step_s)


class RunCollector:
    """Collects one run's figures; keeps its events.jsonl position between collections."""

    def __init__(self, run_dir: Path, cfg: Config | None = None, use_sacct: bool = True,
                 current_job: str | None = None, goodput_share: float | None = None) -> None:
        self.run_dir = Path(run_dir).absolute()
        self.cfg = cfg
        self.use_sacct = use_sacct
        self.current_job = current_job  # the Slurm job this process runs in: its state is RUNNING
        self.tally = EventTally(self.run_dir / EVENTS_FILE)
        # goodput rebuilds the run's whole timeline (4.1 s for 100k records: docs/measurements/
        # metrics-2026-12-03.md): with a share, it is recomputed only once its last cost is at most that share
        # of the time since, and the previous figures are published meanwhile; None: every time
        self.goodput_share = goodput_share
        self._goodput: tuple[float, float, float | None, float | None, float | None] | None = None  # at, cost, ...

    def collect(self, job: sacct.SlurmJob | None = None, now: float | None = None, final: bool = False) -> RunFigures:
        """The run's figures now; ``job``: sacct's record of its current job (None: local view);
        ``final``: the last collection of a publisher (goodput recomputed whatever it costs)."""
        from foldhpc.monitor import goodput, report
        from foldhpc.resilience import runlock

        now = time.time() if now is None else now
        cfg = self.cfg or run_config(self.run_dir)
        view = report.read_run(self.run_dir)
        if job is not None:
            report.merge(view, job)
        else:
            report.merge(view, None)
            if view.job_id and self.current_job == view.job_id and view.state == sacct.UNKNOWN:
                view.state = sacct.RUNNING
        status: dict[str, Any] = {}
        try:
            from foldhpc.records.status import read_status
            status = read_status(self.run_dir) or {}
        except (OSError, ValueError):
            pass
        self.tally.read()
        t = self.tally
        fig = RunFigures(run=str(self.run_dir), name=cfg.run.name or self.run_dir.name,
                         state=view.state if view.state in STATES else sacct.UNKNOWN, collected_at=now,
                         notes=list(view.notes))
        fig.max_steps = view.max_steps
        fig.step = view.step
        updated = _num(status.get("updated_at"))
        if t.last_step is not None and (fig.step is None or updated is None or t.last_step[0] >= updated):
            fig.step = t.last_step[1]
        fig.last_step_at = t.last_step[0] if t.last_step is not None else None
        fig.step_s = t.step_seconds()
        fig.hang_bound_s = hang_bound_s(cfg, fig.step_s)
        fig.started_at = _num(status.get("started_at"))
        ck = view.last_checkpoint or {}
        fig.checkpoint_at, fig.checkpoint_step = _num(ck.get("saved_at")), _int(ck.get("step"))
        fig.checkpoint_write_s = t.write_s
        fig.checkpoint_interval_s = parse_duration(cfg.checkpoint.interval)
        fig.in_job_restarts = view.in_job_restarts
        fig.restarts = view.run_restarts
        fig.failures = t.total_failures
        fig.node_failures = dict(t.node_failures)
        fig.samples_per_s = _num(status.get("samples_per_s"))
        nf = status.get("nonfinite")
        if isinstance(nf, dict):  # the guard's own count, carried by the checkpoints across restarts
            fig.nonfinite_skipped = _int(nf.get("skipped"))
            rb = nf.get("rollbacks")
            fig.rollbacks = len(rb) if isinstance(rb, list) else _int(rb)
        elif t.last_step is not None:  # a foldhpc loop ran and recorded no summary: its events say
            fig.nonfinite_skipped, fig.rollbacks = t.nonfinite_skips, t.rollbacks
        try:
            history, _ = read_history(self.run_dir)
        except (OSError, ValueError):
            history = []
        kinds = Counter(str(e.get("event")) for e in history)
        fig.requeues = kinds["requeued"] + kinds["followup"]
        # a Slurm job that failed without a trainer's record of it (killed outright, unsupervised): the
        # larger of the two counts, as each failure of the trainer fails its job too where none restarts it
        fig.failures = max(fig.failures, kinds["failed"])
        fig.job_id = view.job_id
        if view.job_id:
            fig.job_state = view.state if job is not None or self.current_job == view.job_id else sacct.UNKNOWN
        if view.state in (sacct.PENDING, sacct.REQUEUED) and view.job_id:
            since = [e["time"] for e in history if str(e.get("job_id")) == view.job_id
                     and e.get("event") in ("submitted", "requeued") and isinstance(e.get("time"), (int, float))]
            fig.pending_s = max(0.0, now - max(since)) if since else None
        else:
            fig.pending_s = 0.0
        last = self._goodput
        mono = time.monotonic()
        if last is None or final or self.goodput_share is None or mono - last[0] >= last[1] / self.goodput_share:
            try:
                g = goodput.goodput_of(self.run_dir, use_sacct=self.use_sacct and job is not None)
                rows = g.jobs or g.processes
                last = (mono, time.monotonic() - mono, g.goodput, rows[-1].goodput if rows else None,
                        g.seconds.get("queue_wait"))
            except (FileNotFoundError, OSError, ValueError) as e:
                fig.notes.append(f"goodput: {e}")
                last = (mono, time.monotonic() - mono, None, None, None)
            self._goodput = last
        fig.goodput_run, fig.goodput_job, fig.queue_wait_s = last[2], last[3], last[4]
        holder = runlock.read_holder(self.run_dir)
        if holder is not None:
            stale = parse_duration(cfg.fault.lock_stale_after) or float("inf")
            fig.lock_held = float(holder.get("heartbeat_age_s") or 0.0) < stale
            fig.lock_node = str(holder.get("node") or holder.get("host") or "") or None
        else:
            fig.lock_held = False
        ranks = status.get("ranks")
        if isinstance(ranks, list):
            fig.nodes = sorted({str(r["node"]) for r in ranks if isinstance(r, dict) and r.get("node")})
        if not fig.nodes and fig.lock_held and fig.lock_node:
            fig.nodes = [fig.lock_node]
        return fig


# ------------------------------------------------------------------ rendering
def families(figs: Iterable[RunFigures]) -> Iterator[Metric]:
    """The metric families of these runs (each family once, every run a series of it)."""
    figs = list(figs)
    fam: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
    for d in _DEFS:
        cls = CounterMetricFamily if d.kind == COUNTER else GaugeMetricFamily
        fam[d.name] = cls(d.name, d.help, labels=("run", *d.labels))

    def put(name: str, value: float | None, *labels: str, run: str) -> None:
        if value is not None:
            fam[name].add_metric([run, *labels], float(value))

    for f in figs:
        r = f.run
        put("foldhpc_run_info", 1, f.name, run=r)
        for s in STATES:
            put("foldhpc_run_state", 1 if s == f.state else 0, s, run=r)
        put("foldhpc_run_step", f.step, run=r)
        put("foldhpc_run_max_steps", f.max_steps, run=r)
        put("foldhpc_run_last_step_timestamp_seconds", f.last_step_at, run=r)
        put("foldhpc_run_seconds_since_last_step",
            None if f.last_step_at is None else max(0.0, f.collected_at - f.last_step_at), run=r)
        put("foldhpc_run_step_seconds", f.step_s, run=r)
        put("foldhpc_run_hang_bound_seconds", f.hang_bound_s, run=r)
        put("foldhpc_run_started_timestamp_seconds", f.started_at, run=r)
        put("foldhpc_run_last_checkpoint_timestamp_seconds", f.checkpoint_at, run=r)
        put("foldhpc_run_seconds_since_last_checkpoint",
            None if f.checkpoint_at is None else max(0.0, f.collected_at - f.checkpoint_at), run=r)
        put("foldhpc_run_last_checkpoint_step", f.checkpoint_step, run=r)
        put("foldhpc_run_checkpoint_write_seconds", f.checkpoint_write_s, run=r)
        put("foldhpc_run_checkpoint_interval_seconds", f.checkpoint_interval_s, run=r)
        put("foldhpc_run_restarts_in_job", f.in_job_restarts, run=r)
        put("foldhpc_run_restarts", f.restarts, run=r)
        put("foldhpc_run_failures", f.failures, run=r)
        put("foldhpc_run_requeues", f.requeues, run=r)
        put("foldhpc_run_queue_wait_seconds", f.queue_wait_s, run=r)
        put("foldhpc_run_pending_seconds", f.pending_s, run=r)
        put("foldhpc_run_goodput_ratio", f.goodput_run, "run", run=r)
        put("foldhpc_run_goodput_ratio", f.goodput_job, "job", run=r)
        put("foldhpc_run_samples_per_second", f.samples_per_s, run=r)
        put("foldhpc_run_nonfinite_skipped", f.nonfinite_skipped, run=r)
        put("foldhpc_run_rollbacks", f.rollbacks, run=r)
        put("foldhpc_run_lock_held", None if f.lock_held is None else int(f.lock_held), run=r)
        if f.lock_node and f.lock_held:
            put("foldhpc_run_lock_holder", 1, f.lock_node, run=r)
        if f.job_id:
            put("foldhpc_run_slurm_job", 1, f.job_id, f.job_state or sacct.UNKNOWN, run=r)
        for node, n in sorted({**dict.fromkeys(f.nodes, 0), **f.node_failures}.items()):
            put("foldhpc_run_node_failures", n, node, run=r)
        put("foldhpc_run_metrics_timestamp_seconds", f.collected_at, run=r)
    yield from fam.values()


class _Figures(Collector):
    def __init__(self, figs: list[RunFigures]) -> None:
        self.figs = figs

    def collect(self) -> Iterator[Metric]:
        return families(self.figs)


def render(figs: list[RunFigures]) -> bytes:
    """The Prometheus text exposition of these runs."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Figures(figs))
    return generate_latest(reg)


# ------------------------------------------------------------------ many runs, sacct once
class Collection(Collector):
    """The runs named by paths (a run dir, a sweep, a folder of run dirs; rediscovered at every
    collection), collected together with one sacct query for all their jobs; a prometheus_client
    collector, so ``--serve`` collects at each scrape."""

    def __init__(self, paths: list[Path], use_sacct: bool = True) -> None:
        self.paths = [Path(p) for p in paths]
        self.use_sacct = use_sacct
        self.collectors: dict[Path, RunCollector] = {}
        self.notes: list[str] = []

    def run_dirs(self) -> list[Path]:
        from foldhpc.monitor import report
        from foldhpc.slurm.sweep import task_dirs

        out: list[Path] = []
        for p in self.paths:
            tasks = task_dirs(p) if p.is_dir() else None
            if tasks is not None:
                out += tasks
            elif report.is_run_dir(p):
                out.append(p)
            elif p.is_dir():
                out += report.find_runs(p)
        return list(dict.fromkeys(x.absolute() for x in out))  # each once, in order

    def figures(self) -> list[RunFigures]:
        from foldhpc.monitor import report

        dirs = self.run_dirs()
        for d in dirs:
            if d not in self.collectors:
                self.collectors[d] = RunCollector(d, use_sacct=self.use_sacct)
        jobs: dict[str, sacct.SlurmJob] = {}
        current = {d: report.read_run(d).job_id for d in dirs} if self.use_sacct else {}
        ids = [j for j in current.values() if j]
        if ids:
            q = sacct.query_jobs(ids)
            jobs, self.notes = q.jobs, q.notes
        return [self.collectors[d].collect(jobs.get(current.get(d) or "")) for d in dirs]

    def collect(self) -> Iterator[Metric]:
        return families(self.figures())


# ------------------------------------------------------------------ the textfile
def textfile_path(textfile_dir: Path, run_dir: Path, name: str) -> Path:
    """``<dir>/foldhpc-<name>-<hash of the absolute run dir>.prom``: one file per run, several runs
    on one node never share one, and the name says which run it is."""
    digest = hashlib.sha256(str(Path(run_dir).absolute()).encode()).hexdigest()[:10]
    return Path(textfile_dir) / f"foldhpc-{_SAFE.sub('_', name)[:60]}-{digest}.prom"


def write_textfile(path: Path, text: bytes) -> None:
    """Atomically (a temporary beside it, then rename: node_exporter never reads half a file, and
    reads only ``*.prom``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text.decode("utf-8"), fsync=False)


class TextfilePublisher:
    """Rewrites the run's textfile every ``monitor.textfile_every`` in a daemon thread, and once more
    when it stops (the final state). Used as a context manager around the training (or the
    supervision). It never raises into training: a failed collection or write is logged once per
    outage and retried at the next tick. ``seconds`` holds how long each publication took (for the
    benchmark of its cost)."""

    def __init__(self, cfg: Config, current_job: str | None = None) -> None:
        self.cfg = cfg
        self.every = parse_duration(cfg.monitor.textfile_every)
        self.collector = RunCollector(cfg.run_dir, cfg=cfg, use_sacct=False, current_job=current_job,
                                      goodput_share=GOODPUT_SHARE)
        self.path = textfile_path(Path(cfg.monitor.textfile_dir), cfg.run_dir, cfg.run.name or cfg.run_dir.name)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failing = False
        self.seconds: list[float] = []

    def publish(self, final: bool = False) -> None:
        t0 = time.perf_counter()
        try:
            write_textfile(self.path, render([self.collector.collect(final=final)]))
        except Exception as e:  # noqa: BLE001 - monitoring must never end a training run
            if not self.failing:
                log.warning("cannot publish the run's metrics to %s (%s): training goes on; retried every %s",
                            self.path, e, self.cfg.monitor.textfile_every)
            self.failing = True
            return
        if self.failing:
            log.info("the run's metrics are published to %s again", self.path)
        self.failing = False
        self.seconds.append(time.perf_counter() - t0)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.publish()

    def __enter__(self) -> TextfilePublisher:
        self.publish()
        self._thread = threading.Thread(target=self._loop, name="foldhpc-metrics", daemon=True)
        self._thread.start()
        log.info("metrics: %s every %s", self.path, self.cfg.monitor.textfile_every)
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.publish(final=True)


# ------------------------------------------------------------------ the command
def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--serve {text!r}: give HOST:PORT or PORT, e.g. --serve 127.0.0.1:9464")
    return host.strip("[]") or "127.0.0.1", int(port)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="*", metavar="RUN_DIR",
                   help="run directories, sweeps or folders of run directories (default: ./runs)")
    p.add_argument("--serve", metavar="HOST:PORT",
                   help="answer Prometheus scrapes at http://HOST:PORT/metrics until interrupted (HOST defaults to "
                        "127.0.0.1: give 0.0.0.0 to listen on every interface)")
    p.add_argument("--textfile-dir", metavar="DIR",
                   help="write each run's foldhpc-<run>-<hash>.prom into DIR (node_exporter's textfile collector) "
                        "instead of printing")
    p.add_argument("--no-sacct", action="store_true", help="do not ask sacct for the jobs' states")


def run(args: argparse.Namespace) -> int:
    from foldhpc.monitor.report import DEFAULT_RUNS_ROOT

    paths = [Path(p) for p in args.paths] or [DEFAULT_RUNS_ROOT]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        print(f"foldhpc metrics: no such run directory: {', '.join(missing)}", file=sys.stderr)
        return ExitCode.USAGE
    coll = Collection(paths, use_sacct=not args.no_sacct)
    if args.serve:
        return _serve(coll, *_host_port(args.serve))
    figs = coll.figures()
    if args.textfile_dir:
        for f in figs:
            path = textfile_path(Path(args.textfile_dir), Path(f.run), f.name)
            write_textfile(path, render([f]))
            print(path)
        return 0
    sys.stdout.write(render(figs).decode("utf-8"))
    return 0


def _serve(coll: Collection, host: str, port: int) -> int:
    from prometheus_client import start_http_server

    reg = CollectorRegistry(auto_describe=False)
    reg.register(coll)
    try:
        server, thread = start_http_server(port, addr=host, registry=reg)
    except OSError as e:
        print(f"foldhpc metrics: cannot listen on {host}:{port}: {e.strerror or e}", file=sys.stderr)
        return ExitCode.USAGE
    log.info("serving the metrics of %s at http://%s:%d/metrics", ", ".join(map(str, coll.paths)), host,
             server.server_port)
    done = threading.Event()
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda *_: done.set())
    done.wait()
    server.shutdown()
    thread.join(timeout=5)
    return 0
