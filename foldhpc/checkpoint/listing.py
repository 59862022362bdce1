"""``foldhpc checkpoints RUN_DIR``: what is saved, and is it intact."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from foldhpc.checkpoint.errors import CheckpointError
from foldhpc.checkpoint.manager import CheckpointManager
from foldhpc.config import load_config
from foldhpc.records.fmt import format_age
from foldhpc.records.layout import CHECKPOINT_DIR, CONFIG_FILE


def checkpoint_dir_of(run_dir: Path) -> Path:
    """The checkpoint directory of the run in ``run_dir``, whatever the current directory.

    ``<run_dir>/checkpoints`` unless the run's config.toml sets ``checkpoint.dir``. The config's
    ``run.dir`` is not used: it is often relative to wherever training was started, while
    ``run_dir`` is the directory the user points at now. A relative ``checkpoint.dir`` is looked
    up from the current directory; if it is not there, the error says so.
    """
    cfg_file = run_dir / CONFIG_FILE
    configured = ""
    if cfg_file.is_file():
        try:
            configured = load_config(cfg_file).checkpoint.dir
        except ValueError as e:
            raise CheckpointError(f"{cfg_file}: cannot read the run's config ({e})") from None
    if not configured:
        return run_dir / CHECKPOINT_DIR
    path = Path(configured)
    if not path.is_absolute() and not path.is_dir():
        raise CheckpointError(
            f"{cfg_file} sets checkpoint.dir = {configured!r}, relative to the directory training was started "
            f"from, and there is no {configured!r} under {Path.cwd()}: run this from that directory, or use "
            "absolute paths for checkpoint.dir")
    return path


def list_checkpoints(run_dir: Path, verify: bool = False) -> list[dict[str, Any]]:
    """One dict per committed checkpoint, oldest first; ``verified`` is None unless ``verify``."""
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run directory")
    mgr = CheckpointManager(checkpoint_dir_of(run_dir))
    rows = []
    for e in mgr.entries():
        row = dataclasses.asdict(e)
        row["path"] = str(mgr.dir / e.file)
        row["verified"] = None
        row["problem"] = None
        if verify:
            why = mgr.verify(e)
            row["verified"] = why is None
            row["problem"] = why
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]], where: Path | None = None) -> str:
    if not rows:
        return f"no checkpoints in {where}" if where is not None else "no checkpoints"
    now = time.time()
    lines = [f"{'STEP':>8}  {'SAVED':<19}  {'AGE':>8}  {'SIZE':>9}  {'REASON':<14}  {'VERIFIED':<8}  DIGEST            FILE"]
    for r in rows:
        ver = {None: "-", True: "ok", False: "BAD"}[r["verified"]]
        saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["saved_at"]))
        age = format_age(now - r["saved_at"])
        lines.append(f"{r['step']:>8}  {saved:<19}  {age:>8}  {r['bytes'] / 2**20:>7.2f}Mi  {r['reason'][:14]:<14}  "
                     f"{ver:<8}  {r['digest']:<16}  {r['file']}" + (f"  ({r['problem']})" if r["problem"] else ""))
    return "\n".join(lines)
