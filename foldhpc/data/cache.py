"""Turn a folder of structure files into training records, once: parse in parallel, cache.

Parsing ~330 files takes seconds and 200k PDB chains take hours; a requeued Slurm job
restarts many times, so every start after the first must be a cache hit, and at PDB scale
on a parallel file system also must not ``stat`` every file.  Layout of a cache directory::

    entries/ab/<sha256>-<fmt>[-gz]-p<PARSER_VERSION>.npz  all chains of a file (or its error)
    store-<key>/*.npy   every chain of one dataset in flat arrays, memory-mapped (store.py)
    datasets/<id>.json  sealed manifest of a data folder: its store + skipped files (manifest.py)
    index.json          path -> (size, mtime_ns, sha256) and data folder -> store key (index.py)
    shards/*.json       stat hints of ``prepare --shard I/N`` runs, folded in by the merge

Two ways in:

* :func:`prepare_dataset` (``foldhpc data prepare``) scans the folder, re-validates every
  file against the index (size + mtime; sha256 when those changed), parses what the cache
  lacks, writes the store and re-seals the manifest.  With ``shard=(i, n)`` it does this
  for every n-th file only, so a Slurm array can parse a big set on many nodes; a plain
  prepare afterwards merges (parses nothing, same cache as a single run).
* :func:`load_dataset` (every ``foldhpc train`` start) trusts the sealed manifest unless
  asked to rescan: one ``stat`` of the data folder, the manifest, the mapped store.  With
  no usable manifest, or after files were added/removed at the folder's top level (its
  mtime changed), it falls back to :func:`prepare_dataset`.

Every write is atomic (temp file + ``os.replace``, temp folder + rename): a job killed
mid-prepare leaves whole files or none, and anything corrupt anyway is detected and rebuilt
from the level below (store -> entries -> the structure files).  The modules below hold one
job each: ``files`` (scan, atomic writes), ``entries``, ``index``, ``parallel`` (parsing),
``store``, ``manifest``, ``report``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np  # noqa: F401 - tests patch cache.np.savez to simulate a kill mid-write
from foldhpc.records.envvars import RESCAN_ENV

from . import structure
from .entries import Entry, entry_key, entry_path, load_entry
from .files import cleanup_stale_tmp, ensure_writable, scan_tree, unreadable_reason
from .files import is_writable as _is_writable
from .index import FileIndex
from .manifest import SealedManifest, manifest_path, new_manifest, referenced_stores, root_key
from .parallel import n_workers as _n_workers
from .parallel import parse_all
from .report import DataError, DatasetReport, no_usable_chain_error
from .store import DatasetStore, store_dir
from .structure import PARSER_VERSION  # noqa: F401 - public re-export

if TYPE_CHECKING:
    from foldhpc.config import DataConfig

__all__ = ["CACHE_DIRNAME", "DataError", "DatasetReport", "load_dataset", "parse_shard", "prepare_dataset",
           "resolve_cache_dir"]

log = logging.getLogger(__name__)

CACHE_DIRNAME = ".foldhpc-cache"


# --------------------------------------------------------------------------- public API


def prepare_dataset(
    data_path: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    *,
    min_length: int,
    max_length: int,
    min_completeness: float,
    workers: int = 0,
    progress: bool = True,
    shard: tuple[int, int] | None = None,
) -> DatasetReport:
    """Parse (or load from cache) every structure under ``data_path``, select one chain per
    file, report what was skipped and why, and seal the result for warm starts.

    ``workers`` 0 = one process per usable CPU.  ``shard=(i, n)``: only files ``i, i+n, ...``
    of the sorted list; writes their entries and a stat fragment, no store and no manifest
    (run a plain prepare after all shards to merge), and its report covers the shard only.
    """
    t0 = time.perf_counter()
    root = Path(data_path)
    cache = Path(cache_dir)
    cache_existed = cache.exists()
    root_mtime = _mtime_ns(root)  # before the walk: a file added during it counts as a change
    files, skipped = scan_tree(root, cache)
    n_files = len(files) + len(skipped)
    if n_files == 0:
        raise DataError(
            f"data path {root} contains no files; put .pdb/.cif files (optionally .gz) there "
            "or set data.path to a folder that has them (the repository ships examples/data)")
    if shard is not None:
        i, n = shard
        files = files[i::n]
        skipped = skipped if i == 0 else []  # non-structure files are reported once
    ensure_writable(cache)
    if not cache_existed and os.path.dirname(os.path.realpath(cache)) == root_key(root):
        root_mtime = _mtime_ns(root)  # making <data>/.foldhpc-cache is not a change of the data
    index = FileIndex.load(cache, fold_shards=shard is None)

    # 1) content hash per file (stat shortcut via the index), unreadable files are skipped
    hashed: list[tuple[str, Path, str]] = []  # (rel, path, entry key)
    for rel, path in files:
        try:
            hashed.append((rel, path, entry_key(index.sha256(path), rel)))
        except OSError as e:
            skipped.append((rel, unreadable_reason(e)))

    # 2) the dataset's store, else per-file entries, else parse
    key = _store_key(root, [(rel, ekey) for rel, _, ekey in hashed])
    store: DatasetStore | None = None
    if shard is None and index.packs.get(root_key(root)) == key:
        store = _open_store(cache, key, verify=True)
    n_cached = len(hashed) if store is not None else 0
    n_parsed = 0
    if store is None:
        entries, n_cached, n_parsed, hashed = _load_or_parse(hashed, cache, workers, progress, skipped)
        rows = [(rel, entries[ekey]) for rel, _, ekey in hashed if ekey in entries]
        key = _store_key(root, [(rel, e.key) for rel, e in rows])
        store = DatasetStore.from_entries(key, rows)
        if shard is None:
            store = _write_store(cache, store, index, root)

    # 3) select one chain per file
    records, why = store.select(min_length, max_length, min_completeness)
    outside = sorted(skipped)  # files that are not in the store, with their reason
    skipped = sorted(skipped + why)
    report = DatasetReport(
        records=records, n_files=n_files, n_parsed=n_parsed, n_cached=n_cached, skipped=skipped,
        data_path=str(root), cache_dir=str(cache), elapsed_s=0.0,
        filters={"min_length": min_length, "max_length": max_length,
                 "min_completeness": min_completeness},
    )
    if shard is not None:
        frag = index.save_fragment(cache, f"{hashlib.sha256(root_key(root).encode()).hexdigest()[:20]}"
                                   f"-{shard[0]}-of-{shard[1]}", [p for _, p, _ in hashed])
        report.elapsed_s = time.perf_counter() - t0
        log.info("shard %d/%d: %d of %d structure files (parsed %d, cached %d) in %.2f s; stat hints in %s. "
                 "After every shard has finished, run `foldhpc data prepare` without --shard to merge.",
                 shard[0], shard[1], len(hashed), n_files, n_parsed, n_cached, report.elapsed_s, frag)
        return report
    if store.path is not None:
        new_manifest(root, root_mtime, store.key, n_files, outside).write(manifest_path(cache, root))
    else:  # nothing sealed: an older manifest must not be trusted for this (newer) content
        manifest_path(cache, root).unlink(missing_ok=True)
    index.save(cache)
    _remove_unused_stores(cache, index)
    cleanup_stale_tmp(cache)
    report.elapsed_s = time.perf_counter() - t0
    if not records:
        raise no_usable_chain_error(root, report)
    log.info("dataset ready: %d chains from %d files (parsed %d, cached %d, skipped %d) in %.2f s",
             len(records), n_files, n_parsed, n_cached, len(skipped), report.elapsed_s)
    return report


def load_sealed(
    data_path: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    *,
    min_length: int,
    max_length: int,
    min_completeness: float,
) -> DatasetReport | None:
    """The dataset as sealed by the last full prepare, without scanning the data folder;
    None (with the reason on the log) when there is no usable manifest or the folder's
    top level changed since.  File-system cost: one ``stat`` of the data folder, the
    manifest, the store's files, independent of the number of structure files."""
    t0 = time.perf_counter()
    root, cache = Path(data_path), Path(cache_dir)
    path = manifest_path(cache, root)
    manifest = SealedManifest.read(path)
    if manifest is None:
        log.info("no sealed dataset manifest for %s in %s; scanning the data folder", root, cache)
        return None
    mtime = _mtime_ns(root)
    if mtime != manifest.root_mtime_ns:
        log.info("data folder %s changed since it was prepared (files added or removed at its top level); "
                 "scanning it", root)
        return None
    try:
        store = DatasetStore.open(cache, manifest.store, verify=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("dataset store %s of manifest %s is unusable (%s); scanning the data folder",
                    store_dir(cache, manifest.store), path, e)
        return None
    records, why = store.select(min_length, max_length, min_completeness)
    skipped = sorted([(r, w) for r, w in manifest.skipped] + why)
    report = DatasetReport(
        records=records, n_files=manifest.n_files, n_parsed=0, n_cached=len(store.rels), skipped=skipped,
        data_path=str(root), cache_dir=str(cache), elapsed_s=time.perf_counter() - t0,
        filters={"min_length": min_length, "max_length": max_length, "min_completeness": min_completeness},
        trusted_manifest=str(path))
    if not records:
        raise no_usable_chain_error(root, report)
    log.info("dataset ready: %d chains from %d files (skipped %d) in %.2f s, trusting the sealed manifest %s "
             "(prepared %s): the %d structure files were not re-checked. After adding or changing files in "
             "place or in sub-folders run `foldhpc data prepare` (or set %s=1)", len(records), manifest.n_files,
             len(skipped), report.elapsed_s, path, manifest.prepared_at, len(store.rels), RESCAN_ENV)
    return report


def resolve_cache_dir(cfg_data: DataConfig, run_dir: str | os.PathLike[str] | None = None) -> Path:
    """``data.cache_dir`` if set, else ``<data.path>/.foldhpc-cache``, else (data folder
    read-only, e.g. a shared dataset) ``<run_dir>/cache``."""
    if cfg_data.cache_dir:
        return Path(cfg_data.cache_dir)
    default = Path(cfg_data.path) / CACHE_DIRNAME
    if not Path(cfg_data.path).is_dir() or _is_writable(default):
        return default  # (a missing data folder is reported by prepare_dataset)
    if run_dir is None:
        raise DataError(
            f"cannot write the dataset cache {default} (data folder not writable); "
            "set data.cache_dir to a writable folder")
    fallback = Path(run_dir) / "cache"
    log.info("data folder %s is not writable; caching parsed structures in %s",
             cfg_data.path, fallback)
    return fallback


def load_dataset(cfg_data: DataConfig, run_dir: str | os.PathLike[str] | None = None,
                 *, progress: bool = True, rescan: bool | None = None,
                 shard: tuple[int, int] | None = None) -> DatasetReport:
    """The ``[data]`` config section's dataset: the sealed manifest if there is a usable
    one, else (or with ``rescan``, default ``$FOLDHPC_DATA_RESCAN``) :func:`prepare_dataset`."""
    cache = resolve_cache_dir(cfg_data, run_dir)
    filters: dict[str, Any] = dict(min_length=cfg_data.min_length, max_length=cfg_data.max_length,
                   min_completeness=cfg_data.min_completeness)
    if rescan is None:
        rescan = os.environ.get(RESCAN_ENV, "").strip().lower() in ("1", "true", "yes")
    if not rescan and shard is None:
        report = load_sealed(cfg_data.path, cache, **filters)
        if report is not None:
            return report
    return prepare_dataset(cfg_data.path, cache, **filters, workers=cfg_data.prepare_workers,
                           progress=progress, shard=shard)


def parse_shard(spec: str) -> tuple[int, int]:
    """``"I/N"`` (0 <= I < N, e.g. ``$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``) -> (I, N)."""
    try:
        i_s, n_s = spec.split("/")
        i, n = int(i_s), int(n_s)
    except ValueError:
        raise DataError(f"--shard {spec!r}: expected I/N, e.g. 3/16 (shard 3 of 16, counted from 0)") from None
    if n < 1 or not 0 <= i < n:
        raise DataError(f"--shard {spec!r}: need 0 <= I < N (shards are counted from 0; with a Slurm array "
                        "use --array=0-(N-1))")
    return i, n


# --------------------------------------------------------------------------- steps


def _load_or_parse(hashed: list[tuple[str, Path, str]], cache: Path, workers: int, progress: bool,
                   skipped: list[tuple[str, str]]
                   ) -> tuple[dict[str, Entry], int, int, list[tuple[str, Path, str]]]:
    """Per-file entries from the cache, parsing the files that have none (crashes go to
    ``skipped``).  Returns (entries by key, n_cached, n_parsed, hashed with keys updated
    for files that changed between hashing and parsing)."""
    entries: dict[str, Entry] = {}
    todo: list[tuple[str, Path, str]] = []
    for rel, path, ekey in hashed:
        entry = load_entry(entry_path(cache, ekey))
        if entry is not None and entry.key == ekey:
            entries[ekey] = entry
        else:
            todo.append((rel, path, ekey))
    n_cached = len(hashed) - len(todo)
    n_parsed = 0
    if todo:
        log.info("parsing %d of %d structure files (%d cached) with up to %d processes",
                 len(todo), len(hashed), n_cached, _n_workers(workers, len(todo)))
    changed: dict[str, str] = {}
    for rel, ekey, result in parse_all(todo, cache, workers, progress):
        n_parsed += 1
        if isinstance(result, Entry):
            entries[result.key] = result
            if result.key != ekey:  # file changed between hashing and parsing
                changed[rel] = result.key
        else:
            skipped.append((rel, result))
    if changed:
        hashed = [(r, p, changed.get(r, s)) for r, p, s in hashed]
    return entries, n_cached, n_parsed, hashed


def _store_key(root: Path, items: list[tuple[str, str]]) -> str:
    h = hashlib.sha256(f"store-v1 parser={structure.PARSER_VERSION} root={root_key(root)}\n".encode())
    for rel, sha in sorted(items):
        h.update(f"{rel}\t{sha}\n".encode())
    return h.hexdigest()[:24]


def _open_store(cache: Path, key: str, verify: bool, quiet: bool = False) -> DatasetStore | None:
    try:
        return DatasetStore.open(cache, key, verify=verify)
    except (OSError, ValueError, KeyError, TypeError) as e:
        if not quiet:
                log.warning("corrupt dataset store %s (%s); using per-file cache entries", store_dir(cache, key), e)
        return None


def _write_store(cache: Path, store: DatasetStore, index: FileIndex, root: Path) -> DatasetStore:
    """Write the store and return it memory-mapped (so this process shares it too); the
    in-memory one if it cannot be written (the run goes on, the next start re-tries)."""
    existing = store_dir(cache, store.key)
    if existing.exists() and _open_store(cache, store.key, verify=True, quiet=True) is None:
        _rmtree(existing)  # corrupt: rebuilt below from the entries (readers that map it keep theirs)
    try:
        store.write(cache)
        mapped = DatasetStore.open(cache, store.key, verify=False)
    except (OSError, ValueError) as e:
        log.warning("could not write the dataset store %s (%s); records stay in memory",
                    store_dir(cache, store.key), e)
        return store
    index.packs[root_key(root)] = store.key
    index.dirty = True
    return mapped


def _remove_unused_stores(cache: Path, index: FileIndex) -> None:
    """Stores no data folder points to any more, and packs of the format before stores.

    A process that still maps a removed store keeps reading it (POSIX unlink semantics).
    """
    live = set(index.packs.values()) | referenced_stores(cache)
    for p in cache.glob("store-*"):
        if p.name[6:] not in live:
            _rmtree(p)
    for p in cache.glob("pack-*.npz"):
        p.unlink(missing_ok=True)


def _rmtree(path: Path) -> None:
    """Rename aside first, so no reader ever sees a half-removed store under its real name."""
    import shutil
    import tempfile

    try:
        aside = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.rename(path, Path(aside) / "old")
        path = Path(aside)
    except OSError:
        pass
    shutil.rmtree(path, ignore_errors=True)


def _mtime_ns(path: Path) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return -1
