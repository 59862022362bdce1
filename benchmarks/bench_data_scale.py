"""Dataset warm start at PDB scale: time, file-system calls and memory at 1x, 10x and 61x the shipped set.

People train on 100k-200k PDB chains on a parallel file system where every ``stat`` is a
metadata round trip, with several processes per node (DataLoader workers, one rank per GPU).
This benchmark builds data folders of 1x, 10x and 61x the shipped ``examples/data`` (329
files; copy ``k`` of every file is made unique by a leading gzip member holding
``REMARK 999`` / a ``#`` comment, so it has its own content hash and cache entry, and parses
to the same chains), prepares them once, then measures a **warm start** - ``load_dataset``
on the prepared cache in a fresh process - for:

* ``baseline``: the code before the sealed manifest and the mapped store (``--baseline-rev``,
  extracted with ``git archive`` into the temp dir and run in the same invocation),
* ``trusted``: this code, default warm start (sealed manifest, memory-mapped store),
* ``rescan``: this code with ``FOLDHPC_DATA_RESCAN=1`` (stat every file, as ``foldhpc data prepare``).

Per warm start: load time (median over interleaved repeats); file-system calls counted with
``strace -f -c`` (one extra run each; stat family, openat, getdents64); memory from
``/proc/self/smaps_rollup`` after the records were loaded and every residue read once (an
epoch): RSS of the process, private memory (USS) of a forked worker that reads every record
(a DataLoader worker) and of an independent second process on the same cache while the
first one lives (another rank). USS is what an extra process really adds: pages of a
memory-mapped store are shared through the page cache and count in RSS but not in USS.

The cold preparation of the 61x set runs as two concurrent ``--shard i/2`` processes plus
the merge (the Slurm array flow), and is reported too. Everything lives in a temp dir that
is deleted at the end (~2.2 GB for 61x).

    python benchmarks/bench_data_scale.py            # README figures, ~12 min on 2 cores
    python benchmarks/bench_data_scale.py --quick    # smoke test: 30 files x (1, 3) copies
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import REPO, default_out, environment, fmt_summary, print_table, summary, verdict, write_json

BASELINE_REV = "db118fb^"  # the commit before the data module split, manifest and store
GOAL_WARM_S = 2.0
GOAL_FILES = 20_000
FILTERS = dict(min_length=40, max_length=1000, min_completeness=0.9)
VARIANTS = ("baseline", "trusted", "rescan")
FS_CALLS = ("newfstatat", "statx", "stat", "lstat", "fstat", "openat", "getdents64")

CHILD = r'''
import json, os, subprocess, sys, time
code_root, role, data, cache = sys.argv[1:5]
sys.path.insert(0, code_root)
t = time.perf_counter()
from foldhpc.config import DataConfig
from foldhpc.data.cache import load_dataset
import_s = time.perf_counter() - t

def mem():
    out = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            k, _, rest = line.partition(":")
            if k in ("Rss", "Pss", "Private_Clean", "Private_Dirty"):
                out[k] = int(rest.split()[0]) * 1024
    out["uss"] = out["Private_Clean"] + out["Private_Dirty"]
    return out

m0 = mem()
t = time.perf_counter()
rep = load_dataset(DataConfig(path=data, cache_dir=cache, prepare_workers=1, **FILTERS), progress=False)
load_s = time.perf_counter() - t
assert rep.n_parsed == 0, "warm start parsed files"
m1 = mem()

def touch():  # one epoch of reads: every residue of every record
    s = 0.0
    for r in rep.records:
        s += float(r.coords.sum()) + int(r.aatype.sum()) + int(r.atom_mask.sum()) + int(r.residue_index[-1])
    return s

if role == "count":
    print(json.dumps({"load_s": load_s}))
    sys.exit(0)
touch()
res = {"load_s": load_s, "import_s": import_s, "records": len(rep.records), "n_files": rep.n_files,
       "trusted": bool(getattr(rep, "trusted_manifest", "")), "mem_start": m0, "mem_loaded": m1, "mem_touched": mem()}
if role == "main":
    r_fd, w_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # a forked DataLoader worker reading every record
        os.close(r_fd)
        touch()
        os.write(w_fd, json.dumps(mem()).encode())
        os._exit(0)
    os.close(w_fd)
    buf = b""
    while True:
        chunk = os.read(r_fd, 65536)
        if not chunk:
            break
        buf += chunk
    os.waitpid(pid, 0)
    res["forked_worker"] = json.loads(buf)
    out = subprocess.run([sys.executable, __file__, code_root, "second", data, cache],
                         capture_output=True, text=True, check=True)
    res["second_process"] = json.loads(out.stdout.strip().splitlines()[-1])
print(json.dumps(res))
'''


# ------------------------------------------------------------------ data sets
def _sources(limit: int) -> list[Path]:
    src = REPO / "examples" / "data"
    files = sorted(p for p in src.iterdir() if p.is_file() and p.name.endswith((".pdb.gz", ".cif.gz")))
    return files[:limit] if limit else files


def make_sets(tmp: Path, scales: list[int], limit: int) -> dict[int, Path]:
    """``set-<s>x/copy-KK/<file>``; the copies of the largest set are hard-linked into the
    smaller ones (same bytes, so the smaller sets reuse the cache entries of the big one)."""
    src = _sources(limit)
    top = max(scales)
    big = tmp / f"set-{top}x"
    for k in range(top):
        d = big / f"copy-{k:02d}"
        d.mkdir(parents=True)
        for f in src:
            raw = f.read_bytes()
            if k:  # copy 0 is the shipped file itself
                line = f"# foldhpc bench copy {k}\n" if ".cif" in f.name else f"REMARK 999 FOLDHPC BENCH COPY {k:<4d}\n"
                raw = gzip.compress(line.encode(), mtime=0) + raw  # a gzip stream may have many members
            (d / f.name).write_bytes(raw)
    out = {top: big}
    for s in scales:
        if s == top:
            continue
        d = tmp / f"set-{s}x"
        for k in range(s):
            shutil.copytree(big / f"copy-{k:02d}", d / f"copy-{k:02d}", copy_function=os.link)
        out[s] = d
    return out


def _run_py(code_root: Path, code: str, env: dict[str, str] | None = None, timeout: float = 3600) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(code_root)!r})\n{code}"],
                   check=True, env=dict(os.environ, **(env or {})), timeout=timeout, cwd=REPO)
    return time.perf_counter() - t0


def _prepare_code(data: Path, cache: Path, workers: int, shard: tuple[int, int] | None = None) -> str:
    extra = f", shard={shard!r}" if shard else ""
    return (f"from foldhpc.data.cache import prepare_dataset\n"
            f"r = prepare_dataset({str(data)!r}, {str(cache)!r}, **{FILTERS!r}, workers={workers}, "
            f"progress=False{extra})\nprint('prepared', {str(data.name)!r}, r.n_files, 'files, parsed', r.n_parsed, 'cached', r.n_cached, '->', len(r.records), 'chains')")


def prepare_all(sets: dict[int, Path], tmp: Path, baseline: Path) -> dict[str, Any]:
    """Cold: the largest set as 2 concurrent shards + merge (this code); then the smaller
    sets (entries cached, stores built) and the baseline's packs (from hard-linked entries)."""
    new_cache, old_cache = tmp / "cache-new", tmp / "cache-old"
    top = max(sets)
    res: dict[str, Any] = {}
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
                               + _prepare_code(sets[top], new_cache, 1, (i, 2))], cwd=REPO) for i in range(2)]
    if any(p.wait() for p in procs):
        raise SystemExit("a shard of the cold preparation failed")
    res["cold_shards_s"] = time.perf_counter() - t0
    res["cold_merge_s"] = _run_py(REPO, _prepare_code(sets[top], new_cache, 0))
    res["cold_files"] = sum(1 for _ in sets[top].rglob("*.gz"))
    res["cold_files_per_s"] = res["cold_files"] / (res["cold_shards_s"] + res["cold_merge_s"])
    res["prepare_smaller_s"] = {s: _run_py(REPO, _prepare_code(d, new_cache, 0)) for s, d in sets.items() if s != top}
    old_cache.mkdir()
    shutil.copytree(new_cache / "entries", old_cache / "entries", copy_function=os.link)
    res["baseline_pack_build_s"] = {s: _run_py(baseline, _prepare_code(d, old_cache, 0)) for s, d in sets.items()}
    print_table("cold preparation (not the goal; for reference)", ["what", "figure"], [
        [f"{res['cold_files']} files, 2 concurrent --shard i/2 processes", f"{res['cold_shards_s']:.1f} s"],
        ["merge (plain prepare: stat + entries -> store + manifest)", f"{res['cold_merge_s']:.1f} s"],
        ["= files/s, shards + merge", f"{res['cold_files_per_s']:.1f} /s"],
        *[[f"prepare {s}x from cached entries", f"{v:.1f} s"] for s, v in res["prepare_smaller_s"].items()],
        *[[f"baseline: pack {s}x from cached entries", f"{v:.1f} s"] for s, v in res["baseline_pack_build_s"].items()]])
    return res


