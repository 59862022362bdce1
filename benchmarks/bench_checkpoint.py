"""Checkpoint benchmark: what never losing work costs the training loop, and how fast it recovers.

Default config (configs/default.toml) model, data and batch; 2 CPU cores, noisy shared machine,
so every figure is a median [min..max] and every ratio uses a baseline from the same invocation.

P1  Training-thread stall per checkpoint, async vs synchronous (goal: async/sync <= 5 %).
    micro: the real Trainer state (``Trainer(cfg)._setup()`` + a few real steps so the Adam
    moments exist), time of ``state_dict() + checkpoint_meta() + CheckpointManager.save()``
    with ``async_save`` True (snapshot, write in the background) vs False (write + fsync),
    interleaved, N rounds. Also: the step that overlaps the background write vs a plain step.
    real run: ``checkpoint.every_steps = 10`` (timer off), async vs sync, traced Trainer
    (benchmarks/_trainrun.py): time inside ``Trainer._save`` and the period of the step
    containing a save vs normal steps.
P2  Throughput with timed checkpoints vs disabled (goals: 15 min cadence >= 99.5 %,
    1 min >= 98 %). MEASURED: same number of steps with ``checkpoint.interval`` "0", "1m"
    (long enough for >= 2 saves) and "10s"; samples/s from exact per-step timestamps
    (first 25 steps skipped). DERIVED: 1 - cost_per_save / interval, cost_per_save = median
    excess period of the step containing a save (stall + background-write contention) — the
    only honest 15 min figure from a few-minute run.
P3  Restart latency (goal <= 10 s): ``foldhpc train`` resumed after SIGUSR1/exit 75; wall time
    from Popen to the ``first_step`` record in events.jsonl (polled at 10 ms) plus the process's own
    ``status.json`` ``startup`` breakdown. Cycle 0 is the fresh start and is not counted.
P4  Signal to durable checkpoint (goal <= one step + 2 s): SIGUSR1 to the running process, time
    until a new entry is committed in checkpoints/manifest.json (polled at 5 ms) and until the
    process exits; compared with the process's median step time (batch / samples/s).
    P3 and P4 share the same start -> train a few s -> SIGUSR1 cycles.

All runs use ``train.val_every = 0``; traced runs also ``train.val_max_samples = 1`` (the
end-of-run validation comes after the last measured step; shortening it only saves time).

    python benchmarks/bench_checkpoint.py            # README figures, ~11 min on 2 cores
    python benchmarks/bench_checkpoint.py --quick    # smoke test, < 60 s idle (short cadences, few repeats)
    python benchmarks/bench_checkpoint.py --parts p3,p4
"""

from __future__ import annotations

import argparse
import math
import os
import random
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (DEFAULT_CONFIG, REPO, default_out, environment, event_tail, fmt_summary, print_table,
                     progress_windows, read_json, run_training, summary, train_cmd, verdict, wait_for,
                     write_json)

from foldhpc.chaos.eventtail import EventTail

GOAL_STALL_RATIO = 0.05
GOAL_15M = 0.995
GOAL_1M = 0.98
GOAL_RESTART_S = 10.0
GOAL_SIGNAL_EXTRA_S = 2.0
SKIP_STEPS = 25  # warm-up (DataLoader start, first progress window) left out of throughput


# ====================================================================== P1 micro
def _train_step(tr: Any) -> None:
    from foldhpc.model.loss import distogram_loss

    batch = tr.train_batches[tr.step]
    tr.model.train()
    out = tr.model(batch)
    loss, _ = distogram_loss(out["distogram_logits"].float(), batch)
    tr.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    tr.optimizer.step()
    tr.scheduler.step()
    tr.step += 1


