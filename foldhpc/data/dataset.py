"""Train/validation split and batches that are pure functions of (seed, step).

A preempted and requeued job must continue with exactly the batches it would have seen
without the interruption, whatever the number of DataLoader workers.  So there is no
iterator state to checkpoint: the batch for step ``s`` is computed from ``(seed, s)`` alone
and resuming is just "start at step s" (:class:`StepSampler`).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .store import RecordTable
from .structure import ProteinChain

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]

# Separate RNG streams so that "epoch e" and "step s" never share a seed sequence.
_PERMUTATION_STREAM = 0
_CROP_STREAM = 1


def _group_score(seed: int, sequence: str) -> float:
    """Uniform in [0, 1) from (seed, sequence) only: adding or removing other files never
    moves this group to the other split."""
    digest = hashlib.sha256(f"{seed}\x00{sequence}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_by_sequence(records: Sequence[ProteinChain], val_fraction: float, seed: int
                      ) -> tuple[Sequence[ProteinChain], Sequence[ProteinChain]]:
    """(train, val), identical sequences always on the same side (no leakage through
    re-deposited structures of the same protein).  Input order is kept within each split.

    Each distinct sequence goes to validation if its hash score is below ``val_fraction``;
    with at least two distinct sequences both splits are made non-empty (the group with the
    lowest/highest score is moved), so a tiny dataset still validates.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    table = records if isinstance(records, RecordTable) else None
    sequences = ([table.sequence(i) for i in range(len(table))] if table is not None
                 else [r.sequence for r in records])
    scores = {seq: _group_score(seed, seq) for seq in set(sequences)}
    val_seqs = {s for s, u in scores.items() if u < val_fraction}
    if len(scores) >= 2 and val_fraction > 0:
        if not val_seqs:
            val_seqs = {min(scores, key=scores.__getitem__)}
        elif len(val_seqs) == len(scores):
            val_seqs.discard(max(scores, key=scores.__getitem__))
    in_val = [s in val_seqs for s in sequences]
    if table is not None:  # stays a table: no long-lived object per record
        train: Sequence[ProteinChain] = table.subset([i for i, v in enumerate(in_val) if not v])
        val: Sequence[ProteinChain] = table.subset([i for i, v in enumerate(in_val) if v])
    else:
        train = [r for r, v in zip(records, in_val) if not v]
        val = [r for r, v in zip(records, in_val) if v]
    log.info("split: %d train / %d validation chains (%d / %d distinct sequences)",
             len(train), len(val), len(scores) - len(val_seqs), len(val_seqs))
    return train, val


def _keep(records: Sequence[ProteinChain]) -> Sequence[ProteinChain]:
    """A record table as it is (records made on access, arrays shared), anything else as a list."""
    return records if isinstance(records, RecordTable) else list(records)


def _collate(records: Sequence[ProteinChain], starts: Sequence[int], crop_size: int) -> Batch:
    """Crop ``records[i]`` at ``starts[i]`` and pad to ``crop_size`` (static shapes)."""
    b = len(records)
    aatype = np.zeros((b, crop_size), dtype=np.int64)
    residue_index = np.zeros((b, crop_size), dtype=np.int64)
    mask = np.zeros((b, crop_size), dtype=np.float32)
    coords = np.zeros((b, crop_size, 4, 3), dtype=np.float32)
    atom_mask = np.zeros((b, crop_size, 4), dtype=np.float32)
    length = np.zeros(b, dtype=np.int64)
    for i, (rec, start) in enumerate(zip(records, starts)):
        n = min(len(rec), crop_size)
        sl = slice(start, start + n)
        aatype[i, :n] = rec.aatype[sl]
        ri = rec.residue_index[sl].astype(np.int64)
        residue_index[i, :n] = ri - ri[0]  # relative: only differences are meaningful
        mask[i, :n] = 1.0
        coords[i, :n] = rec.coords[sl]
        atom_mask[i, :n] = rec.atom_mask[sl]
        length[i] = n
    return {
        "aatype": torch.from_numpy(aatype),
        "residue_index": torch.from_numpy(residue_index),
        "mask": torch.from_numpy(mask),
        "coords": torch.from_numpy(coords),
        "atom_mask": torch.from_numpy(atom_mask),
        "length": torch.from_numpy(length),
    }


