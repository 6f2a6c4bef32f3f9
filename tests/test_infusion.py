"""MiT infusion (Eq. 1–7) on tiny LLaMA-family decoders, through transformers' extension points."""

from __future__ import annotations

import math
from typing import get_args

import pytest
import torch

from mit_lightning.backbones.llm import FrozenLLM, LLMConfig, last_token
from mit_lightning.errors import UserError
from mit_lightning.fusion import FusionInputs, MiT, ModelDims, TextOnly
from mit_lightning.backbones.llm import LLMShape
from mit_lightning.fusion.mit import Form, InfusionLayer, InfusionPayload, head_cosine

PROMPTS = ["the red circle", "Segment the small blue square on the left according to the text. #Segmentation:"]
FAMILIES = ["tiny", "tiny-mistral", "tiny-qwen2"]


def fresh_llm(preset: str = "tiny", attention: str = "sdpa") -> FrozenLLM:
    return FrozenLLM(LLMConfig(path=preset, dtype="float32", attention=attention))


def vectors(batch: int = 2, size: int = 24, seed: int = 0) -> FusionInputs:
    generator = torch.Generator().manual_seed(seed)
    return FusionInputs(vectors={"image": torch.randn(batch, size, generator=generator)})


def mit_for(llm: FrozenLLM, **kwargs) -> MiT:
    mit = MiT(ModelDims(llm=llm.shape, vectors={"image": 24}), **kwargs)
    mit.attach(llm)
    return mit


