"""Per-sample statistics keyed by sample index: the basis of every metric here.

Under DDP, Lightning's DistributedSampler pads the evaluation set by repeating samples so that all
ranks see the same number of batches. Summing statistics would count those repeats twice. Keeping
one row per sample with its dataset index, and keeping the first row per index after the
all-gather, counts every sample exactly once whatever the sampler did.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


class PerSampleMetric(Metric):
    """Stores (index, row) pairs; subclasses turn the deduplicated rows into a score."""

    full_state_update = False
    is_differentiable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("sample_ids", default=[], dist_reduce_fx="cat")
        self.add_state("rows", default=[], dist_reduce_fx="cat")

    def _append(self, sample_ids: torch.Tensor, rows: torch.Tensor) -> None:
        sample_ids = torch.as_tensor(sample_ids, device=self.device).reshape(-1).long()
        rows = rows.reshape(sample_ids.numel(), -1).to(device=self.device, dtype=torch.float64)
        self.sample_ids.append(sample_ids)
        self.rows.append(rows)

    def unique_rows(self) -> torch.Tensor:
        """Rows of distinct samples (first occurrence wins), ordered by sample index."""
        if isinstance(self.sample_ids, list) and not self.sample_ids:
            raise RuntimeError(f"{type(self).__name__}.compute() called before any update().")
        sample_ids = dim_zero_cat(self.sample_ids)
        rows = dim_zero_cat(self.rows)
        unique, inverse = torch.unique(sample_ids, return_inverse=True)
        positions = torch.arange(sample_ids.numel(), device=sample_ids.device)
        first = torch.full((unique.numel(),), sample_ids.numel(), device=sample_ids.device, dtype=torch.long)
        first = first.scatter_reduce(0, inverse, positions, reduce="amin")
        return rows[first]
