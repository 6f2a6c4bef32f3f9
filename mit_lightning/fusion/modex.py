"""ModeX: Multi-modal Expert-Coordinated adapters (MEC) where text and modality tokens mix.

Projected modality tokens (LLaVA-style, a 2-layer MLP connector by default) go before the text, and
in every decoder layer of the frozen LLM a MEC-Adapter transforms the output of self-attention
(o_proj) and the output of the MLP, before each residual add, at every position (text + modality).

MEC-Adapter, "share down, coordinate up" (the paper's headline setting), with E = 3 experts
(text, visual, cross) and temperature τ = 10:

    ρ(z) = softmax((W_r z + b_r) / τ)         per-token soft routing, no auxiliary loss
    a = ReLU(W_d z + b_d)                      one shared down-projection to rank r
    MEC(z) = z + Σ_e ρ_e(z) (W_u^e a + b_u^e)  W_u^e, b_u^e = 0 at the start; router default init

Since every up-projection starts at 0, ModeX leaves the LLM exactly as token concatenation with the
same projector at the start. The experts' ups are applied as one map: Σ_e ρ_e W_u^e a equals
[W_u^1 … W_u^E] · (ρ ⊗ a), so only a (E·r)-wide intermediate is kept instead of E outputs of the
LLM's width.

Not used here: the MS-Adapters ModeX puts in uni-modal encoder stacks (the CLIP tower stays frozen),
and the "share up, coordinate down" variant.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from mit_lightning.backbones.lora import LoRA
from mit_lightning.errors import UserError
from mit_lightning.fusion.base import ModelDims
from mit_lightning.fusion.tokens import Projector, TokenFusion

EXPERTS = 3  # text, visual, cross
TEMPERATURE = 10.0


class MECAdapter(nn.Module):
    """MEC(z) = z + Σ_e ρ_e(z)(W_u^e ReLU(W_d z + b_d) + b_u^e); the identity at the start."""

    def __init__(self, width: int, rank: int, experts: int = EXPERTS, temperature: float = TEMPERATURE) -> None:
        super().__init__()
        self.experts, self.rank, self.temperature = experts, rank, temperature
        self.router = nn.Linear(width, experts)
        self.down = nn.Linear(width, rank)
        self.ups = nn.Linear(experts * rank, width, bias=False)  # columns [e·r, (e+1)·r) are W_u^e
        self.up_biases = nn.Parameter(torch.zeros(experts, width))  # row e is b_u^e
        nn.init.zeros_(self.ups.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        features = hidden.to(self.ups.weight.dtype)
        routing = torch.softmax(self.router(features) / self.temperature, dim=-1)  # (..., E)
        shared = torch.relu(self.down(features))  # (..., r)
        mixed = (routing[..., :, None] * shared[..., None, :]).flatten(-2)  # (..., E·r): ρ ⊗ a
        added = self.ups(mixed) + routing @ self.up_biases
        return hidden + added.to(hidden.dtype)

    def transform(self, hidden: torch.Tensor, _payload) -> torch.Tensor:
        """The tap-site form (the payload only switches the taps on)."""
        return self(hidden)


class ModeXLayer(nn.Module):
    """The two MEC-Adapters of one decoder layer."""

    def __init__(self, width: int, rank: int) -> None:
        super().__init__()
        self.attention = MECAdapter(width, rank)
        self.mlp = MECAdapter(width, rank)


class ModeX(TokenFusion):
    """MEC-Adapters after self-attention and after the MLP of every layer, over modality + text tokens.

    Args:
        rank: r of the shared down-projection: 16 or 32 for small budgets, 128 for the LLaVA-1.5 setting.
        vision_block: 1-based CLIP block whose patch tokens are used; None = the penultimate block (LLaVA).
        projector: "mlp" (LLaVA-1.5's connector) or "linear".
        modalities: the token sources in order ("image", sequence modalities); None = all the model has.
        lora: LoRA on the frozen LLM (peft); None = no LoRA (the paper).
        tokens: tokens per source after a learned-query resampler (e.g. 32); None = every patch or frame.
    """

    method = "ModeX"

    def __init__(
        self,
        dims: ModelDims,
        rank: int = 16,
        vision_block: int | None = None,
        projector: Projector = "mlp",
        modalities: Sequence[str] | None = None,
        lora: LoRA | None = None,
        tokens: int | None = None,
    ) -> None:
        if rank <= 0:
            raise UserError(f"ModeX rank must be a positive integer (16/32 small, 128 as LLaVA-1.5); got {rank}.")
        super().__init__(dims, vision_block=vision_block, projector=projector, modalities=modalities, lora=lora,
                         tokens=tokens)
        width = dims.llm.hidden_size
        self.layers = nn.ModuleList(ModeXLayer(width, rank) for _ in range(dims.llm.num_layers))

    def layer_transforms(self, layer_index: int) -> dict[str, Callable]:
        layer = self.layers[layer_index]
        return {"attention_output": layer.attention.transform, "mlp_output": layer.mlp.transform}
