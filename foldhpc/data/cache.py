"""Turn a folder of structure files into training records, once: parse in parallel, cache.

Parsing ~330 files takes seconds; a requeued Slurm job restarts many times, so every start
after the first must be a cache hit.  Layout of a cache directory::

    entries/ab/<sha256>-<fmt>[-gz]-p<PARSER_VERSION>.npz  all chains of a file (or its error)
    pack-<key>.npz      every entry of one dataset in one file (one read on a warm start)
    index.json          path -> (size, mtime_ns, sha256) and dataset -> pack key

Entries are keyed by the file *content* and the parser version, so a changed file or
parser is re-parsed and an unchanged file never is, wherever it lives.  All chains are
stored, not just the selected one, so changing ``data.min_length`` & co. needs no re-parse.
Every write is atomic (temp file + ``os.replace``): a job killed mid-prepare leaves either
a whole entry or none, and an entry that is corrupt anyway is detected and re-parsed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections import Counter
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .structure import (
    PARSER_VERSION,
    ProteinChain,
    StructureError,
    chain_id_prefix,
    is_structure_file,
    structure_format,
    parse_structure_bytes,
    select_chain,
)

if TYPE_CHECKING:
    from foldhpc.config import DataConfig

log = logging.getLogger(__name__)

CACHE_DIRNAME = ".foldhpc-cache"
_INDEX_NAME = "index.json"
_INDEX_VERSION = 1
_IGNORED_PREFIXES = ("readme", "manifest")  # documentation next to the data, not data
_PROGRESS_EVERY_S = 2.0
_STALE_TMP_S = 3600.0
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class DataError(Exception):
    """The dataset as a whole is unusable; the message says which path and what to do."""


@dataclass
class DatasetReport:
    """What :func:`prepare_dataset` found: the selected chains and an account of the rest."""

    records: list[ProteinChain]
    n_files: int  # files considered (structure-like or not), README/MANIFEST/hidden excluded
    n_parsed: int  # parsed in this call
    n_cached: int  # taken from the cache
    skipped: list[tuple[str, str]]  # (path relative to the data folder, reason)
    data_path: str = ""
    cache_dir: str = ""
    elapsed_s: float = 0.0
    filters: dict[str, Any] = field(default_factory=dict)

    def length_histogram(self, bins: Sequence[int] | int = (0, 50, 100, 200, 300, 400, 500, 1000)
                         ) -> list[tuple[int, int, int]]:
        """``(low, high, count)`` per bin, counting ``low <= length < high``.

        ``bins`` is a list of edges (lengths from the last edge on form a final bin, shown
        only if not empty) or a number of equal-width bins between the shortest and longest.
        """
        lengths = np.array([len(r) for r in self.records], dtype=np.int64)
        top = int(lengths.max()) + 1 if lengths.size else 1
        open_bin = False
        if isinstance(bins, int):
            low = int(lengths.min()) if lengths.size else 0
            edges = np.unique(np.linspace(low, top, max(bins, 1) + 1).round().astype(np.int64))
        else:
            edges = np.unique(np.asarray(list(bins), dtype=np.int64))
            if edges[-1] < top:
                edges, open_bin = np.append(edges, top), True
        counts, _ = np.histogram(lengths, bins=edges)
        out = [(int(lo), int(hi), int(c)) for lo, hi, c in zip(edges[:-1], edges[1:], counts)]
        if open_bin and out[-1][2] == 0:
            out.pop()
        return out

    def reason_counts(self) -> dict[str, int]:
        """Skips grouped by the reason's leading words (details after ':' or '(' dropped)."""
        return dict(Counter(_reason_kind(r) for _, r in self.skipped).most_common())

    def format(self, max_skipped: int = 20) -> str:
        """Human summary for the log / ``foldhpc prepare``."""
        lines = [
            f"dataset {self.data_path}: {self.n_files} files -> {len(self.records)} chains "
            f"(parsed {self.n_parsed}, cached {self.n_cached}, skipped {len(self.skipped)}) "
            f"in {self.elapsed_s:.2f} s",
            f"cache: {self.cache_dir}",
        ]
        if self.filters:
            f = self.filters
            lines.append(f"filters: {f.get('min_length')}-{f.get('max_length')} residues, "
                         f"backbone completeness >= {f.get('min_completeness')}")
        if self.records:
            lengths = [len(r) for r in self.records]
            lines.append(f"chain length: min {min(lengths)}, median {int(np.median(lengths))}, "
                         f"max {max(lengths)}, total {sum(lengths)} residues")
            hist = self.length_histogram()
            top = max(c for _, _, c in hist) or 1
            for lo, hi, c in hist:
                label = f"{lo:>5}-{hi - 1:<5}"
                lines.append(f"  {label} |{'#' * round(30 * c / top):<30}| {c}")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} files: " + ", ".join(
                f"{n} {k}" for k, n in self.reason_counts().items()))
            for path, reason in self.skipped[:max_skipped]:
                lines.append(f"  {path}: {reason}")
            if len(self.skipped) > max_skipped:
                lines.append(f"  ... and {len(self.skipped) - max_skipped} more (see to_json())")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "data_path": self.data_path,
            "cache_dir": self.cache_dir,
            "n_files": self.n_files,
            "n_records": len(self.records),
            "n_parsed": self.n_parsed,
            "n_cached": self.n_cached,
            "elapsed_s": round(self.elapsed_s, 3),
            "filters": self.filters,
            "length_histogram": [list(b) for b in self.length_histogram()],
            "skipped": [{"file": p, "reason": r} for p, r in self.skipped],
            "skipped_by_reason": self.reason_counts(),
            "records": [{"id": r.id, "source": r.source, "chain": r.chain, "length": len(r)}
                        for r in self.records],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


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
) -> DatasetReport:
    """Parse (or load from cache) every structure under ``data_path``, select one chain per
    file and report what was skipped and why.  ``workers`` 0 = one process per usable CPU.
    """
    t0 = time.perf_counter()
    root = Path(data_path)
    cache = Path(cache_dir)
    files, skipped = _scan(root, cache)
    n_files = len(files) + len(skipped)
    if n_files == 0:
        raise DataError(
            f"data path {root} contains no files; put .pdb/.cif files (optionally .gz) there "
            "or set data.path to a folder that has them (the repository ships examples/data)")
    _ensure_writable(cache)
    index = _Index.load(cache)

    # 1) content hash per file (stat shortcut via the index), unreadable files are skipped
    hashed: list[tuple[str, Path, str]] = []  # (rel, path, entry key)
    for rel, path in files:
        try:
            hashed.append((rel, path, _entry_key(index.sha256(path), rel)))
        except OSError as e:
            skipped.append((rel, _unreadable_reason(e)))

    # 2) whole-dataset pack, else per-file entries, else parse
    key = _pack_key(root, [(rel, ekey) for rel, _, ekey in hashed])
    entries = _load_pack(cache, key) if index.packs.get(_root_key(root)) == key else None
    if entries is not None and not all(ekey in entries for _, _, ekey in hashed):
        entries = None
    n_cached = len(hashed) if entries is not None else 0
    n_parsed = 0
    if entries is None:
        entries = {}
        todo: list[tuple[str, Path, str]] = []
        for rel, path, ekey in hashed:
            entry = _load_entry(_entry_path(cache, ekey))
            if entry is not None and entry.key == ekey:
                entries[ekey] = entry
            else:
                todo.append((rel, path, ekey))
        n_cached = len(hashed) - len(todo)
        if todo:
            log.info("parsing %d of %d structure files (%d cached) with up to %d processes",
                     len(todo), len(hashed), n_cached, _n_workers(workers, len(todo)))
        for rel, ekey, result in _parse_all(todo, cache, workers, progress):
            n_parsed += 1
            if isinstance(result, _Entry):
                entries[result.key] = result
                if result.key != ekey:  # file changed between hashing and parsing
                    hashed = [(r, p, result.key if r == rel else s) for r, p, s in hashed]
            else:
                skipped.append((rel, result))
        key = _pack_key(root, [(rel, ekey) for rel, _, ekey in hashed])
        if all(ekey in entries for _, _, ekey in hashed):
            _write_pack(cache, key, entries)
            index.packs[_root_key(root)] = key
    index.save(cache)

    # 3) select one chain per file
    records: list[ProteinChain] = []
    for rel, _, ekey in hashed:
        entry = entries.get(ekey)
        if entry is None:
            continue  # parse crashed: already in skipped
        if entry.error:
            skipped.append((rel, entry.error))
            continue
        chosen, why = select_chain(entry.chains(rel), min_length, max_length, min_completeness)
        if chosen is None:
            skipped.append((rel, why))
        else:
            records.append(chosen)
    records.sort(key=lambda r: r.id)
    skipped.sort()
    report = DatasetReport(
        records=records, n_files=n_files, n_parsed=n_parsed, n_cached=n_cached, skipped=skipped,
        data_path=str(root), cache_dir=str(cache), elapsed_s=time.perf_counter() - t0,
        filters={"min_length": min_length, "max_length": max_length,
                 "min_completeness": min_completeness},
    )
    if not records:
        counts = ", ".join(f"{n} x {k}" for k, n in report.reason_counts().items())
        raise DataError(
            f"no usable protein chain in {root}: all {n_files} files were skipped ({counts}). "
            "Check that data.path holds protein structures and that data.min_length, "
            "data.max_length and data.min_completeness are not too strict.")
    log.info("dataset ready: %d chains from %d files (parsed %d, cached %d, skipped %d) in %.2f s",
             len(records), n_files, n_parsed, n_cached, len(skipped), report.elapsed_s)
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
                 *, progress: bool = True) -> DatasetReport:
    """:func:`prepare_dataset` driven by the ``[data]`` config section."""
    return prepare_dataset(
        cfg_data.path,
        resolve_cache_dir(cfg_data, run_dir),
        min_length=cfg_data.min_length,
        max_length=cfg_data.max_length,
        min_completeness=cfg_data.min_completeness,
        workers=cfg_data.prepare_workers,
        progress=progress,
    )


