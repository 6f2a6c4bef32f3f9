"""Compiled models (`model.compile`): no graph break inside a decoder layer for MiT and each peer, outputs
equal to eager ones, and text padded to fixed buckets without changing any feature."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from mit_lightning.bench.strategies import read_strategies
from mit_lightning.compiling import TEXT_BUCKET, compiled_parts, pad_to_bucket
from mit_lightning.errors import UserError
from mit_lightning.scales import SCALES, build_module, synthetic_batch

TINY = SCALES["tiny"]
CPU = torch.device("cpu")
STRATEGIES = read_strategies(Path(__file__).resolve().parents[1] / "configs" / "peers")


def _module(strategy: str = "mit", **options):
    torch.manual_seed(0)
    return build_module(TINY, STRATEGIES[strategy].factory(TINY), 16, CPU, **options)


def _padded_batch(module, size: int = 3):
    """A batch whose prompts differ in length, so the text is padded and masked."""
    batch = synthetic_batch(module, TINY, size, 16, CPU)
    batch["prompt"][1] = "the cat"
    return batch


def _layer_calls(module, batch) -> list[tuple[torch.nn.Module, tuple, dict]]:
    """Each decoder layer with the arguments it was called with in one forward pass."""
    calls, handles = [], []
    for layer in module.llm.layers:
        def record(layer, args, kwargs):
            calls.append((layer, args, dict(kwargs)))
        handles.append(layer.register_forward_pre_hook(record, with_kwargs=True))
    try:
        with torch.no_grad():
            module(batch)
    finally:
        for handle in handles:
            handle.remove()
    return calls


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_no_graph_break_inside_a_decoder_layer(strategy):
    module = _module(strategy).eval()
    calls = _layer_calls(module, _padded_batch(module))
    tapped = [layer for layer, _, _ in calls if hasattr(layer.self_attn, "mit_tap")]
    assert len(calls) == len(module.llm.layers)
    if strategy.startswith(("mit", "pill", "modex")):  # token concatenation changes the input (LoRA the weights) only
        assert tapped
    torch._dynamo.reset()
    for layer, args, kwargs in calls:
        explanation = torch._dynamo.explain(layer)(*args, **kwargs)
        reasons = [reason.reason for reason in explanation.break_reasons]
        assert explanation.graph_break_count == 0, f"{strategy}, layer {layer.self_attn.layer_idx + 1}: {reasons}"
        assert explanation.graph_count == 1


def test_compiled_parts_are_each_decoder_layer_each_clip_block_and_the_head():
    module = _module()
    parts = compiled_parts(module)
    expected = [*module.llm.layers, *module.vision.visual.transformer.resblocks, module.head]
    assert len(parts) == len(expected) and all(a is b for a, b in zip(parts, expected))


def test_unknown_compile_mode_is_one_clear_line():
    with pytest.raises(UserError, match="model.compile"):
        _module(compile="fastest")


@pytest.mark.parametrize("side", ["right", "left"])
def test_bucket_padding_leaves_the_text_feature_unchanged(side):
    module = _module().eval()
    module.llm.tokenizer.padding_side = side
    batch = _padded_batch(module)
    batch["prompt"] = ["the small red circle on the left", "the cat", "a big blue square"]
    input_ids, attention_mask = module.llm.tokenize(batch["prompt"], CPU)
    padded_ids, padded_mask = pad_to_bucket(input_ids, attention_mask, module.llm.tokenizer.pad_token_id, side)
    assert padded_ids.shape[1] == TEXT_BUCKET * -(-input_ids.shape[1] // TEXT_BUCKET) > input_ids.shape[1]
    assert padded_mask.sum() == attention_mask.sum()
    inputs = module.encode_modalities(batch)
    with torch.no_grad():
        plain = module.fusion(module.llm, input_ids, attention_mask, inputs)
        bucketed = module.fusion(module.llm, padded_ids, padded_mask, inputs)
    torch.testing.assert_close(bucketed, plain, rtol=1e-5, atol=1e-5)


def test_bucket_padding_keeps_a_full_bucket_as_it_is():
    ids, mask = torch.ones(2, 2 * TEXT_BUCKET, dtype=torch.long), torch.ones(2, 2 * TEXT_BUCKET, dtype=torch.long)
    assert pad_to_bucket(ids, mask, 0, "right")[0] is ids


def test_a_compiled_task_token_model_reads_the_same_feature():
    """Bucket padding comes after the task token is appended, so the token stays right after the real text."""
    eager = _module(text_feature="task_token").eval()
    compiled = _module(text_feature="task_token", compile="default").eval()
    for part in compiled_parts(compiled):
        part.compile(backend="eager")  # dynamo's tracing without code generation: the padding is what is checked
    batch = _padded_batch(eager)
    seen = []
    compiled.llm.register_forward_pre_hook(lambda _, args, kwargs: seen.append(args[0].shape[1]),
                                           with_kwargs=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(batch), eager(batch), rtol=1e-5, atol=1e-5)
    assert seen and all(length % TEXT_BUCKET == 0 for length in seen)


@pytest.mark.slow
def test_compiled_model_matches_eager():
    """Inference compiled with inductor (the default mode), and a training step traced through autograd with the
    taps (aot_eager: the backward graph without inductor's minutes of code generation on a CPU)."""
    eager = _module().eval()
    compiled = _module(compile="default").eval()
    batch = _padded_batch(eager)
    with torch.no_grad():
        torch.testing.assert_close(compiled(batch), eager(batch), rtol=1e-4, atol=1e-4)
    assert not counters["graph_break"]

    traced = _module(compile="default")  # padded to buckets like any compiled model; recompiled below
    for part in compiled_parts(traced):
        part.compile(backend="aot_eager")
    results = []
    for module in (eager, traced):
        module.train()
        module.head.loss(module(batch), batch).backward()
        results.append({name: p.grad for name, p in module.named_parameters() if p.requires_grad})
    assert results[0].keys() == results[1].keys()
    for name, grad in results[0].items():
        torch.testing.assert_close(results[1][name], grad, rtol=1e-4, atol=1e-5, msg=name)
