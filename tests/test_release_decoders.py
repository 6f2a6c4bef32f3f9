"""The release's segmentation decoders (clipseg, cnn): shapes, what they read, sizes, initialisation, gradients."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from mit_lightning.backbones.llm import LLMConfig, LLMShape
from mit_lightning.backbones.vision import VisionConfig, VisionShape
from mit_lightning.data.base import DataSpec
from mit_lightning.errors import UserError
from mit_lightning.fusion import MiT
from mit_lightning.fusion.base import FusionInputs, ModelDims
from mit_lightning.heads import ReferringSegmentation
from mit_lightning.heads.release_decoders import CLIPSegDecoder
from mit_lightning.module import MiTModule, is_trainable_key

TEXT_DIM, TOKEN_WIDTH, BATCH, BLOCKS = 12, 16, 2, (3, 2, 1)


def small_dims(grid: int, patch: int) -> ModelDims:
    llm = LLMShape(hidden_size=TEXT_DIM, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=6, intermediate_size=24)
    return ModelDims(llm=llm, vision_width=TOKEN_WIDTH, vision_depth=3, vision_grid=grid, vision_patch=patch)


def head(decoder: str, grid: int = 3, patch: int = 14, **kwargs) -> ReferringSegmentation:
    settings = dict(width=8, heads=2, mlp_width=32, loss="ce", cnn_size=8)
    settings.update(kwargs)
    return ReferringSegmentation(small_dims(grid, patch), vision_blocks=BLOCKS, decoder=decoder, **settings)


def features(grid: int, seed: int = 0) -> tuple[torch.Tensor, FusionInputs]:
    generator = torch.Generator().manual_seed(seed)
    tokens = {block: torch.randn(BATCH, grid * grid, TOKEN_WIDTH, generator=generator) for block in BLOCKS}
    class_tokens = {block: torch.randn(BATCH, 1, TOKEN_WIDTH, generator=generator) for block in BLOCKS}
    inputs = FusionInputs(vectors={}, vision_tokens=tokens, vision_class_tokens=class_tokens)
    return torch.randn(BATCH, TEXT_DIM, generator=generator), inputs


# --- shapes ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("patch, kernel", [(14, 3), (16, 4), (8, 2)])
@pytest.mark.parametrize("grid", [2, 5, 24])
def test_clipseg_upsamples_the_grid_by_patch_over_4_twice(grid: int, patch: int, kernel: int):
    logits = head("clipseg", grid, patch)(*features(grid))
    assert logits.shape == (BATCH, 2, grid * kernel * kernel, grid * kernel * kernel)


@pytest.mark.parametrize("patch", [14, 16])
@pytest.mark.parametrize("grid", [2, 5, 24])
def test_cnn_ends_at_twice_its_upsampled_size_with_three_levels(grid: int, patch: int):
    logits = head("cnn", grid, patch, cnn_size=8)(*features(grid))
    assert logits.shape == (BATCH, 2, 16, 16)


def test_cnn_with_one_level_stays_on_the_patch_grid():
    decoder = ReferringSegmentation(small_dims(5, 14), vision_blocks=(3,), decoder="cnn", width=8, loss="dice")
    assert decoder(*features(5)).shape == (BATCH, 1, 5, 5)


@pytest.mark.parametrize("decoder", ["clipseg", "cnn"])
def test_the_loss_and_masks_resize_the_logits_to_the_masks(decoder: str):
    segmentation = head(decoder)
    logits = segmentation(*features(3))
    masks = torch.zeros(BATCH, 20, 20, dtype=torch.uint8)
    assert segmentation.masks(logits, masks).shape == (BATCH, 20, 20)
    assert segmentation.loss(logits, {"mask": masks}).ndim == 0


# --- what they read ----------------------------------------------------------------------------------
@pytest.mark.parametrize("decoder, reads_class_tokens", [("clipseg", True), ("cnn", False)])
def test_decoders_read_the_text_and_every_level_and_only_clipseg_the_class_tokens(decoder, reads_class_tokens):
    segmentation = head(decoder).eval()
    text, inputs = features(3)
    logits = segmentation(text, inputs)
    assert not torch.allclose(segmentation(text + 1.0, inputs), logits)
    tokens, class_tokens = inputs.vision_tokens, inputs.vision_class_tokens
    for block in BLOCKS:
        changed = FusionInputs(vectors={}, vision_tokens={**tokens, block: tokens[block] + 1.0},
                               vision_class_tokens=class_tokens)
        assert not torch.allclose(segmentation(text, changed), logits), f"block {block}"
        changed = FusionInputs(vectors={}, vision_tokens=tokens,
                               vision_class_tokens={**class_tokens, block: class_tokens[block] + 1.0})
        unchanged = torch.allclose(segmentation(text, changed), logits)
        assert unchanged != reads_class_tokens, f"class token of block {block}"


def test_clipseg_modulates_the_first_level_with_the_text_as_film():
    """out = Linear_mul(t) ⊙ Linear(tokens) + Linear_add(t) enters the first layer: checked by hand."""
    decoder = CLIPSegDecoder(TEXT_DIM, TOKEN_WIDTH, grid=2, levels=1, width=8, num_logits=1, patch=4, heads=2,
                             mlp_width=16)
    entering = []
    decoder.layers[0].register_forward_pre_hook(lambda module, args: entering.append(args[0]))
    text, tokens = torch.randn(BATCH, TEXT_DIM), torch.randn(BATCH, 5, TOKEN_WIDTH)
    decoder(text, [tokens])
    reduced = tokens @ decoder.reductions[0].weight.T + decoder.reductions[0].bias
    expected = (text @ decoder.film_mul.weight.T + decoder.film_mul.bias)[:, None] * reduced + (
        text @ decoder.film_add.weight.T + decoder.film_add.bias
    )[:, None]
    torch.testing.assert_close(entering[0], expected)


# --- sizes and initialisation ------------------------------------------------------------------------
def paper_dims() -> ModelDims:
    """ViT-L/14-336 (from open_clip's config, no weights) under a 4096-wide LLM."""
    vision = VisionShape.from_architecture(VisionConfig(name="ViT-L-14-336", weights=None).architecture())
    llm = LLMShape(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
                   intermediate_size=11008)
    return ModelDims(llm=llm, vision_width=vision.width, vision_depth=vision.depth, vision_grid=vision.grid,
                     vision_patch=vision.patch_size)


@pytest.mark.parametrize("decoder, parameters", [("clipseg", 1_620_642), ("cnn", 44_833_794)])
def test_parameter_counts_at_vit_l14_336_and_a_4096_wide_llm_match_the_release(decoder: str, parameters: int):
    dims = paper_dims()
    assert (dims.vision_width, dims.vision_grid, dims.vision_patch) == (1024, 24, 14)
    with torch.device("meta"):
        segmentation = ReferringSegmentation(dims, vision_blocks=(18, 12, 6), decoder=decoder, loss="ce")
    assert sum(p.numel() for p in segmentation.parameters()) == parameters


def test_clipseg_layers_start_from_clip_initialisation():
    torch.manual_seed(0)
    width, depth = 256, 3
    decoder = CLIPSegDecoder(TEXT_DIM, TOKEN_WIDTH, grid=2, levels=depth, width=width, num_logits=2, patch=14)
    expected = {"q/k/v": width**-0.5 * (2 * depth) ** -0.5, "out": width**-0.5, "mlp in": (2 * width) ** -0.5,
                "mlp out": width**-0.5 * (2 * depth) ** -0.5}
    for layer in decoder.layers:
        weights = {"q/k/v": layer.self_attn.in_proj_weight, "out": layer.self_attn.out_proj.weight,
                   "mlp in": layer.linear1.weight, "mlp out": layer.linear2.weight}
        for name, weight in weights.items():
            assert weight.std().item() == pytest.approx(expected[name], rel=0.05), name
            assert weight.mean().abs().item() < 0.1 * expected[name], name
        assert layer.norm1.eps == layer.norm2.eps == 1e-6
        assert torch.equal(layer.norm1.weight, torch.ones(width)) and not layer.norm2.bias.any()
    biases = [parameter for name, parameter in decoder.named_parameters()
              if name.endswith("bias") and not name.startswith("upsample.")]  # convolutions keep PyTorch's
    assert biases and not any(bias.any() for bias in biases)


def test_decoder_settings_that_cannot_work_are_clear_errors():
    with pytest.raises(UserError, match="not divisible by its 6 heads"):
        head("clipseg", width=64, heads=6)
    with pytest.raises(UserError, match="patch of 4 pixels or more"):
        head("clipseg", patch=2)
    with pytest.raises(UserError, match="decoder must be one of film, clipseg, cnn; got 'unet'"):
        head("unet")
    with pytest.raises(UserError, match="upsampled size"):
        head("cnn", cnn_size=0)


def test_unset_width_takes_each_decoders_release_width():
    dims = small_dims(2, 14)
    heads = {name: ReferringSegmentation(dims, vision_blocks=BLOCKS, decoder=name) for name in ("clipseg", "cnn")}
    assert heads["clipseg"].decoder.reductions[0].out_features == 64
    assert heads["cnn"].decoder.classifier.in_channels == 512


# --- in the whole model ------------------------------------------------------------------------------
@pytest.mark.parametrize("decoder", ["clipseg", "cnn"])
def test_a_training_step_sends_gradients_only_to_the_decoder_and_the_infusion(decoder: str):
    module = MiTModule(
        head=partial(ReferringSegmentation, vision_blocks=(4, 2), decoder=decoder, width=16, heads=2, mlp_width=32,
                     cnn_size=16, loss="ce"),
        llm=LLMConfig(path="tiny", dtype="float32"),
        vision=VisionConfig(name="tiny", weights=None, dtype="float32"),
        fusion=partial(MiT, layers=[2, 4]),
    )
    module.build(DataSpec())
    generator = torch.Generator().manual_seed(0)
    batch = {
        "prompt": ["the red circle", "the small blue square on the left"],
        "index": torch.arange(2),
        "image": torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=generator),
        "mask": (torch.rand(2, 32, 32, generator=generator) > 0.5).to(torch.uint8),
    }
    module.training_step(batch, 0).backward()
    names = set()
    for name, parameter in module.named_parameters():
        if is_trainable_key(name):  # gated infusion starts as the identity: some of its gradients start at 0
            assert parameter.grad is not None and (parameter.grad.abs().sum() > 0 or name.startswith("fusion.")), name
            names.add(name.split(".", 1)[0])
        else:
            assert not parameter.requires_grad and parameter.grad is None, name
    assert names == {"fusion", "head"}