# --------------------------------------------------------------------------- scanning


def _scan(root: Path, cache: Path) -> tuple[list[tuple[str, Path]], list[tuple[str, str]]]:
    """Structure files to parse and non-structure files to report, both sorted."""
    if not root.exists():
        raise DataError(
            f"data path {root} does not exist; set data.path to a folder of .pdb/.cif files "
            "(optionally .gz), e.g. examples/data")
    if not root.is_dir():
        raise DataError(f"data path {root} is not a folder; set data.path to the folder that "
                        "holds the structure files")
    files: list[tuple[str, Path]] = []
    skipped: list[tuple[str, str]] = []
    cache_real = os.path.realpath(cache)
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs or real == cache_real:
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        base = Path(dirpath)
        keep_dirs = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            if is_structure_file(d):  # a folder named like a structure file is a mistake
                skipped.append(((base / d).relative_to(root).as_posix(), "unreadable: is a directory"))
                continue
            keep_dirs.append(d)
        dirnames[:] = keep_dirs
        for name in sorted(filenames):
            if name.startswith(".") or name.lower().startswith(_IGNORED_PREFIXES):
                continue
            rel = (base / name).relative_to(root).as_posix()
            if is_structure_file(name):
                files.append((rel, base / name))
            else:
                skipped.append((rel, "unsupported extension (not .pdb/.ent/.cif/.mmcif[.gz])"))
    return files, skipped


