"""Compiled steps: `torch.compile` on the parts of a model that run every step.

What is compiled, each on its own (`model.compile`):

- every decoder layer of the frozen LLM, with the fusion method's taps: their hooks sit on the layer
  and its submodules, so they are traced into the layer's graph (no graph break inside a layer;
  `tests/test_compiling.py` counts them for MiT and each peer);
- each transformer block of the CLIP tower (the tower is read through `forward_intermediates`, which a
  compiled `__call__` would not reach);
- the task head.

All of them share one code object (`nn.Module._call_impl`), and dynamo keeps at most
`recompile_limit` graphs per code object before it silently runs the rest eagerly: every layer with
its own taps and every grad mode needs one, so `compile_model` raises that limit (and the overall one)
to what the compiled parts need.

The step outside them (tokenising, building the payload, the loss) stays eager. A compiled graph
is specialised to its input shapes, and CUDA graphs (`reduce-overhead`) replay one recorded shape:
so compiled models pad the text to a multiple of `TEXT_BUCKET` tokens (`pad_to_bucket`), which bounds
the shapes a run meets to a few buckets. Padding is masked like any other, so features and outputs
are those of the unpadded batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from mit_lightning.errors import check_choice

if TYPE_CHECKING:
    from mit_lightning.module import MiTModule

#: none: eager; default: inductor kernels; reduce-overhead: also CUDA graphs (GPU); max-autotune: also a search
#: for the fastest kernels (minutes of compiling)
Compile = Literal["none", "default", "reduce-overhead", "max-autotune"]
#: compiled models pad the text to a multiple of this many tokens
TEXT_BUCKET = 16
#: graphs a compiled part may need (grad modes × text buckets × batch sizes) before dynamo gives up on it
GRAPHS_PER_PART = 32


def compiled_parts(module: "MiTModule") -> list[nn.Module]:
    """The modules `compile_model` compiles: each decoder layer, each CLIP block, the head."""
    parts: list[nn.Module] = list(module.llm.layers)
    if module.vision is not None:
        parts.extend(module.vision.visual.transformer.resblocks)
    parts.append(module.head)
    return parts


def compile_model(module: "MiTModule", mode: Compile) -> None:
    """Compile `module`'s per-step parts in place (nothing for "none"); the first calls of each shape compile."""
    check_choice("model.compile", mode, Compile)
    if mode == "none":
        return
    parts = compiled_parts(module)
    config = torch._dynamo.config
    # per part: training, evaluation and inference graphs, for a few text buckets and batch sizes
    needed = GRAPHS_PER_PART * len(parts)
    config.recompile_limit = max(config.recompile_limit, needed)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, needed)
    for part in parts:
        part.compile(mode=mode)


def pad_to_bucket(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int, side: str,
                  multiple: int = TEXT_BUCKET) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and mask padded on the tokenizer's side to the next multiple of `multiple` tokens."""
    missing = -attention_mask.shape[1] % multiple
    if not missing:
        return input_ids, attention_mask
    widths = (missing, 0) if side == "left" else (0, missing)
    return (nn.functional.pad(input_ids, widths, value=pad_id),
            nn.functional.pad(attention_mask, widths, value=0))
