"""Logging to the console and to ``<run.dir>/train.log`` (appended across restarts)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_FILE_HANDLER_NAME = "foldhpc-run-log"


def setup_logging(level: str = "INFO", log_file: Path | None = None, rank: int | None = None) -> None:
    """Configure the ``foldhpc`` logger once per process.

    A console handler goes to stderr (Slurm's ``.err`` file under a job); the optional file
    handler appends, so a requeued job keeps one continuous log. Calling this again replaces
    the file handler instead of stacking duplicates.

    ``rank``: in a multi-rank run, ranks other than 0 log warnings and errors only, each line
    marked with its rank (rank 0 tells the run's story; the others only what went wrong).
    """
    logger = logging.getLogger("foldhpc")
    tag = "" if rank is None else f"[rank {rank}] "
    logger.setLevel("WARNING" if rank else level.upper())
    logger.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s " + tag + "%(name)s: %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    for h in [h for h in logger.handlers if h.name == "foldhpc-console"]:
        h.setFormatter(fmt)
    if not any(getattr(h, "name", "") == "foldhpc-console" for h in logger.handlers):
        console = logging.StreamHandler(sys.stderr)
        console.name = "foldhpc-console"
        console.setFormatter(fmt)
        # extra={"console": False}: for train.log only (a user error the command line prints itself)
        console.addFilter(lambda record: getattr(record, "console", True))
        logger.addHandler(console)
    for h in [h for h in logger.handlers if h.name == _FILE_HANDLER_NAME]:
        logger.removeHandler(h)
        h.close()
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file, mode="a", encoding="utf-8")
        fh.name = _FILE_HANDLER_NAME
        # milliseconds: `foldhpc goodput` / `foldhpc plot` (foldhpc.monitor.timeline) place each
        # line on the run's wall clock, and whole seconds are too coarse for startup and checkpoints
        fh.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d %(levelname)s [pid " + str(os.getpid()) + "] " +
                                          tag + "%(name)s: %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
        logger.addHandler(fh)