def _unreadable_reason(e: OSError) -> str:
    if isinstance(e, FileNotFoundError):
        return "unreadable: file not found (dangling link?)"
    if isinstance(e, IsADirectoryError):
        return "unreadable: is a directory"
    return f"unreadable: {e.strerror or e}"


def _reason_kind(reason: str) -> str:
    for sep in (":", " ("):
        reason = reason.split(sep, 1)[0]
    return reason.strip()


# --------------------------------------------------------------------------- cache files


def _is_writable(directory: Path) -> bool:
    try:
        _ensure_writable(directory)
        return True
    except DataError:
        return False


def _ensure_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise DataError(
            f"cache directory {directory} is not writable ({e.strerror or e}); "
            "set data.cache_dir to a writable folder") from None


def _atomic_write(path: Path, write) -> None:  # write(fileobj)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a shared cache must be readable
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _entry_key(sha: str, name: str) -> str:
    """Content hash plus what the name tells the parser (format, gzip): identical bytes
    named ``x.pdb.gz`` and ``x.cif`` can parse differently, so they must not share."""
    fmt = structure_format(name) or "none"
    return f"{sha}-{fmt}{'-gz' if name.lower().endswith('.gz') else ''}"


def _entry_path(cache: Path, key: str) -> Path:
    return cache / "entries" / key[:2] / f"{key}-p{PARSER_VERSION}.npz"


