"""The stat index: path -> (size, mtime_ns, sha256), so a rescan hashes only changed files.

Only a hint: a lost or corrupt index costs one re-hash, never a wrong result, because
entries are addressed by content.  Shards of a split preparation (``prepare --shard I/N``,
e.g. a Slurm array) each write their own fragment under ``shards/`` instead of racing on
``index.json``; the next whole preparation (the merge) folds them in and removes them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, cast

from . import structure
from .files import atomic_write

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
INDEX_VERSION = 1
SHARDS_DIR = "shards"


class FileIndex:
    """Stat hints per absolute path plus ``packs``: data folder (real path) -> store key."""

    def __init__(self, files: dict[str, list[Any]], packs: dict[str, str]) -> None:
        self.files = files
        self.packs = packs
        self.dirty = False
        self.merged_fragments: list[Path] = []

    @classmethod
    def load(cls, cache: Path, fold_shards: bool = True) -> FileIndex:
        index = cls({}, {})
        d = _read(cache / INDEX_NAME)
        if d is not None:
            index.files, index.packs = dict(d["files"]), dict(d.get("packs", {}))
        if fold_shards:
            for frag in sorted((cache / SHARDS_DIR).glob("*.json")):
                fd = _read(frag)
                if fd is not None:
                    index.files.update(fd["files"])
                    index.dirty = True
                index.merged_fragments.append(frag)
            if index.merged_fragments:
                log.info("merging %d shard index fragments from %s", len(index.merged_fragments),
                         cache / SHARDS_DIR)
        return index

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
        if self.dirty or not (cache / INDEX_NAME).exists():
            d = {"version": INDEX_VERSION, "parser_version": structure.PARSER_VERSION,
                 "files": self.files, "packs": self.packs}
            atomic_write(cache / INDEX_NAME, lambda f: f.write(json.dumps(d).encode()))
            self.dirty = False
        for frag in self.merged_fragments:  # folded into index.json, which is now durable
            frag.unlink(missing_ok=True)
        self.merged_fragments = []

    def save_fragment(self, cache: Path, name: str, paths: list[Path]) -> Path:
        """This shard's stat hints only, in its own file (no race with other shards)."""
        keys = [os.path.abspath(p) for p in paths]
        d = {"version": INDEX_VERSION, "parser_version": structure.PARSER_VERSION,
             "files": {k: self.files[k] for k in keys if k in self.files}, "packs": {}}
        out = cache / SHARDS_DIR / f"{name}.json"
        atomic_write(out, lambda f: f.write(json.dumps(d).encode()))
        return out


def _read(path: Path) -> dict[str, Any] | None:
    try:
        d = json.loads(path.read_text())
        if d.get("version") == INDEX_VERSION and d.get("parser_version") == structure.PARSER_VERSION:
            dict(d["files"])
            return cast("dict[str, Any]", d)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("ignoring unreadable cache index %s (%s)", path, e)
    return None
