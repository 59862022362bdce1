"""File-system helpers of the dataset cache: the folder scan, atomic writes, writability.

Every cache write goes through :func:`atomic_write` (temp file + ``os.replace``), so a job
killed mid-write leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import IO, Callable

from .report import DataError
from .structure import is_structure_file

log = logging.getLogger(__name__)

IGNORED_PREFIXES = ("readme", "manifest")  # documentation next to the data, not data
STALE_TMP_S = 3600.0
UMASK = os.umask(0o022)
os.umask(UMASK)


def scan_tree(root: Path, cache: Path) -> tuple[list[tuple[str, Path]], list[tuple[str, str]]]:
    """Structure files to parse and non-structure files to report, both sorted.

    Cost: one directory listing per folder, no ``stat`` per file (``os.walk`` uses the
    directory entry types), which is what a warm start that does rescan still pays.
    """
    if not root.exists():
        where = "" if root.is_absolute() else f" (relative to {os.getcwd()})"
        raise DataError(
            f"data path {root} does not exist{where}. To get going: put protein structures -- PDB "
            "(.pdb/.ent) or mmCIF (.cif/.mmcif) files, optionally .gz -- in a folder and set data.path to "
            "it (in the config, or --set data.path=DIR); `foldhpc init --data DIR my.toml` writes a "
            "commented starter config. A clone of the repository ships examples/data (329 PDB entries).")
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
            if name.startswith(".") or name.lower().startswith(IGNORED_PREFIXES):
                continue
            rel = (base / name).relative_to(root).as_posix()
            if is_structure_file(name):
                files.append((rel, base / name))
            else:
                skipped.append((rel, "unsupported extension (not .pdb/.ent/.cif/.mmcif[.gz])"))
    return files, skipped


def unreadable_reason(e: OSError) -> str:
    if isinstance(e, FileNotFoundError):
        return "unreadable: file not found (dangling link?)"
    if isinstance(e, IsADirectoryError):
        return "unreadable: is a directory"
    return f"unreadable: {e.strerror or e}"


def is_writable(directory: Path) -> bool:
    try:
        ensure_writable(directory)
        return True
    except DataError:
        return False


def ensure_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise DataError(
            f"cache directory {directory} is not writable ({e.strerror or e}); "
            "set data.cache_dir to a writable folder") from None


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write ``path`` through a temp file in the same folder, then ``os.replace`` it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600; a shared cache must be readable
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def cleanup_stale_tmp(cache: Path) -> None:
    """Temp files and folders of killed prepares; old ones only, a concurrent job may be writing."""
    now = time.time()
    for p in (list(cache.glob(".*.tmp")) + list(cache.glob("entries/*/.*.tmp"))
              + list(cache.glob("datasets/.*.tmp")) + list(cache.glob("shards/.*.tmp"))
              + list(cache.glob(".store-*.tmp"))):
        try:
            if now - p.stat().st_mtime > STALE_TMP_S:
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink()
        except OSError:
            pass