class TrainBatches(Dataset[Batch]):
    """Map-style dataset: ``batches[step]`` is the training batch of that step.

    The sample stream is the concatenation of per-epoch permutations of ``records``
    (permutation of epoch ``e`` from ``rng([seed, 0, e])``), so every record is seen once per
    epoch; step ``s`` takes samples ``s*B .. s*B+B-1`` of it, and its random crops come from
    ``rng([seed, 1, s])``.  Nothing depends on call order, process or restarts.

    Padding: positions ``>= length`` have ``mask`` 0, ``aatype`` 0 and zero coordinates.

    With ``world_size`` ranks, ``batch_size`` is the *global* batch: rank ``r`` gets samples
    ``r*b .. r*b+b-1`` (``b = batch_size / world_size``) of the step's global batch, with the
    same crops, so every world size trains on the same samples at every step.
    """

    def __init__(self, records: Sequence[ProteinChain], batch_size: int, crop_size: int, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        if not records:
            raise ValueError("TrainBatches needs at least one record")
        if batch_size < 1 or crop_size < 1:
            raise ValueError("batch_size and crop_size must be >= 1")
        if world_size < 1 or not 0 <= rank < world_size or batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} cannot be split over {world_size} ranks (rank {rank})")
        self.rank = rank
        self.world_size = world_size
        self.records = _keep(records)
        self.batch_size = batch_size
        self.crop_size = crop_size
        self.seed = int(seed)
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()  # small LRU, per process

    def __len__(self) -> int:
        # Effectively infinite; a StepSampler decides which steps are drawn.
        return 2**62

    def epoch_of(self, step: int) -> int:
        return (step * self.batch_size) // len(self.records)

    def _permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            rng = np.random.default_rng([self.seed, _PERMUTATION_STREAM, epoch])
            perm = rng.permutation(len(self.records))
            self._perms[epoch] = perm
            if len(self._perms) > 4:
                self._perms.popitem(last=False)
        return perm

    def indices(self, step: int) -> list[int]:
        """Record indices of the batch of ``step`` (useful for logging and tests)."""
        if step < 0:
            raise IndexError(f"step must be >= 0, got {step}")
        n = len(self.records)
        first = step * self.batch_size
        return [int(self._permutation(k // n)[k % n]) for k in range(first, first + self.batch_size)]

    def __getitem__(self, step: int) -> Batch:
        step = int(step)
        idx = self.indices(step)
        recs = [self.records[i] for i in idx]
        rng = np.random.default_rng([self.seed, _CROP_STREAM, step])
        # crops drawn for the whole global batch, so they do not depend on the world size
        starts = [int(rng.integers(0, len(r) - self.crop_size + 1)) if len(r) > self.crop_size else 0
                  for r in recs]
        if self.world_size > 1:
            b = self.batch_size // self.world_size
            mine = slice(self.rank * b, (self.rank + 1) * b)
            recs, starts = recs[mine], starts[mine]
        return _collate(recs, starts, self.crop_size)


class ValBatches(Sequence[Batch]):
    """Fixed validation batches: records in order, centre crop, no randomness at all.

    The last batch may hold fewer than ``batch_size`` samples (no padding samples, which
    would add all-masked rows to per-sample averages).
    """

    def __init__(self, records: Sequence[ProteinChain], batch_size: int, crop_size: int) -> None:
        if batch_size < 1 or crop_size < 1:
            raise ValueError("batch_size and crop_size must be >= 1")
        self.records = _keep(records)
        self.batch_size = batch_size
        self.crop_size = crop_size

    def __len__(self) -> int:
        return math.ceil(len(self.records) / self.batch_size)

    def __getitem__(self, i: int) -> Batch:  # type: ignore[override]
        if not -len(self) <= i < len(self):
            raise IndexError(f"validation batch {i} out of range (0..{len(self) - 1})")
        i %= len(self)
        recs = self.records[i * self.batch_size:(i + 1) * self.batch_size]
        starts = [max(0, (len(r) - self.crop_size) // 2) for r in recs]
        return _collate(recs, starts, self.crop_size)

    def __iter__(self) -> Iterator[Batch]:
        for i in range(len(self)):
            yield self[i]


class StepSampler(Sampler[int]):
    """Yields ``start_step .. max_steps-1``: use with ``DataLoader(TrainBatches, sampler=...,
    batch_size=None)`` so a resumed run continues at its checkpointed step."""

    def __init__(self, start_step: int, max_steps: int) -> None:
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.start_step = int(start_step)
        self.max_steps = int(max_steps)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start_step, self.max_steps))

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step)
