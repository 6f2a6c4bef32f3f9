"""The training order: reproducible per epoch, and resumable in the middle of one.

A run interrupted mid-epoch (pre-emption) must continue exactly where it stopped: the same samples
in the same order, none seen twice, none skipped. So every random choice of an epoch — the order
and, for datasets that draw one (a random sentence per ref), a per-sample draw — comes from one
generator seeded by (seed, epoch), in the main process, never from a worker's RNG stream. Resuming
at batch k of epoch e rebuilds epoch e's order and starts after its first k batches.
"""

from __future__ import annotations

from typing import Iterator

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Sampler

from mit_lightning.errors import UserError

#: a per-sample draw is an int in [0, DRAW_RANGE); datasets reduce it modulo their choices
DRAW_RANGE = 2**31 - 1


class EpochShuffle(Sampler):
    """A random permutation per epoch from `(seed, epoch)`; yields `index` or `(index, draw)`.

    Args:
        length: samples in the dataset.
        seed: the run's seed.
        with_draws: also yield a random draw per sample, for datasets whose item has a random part.
    """

    def __init__(self, length: int, seed: int, with_draws: bool = False) -> None:
        self.length = length
        self.seed = seed
        self.with_draws = with_draws
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this at the start of every epoch."""
        self.epoch = epoch

    def resume_at(self, position: int) -> None:
        """Start the next pass `position` samples into the current epoch (once)."""
        self.start = position

    def __len__(self) -> int:
        """The whole epoch, also when resuming: Lightning counts a resumed epoch's batches from its start."""
        return self.length

    def __iter__(self) -> Iterator[int | tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.length, generator=generator).tolist()
        draws = torch.randint(DRAW_RANGE, (self.length,), generator=generator).tolist() if self.with_draws else None
        start, self.start = self.start, 0
        for position in range(start, self.length):
            index = order[position]
            yield (index, draws[index]) if draws is not None else index


class ResumableLoader(DataLoader):
    """The training DataLoader: Lightning sees it is resumable (its order depends only on seed, epoch and position).

    Its state is the order's seed and length: resuming mid-epoch with another seed or dataset size would not
    continue the same epoch, and is refused (at an epoch end, a warning).
    """

    def state_dict(self) -> dict[str, int]:
        sampler = self.sampler
        return {"seed": sampler.seed, "length": sampler.length} if isinstance(sampler, EpochShuffle) else {}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if not isinstance(self.sampler, EpochShuffle):
            rank_zero_warn("Resuming in the middle of an epoch with several processes: the rest of the epoch is not "
                           "the exact continuation of the interrupted one (resume from an epoch-end checkpoint for that).")
        elif state and state != self.state_dict():
            change = f"another seed or dataset size ({state} before, {self.state_dict()} now)"
            if self.sampler.start > 0:  # mid-epoch: the position no longer means the same samples
                raise UserError(f"Resuming in the middle of an epoch with {change}: going on would train some samples "
                                "twice and skip others. Resume with the same seed and data, or start a new run from "
                                "the checkpoint's weights (--model.init_weights).")
            rank_zero_warn(f"Resuming with {change}: the run goes on from an epoch end, but differs from the run it "
                           "continues.")
