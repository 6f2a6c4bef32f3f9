"""Trained-model files for the inference, export and serving tests, on the tiny backbones.

- `fit_demo`: a real `mit fit` of configs/demo.yaml shrunk to seconds (segmentation), with an overlay
  config file naming its run folders, so that `--config ... --ckpt_path best` finds its checkpoint.
- `write_checkpoint`: a classification or sentiment checkpoint in `mit fit`'s format, built directly
  (no training) with its trainable weights moved away from their initialisation by a seed, so that
  which adapter runs changes the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image, ImageDraw

from mit_lightning.adapters import Adapter
from mit_lightning.cli import cli_main
from mit_lightning.data.base import DataSpec, PromptFormat
from mit_lightning.data.synthetic import COLOURS, shape_polygon
from mit_lightning.inference import build_module
from mit_lightning.checkpoints import BACKBONES_ENTRY, DATA_SPEC_ENTRY
from mit_lightning.module import is_trainable_key

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo.yaml"
CLASS_NAMES = ["apple_pie", "beignets", "churros"]
SEQUENCE_DIMS = {"audio": 5, "facial": 20}  # as the MOSI fixtures (mmsa_fixtures)
TINY_BACKBONES = {
    "llm": {"path": "tiny", "dtype": "float32"},
    "vision": {"name": "tiny", "weights": None, "dtype": "float32"},
}
MODELS = {
    "classification": {
        **TINY_BACKBONES,
        "fusion": {"class_path": "mit_lightning.fusion.MiT", "init_args": {"layers": [2, 4]}},
        "head": {"class_path": "mit_lightning.heads.ImageTextClassification", "init_args": {"hidden": 32}},
    },
    "sentiment": {
        "llm": TINY_BACKBONES["llm"],
        "vision": None,
        "fusion": {"class_path": "mit_lightning.fusion.MiT", "init_args": {"layers": [2, 4]}},
        "head": {"class_path": "mit_lightning.heads.SentimentRegression", "init_args": {"hidden": 32}},
        "sequence_modalities": ["audio", "facial"],
        "sequence_encoder": {"width": 16, "layers": 1, "heads": 2},
    },
}
SPECS = {
    "classification": DataSpec(num_classes=3, class_names=CLASS_NAMES,
                               prompt=PromptFormat("Classify the food from its title: {text}. #Classification:")),
    "sentiment": DataSpec(sequence_dims=SEQUENCE_DIMS,
                          prompt=PromptFormat("Predict the sentiment of: {text}. #Sentiment:", strip=True)),
}


@dataclass
class DemoRun:
    checkpoint: Path  # the best checkpoint
    configs: list[str]  # the --config files of the run
    data_root: Path


def fit_demo(folder: Path, model: dict | None = None, train_images: int = 16) -> DemoRun:
    """`mit fit --config configs/demo.yaml --config <overlay>`: a few synthetic images, one epoch; `model`:
    model settings of the overlay (other backbones, layers)."""
    overlay = folder / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({
        "test_after_fit": False,
        "trainer": {"default_root_dir": str(folder / "runs"), "max_epochs": 1, "enable_progress_bar": False,
                    "enable_model_summary": False,
                    "logger": {"init_args": {"save_dir": str(folder / "runs")}}},
        "data": {"init_args": {"root": str(folder / "data"), "train_images": train_images, "val_images": 4,
                               "test_images": 4, "batch_size": 8, "num_workers": 0}},
        **({"model": model} if model else {}),
    }))
    configs = [str(DEMO), str(overlay)]
    cli = cli_main(["fit", *[arg for config in configs for arg in ("--config", config)]])
    return DemoRun(Path(cli.trainer.checkpoint_callback.best_model_path), configs, folder / "data")


def build_adapter(task: str, seed: int, source: Path, model: dict | None = None) -> Adapter:
    """A `task` adapter built on the tiny backbones (its usual model config, or `model`), its trainable
    weights drawn from `seed`."""
    adapter = Adapter(source=source, model=model or MODELS[task], data_spec=SPECS[task], backbones={}, weights={},
                      precision="32-true")
    module = build_module(adapter)
    module.build(adapter.data_spec)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.trainable_parameters():
            parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))
    adapter.weights = {name: value for name, value in module.state_dict().items() if is_trainable_key(name)}
    adapter.backbones = module.backbones
    return adapter


def write_checkpoint(task: str, path: Path, seed: int = 0) -> Path:
    """A checkpoint as `mit fit` writes it: trainable weights, run config, backbones, data spec."""
    adapter = build_adapter(task, seed, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({
        "state_dict": adapter.weights,
        "mit_config": {"model": adapter.model, "trainer": {"precision": "32-true"}},
        BACKBONES_ENTRY: adapter.backbones,
        DATA_SPEC_ENTRY: adapter.data_spec.to_record(),
    }, path)
    return path


def shapes_image(size: int = 64) -> tuple[Image.Image, np.ndarray]:
    """A demo-like image: a red circle on the left, a blue square on the right, on grey; and the circle's mask."""
    image = Image.new("RGB", (size, size), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    draw.polygon([tuple(point) for point in shape_polygon("circle", size * 0.3, size * 0.5, size * 0.18)],
                 fill=COLOURS["red"])
    draw.polygon([tuple(point) for point in shape_polygon("square", size * 0.72, size * 0.5, size * 0.15)],
                 fill=COLOURS["blue"])
    circle = np.zeros((size, size), dtype=bool)
    circle[np.all(np.asarray(image) == COLOURS["red"], axis=-1)] = True
    return image, circle
