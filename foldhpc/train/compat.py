"""May a checkpoint be resumed under the current config?  Which changes break bit-exactness.

A resumed run is meant to end with exactly the weights of a run that was never stopped. That
only holds if everything that decides *what* is computed from the checkpoint's step on is the
same as when the checkpoint was written. Every config key falls in one of three classes:

``TRAJECTORY`` (refused unless ``--force-resume``)
    All of ``model.*`` and ``task.*`` (the factory and each ``task.params`` entry); ``data.*`` except the worker counts and the cache location (they pick
    the structures, the split and the crops); and ``train.seed`` (batches and dropout are a
    function of (seed, step)), ``batch_size``, ``max_steps`` (the cosine schedule spans it),
    ``lr``, ``weight_decay``, ``warmup_steps``, ``min_lr_ratio``, ``grad_clip`` and ``amp``
    (bf16 autocast computes different numbers, not just faster ones; it is compared as
    configured, although it only takes effect on CUDA, so that the answer does not depend on
    which node a requeue lands on).

``NUMERICS`` (resumed, with a warning)
    ``train.device``, ``deterministic``, ``compile`` and ``threads`` change *how* the same
    mathematics is evaluated (kernels, fusion, reduction order), not *what* is trained.
    Refusing them would block legitimate recoveries (a GPU node is gone, continue on another
    kind of node; a compiled run hits a compiler bug), and a requeue can land on different
    hardware anyway without any config change. The run stays the same training run; it is
    just no longer bit-identical to an uninterrupted one, and the warning says so.
    ``device`` is decided the same way at run time: a checkpoint written on another kind
    of device, or with another torch version, is logged the same way (see
    :func:`runtime_differences`).

everything else (resumed, logged at INFO)
    ``run.*``, ``checkpoint.*``, ``slurm.*``, ``train.val_every``, ``train.val_max_samples``,
    ``data.num_workers``, ``data.prepare_workers``, ``data.cache_dir``: logging, validation,
    saving and scheduling only (validation consumes no random numbers that training uses).

With ``--force-resume`` the current config's ``lr`` and ``weight_decay`` replace the ones
stored in the optimizer and scheduler state (see the trainer), so a forced change really
takes effect instead of being overwritten by the checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from foldhpc.checkpoint import CheckpointError
from foldhpc.records.exitcodes import ExitCode

log = logging.getLogger(__name__)

TRAJECTORY_TRAIN_KEYS = frozenset({"seed", "batch_size", "max_steps", "lr", "weight_decay", "warmup_steps",
                                   "min_lr_ratio", "grad_clip", "amp"})
NUMERICS_TRAIN_KEYS = frozenset({"device", "deterministic", "compile", "threads"})
DATA_HARMLESS_KEYS = frozenset({"num_workers", "prepare_workers", "cache_dir"})

TRAJECTORY, NUMERICS, HARMLESS = "trajectory", "numerics", "harmless"


def classify(section: str, key: str) -> str:
    """The class of config key ``section.key`` (see the module docstring)."""
    if section in ("model", "task"):  # task.factory and every task.params.* entry
        return TRAJECTORY
    if section == "data":
        return HARMLESS if key in DATA_HARMLESS_KEYS else TRAJECTORY
    if section == "train":
        if key in TRAJECTORY_TRAIN_KEYS:
            return TRAJECTORY
        if key in NUMERICS_TRAIN_KEYS:
            return NUMERICS
    return HARMLESS


@dataclass
class ConfigDiff:
    """Changed keys of the current config against a checkpoint's, by class: ``key: old -> new``."""

    trajectory: list[str] = field(default_factory=list)
    numerics: list[str] = field(default_factory=list)
    harmless: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.trajectory or self.numerics or self.harmless)


_MISSING = object()


def diff_configs(old: dict[str, Any], new: dict[str, Any]) -> ConfigDiff:
    """Compare two ``Config.to_dict()`` trees key by key (a key one side lacks shows as <unset>)."""
    out = ConfigDiff()
    for section in sorted(set(old) | set(new)):
        # a checkpoint from before [task] existed trained the built-in model: the default task
        o_sec = old.get(section, _NO_TASK if section == "task" else {})
        n_sec = new.get(section, _NO_TASK if section == "task" else {})
        if not isinstance(o_sec, dict) or not isinstance(n_sec, dict):
            continue
        if section == "task":  # the free-form table, entry by entry: task.params.layers: 2 -> 4
            o_sec, n_sec = _flat_task(o_sec), _flat_task(n_sec)
        for key in sorted(set(o_sec) | set(n_sec)):
            o, n = o_sec.get(key, _MISSING), n_sec.get(key, _MISSING)
            if o == n:
                continue
            line = f"{section}.{key}: {_show(o)} -> {_show(n)}"
            getattr(out, classify(section, key)).append(line)
    return out


