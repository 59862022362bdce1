"""``foldhpc train`` with a timing trace: the same Trainer, config and exit codes as the CLI.

Used by bench_checkpoint.py to get what the run's records (events.jsonl: a ``progress`` record per
log window) cannot give: the exact end time of every training step and the time the training
thread spends inside ``Trainer._save``. The only
additions are two overridden hooks that take a ``time.perf_counter()`` and call the original.

    python benchmarks/_trainrun.py --trace T.json --config configs/default.toml --set key=value ...

Trace JSON: ``steps``: [[step, t], ...] (t when the loop iteration that finished ``step`` reaches
its checkpoint bookkeeping, i.e. after the optimizer step, logging and validation; the save of
that iteration, if one is due, comes after t), ``saves``: [{step, reason, t0, t1, started}]
(``t1 - t0`` = training thread blocked in ``Trainer._save``: state_dict, snapshot, and for a
synchronous save the write + fsync), ``batch_size``, ``exit_code``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from foldhpc.config import load_config
from foldhpc.train.loop import Trainer


class TracedTrainer(Trainer):
    def __init__(self, *a: Any, **k: Any) -> None:
        super().__init__(*a, **k)
        self.trace_steps: list[tuple[int, float]] = []
        self.trace_saves: list[dict[str, Any]] = []

    def _note_checkpoint(self, seen: list[Any]) -> None:
        if not self.trace_steps or self.trace_steps[-1][0] != self.step:
            self.trace_steps.append((self.step, time.perf_counter()))
        super()._note_checkpoint(seen)

    def _save(self, reason: str, blocking: bool) -> bool:
        t0 = time.perf_counter()
        started = super()._save(reason, blocking)
        t1 = time.perf_counter()
        self.trace_saves.append({"step": self.step, "reason": reason, "blocking": blocking,
                                 "t0": t0, "t1": t1, "started": bool(started)})
        return started


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", type=Path, required=True)
    ap.add_argument("--config")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    trainer = TracedTrainer(cfg)
    code = 1
    try:
        code = trainer.run().exit_code
    finally:
        args.trace.parent.mkdir(parents=True, exist_ok=True)
        args.trace.write_text(json.dumps({
            "steps": trainer.trace_steps, "saves": trainer.trace_saves,
            "batch_size": cfg.train.batch_size, "exit_code": code,
            "interval_s": cfg.checkpoint.interval_s, "async_save": cfg.checkpoint.async_save}))
    return code


if __name__ == "__main__":
    sys.exit(main())
