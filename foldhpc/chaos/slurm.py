"""The Slurm backend of ``foldhpc chaos``: one real training run submitted to a Slurm cluster.

The run is submitted once with ``foldhpc submit`` (submitit, the user's core path) and from then
on Slurm and foldhpc carry it: the chaos runner only does what the world does to a job -- a
user's or the time limit's signal (``scancel --signal=USR1``), a real partition preemption (a
high-priority job that needs the node), an admin's ``scontrol requeue``, a crash of the trainer
process, a node that goes bad under the job (``bad_node``), a node that dies under the job
(``node_down``), a user's plain ``scancel`` -- and checks what foldhpc made of it, from ``events.jsonl`` and
``jobs.jsonl``: the next job (a follow-up in chain mode, the same job requeued) resumed from the
checkpoint saved on the signal (0 steps lost), a crash was restarted inside the allocation from
the newest durable checkpoint, an ``scancel`` ended the run (no follow-up, no requeue: the runner
then resubmits, as the user would), and never were two jobs of the run running at once.

The reference is the same training run locally without faults (:class:`~foldhpc.chaos.local.
LocalRunner`), so the final digest check is the same as the local backend's. Needs ``sbatch`` and
friends on PATH and a cluster whose jobs see this machine's file system (the local test cluster:
``tests/slurm/cluster.sh``); the trainer processes must run on this host for the ``crash`` kind.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from foldhpc.chaos.local import START_TIMEOUT_S, ChaosOutcome, FaultRecord, Launch, LocalRunner, RunOutcome, \
    WaitTimeout, final_state
from foldhpc.chaos.schedule import Plan, PlannedFault

log = logging.getLogger(__name__)

#: what a Slurm job of the chaos run asks for unless the user's --set says otherwise (small: the
#: tiny config on the local test cluster)
SLURM_DEFAULTS: dict[str, str] = {"slurm.cpus_per_task": "1", "slurm.mem": "2G", "slurm.time": "30m",
                                  "slurm.signal_lead": "60s", "fault.hang_timeout": "auto"}
#: after a user's scancel, how long the runner watches for a wrongful follow-up or requeue
SCANCEL_QUIET_S = 8.0
#: a job of the run taking longer than this to run again after a fault is a failure (the promise)
RESUME_LIMIT_S = 180.0
CMD_TIMEOUT_S = 60.0
#: node_down: a node taken out is RESUMEd once the run trains again elsewhere, or after this long
#: if it has not (the job cannot run anywhere else: one node left and it excluded, or busy)
NODE_BACK_AFTER_S = 30.0


def _cmd(*args: str, check: bool = True) -> str:
    p = subprocess.run(list(args), capture_output=True, text=True, timeout=CMD_TIMEOUT_S, stdin=subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({p.returncode}): {(p.stderr or p.stdout).strip()[-500:]}")
    return p.stdout


class SlurmRunner(LocalRunner):
    """The chaos run as Slurm jobs; the reference and the log reading are the local runner's."""

    def __init__(self, config: str | None, overrides: list[str], plan: Plan, out: Path, *,
                 partition: str = "", preempt_partition: str = "high", **kwargs: Any) -> None:
        super().__init__(config, overrides, plan, Path(out).resolve(), **kwargs)  # jobs run elsewhere: absolute
        self.settings.update({k: v for k, v in SLURM_DEFAULTS.items()})
        if partition:
            self.settings["slurm.partition"] = partition
        self.preempt_partition = preempt_partition
        self.preemptors: list[str] = []
        self.max_running = 0  # the most jobs of the run seen RUNNING at once since the last fault (must stay 1)
        self.peak_running = 0  # ... over the whole run
        # bad_node: a node is bad while <out>/bad_nodes/<node> exists. The job's environment is fixed
        # at its submission (FOLDHPC_FAIL_HEALTH_ON_NODE cannot name a node later), so the runner
        # makes the health check's site command (health.command, run with FOLDHPC_HEALTH_NODE set)
        # look for the marker; only where the plan has the kind (no extra process at other starts)
        self.bad_dir = self.out / "bad_nodes"
        self.downed: set[str] = set()  # node_down: nodes taken out and not yet RESUMEd (restored whatever happens)
        if any(f.kind == "bad_node" for f in plan.faults):
            self.settings["health.command"] = f'test ! -e "{self.bad_dir}/$FOLDHPC_HEALTH_NODE"'

    # ------------------------------------------------------------------ Slurm side
    def _submit(self, first_fault: int, why: str) -> str:
        cmd = [self.python, "-m", "foldhpc", "submit"]
        if self.config:
            cmd += ["--config", self.config]
        for o in self.overrides(self.run_dir):
            cmd += ["--set", o]
        env = self._env({}, nan=False)
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=CMD_TIMEOUT_S, env=env,
                           stdin=subprocess.DEVNULL)
        m = re.search(r"submitted job (\S+)", p.stdout)
        if p.returncode != 0 or not m:
            raise RuntimeError(f"foldhpc submit failed ({p.returncode}): {(p.stderr or p.stdout).strip()[-800:]}")
        job = m.group(1)
        self.launches.append(Launch(time.time(), 0, first_fault, {}, why=f"job {job}: {why}"))
        log.info("chaos: submitted job %s (%s)", job, why)
        return job

    def _events(self) -> list[dict[str, Any]]:
        from foldhpc.records.history import read_history

        try:
            return read_history(self.run_dir)[0]
        except (OSError, ValueError):
            return []

    def _run_jobs(self) -> list[str]:
        """Every job id the run has had (submitted by the runner, a follow-up, or one requeued)."""
        return list(dict.fromkeys(str(e["job_id"]) for e in self._events() if e.get("job_id")))

    def _states(self) -> dict[str, str]:
        jobs = self._run_jobs()
        if not jobs:
            return {}
        out = _cmd("squeue", "--noheader", "--format=%i %T", "--jobs", ",".join(jobs), check=False)
        states = dict(line.split()[:2] for line in out.splitlines() if len(line.split()) >= 2)
        running = sum(1 for s in states.values() if s == "RUNNING")
        self.max_running = max(self.max_running, running)
        self.peak_running = max(self.peak_running, running)
        return states

    def _current_job(self) -> str:
        started = [str(e["job_id"]) for e in self._events() if e.get("event") == "started" and e.get("job_id")]
        if not started:
            raise RuntimeError("no job of the run has started")
        return started[-1]

    def _poll(self) -> None:
        """Between log polls: watch the run's jobs (at most one may run)."""
        self._states()

    def _wait(self, pred: Callable[[], Any], timeout: float, what: str, allow_exit: bool = False) -> Any:
        last = [0.0]

        def check() -> Any:
            if time.monotonic() - last[0] > 0.5:  # squeue twice a second, the log every few ms
                last[0] = time.monotonic()
                self._poll()
            return pred()
        return super()._wait(check, timeout, what, allow_exit)

    def _trainer_pid(self, check_parent: bool = True) -> int:  # noqa: ARG002
        """The running trainer (rank 0): the process that logged the newest "first step". Its
        parent is its job's supervisor, not a process of the runner; it must run on this host
        (the local test cluster) for the ``crash`` kind, which the local runner's handler injects."""
        ev = self.tail.last("first_step")
        if ev is None:
            raise RuntimeError("no trainer has started yet")
        try:
            os.kill(ev.pid, 0)
        except ProcessLookupError:
            raise RuntimeError(f"trainer pid {ev.pid} is not on this host (the crash kind needs the jobs here)") from None
        return ev.pid

    def _new_first_step(self, index: int, old_pid: int, what: str) -> Any:
        """The first step done by a trainer other than ``old_pid`` after log position ``index``."""
        return self._wait(lambda: next((e for e in self.tail.since(index, "first_step") if e.pid != old_pid), None),
                          RESUME_LIMIT_S, what)

    # ------------------------------------------------------------------ fault kinds
    def _signal_like(self, f: PlannedFault, rec: FaultRecord) -> None:
        """scancel_signal, whole_job_signal, preempt, requeue: the job saves on its signal and the run goes
        on by itself."""
        self._wait_step(f.at_step)
        job, trainer = self._current_job(), self._trainer_pid()
        index = len(self.tail.events)
        rec.injected_at = time.time()
        if f.kind == "scancel_signal":
            _cmd("scancel", "--signal=USR1", job)
            how = "scancel --signal=USR1"
        elif f.kind == "whole_job_signal":
            _cmd("scancel", "--full", "--signal=USR1", job)
            how = "scancel --full --signal=USR1"
        elif f.kind == "requeue":
            _cmd("scontrol", "requeue", job)
            how = "scontrol requeue"
        else:
            info = _cmd("scontrol", "show", "job", "--oneliner", job)
            node = re.search(r"\bNodeList=(\S+)", info).group(1)  # type: ignore[union-attr]
            cpus = re.search(r"\bCPUTot=(\d+)", _cmd("scontrol", "show", "node", "--oneliner", node)).group(1)  # type: ignore[union-attr]
            hi = _cmd("sbatch", "--parsable", f"--partition={self.preempt_partition}", f"--nodelist={node}",
                      f"--cpus-per-task={cpus}", "--mem=100M", "--output=/dev/null", "--wrap=sleep 3").strip()
            self.preemptors.append(hi.split(";")[0])
            how = f"preemption by job {hi} on {node}"
        saves = self._wait(lambda: [e for e in self.tail.since(index, "signal") if e.pid == trainer] or None,
                           60.0, f"the checkpoint on the signal ({how})")
        rec.step = saves[-1].step
        first = self._new_first_step(index, trainer, f"the run to resume after {how}")
        self._resumed(rec, index, first)
        nxt = self._current_job()
        rec.notes.append(f"{how}: job {job} -> {'follow-up ' + nxt if nxt != job else 'requeued'}")
        if rec.steps_lost not in (0, None):
            rec.problems.append(f"{rec.steps_lost} steps lost after {how}; a signal must lose none")
        rec.resume_measure = "fault -> first step of the trainer in the next job"

    def _bad_node(self, f: PlannedFault, rec: FaultRecord) -> None:
        """bad_node: the job's node fails its health check from now on and the trainer crashes; the
        supervisor's check before the restart finds the node bad, the job hands the run over (chain:
        a follow-up with ``--exclude``; requeue: ``ExcNodeList``) and the run resumes elsewhere. The
        marker is removed once the run trains again (the node "repaired"): the run's records keep
        it excluded for the rest of the chain all the same."""
        self._wait_step(f.at_step)
        job, trainer = self._current_job(), self._trainer_pid()
        node = _job_field(job, "NodeList")
        if not node or node == "(null)" or "," in node or "[" in node:
            raise RuntimeError(f"bad_node needs a one-node job on a known node; job {job} has NodeList={node!r}")
        index = len(self.tail.events)
        marker = self.bad_dir / node
        self.bad_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"made bad by foldhpc chaos (fault {f.index}) at {time.time():.3f}\n")
        rec.injected_at = time.time()
        try:
            os.kill(trainer, signal.SIGKILL)
            first = self._new_first_step(index, trainer, f"the run to resume off the bad node {node}")
        finally:
            marker.unlink(missing_ok=True)
        rec.step = self._last_progress(trainer)
        rec.newest_durable_step = self._newest_good(index)
        self._resumed(rec, index, first)
        self._check_kill_bounds(rec)
        nxt = self._current_job()
        found = [e for e in self.tail.since(index, "node_unhealthy") if e.event.get("node") == node]
        if not found:
            rec.problems.append(f"no node_unhealthy record for {node} after it went bad")
        where = _job_field(nxt, "NodeList")
        excluded = _job_field(nxt, "ExcNodeList")
        if where == node:
            rec.problems.append(f"the run resumed on the bad node {node} (job {nxt})")
        if node not in (excluded or "").split(","):
            rec.problems.append(f"job {nxt} does not exclude the bad node {node} (ExcNodeList={excluded!r})")
        rec.notes.append(f"bad node {node}: job {job} -> {'follow-up ' + nxt if nxt != job else 'requeued'} on "
                         f"{where}, ExcNodeList={excluded}")
        rec.resume_measure = "node made bad + SIGKILL of the trainer -> first step of the trainer on another node"

    def _node_down(self, f: PlannedFault, rec: FaultRecord) -> None:
        """node_down: the job's node dies. Its processes stop (SIGSTOP: a dead node does nothing
        more, the batch shell included, so the job cannot end on its own first), the foldhpc ones
        are SIGKILLed, the node is set DOWN (slurmctld: NODE_FAIL, the job requeued: ``foldhpc
        submit`` sets ``--requeue``) and DRAINed to keep it out (a DOWN node whose slurmd answers is
        back at once here: ReturnToService=2), then the batch shell is killed too. Nothing of
        foldhpc survives on the node to save or decide. The run must come back by itself from the
        newest durable checkpoint: on another node, or on this one once it is RESUMEd (after
        :data:`NODE_BACK_AFTER_S` if the run has not resumed elsewhere by then)."""
        self._wait_step(f.at_step)
        job, trainer = self._current_job(), self._trainer_pid()
        nodes = _hostnames(_job_field(job, "NodeList"))
        if not nodes:
            raise RuntimeError(f"node_down needs a job on known nodes; job {job} has none")
        node = nodes[-1]  # one node: its node; several: one that is not the batch host, rank 0 lives on
        reason = f"foldhpc chaos: node_down (fault {f.index})"
        index = len(self.tail.events)
        self.downed.add(node)
        back_at: list[float] = []
        stopped: list[int] = []  # stopped and not killed yet (killed in the finally if a command failed)
        try:
            shells, others = _stop_job_processes(job, node)
            stopped += shells + others
            if not stopped:
                raise RuntimeError(f"no process of job {job} on {node} (node_down needs the jobs on this host)")
            rec.injected_at = time.time()
            for pid in others:
                _kill(pid)
                stopped.remove(pid)
            _cmd("scontrol", "update", f"NodeName={node}", "State=DOWN", f"Reason={reason}")
            _cmd("scontrol", "update", f"NodeName={node}", "State=DRAIN", f"Reason={reason}")
            while stopped:
                _kill(stopped.pop())
            t_out = time.time()
            self.tail.poll()
            rec.step = self._last_progress(trainer)
            rec.newest_durable_step = self._newest_good()

            def resumed() -> Any:
                ev = next((e for e in self.tail.since(index, "first_step") if e.pid != trainer), None)
                if ev is None and not back_at and time.time() - t_out > NODE_BACK_AFTER_S:
                    self._node_back(node)
                    back_at.append(time.time())
                return ev
            first = self._wait(resumed, RESUME_LIMIT_S, f"the run to resume after {node} went down")
        finally:
            while stopped:
                _kill(stopped.pop())
            self._node_back(node)
        self._resumed(rec, index, first)
        self._check_kill_bounds(rec)
        nxt = self._current_job()
        where = _job_field(nxt, "NodeList")
        states, deadline = _sacct_states(job), time.monotonic() + 30.0  # sacct lags slurmctld a little
        while nxt == job and "NODE_FAIL" not in states and time.monotonic() < deadline:
            time.sleep(1.0)
            states = _sacct_states(job)
        if nxt == job and "NODE_FAIL" not in states:
            rec.problems.append(f"job {job} lost {node} but sacct shows no NODE_FAIL: {states}")
        if not back_at and where == node:
            rec.problems.append(f"the run resumed on {node} while it was DOWN/DRAINED (job {nxt})")
        how = f"requeued by Slurm ({' -> '.join(states)})" if nxt == job else f"follow-up {nxt}"
        back = (f", {node} RESUMEd {back_at[0] - rec.injected_at:.1f}s after it went down" if back_at else
                f" while {node} was out")
        rec.notes.append(f"node {node} down: {len(shells) + len(others)} processes of job {job} there killed; "
                         f"job {job} {how} -> resumed on {where}{back}")
        rec.resume_measure = "node processes killed + node DOWN -> first step of the trainer in the requeued job"

    def _node_back(self, node: str) -> None:
        """RESUME a node node_down took out (a second call does nothing)."""
        if node not in self.downed:
            return
        _cmd("scontrol", "update", f"NodeName={node}", "State=RESUME", check=False)
        self.downed.discard(node)
        state = _cmd("sinfo", "--noheader", "--node", node, "--format=%t", check=False).split()
        log.info("chaos: node %s RESUMEd (sinfo: %s)", node, ",".join(state) or "?")

    def _scancel(self, f: PlannedFault, rec: FaultRecord) -> None:
        self._wait_step(f.at_step)
        job, trainer = self._current_job(), self._trainer_pid()
        jobs_before = set(self._run_jobs())
        index = len(self.tail.events)
        rec.injected_at = time.time()
        _cmd("scancel", job)
        saves = self._wait(lambda: [e for e in self.tail.since(index, "signal") if e.pid == trainer] or None,
                           60.0, "the checkpoint on scancel's SIGTERM")
        rec.step = saves[-1].step
        self._wait(lambda: not self._states() or None, 60.0, f"job {job} to end")
        time.sleep(SCANCEL_QUIET_S)
        self.tail.poll()
        states, new = self._states(), set(self._run_jobs()) - jobs_before
        if states or new or any(e.kind == "first_step" for e in self.tail.since(index)):
            rec.problems.append(f"the run went on after scancel of job {job}: jobs {sorted(new)} new, "
                                f"{states} in the queue")
            return
        rec.notes.append(f"scancel {job} ended the run (no follow-up, no requeue in {SCANCEL_QUIET_S:.0f}s); "
                         "resubmitted")
        index = len(self.tail.events)
        t_resubmit = time.time()
        self._submit(f.index + 1, "resubmitted after a user's scancel")
        first = self._new_first_step(index, trainer, "the resubmitted run to resume")
        self._resumed(rec, index, first)
        rec.time_to_resume_s = round(first.seen - t_resubmit, 3)
        if rec.steps_lost not in (0, None):
            rec.problems.append(f"{rec.steps_lost} steps lost after scancel; its SIGTERM must lose none")
        rec.resume_measure = "resubmission after the user's scancel -> first step"

    # ------------------------------------------------------------------ the run
    def run_chaos(self) -> tuple[RunOutcome, list[FaultRecord]]:
        handlers: dict[str, Callable[[PlannedFault, FaultRecord], None]] = {
            "scancel_signal": self._signal_like, "whole_job_signal": self._signal_like, "preempt": self._signal_like, "requeue": self._signal_like,
            "crash": self._crash, "scancel": self._scancel,  # crash: the local runner's, same promise
            "bad_node": self._bad_node, "node_down": self._node_down}
        t0 = time.monotonic()
        records: list[FaultRecord] = []
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._submit(0, "first submission")
            self._wait(lambda: next(iter(self.tail.of_kind("first_step")), None), RESUME_LIMIT_S + 120,
                       "the first step of the first job")
            for f in self.plan.faults:
                rec = FaultRecord(f.index, f.kind, f.variant, f.at_step)
                try:
                    handlers[f.kind](f, rec)
                except (WaitTimeout, RuntimeError, OSError, subprocess.SubprocessError) as e:
                    rec.problems.append(f"{type(e).__name__}: {e}")
                if self.max_running > 1:
                    rec.problems.append(f"{self.max_running} jobs of the run were RUNNING at once")
                    self.max_running = 1
                rec.recovered = not rec.problems and rec.injected_at is not None
                records.append(rec)
                log.info("chaos: fault %d/%d %s%s at step %s: %s, %s steps lost, resumed in %s", f.index + 1,
                         len(self.plan.faults), f.kind, f"({f.variant})" if f.variant else "", rec.step,
                         "recovered" if rec.recovered else "NOT RECOVERED: " + "; ".join(rec.problems),
                         rec.steps_lost, f"{rec.time_to_resume_s:.2f}s" if rec.time_to_resume_s is not None else "-")
                if not rec.recovered and not self._states():
                    self._submit(f.index + 1, "unplanned: the run stopped after a fault that was not recovered")
                    self.unplanned += 1
            rc = self._finish()
        finally:
            left = [j for j in self._states()]
            if left:
                log.warning("chaos: cancelling jobs still queued or running: %s", ", ".join(left))
                _cmd("scancel", *left, check=False)
            if self.preemptors:
                _cmd("scancel", *self.preemptors, check=False)
            for node in sorted(self.downed):  # node_down's own finally did it unless the runner itself died
                self._node_back(node)
        completed, step, digest, err = final_state(self.run_dir, self.ckpt_dir)
        out = RunOutcome(str(self.run_dir), rc, completed and rc == 0, step, digest, time.monotonic() - t0, err)
        return out, records

    def _finish(self) -> int:
        """Wait for the run's last job to complete; 0 if it did and left nothing in the queue."""
        remaining = self.plan.max_steps - self._current_step()
        try:
            self._wait(lambda: any(e.get("event") == "completed" for e in self._events()) or None,
                       self._step_timeout(remaining) + START_TIMEOUT_S, "the run to complete")
            self._wait(lambda: not self._states() or None, 60.0, "the run's last job to leave the queue")
        except WaitTimeout as e:
            log.error("chaos: %s", e)
            return 1
        return 0


