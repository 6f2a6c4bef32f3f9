"""The token-based peers (token concatenation, PILL, ModeX, LoRA on them) on the tiny backbones.

What is checked: each method's identity at initialisation against token concatenation with the same
projector, its formulas against hand-written ones, gradients reaching only its own parameters,
modality frames read as tokens with their padding masked, and clear errors for what makes no sense.
"""

from __future__ import annotations

import copy

import pytest
import torch

from mit_lightning.backbones.llm import FrozenLLM, LLMConfig
from mit_lightning.backbones.lora import LoRA
from mit_lightning.backbones.taps import PAYLOAD_KWARG, TapPayload, tap_layer
from mit_lightning.errors import UserError
from mit_lightning.fusion import PILL, FusionInputs, ModelDims, ModeX, TokenConcat
from mit_lightning.fusion.modex import MECAdapter
from mit_lightning.fusion.pill import PILLPayload

PROMPTS = ["the red circle", "Segment the small blue square on the left according to the text. #Segmentation:"]
FAMILIES = ["tiny", "tiny-mistral", "tiny-qwen2"]


def fresh_llm(preset: str = "tiny") -> FrozenLLM:
    return FrozenLLM(LLMConfig(path=preset, dtype="float32"))


def vision_dims(llm: FrozenLLM, clip) -> ModelDims:
    return ModelDims(
        llm=llm.shape, vectors={"image": clip.shape.embed_dim}, vision_width=clip.shape.width,
        vision_depth=clip.shape.depth, vision_grid=clip.shape.grid,
    )


def image_inputs(clip, blocks, batch: int = 2, seed: int = 0) -> FusionInputs:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, 64, 64), dtype=torch.uint8, generator=generator)
    vision = clip(images, blocks=blocks)
    return FusionInputs(vectors={"image": vision.embedding}, vision_tokens=vision.tokens)


