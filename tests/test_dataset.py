"""Sequence-grouped split and (seed, step)-deterministic batches."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from foldhpc.data import (
    ProteinChain,
    StepSampler,
    TrainBatches,
    ValBatches,
    parse_structure,
    prepare_dataset,
    split_by_sequence,
)

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent / "examples" / "data"
GOOD = HERE / "data" / "good"
KEYS = {"aatype", "residue_index", "mask", "coords", "atom_mask", "length"}


@pytest.fixture(scope="module")
def small() -> list[ProteinChain]:
    """All chains of the good test files longer than 20 residues (11 chains)."""
    files = sorted(p for p in GOOD.iterdir() if not p.name.startswith("."))
    chains = [c for p in files for c in parse_structure(p) if len(c) > 20]
    assert len(chains) == 11
    return chains


@pytest.fixture(scope="module")
def full_records(tmp_path_factory) -> list[ProteinChain]:
    """The whole shipped example set, through the real prepare pipeline (a few seconds)."""
    cache = tmp_path_factory.mktemp("cache")
    report = prepare_dataset(EXAMPLES, cache, min_length=40, max_length=1000,
                             min_completeness=0.9, workers=2, progress=False)
    assert report.n_files == 329 and len(report.records) > 300
    return report.records


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() == KEYS
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- split


def test_split_never_separates_identical_sequences(full_records: list[ProteinChain]) -> None:
    groups = Counter(r.sequence for r in full_records)
    assert sum(1 for n in groups.values() if n > 1) >= 10  # the set has ~11 such groups
    train, val = split_by_sequence(full_records, 0.1, seed=0)
    assert len(train) + len(val) == len(full_records)
    assert not {r.sequence for r in train} & {r.sequence for r in val}
    assert 0.03 < len(val) / len(full_records) < 0.2
    ids = {r.id for r in val}
    assert ("1UBI_A" in ids) == ("5GOB_A" in ids)
    # deterministic, seed-dependent, and stable when other files are removed
    train2, val2 = split_by_sequence(full_records, 0.1, seed=0)
    assert [r.id for r in val2] == [r.id for r in val]
    assert {r.id for r in split_by_sequence(full_records, 0.1, seed=1)[1]} != ids
    subset = full_records[::2]
    _, val_sub = split_by_sequence(subset, 0.1, seed=0)
    assert {r.id for r in val_sub} == ids & {r.id for r in subset}


def test_split_tiny_dataset_has_both_sides(small: list[ProteinChain]) -> None:
    two = [small[0], small[1]]
    assert two[0].sequence != two[1].sequence
    for seed in range(5):
        train, val = split_by_sequence(two, 0.01, seed)
        assert len(train) == 1 and len(val) == 1
        train, val = split_by_sequence(two, 0.99, seed)
        assert len(train) == 1 and len(val) == 1
    one = [small[0], small[0]]
    train, val = split_by_sequence(one, 0.5, 0)
    assert len(train) + len(val) == 2 and (not train or not val)


# ---------------------------------------------------------------- training batches


def test_train_batch_same_step_same_tensors(small: list[ProteinChain]) -> None:
    a = TrainBatches(small, batch_size=4, crop_size=64, seed=3)
    b = TrainBatches(list(small), batch_size=4, crop_size=64, seed=3)
    for step in (0, 7, 123, 10_000_019):
        assert_same(a[step], b[step])
    assert_same(a[5], a[5])  # and again later in the same process (no hidden state)
    assert not torch.equal(a[0]["coords"], a[1]["coords"])
    c = TrainBatches(small, batch_size=4, crop_size=64, seed=4)
    assert not all(torch.equal(a[s]["coords"], c[s]["coords"]) for s in range(3))


def test_each_epoch_sees_every_record_once(small: list[ProteinChain]) -> None:
    n = len(small)  # 11
    for bs in (4, 11):  # 4 does not divide 11: batches straddle epochs
        tb = TrainBatches(small, batch_size=bs, crop_size=32, seed=0)
        stream = [i for s in range(0, (3 * n) // bs + 1) for i in tb.indices(s)]
        for epoch in range(3):
            assert sorted(stream[epoch * n:(epoch + 1) * n]) == list(range(n))
        assert stream[:n] != stream[n:2 * n]  # reshuffled per epoch
        assert tb.epoch_of(n // bs) == (n // bs * bs) // n


def test_batch_shapes_crop_and_padding(small: list[ProteinChain]) -> None:
    crop = 64
    tb = TrainBatches(small, batch_size=6, crop_size=crop, seed=1)
    for step in range(4):
        batch = tb[step]
        B = 6
        assert batch["aatype"].shape == (B, crop) and batch["aatype"].dtype == torch.long
        assert batch["residue_index"].shape == (B, crop) and batch["residue_index"].dtype == torch.long
        assert batch["mask"].shape == (B, crop) and batch["mask"].dtype == torch.float32
        assert batch["coords"].shape == (B, crop, 4, 3) and batch["coords"].dtype == torch.float32
        assert batch["atom_mask"].shape == (B, crop, 4) and batch["atom_mask"].dtype == torch.float32
        assert batch["length"].shape == (B,) and batch["length"].dtype == torch.long
        for b, idx in enumerate(tb.indices(step)):
            rec = small[idx]
            n = int(batch["length"][b])
            assert n == min(len(rec), crop)
            assert batch["mask"][b, :n].eq(1).all() and batch["mask"][b, n:].eq(0).all()
            assert batch["coords"][b, n:].eq(0).all() and batch["atom_mask"][b, n:].eq(0).all()
            assert batch["aatype"][b, n:].eq(0).all() and batch["residue_index"][b, n:].eq(0).all()
            # the crop is a contiguous window of the record
            ca = batch["coords"][b, :n, 1].numpy()
            starts = [s for s in range(len(rec) - n + 1) if np.array_equal(rec.coords[s:s + n, 1], ca)]
            assert len(starts) == 1
            s = starts[0]
            assert batch["aatype"][b, :n].tolist() == rec.aatype[s:s + n].tolist()
            assert batch["residue_index"][b, :n].tolist() == (rec.residue_index[s:s + n] - rec.residue_index[s]).tolist()
            assert batch["atom_mask"][b, :n].bool().numpy().tolist() == rec.atom_mask[s:s + n].tolist()


def test_crops_vary_across_steps(small: list[ProteinChain]) -> None:
    long = [r for r in small if len(r) > 200]
    tb = TrainBatches(long, batch_size=1, crop_size=16, seed=0)
    firsts = {tuple(tb[s]["coords"][0, 0, 1].tolist()) for s in range(0, 40, len(long))}
    assert len(firsts) > 1


def test_dataloader_workers_match_in_process(small: list[ProteinChain]) -> None:
    tb = TrainBatches(small, batch_size=3, crop_size=48, seed=11)
    loader = DataLoader(tb, sampler=StepSampler(5, 13), batch_size=None, num_workers=2)
    got = list(loader)
    assert len(got) == 8
    for step, batch in zip(range(5, 13), got):
        assert_same(batch, tb[step])
    # resuming at step 9 (e.g. after a requeue) gives the same tail
    resumed = list(DataLoader(tb, sampler=StepSampler(9, 13), batch_size=None, num_workers=0))
    for a, b in zip(resumed, got[4:], strict=True):
        assert_same(a, b)


def test_step_sampler() -> None:
    assert list(StepSampler(3, 7)) == [3, 4, 5, 6] and len(StepSampler(3, 7)) == 4
    assert list(StepSampler(7, 7)) == [] and len(StepSampler(9, 7)) == 0
    with pytest.raises(ValueError):
        StepSampler(-1, 5)


# ---------------------------------------------------------------- validation batches


def test_val_batches_are_fixed_centre_crops(small: list[ProteinChain]) -> None:
    vb = ValBatches(small, batch_size=5, crop_size=40)
    assert len(vb) == 3  # 11 records: 5 + 5 + 1
    batches = list(vb)
    assert [int(b["length"].shape[0]) for b in batches] == [5, 5, 1]
    assert_same(vb[1], ValBatches(small, 5, 40)[1])
    rec = small[0]
    start = (len(rec) - 40) // 2 if len(rec) > 40 else 0
    n = min(len(rec), 40)
    np.testing.assert_array_equal(batches[0]["coords"][0, :n].numpy(), rec.coords[start:start + n])
    assert sum(int(b["mask"].sum()) for b in batches) == sum(min(len(r), 40) for r in small)
    with pytest.raises(IndexError):
        vb[3]
