"""PILL: Modality-Attention-Gating (MAG) and a Mixture of Modality-Adapter-Experts (MoMAE).

Projected modality tokens (CLIP patch tokens here; EVA-CLIP + Q-Former queries in the paper) go
before the text, and every decoder layer of the frozen LLM gets, with u = RMSNorm1(x) and m the
positions of modality tokens:

- A_attn, a SwiGLU adapter on the attention input: u' = u + A_attn(u) (every token);
- MAG: the values of modality positions j are scaled per head by tanh(W_g u'_j) (W_g: heads × d,
  no bias, zero at the start); text queries, keys and values are untouched. Scaling value j scales
  column j of the attention after the softmax, without renormalising;
- MoMAE on the FFN input v = RMSNorm2(h): v' = v + A_vis(v) at modality positions, v + A_txt(v) at
  text positions (hard routing by m, no learned router).

SwiGLU adapter: A(z) = W_up(SiLU(W_gate z) ⊙ W_down z), rank r = 32, no bias; W_down ~ N(0, 0.02),
W_gate PyTorch's default, W_up = 0, so every adapter adds 0 at the start.

Two stages, one config each: stage 1 trains A_vis and the projector with MAG off; stage 2 trains
everything with MAG on, W_g starting from 0, from stage 1's weights (`model.init_weights`). So at
the start of stage 2 the modality values are gated shut (tanh 0 = 0): text attends to the modality
keys, whose values are zero, and stage 2 learns how much of each head to let through.

Stage 1 as the authors' release runs it (`flip_last_routing`, on by default): in the last layer the
routing is flipped, text positions through A_vis and modality positions through A_txt. The task
head reads the last text token, which in the last layer only A_txt would change; flipped, that
layer's A_vis trains too (without it, it gets exactly zero gradient).

Choices of this implementation:
- With grouped-query attention W_g has one row per key/value head (the values' heads); LLaMA-2-7B
  has as many key/value heads as heads, so the sizes match the paper there.
- The acoustic and facial frames of the sentiment task are modality tokens like patches: A_vis and
  MAG act on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch
from torch import nn

from mit_lightning.backbones.llm import LLMShape
from mit_lightning.backbones.lora import LoRA
from mit_lightning.backbones.taps import TapPayload
from mit_lightning.errors import UserError, check_choice
from mit_lightning.fusion.base import ModelDims
from mit_lightning.fusion.tokens import Projector, TokenFusion

#: 1 = A_vis and the projector train, MAG off; 2 = everything trains, MAG on
Stage = Literal[1, 2]


class SwiGLUAdapter(nn.Module):
    """A(z) = W_up(SiLU(W_gate z) ⊙ W_down z), no bias; W_up starts at 0."""

    def __init__(self, width: int, rank: int) -> None:
        super().__init__()
        self.gate = nn.Linear(width, rank, bias=False)
        self.down = nn.Linear(width, rank, bias=False)
        self.up = nn.Linear(rank, width, bias=False)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.up.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.up(nn.functional.silu(self.gate(hidden)) * self.down(hidden))


def _in_dtype_of(module: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The LLM's (bf16) hidden state in the trainable module's (fp32) dtype."""
    return hidden.to(next(module.parameters()).dtype)


@dataclass
class PILLPayload(TapPayload):
    """Per call: where the modality tokens are, and each layer's adapted attention input until MAG reads it."""

    modality: torch.Tensor  # (B, L) bool, True at modality-token positions
    attention_inputs: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)


