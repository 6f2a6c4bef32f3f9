"""The fusion methods MiT is compared with, on the same tiny backbones."""

from __future__ import annotations

import pytest
import torch

from mit_lightning.backbones.llm import last_token
from mit_lightning.errors import UserError
from mit_lightning.fusion import FusionInputs, LateAddition, ModelDims, TextOnly, TokenConcat

PROMPTS = ["the red circle", "the small blue square on the left"]


def dims_for(llm, clip) -> ModelDims:
    return ModelDims(
        llm=llm.shape, vectors={"image": clip.shape.embed_dim}, vision_width=clip.shape.width,
        vision_depth=clip.shape.depth, vision_grid=clip.shape.grid,
    )


def test_token_concat_prefixes_projected_patches_and_trains_only_the_projector(tiny_llm_factory, tiny_clip):
    llm = tiny_llm_factory(key="concat")
    concat = TokenConcat(dims_for(llm, tiny_clip), projector="mlp")
    assert concat.vision_blocks == (tiny_clip.shape.depth - 1,)  # penultimate block by default, like LLaVA
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    vision = tiny_clip(images, blocks=concat.vision_blocks)
    ids, mask = llm.tokenize(PROMPTS, "cpu")
    seen = []
    hook = llm.layers[0].register_forward_hook(lambda module, args, output: seen.append(output.shape[1]))
    feature = concat(llm, ids, mask, FusionInputs(vectors={"image": vision.embedding}, vision_tokens=vision.tokens))
    hook.remove()
    assert seen == [tiny_clip.shape.grid**2 + ids.shape[1]]  # N patches + T text tokens in every layer
    assert feature.shape == (2, llm.shape.hidden_size)
    feature.square().sum().backward()
    assert all(p.grad is not None for p in concat.parameters())
    assert all(p.grad is None for p in llm.parameters())


def test_token_concat_reads_the_last_real_text_token(tiny_llm_factory, tiny_clip):
    llm = tiny_llm_factory(key="concat-pad")
    concat = TokenConcat(dims_for(llm, tiny_clip), projector="linear")
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    vision = tiny_clip(images, blocks=concat.vision_blocks)
    inputs = FusionInputs(vectors={}, vision_tokens=vision.tokens)
    ids, mask = llm.tokenize(PROMPTS, "cpu")
    batched = concat(llm, ids, mask, inputs)
    alone_ids, alone_mask = llm.tokenize(PROMPTS[:1], "cpu")
    alone = concat(llm, alone_ids, alone_mask, FusionInputs(vectors={}, vision_tokens={k: v[:1] for k, v in vision.tokens.items()}))
    torch.testing.assert_close(batched[:1], alone, atol=1e-5, rtol=1e-5)


def test_token_concat_needs_a_vision_tower(tiny_llm_factory):
    with pytest.raises(UserError, match="vision tower"):
        TokenConcat(ModelDims(llm=tiny_llm_factory().shape))


def test_late_addition_leaves_the_llm_untouched_and_adds_after_it(tiny_llm_factory):
    llm = tiny_llm_factory(key="late")
    dims = ModelDims(llm=llm.shape, vectors={"audio": 8, "facial": 4})
    late = LateAddition(dims)
    ids, mask = llm.tokenize(PROMPTS, "cpu")
    text = TextOnly(dims)(llm, ids, mask, FusionInputs(vectors={}))
    vectors = {"audio": torch.randn(2, 8), "facial": torch.randn(2, 4)}
    fused = late(llm, ids, mask, FusionInputs(vectors=vectors))
    expected = text + late.projections["audio"](vectors["audio"]) + late.projections["facial"](vectors["facial"])
    torch.testing.assert_close(fused, expected)
    assert torch.equal(last_token(llm(mask, input_ids=ids), mask), text)


def test_late_addition_without_another_modality_is_a_clear_error(tiny_llm_factory):
    with pytest.raises(UserError, match="at least one non-text modality"):
        LateAddition(ModelDims(llm=tiny_llm_factory().shape))
