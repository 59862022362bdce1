"""prepare_dataset: skip-and-report, content-addressed cache, atomic writes, clear errors."""

from __future__ import annotations

import gzip
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from foldhpc.config import DataConfig
from foldhpc.data import cache as cache_mod
from foldhpc.data import structure as structure_mod
from foldhpc.data import DataError, DatasetReport, load_dataset, prepare_dataset, resolve_cache_dir

HERE = Path(__file__).resolve().parent
GOOD = HERE / "data" / "good"
BAD = HERE / "data" / "bad"
NO_HIDDEN = shutil.ignore_patterns(".*")  # e.g. a .foldhpc-cache someone made in tests/data
FILTERS = dict(min_length=40, max_length=1000, min_completeness=0.9)

EXPECTED_SKIPS = {
    "bad/truncated.pdb.gz": "corrupt gzip",
    "bad/garbage.pdb.gz": "corrupt gzip",
    "bad/empty.pdb": "empty file",
    "bad/binary.cif": "not a text structure file",
    "bad/dna_only.pdb": "no protein chain",
    "bad/ligand_only.pdb": "no protein chain",
    "bad/not_a_structure.pdb": "not a structure file",
    "bad/structure.txt": "unsupported extension",
    "bad/truncated_mid_atom.pdb": "truncated file",
    "bad/broken_loop.cif": "corrupt mmCIF",
    "bad/nan_coords.pdb": "non-finite coordinates",
    "bad/inf_coords.cif": "non-finite coordinates",
    "bad/far_coords.cif": "absurd coordinates",
    "bad/collapsed.pdb": "absurd coordinates",
    "bad/dangling.pdb.gz": "unreadable",
    "bad/folder.cif": "unreadable",
}


def make_dataset(root: Path, with_bad: bool = True) -> Path:
    data = root / "data"
    shutil.copytree(GOOD, data, ignore=NO_HIDDEN)
    for p in data.iterdir():
        p.chmod(0o644)
    (data / "README.md").write_text("not data\n")
    (data / "MANIFEST.tsv").write_text("file\n")
    (data / ".hidden").mkdir()
    (data / ".hidden" / "x.pdb").write_text("ignored\n")
    if with_bad:
        shutil.copytree(BAD, data / "bad", ignore=NO_HIDDEN)
        (data / "bad" / "dangling.pdb.gz").symlink_to(root / "gone.pdb.gz")
        (data / "bad" / "folder.cif").mkdir()  # root reads chmod-000 files, so use these
    return data


def prepare(data: Path, cache: Path, **kw) -> DatasetReport:
    return prepare_dataset(data, cache, **{**FILTERS, "workers": 1, "progress": False, **kw})


def by_id(report: DatasetReport) -> dict[str, object]:
    return {r.id: r for r in report.records}


def test_bad_files_are_skipped_with_reasons(tmp_path: Path) -> None:
    data = make_dataset(tmp_path)
    report = prepare(data, tmp_path / "cache")
    skipped = dict(report.skipped)
    assert set(skipped) == set(EXPECTED_SKIPS)
    # binary.cif and garbage.pdb.gz hold identical bytes: the cache must not mix up their
    # name-dependent reasons (checked above), also on a warm run
    assert dict(prepare(data, tmp_path / "cache").skipped) == skipped
    for rel, reason in EXPECTED_SKIPS.items():
        assert skipped[rel].startswith(reason), (rel, skipped[rel])
    # 9 good files, one chain each; README/MANIFEST/hidden are not counted
    assert sorted(by_id(report)) == ["101M_A", "1A4W_H", "1A7G_E", "1A8O_A", "1K6P_A", "1LCD_A",
                                     "1UBI_A", "4GCN_A", "5GOB_A"]
    assert report.n_files == 9 + len(EXPECTED_SKIPS)
    assert report.n_parsed == 9 + 13  # structure-named files that could be read
    assert report.n_cached == 0
    counts = report.reason_counts()
    assert counts["corrupt gzip"] == 2 and counts["unreadable"] == 2 and counts["no protein chain"] == 2
    assert counts["non-finite coordinates"] == 2 and counts["absurd coordinates"] == 2
    text = report.format()
    assert "bad/broken_loop.cif: corrupt mmCIF" in text and "100-199" in text
    d = json.loads(report.to_json())
    assert d["n_records"] == 9 and len(d["skipped"]) == len(EXPECTED_SKIPS)
    assert sum(c for _, _, c in report.length_histogram()) == 9
    assert sum(c for _, _, c in report.length_histogram(4)) == 9


