"""Structure files -> cached backbone records -> deterministic training batches.

``structure`` parses one file, ``cache`` prepares a whole folder (parallel, cached,
reported, sealed for warm starts that do not scan; helpers in ``files``, ``entries``,
``index``, ``parallel``, ``store``, ``manifest``, ``report``), ``dataset`` splits by sequence
and serves batches that depend only on (seed, step).  See docs/data.md.  The torch-dependent names are imported lazily so that parser worker
processes and ``foldhpc prepare`` do not pay for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .cache import DataError, DatasetReport, load_dataset, prepare_dataset, resolve_cache_dir
from .structure import (
    ATOM_NAMES,
    NUM_AATYPES,
    PARSER_VERSION,
    RESTYPES,
    ProteinChain,
    StructureError,
    parse_structure,
    select_chain,
)

if TYPE_CHECKING:
    from .dataset import StepSampler, TrainBatches, ValBatches, split_by_sequence

_LAZY = {"StepSampler", "TrainBatches", "ValBatches", "split_by_sequence"}

__all__ = [
    "ATOM_NAMES", "NUM_AATYPES", "PARSER_VERSION", "RESTYPES",
    "DataError", "DatasetReport", "ProteinChain", "StructureError",
    "load_dataset", "parse_structure", "prepare_dataset", "resolve_cache_dir", "select_chain",
    "StepSampler", "TrainBatches", "ValBatches", "split_by_sequence",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
