"""Warm starts at scale: the sealed manifest is trusted without touching the structure
files, the store is memory-mapped and selects exactly like select_chain, and a sharded
preparation merges into the same cache as a single one."""

from __future__ import annotations

import json
import logging
import mmap
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from foldhpc.config import DataConfig
from foldhpc.data import (DataError, TrainBatches, ValBatches, parse_structure, prepare_dataset, select_chain,
                          split_by_sequence)
from foldhpc.data.cache import load_dataset, load_sealed, parse_shard
from foldhpc.data.entries import Entry
from foldhpc.data.store import DatasetStore, RecordTable
from foldhpc.data.structure import ProteinChain, StructureError, is_structure_file

from conftest import TINY, run_foldhpc

HERE = Path(__file__).resolve().parent
GOOD = HERE / "data" / "good"
BAD = HERE / "data" / "bad"
FILTERS = dict(min_length=40, max_length=1000, min_completeness=0.9)


def make_data(root: Path, with_bad: bool = False) -> Path:
    data = root / "data"
    shutil.copytree(GOOD, data, ignore=shutil.ignore_patterns(".*"))
    if with_bad:
        shutil.copytree(BAD, data / "bad", ignore=shutil.ignore_patterns(".*"))
    return data


def prepare(data: Path, cache: Path, **kw):
    return prepare_dataset(data, cache, **{**FILTERS, "workers": 1, "progress": False, **kw})


def sealed(data: Path, cache: Path, **kw):
    return load_sealed(data, cache, **{**FILTERS, **kw})


def assert_same_records(a, b) -> None:
    assert [r.id for r in a] == [r.id for r in b]
    for x, y in zip(a, b):
        assert (x.source, x.chain, x.sequence) == (y.source, y.chain, y.sequence)
        for k in ("aatype", "coords", "atom_mask", "residue_index"):
            u, v = getattr(x, k), getattr(y, k)
            assert u.dtype == v.dtype and np.array_equal(u, v), (x.id, k)


def test_trusted_start_reads_no_structure_file(tmp_path: Path, caplog) -> None:
    data, cache = make_data(tmp_path, with_bad=True), tmp_path / "cache"
    scanned = prepare(data, cache)
    mtime = data.stat().st_mtime_ns
    # remove every structure file but keep the folder's mtime: a start that opened or
    # stat'ed any of them could not return their records
    for p in sorted(data.rglob("*"), reverse=True):
        if p.is_file() and is_structure_file(p.name):
            p.unlink()
    os.utime(data, ns=(mtime, mtime))
    with caplog.at_level(logging.INFO, logger="foldhpc.data"):
        trusted = sealed(data, cache)
    assert trusted is not None and trusted.trusted_manifest
    assert "trusting the sealed manifest" in caplog.text and "foldhpc data prepare" in caplog.text
    assert_same_records(trusted.records, scanned.records)
    assert trusted.skipped == scanned.skipped and trusted.n_files == scanned.n_files
    assert trusted.n_parsed == 0
    # a rescan (what `foldhpc data prepare` does) sees the truth
    with pytest.raises(DataError, match="all .* files were skipped"):
        prepare(data, cache)


def test_trusted_batches_are_bit_identical(tmp_path: Path) -> None:
    data, cache = make_data(tmp_path), tmp_path / "cache"
    scanned = prepare(data, cache)
    trusted = sealed(data, cache)
    assert trusted is not None
    a = TrainBatches(scanned.records, batch_size=3, crop_size=32, seed=5)
    b = TrainBatches(trusted.records, batch_size=3, crop_size=32, seed=5)
    for step in range(7):
        x, y = a[step], b[step]
        assert all(torch.equal(x[k], y[k]) for k in x)
    # a table (records made on access) and a plain list of the same records: same split, same batches
    table = trusted.records
    assert isinstance(table, RecordTable)
    listed = list(table)
    for fraction in (0.2, 0.5):
        (t_train, t_val), (l_train, l_val) = split_by_sequence(table, fraction, 3), split_by_sequence(listed, fraction, 3)
        assert isinstance(t_train, RecordTable) and isinstance(t_val, RecordTable)
        assert_same_records(list(t_train), l_train) and assert_same_records(list(t_val), l_val)
    t_b, l_b = TrainBatches(t_train, 2, 40, 1), TrainBatches(l_train, 2, 40, 1)
    for step in range(5):
        x, y = t_b[step], l_b[step]
        assert all(torch.equal(x[k], y[k]) for k in x)
    x, y = ValBatches(t_val, 2, 40)[0], ValBatches(l_val, 2, 40)[0]
    assert all(torch.equal(x[k], y[k]) for k in x)
    # pickled (a spawned DataLoader worker): maps the store again, same records
    again = pickle.loads(pickle.dumps(t_train))
    assert again.store is not t_train.store and again.store.path == t_train.store.path
    assert_same_records(list(again), list(t_train))
    assert len(pickle.dumps(t_train)) < 2000  # indices only, not the arrays
    # the records are views into the mapped store, not copies in this process's heap
    base = trusted.records[0].coords
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, mmap.mmap)
    assert not trusted.records[0].coords.flags.writeable