@dataclass
class _Entry:
    """All chains of one file as concatenated arrays (cheap to store, load and slice)."""

    key: str  # content sha256 + what the name implies, see _entry_key
    error: str  # "" when parsed
    chain_ids: list[str]
    sequences: list[str]
    lengths: np.ndarray  # int64 [C]
    aatype: np.ndarray  # int8 [N]
    coords: np.ndarray  # float32 [N, 4, 3]
    atom_mask: np.ndarray  # bool [N, 4]
    residue_index: np.ndarray  # int32 [N]

    @classmethod
    def from_chains(cls, key: str, chains: list[ProteinChain]) -> _Entry:
        return cls(
            key=key, error="", chain_ids=[c.chain for c in chains],
            sequences=[c.sequence for c in chains],
            lengths=np.array([len(c) for c in chains], dtype=np.int64),
            aatype=np.concatenate([c.aatype for c in chains]),
            coords=np.concatenate([c.coords for c in chains]),
            atom_mask=np.concatenate([c.atom_mask for c in chains]),
            residue_index=np.concatenate([c.residue_index for c in chains]),
        )

    @classmethod
    def failed(cls, key: str, reason: str) -> _Entry:
        return cls(key, reason, [], [], np.zeros(0, np.int64), np.zeros(0, np.int8),
                   np.zeros((0, 4, 3), np.float32), np.zeros((0, 4), np.bool_), np.zeros(0, np.int32))

    def chains(self, rel: str) -> list[ProteinChain]:
        prefix = str(Path(rel).parent / chain_id_prefix(rel)) if "/" in rel else chain_id_prefix(rel)
        out = []
        ends = np.cumsum(self.lengths)
        for cid, seq, end, n in zip(self.chain_ids, self.sequences, ends, self.lengths):
            sl = slice(int(end - n), int(end))
            out.append(ProteinChain(
                id=f"{prefix}_{cid.strip() or '-'}", source=rel, chain=cid, sequence=seq,
                aatype=self.aatype[sl], coords=self.coords[sl], atom_mask=self.atom_mask[sl],
                residue_index=self.residue_index[sl]))
        return out

    def meta(self) -> dict[str, Any]:
        return {"key": self.key, "error": self.error, "chains": self.chain_ids,
                "sequences": self.sequences}

    def validate(self) -> None:
        n = int(self.lengths.sum())
        shapes_ok = (self.aatype.shape == (n,) and self.coords.shape == (n, 4, 3)
                     and self.atom_mask.shape == (n, 4) and self.residue_index.shape == (n,)
                     and len(self.chain_ids) == len(self.sequences) == len(self.lengths)
                     and [len(s) for s in self.sequences] == self.lengths.tolist())
        if not shapes_ok:
            raise ValueError("inconsistent arrays")


_ARRAYS = ("lengths", "aatype", "coords", "atom_mask", "residue_index")


def _write_entry(path: Path, entry: _Entry) -> None:
    meta = dict(entry.meta(), parser_version=PARSER_VERSION)
    arrays = {k: getattr(entry, k) for k in _ARRAYS}
    _atomic_write(path, lambda f: np.savez(f, meta=np.array(json.dumps(meta)), **arrays))


