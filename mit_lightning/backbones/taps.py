"""Taps into a frozen HuggingFace decoder through transformers' own extension points.

A fusion method changes what happens at a few sites inside chosen decoder layers, without copying
any forward pass:

- ``attention_input``: the normalised hidden state entering self-attention (forward pre-hook on
  ``self_attn``);
- ``kv``: the layer's post-RoPE keys and values, before ``repeat_kv`` — an attention function
  registered in transformers' ``AttentionInterface`` under ``mit_<kernel>`` transforms them and hands
  them to the original kernel (SDPA, flash, eager), so fused kernels stay in use. The same name is
  registered in ``AttentionMaskInterface`` with the kernel's own mask function — without it
  transformers silently drops the padding mask;
- ``attention_output``: the output of ``o_proj``, before the residual add (forward hook);
- ``mlp_input``: the normalised hidden state entering the MLP (forward pre-hook on ``mlp``);
- ``ffn_activation``: the activated state of the gated MLP, act(gate(x)) ⊙ up(x) (forward pre-hook on
  ``mlp.down_proj``);
- ``mlp_output``: the output of the MLP, before the residual add (forward hook on ``mlp``).

Per-sample inputs (the "payload", e.g. the image vector) travel as one keyword argument of the model
call, which transformers passes down to every layer's self-attention. A pre-hook on ``self_attn``
hands it to the layer's tap, so activation checkpointing (which re-runs the layer's forward, hooks
of its submodules included) sees it again. A model called without the payload behaves exactly as the
plain model.

The tap of a layer lives *in the module tree*: it is an attribute of the layer's ``self_attn`` and its
hooks are objects that refer to it, so ``copy.deepcopy`` of a model (EMA, evaluation copies) and
pickling carry working taps that point at the copied fusion modules.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

PAYLOAD_KWARG = "mit_payload"
TAPPED_PREFIX = "mit_"
TAP_ATTRIBUTE = "mit_tap"

Transform = Callable[[torch.Tensor, Any], torch.Tensor]
KVTransform = Callable[[torch.Tensor, torch.Tensor, Any], "tuple[torch.Tensor, torch.Tensor]"]
SITES = ("attention_input", "kv", "attention_output", "mlp_input", "ffn_activation", "mlp_output")


@dataclass
class TapPayload:
    """Base of every payload.

    Each tap notes the payload its transforms last received (`LayerTap.reached`); a fusion method checks
    after the model call that every one received this call's (`check_reached`), so a model whose taps
    were lost (a copy built without them, an attention implementation reset by hand) fails loudly
    instead of silently running text-only. The note is kept on the tap, whose keys never change, not in
    the payload: a compiled layer then meets the same state at every call (no recompiling per layer).
    """


class LayerTap:
    """What a fusion method does at the sites of one decoder layer; unset sites are left alone."""

    def __init__(self, attention: nn.Module, layer_index: int, kernel: str, transforms: dict[str, Callable]) -> None:
        self.attention = attention  # the layer's self_attn, which holds this tap
        self.layer_index = layer_index
        self.kernel = kernel  # the attention implementation the tapped one wraps
        self.transforms = transforms
        self.payload: Any = None
        self.reached: dict[str, Any] = dict.fromkeys(transforms)  # site -> the payload it last received
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def apply(self, site: str, *values: torch.Tensor):
        """Run the site's transform with the current payload; returns the values unchanged without one."""
        transform = self.transforms.get(site)
        payload = self.payload
        if transform is None or payload is None:
            return values if len(values) > 1 else values[0]
        self.reached[site] = payload
        return transform(*values, payload)

    def remove(self) -> None:
        """Take the tap out of its layer again (a fusion module detached or re-attached)."""
        for handle in self.handles:
            handle.remove()
        if getattr(self.attention, TAP_ATTRIBUTE, None) is self:
            delattr(self.attention, TAP_ATTRIBUTE)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """An unpickled model (another process) needs the tapped attention registered again."""
        self.__dict__.update(state)
        register_tapped_attention(self.kernel)