def test_second_prepare_is_a_cache_hit(tmp_path: Path) -> None:
    data = make_dataset(tmp_path)
    first = prepare(data, tmp_path / "cache")
    second = prepare(data, tmp_path / "cache")
    assert second.n_parsed == 0 and second.n_cached == first.n_parsed
    assert second.skipped == first.skipped
    a, b = by_id(first), by_id(second)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].sequence == b[k].sequence and a[k].source == b[k].source
        np.testing.assert_array_equal(a[k].coords, b[k].coords)
        np.testing.assert_array_equal(a[k].atom_mask, b[k].atom_mask)
        np.testing.assert_array_equal(a[k].residue_index, b[k].residue_index)
        np.testing.assert_array_equal(a[k].aatype, b[k].aatype)
    # also without the whole-dataset store (per-file entries) and without the index
    for p in (tmp_path / "cache").glob("store-*"):
        shutil.rmtree(p)
    (tmp_path / "cache" / "index.json").unlink()
    third = prepare(data, tmp_path / "cache")
    assert third.n_parsed == 0 and sorted(by_id(third)) == sorted(a)


def test_changed_file_and_parser_version_are_reparsed(tmp_path: Path, monkeypatch) -> None:
    data = make_dataset(tmp_path, with_bad=False)
    prepare(data, tmp_path / "cache")
    target = data / "101M.pdb.gz"
    ubiquitin = gzip.decompress((GOOD / "1UBI.pdb.gz").read_bytes())
    target.write_bytes(gzip.compress(ubiquitin, mtime=1))  # same name, new bytes
    report = prepare(data, tmp_path / "cache")
    assert report.n_parsed == 1 and report.n_cached == 8
    assert by_id(report)["101M_A"].sequence == by_id(report)["1UBI_A"].sequence
    # content-addressed: bytes the cache has seen (under another name) are not parsed again
    target.write_bytes((GOOD / "1UBI.pdb.gz").read_bytes())
    assert prepare(data, tmp_path / "cache").n_parsed == 0
    # changing a length filter needs no parse at all
    short = prepare(data, tmp_path / "cache", max_length=100)
    assert short.n_parsed == 0 and all(len(r) <= 100 for r in short.records)
    assert "1A4W.pdb.gz" in dict(short.skipped)
    monkeypatch.setattr(structure_mod, "PARSER_VERSION", structure_mod.PARSER_VERSION + 1)
    assert prepare(data, tmp_path / "cache").n_parsed == 9