_NO_TASK: dict[str, Any] = {"factory": "", "params": {}}


def _flat_task(sec: dict[str, Any]) -> dict[str, Any]:
    params = sec.get("params")
    flat = {k: v for k, v in sec.items() if k != "params"}
    if isinstance(params, dict):
        flat.update({f"params.{k}": v for k, v in params.items()})
    elif params is not None:
        flat["params"] = params
    return flat


def _show(v: object) -> str:
    return "<unset>" if v is _MISSING else repr(v)


#: what to do about a refused resume, in the terms of who is asked: the CLI's flags ...
CLI_REMEDY = ("Resume with the original values, use --no-resume to start over (old checkpoints are kept aside), "
              "or --force-resume to continue from this checkpoint with the new values.")
#: ... or foldhpc.Session's arguments
API_REMEDY = ("Resume with the original values, pass resume=\"never\" to start over (old checkpoints are kept "
              "aside), or pass force_resume=True to continue from this checkpoint with the new values.")


class IncompatibleResume(CheckpointError):
    """The checkpoint was written with a config that changes the training trajectory (a user
    error, found before anything is loaded or written: exit 2). ``changes``: the refused keys,
    ``"key: old -> new"``; :meth:`worded` says the same with another remedy."""

    exit_code = ExitCode.USAGE

    def __init__(self, where: object, changes: list[str], remedy: str = CLI_REMEDY) -> None:
        self.where, self.changes = where, list(changes)
        super().__init__(f"checkpoint {where} was written with a different config, which would change the batches, "
                         f"the model or the learning-rate schedule from its step on: {'; '.join(changes)}. {remedy}",
                         damaged=False)

    def worded(self, remedy: str) -> IncompatibleResume:
        return IncompatibleResume(self.where, self.changes, remedy)


def check_resume(old_config: dict[str, Any] | None, new_config: dict[str, Any], where: object,
                 force: bool, remedy: str = CLI_REMEDY) -> ConfigDiff:
    """Log what changed since the checkpoint at ``where`` was written; refuse trajectory changes.

    Raises :class:`IncompatibleResume` naming every trajectory key (old -> new) and what to do,
    unless ``force``. Returns the diff (the trainer applies forced optimizer hyperparameters).
    """
    if old_config is None:
        log.warning("checkpoint %s records no config; cannot check that it matches this one", where)
        return ConfigDiff()
    diff = diff_configs(old_config, new_config)
    if diff.harmless:
        log.info("config changed since checkpoint %s (does not affect training): %s", where,
                 "; ".join(diff.harmless))
    if diff.numerics:
        log.warning("config changed since checkpoint %s: %s. Training continues with the same data and "
                    "schedule, but is no longer bit-identical to an uninterrupted run (different kernels or "
                    "reduction order).", where, "; ".join(diff.numerics))
    if diff.trajectory:
        refusal = IncompatibleResume(where, diff.trajectory, remedy)
        if not force:
            raise refusal
        log.warning("%s: %s", "--force-resume" if remedy == CLI_REMEDY else "force_resume=True", refusal)
    return diff


def runtime_differences(meta: dict[str, Any], device: str, torch_version: str, world_size: int = 1) -> list[str]:
    """Run-time facts (device kind, torch version, number of ranks) that differ from when the
    checkpoint was written. Another world size trains on the same samples at every step (the global
    batch is split, see foldhpc.data.dataset.TrainBatches) and the same loss, but the gradient
    is summed in another order: the same run, not the same bits."""
    out = []
    old_world = int(meta.get("world_size", 1))
    if old_world != world_size:
        out.append(f"ranks: {old_world} -> {world_size}")
    old_dev = meta.get("device")
    if old_dev is not None and old_dev != device:
        out.append(f"device: {old_dev!r} -> {device!r}")
    old_torch = meta.get("torch_version")
    if old_torch is not None and old_torch != torch_version:
        out.append(f"torch: {old_torch!r} -> {torch_version!r}")
    return out


