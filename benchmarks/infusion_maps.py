"""MiT's infusion maps of all infused layers: one Linear each (as MiT computes them) or one stacked matmul.

    python benchmarks/infusion_maps.py --scale small --device cpu --threads 1
    python benchmarks/infusion_maps.py --scale 7b --device cuda --dtype bfloat16

Whether the K/V/FFN maps (Eq. 1 and 7) of every infused layer should be computed in one matmul
before the LLM call, instead of one matmul per map inside each layer, depends on the device. This
times only the maps, forward and backward, at a scale's shapes (`mit_lightning.scales`):

- per_layer: the Linears of a real `MiT` (three per infused layer) applied to one batch of vectors;
- stacked: one Linear whose weight holds all of theirs, stored stacked (no copy per step), its output
  split into the same per-layer parts.

Both reduce the 3 × layers parts the same way, then backpropagate (gradients set to None before each
step, as the optimizer's zero_grad does). Prints one JSON line per case: median ms (and CPU ms on a
CPU), casts and launches (`mit_lightning.bench.measure`).
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn

from mit_lightning.backbones.llm import LLMShape
from mit_lightning.backbones.presets import preset_llm_config
from mit_lightning.backbones.vision import VisionShape
from mit_lightning.bench.measure import measure
from mit_lightning.fusion.base import ModelDims
from mit_lightning.fusion.mit import MiT
from mit_lightning.scales import SCALES, vision_config


def per_layer_maps(scale_name: str) -> tuple[list[nn.Linear], int]:
    """The maps of a freshly built MiT at the scale's shapes, and the width of the vector they read."""
    scale = SCALES[scale_name]
    shape = LLMShape.from_hf_config(preset_llm_config(scale.llm, vocab_size=32000))
    vector_width = VisionShape.from_architecture(vision_config(scale).architecture()).embed_dim
    mit = MiT(ModelDims(llm=shape, vectors={"image": vector_width}), layers=scale.layers)
    maps = [part for layer in mit.infusions.values() for part in (layer.key_maps, layer.value_maps, layer.ffn_map)]
    return maps, vector_width


def stacked(maps: list[nn.Linear]) -> nn.Linear:
    """One Linear holding every map's weight and bias, rows in the maps' order."""
    joined = nn.Linear(maps[0].in_features, sum(part.out_features for part in maps))
    with torch.no_grad():
        joined.weight.copy_(torch.cat([part.weight for part in maps]))
        joined.bias.copy_(torch.cat([part.bias for part in maps]))
    return joined


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=list(SCALES), default="small")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the maps' weights")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (1: steady figures on a busy machine)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    maps, vector_width = per_layer_maps(args.scale)
    for part in maps:
        nn.init.normal_(part.weight, std=0.02)  # MiT starts at zero weights; any values cost the same
    joined = stacked(maps).to(device, dtype)
    maps = [part.to(device, dtype) for part in maps]
    sizes = [part.out_features for part in maps]
    vector = torch.randn(args.batch_size, vector_width, device=device, dtype=dtype)

    def step(parts_of) -> None:
        for weight in [*joined.parameters(), *(p for part in maps for p in part.parameters())]:
            weight.grad = None
        parts = parts_of(vector)
        torch.stack([part.float().square().mean() for part in parts]).sum().backward()

    cases = {
        "per_layer": lambda: step(lambda v: [part(v) for part in maps]),
        "stacked": lambda: step(lambda v: joined(v).split(sizes, dim=1)),
    }
    for name, measured in measure(cases, steps=args.steps, warmup=args.warmup, device=device).items():
        print(json.dumps({"case": name, "scale": args.scale, "device": args.device, "dtype": args.dtype,
                          "batch_size": args.batch_size, "maps": len(maps), "outputs": sum(sizes),
                          "vector_width": vector_width, **{key: value for key, value in measured.items()
                                                           if key != "memory_measure"}}), flush=True)


if __name__ == "__main__":
    main()