# --- hooks: module-level callables, so copies and pickles of the model keep them ---------------------
class _CapturePayload:
    """self_attn pre-hook: hands the call's payload to the tap and transforms the attention input."""

    def __init__(self, tap: LayerTap) -> None:
        self.tap = tap

    def __call__(self, _module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        self.tap.payload = kwargs.get(PAYLOAD_KWARG)
        if "attention_input" not in self.tap.transforms or self.tap.payload is None:
            return None
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": self.tap.apply("attention_input", kwargs["hidden_states"])}
        return (self.tap.apply("attention_input", args[0]), *args[1:]), kwargs


class _ReleasePayload:
    """Decoder-layer forward hook: the layer is done with the payload (a recomputation gets it again)."""

    def __init__(self, tap: LayerTap) -> None:
        self.tap = tap

    def __call__(self, *_: Any) -> None:
        self.tap.payload = None


class _InputHook:
    """Forward pre-hook transforming a module's first input."""

    def __init__(self, tap: LayerTap, site: str) -> None:
        self.tap, self.site = tap, site

    def __call__(self, _module: nn.Module, args: tuple) -> tuple | None:
        if self.tap.payload is None:
            return None
        return (self.tap.apply(self.site, args[0]), *args[1:])


class _OutputHook:
    """Forward hook transforming a module's output (a tensor, or the first item of a tuple)."""

    def __init__(self, tap: LayerTap, site: str) -> None:
        self.tap, self.site = tap, site

    def __call__(self, _module: nn.Module, _args: tuple, output):
        if self.tap.payload is None:
            return None
        if isinstance(output, tuple):
            return (self.tap.apply(self.site, output[0]), *output[1:])
        return self.tap.apply(self.site, output)


# --- the tapped attention function ------------------------------------------------------------------
def _kernel(base: str, attention_module: nn.Module) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base == "eager":
        # eager attention lives in each model's own file, not in the registry
        return sys.modules[type(attention_module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[base]


def _tapped_attention(base: str) -> Callable:
    def attention(module, query, key, value, attention_mask, **kwargs):
        kwargs.pop(PAYLOAD_KWARG, None)
        tap = getattr(module, TAP_ATTRIBUTE, None)
        if tap is not None and "kv" in tap.transforms:
            key, value = tap.apply("kv", key, value)
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


def enable_taps(model: nn.Module) -> str:
    """Route the model's attention through the tapped wrapper of the kernel it already uses; returns that kernel."""
    current = model.config._attn_implementation or "sdpa"
    if current.startswith(TAPPED_PREFIX):
        return current[len(TAPPED_PREFIX):]
    model.set_attn_implementation(register_tapped_attention(current))
    return current


# --- installing and removing ------------------------------------------------------------------------
def tap_layer(model: nn.Module, layer_index: int, **transforms: Callable | None) -> LayerTap:
    """Install transforms at the named sites (`SITES`) of decoder layer `layer_index` (0-based).

    Each transform receives the site's tensor(s) and the payload and returns the new tensor(s):
    ``kv(key, value, payload) -> (key, value)``, every other site ``f(tensor, payload) -> tensor``.
    """
    unknown = sorted(set(transforms) - set(SITES))
    if unknown:
        raise ValueError(f"Unknown tap sites {unknown}; known: {SITES}.")
    transforms = {site: transform for site, transform in transforms.items() if transform is not None}
    layer = model.layers[layer_index]
    if getattr(layer.self_attn, TAP_ATTRIBUTE, None) is not None:
        raise RuntimeError(f"Decoder layer {layer_index} is already tapped by another fusion module.")
    tap = LayerTap(layer.self_attn, layer_index, enable_taps(model), transforms)
    setattr(layer.self_attn, TAP_ATTRIBUTE, tap)
    tap.handles = [
        layer.self_attn.register_forward_pre_hook(_CapturePayload(tap), with_kwargs=True),
        layer.register_forward_hook(_ReleasePayload(tap)),
    ]
    if "attention_output" in transforms:
        tap.handles.append(layer.self_attn.o_proj.register_forward_hook(_OutputHook(tap, "attention_output")))
    if "mlp_input" in transforms:
        tap.handles.append(layer.mlp.register_forward_pre_hook(_InputHook(tap, "mlp_input")))
    if "ffn_activation" in transforms:
        tap.handles.append(layer.mlp.down_proj.register_forward_pre_hook(_InputHook(tap, "ffn_activation")))
    if "mlp_output" in transforms:
        tap.handles.append(layer.mlp.register_forward_hook(_OutputHook(tap, "mlp_output")))
    return tap


def tapped_layers(model: nn.Module) -> list[int]:
    """0-based indices of the decoder layers that carry a tap."""
    return [index for index, layer in enumerate(model.layers) if getattr(layer.self_attn, TAP_ATTRIBUTE, None)]


def check_reached(payload: TapPayload, taps: list[LayerTap], method: str) -> None:
    """Fail loudly when a payload did not reach every transform of `taps` (its fusion method's)."""
    missing = {(tap.layer_index, site) for tap in taps for site, last in tap.reached.items() if last is not payload}
    for tap in taps:  # the payload's tensors are not kept alive until the next call (in place: same dict, same keys)
        for site in tap.reached:
            tap.reached[site] = None
    if missing:
        shown = ", ".join(f"layer {index + 1} {site}" for index, site in sorted(missing))
        raise RuntimeError(
            f"{method} inputs did not reach {shown}: the LLM these modules are attached to does not route through "
            "their taps (a model rebuilt or copied without them, or an attention implementation reset after "
            "attach()). Call the fusion module's attach(llm) on the LLM it runs with."
        )