def p1_micro(rounds: int, tmp: Path) -> dict[str, Any]:
    from foldhpc.checkpoint import CheckpointManager
    from foldhpc.config import load_config
    from foldhpc.train.loop import Trainer

    cfg = load_config(DEFAULT_CONFIG, [f"run.dir={tmp / 'p1-micro'}"])
    tr = Trainer(cfg)
    tr.timings = {}
    tr._setup()
    for _ in range(3):
        _train_step(tr)  # Adam moments exist: the checkpoint has its full size
    mgrs = {mode: CheckpointManager(tmp / f"p1-{mode}", keep_last=3, async_save=(mode == "async"))
            for mode in ("async", "sync")}
    for m in mgrs.values():
        m.preflight(3 << 20)  # creates the directory, as the Trainer does
    stall: dict[str, list[float]] = {"async": [], "sync": []}
    build: dict[str, list[float]] = {"async": [], "sync": []}
    step_after: dict[str, list[float]] = {"async": [], "sync": [], "none": []}
    write_s: list[float] = []
    size = 0
    for r in range(rounds):
        order = ["none", "async", "sync"] if r % 2 == 0 else ["sync", "async", "none"]
        for mode in order:
            t0 = time.perf_counter()
            if mode != "none":
                sd, meta = tr.state_dict(), tr.checkpoint_meta()
                t1 = time.perf_counter()
                assert mgrs[mode].save(tr.step, sd, meta, reason="bench", blocking=False)
                t2 = time.perf_counter()
                stall[mode].append(t2 - t0)
                build[mode].append(t1 - t0)
            t3 = time.perf_counter()
            _train_step(tr)  # overlaps the background write in async mode
            step_after[mode].append(time.perf_counter() - t3)
            if mode != "none":
                mgrs[mode].wait()
                last = mgrs[mode].last_committed
                assert last is not None and last.step == tr.step - 1, "save did not commit"
                size = last.bytes
                if mode == "async":
                    write_s.append(last.write_s)
    sa, ss = summary(stall["async"]), summary(stall["sync"])
    ratio = sa["median"] / ss["median"]
    ratios = [a / s for a, s in zip(stall["async"], stall["sync"])]
    res = {"rounds": rounds, "checkpoint_bytes": size, "stall_async_s": sa, "stall_sync_s": ss,
           "state_dict_and_meta_s": summary(build["async"] + build["sync"]),
           "background_write_s": summary(write_s), "ratio_async_sync": ratio,
           "ratio_async_sync_per_round": summary(ratios),
           "step_s_plain": summary(step_after["none"]),
           "step_s_during_background_write": summary(step_after["async"]),
           "step_s_after_sync_save": summary(step_after["sync"]), "goal_ratio": GOAL_STALL_RATIO}
    ms = dict(unit="ms", scale=1e3, digits=2)
    print_table(f"P1 micro: training-thread stall per checkpoint ({size / 2**20:.2f} MiB, {rounds} rounds, "
                "real Trainer state)", ["what", "figure"],
                [["stall async (state_dict+meta+snapshot)", fmt_summary(sa, **ms)],
                 ["stall sync (state_dict+meta+write+fsync)", fmt_summary(ss, **ms)],
                 ["  of which state_dict()+checkpoint_meta()", fmt_summary(res["state_dict_and_meta_s"], **ms)],
                 ["background write (async, off-thread)", fmt_summary(res["background_write_s"], **ms)],
                 ["RATIO async/sync (medians)", f"{ratio:.1%}  goal <= {GOAL_STALL_RATIO:.0%}: "
                                                f"{verdict(ratio <= GOAL_STALL_RATIO, ratio)}"],
                 ["  per-round ratio", fmt_summary(summary(ratios), "%", 100, 1)],
                 ["train step, no save", fmt_summary(res["step_s_plain"], **ms)],
                 ["train step overlapping background write", fmt_summary(res["step_s_during_background_write"],
                                                                         **ms)]])
    return res


