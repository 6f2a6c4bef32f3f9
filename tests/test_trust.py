"""No file runs code: crafted checkpoints and weight files are refused in one line, naming the file."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from helpers.cli_helpers import fails_at_once
from mit_lightning.checkpoints import load_weights_file
from mit_lightning.errors import UserError

DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
EVIL_MODULE = """\
from pathlib import Path
Path("IMPORTED").write_text("code from a checkpoint ran")

class Evil:
    def __init__(self, *args, **kwargs):
        Path("INSTANTIATED").write_text("code from a checkpoint ran")
"""


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PICKLE_RAN",))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A current folder holding a module an attacker wants imported, importable like any local module."""
    (tmp_path / "evil_module.py").write_text(EVIL_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("evil_module", None)


def test_lightning_hyper_parameters_in_a_checkpoint_are_never_instantiated(workdir, monkeypatch, capsys):
    checkpoint = workdir / "hparams.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "evil_module.Evil"}}, checkpoint)
    fails_at_once(monkeypatch, capsys, "test", "--config", DEMO, "--ckpt_path", str(checkpoint),
                  "--model.llm.path", str(workdir / "no-llm"))
    assert not (workdir / "IMPORTED").exists()


@pytest.mark.parametrize("kind, expected", [
    ("empty", "empty (0 bytes)"),
    ("truncated", "truncated or corrupted"),
    ("pickled object", "could run code, so it was refused"),
    ("text", "not a readable torch file"),
])
def test_broken_or_crafted_weight_files_end_in_one_line_naming_the_file(workdir, kind, expected):
    path = workdir / "weights.pt"
    if kind == "empty":
        path.touch()
    elif kind == "text":  # a file that is no pickle at all says so, not that it holds code
        path.write_text("garbage\n")
    elif kind == "truncated":
        torch.save({"weight": torch.ones(64, 64)}, path)
        path.write_bytes(path.read_bytes()[:2000])
    else:
        torch.save({"weight": _Payload()}, path)
    with pytest.raises(UserError) as error:
        load_weights_file(path, "CLIP weights")
    message = str(error.value)
    assert str(path) in message and expected in message and "\n" not in message
    assert "weights_only=False" not in message
    assert not (workdir / "PICKLE_RAN").exists()
