"""The silent-data-corruption check's cost per step and an attribution's replay cost (issue 24).

C1  the replica check (``fault.sdc_check_every``): one digest of the rank's weights and optimizer
    state plus an all-gather of 16 hex characters. Measured inside real 2-rank runs
    (``foldhpc train --nproc 2``, ``sdc_check_every = 1``) from what the trainer records itself:
    status.json ``sdc.check_s`` / ``sdc.checks`` (time in the checks; ``digest_s`` the digest's
    part, the rest is the all-gather, which also waits for the slower rank) against ``train_time_s`` /
    ``step`` (the steps' own time, which excludes the checks). The cost at a check every k steps
    is (check time / k) / step time. The default (``FaultConfig.sdc_check_every``, 50) must be at
    <= 1 % on the default config; the table also gives the smallest k of K_CHOICES that is. ``configs/large.toml`` (83.8M parameters, ~1 GB of state) runs on the CPU
    with --set data.crop_size=16 train.batch_size=2 (one sample per rank).
C2  an attribution's replay: a transient bit flip on rank 1 (FOLDHPC_BITFLIP_AT_STEP) on the
    default config, 2 ranks, checkpoint every C2_EVERY steps and a check every C2_EVERY: the
    replay's wall time (``replay_s`` of the attribution: checkpoint load + the window replayed +
    the verdict) against the window's steps at the run's own step time.

    python benchmarks/bench_sdc.py                 # C1 default + large, C2
    python benchmarks/bench_sdc.py --skip-large    # minutes less
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import DEFAULT_CONFIG, REPO, default_out, environment, print_table, read_json, verdict, write_json

from foldhpc.config import FaultConfig

LARGE_CONFIG = REPO / "configs" / "large.toml"
DEFAULT_K = FaultConfig().sdc_check_every
K_CHOICES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
BUDGET = 0.01  # of step time, on the default config
C2_EVERY = 10


def train2(run: Path, config: Path, overrides: list[str], env: dict[str, str] | None = None) -> dict:
    cmd = [sys.executable, "-m", "foldhpc", "train", "--nproc", "2", "--config", str(config),
           "--set", f"run.dir={run}", "--set", "run.log_every=1"]
    for o in overrides:
        cmd += ["--set", o]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    status = read_json(run / "status.json")
    assert isinstance(status, dict)
    return status


def check_cost(work: Path, name: str, config: Path, steps: int, extra: list[str]) -> dict[str, object]:
    st = train2(work / name, config, [f"train.max_steps={steps}", "fault.sdc_check_every=1",
                                      "train.val_every=0", *extra])
    sdc = st["sdc"]
    per_check = sdc["check_s"] / max(1, sdc["checks"])
    per_digest = sdc["digest_s"] / max(1, sdc["checks"])
    per_step = st["train_time_s"] / max(1, st["step"])
    cost = {k: per_check / k / per_step for k in K_CHOICES}
    return {"checks": sdc["checks"], "check_s": per_check, "digest_s": per_digest, "step_s": per_step,
            "cost_at_k": cost, "cost_at_1": cost[1], "mismatches": sdc["mismatches"]}


def replay_cost(work: Path) -> dict[str, object]:
    flip = 2 * C2_EVERY + 3
    st = train2(work / "replay", DEFAULT_CONFIG,
                [f"train.max_steps={flip + 2 * C2_EVERY}", f"fault.sdc_check_every={C2_EVERY}",
                 f"checkpoint.every_steps={C2_EVERY}", "train.val_every=0", "train.deterministic=true"],
                {"FOLDHPC_BITFLIP_AT_STEP": str(flip), "FOLDHPC_BITFLIP_ONCE": str(work / "fired")})
    last = st["sdc"]["last"]
    window = last["last"] - last["first"] + 1
    per_step = st["train_time_s"] / max(1, st["step"])
    return {"verdict": last["verdict"], "ranks": last["ranks"], "window_steps": window, "replay_s": last["replay_s"],
            "step_s": per_step, "ratio_to_window": last["replay_s"] / (window * per_step)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="steps of the default-config run (C1)")
    ap.add_argument("--large-steps", type=int, default=6)
    ap.add_argument("--skip-large", action="store_true")
    ap.add_argument("--out", type=Path, default=default_out("bench_sdc"))
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    results: dict[str, object] = {"environment": environment(), "load_before": load0}
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        c1 = {"default": check_cost(work, "default", DEFAULT_CONFIG, args.steps, [])}
        if not args.skip_large:
            c1["large"] = check_cost(work, "large", LARGE_CONFIG, args.large_steps,
                                     ["data.crop_size=16", "train.batch_size=2", "train.amp=false"])
        c2 = replay_cost(work)
    smallest = next((k for k in K_CHOICES if c1["default"]["cost_at_k"][k] <= BUDGET), None)  # type: ignore[index]
    rows = []
    for name, r in c1.items():
        cost = r["cost_at_k"]
        assert isinstance(cost, dict)
        rows.append([name, r["checks"], f"{1000 * r['check_s']:.2f} ms", f"{1000 * r['digest_s']:.2f} ms",
                     f"{1000 * r['step_s']:.1f} ms",
                     f"{100 * cost[1]:.2f} %", f"{100 * cost[10]:.3f} %", f"{100 * cost[50]:.3f} %",
                     f"{100 * r['check_s'] / DEFAULT_K / r['step_s']:.3f} %"])
    print_table("C1 replica check, 2 ranks (check time from the trainer's own records)",
                ["config", "checks", "per check", "of it digest", "per step", "k=1", "k=10", "k=50", f"k={DEFAULT_K} (default)"], rows)
    d = c1["default"]
    at_default = float(d["check_s"]) / DEFAULT_K / float(d["step_s"])  # type: ignore[arg-type]
    print(f"default sdc_check_every = {DEFAULT_K}: {100 * at_default:.3f} % of step time on the default config "
          f"(budget {100 * BUDGET:g} %) {verdict(at_default <= BUDGET, at_default)}; smallest k of {K_CHOICES} within "
          f"the budget: {smallest}")
    print_table("C2 attribution by replay (transient flip on rank 1, default config)",
                ["verdict", "ranks", "window", "replay", "step", "replay / window's steps"],
                [[c2["verdict"], c2["ranks"], c2["window_steps"], f"{c2['replay_s']:.2f} s",
                  f"{1000 * float(c2['step_s']):.1f} ms", f"{float(c2['ratio_to_window']):.2f}x"]])
    results.update({"c1": c1, "default_check_every": DEFAULT_K, "smallest_within_budget": smallest, "c2": c2, "load_after": os.getloadavg()[0]})
    print(f"load average before {load0:.2f}, after {os.getloadavg()[0]:.2f}")
    write_json(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
