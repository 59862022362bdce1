"""The sealed dataset manifest: what ``foldhpc data prepare`` found, trusted by warm starts.

On a parallel file system every ``stat`` is a metadata round trip, and a warm start that
re-validates 200k structure files pays 200k of them before the first step.  A full
preparation therefore ends by writing ``datasets/<id>.json`` for its data folder: the store
it produced, the files that are not in it (with the reason) and the data folder's own
mtime, sealed with a sha256 of the content.  A warm start (``load_dataset`` without rescan)
reads that manifest and the memory-mapped store and touches the data folder once (one
``stat``), whatever the number of files.

The rule (also in docs/data.md): files *added or removed* at the top level of the data
folder change its mtime and trigger a rescan automatically; files changed in place or in
sub-folders are picked up by ``foldhpc data prepare`` (or ``FOLDHPC_DATA_RESCAN=1``), which
re-validates every file (size + mtime, sha256 if those changed) and re-seals.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import structure
from .files import atomic_write

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "foldhpc-dataset-manifest"
MANIFEST_VERSION = 1
DATASETS_DIR = "datasets"


def root_key(root: Path | str) -> str:
    return os.path.realpath(root)


def manifest_path(cache: Path, root: Path | str) -> Path:
    return cache / DATASETS_DIR / f"{hashlib.sha256(root_key(root).encode()).hexdigest()[:20]}.json"


@dataclass
class SealedManifest:
    """One prepared data folder: its store, the files outside it, when it was sealed."""

    root: str  # real path of the data folder
    root_mtime_ns: int  # the folder's mtime when the scan started
    store: str  # key of store-<key>/
    n_files: int  # files considered, as in DatasetReport.n_files
    skipped: list[list[str]] = field(default_factory=list)  # [file, reason] not in the store
    parser_version: int = 0
    prepared_at: str = ""

    def write(self, path: Path) -> None:
        body = asdict(self)
        doc = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "body": body, "seal": _seal(body)}
        atomic_write(path, lambda f: f.write(json.dumps(doc).encode()))
        log.info("sealed dataset manifest %s: %d files, store %s", path, self.n_files, self.store)

    @classmethod
    def read(cls, path: Path) -> SealedManifest | None:
        """The manifest, or None if there is none or it is unusable (logged: why)."""
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable dataset manifest %s (%s); scanning the data folder", path, e)
            return None
        try:
            if doc.get("format") != MANIFEST_FORMAT or doc.get("version") != MANIFEST_VERSION:
                raise ValueError(f"not a {MANIFEST_FORMAT} version {MANIFEST_VERSION}")
            if doc.get("seal") != _seal(doc["body"]):
                raise ValueError("seal does not match the content")
            m = cls(**doc["body"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("ignoring corrupt dataset manifest %s (%s); scanning the data folder", path, e)
            return None
        if m.parser_version != structure.PARSER_VERSION:
            log.info("dataset manifest %s was made by parser version %s (now %s); scanning the data folder",
                     path, m.parser_version, structure.PARSER_VERSION)
            return None
        return m


def new_manifest(root: Path, root_mtime_ns: int, store: str, n_files: int,
                 skipped: list[tuple[str, str]]) -> SealedManifest:
    return SealedManifest(root=root_key(root), root_mtime_ns=root_mtime_ns, store=store, n_files=n_files,
                          skipped=[[r, why] for r, why in skipped], parser_version=structure.PARSER_VERSION,
                          prepared_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def referenced_stores(cache: Path) -> set[str]:
    """Store keys that some sealed manifest in ``cache`` points to (kept by the cleanup)."""
    out = set()
    for p in (cache / DATASETS_DIR).glob("*.json"):
        try:
            out.add(str(json.loads(p.read_text())["body"]["store"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


def _seal(body: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
