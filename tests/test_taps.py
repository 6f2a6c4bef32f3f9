"""The tap sites fusion methods use inside a frozen decoder layer, reached through extension points only."""

from __future__ import annotations

import pytest
import torch

from mit_lightning.backbones.llm import FrozenLLM, LLMConfig, last_token
from mit_lightning.backbones.taps import PAYLOAD_KWARG, SITES, TapPayload, check_reached, tap_layer, tapped_layers

PROMPTS = ["the red circle", "the small blue square on the left"]


@pytest.fixture(scope="module")
def llm() -> FrozenLLM:
    return FrozenLLM(LLMConfig(path="tiny", dtype="float32"))


def scaled(factor: float, seen: list):
    """A transform that records the shapes it receives and scales what it returns."""

    def transform(*values):
        *tensors, payload = values
        seen.append(tuple(tuple(tensor.shape) for tensor in tensors))
        out = tuple(tensor * factor for tensor in tensors)
        return out if len(out) > 1 else out[0]

    return transform


@pytest.mark.parametrize("site", SITES)
def test_each_site_is_transformed_only_when_the_call_carries_a_payload(llm, site):
    ids, mask = llm.tokenize(PROMPTS, "cpu")
    plain = last_token(llm(mask, input_ids=ids), mask)
    seen: list = []
    tap = tap_layer(llm.model, 1, **{site: scaled(1.5, seen)})
    try:
        torch.testing.assert_close(last_token(llm(mask, input_ids=ids), mask), plain, rtol=0, atol=0)
        assert seen == []
        payload = TapPayload()
        tapped = last_token(llm(mask, input_ids=ids, **{PAYLOAD_KWARG: payload}), mask)
        assert (tapped - plain).abs().max() > 1e-3
        assert tap.reached == {site: payload}
        batch, length = ids.shape
        shape = llm.shape
        expected = {
            "attention_input": ((batch, length, shape.hidden_size),),
            "kv": ((batch, shape.num_kv_heads, length, shape.head_dim),) * 2,
            "attention_output": ((batch, length, shape.hidden_size),),
            "mlp_input": ((batch, length, shape.hidden_size),),
            "ffn_activation": ((batch, length, shape.intermediate_size),),
            "mlp_output": ((batch, length, shape.hidden_size),),
        }[site]
        assert seen == [expected]
    finally:
        tap.remove()
    assert tapped_layers(llm.model) == []
    torch.testing.assert_close(last_token(llm(mask, input_ids=ids), mask), plain, rtol=0, atol=0)


def test_a_layer_takes_one_tap_and_unknown_sites_are_refused(llm):
    tap = tap_layer(llm.model, 0, mlp_output=scaled(1.0, []))
    try:
        with pytest.raises(RuntimeError, match="already tapped"):
            tap_layer(llm.model, 0, kv=scaled(1.0, []))
        with pytest.raises(ValueError, match="Unknown tap sites"):
            tap_layer(llm.model, 2, value=scaled(1.0, []))
    finally:
        tap.remove()


def test_check_reached_names_what_the_payload_missed(llm):
    taps = [tap_layer(llm.model, 0, kv=scaled(1.0, [])), tap_layer(llm.model, 2, ffn_activation=scaled(1.0, []))]
    try:
        payload = TapPayload()
        taps[0].apply("kv", torch.ones(1), torch.ones(1))
        with pytest.raises(RuntimeError, match="Method inputs did not reach layer 1 kv, layer 3 ffn_activation"):
            check_reached(payload, taps, "Method")  # layer 1 saw no payload at all (apply without one)
        taps[0].payload = taps[1].payload = payload
        taps[0].apply("kv", torch.ones(1), torch.ones(1))
        with pytest.raises(RuntimeError, match="Method inputs did not reach layer 3 ffn_activation"):
            check_reached(payload, taps, "Method")
        taps[0].apply("kv", torch.ones(1), torch.ones(1))
        taps[1].apply("ffn_activation", torch.ones(1))
        check_reached(payload, taps, "Method")
        assert all(last is None for tap in taps for last in tap.reached.values())  # the payload is not kept
    finally:
        for tap in taps:
            tap.remove()
