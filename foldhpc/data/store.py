"""The dataset store: every chain of a prepared dataset in a few flat, memory-mapped arrays.

A warm start must not cost more per process than the data it really uses: with the
records in each process's heap, every DataLoader worker and every rank pays the whole
dataset again.  So a prepared dataset is one folder ``store-<key>/`` of ``.npy`` files
(residue arrays concatenated over all chains, plus per-chain lengths and completeness and
per-file chain counts) opened with ``mmap``: the records are read-only views into the
page cache, which all processes on a node share, and only the pages a batch touches
are ever read.

Written to a temp folder and renamed into place, so a store exists whole or not at all.
``meta.json`` holds the names, shapes and a crc32 per array: opening checks the shapes
(a truncated file fails), a rescan (``foldhpc data prepare``) also checks the crc32s.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator, Sequence
from typing import IO, Any, overload

import numpy as np

from . import structure
from .entries import Entry
from .files import UMASK
from .structure import ProteinChain, chain_id_prefix, structure_format

log = logging.getLogger(__name__)

STORE_FORMAT = 1
META = "meta.json"
# name -> (dtype, trailing shape); leading dimension: files (F), chains (C) or residues (N)
ARRAYS: dict[str, tuple[type, tuple[int, ...], str]] = {
    "file_chains": (np.int64, (), "F"),
    "chain_length": (np.int64, (), "C"),
    "chain_completeness": (np.float64, (), "C"),
    "aatype": (np.int8, (), "N"),
    "coords": (np.float32, (4, 3), "N"),
    "atom_mask": (np.bool_, (4,), "N"),
    "residue_index": (np.int32, (), "N"),
    "sequence": (np.uint8, (), "N"),  # one-letter codes, ASCII
}


def store_dir(cache: Path, key: str) -> Path:
    return cache / f"store-{key}"


@dataclass
class DatasetStore:
    """All files of one prepared dataset: their relative paths, errors and chains."""

    key: str
    rels: list[str]  # per file, sorted as scanned
    errors: dict[int, str]  # file number -> why it has no chain (parse result, cached)
    chain_ids: list[str]  # per chain
    arrays: dict[str, np.ndarray]
    path: Path | None = None  # the folder when opened from disk (arrays memory-mapped)
    res_start: np.ndarray | None = None  # first residue of each chain (+ total), made on demand

    # ------------------------------------------------------------ build / write / open
    @classmethod
    def from_entries(cls, key: str, rows: list[tuple[str, Entry]]) -> DatasetStore:
        """Concatenate per-file entries (in memory) into one store."""
        entries = [e for _, e in rows]
        chain_length = (np.concatenate([e.lengths for e in entries]) if entries
                        else np.zeros(0, np.int64)).astype(np.int64)
        atom_mask = _cat([e.atom_mask for e in entries], (4,), np.bool_)
        seq = "".join(s for e in entries for s in e.sequences)
        arrays = {
            "file_chains": np.array([len(e.lengths) for e in entries], dtype=np.int64),
            "chain_length": chain_length,
            "chain_completeness": _completeness(atom_mask, chain_length),
            "aatype": _cat([e.aatype for e in entries], (), np.int8),
            "coords": _cat([e.coords for e in entries], (4, 3), np.float32),
            "atom_mask": atom_mask,
            "residue_index": _cat([e.residue_index for e in entries], (), np.int32),
            "sequence": np.frombuffer(seq.encode("ascii"), dtype=np.uint8).copy(),
        }
        store = cls(key=key, rels=[r for r, _ in rows],
                    errors={i: e.error for i, e in enumerate(entries) if e.error},
                    chain_ids=[c for e in entries for c in e.chain_ids], arrays=arrays)
        store.validate()
        return store

    def write(self, cache: Path) -> Path:
        """Write to ``store-<key>/`` atomically (temp folder + rename); returns the folder.

        A store with this key that is already there (a concurrent prepare, the same input)
        is kept: same key, same content.
        """
        final = store_dir(cache, self.key)
        if (final / META).exists():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".store-{self.key}.", suffix=".tmp", dir=cache))
        try:
            os.chmod(tmp, 0o777 & ~UMASK)  # mkdtemp makes 0700; a shared cache must be readable
            crcs = {}
            for name, arr in self.arrays.items():
                with open(tmp / f"{name}.npy", "wb") as f:
                    np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
                    _durable(f)
                crcs[name] = zlib.crc32(np.ascontiguousarray(arr).data)
            meta = {"format": STORE_FORMAT, "key": self.key, "parser_version": structure.PARSER_VERSION,
                    "counts": self.counts(), "crc32": crcs, "rels": self.rels,
                    "errors": {str(i): e for i, e in self.errors.items()}, "chain_ids": self.chain_ids}
            with open(tmp / META, "w") as f:
                f.write(json.dumps(meta))
                _durable(f)
            for p in tmp.iterdir():
                os.chmod(p, 0o666 & ~UMASK)
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / META).exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    @classmethod
    def open(cls, cache: Path, key: str, verify: bool) -> DatasetStore:
        """Memory-map ``store-<key>/``; raises ValueError/OSError if it is unusable.

        ``verify`` also reads every byte to check the crc32s (``foldhpc data prepare``);
        without it only shapes and file sizes are checked, which costs a few ``stat``s.
        """
        path = store_dir(cache, key)
        meta = json.loads((path / META).read_text())
        if meta.get("format") != STORE_FORMAT or meta.get("key") != key:
            raise ValueError(f"not a format-{STORE_FORMAT} store with key {key}")
        if meta.get("parser_version") != structure.PARSER_VERSION:
            raise ValueError("parser version mismatch")
        counts = meta["counts"]
        arrays: dict[str, np.ndarray] = {}
        for name in ARRAYS:
            n = counts[ARRAYS[name][2]]
            f = path / f"{name}.npy"
            # np.load refuses an empty mmap; a zero-length array is read (it is tiny)
            arr = np.load(f, mmap_mode="r" if n else None, allow_pickle=False)
            arrays[name] = np.asarray(arr)  # plain ndarray view, the mapping stays alive
            if verify and zlib.crc32(np.ascontiguousarray(arrays[name]).data) != meta["crc32"][name]:
                raise ValueError(f"crc32 mismatch in {f.name}")
        store = cls(key=key, rels=list(meta["rels"]),
                    errors={int(i): str(e) for i, e in meta["errors"].items()},
                    chain_ids=list(meta["chain_ids"]), arrays=arrays, path=path)
        store.validate()
        return store

    def counts(self) -> dict[str, int]:
        return {"F": len(self.rels), "C": len(self.chain_ids), "N": int(self.arrays["aatype"].shape[0])}

    def validate(self) -> None:
        counts = self.counts()
        for name, (dtype, trailing, dim) in ARRAYS.items():
            arr = self.arrays[name]
            if arr.dtype != np.dtype(dtype) or arr.shape != (counts[dim], *trailing):
                raise ValueError(f"array {name}: {arr.dtype}{arr.shape}, expected "
                                 f"{np.dtype(dtype)}{(counts[dim], *trailing)}")
        if int(self.arrays["file_chains"].sum()) != counts["C"]:
            raise ValueError("chain counts do not add up")
        if int(self.arrays["chain_length"].sum()) != counts["N"]:
            raise ValueError("chain lengths do not add up")

    # ------------------------------------------------------------ selection
    def select(self, min_length: int, max_length: int, min_completeness: float
               ) -> tuple[RecordTable, list[tuple[str, str]]]:
        """One chain per file, the rule of :func:`structure.select_chain` on whole arrays.

        Returns the records sorted by id (a :class:`RecordTable`: records are made on
        access as views into the store's arrays) and (file, reason) for every file without
        one.  Vectorised because at 200k files a per-chain Python pass (the
        old path built every chain of every file) was most of a warm start.
        """
        a = self.arrays
        length, comp, file_chains = a["chain_length"], a["chain_completeness"], a["file_chains"]
        n_files = len(self.rels)
        chain_file = np.repeat(np.arange(n_files, dtype=np.int64), file_chains)
        ok = (comp >= min_completeness) & (length >= min_length) & (length <= max_length)
        idx = np.flatnonzero(ok)
        # per file: longest fitting chain, first in file order on ties
        order = np.lexsort((idx, -length[idx], chain_file[idx]))
        ranked = idx[order]
        first = np.ones(ranked.size, dtype=bool)
        first[1:] = chain_file[ranked][1:] != chain_file[ranked][:-1]
        chosen = ranked[first]
        chosen_file = chain_file[chosen]
        prefixes = [record_prefix(self.rels[f]) for f in chosen_file.tolist()]
        duplicate = self._duplicate_entries(prefixes, chosen_file.tolist())
        if duplicate:
            used = np.array([f not in duplicate for f in chosen_file.tolist()], dtype=bool)
            chosen, chosen_file = chosen[used], chosen_file[used]
            prefixes = [p for p, u in zip(prefixes, used.tolist()) if u]
        ids = [f"{prefix}_{self.chain_ids[c].strip() or '-'}" for prefix, c in zip(prefixes, chosen.tolist())]
        by_id = np.array(sorted(range(len(ids)), key=ids.__getitem__), dtype=np.int64)  # stable
        records = RecordTable(self, chosen[by_id], chosen_file[by_id])
        has = np.zeros(n_files, dtype=bool)
        has[chosen_file] = True
        file_start = np.zeros(n_files + 1, dtype=np.int64)
        np.cumsum(file_chains, out=file_start[1:])
        skipped = []
        for f in np.flatnonzero(~has).tolist():
            if f in duplicate:
                skipped.append((self.rels[f], duplicate[f]))
                continue
            if f in self.errors:
                skipped.append((self.rels[f], self.errors[f]))
                continue
            lo, hi = int(file_start[f]), int(file_start[f + 1])
            skipped.append((self.rels[f], skip_reason(length[lo:hi], comp[lo:hi], min_length, max_length,
                                                      min_completeness)))
        return records, skipped

    def _duplicate_entries(self, prefixes: list[str], files: list[int]) -> dict[int, str]:
        """Files left out because another file of the same entry is used: file -> reason.

        ``X.pdb``, ``X.cif`` and ``X.ent.gz`` in one folder are one entry in several formats
        and would all become record ``X_<chain>``.  Record ids must be unique (they name
        checkpointed split members and validation rows) and one entry must not train twice,
        so one file per (folder, stem) is used: mmCIF before PDB (the PDB's primary format,
        and the only one for large entries), then the first name in sorted order.  The id
        stays ``X_<chain>`` whichever file it comes from, so adding or removing the other
        format never renames a record.  Only files that yielded a record compete.
        """
        groups: dict[str, list[int]] = {}
        for prefix, f in zip(prefixes, files):
            groups.setdefault(prefix, []).append(f)
        out: dict[int, str] = {}
        for members in groups.values():
            if len(members) < 2:
                continue
            keep = min(members, key=lambda f: (structure_format(self.rels[f]) != "mmcif", self.rels[f]))
            kept = self._chain_summary(keep)
            for f in members:
                if f != keep:
                    here = self._chain_summary(f)
                    same = (f"same chains in both: {kept}" if here == kept
                            else f"chains differ: here {here}, there {kept}")
                    out[f] = (f"duplicate entry: {self.rels[keep]} is used (one file per entry, mmCIF "
                              f"preferred); {same}")
        return out

    def _chain_summary(self, f: int) -> str:
        """``A:225,B:98``: every chain of file ``f`` with its length, as the MANIFEST writes it."""
        start = int(self.arrays["file_chains"][:f].sum())
        n = int(self.arrays["file_chains"][f])
        lengths = self.arrays["chain_length"][start:start + n].tolist()
        return ",".join(f"{self.chain_ids[start + k].strip() or '-'}:{lengths[k]}" for k in range(n))

    def describe(self) -> dict[str, Any]:
        return {"key": self.key, "path": str(self.path or ""), **self.counts()}


class RecordTable(Sequence[ProteinChain]):
    """The selected records of a store as a sequence that makes each :class:`ProteinChain`
    when it is accessed (arrays are views into the store, nothing is copied).

    Why not a list: at 200k chains the long-lived Python objects (a dataclass, a sequence
    string and four array views per chain) are most of what each process holds privately,
    and a forked DataLoader worker copies the pages they live on as soon as it touches them
    (reference counts).  A table holds two integer arrays instead; slicing and
    :meth:`subset` give tables, so the train/validation split stays one too.  Pickled (a
    spawned worker), a table from a store on disk maps the store again instead of copying it.
    """

    def __init__(self, store: DatasetStore, chains: np.ndarray, files: np.ndarray) -> None:
        self.store = store
        self.chains = np.asarray(chains, dtype=np.int64)  # chain number per record
        self.files = np.asarray(files, dtype=np.int64)  # file number per record
        if store.res_start is None:
            store.res_start = np.zeros(store.arrays["chain_length"].size + 1, dtype=np.int64)
            np.cumsum(store.arrays["chain_length"], out=store.res_start[1:])

    def __len__(self) -> int:
        return int(self.chains.size)

    @overload
    def __getitem__(self, i: int) -> ProteinChain: ...

    @overload
    def __getitem__(self, i: slice) -> RecordTable: ...

    def __getitem__(self, i: int | slice) -> ProteinChain | RecordTable:
        if isinstance(i, slice):
            return RecordTable(self.store, self.chains[i], self.files[i])
        c, f = int(self.chains[i]), int(self.files[i])  # IndexError past the end, as a list
        st, a = self.store, self.store.arrays
        assert st.res_start is not None
        lo, hi = int(st.res_start[c]), int(st.res_start[c + 1])
        rel, cid = st.rels[f], st.chain_ids[c]
        return ProteinChain(
            id=f"{record_prefix(rel)}_{cid.strip() or '-'}", source=rel, chain=cid,
            sequence=a["sequence"][lo:hi].tobytes().decode("ascii"), aatype=a["aatype"][lo:hi],
            coords=a["coords"][lo:hi], atom_mask=a["atom_mask"][lo:hi], residue_index=a["residue_index"][lo:hi])

    def __iter__(self) -> Iterator[ProteinChain]:
        for i in range(len(self)):
            yield self[i]

    def subset(self, indices: Sequence[int] | np.ndarray) -> RecordTable:
        idx = np.asarray(indices, dtype=np.int64)
        return RecordTable(self.store, self.chains[idx], self.files[idx])

    def lengths(self) -> np.ndarray:
        return self.store.arrays["chain_length"][self.chains]

    def sequence(self, i: int) -> str:
        assert self.store.res_start is not None
        c = int(self.chains[i])
        return self.store.arrays["sequence"][self.store.res_start[c]:self.store.res_start[c + 1]].tobytes().decode("ascii")

    def __reduce__(self) -> tuple[Any, ...]:
        if self.store.path is not None:
            return (_reopen, (str(self.store.path.parent), self.store.key, self.chains, self.files))
        return (RecordTable, (self.store, self.chains, self.files))

    def __repr__(self) -> str:
        return f"RecordTable({len(self)} records of store {self.store.key})"


def _reopen(cache: str, key: str, chains: np.ndarray, files: np.ndarray) -> RecordTable:
    return RecordTable(DatasetStore.open(Path(cache), key, verify=False), chains, files)


def record_prefix(rel: str) -> str:
    """Chain id prefix of a file: its name without suffixes, with its sub-folder if any."""
    return str(Path(rel).parent / chain_id_prefix(rel)) if "/" in rel else chain_id_prefix(rel)


def skip_reason(lengths: np.ndarray, completeness: np.ndarray, min_length: int, max_length: int,
                min_completeness: float) -> str:
    """Why no chain of a file was selected: the exact words of :func:`structure.select_chain`."""
    if lengths.size == 0:
        return "no protein chain"
    complete = completeness >= min_completeness
    if not complete.any():
        best = float(completeness.max())
        return f"no chain with backbone completeness >= {min_completeness:g} (best {best:.2f})"
    ls = sorted({int(n) for n in lengths[complete]})
    return (f"no chain with {min_length}-{max_length} residues "
            f"(lengths: {', '.join(map(str, ls[:5]))}{'...' if len(ls) > 5 else ''})")


def _durable(f: IO[Any]) -> None:
    """On disk before the rename (and before a manifest names the store): a trusted start
    checks shapes, not every byte, so a crash must not leave a store of the right size
    with missing data behind its name."""
    f.flush()
    os.fsync(f.fileno())


def _cat(parts: list[np.ndarray], trailing: tuple[int, ...], dtype: type) -> np.ndarray:
    if not parts:
        return np.zeros((0, *trailing), dtype=dtype)
    return np.concatenate(parts).astype(dtype, copy=False)


def _completeness(atom_mask: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Per chain: share of residues with N, CA and C, bit-identical to
    ``ProteinChain.completeness`` (a mean of booleans is an exact count / length)."""
    full = np.zeros(atom_mask.shape[0] + 1, dtype=np.int64)
    np.cumsum(atom_mask[:, :3].all(axis=1), out=full[1:])
    ends = np.cumsum(lengths)
    counts = full[ends] - full[ends - lengths]
    out = np.zeros(lengths.shape, dtype=np.float64)
    nz = lengths > 0
    out[nz] = counts[nz] / lengths[nz]
    return out
