"""foldhpc's own distogram model as a ``[task]``, written with the public API only.

    foldhpc train --config configs/tiny.toml --set task.factory=examples/distogram_task.py:build

The built-in trainer (foldhpc/train/loop.py) with the parts a task does not need left out (several
ranks, AMP, torch.compile, periodic validation): the same data, model, loss, optimizer, schedule and
seeds, so it trains the same bits on one CPU process (tests/test_task.py compares it with
`foldhpc train`). Its hyperparameters stay in [model] and [train]; a model of your own would put
them in [task.params].
"""

from __future__ import annotations

import functools
import math

import torch

import foldhpc
from foldhpc.data.cache import load_dataset
from foldhpc.data.dataset import TrainBatches, ValBatches, split_by_sequence
from foldhpc.model.loss import distogram_loss
from foldhpc.model.metrics import evaluate
from foldhpc.model.model import StructureModel
from foldhpc.train.rng import step_seed
from foldhpc.train.schedule import lr_factor


def build(cfg: foldhpc.Config) -> foldhpc.Task:
    t = cfg.train
    records = load_dataset(cfg.data, run_dir=cfg.run_dir).records
    train, val = split_by_sequence(records, cfg.data.val_fraction, cfg.data.split_seed)
    batches = TrainBatches(train, t.batch_size, cfg.data.crop_size, t.seed)  # batches[step]: (seed, step)
    model = StructureModel(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(
        lr_factor, warmup_steps=t.warmup_steps, max_steps=t.max_steps, min_lr_ratio=t.min_lr_ratio))
    scaler = torch.amp.GradScaler("cuda", enabled=False)  # kept: the built-in checkpoint has one

    def step(run: foldhpc.Session, step: int) -> dict[str, float]:
        batch = batches[step]
        torch.manual_seed(step_seed(t.seed, step))  # dropout: a function of (seed, step)
        model.train()
        loss, _ = distogram_loss(model(batch)["distogram_logits"].float(), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip if t.grad_clip > 0 else math.inf)
        run.wait_staged()
        if run.check_finite(loss, gnorm):  # a NaN/inf step is skipped, a streak rolled back
            opt.step()
        lr = float(sched.get_last_lr()[0])
        sched.step()
        return {"loss": loss.item(), "lr": lr, "grad_norm": float(gnorm)}

    def validate() -> dict[str, float]:
        return evaluate(model, ValBatches(val[: t.val_max_samples or None], t.batch_size, cfg.data.crop_size))

    return foldhpc.Task(states={"model": model, "optimizer": opt, "lr_scheduler": sched, "grad_scaler": scaler},
                        step=step, evaluate=validate)