def test_corrupt_cache_entry_and_pack_are_recovered(tmp_path: Path, caplog) -> None:
    data = make_dataset(tmp_path, with_bad=False)
    cache = tmp_path / "cache"
    prepare(data, cache)
    (store,) = cache.glob("store-*")
    coords = store / "coords.npy"
    coords.write_bytes(coords.read_bytes()[: coords.stat().st_size // 2])  # torn store array
    with caplog.at_level(logging.WARNING):
        report = prepare(data, cache)
    assert report.n_parsed == 0 and report.n_cached == 9  # fell back to per-file entries
    assert "corrupt dataset store" in caplog.text
    caplog.clear()
    (store,) = cache.glob("store-*")  # rebuilt; now flip bytes: only the crc32 can tell
    raw = bytearray(coords.read_bytes())
    raw[-64:] = bytes(b ^ 0xFF for b in raw[-64:])
    coords.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING):
        report = prepare(data, cache)
    assert report.n_parsed == 0 and "crc32 mismatch in coords.npy" in caplog.text
    for p in cache.glob("store-*"):
        shutil.rmtree(p)
    entries = sorted(cache.glob("entries/*/*.npz"))
    assert len(entries) == 9
    raw = bytearray(entries[0].read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 64] = b"\xff" * 64  # flipped bytes: CRC mismatch
    entries[0].write_bytes(bytes(raw))
    entries[1].write_bytes(b"")  # empty file
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        report = prepare(data, cache)
    assert report.n_parsed == 2 and len(report.records) == 9
    assert caplog.text.count("corrupt cache entry") == 2
    assert prepare(data, cache).n_parsed == 0  # repaired


def test_interrupted_write_leaves_no_entry(tmp_path: Path, monkeypatch) -> None:
    data = make_dataset(tmp_path, with_bad=False)
    cache = tmp_path / "cache"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # e.g. SIGINT in the middle of np.savez

    monkeypatch.setattr(cache_mod.np, "savez", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare(data, cache)
    monkeypatch.undo()
    assert not list(cache.glob("entries/*/*.npz")) and not list(cache.rglob("*.tmp"))
    assert prepare(data, cache).n_parsed == 9


def test_parallel_prepare_matches_serial(tmp_path: Path) -> None:
    data = make_dataset(tmp_path)
    serial = prepare(data, tmp_path / "c1", workers=1)
    parallel = prepare(data, tmp_path / "c2", workers=2)
    assert parallel.n_parsed == serial.n_parsed and parallel.skipped == serial.skipped
    for k, r in by_id(serial).items():
        np.testing.assert_array_equal(r.coords, by_id(parallel)[k].coords)


def test_missing_and_empty_data_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist") as info:
        prepare(tmp_path / "nope", tmp_path / "cache")
    assert str(tmp_path / "nope") in str(info.value) and "data.path" in str(info.value)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("only docs\n")
    with pytest.raises(DataError, match="contains no files"):
        prepare(tmp_path / "empty", tmp_path / "cache")


def test_all_files_skipped_is_an_error(tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(BAD, data, ignore=NO_HIDDEN)
    with pytest.raises(DataError) as info:
        prepare(data, tmp_path / "cache")
    msg = str(info.value)
    assert "all 14 files were skipped" in msg and "2 x corrupt gzip" in msg and "data.min_length" in msg
    # good files, but filters exclude every chain
    with pytest.raises(DataError, match="no chain with 2000-3000 residues"):
        prepare(make_dataset(tmp_path / "x", with_bad=False), tmp_path / "cache2",
                min_length=2000, max_length=3000)


def test_unwritable_cache_dir(tmp_path: Path) -> None:
    data = make_dataset(tmp_path, with_bad=False)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DataError, match="not writable.*data.cache_dir") as info:
        prepare(data, blocker / "cache")
    assert str(blocker / "cache") in str(info.value)


def test_load_dataset_resolves_cache_dir(tmp_path: Path, monkeypatch) -> None:
    data = make_dataset(tmp_path, with_bad=False)
    cfg = DataConfig(path=str(data), prepare_workers=1)
    report = load_dataset(cfg, progress=False)
    assert Path(report.cache_dir) == data / ".foldhpc-cache" and len(report.records) == 9
    assert load_dataset(cfg, progress=False).n_parsed == 0  # own cache dir is not scanned
    cfg.cache_dir = str(tmp_path / "elsewhere")
    assert resolve_cache_dir(cfg) == tmp_path / "elsewhere"
    cfg.cache_dir = ""
    monkeypatch.setattr(cache_mod, "_is_writable", lambda d: False)  # read-only data folder
    assert resolve_cache_dir(cfg, run_dir=tmp_path / "run") == tmp_path / "run" / "cache"
    with pytest.raises(DataError, match="data.cache_dir"):
        resolve_cache_dir(cfg)
