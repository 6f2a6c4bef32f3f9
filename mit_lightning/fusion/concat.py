"""Token concatenation (LLaVA-style prefix): the baseline MiT argues against.

CLIP patch tokens of one block (and, for sentiment, the acoustic and facial frames) go through a
trainable projector and are prepended to the text embeddings; the frozen LLM then attends over
N modality + T text tokens in every layer, so compute grows with N (576 patches at ViT-L/14-336)
where MiT adds one vector. With `lora`, the frozen LLM is tuned by LoRA as well (LLaVA's usual
parameter-efficient setting).
"""

from __future__ import annotations

from mit_lightning.fusion.tokens import TokenFusion


class TokenConcat(TokenFusion):
    """Prefix the prompt with projected modality tokens; nothing else changes in the LLM.

    Args (those of `TokenFusion`):
        vision_block: 1-based CLIP block whose patch tokens are used; None = the penultimate block (LLaVA).
        projector: "linear" or "mlp" (two layers with GELU, LLaVA-1.5).
        modalities: the token sources in order ("image", sequence modalities); None = all the model has.
        lora: LoRA on the frozen LLM (peft); None = no LoRA.
        projector_bias: whether the projector has biases.
        tokens: tokens per source after a learned-query resampler (e.g. 32); None = every patch or frame.
    """

    method = "TokenConcat"
