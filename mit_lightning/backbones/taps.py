"""Taps into a frozen HuggingFace decoder through transformers' own extension points.

A fusion method rewrites two things inside chosen decoder layers, without copying any forward pass:
- keys/values of self-attention: an attention function registered in transformers'
  `AttentionInterface` under `mit_<kernel>` receives the layer's post-RoPE keys and values (before
  `repeat_kv`), transforms them, and hands them to the original kernel (SDPA, flash, eager), so
  fused kernels stay in use. The same name is registered in `AttentionMaskInterface` with the
  kernel's own mask function — without it transformers silently drops the padding mask;
- the activated state of the gated MLP, act(gate(x)) ⊙ up(x): a forward pre-hook on `mlp.down_proj`.

Per-sample inputs (the "payload", e.g. the image vector) travel as one keyword argument of the model
call, which transformers passes down to every attention call. The attention function stores it for
the layer's MLP hook, so activation checkpointing (which re-runs the layer's forward) sees it again.
A model called without the payload behaves exactly as the plain model.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any, Callable

import torch
from torch import nn

PAYLOAD_KWARG = "mit_payload"
TAPPED_PREFIX = "mit_"

KVTransform = Callable[[torch.Tensor, torch.Tensor, Any], "tuple[torch.Tensor, torch.Tensor]"]
ActivationTransform = Callable[[torch.Tensor, Any], torch.Tensor]


class _LayerTap:
    """What one decoder layer does with the payload; keyed by its attention module."""

    def __init__(self, kv: KVTransform | None, ffn: ActivationTransform | None) -> None:
        self.kv = kv
        self.ffn = ffn
        self.payload: Any = None


_TAPS: "weakref.WeakKeyDictionary[nn.Module, _LayerTap]" = weakref.WeakKeyDictionary()


def _kernel(base: str, attention_module: nn.Module) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base == "eager":
        # eager attention lives in each model's own file, not in the registry
        return sys.modules[type(attention_module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[base]


def _tapped_attention(base: str) -> Callable:
    def attention(module, query, key, value, attention_mask, **kwargs):
        payload = kwargs.pop(PAYLOAD_KWARG, None)
        tap = _TAPS.get(module)
        if tap is not None:
            tap.payload = payload
            if tap.kv is not None and payload is not None:
                key, value = tap.kv(key, value, payload)
        return _kernel(base, module)(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"{TAPPED_PREFIX}{base}_attention"
    return attention


def register_tapped_attention(base: str) -> str:
    """Register `mit_<base>` (attention and mask functions) once; returns the name."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    name = f"{TAPPED_PREFIX}{base}"
    if name in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        return name
    mask_function = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(base)
    if mask_function is None:
        known = sorted(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping)
        raise ValueError(f"No mask function is registered for attention '{base}' (known: {known}).")
    AttentionInterface.register(name, _tapped_attention(base))
    AttentionMaskInterface.register(name, mask_function)
    return name


def enable_taps(model: nn.Module) -> None:
    """Route the model's attention through the tapped wrapper of the kernel it already uses."""
    current = model.config._attn_implementation or "sdpa"
    if current.startswith(TAPPED_PREFIX):
        return
    model.set_attn_implementation(register_tapped_attention(current))


class TapHandle:
    """Removes a layer's taps (used when a fusion module is detached or replaced)."""

    def __init__(self, attention_module: nn.Module, hooks: list[torch.utils.hooks.RemovableHandle]) -> None:
        self._attention = weakref.ref(attention_module)
        self._hooks = hooks

    def remove(self) -> None:
        attention = self._attention()
        if attention is not None:
            _TAPS.pop(attention, None)
        for hook in self._hooks:
            hook.remove()


def tap_layer(
    model: nn.Module, layer_index: int, *, kv: KVTransform | None = None, ffn: ActivationTransform | None = None
) -> TapHandle:
    """Install K/V and/or FFN-activation transforms on decoder layer `layer_index` (0-based)."""
    layer = model.layers[layer_index]
    if layer.self_attn in _TAPS:
        raise RuntimeError(f"Decoder layer {layer_index} is already tapped by another fusion module.")
    enable_taps(model)
    tap = _LayerTap(kv, ffn)
    _TAPS[layer.self_attn] = tap

    def release_payload(*_: Any) -> None:
        # the layer is done with it; a recomputation under checkpointing receives it again
        tap.payload = None

    hooks = [layer.register_forward_hook(release_payload)]
    if ffn is not None:

        def infuse_activation(_module: nn.Module, args: tuple) -> tuple | None:
            if tap.payload is None:
                return None
            return (ffn(args[0], tap.payload), *args[1:])

        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(infuse_activation))
    return TapHandle(layer.self_attn, hooks)