# --- the release recipe's switches, against their definitions -----------------------------------------
def test_clipseg_init_scaled_by_the_clip_encoders_depth_as_the_release():
    torch.manual_seed(0)
    width = 64
    decoder = CLIPSegDecoder(TEXT_DIM, TOKEN_WIDTH, grid=2, levels=3, width=width, num_logits=2, patch=14, init_depth=24)
    residual = width**-0.5 * (2 * 24) ** -0.5  # 0.018 (with the decoder's 3 layers: 0.051)
    assert residual == pytest.approx(0.018, abs=5e-4)
    for layer in decoder.layers:
        assert layer.self_attn.in_proj_weight.std().item() == pytest.approx(residual, rel=0.05)
        assert layer.linear2.weight.std().item() == pytest.approx(residual, rel=0.05)
    # the head passes the vision tower's depth (3 in these dims) only when asked
    torch.manual_seed(0)
    one_level = partial(ReferringSegmentation, small_dims(3, 14), vision_blocks=(3,), decoder="clipseg", width=64,
                        heads=4, mlp_width=4096, loss="ce")
    vision = one_level(clipseg_init_depth="vision").decoder.layers[0].linear2.weight.std().item()
    own = one_level().decoder.layers[0].linear2.weight.std().item()
    assert (vision, own) == (pytest.approx(64**-0.5 * 6**-0.5, rel=0.05), pytest.approx(64**-0.5 * 2**-0.5, rel=0.05))


