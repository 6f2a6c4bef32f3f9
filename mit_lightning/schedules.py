"""Learning-rate schedules torch does not provide in a form a config can give.

`WarmupCosine` is the linear warm-up then cosine decay that PILL (like LLaVA) trains with. A
cosine needs the run's length; torch's schedulers take it as a number, which a config overlay
shared by a 12-epoch demo and a 30-epoch paper run cannot know. Here the run supplies it:
`MiTModule.configure_optimizers` calls `set_total_steps` with the trainer's estimate of the
optimizer steps, and steps the schedule after every optimizer step (`interval = "step"`).
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from mit_lightning.errors import UserError


def warmup_cosine_factor(step: int, total_steps: int, warmup: float, final_factor: float) -> float:
    """The learning-rate factor after `step` optimizer steps (0-based) of `total_steps`.

    A linear warm-up over the first ceil(warmup · total) steps, rising to 1 at the first step after
    it, then a half cosine from 1 down to `final_factor` at the last step; `final_factor` after it.
    """
    warmup_steps = math.ceil(warmup * total_steps)
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min((step - warmup_steps) / max(total_steps - 1 - warmup_steps, 1), 1.0)
    return final_factor + (1.0 - final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine(LRScheduler):
    """Linear warm-up, then cosine decay, stepped after every optimizer step.

    Args:
        warmup: fraction of the run's optimizer steps spent warming up (0.03 in LLaVA and PILL).
        final_factor: the learning rate at the end, as a fraction of the configured one.
        total_steps: the run's optimizer steps; None = set by the run (`set_total_steps`).
    """

    interval = "step"

    def __init__(
        self,
        optimizer: Optimizer,
        warmup: float = 0.03,
        final_factor: float = 0.0,
        total_steps: int | None = None,
        last_epoch: int = -1,
    ) -> None:
        if not 0.0 <= warmup < 1.0:
            raise UserError(f"WarmupCosine warmup is a fraction of the run in [0, 1); got {warmup}.")
        if not 0.0 <= final_factor <= 1.0:
            raise UserError(f"WarmupCosine final_factor must be in [0, 1]; got {final_factor}.")
        self.warmup, self.final_factor, self.total_steps = warmup, final_factor, total_steps
        super().__init__(optimizer, last_epoch)

    def set_total_steps(self, total_steps: float) -> None:
        """Fix the run's length and set the learning rates of the current step accordingly."""
        if not math.isfinite(total_steps):
            raise UserError("WarmupCosine needs a run of known length: set trainer.max_epochs or trainer.max_steps.")
        if total_steps < 1:
            raise UserError(f"WarmupCosine needs a run of at least one optimizer step; got {total_steps}.")
        self.total_steps = int(total_steps)
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_lr(self) -> list[float]:
        if self.total_steps is None:  # until the run's length is known: the configured rates
            return list(self.base_lrs)
        factor = warmup_cosine_factor(self.last_epoch, self.total_steps, self.warmup, self.final_factor)
        return [base * factor for base in self.base_lrs]
