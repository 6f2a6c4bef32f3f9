"""`mit compare` and `mit reproduce` pass Ctrl-C and SIGTERM on to their training run and stop once it has saved."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from mit_lightning.interrupt import exit_status, run_child

#: a stand-in for `mit fit`: says it is ready, and on SIGTERM or SIGINT "saves" and exits as mit fit does
CHILD = """
import signal, sys, time
from pathlib import Path
folder = Path(sys.argv[1])
def stop(signum, frame):
    time.sleep(0.5)  # a checkpoint being written
    (folder / "saved").write_text(signal.Signals(signum).name)
    sys.exit(128 + signum)
for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, stop)
(folder / "ready").touch()
time.sleep(60)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_parent_stops_the_child_run_after_it_saved(tmp_path: Path, signum):
    def signal_once_ready() -> None:
        while not (tmp_path / "ready").exists():
            time.sleep(0.05)
        os.kill(os.getpid(), signum)

    before = signal.getsignal(signum)
    threading.Thread(target=signal_once_ready, daemon=True).start()
    start = time.monotonic()
    with pytest.raises(SystemExit) as stopped:
        run_child([sys.executable, "-c", CHILD, str(tmp_path)])
    assert stopped.value.code == exit_status(signum) == {signal.SIGTERM: 143, signal.SIGINT: 130}[signum]
    assert (tmp_path / "saved").read_text() == signum.name  # it waited for the child to save
    assert time.monotonic() - start < 30
    assert signal.getsignal(signum) == before  # the command's own handling is back


def test_a_child_that_ends_by_itself_gives_its_status():
    assert run_child([sys.executable, "-c", "raise SystemExit(3)"]) == 3
