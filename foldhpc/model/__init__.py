"""Distogram structure model (Evoformer-lite), its loss and its validation metrics."""

from foldhpc.model.loss import (
    backbone_mask,
    distogram_bins,
    distogram_loss,
    distogram_targets,
    valid_pair_mask,
    virtual_cb,
)
from foldhpc.model.metrics import contact_density, contact_precision, contact_probability, evaluate
from foldhpc.model.model import StructureModel, count_parameters

__all__ = [
    "StructureModel",
    "backbone_mask",
    "contact_density",
    "contact_precision",
    "contact_probability",
    "count_parameters",
    "distogram_bins",
    "distogram_loss",
    "distogram_targets",
    "evaluate",
    "valid_pair_mask",
    "virtual_cb",
]
