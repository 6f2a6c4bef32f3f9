"""A callback that signals its own process at a chosen training step: a pre-emption at a known point."""

from __future__ import annotations

import os
import signal

from lightning.pytorch.callbacks import Callback


class SignalAtStep(Callback):
    """Sends `signal_name` (TERM or KILL) once the global step reaches `step`: to this process, or with
    `whole_group` to its process group, dataloader workers included, as a cluster scheduler does."""

    def __init__(self, step: int, signal_name: str = "TERM", whole_group: bool = False) -> None:
        self.step = step
        self.signal = getattr(signal, f"SIG{signal_name}")
        self.whole_group = whole_group

    def on_train_batch_end(self, trainer, *_args) -> None:
        if trainer.global_step == self.step:
            if self.whole_group:
                os.killpg(os.getpgid(0), self.signal)
            else:
                os.kill(os.getpid(), self.signal)
