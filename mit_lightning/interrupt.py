"""Stopping a run on SIGINT (Ctrl-C) or SIGTERM (pre-emption) without losing work.

While a fit trains, `StopSignals` turns either signal into a request: training saves its latest
checkpoint at the end of the current step (or validation batch) and stops by raising `Stopped`
(`resume.LatestCheckpoint`). The handler only records, so no signal, repeated or not, aborts a
checkpoint being written. The command then exits with 128 + the signal's number (130, 143), as the
shell reports a process the signal ended, so a job scheduler sees the interruption.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from types import FrameType
from typing import Any

from lightning.pytorch.utilities.exceptions import SIGTERMException

#: the signals that stop a run after saving: Ctrl-C and a cluster's pre-emption
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_status(signum: int) -> int:
    """The status a shell reports for a process ended by `signum` (SIGINT 130, SIGTERM 143)."""
    return 128 + int(signum)


class Stopped(SIGTERMException):
    """Training stopped on a signal after saving; Lightning treats it as its own SIGTERM stop."""

    def __init__(self, signum: signal.Signals) -> None:
        super().__init__(f"stopped by {signum.name}")
        self.signum = signum


class StopSignals:
    """Records SIGINT and SIGTERM while installed instead of ending the process at once.

    Installed at the start of a single-process fit, below Lightning's SIGTERM handler (which wraps it).
    Several processes (DDP) keep Lightning's own handling, which stops every rank at the same step. Later signals are reported, never acted on: a print from a handler
    could interrupt another print, so the note is written straight to the file descriptor.
    """

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            os.write(sys.stderr.fileno(), f"Already stopping after {self.received.name}: the latest checkpoint is "
                     "being written (SIGKILL stops at once, losing the steps since the previous one).\n".encode())
            return
        self.received = signal.Signals(signum)


def run_child(command: list[str], **popen_args: Any) -> int:
    """Run a `mit fit` as a child process, passing SIGINT and SIGTERM on to it and waiting while it saves.

    Returns its exit status; if this process was signalled, it exits as the child stopped (130, 143) once
    the child has saved, so the command that started it (`mit compare`, `mit reproduce`) stops too.
    """
    child = subprocess.Popen(command, **popen_args)
    received: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        child.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in STOP_SIGNALS}
    try:
        code = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
        raise SystemExit(exit_status(received[0]))
    return code