def test_changes_are_picked_up_by_the_rule(tmp_path: Path, caplog) -> None:
    data, cache = make_data(tmp_path), tmp_path / "cache"
    prepare(data, cache)
    # in place: trusted until prepare re-validates
    mtime = data.stat().st_mtime_ns
    (data / "101M.pdb.gz").write_bytes((GOOD / "1UBI.pdb.gz").read_bytes())
    os.utime(data, ns=(mtime, mtime))
    before = sealed(data, cache)
    assert before is not None
    ids = {r.id: r for r in before.records}
    assert ids["101M_A"].sequence != ids["1UBI_A"].sequence
    after = prepare(data, cache)
    ids = {r.id: r for r in after.records}
    assert ids["101M_A"].sequence == ids["1UBI_A"].sequence and after.n_parsed == 0
    again = sealed(data, cache)
    assert again is not None and {r.id: r.sequence for r in again.records} == {r.id: r.sequence for r in after.records}
    # a new file at the top level changes the folder's mtime: the next start rescans by itself
    shutil.copy(GOOD / "1UBI.pdb.gz", data / "9NEW.pdb.gz")
    with caplog.at_level(logging.INFO, logger="foldhpc.data"):
        assert sealed(data, cache) is None
    assert "changed since it was prepared" in caplog.text
    cfg = DataConfig(path=str(data), cache_dir=str(cache), prepare_workers=1)
    report = load_dataset(cfg, progress=False)
    assert "9NEW_A" in {r.id for r in report.records} and not report.trusted_manifest
    assert load_dataset(cfg, progress=False).trusted_manifest  # re-sealed by that scan
    # forced rescan
    assert not load_dataset(cfg, progress=False, rescan=True).trusted_manifest


def test_broken_manifest_or_store_falls_back_to_a_scan(tmp_path: Path, caplog) -> None:
    data, cache = make_data(tmp_path), tmp_path / "cache"
    prepare(data, cache)
    (manifest,) = (cache / "datasets").glob("*.json")
    doc = json.loads(manifest.read_text())
    doc["body"]["n_files"] += 1  # edited by hand: the seal no longer matches
    manifest.write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING):
        assert sealed(data, cache) is None
    assert "seal does not match" in caplog.text
    prepare(data, cache)  # re-sealed
    (store,) = cache.glob("store-*")
    (store / "aatype.npy").write_bytes(b"\x93NUMPY")  # torn
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert sealed(data, cache) is None
    assert "is unusable" in caplog.text
    cfg = DataConfig(path=str(data), cache_dir=str(cache), prepare_workers=1)
    assert len(load_dataset(cfg, progress=False).records) == 9  # rebuilt from the entries
    assert load_dataset(cfg, progress=False).trusted_manifest


@pytest.mark.parametrize("filters", [
    FILTERS,
    dict(min_length=40, max_length=150, min_completeness=0.9),
    dict(min_length=2, max_length=100000, min_completeness=1.0),
    dict(min_length=20, max_length=90, min_completeness=0.5),
])
def test_store_selection_matches_select_chain(tmp_path: Path, filters: dict) -> None:
    data = make_data(tmp_path, with_bad=True)
    report = prepare(data, tmp_path / "cache", **filters)
    # reference: parse every file and apply select_chain to its chains
    want_records, want_skipped = [], {}
    for p in sorted(data.rglob("*")):
        rel = p.relative_to(data).as_posix()
        if not p.is_file() or not is_structure_file(p.name):
            continue
        try:
            chains = parse_structure(p)
        except StructureError:
            continue
        best, why = select_chain(chains, **filters)
        if best is None:
            want_skipped[rel] = why
        else:
            want_records.append(best)
    got = {r.source: r for r in report.records}
    assert sorted(got) == sorted(r.source for r in want_records)
    for w in want_records:
        g = got[w.source]
        assert g.chain == w.chain and g.sequence == w.sequence and np.array_equal(g.coords, w.coords)
        assert np.array_equal(g.atom_mask, w.atom_mask) and np.array_equal(g.residue_index, w.residue_index)
    skipped = dict(report.skipped)
    for rel, why in want_skipped.items():
        assert skipped[rel] == why


