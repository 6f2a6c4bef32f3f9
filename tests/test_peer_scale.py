"""Trainable parameters of each fusion method at the paper's shapes (LLaMA-2-7B, CLIP ViT-L/14-336,
the RefCOCO decoder), built on the meta device: nothing is allocated, the counts are exact."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from mit_lightning.backbones.llm import LLMConfig
from mit_lightning.backbones.lora import LoRA
from mit_lightning.backbones.vision import VisionConfig
from mit_lightning.data.base import DataSpec
from mit_lightning.fusion import PILL, MiT, ModeX, TokenConcat
from mit_lightning.heads import ReferringSegmentation
from mit_lightning.module import MiTModule

D, FFN, LAYERS, HEADS = 4096, 11008, 32, 32  # LLaMA-2-7B
CLIP_WIDTH, CLIP_EMBED = 1024, 768  # ViT-L/14-336 patch tokens and global feature

#: every linear layer of a LLaMA-family decoder (LLaVA-1.5's LoRA targets)
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def module_7b(fusion) -> MiTModule:
    module = MiTModule(
        head=partial(ReferringSegmentation, vision_blocks=(18, 12, 6), width=256),
        llm=LLMConfig(path="random-llama-2-7b", dtype="bfloat16"),
        vision=VisionConfig(name="ViT-L-14-336", weights=None, dtype="bfloat16"),
        fusion=fusion,
    )
    with torch.device("meta"):
        module.build(DataSpec())
    return module


def method_parameters(module: MiTModule) -> int:
    """What the fusion method trains: its own parameters and the adapters it put into the LLM."""
    head = sum(p.numel() for p in module.head.parameters())
    trainable, _ = module.parameter_counts()
    return trainable - head


MLP_CONNECTOR = CLIP_WIDTH * D + D + D * D + D  # LLaVA-1.5's 2-layer projector


@pytest.mark.parametrize(
    "name, fusion, expected",
    [
        # 6 infused layers: K and V maps [multiply | add] (768 → 2·4096 each), FFN map (768 → 11008), 32 head scales
        ("mit", MiT, 6 * (2 * (CLIP_EMBED * 2 * D + 2 * D) + CLIP_EMBED * FFN + FFN + HEADS)),
        # per layer three SwiGLU adapters (3·d·r, r = 32) and W_g (heads × d); projector C → d without bias
        ("pill", PILL, CLIP_WIDTH * D + LAYERS * (3 * 3 * D * 32 + HEADS * D)),
        ("pill_stage1", partial(PILL, stage=1), CLIP_WIDTH * D + LAYERS * 3 * D * 32),
        # per layer two MEC-Adapters: router (d → 3), shared down (d → r), three ups (r → d) with biases
        ("modex_r128", partial(ModeX, rank=128), MLP_CONNECTOR + LAYERS * 2 * (3 * D + 3 + D * 128 + 128 + 3 * (128 * D + D))),
        ("concat", TokenConcat, MLP_CONNECTOR),
        # 32 learned queries, LayerNorm and one cross-attention in CLIP's width, before the projector
        ("pill_32_tokens", partial(PILL, tokens=32), CLIP_WIDTH * D + LAYERS * (3 * 3 * D * 32 + HEADS * D)
         + 32 * CLIP_WIDTH + 2 * CLIP_WIDTH + 4 * CLIP_WIDTH * CLIP_WIDTH + 4 * CLIP_WIDTH),
        # LoRA r = 16 on q, k, v: A (d → r) and B (r → d) each
        ("concat_lora_r16_qkv", partial(TokenConcat, lora=LoRA()), MLP_CONNECTOR + LAYERS * 3 * 16 * (D + D)),
        # LoRA r = 128 on every linear layer: q, k, v, o (d → d), gate, up (d → ffn), down (ffn → d)
        ("concat_lora_r128_all_linear", partial(TokenConcat, lora=LoRA(rank=128, target_modules=list(ALL_LINEAR))),
         MLP_CONNECTOR + LAYERS * 128 * (4 * (D + D) + 3 * (D + FFN))),
    ],
)
def test_trainable_parameters_at_7b_shapes(name, fusion, expected):
    assert method_parameters(module_7b(fusion)) == expected


def test_the_headline_sizes_at_7b():
    pill = method_parameters(module_7b(PILL))
    assert 44e6 < pill < 47e6  # PILL: about 45M
    modex = method_parameters(module_7b(partial(ModeX, rank=128)))
    assert round((modex - MLP_CONNECTOR) / 1e6, 1) == 135.8 and round(modex / 1e6, 1) == 156.8  # ModeX r = 128 (+ connector)
    llava_lora = method_parameters(module_7b(partial(TokenConcat, lora=LoRA(rank=128, target_modules=list(ALL_LINEAR)))))
    assert round(llava_lora / 1e6, 1) == 340.8  # LLaVA-1.5's LoRA with the connector
    mit = module_7b(MiT)
    trainable, total = mit.parameter_counts()
    # MiT with the paper's 6 layers and the decoder: 1.9% of the model as built here (its tokenizer has 1k
    # tokens; with LLaMA-2's 32k-token embeddings the share is 1.8%)
    assert 0.018 < trainable / total < 0.019
