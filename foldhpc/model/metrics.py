"""Validation metrics: top-L/5 contact precision and an evaluation loop.

Top-L/5 long-range contact precision is the standard yardstick for distogram/contact
predictors (CASP, trRosetta): of the ``ceil(L/5)`` pairs with sequence separation >= 24
that the model finds most likely to be in contact (CB-CB < 8 A), which fraction really
are?  The random baseline (the contact density among the same eligible pairs) is
reported next to it, because a precision means nothing without knowing what guessing
would score on the same proteins.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from foldhpc.model.loss import backbone_mask, cb_distances, distogram_bins, distogram_loss

log = logging.getLogger(__name__)

#: CB-CB distance below which two residues are in contact (CASP definition).
CONTACT_CUTOFF = 8.0
LONG_RANGE = (24, None)
MEDIUM_RANGE = (12, 23)


def contact_probability(logits: torch.Tensor, cutoff: float = CONTACT_CUTOFF) -> torch.Tensor:
    """P(contact) [B,L,L]: softmax mass of the bins whose upper edge is <= ``cutoff``.

    With AlphaFold's 64 bins that is bins 0..18 (upper edge 7.9375 A); the last bin is open
    ended and never counts.
    """
    n_bins = logits.shape[-1]
    upper_edges = distogram_bins(n_bins, device=logits.device)
    selected = (upper_edges <= cutoff).float()
    probs = torch.softmax(logits.float(), dim=-1)
    return (probs[..., :-1] * selected).sum(-1)


def _eligible_pairs(
    batch: Mapping[str, torch.Tensor], min_sep: int, max_sep: int | None
) -> torch.Tensor:
    """Bool [B,L,L]: pairs i < j (array order), both with backbone, separation in range.

    Separation is measured in ``residue_index`` (author numbering) when present, so gaps
    in the chain count as distance along the sequence.
    """
    if min_sep < 1:
        raise ValueError(f"min_sep must be >= 1, got {min_sep}")
    res = backbone_mask(batch) > 0
    b, n = res.shape
    if "residue_index" in batch:
        ri = batch["residue_index"].long()
    else:
        ri = torch.arange(n, device=res.device).expand(b, n)
    sep = (ri[:, None, :] - ri[:, :, None]).abs()
    upper = torch.ones(n, n, dtype=torch.bool, device=res.device).triu(1)
    eligible = res[:, :, None] & res[:, None, :] & upper & (sep >= min_sep)
    if max_sep is not None:
        eligible = eligible & (sep <= max_sep)
    return eligible


def contact_density(
    batch: Mapping[str, torch.Tensor], min_sep: int = 24, max_sep: int | None = None
) -> torch.Tensor:
    """Per-example share of eligible pairs that are contacts [B]; NaN if none is eligible.

    This is the expected precision of ranking pairs at random: the baseline to beat.
    """
    with torch.no_grad():
        eligible = _eligible_pairs(batch, min_sep, max_sep)
        contact = cb_distances(batch) < CONTACT_CUTOFF
        n = eligible.sum(dim=(1, 2)).float()
        hits = (contact & eligible).sum(dim=(1, 2)).float()
        return torch.where(n > 0, hits / n.clamp(min=1.0), torch.full_like(n, math.nan))


def contact_precision(
    logits: torch.Tensor,
    batch: Mapping[str, torch.Tensor],
    min_sep: int = 24,
    max_sep: int | None = None,
    top_frac: float = 0.2,
    reduction: str = "none",
) -> torch.Tensor:
    """Top-``ceil(top_frac * L)`` contact precision per example [B] (or their mean).

    ``L`` is the number of real residues in the example (``mask.sum()``, i.e. the crop's
    length).  Pairs are those of :func:`_eligible_pairs`; if fewer than ``ceil(L/5)`` are
    eligible, all of them are ranked.  Examples with no eligible pair get NaN, and
    ``reduction="mean"`` averages over the others (NaN if there are none).  Not meant for
    ``torch.compile``: the per-example top-k is data-dependent by nature.
    """
    if reduction not in ("none", "mean"):
        raise ValueError(f"reduction must be 'none' or 'mean', got {reduction!r}")
    with torch.no_grad():
        prob = contact_probability(logits)
        contact = cb_distances(batch) < CONTACT_CUTOFF
        eligible = _eligible_pairs(batch, min_sep, max_sep)
        lengths = batch["mask"].float().sum(-1)
        out = torch.full((logits.shape[0],), math.nan, device=logits.device)
        for i in range(logits.shape[0]):
            p = prob[i][eligible[i]]
            k = min(math.ceil(top_frac * float(lengths[i]) - 1e-9), p.numel())
            if k <= 0:
                continue
            top = torch.topk(p, k).indices
            out[i] = contact[i][eligible[i]][top].float().mean()
        if reduction == "mean":
            return out.nanmean()
        return out


class EvaluationStopped(Exception):
    """:func:`evaluate` gave up between batches because ``should_stop()`` said so.

    Partial metrics would be a different number from the full ones (another subset of
    proteins), so none are returned: the caller redoes the evaluation later.
    """

    def __init__(self, batches_done: int) -> None:
        super().__init__(f"evaluation stopped after {batches_done} batches")
        self.batches_done = batches_done


def _to_device(batch: Mapping[str, object], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _finite_mean(values: list[float]) -> float:
    kept = [v for v in values if math.isfinite(v)]
    return sum(kept) / len(kept) if kept else math.nan


def evaluate(
    model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], device: torch.device | str | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, float]:
    """Evaluate ``model`` on ``batches`` in eval mode, without gradients.

    Every metric is a mean over proteins (each protein weighs the same whatever its
    length); a protein without an eligible pair is left out of that metric only.  Keys:
    ``distogram_loss``, ``precision_long`` (top-L/5, sep >= 24), ``precision_medium``
    (top-L/5, sep 12..23), ``random_long`` / ``random_medium`` (contact density among the
    same pairs: the random-guess precision), ``n_proteins``.  The model's train/eval mode is
    restored afterwards.

    ``should_stop`` is asked before each batch; when it returns True, :class:`EvaluationStopped`
    is raised. A training loop passes "a preemption signal has arrived": a whole validation
    pass can take far longer than the signal's lead time, one batch cannot (it is cheaper than
    a training step). Evaluation draws no random numbers (eval mode, fixed crops), so stopping
    or repeating it leaves training's random streams untouched.
    """
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    acc: dict[str, list[float]] = {k: [] for k in (
        "distogram_loss", "precision_long", "precision_medium", "random_long", "random_medium")}
    n_proteins = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i, raw in enumerate(batches):
                if should_stop is not None and should_stop():
                    raise EvaluationStopped(i)
                batch = _to_device(raw, device)
                logits = model(batch)["distogram_logits"]
                _, stats = distogram_loss(logits, batch)
                per_loss = torch.where(stats["per_example_pairs"] > 0, stats["per_example_loss"],
                                       torch.full_like(stats["per_example_loss"], math.nan))
                acc["distogram_loss"] += per_loss.tolist()
                acc["precision_long"] += contact_precision(logits, batch, *LONG_RANGE).tolist()
                acc["precision_medium"] += contact_precision(logits, batch, *MEDIUM_RANGE).tolist()
                acc["random_long"] += contact_density(batch, *LONG_RANGE).tolist()
                acc["random_medium"] += contact_density(batch, *MEDIUM_RANGE).tolist()
                n_proteins += int((batch["mask"].sum(-1) > 0).sum())
    finally:
        model.train(was_training)
    if n_proteins == 0:
        log.warning("evaluate: no proteins in the evaluation batches; all metrics are NaN")
    result = {k: _finite_mean(v) for k, v in acc.items()}
    result["n_proteins"] = n_proteins
    return result
