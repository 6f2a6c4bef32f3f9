"""Token concatenation (LLaVA-style prefix): the baseline MiT argues against.

CLIP patch tokens of one block go through a trainable projector and are prepended to the text
embeddings; the frozen LLM then attends over N visual + T text tokens in every layer, so compute
grows with N (576 patches at ViT-L/14-336) where MiT adds one vector.
"""

from __future__ import annotations

import torch
from torch import nn

from mit_lightning.backbones.llm import FrozenLLM, last_token
from mit_lightning.errors import UserError
from mit_lightning.fusion.base import Fusion, FusionInputs, ModelDims


class TokenConcat(Fusion):
    """Prefix the prompt with projected CLIP patch tokens.

    Args:
        vision_block: 1-based CLIP block whose patch tokens are used; None = the penultimate block (LLaVA).
        projector: "linear" or "mlp" (two layers with GELU, LLaVA-1.5).
    """

    def __init__(self, dims: ModelDims, vision_block: int | None = None, projector: str = "mlp") -> None:
        super().__init__()
        if dims.vision_width is None or dims.vision_depth is None:
            raise UserError("TokenConcat needs a vision tower (model.vision).")
        block = vision_block if vision_block is not None else max(dims.vision_depth - 1, 1)
        if not 1 <= block <= dims.vision_depth:
            raise UserError(f"TokenConcat vision_block {block} is outside the vision tower's {dims.vision_depth} blocks.")
        self.vision_blocks = (block,)
        width, hidden = dims.vision_width, dims.llm.hidden_size
        if projector == "linear":
            self.projector = nn.Linear(width, hidden)
        elif projector == "mlp":
            self.projector = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        else:
            raise UserError(f"Unknown projector '{projector}'; use 'linear' or 'mlp'.")

    def forward(self, llm: FrozenLLM, input_ids, attention_mask, inputs: FusionInputs) -> torch.Tensor:
        text = llm.embed(input_ids)
        patches = inputs.vision_tokens[self.vision_blocks[0]]
        visual = self.projector(patches.to(self.projector_dtype)).to(text.dtype)
        embeds = torch.cat([visual, text], dim=1)
        mask = torch.cat([attention_mask.new_ones(visual.shape[:2]), attention_mask], dim=1)
        return last_token(llm(mask, inputs_embeds=embeds), mask)

    @property
    def projector_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype
