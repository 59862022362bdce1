"""Logging to the console and to ``<run.dir>/train.log`` (appended across restarts)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_FILE_HANDLER_NAME = "foldhpc-run-log"

log = logging.getLogger(__name__)


class RunLogHandler(logging.FileHandler):
    """``train.log``, appended; a failed write never ends or floods a run.

    With ``run.dir`` full (or its mount gone) :class:`logging.FileHandler` prints a traceback per
    line to stderr. Here the first failure is one WARNING on the console (not in the file, which
    cannot take it), the lines meanwhile are counted, and every later line retries, reopening the
    file; the first line that gets through is preceded by a note of how many were lost.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(path, mode="a", encoding="utf-8", delay=True)  # opened by the first line
        self.lost = 0  # lines not written since the last failure
        self.addFilter(lambda record: getattr(record, "run_log", True))  # extra={"run_log": False}: console only

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            if self.stream is None:
                self.stream = self._open()
            if self.lost:
                note = logging.LogRecord(__name__, logging.WARNING, __file__, 0, "%d line(s) could not be written "
                                         "to %s before this one", (self.lost, self.baseFilename), None)
                # the terminator first: the failed write may have left half a line
                self.stream.write(self.terminator + self.format(note) + self.terminator)
            self.stream.write(msg + self.terminator)
            self.stream.flush()
        except OSError as e:
            self._failed(e)
            return
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - a formatting bug: logging's own report
            self.handleError(record)
            return
        if self.lost:
            log.info("%s is written again (%d line(s) lost)", self.baseFilename, self.lost, extra={"run_log": False})
            self.lost = 0

    def _failed(self, e: OSError) -> None:
        stream, self.stream = self.stream, None  # reopened by the next line
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass
        if not self.lost:
            log.warning("cannot write %s (%s): training goes on; log lines go to the console only until a write "
                        "succeeds (each line retries)", self.baseFilename, e.strerror or e, extra={"run_log": False})
        self.lost += 1


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
        fh = RunLogHandler(log_file)
        fh.name = _FILE_HANDLER_NAME
        # milliseconds: `foldhpc goodput` / `foldhpc plot` (foldhpc.monitor.timeline) place each
        # line on the run's wall clock, and whole seconds are too coarse for startup and checkpoints
        fh.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d %(levelname)s [pid " + str(os.getpid()) + "] " +
                                          tag + "%(name)s: %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
        logger.addHandler(fh)
