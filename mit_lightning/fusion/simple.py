"""The two reference points without infusion.

- `TextOnly`: the frozen LLM reads the prompt alone (paper Table 4, "none").
- `LateAddition`: the modality vectors are projected and added to the text feature after the LLM
  ("MiT removed", paper Table 6): same inputs as MiT, no infusion.
"""

from __future__ import annotations

import torch
from torch import nn

from mit_lightning.backbones.llm import FrozenLLM, last_token
from mit_lightning.errors import UserError
from mit_lightning.fusion.base import Fusion, FusionInputs, ModelDims


class TextOnly(Fusion):
    """The text feature of the unchanged frozen LLM."""

    def __init__(self, dims: ModelDims) -> None:
        super().__init__()

    def forward(self, llm: FrozenLLM, input_ids, attention_mask, inputs: FusionInputs) -> torch.Tensor:
        return last_token(llm(attention_mask, input_ids=input_ids), attention_mask)


class LateAddition(Fusion):
    """text feature + Σ_m W_m·v_m: the modalities meet the text only after the LLM."""

    def __init__(self, dims: ModelDims) -> None:
        super().__init__()
        if not dims.vectors:
            raise UserError("LateAddition needs at least one non-text modality (model.vision or model.sequence_modalities).")
        self.projections = nn.ModuleDict(
            {name: nn.Linear(size, dims.llm.hidden_size) for name, size in sorted(dims.vectors.items())}
        )

    def forward(self, llm: FrozenLLM, input_ids, attention_mask, inputs: FusionInputs) -> torch.Tensor:
        text = last_token(llm(attention_mask, input_ids=input_ids), attention_mask).float()
        for name, projection in self.projections.items():
            text = text + projection(inputs.vectors[name].to(projection.weight.dtype))
        return text