def _job_field(job: str, name: str) -> str | None:
    """One field of ``scontrol show job --oneliner JOB`` (``NodeList``, ``ExcNodeList``); None if absent."""
    info = _cmd("scontrol", "show", "job", "--oneliner", job, check=False)
    m = re.search(rf"(?:^|\s){re.escape(name)}=(\S+)", info)
    return m.group(1) if m else None


def _hostnames(nodelist: str | None) -> list[str]:
    """``n[1-2]`` -> ``["n1", "n2"]`` (``scontrol show hostnames``); [] for none or ``(null)``."""
    if not nodelist or nodelist in ("(null)", "None"):
        return []
    return _cmd("scontrol", "show", "hostnames", nodelist).split()


def _sacct_states(job: str) -> list[str]:
    """The state of each run of ``job`` (``--duplicates``: a requeued job's earlier runs too), first word."""
    out = _cmd("sacct", "-j", job, "-X", "--duplicates", "--noheader", "--parsable2", "--format=JobID,State",
               check=False)
    return [ln.split("|")[1].split()[0] for ln in out.splitlines()
            if ln.split("|")[0] == job and len(ln.split("|")) > 1 and ln.split("|")[1].strip()]


def job_processes(job: str, node: str) -> tuple[list[int], list[int]]:
    """(batch shells, the others): the live processes of ``job`` on ``node``, found by their
    environment (``SLURM_JOB_ID``, ``SLURMD_NODENAME``; every node of the local cluster is this
    host), slurmstepd left out. The batch shell is the child of ``slurmstepd: [JOB.batch]``."""
    want = (f"SLURM_JOB_ID={job}".encode(), f"SLURMD_NODENAME={node}".encode())
    shells: list[int] = []
    others: list[int] = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
            comm = (d / "comm").read_text().strip()
            stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
            parent = Path(f"/proc/{stat[1]}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        if stat[0] == "Z" or comm.startswith("slurmstepd") or not all(w in env for w in want):
            continue
        (shells if parent.startswith(f"slurmstepd: [{job}.batch]") else others).append(int(d.name))
    return shells, others


def _stop_job_processes(job: str, node: str) -> tuple[list[int], list[int]]:
    """SIGSTOP every process of ``job`` on ``node`` (until a pass finds none new: a process may
    have forked meanwhile); returns them as :func:`job_processes` does."""
    shells: list[int] = []
    others: list[int] = []
    for _ in range(5):
        s, o = job_processes(job, node)
        new = [p for p in s + o if p not in shells and p not in others]
        if not new:
            break
        for pid in new:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                continue
            (shells if pid in s else others).append(pid)
    return shells, others


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run(config: str | None, overrides: list[str], plan: Plan, out: Path, **kwargs: Any) -> ChaosOutcome:
    """Reference (locally), then the chaos run on Slurm; the caller judges."""
    import shutil

    runs = Path(out) / "runs"
    if runs.exists():
        shutil.rmtree(runs)
    runner = SlurmRunner(config, overrides, plan, out, **kwargs)
    reference = runner.run_reference()
    started = time.time()
    chaos, records = runner.run_chaos()
    return ChaosOutcome(reference, chaos, records, runner.launches, 0, runner.unplanned, list(runner.tail.timeline),
                        started, None, runner.settings, len(runner.tail.of_kind("supervisor_restart")),
                        slurm_jobs=runner._run_jobs(), max_jobs_running=runner.peak_running)


def available() -> str | None:
    """None if a Slurm cluster answers here, else why not (for a clear usage error)."""
    try:
        subprocess.run(["sinfo", "--noheader"], capture_output=True, timeout=15, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        return f"no Slurm cluster answers here (sinfo: {e})"
    return None

