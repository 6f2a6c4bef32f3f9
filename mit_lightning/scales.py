"""Named model sizes shared by the benchmark and the tests: the real MiTModule built at a scale, and
referring-segmentation batches for it (no data files, no download).

- `tiny`: the tiny presets (4-layer 64-wide LLaMA, 4-block CLIP), fp32: tests and a CPU smoke run.
- `small`: a random LLaMA-shaped 16-layer, 1024-wide decoder and a random CLIP ViT-B/16 at 224 px,
  fp32: on a CPU the frozen backbones dominate a training step as they do at 7B, so cost ratios
  between strategies mean something without a GPU.
- `7b`: LLaMA-2-7B and CLIP ViT-L/14-336 shapes, random, bf16, the paper's layers, decoder and
  masks (GPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch

from mit_lightning.backbones.llm import LLMConfig
from mit_lightning.backbones.vision import VisionConfig
from mit_lightning.data.base import DataSpec, fill_template
from mit_lightning.data.refer import DESCRIPTION, PAPER_TEMPLATE
from mit_lightning.fusion.base import Fusion, ModelDims
from mit_lightning.fusion.mit import PAPER_LAYERS
from mit_lightning.heads import ReferringSegmentation
from mit_lightning.module import MiTModule


@dataclass(frozen=True)
class Scale:
    """Backbones and sizes of one scale."""

    llm: str
    vision: str
    dtype: str
    layers: tuple[int, ...]  # infused, 1-based
    vision_blocks: tuple[int, ...]  # read by the segmentation decoder
    head_width: int
    mask_size: int
    source_image_size: int  # side of the synthetic images a data loader decodes
    # what a benchmark measures unless told otherwise: batch sizes, timed and untimed steps per case
    batch_sizes: tuple[int, ...] = (8, 32)
    steps: int = 10
    warmup: int = 3
    compile: tuple[str, ...] = ("none",)  # `mit bench --compile`: the MiT model eager and compiled in these modes


SCALES = {
    "tiny": Scale("tiny", "tiny", "float32", (2, 3, 4), (4, 3, 2), 64, 64, 64),
    # the paper's layer pattern (every fourth layer from 40% of the depth, and the last) on 16 layers
    "small": Scale("random-llama-16x1024", "ViT-B-16", "float32", (7, 9, 11, 13, 15, 16), (9, 6, 3), 128, 224, 224,
                   batch_sizes=(8,), steps=5, warmup=1),
    "7b": Scale("random-llama-2-7b", "ViT-L-14-336", "bfloat16", PAPER_LAYERS, (18, 12, 6), 256, 480, 480,
                compile=("none", "reduce-overhead")),
}

_WORDS = "the small red circle on the left next to a big blue square above the green triangle".split()


def build_module(scale: Scale, fusion: Callable[[ModelDims], Fusion], text_length: int,
                 device: torch.device, **options: Any) -> MiTModule:
    """The real MiTModule, built on `device` directly: 7B of frozen weights never pass through the CPU.

    `options` are further MiTModule arguments (e.g. text_feature)."""
    module = MiTModule(
        head=partial(ReferringSegmentation, vision_blocks=scale.vision_blocks, width=scale.head_width),
        llm=LLMConfig(path=scale.llm, dtype=scale.dtype, max_text_tokens=text_length),
        vision=vision_config(scale),
        fusion=fusion,
        **options,
    )
    with torch.device(device):
        module.build(DataSpec())
    return module.to(device)  # open_clip hands its tower back on the CPU


def vision_config(scale: Scale) -> VisionConfig:
    return VisionConfig(name=scale.vision, weights=None, dtype=scale.dtype)


def prompts(count: int, text_length: int) -> list[str]:
    """Prompts of at least `text_length` tokens, which the tokenizer cuts to exactly that many."""
    descriptions = (" ".join(_WORDS[(i + j) % len(_WORDS)] for j in range(text_length)) for i in range(count))
    return [fill_template(PAPER_TEMPLATE, DESCRIPTION, description) for description in descriptions]


def synthetic_batch(module: MiTModule, scale: Scale, batch_size: int, text_length: int,
                    device: torch.device) -> dict[str, Any]:
    """A batch as the data module delivers it (uint8 images and masks), already on the device."""
    generator = torch.Generator().manual_seed(batch_size)
    size = module.image_size
    return {
        "prompt": prompts(batch_size, text_length),
        "image": torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, generator=generator).to(device),
        "mask": torch.randint(0, 2, (batch_size, scale.mask_size, scale.mask_size), dtype=torch.uint8,
                              generator=generator).to(device),
        "index": torch.arange(batch_size, device=device),
    }