def cross_entropy_by_definition(logits: torch.Tensor, target: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Σ_i w_{y_i} · (log Σ_c e^{z_ic} − z_{i y_i}) / Σ_i w_{y_i}, pixel by pixel."""
    total, norm = 0.0, 0.0
    for z, y in zip(logits.permute(0, 2, 3, 1).reshape(-1, 2).tolist(), target.flatten().tolist()):
        w = weights[int(y)]
        total += w * (math.log(math.exp(z[0]) + math.exp(z[1])) - z[int(y)])
        norm += w
    return torch.tensor(total / norm)


def bilinear_align_corners(image: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of (..., h, w) to size × size where output pixel i samples input coordinate
    i · (n − 1) / (size − 1): the corners of input and output coincide (align_corners=True)."""
    def along(x: torch.Tensor, dim: int) -> torch.Tensor:
        n = x.shape[dim]
        rows = []
        for i in range(size):
            position = i * (n - 1) / (size - 1)
            low = min(int(math.floor(position)), n - 2)
            fraction = position - low
            rows.append(x.select(dim, low) * (1 - fraction) + x.select(dim, low + 1) * fraction)
        return torch.stack(rows, dim=dim)
    return along(along(image, -2), -1)


def test_the_release_losss_class_weights_and_corner_aligned_resize_match_their_definitions():
    generator = torch.Generator().manual_seed(3)
    output = torch.randn(2, 2, 3, 3, generator=generator)  # decoder logits at 3 × 3
    target = torch.rand(2, 7, 7, generator=generator) > 0.6  # masks at 7 × 7
    weights = [0.9, 1.1]
    release = head("clipseg", class_weights=weights, align_corners=True)
    expected = cross_entropy_by_definition(bilinear_align_corners(output, 7), target, weights)
    torch.testing.assert_close(release.loss(output, {"mask": target}), expected, atol=1e-5, rtol=1e-5)
    # the switches matter: unweighted, or resized without aligned corners, the loss differs
    assert abs(head("clipseg", align_corners=True).loss(output, {"mask": target}) - expected) > 1e-4
    assert abs(head("clipseg", class_weights=weights).loss(output, {"mask": target}) - expected) > 1e-4
    # masks are decided on the same corner-aligned logits
    upsampled = bilinear_align_corners(output, 7)
    assert torch.equal(release.masks(output, target), upsampled[:, 1] > upsampled[:, 0])


def test_the_cnn_decoder_resizes_with_aligned_corners_when_asked():
    torch.manual_seed(0)
    text, inputs = features(grid=3)
    aligned = head("cnn", align_corners=True)
    assert aligned.decoder.align_corners
    unaligned = head("cnn")
    unaligned.load_state_dict(aligned.state_dict())
    aligned.eval(), unaligned.eval()
    assert (aligned(text, inputs) - unaligned(text, inputs)).abs().max() > 1e-4


def test_class_weights_need_the_two_class_loss():
    with pytest.raises(UserError, match=r"class_weights \[0.9, 1.1\] need loss: ce and two positive weights"):
        head("clipseg", loss="dice", class_weights=[0.9, 1.1])
    with pytest.raises(UserError, match="two positive weights"):
        head("clipseg", class_weights=[1.0])
