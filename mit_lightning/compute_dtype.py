"""A trained model's own weights in the compute dtype, for inference under bf16 autocast.

Under autocast, every float32 weight a linear or convolution layer uses is cast to bf16 at every
call: one copy (on a GPU, one kernel launch) per weight per forward pass, a large share of a
batch-1 forward's launches. Nothing needs those weights in float32 when nothing trains: cast once.

What changes in the results: nothing for linear and convolution layers (autocast computed them from
bf16 copies already); parameters used outside such layers (MiT's per-head scales, a task token) are
rounded to bf16, which is bf16's own rounding. Normalisation layers keep float32 parameters: autocast
runs them in float32, and their statistics would lose precision. float16 runs keep float32 weights:
their parts outside autocast would lose range.
"""

from __future__ import annotations

import torch
from torch import nn

#: layers whose parameters stay float32 (autocast computes them in float32)
NORMALISATION = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def inference_dtype(precision: str | None) -> torch.dtype | None:
    """The dtype a model trained in `precision` (Lightning's name) runs its own weights in for inference;
    None: as they are."""
    return torch.bfloat16 if precision == "bf16-mixed" else None


def cast_parameters(module: nn.Module, names: set[str], dtype: torch.dtype) -> int:
    """Cast the floating-point parameters of `module` named in `names` (as `named_parameters` names them),
    except those of normalisation layers, to `dtype` in place; how many were cast."""
    cast = 0
    for prefix, layer in module.named_modules():
        if isinstance(layer, NORMALISATION):
            continue
        for name, parameter in layer.named_parameters(recurse=False):
            full_name = f"{prefix}.{name}" if prefix else name
            if full_name in names and parameter.is_floating_point() and parameter.dtype != dtype:
                parameter.data = parameter.data.to(dtype)
                if parameter.grad is not None:  # a gradient of another dtype breaks compiled graphs and optimizers
                    parameter.grad = parameter.grad.to(dtype)
                cast += 1
    return cast