def _load_entry(path: Path) -> _Entry | None:
    """The cached entry, or None if absent or unusable (a corrupt one is logged)."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("parser_version") != PARSER_VERSION:
                raise ValueError("parser version mismatch")
            entry = _Entry(meta["key"], meta["error"], list(meta["chains"]),
                           list(meta["sequences"]), *(z[k] for k in _ARRAYS))
        entry.validate()
        return entry
    except Exception as e:  # noqa: BLE001 - any defect means "parse again"
        log.warning("corrupt cache entry %s (%s); parsing the file again", path, e)
        return None


def _root_key(root: Path) -> str:
    return os.path.realpath(root)


def _pack_key(root: Path, items: list[tuple[str, str]]) -> str:
    h = hashlib.sha256(f"pack-v1 parser={PARSER_VERSION} root={_root_key(root)}\n".encode())
    for rel, sha in sorted(items):
        h.update(f"{rel}\t{sha}\n".encode())
    return h.hexdigest()[:24]


def _write_pack(cache: Path, key: str, entries: dict[str, _Entry]) -> None:
    """One npz with every entry of this dataset: a warm start is one file read, not 300."""
    ordered = [entries[s] for s in sorted(entries)]
    meta = {"key": key, "parser_version": PARSER_VERSION, "entries": [e.meta() for e in ordered]}
    arrays = {k: (np.concatenate([getattr(e, k) for e in ordered]) if ordered else getattr(_Entry.failed("", ""), k))
              for k in _ARRAYS}
    _atomic_write(cache / f"pack-{key}.npz",
                  lambda f: np.savez(f, meta=np.array(json.dumps(meta)), **arrays))


def _load_pack(cache: Path, key: str) -> dict[str, _Entry] | None:
    path = cache / f"pack-{key}.npz"
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            arrays = {k: z[k] for k in _ARRAYS}
        if meta.get("key") != key or meta.get("parser_version") != PARSER_VERSION:
            raise ValueError("key mismatch")
        out: dict[str, _Entry] = {}
        c0 = r0 = 0
        for m in meta["entries"]:
            nc = len(m["chains"])
            lengths = arrays["lengths"][c0:c0 + nc]
            nr = int(lengths.sum())
            e = _Entry(m["key"], m["error"], list(m["chains"]), list(m["sequences"]), lengths,
                       *(arrays[k][r0:r0 + nr] for k in _ARRAYS[1:]))
            e.validate()
            out[e.key] = e
            c0, r0 = c0 + nc, r0 + nr
        if c0 != len(arrays["lengths"]) or r0 != len(arrays["aatype"]):
            raise ValueError("trailing data")
        return out
    except Exception as e:  # noqa: BLE001
        log.warning("corrupt dataset pack %s (%s); using per-file cache entries", path, e)
        return None


class _Index:
    """path -> (size, mtime_ns, sha256) so a warm start hashes nothing, plus the packs.

    Only a hint: a lost or corrupt index costs one re-hash, never a wrong result, because
    entries are addressed by content.
    """

    def __init__(self, files: dict[str, list[Any]], packs: dict[str, str]) -> None:
        self.files = files
        self.packs = packs
        self.dirty = False

    @classmethod
    def load(cls, cache: Path) -> _Index:
        try:
            d = json.loads((cache / _INDEX_NAME).read_text())
            if d.get("version") == _INDEX_VERSION and d.get("parser_version") == PARSER_VERSION:
                return cls(dict(d["files"]), dict(d["packs"]))
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("ignoring unreadable cache index %s (%s)", cache / _INDEX_NAME, e)
        return cls({}, {})

    def sha256(self, path: Path) -> str:
        st = path.stat()
        key = os.path.abspath(path)
        hit = self.files.get(key)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return str(hit[2])
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        self.files[key] = [st.st_size, st.st_mtime_ns, sha]
        self.dirty = True
        return sha

    def save(self, cache: Path) -> None:
        # drop packs whose file is gone and pack files no dataset points to any more
        live = set(self.packs.values())
        for p in cache.glob("pack-*.npz"):
            if p.name[5:-4] not in live:
                p.unlink(missing_ok=True)
                self.dirty = True
        _cleanup_stale_tmp(cache)
        if not self.dirty and (cache / _INDEX_NAME).exists():
            return
        d = {"version": _INDEX_VERSION, "parser_version": PARSER_VERSION,
             "files": self.files, "packs": self.packs}
        _atomic_write(cache / _INDEX_NAME, lambda f: f.write(json.dumps(d).encode()))
        self.dirty = False


def _cleanup_stale_tmp(cache: Path) -> None:
    """Temp files of killed prepares; old ones only, a concurrent job may be writing."""
    now = time.time()
    for p in list(cache.glob(".*.tmp")) + list(cache.glob("entries/*/.*.tmp")):
        try:
            if now - p.stat().st_mtime > _STALE_TMP_S:
                p.unlink()
        except OSError:
            pass


# --------------------------------------------------------------------------- parsing


def _parse_one(path: str, rel: str, cache: str) -> tuple[str, _Entry | str]:
    """Worker: parse one file and store its entry; returns (rel, entry or skip reason).

    Hashes the bytes it parses, so a file modified after the parent hashed it is stored
    under its new content hash, never under a stale one.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return rel, _unreadable_reason(e)
    key = _entry_key(hashlib.sha256(data).hexdigest(), rel)
    try:
        entry = _Entry.from_chains(key, parse_structure_bytes(data, Path(path).name))
    except StructureError as e:
        entry = _Entry.failed(key, e.reason)
    except RecursionError:
        return rel, "parser crashed: RecursionError"
    except Exception as e:  # noqa: BLE001 - a Biopython bug must not stop the dataset
        return rel, f"parser crashed: {type(e).__name__}: {e}"[:200]
    try:
        _write_entry(_entry_path(Path(cache), key), entry)
    except OSError as e:  # cache full/unwritable mid-run: the result is still good
        logging.getLogger(__name__).warning("could not write cache entry for %s: %s", rel, e)
    return rel, entry


