"""A model trained in bf16-mixed answers with its own weights cast to bf16 once (`mit_lightning.compute_dtype`).

What matters: the answers are as close to full precision as under autocast with float32 weights (the
weights autocast casts at every call are the same bf16 values), normalisation layers keep float32, a
float32 run keeps float32 weights, and a forward pass makes fewer casts.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from helpers.adapter_fixtures import SEQUENCE_DIMS, build_adapter, shapes_image
from mit_lightning.bench.measure import count_operations
from mit_lightning.bench.strategies import PEERS, read_strategies
from mit_lightning.compute_dtype import NORMALISATION, cast_parameters, inference_dtype
from mit_lightning.inference import Sample, load_adapters, precision_context
from mit_lightning.scales import SCALES, build_module, synthetic_batch


def _predictor(adapter, precision):
    return next(iter(load_adapters([dataclasses.replace(adapter, precision=precision)], device="cpu").values()))


def _inputs(task):
    """128 inputs: enough outputs that the mean error measures bf16's rounding, not a few outputs' luck."""
    rng = np.random.default_rng(0)
    words = ["grilled", "lemon", "chicken", "a plate of", "churros", "with sugar", "warm", "apple pie", "fried dough"]
    texts = [" ".join(words[(index + step) % len(words)] for step in range(2 + index % 4)) for index in range(128)]
    if task == "classification":
        return [{"image": shapes_image()[0], "text": text} for text in texts]
    return [{"text": text, **{name: rng.normal(size=(5 + index % 7, size)) for name, size in SEQUENCE_DIMS.items()}}
            for index, text in enumerate(texts)]


def _outputs(predictor, inputs):
    """The model's raw outputs (logits, scores) on `inputs`, run as `predict` runs them."""
    samples = [predictor.check(Sample(text=item["text"], image=item.get("image"),
                                      sequences={key: value for key, value in item.items() if key in SEQUENCE_DIMS}))
               for item in inputs]
    batch = predictor.prepare(samples)
    with torch.inference_mode(), precision_context(predictor.precision, predictor.module.device):
        return predictor.module(batch).float()


@pytest.mark.parametrize("task", ["classification", "sentiment"])
def test_a_bf16_run_answers_with_bf16_weights_as_close_to_full_precision_as_autocast_did(task, tmp_path):
    adapter = build_adapter(task, seed=3, source=tmp_path / f"{task}.ckpt")
    bf16, full = _predictor(adapter, "bf16-mixed"), _predictor(adapter, "32-true")
    module = bf16.module
    for prefix, layer in module.named_modules():
        for name, parameter in layer.named_parameters(recurse=False):
            if f"{prefix}.{name}" in module.trainable_state():
                expected = torch.float32 if isinstance(layer, NORMALISATION) else torch.bfloat16
                assert parameter.dtype == expected, f"{prefix}.{name}"
    assert all(p.dtype == torch.float32 for p in full.module.trainable_parameters())  # float32 runs: as they are
    assert any(isinstance(layer, nn.LayerNorm) for layer in module.modules()) or task == "classification"

    inputs = _inputs(task)
    exact = _outputs(full, inputs)
    full.precision = "bf16-mixed"  # the same model under autocast, its weights float32
    autocast_error = (_outputs(full, inputs) - exact).abs().mean()
    bf16_error = (_outputs(bf16, inputs) - exact).abs().mean()
    assert 0 < autocast_error < 0.02 * exact.abs().mean()  # bf16's rounding, visible
    assert bf16_error <= 1.5 * autocast_error
    assert [result.get("label") for result in bf16.predict_batch(inputs)] == \
        [result.get("label") for result in full.predict_batch(inputs)]


def test_segmentation_with_bf16_weights_errs_as_autocast_did_and_casts_less(tmp_path):
    scale = SCALES["tiny"]
    torch.manual_seed(0)
    module = build_module(scale, read_strategies(PEERS)["mit"].factory(scale), 48, torch.device("cpu")).eval()
    with torch.no_grad():  # MiT away from its identity initialisation
        for parameter in module.fusion.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    batch = synthetic_batch(module, scale, 4, 48, torch.device("cpu"))

    def forward():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return module(batch).float()

    with torch.inference_mode():
        exact = module(batch).float()
    autocast, autocast_counts = forward(), count_operations(forward, torch.device("cpu"))
    cast = cast_parameters(module, set(module.trainable_state()), torch.bfloat16)
    bf16, bf16_counts = forward(), count_operations(forward, torch.device("cpu"))
    assert cast > 0
    assert (bf16 - exact).abs().mean() <= 1.1 * (autocast - exact).abs().mean()
    assert ((bf16 > 0) == (exact > 0)).float().mean() >= ((autocast > 0) == (exact > 0)).float().mean() - 1e-3
    # every weight autocast cast at each call (about one per cast parameter) is cast no more
    assert bf16_counts["casts"] <= autocast_counts["casts"] - cast // 2
    assert all(norm.weight.dtype == torch.float32 for norm in module.head.modules() if isinstance(norm, NORMALISATION))


def test_only_bf16_mixed_runs_change_dtype():
    assert inference_dtype("bf16-mixed") == torch.bfloat16
    for precision in ("32-true", "32", "16-mixed", "bf16-true", None):
        assert inference_dtype(precision) is None


def test_cast_parameters_leaves_other_parameters_and_integers_alone():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    model.register_parameter("count", nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False))
    names = {"0.weight", "0.bias", "1.weight", "count"}
    assert cast_parameters(model, names, torch.bfloat16) == 2
    assert (model[0].weight.dtype, model[0].bias.dtype) == (torch.bfloat16, torch.bfloat16)
    assert model[1].weight.dtype == torch.float32 and model[2].weight.dtype == torch.float32
    assert model.count.dtype == torch.int64
    assert cast_parameters(model, names, torch.bfloat16) == 0  # nothing left to cast


def test_a_model_cast_after_training_keeps_each_gradient_in_its_weights_dtype():
    """A float32 gradient left on a bf16 weight breaks every compiled graph that reads the weight (dynamo:
    "dtype mismatch between tensor and its gradient") and any optimizer step: `mit bench` casts for its
    inference case right after its training steps."""
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    model(torch.randn(2, 3)).sum().backward()
    cast_parameters(model, {"0.weight", "0.bias", "1.weight"}, torch.bfloat16)
    assert model[0].weight.grad.dtype == torch.bfloat16 and model[1].weight.grad.dtype == torch.float32
    explanation = torch._dynamo.explain(model[0])(torch.randn(2, 3, dtype=torch.bfloat16))
    assert explanation.graph_break_count == 0
