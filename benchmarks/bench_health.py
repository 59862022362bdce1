"""The node health check's cost (issue 23: budget <= 2 s per node, before every start and restart).

Times :func:`foldhpc.resilience.health.check_node` in-process, n rounds, with the config a run
would have (``configs/default.toml``, run and checkpoint directories in a fresh temporary folder),
and once more with a site command (``health.command = "true"``: one shell started per check), so a
site can see what its own command adds. The per-check split comes from the report itself
(``HealthReport.checks``). On a machine without a GPU the device check is skipped (noted); the
GPU part (a CUDA init and a kernel per GPU, in a subprocess) is measured only where one is lent.

    python benchmarks/bench_health.py            # n = 15
    python benchmarks/bench_health.py --n 31
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from _common import DEFAULT_CONFIG, default_out, environment, fmt_summary, print_table, summary, verdict, write_json

from foldhpc.config import load_config
from foldhpc.resilience.health import check_node

BUDGET_S = 2.0


def measure(n: int, command: str) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as d:
        cfg = load_config(DEFAULT_CONFIG, [f"run.dir={Path(d) / 'run'}", f'health.command="{command}"'])
        walls: list[float] = []
        per_check: dict[str, list[float]] = {}
        problems: list[str] = []
        for _ in range(n):
            t0 = time.perf_counter()
            report = check_node(cfg)
            walls.append(time.perf_counter() - t0)
            for k, v in report.checks.items():
                per_check.setdefault(k, []).append(v)
            problems += [f"{p.check}: {p.detail}" for p in report.problems]
        return {"wall": summary(walls), "checks": {k: statistics.median(v) for k, v in per_check.items()},
                "notes": report.notes, "problems": sorted(set(problems))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=15)
    ap.add_argument("--out", type=Path, default=default_out("bench_health"))
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    plain = measure(args.n, "")
    site = measure(args.n, "true")
    rows = []
    for name, r in (("built-in checks", plain), ("built-in + health.command = \"true\"", site)):
        wall = r["wall"]
        assert isinstance(wall, dict)
        rows.append([name, fmt_summary(wall, "ms", 1000.0, 2), verdict(wall["median"] <= BUDGET_S, wall["median"])])
    print_table(f"node health check, n = {args.n} each (budget {BUDGET_S:g} s)", ["variant", "wall", "within budget"],
                rows)
    for name, r in (("built-in", plain), ("with command", site)):
        checks = r["checks"]
        assert isinstance(checks, dict)
        print(f"{name}: median per check: " + ", ".join(f"{k} {v * 1000:.2f} ms" for k, v in checks.items()))
        print(f"{name}: notes: {r['notes']}; problems: {r['problems'] or 'none'}")
    print(f"load average (1 min): {load0:.2f} before, {os.getloadavg()[0]:.2f} after")
    write_json(args.out, {"environment": environment(), "n": args.n, "budget_s": BUDGET_S, "builtin": plain,
                          "with_command": site, "load_before": load0, "load_after": os.getloadavg()[0]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