# ------------------------------------------------------------------ measurements
def _child(child: Path, code_root: Path, role: str, data: Path, cache: Path, env: dict[str, str],
           prefix: list[str] = ()) -> dict[str, Any]:
    out = subprocess.run([*prefix, sys.executable, str(child), str(code_root), role, str(data), str(cache)],
                         capture_output=True, text=True, env=dict(os.environ, **env), timeout=1800, cwd=REPO)
    if out.returncode != 0:
        raise SystemExit(f"warm start child failed ({role}, {code_root}): {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _variant(v: str, tmp: Path, baseline: Path) -> tuple[Path, Path, dict[str, str]]:
    if v == "baseline":
        return baseline, tmp / "cache-old", {"FOLDHPC_DATA_RESCAN": ""}
    return REPO, tmp / "cache-new", {"FOLDHPC_DATA_RESCAN": "1" if v == "rescan" else ""}


def count_fs_calls(child: Path, sets: dict[int, Path], tmp: Path, baseline: Path) -> dict[str, Any]:
    if shutil.which("strace") is None:
        print("\n(strace not found: file-system calls not counted)")
        return {}
    res: dict[str, Any] = {}
    for s, data in sorted(sets.items()):
        for v in VARIANTS:
            code, cache, env = _variant(v, tmp, baseline)
            trace = tmp / f"strace-{v}-{s}.txt"
            _child(child, code, "count", data, cache, env,
                   ["strace", "-f", "-qq", "-c", "-o", str(trace), "-e", "trace=" + ",".join(FS_CALLS)])
            counts = {m.group(2): int(m.group(1)) for m in
                      re.finditer(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$", trace.read_text(), re.M)
                      if m.group(2) != "total"}
            res[f"{v}_{s}x"] = counts
    return res


def measure(child: Path, sets: dict[int, Path], tmp: Path, baseline: Path, repeats: int) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {f"{v}_{s}x": [] for s in sets for v in VARIANTS}
    for _ in range(repeats):
        for s, data in sorted(sets.items()):
            for v in VARIANTS:  # interleaved
                code, cache, env = _variant(v, tmp, baseline)
                r = _child(child, code, "main", data, cache, env)
                assert r["trusted"] == (v == "trusted"), (v, r["trusted"])
                runs[f"{v}_{s}x"].append(r)
    return runs


def _mb(x: float) -> str:
    return f"{x / 2**20:.0f}"


def report(runs: dict[str, list[dict]], calls: dict[str, Any], sets: dict[int, Path]) -> dict[str, Any]:
    scales = sorted(sets)
    out: dict[str, Any] = {"scales": {}}
    med = lambda key, f: summary([f(r) for r in runs[key]])["median"]  # noqa: E731
    rows_t, rows_c, rows_m = [], [], []
    for s in scales:
        n = runs[f"trusted_{s}x"][0]["n_files"]
        row = [f"{s}x ({n} files)"]
        for v in VARIANTS:
            sm = summary([r["load_s"] for r in runs[f"{v}_{s}x"]])
            row.append(fmt_summary(sm, "s", digits=3))
            out["scales"].setdefault(s, {"n_files": n, "records": runs[f"{v}_{s}x"][0]["records"]})[v] = {
                "load_s": sm,
                "rss_touched": summary([r["mem_touched"]["Rss"] for r in runs[f"{v}_{s}x"]]),
                "uss_touched": summary([r["mem_touched"]["uss"] for r in runs[f"{v}_{s}x"]]),
                "forked_worker_uss": summary([r["forked_worker"]["uss"] for r in runs[f"{v}_{s}x"]]),
                "second_process_uss": summary([r["second_process"]["mem_touched"]["uss"] for r in runs[f"{v}_{s}x"]]),
                "second_process_rss": summary([r["second_process"]["mem_touched"]["Rss"] for r in runs[f"{v}_{s}x"]]),
                "fs_calls": calls.get(f"{v}_{s}x", {})}
        b, t = med(f"baseline_{s}x", lambda r: r["load_s"]), med(f"trusted_{s}x", lambda r: r["load_s"])
        row.append(f"{b / t:.1f}x")
        rows_t.append(row)
        if calls:
            rows_c.append([f"{s}x ({n} files)"] + [
                f"{sum(v for k, v in calls[f'{var}_{s}x'].items() if 'stat' in k)} stat, "
                f"{calls[f'{var}_{s}x'].get('openat', 0)} open, {calls[f'{var}_{s}x'].get('getdents64', 0)} getdents"
                for var in VARIANTS])
        rows_m.append([f"{s}x"] + [
            f"{_mb(med(f'{v}_{s}x', lambda r: r['mem_touched']['Rss']))} / "
            f"{_mb(med(f'{v}_{s}x', lambda r: r['forked_worker']['uss']))} / "
            f"{_mb(med(f'{v}_{s}x', lambda r: r['second_process']['mem_touched']['uss']))}" for v in VARIANTS])
    lo, hi = scales[0], scales[-1]
    growth = {}
    for v in VARIANTS:
        d = out["scales"]
        growth[v] = {
            "load_s_ratio": d[hi][v]["load_s"]["median"] / d[lo][v]["load_s"]["median"],
            "rss_ratio": d[hi][v]["rss_touched"]["median"] / d[lo][v]["rss_touched"]["median"],
            "second_uss_ratio": d[hi][v]["second_process_uss"]["median"] / d[lo][v]["second_process_uss"]["median"],
            "second_uss_per_1k_files_mb": (d[hi][v]["second_process_uss"]["median"] - d[lo][v]["second_process_uss"]["median"])
            / 2**20 / ((d[hi]["n_files"] - d[lo]["n_files"]) / 1000),
        }
        if calls:
            fs = lambda s_: sum(c for k, c in d[s_][v]["fs_calls"].items() if k != "getdents64")  # noqa: E731
            growth[v]["fs_calls_per_1k_files"] = (fs(hi) - fs(lo)) / ((d[hi]["n_files"] - d[lo]["n_files"]) / 1000)
    out["growth"] = growth
    rows_t.append([f"growth {lo}x -> {hi}x"] + [f"{growth[v]['load_s_ratio']:.1f}x time" for v in VARIANTS] + [""])
    print_table("warm start: load_dataset on a prepared cache, fresh process (median [min..max])",
                ["set", *VARIANTS, "baseline / trusted"], rows_t)
    if calls:
        rows_c.append(["added per 1000 files"] + [f"{growth[v]['fs_calls_per_1k_files']:.0f} stat+open" for v in VARIANTS])
        print_table("file-system calls of one warm start (strace -f -c, whole process incl. imports)",
                    ["set", *VARIANTS], rows_c)
    rows_m.append(["2nd process per 1000 files"] + [f"+{growth[v]['second_uss_per_1k_files_mb']:.1f} MB" for v in VARIANTS])
    print_table("memory after an epoch of reads, MB: RSS of the process / USS of a forked worker / "
                "USS of a second process (median)", ["set", *VARIANTS], rows_m)
    n_hi = out["scales"][hi]["n_files"]
    t_hi = out["scales"][hi]["trusted"]["load_s"]["median"]
    out["goal"] = {"warm_s": GOAL_WARM_S, "files": n_hi, "trusted_s": t_hi,
                   "met": verdict(n_hi >= GOAL_FILES and t_hi <= GOAL_WARM_S, t_hi)}
    fs_flat = calls and growth["trusted"]["fs_calls_per_1k_files"] < 1.0
    print(f"\ngoal: warm start <= {GOAL_WARM_S:.0f} s at >= {GOAL_FILES} files: trusted {t_hi:.3f} s at {n_hi} files "
          f"-> {out['goal']['met']}; file-system calls flat (< 1 per 1000 files): "
          f"{'OK' if fs_flat else ('n/a' if not calls else 'MISSED')}; second-process memory "
          f"+{growth['trusted']['second_uss_per_1k_files_mb']:.1f} MB per 1000 files "
          f"(baseline +{growth['baseline']['second_uss_per_1k_files_mb']:.1f} MB)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: 30 files x 1 and 3 copies, 1 repeat")
    ap.add_argument("--scales", default="1,10,61", help="copies of the shipped set per data folder")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline-rev", default=BASELINE_REV, help="git revision measured as the baseline")
    ap.add_argument("--tmp", type=Path, default=None, help="parent of the temp dir (default: $TMPDIR)")
    ap.add_argument("--out", type=Path, default=default_out("bench_data_scale"))
    args = ap.parse_args()
    scales = [1, 3] if args.quick else sorted({int(s) for s in args.scales.split(",")})
    limit = 30 if args.quick else 0
    repeats = 1 if args.quick else args.repeats
    t_start = time.perf_counter()
    out: dict[str, Any] = {"mode": "quick" if args.quick else "full", "env": environment(),
                           "baseline_rev": subprocess.run(["git", "-C", str(REPO), "rev-parse", args.baseline_rev],
                                                          capture_output=True, text=True, check=True).stdout.strip()}
    print(f"bench_data_scale ({out['mode']}): scales {scales} x {len(_sources(limit))} files, baseline "
          f"{args.baseline_rev} = {out['baseline_rev'][:10]}, {len(os.sched_getaffinity(0))} CPUs, "
          f"load {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="foldhpc-bench-scale-", dir=args.tmp) as d:
        tmp = Path(d)
        baseline = tmp / "baseline"
        baseline.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", args.baseline_rev, "foldhpc"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(baseline)], input=archive, check=True)
        child = tmp / "child.py"
        child.write_text(CHILD.replace("**FILTERS", ", ".join(f"{k}={v!r}" for k, v in FILTERS.items())))
        t0 = time.perf_counter()
        sets = make_sets(tmp, scales, limit)
        out["generate_s"] = time.perf_counter() - t0
        print(f"generated {sum(1 for _ in sets[max(scales)].rglob('*.gz'))} files in {out['generate_s']:.0f} s")
        out["prepare"] = prepare_all(sets, tmp, baseline)
        out["fs_calls"] = count_fs_calls(child, sets, tmp, baseline)
        out["runs"] = measure(child, sets, tmp, baseline, repeats)
        out["result"] = report(out["runs"], out["fs_calls"], sets)
    out["elapsed_s"] = time.perf_counter() - t_start
    print(f"\ntotal {out['elapsed_s']:.0f} s")
    write_json(args.out, out)


if __name__ == "__main__":
    main()
