"""``foldhpc checkpoints RUN_DIR``: what is saved, and is it intact."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from foldhpc.checkpoint.manager import CheckpointError, CheckpointManager
from foldhpc.config import load_config
from foldhpc.monitor.fmt import format_age


def checkpoint_dir_of(run_dir: Path) -> Path:
    """The run's checkpoint directory: from its resolved config.toml, else <run_dir>/checkpoints."""
    cfg_file = run_dir / "config.toml"
    if cfg_file.is_file():
        try:
            return load_config(cfg_file).checkpoint_dir
        except ValueError:
            pass
    return run_dir / "checkpoints"


def list_checkpoints(run_dir: Path, verify: bool = False) -> list[dict[str, Any]]:
    """One dict per committed checkpoint, oldest first; ``verified`` is None unless ``verify``."""
    if not run_dir.exists():
        raise CheckpointError(f"{run_dir}: no such run directory")
    mgr = CheckpointManager(checkpoint_dir_of(run_dir))
    try:
        entries = mgr.entries()
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{mgr.dir}/manifest.json is corrupt: {e}") from None
    rows = []
    for e in entries:
        row = dataclasses.asdict(e)
        row["path"] = str(mgr.dir / e.file)
        row["verified"] = None
        row["problem"] = None
        if verify:
            why = mgr.verify(e)
            if why is None:
                try:
                    mgr.load_file(mgr.dir / e.file)
                except Exception as exc:  # noqa: BLE001
                    why = f"cannot be loaded: {exc}"
            row["verified"] = why is None
            row["problem"] = why
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no checkpoints"
    now = time.time()
    lines = [f"{'STEP':>8}  {'SAVED':<19}  {'AGE':>8}  {'SIZE':>9}  {'REASON':<14}  {'VERIFIED':<8}  DIGEST            FILE"]
    for r in rows:
        ver = {None: "-", True: "ok", False: "BAD"}[r["verified"]]
        saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["saved_at"]))
        age = format_age(now - r["saved_at"])
        lines.append(f"{r['step']:>8}  {saved:<19}  {age:>8}  {r['bytes'] / 2**20:>7.2f}Mi  {r['reason'][:14]:<14}  "
                     f"{ver:<8}  {r['digest']:<16}  {r['file']}" + (f"  ({r['problem']})" if r["problem"] else ""))
    return "\n".join(lines)