def test_store_selection_on_partial_backbones() -> None:
    """Completeness, length limits and ties on synthetic chains (the shipped files are all complete)."""
    rng = np.random.default_rng(0)
    rows, files = [], []
    for f in range(40):
        chains = []
        for c in range(int(rng.integers(1, 5))):
            n = int(rng.choice([10, 30, 30, 50, 80]))
            mask = rng.random((n, 4)) > rng.choice([0.0, 0.05, 0.3])
            mask[:, 1] = True
            chains.append(ProteinChain(
                id=f"F{f}_{c}", source=f"F{f}.pdb", chain="ABCD"[c], sequence="".join(rng.choice(list("ACDX"), n)),
                aatype=rng.integers(0, 21, n).astype(np.int8), coords=rng.random((n, 4, 3), dtype=np.float32),
                atom_mask=mask, residue_index=np.arange(n, dtype=np.int32)))
        files.append(chains)
        rows.append((f"sub/F{f}.pdb", Entry.from_chains(f"k{f}", chains)))
    rows.append(("bad.pdb", Entry.failed("kbad", "corrupt gzip")))
    store = DatasetStore.from_entries("x", rows)
    kinds = set()
    for lo, hi, comp in [(20, 60, 0.9), (2, 1000, 1.0), (40, 100, 0.5), (5, 35, 0.99)]:
        records, skipped = store.select(lo, hi, comp)
        got, why = {r.source: r for r in records}, dict(skipped)
        assert why.pop("bad.pdb") == "corrupt gzip"
        kinds |= {w.split(" (")[0].split(" >=")[0] for w in why.values()}
        for (rel, _), chains in zip(rows, files):
            best, reason = select_chain(chains, lo, hi, comp)
            if best is None:
                assert rel not in got and why[rel] == reason
            else:
                r = got[rel]
                assert r.chain == best.chain and r.sequence == best.sequence and r.id == f"sub/{best.id[:-2]}_{best.chain}"
                assert np.array_equal(r.atom_mask, best.atom_mask) and np.array_equal(r.coords, best.coords)
    assert "no chain with backbone completeness" in kinds and any("residues" in k for k in kinds), kinds


def test_sharded_prepare_merges_into_the_same_cache(tmp_path: Path) -> None:
    data = make_data(tmp_path, with_bad=True)
    single = prepare(data, tmp_path / "single")
    cache = tmp_path / "sharded"
    parts = [prepare(data, cache, shard=(i, 3)) for i in range(3)]
    assert sum(p.n_parsed for p in parts) == single.n_parsed  # every file parsed exactly once
    assert not list(cache.glob("store-*")) and not list(cache.glob("datasets/*.json"))
    assert len(list((cache / "shards").glob("*.json"))) == 3
    merged = prepare(data, cache)
    assert merged.n_parsed == 0 and merged.n_cached == single.n_parsed
    assert_same_records(merged.records, single.records)
    assert merged.skipped == single.skipped
    assert [p.name for p in cache.glob("store-*")] == [p.name for p in (tmp_path / "single").glob("store-*")]
    assert not list((cache / "shards").glob("*.json"))  # folded into index.json
    index = json.loads((cache / "index.json").read_text())["files"]
    assert len(index) == len(json.loads((tmp_path / "single" / "index.json").read_text())["files"])


def test_parse_shard() -> None:
    assert parse_shard("0/1") == (0, 1) and parse_shard("15/16") == (15, 16)
    for bad in ("16/16", "-1/4", "1", "a/b", "1/0"):
        with pytest.raises(DataError, match="--shard"):
            parse_shard(bad)


def test_cli_shards_merge_and_info(tmp_path: Path) -> None:
    data = make_data(tmp_path)
    sets = ["--config", str(TINY), "--set", f"data.path={data}", "--set", f"data.cache_dir={tmp_path / 'c'}",
            "--set", "data.prepare_workers=1"]
    for i in range(2):
        r = run_foldhpc("data", "prepare", "--shard", f"{i}/2", "--json", *sets)
        assert r.returncode == 0, r.stderr
    r = run_foldhpc("data", "prepare", "--json", *sets)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["n_parsed"] == 0 and d["n_records"] == 9 and not d["trusted_manifest"]
    r = run_foldhpc("data", "info", "--json", *sets)
    assert r.returncode == 0 and json.loads(r.stdout)["trusted_manifest"], r.stderr
    r = run_foldhpc("data", "prepare", "--shard", "2/2", *sets)
    assert r.returncode == 2 and "need 0 <= I < N" in r.stderr