class PILLLayer(nn.Module):
    """A_attn, W_g (MAG), A_vis and A_txt of one decoder layer; `gating` = MAG on; `flipped` = text through
    A_vis and modality tokens through A_txt."""

    def __init__(self, index: int, shape: LLMShape, rank: int, gating: bool, flipped: bool = False) -> None:
        super().__init__()
        self.index = index  # 0-based decoder layer
        self.gating = gating
        self.flipped = flipped
        width = shape.hidden_size
        self.attention_adapter = SwiGLUAdapter(width, rank)
        self.gate = nn.Linear(width, shape.num_kv_heads, bias=False)  # W_g
        nn.init.zeros_(self.gate.weight)
        self.visual_adapter = SwiGLUAdapter(width, rank)
        self.text_adapter = SwiGLUAdapter(width, rank)

    def adapt_attention_input(self, hidden: torch.Tensor, payload: PILLPayload) -> torch.Tensor:
        """u' = u + A_attn(u); with MAG on, u' is kept for it (MAG acts inside the attention call)."""
        adapted = hidden + self.attention_adapter(_in_dtype_of(self, hidden)).to(hidden.dtype)
        if self.gating:
            payload.attention_inputs[self.index] = adapted
        return adapted

    def gate_modality_values(self, key: torch.Tensor, value: torch.Tensor, payload: PILLPayload):
        """MAG: V_j ← tanh(W_g u'_j) ⊙ V_j at modality positions j, per head; value (B, H_kv, L, d)."""
        attention_input = payload.attention_inputs.pop(self.index)
        gate = torch.tanh(self.gate(_in_dtype_of(self, attention_input)))  # (B, L, H_kv)
        factor = torch.where(payload.modality[..., None], gate, torch.ones_like(gate))
        return key, (value * factor.transpose(1, 2)[..., None]).to(value.dtype)

    def route_mlp_input(self, hidden: torch.Tensor, payload: PILLPayload) -> torch.Tensor:
        """MoMAE: v + A_vis(v) at modality positions, v + A_txt(v) at text positions (the other way round if flipped)."""
        features = _in_dtype_of(self, hidden)
        visual = payload.modality[..., None] != self.flipped
        added = torch.where(visual, self.visual_adapter(features), self.text_adapter(features))
        return hidden + added.to(hidden.dtype)


class PILL(TokenFusion):
    """PILL on every decoder layer of the frozen LLM, over projected modality tokens.

    Args:
        stage: 1 = train A_vis and the projector, MAG off; 2 = train everything, MAG on (W_g from 0).
            Start stage 2 from stage 1's checkpoint with `model.init_weights`.
        rank: rank r of the SwiGLU adapters (32 in the paper).
        vision_block: 1-based CLIP block whose patch tokens are used; None = the penultimate block.
        projector: "linear" (the paper: one linear map without bias) or "mlp".
        modalities: the token sources in order ("image", sequence modalities); None = all the model has.
        lora: LoRA on the frozen LLM (peft); None = no LoRA (the paper).
        tokens: tokens per source after a learned-query resampler (32, as PILL's Q-Former, in the
            overlays); None = every patch or frame.
        flip_last_routing: in stage 1, route text through A_vis and modality tokens through A_txt in the
            last layer, as the release does, so that layer's A_vis trains.
    """

    method = "PILL"

    def __init__(
        self,
        dims: ModelDims,
        stage: Stage = 2,
        rank: int = 32,
        vision_block: int | None = None,
        projector: Projector = "linear",
        modalities: Sequence[str] | None = None,
        lora: LoRA | None = None,
        tokens: int | None = None,
        flip_last_routing: bool = True,
    ) -> None:
        check_choice("PILL stage", stage, Stage)
        if rank <= 0:
            raise UserError(f"PILL adapter rank must be a positive integer; got {rank}.")
        super().__init__(
            dims, vision_block=vision_block, projector=projector, modalities=modalities, lora=lora, projector_bias=False,
            tokens=tokens,
        )
        self.stage = stage
        last = dims.llm.num_layers - 1
        self.layers = nn.ModuleList(
            PILLLayer(index, dims.llm, rank, gating=stage == 2, flipped=stage == 1 and flip_last_routing and index == last)
            for index in range(dims.llm.num_layers)
        )
        if stage == 1:
            self.layers.requires_grad_(False)
            for layer in self.layers:
                layer.visual_adapter.requires_grad_(True)

    def layer_transforms(self, layer_index: int) -> dict[str, Callable]:
        layer = self.layers[layer_index]
        return {
            "attention_input": layer.adapt_attention_input,
            "kv": layer.gate_modality_values if layer.gating else None,
            "mlp_input": layer.route_mlp_input,
        }

    def make_payload(self, modality: torch.Tensor) -> PILLPayload:
        return PILLPayload(modality=modality)
