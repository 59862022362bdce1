"""Data path benchmark: parsing, cached loading, batch building and the training loop's data wait.

Measures, on the default CPU demo (configs/default.toml: examples/data, 329 real PDB/mmCIF files):

(a) cold preparation: ``prepare_dataset`` into a fresh cache directory (temp dir), with the
    default parser processes (``data.prepare_workers = 0`` = one per CPU) and with 1 process:
    structures parsed per second (scan + hash + parse + cache write, files in the OS page cache);
(b) warm start: ``prepare_dataset`` on the filled cache (a rescan: stat per file, the mapped store) in chains/s, then
    ``TrainBatches.__getitem__`` at the default batch/crop in samples/s, and the same batches
    delivered through the Trainer's DataLoader (``data.num_workers`` 1 = default, and 0);
(c) share of training-step time spent waiting for data on the default config (goal <= 1 %):
    ``foldhpc train`` with ``train.val_every = 0`` (and ``train.val_max_samples = 1``: only the
    end-of-run validation, outside the measurement, is shortened), the ``data_wait_frac`` of each
    ``progress`` record in events.jsonl; median over log windows, the first window (DataLoader start) reported
    apart. The same run with ``data.num_workers = 1`` (one DataLoader worker) for comparison; 0 is the default.

Noisy shared machine: every figure is a median [min..max] over repeats; conditions that are
compared are interleaved and measured in the same invocation.

    python benchmarks/bench_data.py            # README figures, ~4 min on 2 cores
    python benchmarks/bench_data.py --quick    # smoke test, < 60 s
    python benchmarks/bench_data.py --parsers  # (d) only: cold parse CPU per file, foldhpc vs gemmi

(d) ``--parsers``: CPU time (``time.process_time``) to parse each file of examples/data in
    this one process, foldhpc's ``parse_structure`` and, if gemmi is installed
    (``pip install gemmi``), ``gemmi.read_structure`` plus the same backbone atoms (N, CA, C,
    O of the standard residues and MSE, highest-occupancy altloc per atom: the work, not
    foldhpc's every rule), interleaved file by file, median over repeats per file, then the
    median and mean over files, per format.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (DEFAULT_CONFIG, REPO, default_out, environment, fmt_summary, print_table,
                     progress_records, run_training, summary, verdict, write_json)

from foldhpc.config import Config, load_config
from foldhpc.data.cache import _n_workers, prepare_dataset
from foldhpc.data.dataset import StepSampler, TrainBatches, split_by_sequence

GOAL_DATA_WAIT = 0.01


def _prepare(cfg: Config, cache: Path, workers: int, data: Path | None = None):
    d = cfg.data
    return prepare_dataset(data or REPO / d.path, cache, min_length=d.min_length, max_length=d.max_length,
                           min_completeness=d.min_completeness, workers=workers, progress=False)


def _subset(cfg: Config, n: int, tmp: Path) -> Path:
    """A folder of symlinks to the first ``n`` structure files (quick mode)."""
    src = REPO / cfg.data.path
    dst = tmp / f"subset-{n}"
    dst.mkdir()
    for f in sorted(p for p in src.iterdir() if p.is_file() and not p.name.lower().startswith((".", "readme", "manifest")))[:n]:
        (dst / f.name).symlink_to(f)
    return dst


def bench_cold(cfg: Config, repeats: int, tmp: Path, subset: int = 0) -> dict[str, Any]:
    data = _subset(cfg, subset, tmp) if subset else None
    default_workers = _n_workers(cfg.data.prepare_workers, 10**6)
    counts = [default_workers] + ([1] if default_workers != 1 else [])
    rates: dict[int, list[float]] = {w: [] for w in counts}
    secs: dict[int, list[float]] = {w: [] for w in counts}
    n_files = 0
    for r in range(repeats):
        for w in counts:  # interleaved
            cache = tmp / f"cold-{w}-{r}"
            t0 = time.perf_counter()
            rep = _prepare(cfg, cache, w, data)
            dt = time.perf_counter() - t0
            assert rep.n_parsed > 0 and rep.n_cached == 0, "cache was not cold"
            n_files = rep.n_parsed
            rates[w].append(rep.n_parsed / dt)
            secs[w].append(dt)
    res = {f"workers_{w}": {"structures_per_s": summary(rates[w]), "seconds": summary(secs[w])} for w in counts}
    res["n_files"] = n_files
    res["default_workers"] = default_workers
    rows = [[f"{w}{' (default)' if w == default_workers else ''}", n_files,
             fmt_summary(summary(secs[w]), "s", digits=2), fmt_summary(summary(rates[w]), "/s", digits=1)]
            for w in counts]
    if len(counts) == 2:
        speedup = statistics.median(rates[default_workers]) / statistics.median(rates[1])
        res["speedup_default_vs_1"] = speedup
        rows.append([f"ratio {default_workers}/1 workers", "", "", f"{speedup:.2f}x"])
    res["subset"] = subset or None
    print_table("(a) cold prepare_dataset (fresh cache dir; files in page cache)"
                + (f" -- QUICK: first {subset} files only" if subset else ""),
                ["parser processes", "files", "time", "structures parsed/s"], rows)
    return res


def _loader(batches: TrainBatches, nw: int, start: int, stop: int, signals: list[Any]):
    from torch.utils.data import DataLoader
    import torch

    from foldhpc.train.loop import _worker_init

    return DataLoader(batches, batch_size=None, sampler=StepSampler(start, stop), num_workers=nw,
                      prefetch_factor=4 if nw else None,
                      worker_init_fn=functools.partial(_worker_init, signals) if nw else None,
                      generator=torch.Generator())


def bench_warm(cfg: Config, repeats: int, n_batches: int, tmp: Path) -> dict[str, Any]:
    cache = tmp / "warm"
    _prepare(cfg, cache, 0)  # fill
    load_s, chains = [], 0
    for _ in range(repeats * 2):
        t0 = time.perf_counter()
        rep = _prepare(cfg, cache, 0)
        load_s.append(time.perf_counter() - t0)
        assert rep.n_parsed == 0, "warm load parsed files"
        chains = len(rep.records)
    train, _ = split_by_sequence(rep.records, cfg.data.val_fraction, cfg.data.split_seed)
    t = cfg.train
    batches = TrainBatches(train, t.batch_size, cfg.data.crop_size, t.seed)
    getitem: list[float] = []
    loader: dict[int, list[float]] = {0: [], 1: []}
    signals = cfg.checkpoint.signal_numbers()
    for r in range(repeats):
        start = r * n_batches  # new steps each repeat (no cached permutation advantage beyond an epoch)
        t0 = time.perf_counter()
        for s in range(start, start + n_batches):
            batches[s]
        getitem.append(n_batches * t.batch_size / (time.perf_counter() - t0))
        for nw in (1, 0):
            it = iter(_loader(batches, nw, start, start + n_batches + 1, signals))
            next(it)  # worker start-up is not throughput
            t0 = time.perf_counter()
            for _ in range(n_batches):
                next(it)
            loader[nw].append(n_batches * t.batch_size / (time.perf_counter() - t0))
            del it
    res = {"chains": chains, "warm_load_s": summary(load_s),
           "warm_load_chains_per_s": summary([chains / s for s in load_s]),
           "getitem_samples_per_s": summary(getitem),
           "dataloader_nw1_samples_per_s": summary(loader[1]),
           "dataloader_nw0_samples_per_s": summary(loader[0]),
           "batch_size": t.batch_size, "crop_size": cfg.data.crop_size, "n_batches": n_batches}
    print_table("(b) warm cache and batch building (default batch/crop)",
                ["what", "figure"],
                [["warm prepare_dataset (rescan, store hit)", fmt_summary(summary(load_s), "s", digits=3)],
                 ["  = chains/s", fmt_summary(res["warm_load_chains_per_s"], "/s", digits=0)],
                 [f"TrainBatches[step] (B={t.batch_size}, crop={cfg.data.crop_size})",
                  fmt_summary(res["getitem_samples_per_s"], "samples/s", digits=0)],
                 ["  via DataLoader num_workers=1", fmt_summary(res["dataloader_nw1_samples_per_s"],
                                                                        "samples/s", digits=0)],
                 ["  via DataLoader num_workers=0", fmt_summary(res["dataloader_nw0_samples_per_s"],
                                                               "samples/s", digits=0)]])
    return res


def _windows(run_dir: Path) -> list[dict[str, float]]:
    return progress_records(run_dir)


def bench_wait(steps: int, repeats: int, log_every: int, variants: list[int], batch: int, tmp: Path
               ) -> dict[str, Any]:
    per: dict[int, dict[str, list[float]]] = {nw: {"wait": [], "first": [], "sps": [], "weighted": [],
                                                   "wait_ms": [], "step_ms": []} for nw in variants}
    for r in range(repeats):
        for nw in variants:  # interleaved
            run_dir = tmp / f"wait-nw{nw}-{r}"
            code = run_training(run_dir, [f"train.max_steps={steps}", "train.val_every=0", "train.val_max_samples=1",
                                          f"run.log_every={log_every}", f"data.num_workers={nw}"])
            if code != 0:
                raise SystemExit(f"training run failed (exit {code}); see {run_dir}.console")
            w = _windows(run_dir)
            per[nw]["first"].append(w[0]["data_wait_frac"])
            steady = w[1:]
            per[nw]["wait"] += [x["data_wait_frac"] for x in steady]
            per[nw]["sps"] += [x["samples_per_s"] for x in steady]
            # absolute figures per step: less sensitive to a busy machine slowing the compute
            per[nw]["step_ms"] += [1e3 * batch / x["samples_per_s"] for x in steady]
            per[nw]["wait_ms"] += [1e3 * x["data_wait_frac"] * batch / x["samples_per_s"] for x in steady]
            # time-weighted over the steady windows (window time = steps * B / samples_per_s)
            dts = [log_every / x["samples_per_s"] for x in steady]
            per[nw]["weighted"].append(sum(x["data_wait_frac"] * d for x, d in zip(steady, dts)) / sum(dts))
    res: dict[str, Any] = {"goal": GOAL_DATA_WAIT, "steps": steps, "log_every": log_every, "repeats": repeats}
    rows = []
    for nw in variants:
        s = summary(per[nw]["wait"])
        res[f"num_workers_{nw}"] = {"data_wait_frac_windows": s, "first_window": summary(per[nw]["first"]),
                                    "time_weighted_per_run": summary(per[nw]["weighted"]),
                                    "samples_per_s_windows": summary(per[nw]["sps"]),
                                    "step_ms_windows": summary(per[nw]["step_ms"]),
                                    "data_wait_ms_per_step_windows": summary(per[nw]["wait_ms"]),
                                    "median_vs_goal": s["median"] / GOAL_DATA_WAIT}
        label = f"num_workers={nw}" + (" (default)" if nw == 0 else " (1 worker)")
        rows.append([label, fmt_summary(s, "%", 100, 2), fmt_summary(summary(per[nw]["first"]), "%", 100, 1),
                     f"{s['median'] / GOAL_DATA_WAIT:.2f}x goal {verdict(s['median'] <= GOAL_DATA_WAIT)}",
                     fmt_summary(summary(per[nw]["step_ms"]), "", digits=0),
                     fmt_summary(summary(per[nw]["wait_ms"]), "", digits=2)])
    print_table(f"(c) data wait share of step time, default config, {steps} steps x {repeats} runs, "
                f"log window {log_every} steps (goal <= {GOAL_DATA_WAIT:.0%})",
                ["loader", "data wait, steady windows", "first window", "median / goal", "step ms",
                 "data wait ms/step"], rows)
    return res


_BACKBONE = ("N", "CA", "C", "O")
# the standard residues and MSE (foldhpc.data.structure's set, repeated so that (d) also runs
# against older foldhpc versions for a before/after figure)
_PROTEIN_NAMES = frozenset("ALA CYS ASP GLU PHE GLY HIS ILE LYS LEU MET ASN PRO GLN ARG SER THR VAL TRP "
                           "TYR MSE".split())


def _gemmi_backbone(path: Path) -> list[Any]:
    """gemmi's side of (d): model 1, per chain the [L, 4, 3] coordinates, [L, 4] mask and
    residue numbers of the residues with a CA, as arrays (what a ProteinChain holds)."""
    import gemmi  # optional: only for the side-by-side figure
    import numpy as np

    st = gemmi.read_structure(str(path), merge_chain_parts=False)
    out = []
    for chain in st[0]:
        coords, masks, numbers = [], [], []
        for res in chain:
            if res.name not in _PROTEIN_NAMES:  # also read as is by gemmi: PDB and mmCIF alike
                continue
            best: list[Any] = [None] * 4
            for atom in res:
                if atom.name in _BACKBONE:
                    k = _BACKBONE.index(atom.name)
                    if best[k] is None or atom.occ > best[k].occ:
                        best[k] = atom
            if best[1] is None:
                continue
            coords.append([(a.pos.x, a.pos.y, a.pos.z) if a is not None else (0.0, 0.0, 0.0) for a in best])
            masks.append([a is not None for a in best])
            numbers.append(res.seqid.num)
        if coords:
            out.append((np.asarray(coords, np.float32), np.asarray(masks, np.bool_), np.asarray(numbers, np.int32)))
    return out


def bench_parsers(repeats: int) -> dict[str, Any]:
    from foldhpc.data.structure import StructureError, parse_structure

    try:
        import gemmi  # noqa: F401
        readers = {"foldhpc": parse_structure, "gemmi": _gemmi_backbone}
    except ImportError:
        print("gemmi is not installed (pip install gemmi): foldhpc only")
        readers = {"foldhpc": parse_structure}
    files = sorted(p for p in (REPO / "examples" / "data").glob("*.gz"))
    times: dict[str, dict[Path, list[float]]] = {k: {f: [] for f in files} for k in readers}
    for _ in range(repeats):
        for f in files:
            for name, read in readers.items():
                t0 = time.process_time()
                try:
                    read(f)
                except (StructureError, RuntimeError, ValueError):
                    pass
                times[name][f].append(time.process_time() - t0)
    res: dict[str, Any] = {}
    rows = []
    for fmt, sel in (("all", lambda f: True), ("pdb", lambda f: ".pdb" in f.name),
                     ("mmcif", lambda f: ".cif" in f.name)):
        chosen = [f for f in files if sel(f)]
        per = {k: [statistics.median(times[k][f]) * 1e3 for f in chosen] for k in readers}
        res[fmt] = {k: {"median_ms": statistics.median(v), "mean_ms": statistics.mean(v)} for k, v in per.items()}
        rows.append([fmt, str(len(chosen))] + [f"{statistics.median(v):.1f} / {statistics.mean(v):.1f}"
                                               for v in per.values()])
    print_table("(d) cold parse, CPU ms per file, one process", ["files", "n"]
                + [f"{k} median / mean" for k in readers], rows)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke test (< 60 s): fewer repeats, shorter runs")
    ap.add_argument("--out", type=Path, default=default_out("bench_data"))
    ap.add_argument("--parsers", action="store_true", help="only (d): cold parse CPU per file, foldhpc vs gemmi")
    args = ap.parse_args()
    args.out = args.out.resolve()
    os.chdir(REPO)
    cfg = load_config(DEFAULT_CONFIG)
    q = args.quick
    if args.parsers:
        write_json(args.out, {"mode": "parsers", "env": environment(), "parsers": bench_parsers(3)})
        return
    print(f"bench_data ({'quick' if q else 'full'}): config {DEFAULT_CONFIG.relative_to(REPO)}, "
          f"data {cfg.data.path}, {len(os.sched_getaffinity(0))} CPUs, load {os.getloadavg()[0]:.2f}")
    t_start = time.perf_counter()
    out: dict[str, Any] = {"mode": "quick" if q else "full", "env": environment()}
    with tempfile.TemporaryDirectory(prefix="foldhpc-bench-data-") as d:
        tmp = Path(d)
        out["cold"] = bench_cold(cfg, 1, tmp, subset=60) if q else bench_cold(cfg, 3, tmp)
        out["warm"] = bench_warm(cfg, 2 if q else 5, 100 if q else 400, tmp)
        out["data_wait"] = (bench_wait(30, 1, 5, [1], cfg.train.batch_size, tmp) if q
                            else bench_wait(200, 2, 25, [1, 0], cfg.train.batch_size, tmp))
    # consumption vs production: how far ahead of training the batch builder is
    train_sps = out["data_wait"]["num_workers_1"]["samples_per_s_windows"]["median"]
    out["headroom_getitem_vs_training"] = out["warm"]["getitem_samples_per_s"]["median"] / train_sps
    out["elapsed_s"] = time.perf_counter() - t_start
    step_ms = out["data_wait"]["num_workers_1"]["step_ms_windows"]["median"]
    b = cfg.train.batch_size
    per_batch = {nw: 1e3 * b / out["warm"][f"dataloader_nw{nw}_samples_per_s"]["median"] for nw in (0, 1)}
    out["loader_ms_per_batch"] = per_batch
    out["loader_share_of_step"] = {nw: v / step_ms for nw, v in per_batch.items()}
    print(f"\nbatch building is {out['headroom_getitem_vs_training']:.0f}x faster than training consumes "
          f"({train_sps:.1f} samples/s).\nhanding one batch over costs {per_batch[1]:.2f} ms through the "
          f"DataLoader with num_workers=1 = {per_batch[1] / step_ms:.1%} of the median step "
          f"({step_ms:.0f} ms), {per_batch[0]:.2f} ms = {per_batch[0] / step_ms:.2%} with num_workers=0; "
          f"total {out['elapsed_s']:.0f}s")
    write_json(args.out, out)


if __name__ == "__main__":
    main()