def _n_workers(workers: int, n_jobs: int) -> int:
    if workers <= 0:
        try:
            workers = len(os.sched_getaffinity(0))  # the CPUs Slurm gave us, not the node's
        except AttributeError:  # pragma: no cover - macOS
            workers = os.cpu_count() or 1
    return max(1, min(workers, n_jobs))


def _parse_all(todo: list[tuple[str, Path, str]], cache: Path, workers: int, progress: bool):
    """Yield (rel, expected entry key, entry or reason) for each file, with progress logging."""
    if not todo:
        return
    n = _n_workers(workers, len(todo))
    ticker = _Progress(len(todo), enabled=progress)
    if n == 1:
        for rel, path, sha in todo:
            yield (rel, sha, _parse_one(str(path), rel, str(cache))[1])
            ticker.tick()
        return
    # Biggest files first: the slowest parse should not start last (shorter makespan).
    order = sorted(todo, key=lambda t: -_size(t[1]))
    pending = {rel: (rel, path, sha) for rel, path, sha in order}
    try:
        with ProcessPoolExecutor(max_workers=n, mp_context=_mp_context()) as pool:
            futures: list[tuple[str, str, Future]] = [
                (rel, sha, pool.submit(_parse_one, str(path), rel, str(cache)))
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
            yield rel, sha, _parse_one(str(path), rel, str(cache))[1]
            ticker.tick()


def _mp_context():
    """fork when this process runs no other Python thread (fast, no ``__main__`` guard
    needed); forkserver otherwise, because forking a threaded process (checkpoint saver,
    monitoring) can deadlock the child."""
    import threading

    methods = _start_methods()
    if threading.active_count() == 1 and "fork" in methods:
        return get_context("fork")
    return get_context("forkserver" if "forkserver" in methods else "spawn")


def _start_methods() -> list[str]:
    from multiprocessing import get_all_start_methods

    return get_all_start_methods()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


class _Progress:
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
        if self.done == self.total or self.done - self.last_done >= step or now - self.last_t >= _PROGRESS_EVERY_S:
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else 0.0
            log.info("parsed %d/%d files (%3.0f%%), %.1f files/s, eta %.0f s",
                     self.done, self.total, 100 * self.done / self.total, rate, eta)
            self.last_t, self.last_done = now, self.done
