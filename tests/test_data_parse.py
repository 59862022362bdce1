"""Parsing real PDB/mmCIF files and every kind of broken file into ProteinChain / StructureError."""

from __future__ import annotations

import csv
import gzip
import os
from pathlib import Path

import numpy as np
import pytest

from foldhpc.data.structure import (
    PARSER_VERSION,
    RESTYPES,
    ProteinChain,
    StructureError,
    parse_structure,
    select_chain,
    strictly_increasing,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "data"
GOOD = Path(__file__).resolve().parent / "data" / "good"
BAD = Path(__file__).resolve().parent / "data" / "bad"


def manifest() -> dict[str, dict[str, str]]:
    with open(EXAMPLES / "MANIFEST.tsv", newline="") as f:
        return {row["pdb_id"]: row for row in csv.DictReader(f, delimiter="\t")}


def chain(chains: list[ProteinChain], chain_id: str) -> ProteinChain:
    return next(c for c in chains if c.chain == chain_id)


@pytest.mark.parametrize("name", ["101M.pdb.gz", "1A7G.cif.gz", "1K6P.pdb.gz", "1LCD.cif.gz",
                                  "4GCN.pdb.gz", "1UBI.pdb.gz", "5GOB.pdb.gz", "1A4W.pdb.gz"])
def test_chains_match_manifest(name: str) -> None:
    row = manifest()[name.split(".")[0]]
    chains = parse_structure(GOOD / name)
    got = {c.chain: len(c) for c in chains}
    for item in row["protein_chains"].split(","):
        cid, n = item.split(":")
        assert got[cid] == int(n), (cid, got)
    primary = chain(chains, row["chains"])
    assert primary.sequence == row["sequence"]
    assert len(primary) == int(row["n_residues"])
    assert primary.id == f"{row['pdb_id']}_{row['chains']}"
    assert primary.source == name


def test_selenomethionine_is_kept_as_met() -> None:
    # The MANIFEST row of 1A8O still counts 66 without its 4 HETATM MSE (its README says MSE counts
    # either way); we keep them as M so the chain is unbroken. MSE written as ATOM: test_data_quirks.py.
    row = manifest()["1A8O"]
    c = chain(parse_structure(GOOD / "1A8O.pdb"), "A")
    text = (GOOD / "1A8O.pdb").read_text()
    n_mse = sum(1 for line in text.splitlines()
                if line.startswith("HETATM") and line[17:20] == "MSE" and line[12:16] == " CA ")
    assert n_mse == 4
    assert len(c) == int(row["n_residues"]) + n_mse == 70
    assert c.sequence.count("M") == row["sequence"].count("M") + n_mse


def test_arrays_types_and_known_coordinates() -> None:
    c = chain(parse_structure(GOOD / "101M.pdb.gz"), "A")
    L = len(c)
    assert c.aatype.dtype == np.int8 and c.aatype.shape == (L,)
    assert c.coords.dtype == np.float32 and c.coords.shape == (L, 4, 3)
    assert c.atom_mask.dtype == np.bool_ and c.atom_mask.shape == (L, 4)
    assert c.residue_index.dtype == np.int32 and c.residue_index.shape == (L,)
    assert "".join(RESTYPES[i] for i in c.aatype) == c.sequence
    # ATOM      1  N   MET A   0      24.277   8.374  -9.854 ...
    # ATOM      2  CA  MET A   0      24.404   9.859  -9.939 ...
    assert c.sequence[0] == "M" and c.residue_index[0] == 0
    np.testing.assert_allclose(c.coords[0, 0], [24.277, 8.374, -9.854], atol=1e-3)
    np.testing.assert_allclose(c.coords[0, 1], [24.404, 9.859, -9.939], atol=1e-3)
    assert c.atom_mask.all()
    # mmCIF: ATOM 2 C CA . ALA A 1 1 ? 26.660 -0.313 80.273 ... 291 ALA E CA 1
    e = chain(parse_structure(GOOD / "1A7G.cif.gz"), "E")
    assert e.residue_index[0] == 291  # author numbering, not label_seq_id
    np.testing.assert_allclose(e.coords[0, 1], [26.660, -0.313, 80.273], atol=1e-3)


def test_missing_backbone_atoms_are_masked() -> None:
    chains = parse_structure(GOOD / "1A4W.pdb.gz")
    for c in chains:
        assert not c.coords[~c.atom_mask].any()  # zeros where missing
        assert c.atom_mask[:, 1].all()  # CA always present (residues without CA dropped)


def test_1k6p_altloc_labels_1_and_2() -> None:
    a = chain(parse_structure(GOOD / "1K6P.pdb.gz"), "A")
    assert len(a) == 99
    # ATOM 379 CA 1ILE A 50  2.801 -5.050 10.589 0.50 (altloc "2" is at 2.8xx too, differs)
    i = int(np.flatnonzero(a.residue_index == 50)[0])
    assert a.sequence[i] == "I"
    np.testing.assert_allclose(a.coords[i, 1], [2.801, -5.050, 10.589], atol=1e-3)


def test_nmr_file_uses_model_1() -> None:
    text = gzip.decompress((GOOD / "1LCD.cif.gz").read_bytes()).decode()
    assert "MET A CA     2" in text  # model 2 exists
    a = chain(parse_structure(GOOD / "1LCD.cif.gz"), "A")
    assert len(a) == 51
    # model 1: 27.910 28.670 6.970; model 2: 32.290 27.380 7.830
    np.testing.assert_allclose(a.coords[0, 1], [27.910, 28.670, 6.970], atol=1e-3)


def test_negative_residue_numbers_and_insertion_codes() -> None:
    a = chain(parse_structure(GOOD / "4GCN.pdb.gz"), "A")
    assert a.residue_index[:3].tolist() == [-2, -1, 0]
    h = chain(parse_structure(GOOD / "1A4W.pdb.gz"), "H")
    raw = [int(line[22:26]) for line in gzip.decompress((GOOD / "1A4W.pdb.gz").read_bytes()).decode().splitlines()
           if line.startswith("ATOM") and line[21] == "H" and line[12:16] == " CA " and line[16] in " A"]
    assert len(raw) != len(set(raw))  # insertion codes repeat author numbers ...
    assert (np.diff(h.residue_index) > 0).all()  # ... but residue_index never does
    assert h.residue_index[0] == raw[0] and h.residue_index[-1] >= raw[-1]


def test_strictly_increasing_keeps_gaps() -> None:
    assert strictly_increasing([100, 100, 100, 101, 110, 111]).tolist() == [100, 101, 102, 103, 110, 111]
    assert strictly_increasing([-3, -1, 0]).tolist() == [-3, -1, 0]
    assert strictly_increasing([5, 2, 3]).tolist() == [5, 6, 7]


@pytest.mark.parametrize("name", ["101M.pdb.gz", "1A7G.cif.gz"])
def test_gzipped_and_plain_parse_identically(name: str, tmp_path: Path) -> None:
    plain = tmp_path / name[:-3]
    plain.write_bytes(gzip.decompress((GOOD / name).read_bytes()))
    for x, y in zip(parse_structure(GOOD / name), parse_structure(plain), strict=True):
        assert x.id == y.id and x.sequence == y.sequence
        np.testing.assert_array_equal(x.coords, y.coords)
        np.testing.assert_array_equal(x.residue_index, y.residue_index)


def test_mmcif_content_under_pdb_name(tmp_path: Path) -> None:
    wrong = tmp_path / "1A7G.pdb"
    wrong.write_bytes(gzip.decompress((GOOD / "1A7G.cif.gz").read_bytes()))
    assert parse_structure(wrong)[0].sequence == manifest()["1A7G"]["sequence"]


BAD_REASONS = {
    "truncated.pdb.gz": "corrupt gzip",
    "garbage.pdb.gz": "corrupt gzip",
    "empty.pdb": "empty file",
    "binary.cif": "not a text structure file",
    "dna_only.pdb": "no protein chain",
    "ligand_only.pdb": "no protein chain",
    "not_a_structure.pdb": "not a structure file",
    "structure.txt": "unsupported extension",
    "truncated_mid_atom.pdb": "truncated file",
    "broken_loop.cif": "corrupt mmCIF",
    # 12 residues of a real entry with one number made impossible (parser version 2)
    "nan_coords.pdb": "non-finite coordinates: chain A residue 156 CA x = nan",
    "inf_coords.cif": "non-finite coordinates: chain E residue 296 CA y = inf",
    "far_coords.cif": "absurd coordinates: chain E residue 298 CA x = 123456.789",
    "collapsed.pdb": "absurd coordinates: chain A: the CA atoms of residues 152 and 153 are 0.00 A apart",
}


def test_every_bad_file_has_an_expectation() -> None:
    assert sorted(p.name for p in BAD.iterdir() if not p.name.startswith(".")) == sorted(BAD_REASONS)


@pytest.mark.parametrize("name", sorted(BAD_REASONS))
def test_bad_file_raises_structure_error_with_reason(name: str) -> None:
    with pytest.raises(StructureError) as info:
        parse_structure(BAD / name)
    assert info.value.reason.startswith(BAD_REASONS[name]), info.value.reason
    assert str(info.value) == info.value.reason


def test_unreadable_paths(tmp_path: Path) -> None:
    (tmp_path / "dir.pdb").mkdir()
    (tmp_path / "dangling.pdb").symlink_to(tmp_path / "nowhere.pdb")
    for name in ("dir.pdb", "dangling.pdb"):
        with pytest.raises(StructureError, match="^unreadable"):
            parse_structure(tmp_path / name)
    if os.geteuid() != 0:  # root can read anything
        locked = tmp_path / "locked.pdb"
        locked.write_bytes((BAD / "ligand_only.pdb").read_bytes())
        locked.chmod(0)
        with pytest.raises(StructureError, match="^unreadable"):
            parse_structure(locked)


def test_select_chain_rule() -> None:
    chains = parse_structure(GOOD / "1K6P.pdb.gz")  # A:99, B:99
    best, why = select_chain(chains, 40, 500, 0.9)
    assert best is not None and best.chain == "A" and why == ""  # first on a tie
    chains_1a4w = parse_structure(GOOD / "1A4W.pdb.gz")  # L:26, H:248, I:8
    assert select_chain(chains_1a4w, 20, 100, 0.9)[0].chain == "L"
    assert select_chain(chains_1a4w, 5, 1000, 0.9)[0].chain == "H"
    none, why = select_chain(chains_1a4w, 300, 1000, 0.9)
    assert none is None and "300-1000" in why
    broken = chains[0]
    mask = broken.atom_mask.copy()
    mask[::2, 0] = False  # half the residues lose N
    holey = ProteinChain(**{**broken.__dict__, "atom_mask": mask})
    assert holey.completeness == pytest.approx(0.5, abs=0.01)
    none, why = select_chain([holey], 40, 500, 0.9)
    assert none is None and "completeness" in why


def test_parser_version_is_int() -> None:
    assert isinstance(PARSER_VERSION, int) and PARSER_VERSION >= 1