# ====================================================================== traced runs
def analyze_trace(tr: dict[str, Any], skip: int = SKIP_STEPS, fallback_normal_s: float = math.nan
                  ) -> dict[str, Any]:
    """Per-step periods, save stalls and throughput from a _trainrun.py trace.

    ``fallback_normal_s``: normal step period to use when the run has no step without a save
    nearby (a very slow machine with a short cadence): the baseline run's.
    """
    steps = [(int(s), float(t)) for s, t in tr["steps"]]
    b = int(tr["batch_size"])
    period = {s: t - tp for (sp, tp), (s, t) in zip(steps, steps[1:]) if s == sp + 1}
    saves = [x for x in tr["saves"] if x["reason"] in ("timer", "steps") and x["started"]]
    save_steps = {int(x["step"]) for x in saves}
    with_save = [period[s + 1] for s in sorted(save_steps) if s + 1 in period and s + 1 > skip]
    normal = [p for s, p in period.items() if s > skip and (s - 1) not in save_steps and (s - 2) not in save_steps]
    after2 = [period[s + 2] for s in sorted(save_steps) if s + 2 in period and s + 2 > skip]
    med_normal = statistics.median(normal) if normal else fallback_normal_s
    sel = [(s, t) for s, t in steps if s >= skip]
    thr = (sel[-1][0] - sel[0][0]) * b / (sel[-1][1] - sel[0][1]) if len(sel) > 1 else float("nan")
    seg = []  # throughput of 4 equal segments: in-run noise
    if len(sel) > 8:
        q = len(sel) // 4
        for i in range(4):
            a, z = sel[i * q], sel[min(len(sel) - 1, (i + 1) * q)]
            seg.append((z[0] - a[0]) * b / (z[1] - a[1]))
    return {"n_steps": len(sel) - 1, "train_s": sel[-1][1] - sel[0][1] if len(sel) > 1 else 0.0,
            "samples_per_s": thr, "segment_samples_per_s": summary(seg),
            "n_saves": len(saves), "save_steps": sorted(save_steps),
            "stall_s": summary([x["t1"] - x["t0"] for x in saves]),
            "period_normal_s": summary(normal), "period_with_save_s": summary(with_save),
            "excess_per_save_s": summary([p - med_normal for p in with_save]),
            "excess_values_s": [p - med_normal for p in with_save],
            "excess_next_step_s": summary([p - med_normal for p in after2])}


def traced_run(tmp: Path, name: str, overrides: list[str]) -> dict[str, Any]:
    run_dir, trace = tmp / name, tmp / f"{name}.trace.json"
    code = run_training(run_dir, ["train.val_every=0", "train.val_max_samples=1", *overrides], trace=trace)
    if code != 0:
        raise SystemExit(f"traced run {name} failed (exit {code}); see {run_dir}.console")
    return read_json(trace)


def p1_real(steps: int, every: int, tmp: Path) -> dict[str, Any]:
    res: dict[str, Any] = {"steps": steps, "every_steps": every}
    for mode in ("async", "sync"):
        tr = traced_run(tmp, f"p1-real-{mode}", [f"train.max_steps={steps}", "checkpoint.interval=0",
                                                  f"checkpoint.every_steps={every}",
                                                  f"checkpoint.async_save={str(mode == 'async').lower()}"])
        res[mode] = analyze_trace(tr)
    a, s = res["async"], res["sync"]
    res["ratio_async_sync_stall"] = a["stall_s"]["median"] / s["stall_s"]["median"]
    ms = dict(unit="ms", scale=1e3, digits=1)
    print_table(f"P1 real run: traced Trainer, save every {every} steps, {steps} steps per mode",
                ["mode", "saves", "stall in Trainer._save", "period, step with save", "period, normal step",
                 "excess per save"],
                [[m, res[m]["n_saves"], fmt_summary(res[m]["stall_s"], **ms),
                  fmt_summary(res[m]["period_with_save_s"], **ms), fmt_summary(res[m]["period_normal_s"], **ms),
                  fmt_summary(res[m]["excess_per_save_s"], **ms)] for m in ("async", "sync")]
                + [["RATIO async/sync stall", "", f"{res['ratio_async_sync_stall']:.1%} "
                    f"{verdict(res['ratio_async_sync_stall'] <= GOAL_STALL_RATIO)}", "", "", ""]])
    return res


