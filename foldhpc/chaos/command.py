"""``foldhpc chaos``: the command line of the chaos runner (see :mod:`foldhpc.chaos`).

Exit status: 0 only when every planned fault was recovered from and the final state is
bit-exact with the reference; 1 otherwise (the report says why); 2 for a usage or config error.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from foldhpc.task import check_task
from foldhpc.config import ConfigError, load_config

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE", help="TOML config of the training to torture (e.g. "
                   "configs/tiny.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config key (repeatable); applied over chaos's own settings")
    p.add_argument("--faults", type=int, required=True, metavar="N", help="number of faults to inject")
    p.add_argument("--backend", choices=("local", "slurm"), default="local",
                   help="local: real processes on this machine, restarted by the chaos runner like a requeue; "
                        "slurm: one run submitted with foldhpc submit to the Slurm cluster here, continued by "
                        "Slurm and slurm.resume (faults: scancel --signal, to the steps or the whole job, partition "
                        "preemption, scontrol requeue, trainer crash, a bad node, a dead node, scancel)")
    p.add_argument("--partition", default="", help="--backend slurm: the partition of the run's jobs "
                   "(default: slurm.partition of the config)")
    p.add_argument("--preempt-partition", default="high", help="--backend slurm: a partition whose jobs preempt "
                   "the run's (for the preempt kind)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fault schedule (same seed, same plan)")
    p.add_argument("--out", default="runs/chaos", metavar="DIR",
                   help="report.md, report.json, chaos.png; the two trainings go to DIR/runs/ (replaced)")
    p.add_argument("--kinds", metavar="K1,K2", help="fault kinds to draw from (default: all available): "
                   + ", ".join(__import__("foldhpc.chaos.kinds", fromlist=["KINDS"]).KINDS))
    p.add_argument("--weights", metavar="K=W,...", help="relative weights of the kinds (default 1 each)")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train both runs with N local ranks (foldhpc train --nproc N); adds the dead_rank and bitflip kinds")
    p.add_argument("--min-gap", type=int, default=12, metavar="STEPS", help="fewest steps between two faults")
    p.add_argument("--max-gap", type=int, default=30, metavar="STEPS", help="most steps between two faults")


def run(args: argparse.Namespace) -> int:
    from foldhpc.chaos import local, report, storage
    from foldhpc.chaos.kinds import FALLBACK_KINDS, MULTI_RANK_KINDS
    from foldhpc.chaos.schedule import PlanError, make_plan, parse_kinds, parse_weights
    from foldhpc.records.logs import setup_logging

    out = Path(args.out)
    try:
        kinds = parse_kinds(args.kinds, args.backend)
        weights = parse_weights(args.weights)
    except PlanError as e:
        raise ConfigError(str(e)) from None
    if args.nproc < 1:
        raise ConfigError("--nproc must be >= 1")
    if args.backend == "slurm":
        from foldhpc.chaos import slurm as slurm_backend

        if args.nproc != 1:
            raise ConfigError("--nproc is for --backend local (on Slurm, ranks come from slurm.nodes/slurm.gpus)")
        why = slurm_backend.available()
        if why:
            raise ConfigError(f"--backend slurm: {why}")
    if args.nproc > 1 and not args.kinds:
        kinds += list(MULTI_RANK_KINDS)
    sets = [f"{k}={v}" for k, v in local.CHAOS_DEFAULTS.items()] + list(args.overrides)
    cfg = load_config(args.config, sets + [f"run.dir={out / 'runs' / 'chaos'}"])  # validate before any work
    check_task(cfg)
    every = cfg.checkpoint.every_steps
    if every <= 0:
        raise ConfigError("foldhpc chaos needs checkpoint.every_steps > 0 (faults must find checkpoints to resume)")
    if cfg.fault.max_restarts <= 0:
        raise ConfigError("foldhpc chaos runs the trainer under the supervisor: fault.max_restarts must be > 0")
    if args.nproc > 1 and cfg.train.batch_size % args.nproc:
        raise ConfigError(f"--nproc {args.nproc}: train.batch_size = {cfg.train.batch_size} must be a multiple of it")
    if cfg.checkpoint.dir:
        raise ConfigError("foldhpc chaos keeps both trainings' checkpoints under --out DIR/runs/: leave "
                          "checkpoint.dir unset")
    needs_two = [k for k in FALLBACK_KINDS if k in kinds]
    if cfg.checkpoint.keep_last < 2 and needs_two:
        raise ConfigError(f"{', '.join(needs_two)} need checkpoint.keep_last >= 2 (a previous file to fall back to)")
    out.mkdir(parents=True, exist_ok=True)
    setup_logging("INFO", out / "chaos.log")
    skipped: dict[str, str] = {}
    for k in MULTI_RANK_KINDS:
        if k in kinds and args.nproc == 1:
            skipped[k] = "needs several ranks (--nproc 2 or more)"
            kinds.remove(k)
            weights.pop(k, None)
    # kinds that need something this machine may not allow: how each is injected here, or left out with why
    probes = {"unwritable_dir": local.unwritable_method, "full_status_fs": storage.tmpfs_method}
    methods: dict[str, str | None] = {}
    for k, probe in probes.items():
        if k not in kinds:
            continue
        methods[k], why = probe(out)
        if methods[k] is None:
            skipped[k] = why
            kinds.remove(k)
            weights.pop(k, None)
            log.warning("chaos: leaving out %s: %s", k, why)
        else:
            log.info("chaos: %s uses %s", k, why)
    if not kinds:
        raise ConfigError("no fault kind left to inject" + (f" ({'; '.join(skipped.values())})" if skipped else ""))
    try:
        plan = make_plan(args.faults, args.seed, kinds, weights, every_steps=every, min_gap=args.min_gap,
                         max_gap=args.max_gap)
    except PlanError as e:
        raise ConfigError(str(e)) from None
    counts = {k: sum(f.kind == k for f in plan.faults) for k in kinds}
    log.info("chaos: %d faults (seed %d) over %d steps: %s", len(plan.faults), plan.seed, plan.max_steps,
             ", ".join(f"{k} {n}" for k, n in counts.items() if n))
    load_start = os.getloadavg()
    if args.backend == "slurm":
        outcome = slurm_backend.run(args.config, list(args.overrides), plan, out, partition=args.partition,
                                    preempt_partition=args.preempt_partition)
    else:
        outcome = local.run(args.config, list(args.overrides), plan, out, unwritable=methods.get("unwritable_dir"),
                            nproc=args.nproc, run_fs=methods.get("full_status_fs"))
    load_end = os.getloadavg()
    verdict = report.judge(len(plan.faults), outcome.records, outcome.reference.digest, outcome.chaos.digest,
                           outcome.reference.completed, outcome.chaos.completed, outcome.chaos.final_step,
                           plan.max_steps)
    doc = report.build(outcome, plan, verdict, command=report.argv(), config=args.config,
                       overrides=list(args.overrides), backend=args.backend, load_start=load_start,
                       load_end=load_end, skipped_kinds=skipped, nproc=args.nproc)
    paths = report.write(doc, out)
    (out / "runs" / ".gitignore").write_text("*\n")  # scratch trainings: never committed with a report
    level = logging.INFO if verdict.passed else logging.ERROR
    log.log(level, "chaos: %s: %d/%d faults recovered (%.1f %%), %s; report: %s", "PASSED" if verdict.passed
            else "FAILED", verdict.recovered, verdict.faults_planned, 100 * verdict.recovery_rate,
            "bit-exact" if verdict.bit_exact else "NOT bit-exact", ", ".join(str(p) for p in paths))
    for p in verdict.problems[:20]:
        log.error("chaos: %s", p)
    return verdict.exit_code
