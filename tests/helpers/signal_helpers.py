"""A callback that signals its own process at a chosen point of training: a pre-emption or Ctrl-C at a known moment."""

from __future__ import annotations

import os
import signal

from lightning.pytorch.callbacks import Callback


class SignalAtStep(Callback):
    """Sends `signal_name` (TERM, INT or KILL) once the global step reaches `step`: to this process, or with
    `whole_group` to its process group, dataloader workers included, as a cluster scheduler or a terminal does.

    `during` picks the moment: ``train`` (the end of that step), ``validation`` (the first validation batch after
    it), or ``save`` (inside the next checkpoint write, where the signal is sent `times` times).
    """

    def __init__(self, step: int, signal_name: str = "TERM", whole_group: bool = False, during: str = "train",
                 times: int = 1) -> None:
        self.step = step
        self.signal = getattr(signal, f"SIG{signal_name}")
        self.whole_group = whole_group
        self.during = during
        self.times = times
        self.sent = False

    def _send(self, trainer, moment: str) -> None:
        if self.sent or moment != self.during or trainer.global_step != self.step or trainer.sanity_checking:
            return
        self.sent = True
        for _ in range(self.times):
            if self.whole_group:
                os.killpg(os.getpgid(0), self.signal)
            else:
                os.kill(os.getpid(), self.signal)

    def on_train_batch_end(self, trainer, *_args) -> None:
        self._send(trainer, "train")

    def on_validation_batch_end(self, trainer, *_args) -> None:
        self._send(trainer, "validation")

    def on_save_checkpoint(self, trainer, *_args) -> None:
        self._send(trainer, "save")
