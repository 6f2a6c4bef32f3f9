"""A callback that signals its own process at a chosen training step: a pre-emption at a known point."""

from __future__ import annotations

import os
import signal

from lightning.pytorch.callbacks import Callback


class SignalAtStep(Callback):
    """Sends `signal_name` (TERM or KILL) to this process once the global step reaches `step`."""

    def __init__(self, step: int, signal_name: str = "TERM") -> None:
        self.step = step
        self.signal = getattr(signal, f"SIG{signal_name}")

    def on_train_batch_end(self, trainer, *_args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signal)