def perturb(parameters, scale: float = 0.2, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in parameters:
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


class HiddenStates:
    """Records the frozen LLM's final hidden states (every position) of each call."""

    def __init__(self, llm: FrozenLLM) -> None:
        self.calls: list[torch.Tensor] = []
        self.handle = llm.register_forward_hook(lambda _module, _args, output: self.calls.append(output))

    def run(self, fusion, llm, ids, mask, inputs) -> torch.Tensor:
        fusion(llm, ids, mask, inputs)
        return self.calls.pop()


def concat_like(llm: FrozenLLM, clip, fusion) -> TokenConcat:
    """Token concatenation with exactly `fusion`'s projector (a linear one without bias: bias set to 0)."""
    kind = "linear" if isinstance(fusion.tokens.projectors["image"], torch.nn.Linear) else "mlp"
    concat = TokenConcat(vision_dims(llm, clip), projector=kind)
    with torch.no_grad():
        for name, parameter in concat.tokens.named_parameters():
            source = dict(fusion.tokens.named_parameters()).get(name)
            parameter.copy_(source if source is not None else torch.zeros_like(parameter))
    return concat


# --- identity at initialisation ------------------------------------------------------------------
@pytest.mark.parametrize(
    "preset, method",
    [*((preset, "modex") for preset in FAMILIES), ("tiny", "pill_stage1"), ("tiny", "lora")],
)
def test_fresh_method_equals_token_concatenation_with_its_projector(tiny_clip, preset, method):
    """ModeX (zero ups), PILL without MAG (zero W_up) and LoRA (B = 0) change nothing at the start."""
    llm = fresh_llm(preset)
    dims = vision_dims(llm, tiny_clip)
    fusion = {
        "modex": lambda: ModeX(dims, rank=8),
        "pill_stage1": lambda: PILL(dims, stage=1, rank=8),
        "lora": lambda: TokenConcat(dims, projector="mlp", lora=LoRA(rank=4, target_modules=["q_proj", "v_proj", "o_proj"])),
    }[method]()
    concat = concat_like(llm, tiny_clip, fusion)
    ids, mask = llm.tokenize(PROMPTS, "cpu")
    inputs = image_inputs(tiny_clip, fusion.vision_blocks)
    hidden = HiddenStates(llm)
    expected = hidden.run(concat, llm, ids, mask, inputs)
    fusion.attach(llm)
    torch.testing.assert_close(hidden.run(fusion, llm, ids, mask, inputs), expected, rtol=0, atol=1e-5)
    # the method really acts once its zero-initialised parts move
    perturb([p for name, p in [*fusion.named_parameters(), *llm.named_parameters()] if p.requires_grad
             and not name.startswith("tokens.")])
    moved = hidden.run(fusion, llm, ids, mask, inputs)
    assert (moved - expected)[:, -ids.shape[1]:].abs().max() > 1e-3  # text positions changed
    fusion.detach()
    torch.testing.assert_close(hidden.run(concat, llm, ids, mask, inputs), expected, rtol=0, atol=0)


def zero_modality_values(count: int):
    def transform(key, value, _payload):
        value = value.clone()
        value[:, :, :count] = 0.0
        return key, value

    return transform


@pytest.mark.parametrize("preset", FAMILIES)
def test_fresh_pill_stage2_is_token_concatenation_with_the_modality_values_gated_shut(tiny_clip, preset):
    """W_up = 0 and W_g = 0: the adapters add nothing and tanh(0) = 0 zeroes every modality value."""
    llm = fresh_llm(preset)
    pill = PILL(vision_dims(llm, tiny_clip), stage=2, rank=8)
    concat = concat_like(llm, tiny_clip, pill)
    ids, mask = llm.tokenize(PROMPTS, "cpu")
    inputs = image_inputs(tiny_clip, pill.vision_blocks)
    patches = tiny_clip.shape.grid**2
    embeds = torch.cat([concat.tokens(inputs, torch.float32)[0], llm.embed(ids)], dim=1)
    full_mask = torch.cat([mask.new_ones(2, patches), mask], dim=1)
    taps = [tap_layer(llm.model, index, kv=zero_modality_values(patches)) for index in range(llm.shape.num_layers)]
    expected = llm(full_mask, inputs_embeds=embeds, **{PAYLOAD_KWARG: TapPayload()})
    for tap in taps:
        tap.remove()
    plain = llm(full_mask, inputs_embeds=embeds)
    assert (expected - plain).abs().max() > 1e-3  # gating the values shut is not nothing
    pill.attach(llm)
    torch.testing.assert_close(HiddenStates(llm).run(pill, llm, ids, mask, inputs), expected, rtol=0, atol=1e-5)


# --- the formulas ---------------------------------------------------------------------------------
def test_pill_mag_scales_only_modality_values_per_head_by_tanh_of_the_gate(tiny_llm_factory, tiny_clip):
    llm = tiny_llm_factory(key="pill-mag")
    layer = PILL(vision_dims(llm, tiny_clip), rank=4).layers[1]
    perturb(layer.parameters(), scale=1.0)
    batch, length, heads, head_dim = 2, 5, llm.shape.num_kv_heads, llm.shape.head_dim
    modality = torch.tensor([True, True, True, False, False]).expand(batch, length)
    payload = PILLPayload(modality=modality)
    attention_input = torch.randn(batch, length, llm.shape.hidden_size)
    adapted = layer.adapt_attention_input(attention_input, payload)
    key, value = torch.randn(batch, heads, length, head_dim), torch.randn(batch, heads, length, head_dim)
    new_key, new_value = layer.gate_modality_values(key, value, payload)
    assert torch.equal(new_key, key) and torch.equal(new_value[:, :, 3:], value[:, :, 3:])
    gate = torch.tanh(adapted @ layer.gate.weight.T)  # (B, L, H): W_g u'
    for head in range(heads):
        torch.testing.assert_close(new_value[:, head, :3], gate[:, :3, head, None] * value[:, head, :3])
    assert payload.attention_inputs == {}  # handed over, not kept for the rest of the call


def test_pill_momae_routes_modality_and_text_positions_to_their_own_adapter(tiny_llm_factory, tiny_clip):
    llm = tiny_llm_factory(key="pill-momae")
    layer = PILL(vision_dims(llm, tiny_clip), rank=4).layers[0]
    perturb(layer.parameters(), scale=1.0)
    hidden = torch.randn(2, 6, llm.shape.hidden_size)
    modality = torch.tensor([[True, True, False, False, False, False], [True, True, False, False, False, False]])
    routed = layer.route_mlp_input(hidden, PILLPayload(modality=modality))

    def swiglu(adapter, z):
        return (torch.nn.functional.silu(z @ adapter.gate.weight.T) * (z @ adapter.down.weight.T)) @ adapter.up.weight.T

    torch.testing.assert_close(routed[:, :2], hidden[:, :2] + swiglu(layer.visual_adapter, hidden[:, :2]))
    torch.testing.assert_close(routed[:, 2:], hidden[:, 2:] + swiglu(layer.text_adapter, hidden[:, 2:]))


def test_pill_adapters_start_as_the_paper_says(tiny_llm_factory, tiny_clip):
    pill = PILL(vision_dims(tiny_llm_factory(key="pill-init"), tiny_clip), rank=32)
    layer = pill.layers[0]
    assert torch.count_nonzero(layer.gate.weight) == 0 and layer.gate.bias is None
    for adapter in (layer.attention_adapter, layer.visual_adapter, layer.text_adapter):
        assert torch.count_nonzero(adapter.up.weight) == 0
        assert abs(adapter.down.weight.std().item() - 0.02) < 0.003
        assert all(part.bias is None for part in (adapter.gate, adapter.down, adapter.up))
    assert pill.tokens.projectors["image"].bias is None  # Linear(C → d) without bias


def test_pill_stage1_flips_the_last_layers_routing_only(tiny_llm_factory, tiny_clip):
    llm = tiny_llm_factory(key="pill-flip")
    dims = vision_dims(llm, tiny_clip)
    last = llm.shape.num_layers - 1
    assert [layer.flipped for layer in PILL(dims, stage=1, rank=4).layers] == [False] * last + [True]
    assert not any(layer.flipped for layer in PILL(dims, stage=2, rank=4).layers)
    assert not any(layer.flipped for layer in PILL(dims, stage=1, rank=4, flip_last_routing=False).layers)
    layer = PILL(dims, stage=1, rank=4).layers[last]
    perturb(layer.parameters(), scale=1.0)
    hidden = torch.randn(1, 4, llm.shape.hidden_size)
    modality = torch.tensor([[True, False, False, False]])
    routed = layer.route_mlp_input(hidden, PILLPayload(modality=modality))
    # which adapter a token went through: the two differ by O(1) here, float rounding (the adapters run on the
    # whole sequence, not on the slice) by about 1e-5
    close = dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(routed[:, 1:], hidden[:, 1:] + layer.visual_adapter(hidden[:, 1:]), **close)  # text → A_vis
    torch.testing.assert_close(routed[:, :1], hidden[:, :1] + layer.text_adapter(hidden[:, :1]), **close)
    assert (layer.visual_adapter(hidden) - layer.text_adapter(hidden)).norm(dim=-1).min() > 1e-2


@pytest.mark.parametrize("method", ["concat_3_tokens", "pill_3_tokens", "modex_3_tokens"])
def test_a_token_budget_gives_the_llm_that_many_modality_tokens(tiny_clip, method):
    llm = fresh_llm()
    fusion = METHODS[method](vision_dims(llm, tiny_clip))
    fusion.attach(llm)
    ids, mask = llm.tokenize(PROMPTS, "cpu")
    inputs = image_inputs(tiny_clip, fusion.vision_blocks)
    patches = inputs.vision_tokens[fusion.vision_blocks[0]].shape[1]
    states = HiddenStates(llm).run(fusion, llm, ids, mask, inputs)
    assert patches > 3 and states.shape[1] == 3 + ids.shape[1]  # 3 modality tokens, not every patch
    resampler = fusion.tokens.resamplers["image"]
    assert resampler.queries.shape == (3, tiny_clip.shape.width)  # in CLIP's width, before the projector
    # the queries attend to every patch: changing one patch changes the tokens
    changed = copy.deepcopy(inputs)
    changed.vision_tokens[fusion.vision_blocks[0]][:, -1] += 1.0
    assert (fusion(llm, ids, mask, changed) - fusion(llm, ids, mask, inputs)).abs().max() > 0
    fusion.detach()


def test_the_resampler_masks_a_source_without_real_tokens():
    from mit_lightning.fusion.tokens import Resampler

    resampler = Resampler(width=8, tokens=2)
    features = torch.randn(2, 4, 8)
    mask = torch.tensor([[True, True, False, False], [False, False, False, False]])
    tokens, token_mask = resampler(features, mask)
    assert tokens.shape == (2, 2, 8) and torch.isfinite(tokens).all()
    assert token_mask.tolist() == [[True, True], [False, False]]
    alone, _ = resampler(features[:1, :2], mask[:1, :2])
    torch.testing.assert_close(tokens[:1], alone)  # padding is not attended to


def test_mec_adapter_is_the_routed_sum_of_three_experts_ups():
    torch.manual_seed(0)
    adapter = MECAdapter(width=12, rank=4)
    perturb(adapter.parameters(), scale=0.5)
    z = torch.randn(2, 5, 12)
    routing = torch.softmax((z @ adapter.router.weight.T + adapter.router.bias) / 10.0, dim=-1)
    shared = torch.relu(z @ adapter.down.weight.T + adapter.down.bias)
    expected = z.clone()
    for expert in range(3):
        up = adapter.ups.weight[:, expert * 4:(expert + 1) * 4]  # W_u^e
        expected = expected + routing[..., expert, None] * (shared @ up.T + adapter.up_biases[expert])
    torch.testing.assert_close(adapter(z), expected)
    fresh = MECAdapter(width=12, rank=4)
    assert torch.equal(fresh(z), z)  # zero ups: the identity


# --- gradients --------------------------------------------------------------------------------------
METHODS = {
    "concat": lambda dims: TokenConcat(dims),
    "concat_lora": lambda dims: TokenConcat(dims, lora=LoRA(rank=4)),
    "pill_stage1": lambda dims: PILL(dims, stage=1, rank=4),
    "pill_stage1_unflipped": lambda dims: PILL(dims, stage=1, rank=4, flip_last_routing=False),
    "pill_stage2": lambda dims: PILL(dims, stage=2, rank=4),
    "modex": lambda dims: ModeX(dims, rank=4),
    "concat_3_tokens": lambda dims: TokenConcat(dims, tokens=3),
    "pill_3_tokens": lambda dims: PILL(dims, stage=2, rank=4, tokens=3),
    "modex_3_tokens": lambda dims: ModeX(dims, rank=4, tokens=3),
}


@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_exactly_the_methods_trainable_parameters(tiny_clip, method):
    torch.manual_seed(0)  # initial weights independent of the tests run before
    llm = fresh_llm()
    fusion = METHODS[method](vision_dims(llm, tiny_clip))
    fusion.attach(llm)
    own = {f"fusion.{name}": p for name, p in fusion.named_parameters()}
    lora = {f"llm.{name}": p for name, p in llm.named_parameters() if p.requires_grad}
    trainable = {name: p for name, p in {**own, **lora}.items() if p.requires_grad}
    perturb(trainable.values(), scale=0.1)  # zero-initialised parts would pass zero gradients on
    ids, mask = llm.tokenize(PROMPTS, "cpu")
    fusion(llm, ids, mask, image_inputs(tiny_clip, fusion.vision_blocks)).square().sum().backward()
    assert all(p.grad is not None for p in trainable.values())
    # the last layer's A_vis changes only modality positions after the last attention: never the text feature,
    # unless stage 1 flips the last layer's routing as the release does (text through A_vis)
    last_visual_adapter = f"fusion.layers.{llm.shape.num_layers - 1}.visual_adapter."
    unreached = {name for name, p in trainable.items() if p.grad.abs().sum() == 0}
    flipped = method == "pill_stage1"
    assert unreached == {name for name in trainable if name.startswith(last_visual_adapter) and not flipped}
    assert all(p.grad is None for name, p in {**own, **dict(llm.named_parameters(prefix="llm"))}.items()
               if name not in trainable)
    assert all(".lora_" in name for name in lora) and bool(lora) == (method == "concat_lora")
    if method.startswith("pill_stage1"):  # A_vis and the projector only
        assert {name.split(".")[3] for name in trainable if name.startswith("fusion.layers.")} == {"visual_adapter"}
        assert any(name.startswith("fusion.tokens.") for name in trainable)


# --- modality frames as tokens (sentiment) -------------------------------------------------------
def sequence_inputs(lengths: dict[str, list[int]], sizes: dict[str, int], steps: int = 6, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    sequences, masks = {}, {}
    for name, size in sizes.items():
        masks[name] = torch.arange(steps)[None, :] < torch.tensor(lengths[name])[:, None]
        sequences[name] = torch.randn(len(lengths[name]), steps, size, generator=generator)
    return FusionInputs(vectors={}, sequences=sequences, sequence_masks=masks)


@pytest.mark.parametrize("method", ["concat", "pill_stage2", "modex", "concat_3_tokens", "pill_3_tokens"])
def test_frames_are_tokens_whose_padding_changes_nothing(tiny_llm_factory, method):
    llm = tiny_llm_factory(key=f"frames-{method}")
    sizes = {"audio": 5, "facial": 7}
    dims = ModelDims(llm=llm.shape, vectors={"audio": 16, "facial": 16}, sequences=sizes)
    fusion = METHODS[method](dims)
    perturb([p for p in fusion.parameters()], scale=0.1)
    fusion.attach(llm)
    assert fusion.vision_blocks == () and list(fusion.tokens.projectors) == ["audio", "facial"]
    ids, mask = llm.tokenize(PROMPTS, "cpu")
    inputs = sequence_inputs({"audio": [2, 6], "facial": [6, 3]}, sizes)
    batched = fusion(llm, ids, mask, inputs)
    garbage = copy.deepcopy(inputs)
    for name in sizes:
        garbage.sequences[name][~garbage.sequence_masks[name]] = float("inf")
    torch.testing.assert_close(fusion(llm, ids, mask, garbage), batched, rtol=0, atol=0)
    # the first sample alone, without any padding, gives the same feature
    alone_ids, alone_mask = llm.tokenize(PROMPTS[:1], "cpu")
    alone = FusionInputs(
        vectors={}, sequences={"audio": inputs.sequences["audio"][:1, :2], "facial": inputs.sequences["facial"][:1]},
        sequence_masks={"audio": torch.ones(1, 2, dtype=torch.bool), "facial": torch.ones(1, 6, dtype=torch.bool)},
    )
    torch.testing.assert_close(fusion(llm, alone_ids, alone_mask, alone), batched[:1], atol=1e-5, rtol=1e-5)
    fusion.detach()


# --- copies ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["pill_stage2", "modex", "concat_lora"])
def test_a_deep_copy_runs_with_its_own_weights(tiny_clip, method):
    llm = fresh_llm()
    fusion = METHODS[method](vision_dims(llm, tiny_clip))
    fusion.attach(llm)
    perturb([p for p in [*fusion.parameters(), *llm.parameters()] if p.requires_grad], scale=0.1)
    ids, mask = llm.tokenize(PROMPTS, "cpu")
    inputs = image_inputs(tiny_clip, fusion.vision_blocks)
    before = fusion(llm, ids, mask, inputs)
    llm_copy, fusion_copy = copy.deepcopy((llm, fusion))
    torch.testing.assert_close(fusion_copy(llm_copy, ids, mask, inputs), before, rtol=0, atol=0)
    perturb([p for p in [*fusion_copy.parameters(), *llm_copy.parameters()] if p.requires_grad], scale=0.5, seed=7)
    assert (fusion_copy(llm_copy, ids, mask, inputs) - before).abs().max() > 1e-3
    torch.testing.assert_close(fusion(llm, ids, mask, inputs), before, rtol=0, atol=0)


# --- what makes no sense ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["concat", "pill_stage2", "modex"])
def test_a_token_method_without_any_token_source_is_refused(tiny_llm_factory, method):
    with pytest.raises(UserError, match="as tokens, but this model has none"):
        METHODS[method](ModelDims(llm=tiny_llm_factory().shape))


def test_nonsense_settings_are_refused_with_a_clear_message(tiny_llm_factory, tiny_clip):
    dims = vision_dims(tiny_llm_factory(), tiny_clip)
    with pytest.raises(UserError, match="ModeX rank must be a positive integer"):
        ModeX(dims, rank=0)
    with pytest.raises(UserError, match="PILL stage must be one of 1, 2; got 3"):
        PILL(dims, stage=3)
    with pytest.raises(UserError, match="PILL adapter rank"):
        PILL(dims, rank=-1)
    with pytest.raises(UserError, match=r"modalities \['audio'\] give no tokens"):
        TokenConcat(dims, modalities=["audio"])
    with pytest.raises(UserError, match="vision_block 9 is outside"):
        ModeX(dims, vision_block=9)
    with pytest.raises(UserError, match="projector must be one of linear, mlp; got 'qformer'"):
        PILL(dims, projector="qformer")
    with pytest.raises(UserError, match="LoRA rank must be a positive integer"):
        LoRA(rank=0)
    with pytest.raises(UserError, match="PILL token budget must be a positive number"):
        PILL(dims, tokens=0)


def test_lora_on_layers_the_llm_does_not_have_names_the_ones_it_has(tiny_clip):
    llm = fresh_llm()
    concat = TokenConcat(vision_dims(llm, tiny_clip), lora=LoRA(target_modules=["query", "value"]))
    with pytest.raises(UserError, match=r"do not match the LLM's layers.*'q_proj'"):
        concat.attach(llm)


# --- activation checkpointing ----------------------------------------------------------------------
@pytest.mark.parametrize("method", ["pill_stage2", "modex"])
def test_recomputed_layers_see_their_payload_again(tiny_clip, method):
    """With activation checkpointing the layers run again in backward: same gradients as without."""
    gradients = []
    for checkpointing in (False, True):
        llm = FrozenLLM(LLMConfig(path="tiny", dtype="float32", activation_checkpointing=checkpointing)).train()
        torch.manual_seed(0)
        fusion = METHODS[method](vision_dims(llm, tiny_clip))
        perturb(fusion.parameters(), scale=0.1)
        fusion.attach(llm)
        ids, mask = llm.tokenize(PROMPTS, "cpu")
        fusion(llm, ids, mask, image_inputs(tiny_clip, fusion.vision_blocks)).square().sum().backward()
        gradients.append({name: p.grad for name, p in fusion.named_parameters()})
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, atol=1e-5, rtol=1e-4)