def p2(steps: int, cadences: list[str], tmp: Path, quick: bool, skip: int = SKIP_STEPS) -> dict[str, Any]:
    from foldhpc.config import parse_duration

    res: dict[str, Any] = {"steps": steps, "cadences": cadences, "skip_steps": skip, "runs": {}}
    for c in ["0", *cadences]:
        tr = traced_run(tmp, f"p2-{c}", [f"train.max_steps={steps}", f"checkpoint.interval={c}"])
        res["runs"][c] = analyze_trace(tr, skip, res["runs"]["0"]["period_normal_s"]["median"] if c != "0" else math.nan)
    base = res["runs"]["0"]["samples_per_s"]
    excess = [e for c in cadences for e in res["runs"][c]["excess_values_s"]]
    stalls = [res["runs"][c]["stall_s"]["median"] for c in cadences if res["runs"][c]["n_saves"]]
    cost = statistics.median(excess) if excess else float("nan")
    res["cost_per_save_s"] = summary(excess)
    rows = [["0 (disabled)", "measured", 0, f"{base:.2f}", fmt_summary(res["runs"]["0"]["segment_samples_per_s"],
                                                                       digits=1), "1.000 (baseline)", ""]]
    for c in cadences:
        r = res["runs"][c]
        ratio = r["samples_per_s"] / base
        r["ratio_vs_disabled"] = ratio
        goal = GOAL_1M if parse_duration(c) <= 60 else GOAL_15M
        note = f"goal >= {goal:.1%} ({'1m' if goal == GOAL_1M else '15m'}) {verdict(ratio >= goal, ratio)}" \
            if c in ("1m", "15m") else "(extra cadence: more saves)"
        if c == "1m" and r["n_saves"] < 2:
            note += f" WARNING only {r['n_saves']} save(s)"
        rows.append([c, "measured", r["n_saves"], f"{r['samples_per_s']:.2f}",
                     fmt_summary(r["segment_samples_per_s"], digits=1), f"{ratio:.4f}", note])
    derived = {}
    for label, sec, goal in (("15m", 900.0, GOAL_15M), ("1m", 60.0, GOAL_1M)):
        d = 1.0 - max(cost, 0.0) / sec
        derived[label] = d
        rows.append([label, "derived", "", "", "", f"{d:.5f}",
                     f"= 1 - {cost * 1e3:.1f} ms/{sec:.0f} s; goal >= {goal:.1%} {verdict(d >= goal, d)}"])
    res["derived_ratio"] = derived
    res["stall_median_s"] = stalls
    print_table(f"P2 throughput vs checkpoint cadence ({steps} steps per run, first {skip} skipped; "
                f"async saves{'; QUICK: short cadences only' if quick else ''})",
                ["interval", "kind", "saves", "samples/s", "4 segments (noise)", "ratio vs disabled", "note"], rows)
    print(f"cost per save (excess period of the step containing it, all cadences): "
          f"{fmt_summary(res['cost_per_save_s'], 'ms', 1e3, 1)}; stall in Trainer._save (median per run): "
          f"{', '.join(f'{s * 1e3:.1f} ms' for s in stalls)}")
    return res


# ====================================================================== P3 + P4
def _seen(tail: EventTail, start: int, kind: str, pid: int | None = None) -> int:
    """How many records of ``kind`` (of process ``pid``) the run has appended from position ``start`` on."""
    tail.poll()
    return len(tail.since(start, kind, pid=pid))


def _manifest_steps(path: Path) -> set[int] | None:
    m = read_json(path)
    if not isinstance(m, dict):
        return None
    return {int(e["step"]) for e in m.get("checkpoints", [])}


