"""``[task]``: a model and loop of the user's, run by the whole CLI (train, submit, supervise, chaos, sweep).

A task is a factory named in the config::

    [task]
    factory = "my_pkg.tasks:build"        # or "path/to/tasks.py:build"
    [task.params]                          # the task's own hyperparameters: fingerprinted
    layers = 4

    # my_pkg/tasks.py
    def build(cfg: foldhpc.Config) -> foldhpc.Task:
        model = MyNet(layers=cfg.task.params["layers"])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        batches = foldhpc.StepBatches(MyDataset(), batch_size=8, seed=cfg.train.seed)

        def step(run: foldhpc.Session, step: int) -> dict[str, float]:
            loss = model.loss(batches[step])
            loss.backward()
            run.wait_staged()              # before the optimizer changes tracked tensors
            opt.step(); opt.zero_grad()
            return {"loss": loss.item()}

        return foldhpc.Task(states={"model": model, "optimizer": opt}, step=step)

Several ranks (``foldhpc train --nproc N``, several Slurm tasks): every rank builds the task; the
process group exists once the session is entered, so a task that wraps its model in DDP does it
in ``start(run)``, called then (after the resume)::

    def start(run):
        nonlocal forward
        forward = torch.nn.parallel.DistributedDataParallel(model)

Every process that trains (``foldhpc train``, a supervisor's child, a Slurm job, a follow-up job,
a sweep task, a chaos run) reads the same config and rebuilds the task the same way:
:func:`train` is the one place that picks between a task and the built-in distogram model
(:mod:`foldhpc.train.loop`, the default when ``task.factory`` is empty). A task runs in a
:class:`foldhpc.Session`, so it gets what a session gives: the run lock, records, signal and
timed saves, exact resume, the supervisor's heartbeats, goodput. ``task.params`` and
``train.seed`` are checked at resume (a changed value is refused, naming it, unless
``--force-resume``).

The factory is called once per process, after ``train.threads`` and ``train.deterministic`` are
applied and torch's, python's and numpy's global generators are seeded from ``train.seed`` (so a
model initialised in it, and anything drawn from them, is the same in every fresh process). It must not take the run directory's lock or write into it: the session does.

``--no-resume`` / ``--resume PATH`` reach the task's session as ``resume="never"`` / ``resume=PATH``
(see :class:`foldhpc.Session`), for the run's first start only, as for the built-in model.
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from foldhpc.config import Config, ConfigError

if TYPE_CHECKING:
    from foldhpc.distributed.env import DistEnv
    from foldhpc.session import Session
    from foldhpc.train.result import TrainResult

log = logging.getLogger(__name__)

#: a refused resume of a task, in the CLI's terms
CLI_TASK_REMEDY = ("Resume with the original values, use --no-resume to start over (old checkpoints are kept "
                   "aside), or --force-resume to continue from this checkpoint with the new values.")

#: what a task's ``step`` returns: scalars to log (``loss`` also goes to status.json), or None
StepScalars = Mapping[str, float] | None


@dataclass
class Task:
    """What a ``task.factory`` returns.

    ``states``: name -> object with ``state_dict()`` / ``load_state_dict()`` (as for
    :class:`foldhpc.Session`): the checkpoint. ``step(run, step)``: one training step; it calls
    ``run.wait_staged()`` before anything changes a tracked state (``optimizer.step()``), and may
    return scalars to log every ``run.log_every`` steps. ``evaluate()``: optional, called once when
    training completes; its metrics go to status.json (``metrics``) and TensorBoard (``val/*``),
    from rank 0. ``start(run)``: optional, called once the session is entered (the checkpoint is
    loaded, the process group of several ranks is up): where a model is wrapped in DDP.
    """

    states: Mapping[str, Any]
    step: Callable[[Session, int], StepScalars]
    evaluate: Callable[[], Mapping[str, float]] | None = None
    start: Callable[[Session], None] | None = None


class TaskError(ConfigError):
    """A ``task.factory`` that cannot be imported, raises, or returns something that is not a Task:
    a user error (exit 2), reported before any step runs."""


def _import_factory(spec: str) -> Callable[..., Any]:
    target, _, name = spec.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise TaskError(f"task.factory = {spec!r}: {str(path)!r} is not a file (relative paths are taken from "
                            f"the working directory {os.getcwd()!r})")
        mod_name = f"foldhpc_task_{abs(hash(str(path.resolve())))}"
        module = sys.modules.get(mod_name)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(mod_name, path)
            if loader_spec is None or loader_spec.loader is None:  # pragma: no cover - a .py file always has one
                raise TaskError(f"task.factory = {spec!r}: cannot load {path}")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[mod_name] = module
            try:
                loader_spec.loader.exec_module(module)
            except BaseException as e:
                del sys.modules[mod_name]
                raise TaskError(f"task.factory = {spec!r}: importing {path} failed: {type(e).__name__}: {e}") from e
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())  # as `python -m`: a package beside the config is importable
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            raise TaskError(f"task.factory = {spec!r}: no module named {e.name!r} (install the package, or run from "
                            "the folder that holds it)") from e
        except Exception as e:  # noqa: BLE001 - the user's module failed at import: say so, in one line
            raise TaskError(f"task.factory = {spec!r}: importing {target} failed: {type(e).__name__}: {e}") from e
    factory: Callable[..., Any] | None = getattr(module, name, None)
    if not callable(factory):
        raise TaskError(f"task.factory = {spec!r}: {target} has no function {name!r}")
    return factory


def check_task(cfg: Config) -> None:
    """Import the factory of ``cfg`` (without calling it): a name that does not resolve is a
    :class:`TaskError` here, before a job is submitted or a run directory is written."""
    if cfg.task.factory:
        _import_factory(cfg.task.factory)


def build_task(cfg: Config) -> Task:
    """Call the factory of ``cfg`` (see the module docstring for what is set up first)."""
    import random

    import numpy as np
    import torch

    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    # every generator a task may draw from, not only torch's: python's and numpy's are seeded from
    # the OS at process start, so a task using random / np.random would differ between two fresh runs
    # (a resume restores them from the checkpoint; the first start had nothing to make them equal)
    random.seed(t.seed)
    np.random.seed(t.seed % 2**32)  # numpy's legacy seed is 32-bit
    torch.manual_seed(t.seed)
    spec = cfg.task.factory
    factory = _import_factory(spec)
    try:
        task = factory(cfg)
    except Exception as e:  # noqa: BLE001 - the factory's own complaint, in one line, with its name
        log.debug("task factory %s raised", spec, exc_info=True)
        raise TaskError(f"task.factory = {spec!r} raised {type(e).__name__}: {e}") from e
    if not isinstance(task, Task):
        raise TaskError(f"task.factory = {spec!r} returned {type(task).__name__}, not a foldhpc.Task "
                        "(return foldhpc.Task(states=..., step=...))")
    if not callable(task.step):
        raise TaskError(f"task.factory = {spec!r}: Task.step is {type(task.step).__name__}, not a function "
                        "step(run, step)")
    return task


def run_task(cfg: Config, force_resume: bool = False, env: DistEnv | None = None,
             resume: str = "auto") -> TrainResult:
    """Train the task of ``cfg`` in a :class:`foldhpc.Session` on ``cfg.run.dir``."""
    from foldhpc.records.status import CHECKPOINTED, COMPLETED
    from foldhpc.session import Session
    from foldhpc.train.compat import IncompatibleResume
    from foldhpc.train.result import TrainResult

    task = build_task(cfg)
    spec = cfg.task.factory
    try:
        run = Session(cfg.run.dir, states=task.states, config=cfg, force_resume=force_resume, resume=resume,
                      env=env)
    except (TypeError, ValueError) as e:
        raise TaskError(f"task.factory = {spec!r}: the Task it returned: {e}") from e
    total, every = cfg.train.max_steps, cfg.run.log_every
    metrics: dict[str, float] = {}
    try:
        with run:
            if task.start is not None:
                task.start(run)
            for step in run.steps(total):
                scalars = task.step(run, step)
                if scalars and ((step + 1) % every == 0 or step + 1 == total):
                    run.log_scalars(step + 1, scalars)
            if run.exit_code == 0 and run.step >= total and task.evaluate is not None and run.main:
                metrics = {k: float(v) for k, v in task.evaluate().items()}
                run.log_scalars(run.step, {f"val/{k}": v for k, v in metrics.items()})
                run.status.update(metrics=metrics)
                log.info("evaluation at step %d: %s", run.step,
                         ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    except IncompatibleResume as e:  # raised on entering: the CLI's words for it (--force-resume)
        raise e.worded(CLI_TASK_REMEDY) from None
    state = COMPLETED if run.exit_code == 0 else CHECKPOINTED
    result = TrainResult(state, run.step, run.signal, metrics, rank=run.env.rank)
    # the task's DDP wrapper (made in start()) goes first, then the process group it uses
    del task
    gc.collect()
    run.group.close()
    return result


def train(cfg: Config, resume: str = "auto", force_resume: bool = False, env: DistEnv | None = None) -> TrainResult:
    """Train what ``cfg`` names: its ``[task]``, or the built-in distogram model
    (:class:`foldhpc.train.loop.Trainer`) when ``task.factory`` is empty. The one place that
    chooses, used by ``foldhpc train`` and by every Slurm job."""
    if not cfg.task.factory:
        from foldhpc.train.loop import Trainer

        return Trainer(cfg, resume=resume, force_resume=force_resume, env=env).run()
    return run_task(cfg, force_resume=force_resume, env=env, resume=resume)


__all__ = ["Task", "TaskError", "build_task", "check_task", "run_task", "train"]