def perturb(module: torch.nn.Module, scale: float = 0.2, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("preset", FAMILIES)
def test_fresh_infusion_is_the_identity(preset, attention):
    llm = fresh_llm(preset, attention)
    ids, mask = llm.tokenize(PROMPTS, "cpu")
    frozen = last_token(llm(mask, input_ids=ids), mask)
    mit = mit_for(llm, layers=[1, 3, 4])
    infused = mit(llm, ids, mask, vectors())
    torch.testing.assert_close(infused, frozen, rtol=0, atol=1e-6)
    # and the hooks really run: moving the parameters changes the output
    perturb(mit)
    assert (mit(llm, ids, mask, vectors()) - frozen).abs().max() > 1e-2


@pytest.mark.parametrize("part", ["key_maps", "value_maps", "ffn_map"])
def test_each_infused_part_changes_outputs_once_it_moves(part):
    llm = fresh_llm()
    ids, mask = llm.tokenize(PROMPTS, "cpu")
    mit = mit_for(llm, layers=[2])
    before = mit(llm, ids, mask, vectors())
    perturb(getattr(mit.infusions["2"], part))
    after = mit(llm, ids, mask, vectors())
    assert (after - before).abs().max() > 1e-3


def test_different_images_give_different_text_features_after_training_moves_the_maps():
    llm = fresh_llm()
    ids, mask = llm.tokenize(PROMPTS[:1] * 2, "cpu")
    mit = mit_for(llm, layers=[4])
    perturb(mit)
    features = mit(llm, ids, mask, vectors(seed=3))
    assert (features[0] - features[1]).abs().max() > 1e-3  # same text, different image vectors


def test_literal_paper_and_release_forms_are_not_the_identity_at_init():
    llm = fresh_llm()
    ids, mask = llm.tokenize(PROMPTS, "cpu")
    frozen = last_token(llm(mask, input_ids=ids), mask)
    paper = mit_for(llm, layers=[2], form="paper")
    assert (paper(llm, ids, mask, vectors()) - frozen).abs().max() > 1e-4
    paper.detach()
    release = mit_for(llm, layers=[2], form="release")
    assert release.infusions["2"].key_maps.weight.abs().sum() > 0  # PyTorch default init
    assert (release(llm, ids, mask, vectors()) - frozen).abs().max() > 1e-4


def test_head_rescaling_gates_the_change():
    """With the maps moved, the per-head vector L scales how much of the change passes (Eq. 4–5)."""
    llm = fresh_llm()
    ids, mask = llm.tokenize(PROMPTS, "cpu")
    mit = mit_for(llm, layers=[2], ffn=False)
    frozen = mit(llm, ids, mask, vectors())
    perturb(mit.infusions["2"].key_maps)
    perturb(mit.infusions["2"].value_maps)
    with torch.no_grad():
        mit.infusions["2"].head_scale.fill_(-30.0)  # σ ≈ 0: nothing passes
    closed = mit(llm, ids, mask, vectors())
    torch.testing.assert_close(closed, frozen, atol=1e-5, rtol=0)
    with torch.no_grad():
        mit.infusions["2"].head_scale.fill_(30.0)  # σ ≈ 1: the full change passes
    assert (mit(llm, ids, mask, vectors()) - frozen).abs().max() > 1e-3


def test_gradients_reach_only_the_infusion_parameters():
    llm = fresh_llm()
    ids, mask = llm.tokenize(PROMPTS, "cpu")
    mit = mit_for(llm, layers=[2, 4])
    perturb(mit, scale=0.05)
    mit(llm, ids, mask, vectors()).square().sum().backward()
    assert all(parameter.grad is None for parameter in llm.parameters())
    assert all(not parameter.requires_grad for parameter in llm.parameters())
    for name, parameter in mit.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_layers_below_the_first_infused_layer_build_no_autograd_graph():
    llm = fresh_llm()
    ids, mask = llm.tokenize(PROMPTS, "cpu")
    mit = mit_for(llm, layers=[3])
    seen = {}
    hooks = [
        layer.register_forward_hook(lambda module, args, output, i=i: seen.__setitem__(i, output.requires_grad))
        for i, layer in enumerate(llm.layers)
    ]
    mit(llm, ids, mask, vectors())
    for hook in hooks:
        hook.remove()
    assert seen == {0: False, 1: False, 2: True, 3: True}


def test_padding_mask_is_kept_by_the_tapped_attention():
    """A sample's feature is the same alone or padded in a batch (left or right): the mask reaches the kernel."""
    llm = fresh_llm()
    mit = mit_for(llm, layers=[1, 4])
    perturb(mit)
    inputs = vectors()
    ids, mask = llm.tokenize(PROMPTS, "cpu")
    batched = mit(llm, ids, mask, inputs)
    alone_ids, alone_mask = llm.tokenize(PROMPTS[:1], "cpu")
    alone = mit(llm, alone_ids, alone_mask, FusionInputs(vectors={"image": inputs.vectors["image"][:1]}))
    assert mask[0].sum() < mask.shape[1]  # the first prompt really is padded
    torch.testing.assert_close(batched[:1], alone, atol=1e-5, rtol=1e-5)
    llm.tokenizer.padding_side = "left"
    left_ids, left_mask = llm.tokenize(PROMPTS, "cpu")
    llm.tokenizer.padding_side = "right"
    torch.testing.assert_close(mit(llm, left_ids, left_mask, inputs), batched, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_sees_the_infusion_again():
    llm = fresh_llm()
    ids, mask = llm.tokenize(PROMPTS, "cpu")
    mit = mit_for(llm, layers=[2, 4])
    perturb(mit, scale=0.05)

    calls = []
    llm.layers[3].mlp.down_proj.register_forward_pre_hook(lambda module, args: calls.append(1))

    def gradients() -> dict[str, torch.Tensor]:
        mit.zero_grad()
        calls.clear()
        mit(llm, ids, mask, vectors()).square().sum().backward()
        return {name: parameter.grad.clone() for name, parameter in mit.named_parameters()}

    plain = gradients()
    assert len(calls) == 1
    if hasattr(llm.model, "activation_checkpointing_enable"):
        llm.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        llm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for module in llm.model.modules():
        module.training = True  # HF checkpoints only in training mode; the tiny model has no dropout
    checkpointed = gradients()
    assert len(calls) == 2  # the layer really was recomputed during backward
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


def test_text_only_calls_after_attaching_are_untouched():
    llm = fresh_llm()
    ids, mask = llm.tokenize(PROMPTS, "cpu")
    plain = TextOnly(ModelDims(llm=llm.shape))(llm, ids, mask, FusionInputs(vectors={}))
    mit = mit_for(llm, layers=[2])
    perturb(mit)
    mit(llm, ids, mask, vectors())
    torch.testing.assert_close(TextOnly(ModelDims(llm=llm.shape))(llm, ids, mask, FusionInputs(vectors={})), plain)


def test_grouped_query_attention_sizes_the_maps_by_kv_heads():
    llm = fresh_llm()
    assert llm.shape.num_kv_heads < llm.shape.num_heads
    mit = MiT(ModelDims(llm=llm.shape, vectors={"image": 24}), layers=[1])
    kv_size = llm.shape.num_kv_heads * llm.shape.head_dim
    assert mit.infusions["1"].key_maps.out_features == 2 * kv_size
    assert mit.infusions["1"].head_scale.shape == (llm.shape.num_kv_heads,)
    assert mit.infusions["1"].ffn_map.out_features == llm.shape.intermediate_size


@pytest.mark.parametrize("layers", [[0, 2], [2, 5], [-1]])
def test_a_layer_outside_the_model_is_a_clear_error(layers, tiny_llm_factory):
    llm = tiny_llm_factory()
    with pytest.raises(UserError, match=r"outside the LLM's 4 layers.*1-based"):
        MiT(ModelDims(llm=llm.shape, vectors={"image": 24}), layers=layers)


def test_infusing_nothing_is_refused(tiny_llm_factory):
    llm = tiny_llm_factory()
    with pytest.raises(UserError, match="TextOnly"):
        MiT(ModelDims(llm=llm.shape, vectors={"image": 24}), kv=False, ffn=False)


def test_head_cosine_by_hand():
    # one sample, one head, two real tokens and one padding token, head_dim 2
    value = torch.tensor([[[[1.0, 0.0], [0.0, 2.0], [100.0, 100.0]]]])
    add = torch.tensor([[[[3.0, 4.0]]]])
    mask = torch.tensor([[1, 1, 0]])
    # flatten V over real tokens: (1,0,0,2); repeat a: (3,4,3,4)
    expected = (1 * 3 + 0 * 4 + 0 * 3 + 2 * 4) / (math.sqrt(1 + 4) * math.sqrt(9 + 16 + 9 + 16))
    torch.testing.assert_close(head_cosine(value, add, mask), torch.tensor([[expected]]))


def test_modalities_are_concatenated_in_the_configured_order(tiny_llm_factory):
    llm = tiny_llm_factory()
    dims = ModelDims(llm=llm.shape, vectors={"audio": 8, "facial": 4})
    assert MiT(dims, layers=[1]).infusions["1"].key_maps.in_features == 12
    assert MiT(dims, layers=[1], modalities=["audio"]).infusions["1"].key_maps.in_features == 8
    with pytest.raises(UserError, match="not produced"):
        MiT(dims, layers=[1], modalities=["image"])


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("form", get_args(Form))
def test_infused_keys_and_values_follow_the_equations_of_each_form(form, rescale):
    """Eq. 1–5 written out term by term, per sample and head, against the layer's fused computation."""
    shape = LLMShape(hidden_size=16, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=4, intermediate_size=8)
    torch.manual_seed(0)
    layer = InfusionLayer(6, shape, kv=True, ffn=False, rescale=rescale, form=form, init="default",
                          head_scale_init=0.3)
    key, value = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    payload = InfusionPayload(vector=torch.randn(2, 6), token_mask=mask)
    new_key, new_value = layer.infuse_kv(key, value, payload)

    def terms(maps: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:  # Eq. 1: [multiply | add] per head
        multiply, add = maps(payload.vector).split(8, dim=-1)
        return multiply.view(2, 2, 1, 4), add.view(2, 2, 1, 4)

    (key_multiply, key_add), (value_multiply, value_add) = terms(layer.key_maps), terms(layer.value_maps)
    key_infused, value_infused = key * key_multiply + key_add, value * value_multiply + value_add  # Eq. 2–3
    gate = torch.ones(2, 2, 1, 1)
    if rescale:  # Eq. 4–5: L + cos(V_h over the real tokens, I_a,h repeated over them)
        for b, real in enumerate(mask.sum(dim=1).tolist()):
            for h in range(2):
                cosine = torch.nn.functional.cosine_similarity(
                    value[b, h, :real].flatten(), value_add[b, h].repeat(real, 1).flatten(), dim=0)
                gate[b, h] = torch.sigmoid(layer.head_scale[h] + cosine)
    for original, infused, result in ((key, key_infused, new_key), (value, value_infused, new_value)):
        expected = {
            "gated": original + gate * (infused - original) if rescale else infused,
            "paper": infused * gate,
            "release": original + infused * gate,
        }[form]
        torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-6)


def test_under_bf16_autocast_an_infused_layer_casts_only_for_its_cosine_and_keeps_the_result():
    """The vector is cast once per call (not per layer), the cosine stays float32 (autocast does not cast its einsums
    back to bf16) and the small scale/shift terms combine in bf16."""
    from mit_lightning.bench.measure import count_operations

    shape = LLMShape(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=48)
    layer = InfusionLayer(24, shape, kv=True, ffn=True, rescale=True, form="gated", init="default",
                          head_scale_init=1.0)
    generator = torch.Generator().manual_seed(0)
    key, value = (torch.randn(2, 2, 5, 8, generator=generator).bfloat16() for _ in range(2))
    vector, mask = torch.randn(2, 24, generator=generator), torch.ones(2, 5)
    exact = layer.infuse_kv(key.float(), value.float(), InfusionPayload(vector=vector, token_mask=mask))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        payload = InfusionPayload(vector=vector.bfloat16(), token_mask=mask)
        counted = count_operations(lambda: layer.infuse_kv(key, value, payload), torch.device("cpu"))
        mixed = layer.infuse_kv(key, value, payload)
    assert all(tensor.dtype == torch.bfloat16 for tensor in mixed)
    # V and I_a to float32 for the cosine, the gate to bf16, autocast's casts of the two maps' weights and biases,
    # and on a CPU the Python numbers of the scale/shift terms (17 before: the cosine's einsums were cast back)
    assert counted["casts"] <= 11
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = head_cosine(value, value[:, :, :1], mask)
    torch.testing.assert_close(under_autocast, head_cosine(value, value[:, :, :1], mask), rtol=0, atol=0)
    for got, want in zip(mixed, exact):
        torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)