def p3_p4(cycles: int, train_s: float, log_every: int, tmp: Path, windows: int = 3) -> dict[str, Any]:
    run_dir = tmp / "restart"
    status, manifest = run_dir / "status.json", run_dir / "checkpoints" / "manifest.json"
    tail = event_tail(run_dir)  # one reader over every cycle: a cycle's records are those from `start` on
    cmd = train_cmd(run_dir, ["train.max_steps=1000000", "train.val_every=0", f"run.log_every={log_every}"])
    rows_p3, rows_p4, records = [], [], []
    rng = random.Random(0)
    for i in range(cycles):
        tail.poll()
        start = len(tail.events)
        prev_startup = (read_json(status) or {}).get("startup")
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        console = open(f"{run_dir}.console", "ab")
        t0 = time.monotonic()
        p = subprocess.Popen(cmd, cwd=REPO, stdout=console, stderr=subprocess.STDOUT)
        try:
            ok = wait_for(lambda: _seen(tail, start, "first_step") or p.poll() is not None, 300, 0.01)
            t_first = time.monotonic() - t0
            if not ok or p.poll() is not None:
                raise SystemExit(f"cycle {i}: no first step (exit {p.poll()}); see {run_dir}.console")
            st = wait_for(lambda: (s := read_json(status)) and s.get("pid") == p.pid
                          and s.get("startup") not in (None, prev_startup) and s, 10)
            startup = dict(st["startup"]) if st else {}
            # train >= train_s and >= `windows` progress lines (a step-time estimate), then signal at a
            # random point within a step
            t_min = time.monotonic() + train_s
            wait_for(lambda: time.monotonic() >= t_min and _seen(tail, start, "progress", p.pid) >= windows, 300, 0.05)
            time.sleep(rng.uniform(0.0, 0.2))
            before = _manifest_steps(manifest) or set()
            t_sig = time.monotonic()
            os.kill(p.pid, signal.SIGUSR1)
            new = wait_for(lambda: (s := _manifest_steps(manifest)) is not None and s - before, 120, 0.005)
            t_durable = time.monotonic() - t_sig
            wait_for(lambda: p.poll() is not None, 120, 0.005)
            t_exit = time.monotonic() - t_sig
            rc = p.poll()
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            console.close()
        tail.poll()
        win = progress_windows(e.event for e in tail.since(start, "progress", pid=p.pid))
        steady = win[1:] or win
        sps = statistics.median(x["samples_per_s"] for x in steady) if steady else float("nan")
        step_s = 4 / sps if sps == sps else float("nan")  # batch 4 (default config)
        rec = {"cycle": i, "resumed": i > 0, "wall_popen_to_first_step_s": t_first, "startup": startup,
               "signal_to_durable_s": t_durable if new else None, "signal_to_exit_s": t_exit, "exit_code": rc,
               "median_step_s": step_s, "new_checkpoint_steps": sorted(new) if new else []}
        records.append(rec)
        if rc != 75 or not new:
            print(f"WARNING cycle {i}: exit {rc}, new checkpoint {new}")
    resumed = [r for r in records if r["resumed"]]
    keys = ["imports_s", "setup_s", "data_s", "checkpoint_load_s", "first_step_s", "process_to_first_step_s"]
    p3 = {"n": len(resumed), "wall_popen_to_first_step_s": summary(r["wall_popen_to_first_step_s"] for r in resumed)}
    for k in keys:
        p3[k] = summary(r["startup"].get(k, float("nan")) for r in resumed if k in r["startup"])
    fresh = records[0]
    for k in ["wall_popen_to_first_step_s"]:
        rows_p3.append(["wall: Popen -> 'first step' line (outside)", fmt_summary(p3[k], "s", digits=2),
                        f"{fresh[k]:.2f} s"])
    labels = {"imports_s": "imports (process age at Trainer.run)", "setup_s": "setup (data+model+optim+preflight)",
              "data_s": "  of which data (warm cache)", "checkpoint_load_s": "checkpoint load + verify",
              "first_step_s": "first step (incl. DataLoader start)",
              "process_to_first_step_s": "process start -> first step (inside)"}
    for k in keys:
        rows_p3.append([labels[k], fmt_summary(p3[k], "s", digits=2),
                        f"{fresh['startup'].get(k, float('nan')):.2f} s" if k in fresh["startup"] else "-"])
    # the process measures its own age from /proc; it cannot be older than the Popen call
    skew = [r["startup"]["process_to_first_step_s"] - r["wall_popen_to_first_step_s"]
            for r in resumed if "process_to_first_step_s" in r["startup"]]
    p3["inside_minus_outside_s"] = summary(skew)
    rows_p3.append(["inside - outside (must be <= 0)", fmt_summary(p3["inside_minus_outside_s"], "s", digits=2),
                    "" if not skew or statistics.median(skew) <= 0.05 else "process_age_s() over-reports"])
    med = p3["wall_popen_to_first_step_s"]["median"]
    p3["goal_s"] = GOAL_RESTART_S
    rows_p3.append(["RATIO wall / goal", f"{med / GOAL_RESTART_S:.2f}  (goal <= {GOAL_RESTART_S:.0f} s) "
                                         f"{verdict(med <= GOAL_RESTART_S, med)}", ""])
    print_table(f"P3 restart latency: resume after SIGUSR1/exit 75, {len(resumed)} restarts",
                ["what", "resumed: median [min..max]", "fresh start (cycle 0)"], rows_p3)

    dur = [r["signal_to_durable_s"] for r in records if r["signal_to_durable_s"] is not None]
    ex = [r["signal_to_exit_s"] for r in records]
    steps = [r["median_step_s"] for r in records]
    budget = [s + GOAL_SIGNAL_EXTRA_S for s in steps]
    margin = [d / b for d, b in zip(dur, budget)]
    p4 = {"n": len(records), "signal_to_durable_s": summary(dur), "signal_to_exit_s": summary(ex),
          "median_step_s": summary(steps), "goal_s": summary(budget), "ratio_to_goal": summary(margin),
          "exit_codes": [r["exit_code"] for r in records]}
    ms = dict(unit="ms", scale=1e3, digits=0)
    rows_p4 = [["SIGUSR1 -> new entry in manifest.json", fmt_summary(p4["signal_to_durable_s"], **ms)],
               ["SIGUSR1 -> process exit", fmt_summary(p4["signal_to_exit_s"], **ms)],
               ["median step time of that process", fmt_summary(p4["median_step_s"], **ms)],
               ["goal = step + 2 s", fmt_summary(p4["goal_s"], **ms)],
               ["RATIO durable / goal", f"{fmt_summary(p4['ratio_to_goal'], digits=3)} "
                                        f"{verdict(bool(margin) and max(margin) <= 1.0, *margin)} (every signal)"],
               ["durable / step time", fmt_summary(summary(d / s for d, s in zip(dur, steps)), "steps", digits=2)],
               ["exit codes", " ".join(map(str, p4["exit_codes"]))]]
    print_table(f"P4 signal -> durable checkpoint ({len(records)} signals, polled every 5 ms)", ["what", "figure"],
                rows_p4)
    return {"p3": p3, "p4": p4, "cycles": records, "train_s_before_signal": train_s, "log_every": log_every}


