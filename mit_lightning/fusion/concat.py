"""Token concatenation (LLaVA-style prefix): the baseline MiT argues against.

CLIP patch tokens of one block (and, for sentiment, the acoustic and facial frames) go through a
trainable projector and are prepended to the text embeddings; the frozen LLM then attends over
N modality + T text tokens in every layer, so compute grows with N (576 patches at ViT-L/14-336)
where MiT adds one vector. With `lora`, the frozen LLM is tuned by LoRA as well (LLaVA's usual
parameter-efficient setting).
"""

from __future__ import annotations

from typing import Sequence

from mit_lightning.backbones.lora import LoRA
from mit_lightning.fusion.base import ModelDims
from mit_lightning.fusion.tokens import TokenFusion


class TokenConcat(TokenFusion):
    """Prefix the prompt with projected modality tokens.

    Args:
        vision_block: 1-based CLIP block whose patch tokens are used; None = the penultimate block (LLaVA).
        projector: "linear" or "mlp" (two layers with GELU, LLaVA-1.5).
        modalities: the token sources in order ("image", sequence modalities); None = all the model has.
        lora: LoRA on the frozen LLM (peft); None = no LoRA.
    """

    method = "TokenConcat"

    def __init__(
        self,
        dims: ModelDims,
        vision_block: int | None = None,
        projector: str = "mlp",
        modalities: Sequence[str] | None = None,
        lora: LoRA | None = None,
    ) -> None:
        super().__init__(dims, vision_block=vision_block, projector=projector, modalities=modalities, lora=lora)
