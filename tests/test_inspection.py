"""`mit inspect`: a trained MiT model's gates and infusion sizes over samples of its data, as PNG charts."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from helpers.cli_helpers import fails_at_once
from mit_lightning.adapters import read_adapter
from mit_lightning.cli import cli_main
from mit_lightning.inference import build_module
from mit_lightning.inspection import observe, split_dataset

CHARTS = ("gates.png", "infusion_sizes.png")


def assert_charts(folder) -> None:
    for name in CHARTS:
        with Image.open(folder / name) as image:
            assert image.format == "PNG" and image.width > 400
            assert np.asarray(image.convert("L")).std() > 10


def test_inspect_writes_the_charts_of_a_trained_model(demo_run, tmp_path, capsys):
    output = tmp_path / "charts"
    cli_main(["inspect", "--ckpt_path", str(demo_run.checkpoint), "--output", str(output), "--samples", "8"])
    out = capsys.readouterr().out
    assert "MiT over 8 samples of 'val'" in out
    layers = [line for line in out.splitlines() if line.strip().startswith("layer ")]
    assert [line.split(":")[0].strip() for line in layers] == ["layer 2", "layer 3", "layer 4"]  # demo: MiT at 2, 3, 4
    # trained for an epoch, the infusion changes K, V and the FFN activation
    sizes = [float(part.split()[-1]) for line in layers for part in line.split(";")[1:]]
    assert len(sizes) == 9 and all(size > 0 for size in sizes)
    assert_charts(output)


def test_inspect_best_of_a_config_on_another_split(demo_run, tmp_path, capsys):
    output = tmp_path / "charts"
    configs = [arg for config in demo_run.configs for arg in ("--config", config)]
    cli_main(["inspect", "--ckpt_path", "best", *configs, "--split", "test", "--samples", "3", "--output", str(output)])
    assert "MiT over 3 samples of 'test'" in capsys.readouterr().out
    assert_charts(output)


def test_a_fresh_mit_infuses_nothing(demo_run):
    """Before training, MiT leaves K, V and the FFN activation unchanged: every size is 0, every gate σ(1)."""
    adapter = read_adapter(demo_run.checkpoint)
    module = build_module(adapter)
    module.build(adapter.data_spec)
    module.eval()
    dataset, split = split_dataset(adapter.data, None, module.image_size)
    summary = observe(module, dataset, samples=6, batch_size=4)
    assert split == "val" and sorted(summary) == ["2", "3", "4"]
    for quantities in summary.values():
        assert quantities["gate"].shape == (6, 2)
        for name in ("key", "value", "ffn"):
            assert torch.equal(quantities[name], torch.zeros_like(quantities[name]))
        assert torch.allclose(quantities["gate"], torch.full_like(quantities["gate"], 1 / (1 + math.exp(-1))))


def test_a_checkpoint_of_another_fusion_is_one_line(demo_run, tmp_path, monkeypatch, capsys):
    checkpoint = torch.load(demo_run.checkpoint, map_location="cpu", weights_only=True)
    checkpoint["mit_config"]["model"]["fusion"] = {"class_path": "mit_lightning.fusion.TextOnly", "init_args": {}}
    path = tmp_path / "text_only.ckpt"
    torch.save(checkpoint, path)
    message = fails_at_once(monkeypatch, capsys, "inspect", "--ckpt_path", str(path), "--output", str(tmp_path / "o"))
    assert "mit_lightning.fusion.TextOnly fusion, not MiT" in message and len(message.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
