"""Parse structure files into cache entries in parallel processes, with progress on the log.

A worker hashes the bytes it parses and stores the entry itself, so the parent never
holds more than one result at a time and a file changed between hashing and parsing is
stored under its new content hash, never a stale one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from multiprocessing.context import BaseContext
from pathlib import Path

from .entries import Entry, entry_key, entry_path, write_entry
from .files import unreadable_reason
from .structure import StructureError, parse_structure_bytes

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 2.0

#: (relative path, file, expected entry key) of a file to parse
Job = tuple[str, Path, str]


def parse_one(path: str, rel: str, cache: str) -> tuple[str, Entry | str]:
    """Worker: parse one file and store its entry; returns (rel, entry or skip reason)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return rel, unreadable_reason(e)
    key = entry_key(hashlib.sha256(data).hexdigest(), rel)
    try:
        entry = Entry.from_chains(key, parse_structure_bytes(data, Path(path).name))
    except StructureError as e:
        entry = Entry.failed(key, e.reason)
    except RecursionError:
        return rel, "parser crashed: RecursionError"
    except Exception as e:  # noqa: BLE001 - a Biopython bug must not stop the dataset
        return rel, f"parser crashed: {type(e).__name__}: {e}"[:200]
    try:
        write_entry(entry_path(Path(cache), key), entry)
    except OSError as e:  # cache full/unwritable mid-run: the result is still good
        logging.getLogger(__name__).warning("could not write cache entry for %s: %s", rel, e)
    return rel, entry


def n_workers(workers: int, n_jobs: int) -> int:
    """``workers`` (0 = the CPUs this process may use), at most one per job, at least 1."""
    if workers <= 0:
        try:
            workers = len(os.sched_getaffinity(0))  # the CPUs Slurm gave us, not the node's
        except AttributeError:  # pragma: no cover - macOS
            workers = os.cpu_count() or 1
    return max(1, min(workers, n_jobs))


def parse_all(todo: list[Job], cache: Path, workers: int, progress: bool
              ) -> Iterator[tuple[str, str, Entry | str]]:
    """Yield (rel, expected entry key, entry or reason) for each file, with progress logging."""
    if not todo:
        return
    n = n_workers(workers, len(todo))
    ticker = Progress(len(todo), enabled=progress)
    if n == 1:
        for rel, path, sha in todo:
            yield (rel, sha, parse_one(str(path), rel, str(cache))[1])
            ticker.tick()
        return
    # Biggest files first: the slowest parse should not start last (shorter makespan).
    order = sorted(todo, key=lambda t: -_size(t[1]))
    pending = {rel: (rel, path, sha) for rel, path, sha in order}
    try:
        with ProcessPoolExecutor(max_workers=n, mp_context=_mp_context()) as pool:
            futures: list[tuple[str, str, Future[tuple[str, Entry | str]]]] = [
                (rel, sha, pool.submit(parse_one, str(path), rel, str(cache)))
                for rel, path, sha in order]
            for rel, sha, fut in futures:
                result = fut.result()[1]
                del pending[rel]
                yield rel, sha, result
                ticker.tick()
    except (BrokenProcessPool, OSError, RuntimeError) as e:
        # A worker died (OOM kill) or could not start (e.g. a script without the
        # ``if __name__ == "__main__":`` guard under forkserver): finish in this process.
        log.warning("parser processes failed (%s: %s); parsing the remaining %d files in-process",
                    type(e).__name__, str(e).strip().splitlines()[0] if str(e).strip() else "",
                    len(pending))
        for rel, path, sha in list(pending.values()):
            yield rel, sha, parse_one(str(path), rel, str(cache))[1]
            ticker.tick()


def _mp_context() -> BaseContext:
    """fork when this process runs no other Python thread (fast, no ``__main__`` guard
    needed); forkserver otherwise, because forking a threaded process (checkpoint saver,
    monitoring) can deadlock the child."""
    import threading
    from multiprocessing import get_all_start_methods

    methods = get_all_start_methods()
    if threading.active_count() == 1 and "fork" in methods:
        return get_context("fork")
    return get_context("forkserver" if "forkserver" in methods else "spawn")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


class Progress:
    """done/total and files/s on the log every ~10% or every couple of seconds."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.done = 0
        self.t0 = self.last_t = time.perf_counter()
        self.last_done = 0

    def tick(self) -> None:
        self.done += 1
        if not self.enabled:
            return
        now = time.perf_counter()
        step = max(1, self.total // 10)
        if self.done == self.total or self.done - self.last_done >= step or now - self.last_t >= PROGRESS_EVERY_S:
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else 0.0
            log.info("parsed %d/%d files (%3.0f%%), %.1f files/s, eta %.0f s",
                     self.done, self.total, 100 * self.done / self.total, rate, eta)
            self.last_t, self.last_done = now, self.done
