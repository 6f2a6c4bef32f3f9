"""The frozen LLM's weight memory at LLaMA-2 scale under each quantization, computed on the meta device.

A LLaMA-2 model of each size is built on the meta device (shapes only, no memory) and its weights
are counted as bitsandbytes stores them when `model.llm.quantization` asks: the decoder layers'
linear weights in int8 (1 byte each plus one float32 scale per output row, LLM.int8) or NF4 (half
a byte each plus one float32 absmax per block of 64, QLoRA without double quantisation);
embeddings and norms stay in bf16. `tests/test_bench.py` checks the count against a model
bitsandbytes really quantised.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from mit_lightning.backbones.quantization import Quantization

#: LLaMA-2 shapes: hidden size, FFN size, layers, attention heads, key/value heads (70B: grouped-query)
LLAMA_2 = {"7b": (4096, 11008, 32, 32, 32), "13b": (5120, 13824, 40, 40, 40), "70b": (8192, 28672, 80, 64, 8)}
QUANTIZATIONS: tuple[Quantization, ...] = ("none", "int8", "nf4")
NF4_BLOCK = 64
GIB = 2**30


def llama_2(size: str):
    """The LLaMA-2 decoder of that size (no LM head), on the meta device."""
    from transformers import LlamaConfig, LlamaModel

    hidden, ffn, layers, heads, kv_heads = LLAMA_2[size]
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads)
    with torch.device("meta"):
        return LlamaModel(config).to(torch.bfloat16)


def _quantized_linears(model: nn.Module) -> Iterator[nn.Module]:
    """The linear layers inside the decoder layers: what bitsandbytes replaces."""
    for layer in model.layers:
        yield from (module for module in layer.modules() if isinstance(module, nn.Linear))


def weight_bytes(model: nn.Module, quantization: Quantization) -> int:
    """Bytes of `model`'s weights once quantised as `quantization` (counted from shapes: works on meta)."""
    quantized = {id(module.weight): module.weight for module in _quantized_linears(model)} if quantization != "none" else {}
    total = 0
    for parameter in model.parameters():
        if id(parameter) not in quantized:
            total += parameter.numel() * parameter.element_size()
        elif quantization == "int8":
            total += parameter.numel() + 4 * parameter.shape[0]
        else:
            total += (parameter.numel() + 1) // 2 + 4 * -(-parameter.numel() // NF4_BLOCK)
    return total


def stored_bytes(model: nn.Module) -> int:
    """Bytes a loaded (possibly bitsandbytes-quantised) model really holds: parameters, int8 row scales and
    NF4 absmax; the check of `weight_bytes`."""
    total = sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())
    for parameter in model.parameters():
        scales = getattr(parameter, "SCB", None)
        state = getattr(parameter, "quant_state", None)
        for extra in (scales, getattr(state, "absmax", None)):
            if extra is not None:
                total += extra.numel() * extra.element_size()
    return total


def weight_memory_lines() -> list[dict[str, Any]]:
    """One line per (LLaMA-2 size, quantization): the frozen LLM's weights in GiB."""
    lines = []
    for size in LLAMA_2:
        model = llama_2(size)
        for quantization in QUANTIZATIONS:
            lines.append({"case": "llm_weights", "llm": f"llama-2-{size}", "quantization": quantization,
                          "gib": round(weight_bytes(model, quantization) / GIB, 2)})
    return lines