# ====================================================================== main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke test (< 60 s): few repeats, short cadences")
    ap.add_argument("--parts", default="p1,p2,p3,p4", help="comma list of p1,p2,p3,p4 (p3 and p4 run together)")
    ap.add_argument("--out", type=Path, default=default_out("bench_checkpoint"))
    args = ap.parse_args()
    args.out = args.out.resolve()
    os.chdir(REPO)
    parts = {p.strip().lower() for p in args.parts.split(",") if p.strip()}
    q = args.quick
    print(f"bench_checkpoint ({'quick' if q else 'full'}): parts {','.join(sorted(parts))}, "
          f"{len(os.sched_getaffinity(0))} CPUs, load {os.getloadavg()[0]:.2f}")
    t_start = time.perf_counter()
    out: dict[str, Any] = {"mode": "quick" if q else "full", "env": environment()}
    with tempfile.TemporaryDirectory(prefix="foldhpc-bench-ckpt-") as d:
        tmp = Path(d)
        step_s = 0.17
        if "p1" in parts:
            out["p1_micro"] = p1_micro(3 if q else 20, tmp)
            step_s = out["p1_micro"]["step_s_plain"]["median"]
            if not q:
                out["p1_real"] = p1_real(200, 10, tmp)
                step_s = out["p1_real"]["async"]["period_normal_s"]["median"]
        if "p2" in parts:
            if q:
                out["p2"] = p2(30, ["2s"], tmp, quick=True, skip=8)
            else:
                # long enough for "1m" to fire twice: >= 135 s of training at the measured step time,
                # or at 0.15 s/step (a quiet 2-core machine) if the machine is slower right now
                steps = SKIP_STEPS + math.ceil(135.0 / min(step_s, 0.15))
                out["p2"] = p2(steps, ["1m", "10s"], tmp, quick=False)
        if parts & {"p3", "p4"}:
            out["p3_p4"] = p3_p4(2, 0.5, 5, tmp, windows=2) if q else p3_p4(6, 5.0, 10, tmp)
    out["elapsed_s"] = time.perf_counter() - t_start
    print(f"\ntotal {out['elapsed_s']:.0f}s")
    write_json(args.out, out)


if __name__ == "__main__":
    main()
