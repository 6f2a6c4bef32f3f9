"""The measured cases: the frozen floor, each strategy's training step, MiT inference, data loading."""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import contextmanager
from functools import partial
from math import ceil
from pathlib import Path
from typing import Any, Iterator, Literal

import torch

from mit_lightning.backbones.llm import last_token
from mit_lightning.backbones.vision import VisionShape
from mit_lightning.bench.measure import measure
from mit_lightning.bench.report import Report
from mit_lightning.bench.strategies import Strategy
from mit_lightning.compiling import Compile
from mit_lightning.compute_dtype import inference_dtype
from mit_lightning.data.refer import RefCOCODataModule
from mit_lightning.data.synthetic import write_synthetic_refer
from mit_lightning.measuring import release
from mit_lightning.module import MiTModule
from mit_lightning.scales import Scale, build_module, synthetic_batch, vision_config

#: how the steps run: under bf16 autocast (like `precision: bf16-mixed`) or in the weights' own dtypes
Precision = Literal["bf16-mixed", "32"]


def default_precision(device: torch.device) -> Precision:
    return "bf16-mixed" if device.type == "cuda" else "32"


def _autocast(device: torch.device, precision: Precision | None):
    mixed = (precision or default_precision(device)) == "bf16-mixed"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed)


# --- the steps ------------------------------------------------------------------------------------
class _StartGraph(torch.nn.Module):
    """Stands in for a decoder layer: the hidden state entering it becomes a leaf that requires grad, outside
    the layer (inside a compiled layer, `requires_grad_` would break its graph)."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.layer(hidden_states.detach().requires_grad_(), *args, **kwargs)


@contextmanager
def graph_from_layer(module: MiTModule, layer: int) -> Iterator[None]:
    """Make the hidden state entering decoder layer `layer` (1-based) a leaf that requires grad."""
    layers = module.llm.layers
    original = layers[layer - 1]
    layers[layer - 1] = _StartGraph(original)
    try:
        yield
    finally:
        layers[layer - 1] = original


def floor_step(module: MiTModule, batch: dict[str, Any], first_layer: int, precision: Precision | None = None) -> None:
    """The frozen backbones' share of a step, with backward from the last token down to `first_layer` (1-based)."""
    with graph_from_layer(module, first_layer), _autocast(module.device, precision):
        module.encode_modalities(batch)
        input_ids, attention_mask = module.llm.tokenize(batch["prompt"], module.device)
        feature = last_token(module.llm(attention_mask, input_ids=input_ids), attention_mask)
    feature.float().sum().backward()


def training_step(module: MiTModule, optimizer: torch.optim.Optimizer, batch: dict[str, Any],
                  precision: Precision | None = None) -> None:
    optimizer.zero_grad(set_to_none=True)
    with _autocast(module.device, precision):
        loss = module.training_step(batch, 0)
    loss.backward()
    module.on_before_optimizer_step(optimizer)  # as Lightning calls it: bf16 weights' gradients move to their copies
    optimizer.step()


def inference_step(module: MiTModule, batch: dict[str, Any], precision: Precision | None = None) -> None:
    with torch.inference_mode(), _autocast(module.device, precision):
        module(batch)


# --- the runs -------------------------------------------------------------------------------------
def _timing(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    return dict(steps=args.steps, warmup=args.warmup, device=device)


def compiled_name(case: str, mode: Compile) -> str:
    """A case's name when its model is compiled in `mode`: `mit_train@reduce-overhead`; eager ones keep theirs."""
    return case if mode == "none" else f"{case}@{mode}"


def run_module_cases(report: Report, scale: Scale, args: argparse.Namespace, device: torch.device,
                     strategies: dict[str, Strategy]) -> None:
    """floor, mit_train and mit_inference on one MiT model per compile mode, then each other strategy's training
    step (eager)."""
    for mode in args.compile:
        module = build_module(scale, strategies["mit"].factory(scale), args.text_length, device, compile=mode,
                              trainable_dtype=args.trainable_dtype)
        run_training_cases(report, module, "mit_train", scale, args, floor_from=min(scale.layers), mode=mode)
        module.eval()
        module.cast_trainable(inference_dtype(args.precision))  # as load_model and mit serve run such a model
        name = compiled_name("mit_inference", mode)
        for batch_size in sorted({1, *args.batch_sizes}):
            batch = synthetic_batch(module, scale, batch_size, args.text_length, device)
            measured = measure({name: lambda: inference_step(module, batch, args.precision)}, **_timing(args, device))
            report.case(name, batch_size, measured[name], compile=mode)
        del module, batch
        release(device)
    for strategy in args.strategies:
        if strategy == "mit":
            continue
        module = build_module(scale, strategies[strategy].factory(scale), args.text_length, device,
                              trainable_dtype=args.trainable_dtype)
        run_training_cases(report, module, f"{strategy}_train", scale, args)
        del module
        release(device)


def run_training_cases(report: Report, module: MiTModule, case: str, scale: Scale, args: argparse.Namespace,
                       floor_from: int | None = None, mode: Compile = "none") -> None:
    """Training steps at every batch size, alternating with the floor's when `floor_from` names the first
    infused layer; `mode`: how `module` is compiled (the floor runs on its compiled layers too)."""
    optimizer = module.configure_optimizers()["optimizer"]
    timing = _timing(args, module.device)
    module.train()
    for batch_size in args.batch_sizes:
        batch = synthetic_batch(module, scale, batch_size, args.text_length, module.device)
        steps = {compiled_name(case, mode): lambda: training_step(module, optimizer, batch, args.precision)}
        if floor_from is not None:
            floor = partial(floor_step, module, batch, floor_from, args.precision)
            steps = {compiled_name("floor", mode): floor, **steps}
        for name, measured in measure(steps, **timing).items():
            report.case(name, batch_size, measured, compile=mode)


def run_data_loading(report: Report, scale: Scale, args: argparse.Namespace, device: torch.device) -> None:
    """Batches per second out of the RefCOCO training DataLoader, on a temporary synthetic dataset."""
    image_size = VisionShape.from_architecture(vision_config(scale).architecture()).image_size
    batches = args.warmup + args.steps
    with tempfile.TemporaryDirectory(prefix="mit-bench-") as folder:
        # at least 2 refs per image, and a training epoch serves each ref once
        root = write_synthetic_refer(Path(folder) / "refer", train_images=ceil(batches * max(args.batch_sizes) / 2),
                                     val_images=1, test_images=1, image_size=scale.source_image_size)
        for batch_size in args.batch_sizes:
            data = RefCOCODataModule(root=str(root), image_size=image_size, mask_size=scale.mask_size,
                                     batch_size=batch_size, num_workers=args.workers,
                                     pin_memory=device.type == "cuda")
            data.setup("fit")
            loader = data.train_dataloader()
            batches = iter(loader)
            for _ in range(args.warmup):
                next(batches)
            start = time.perf_counter()
            for _ in range(args.steps):
                next(batches)
            ms = 1000 * (time.perf_counter() - start) / args.steps
            report.case("data_loading", batch_size, {"ms": ms, "peak_memory_mib": None, "workers": args.workers})
            del batches, loader  # the last reference to the workers: they stop before the folder goes
