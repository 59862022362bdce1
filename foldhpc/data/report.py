"""What a dataset preparation found, and the one error type for an unusable dataset.

Kept apart from the preparation machinery so the CLI, the trainer and the tests can read a
report (counts, skips and their reasons, a length histogram) without knowing how it was made.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .structure import ProteinChain


class DataError(Exception):
    """The dataset as a whole is unusable; the message says which path and what to do.

    A user error: ``foldhpc`` prints the message without a traceback and exits 2, which a
    supervisor never retries (a restart cannot create a missing data folder).
    """

    exit_code = 2


@dataclass
class DatasetReport:
    """What :func:`prepare_dataset` found: the selected chains and an account of the rest."""

    records: Sequence[ProteinChain]  # sorted by id; a store.RecordTable (made on access) or a list
    n_files: int  # files considered (structure-like or not), README/MANIFEST/hidden excluded
    n_parsed: int  # parsed in this call
    n_cached: int  # taken from the cache
    skipped: list[tuple[str, str]]  # (path relative to the data folder, reason)
    data_path: str = ""
    cache_dir: str = ""
    elapsed_s: float = 0.0
    filters: dict[str, Any] = field(default_factory=dict)
    # the sealed dataset manifest this report was read from without looking at the data
    # folder (a trusted warm start), "" when the folder was scanned
    trusted_manifest: str = ""

    def length_histogram(self, bins: Sequence[int] | int = (0, 50, 100, 200, 300, 400, 500, 1000)
                         ) -> list[tuple[int, int, int]]:
        """``(low, high, count)`` per bin, counting ``low <= length < high``.

        ``bins`` is a list of edges (lengths from the last edge on form a final bin, shown
        only if not empty) or a number of equal-width bins between the shortest and longest.
        """
        lengths = self.lengths()
        top = int(lengths.max()) + 1 if lengths.size else 1
        open_bin = False
        if isinstance(bins, int):
            low = int(lengths.min()) if lengths.size else 0
            edges = np.unique(np.linspace(low, top, max(bins, 1) + 1).round().astype(np.int64))
        else:
            edges = np.unique(np.asarray(list(bins), dtype=np.int64))
            if edges[-1] < top:
                edges, open_bin = np.append(edges, top), True
        counts, _ = np.histogram(lengths, bins=edges)
        out = [(int(lo), int(hi), int(c)) for lo, hi, c in zip(edges[:-1], edges[1:], counts)]
        if open_bin and out[-1][2] == 0:
            out.pop()
        return out

    def lengths(self) -> np.ndarray:
        """Residues per record (without making every record when the table can tell)."""
        fast = getattr(self.records, "lengths", None)
        if fast is not None:
            return np.asarray(fast(), dtype=np.int64)
        return np.array([len(r) for r in self.records], dtype=np.int64)

    def reason_counts(self) -> dict[str, int]:
        """Skips grouped by the reason's leading words (details after ':' or '(' dropped)."""
        return dict(Counter(reason_kind(r) for _, r in self.skipped).most_common())

    def format(self, max_skipped: int = 20) -> str:
        """Human summary for the log / ``foldhpc prepare``."""
        lines = [
            f"dataset {self.data_path}: {self.n_files} files -> {len(self.records)} chains "
            f"(parsed {self.n_parsed}, cached {self.n_cached}, skipped {len(self.skipped)}) "
            f"in {self.elapsed_s:.2f} s",
            f"cache: {self.cache_dir}",
        ]
        if self.trusted_manifest:
            lines.append(f"read from the sealed manifest {self.trusted_manifest} without scanning the "
                         "data folder; run `foldhpc data prepare` after changing files")
        if self.filters:
            f = self.filters
            lines.append(f"filters: {f.get('min_length')}-{f.get('max_length')} residues, "
                         f"backbone completeness >= {f.get('min_completeness')}")
        if len(self.records):
            lengths = self.lengths()
            lines.append(f"chain length: min {lengths.min()}, median {int(np.median(lengths))}, "
                         f"max {lengths.max()}, total {lengths.sum()} residues")
            hist = self.length_histogram()
            top = max(c for _, _, c in hist) or 1
            for lo, hi, c in hist:
                label = f"{lo:>5}-{hi - 1:<5}"
                lines.append(f"  {label} |{'#' * round(30 * c / top):<30}| {c}")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} files: " + ", ".join(
                f"{n} {k}" for k, n in self.reason_counts().items()))
            for path, reason in self.skipped[:max_skipped]:
                lines.append(f"  {path}: {reason}")
            if len(self.skipped) > max_skipped:
                lines.append(f"  ... and {len(self.skipped) - max_skipped} more (see to_json())")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "data_path": self.data_path,
            "cache_dir": self.cache_dir,
            "n_files": self.n_files,
            "n_records": len(self.records),
            "n_parsed": self.n_parsed,
            "n_cached": self.n_cached,
            "elapsed_s": round(self.elapsed_s, 3),
            "trusted_manifest": self.trusted_manifest,
            "filters": self.filters,
            "length_histogram": [list(b) for b in self.length_histogram()],
            "skipped": [{"file": p, "reason": r} for p, r in self.skipped],
            "skipped_by_reason": self.reason_counts(),
            "records": [{"id": r.id, "source": r.source, "chain": r.chain, "length": len(r)}
                        for r in self.records],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def reason_kind(reason: str) -> str:
    """Leading words of a skip reason ("corrupt gzip: ..." -> "corrupt gzip") for counting."""
    for sep in (":", " ("):
        reason = reason.split(sep, 1)[0]
    return reason.strip()


def no_usable_chain_error(root: object, report: DatasetReport) -> DataError:
    """The error for a dataset whose every file was skipped, with the counts by reason."""
    counts = ", ".join(f"{n} x {k}" for k, n in report.reason_counts().items())
    return DataError(
        f"no usable protein chain in {root}: all {report.n_files} files were skipped ({counts}). "
        "Check that data.path holds protein structures and that data.min_length, "
        "data.max_length and data.min_completeness are not too strict.")
