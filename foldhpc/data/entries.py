"""Per-file cache entries: all chains of one structure file, keyed by its content.

``entries/ab/<sha256>-<fmt>[-gz]-p<PARSER_VERSION>.npz`` holds every chain of a file (or the
reason it is unusable).  The key is the content hash plus what the *name* tells the parser,
so a changed file or parser is re-parsed and an unchanged file never is, wherever it lives.
All chains are stored, not just the selected one, so changing ``data.min_length`` & co.
needs no re-parse.  npz members carry a CRC, so a bit flip is detected and re-parsed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import structure
from .files import atomic_write
from .structure import ProteinChain, structure_format

log = logging.getLogger(__name__)

ARRAYS = ("lengths", "aatype", "coords", "atom_mask", "residue_index")


def entry_key(sha: str, name: str) -> str:
    """Content hash plus what the name tells the parser (format, gzip): identical bytes
    named ``x.pdb.gz`` and ``x.cif`` can parse differently, so they must not share."""
    fmt = structure_format(name) or "none"
    return f"{sha}-{fmt}{'-gz' if name.lower().endswith('.gz') else ''}"


def entry_path(cache: Path, key: str) -> Path:
    return cache / "entries" / key[:2] / f"{key}-p{structure.PARSER_VERSION}.npz"


@dataclass
class Entry:
    """All chains of one file as concatenated arrays (cheap to store, load and slice)."""

    key: str  # content sha256 + what the name implies, see entry_key
    error: str  # "" when parsed
    chain_ids: list[str]
    sequences: list[str]
    lengths: np.ndarray  # int64 [C]
    aatype: np.ndarray  # int8 [N]
    coords: np.ndarray  # float32 [N, 4, 3]
    atom_mask: np.ndarray  # bool [N, 4]
    residue_index: np.ndarray  # int32 [N]

    @classmethod
    def from_chains(cls, key: str, chains: list[ProteinChain]) -> Entry:
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
    def failed(cls, key: str, reason: str) -> Entry:
        return cls(key, reason, [], [], np.zeros(0, np.int64), np.zeros(0, np.int8),
                   np.zeros((0, 4, 3), np.float32), np.zeros((0, 4), np.bool_), np.zeros(0, np.int32))

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


def write_entry(path: Path, entry: Entry) -> None:
    meta = dict(entry.meta(), parser_version=structure.PARSER_VERSION)
    arrays = {k: getattr(entry, k) for k in ARRAYS}
    atomic_write(path, lambda f: np.savez(f, meta=np.array(json.dumps(meta)), **arrays))


def load_entry(path: Path) -> Entry | None:
    """The cached entry, or None if absent or unusable (a corrupt one is logged)."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("parser_version") != structure.PARSER_VERSION:
                raise ValueError("parser version mismatch")
            entry = Entry(meta["key"], meta["error"], list(meta["chains"]),
                          list(meta["sequences"]), *(z[k] for k in ARRAYS))
        entry.validate()
        return entry
    except Exception as e:  # noqa: BLE001 - any defect means "parse again"
        log.warning("corrupt cache entry %s (%s); parsing the file again", path, e)
        return None
