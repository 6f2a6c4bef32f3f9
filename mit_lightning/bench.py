"""`mit bench`: what MiT costs on top of the frozen backbones, next to token concatenation.

One run builds the model at one scale and measures, for the same batch sizes and text length
(prompts are cut to exactly `--text-length` tokens, so batches have no padding):

- floor: what any method built on the frozen backbones pays: the CLIP forward without grad (global
  feature and the decoder's blocks), tokenising, and the frozen LLM's forward plus a backward that
  starts where MiT's graph starts: the hidden state entering the first infused layer is made to
  require grad and the sum of the last token's final hidden state is backpropagated (no weight
  gradients, nothing below that layer).
- mit_train: one real training step of `MiTModule`: `training_step` (CLIP, tokenising, the infused
  LLM, segmentation head, DICE loss), backward and the Adam step of `configure_optimizers`.
- concat_train: the same step with `TokenConcat`: every CLIP patch token is prepended to the text,
  so the graph runs through all layers over patches + text.
- mit_inference: the MiT forward without grad, at batch 1 (latency) and at each batch size
  (throughput).
- data_loading: batches of `RefCOCODataModule`'s training DataLoader with worker processes, on a
  synthetic dataset in the refer layout written to a temporary folder (removed afterwards).
- ratios (last line): mit_train / floor time, concat_train / mit_train time and peak memory per batch
  size, and at 7b on a GPU the targets.

Timing: `--warmup` untimed steps, then the median of `--steps` steps, each between two
`torch.cuda.synchronize()` on a GPU; data loading reports the mean over its timed batches (workers
deliver them in bursts). On a GPU, steps run under bf16 autocast, like `precision: bf16-mixed`.
Peak memory: on a GPU, `torch.cuda.max_memory_allocated` during the case (weights included); on a
CPU, how far the process's peak resident memory rose during the case (Linux only, else null): a
rough figure, since freed memory the allocator keeps is not counted again. Data loading reports
none (it happens in the worker processes).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from math import ceil
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TextIO

import torch

from mit_lightning.backbones.llm import LLMConfig, last_token
from mit_lightning.backbones.vision import VisionConfig, VisionShape
from mit_lightning.data.base import DataSpec, fill_template
from mit_lightning.data.refer import DESCRIPTION, PAPER_TEMPLATE, RefCOCODataModule
from mit_lightning.data.synthetic import write_synthetic_refer
from mit_lightning.errors import UserError
from mit_lightning.fusion import MiT, TokenConcat
from mit_lightning.fusion.mit import PAPER_LAYERS
from mit_lightning.heads import ReferringSegmentation
from mit_lightning.module import MiTModule

MIB = 2**20


@dataclass(frozen=True)
class Scale:
    """Backbones and sizes of one benchmark scale."""

    llm: str
    vision: str
    dtype: str
    layers: tuple[int, ...]  # infused, 1-based
    vision_blocks: tuple[int, ...]  # read by the segmentation decoder
    head_width: int
    mask_size: int
    source_image_size: int  # side of the synthetic images the data loader decodes


SCALES = {
    "tiny": Scale("tiny", "tiny", "float32", (2, 3, 4), (4, 3, 2), 64, 64, 64),
    # LLaMA-2-7B and CLIP ViT-L/14-336 shapes with random weights; the paper's layers, decoder and masks
    "7b": Scale("random-llama-2-7b", "ViT-L-14-336", "bfloat16", PAPER_LAYERS, (18, 12, 6), 256, 480, 480),
}

# what MiT should reach at 7B shapes on one H100:
# (name, ratio-line key, batch, limit, True if the value must stay at or below the limit)
TARGETS = (
    ("mit_train / floor at batch 8", "mit_over_floor", 8, 1.15, True),
    ("mit_train / floor at batch 32", "mit_over_floor", 32, 1.15, True),
    ("concat_train / mit_train time at batch 8", "concat_over_mit", 8, 4.0, False),
    ("mit_train / concat_train peak memory at batch 8", "mit_over_concat_memory", 8, 0.5, True),
    ("mit_inference ms at batch 1", "mit_inference_ms", 1, 25.0, True),
    ("mit_train samples/s at batch 32", "mit_train_samples_per_s", 32, 230.0, False),
)

_WORDS = "the small red circle on the left next to a big blue square above the green triangle".split()


# --- model and batch ------------------------------------------------------------------------------
def build_module(scale: Scale, fusion: Callable, text_length: int, device: torch.device) -> MiTModule:
    """The real MiTModule, built on `device` directly: 7B of frozen weights never pass through the CPU."""
    module = MiTModule(
        head=partial(ReferringSegmentation, vision_blocks=scale.vision_blocks, width=scale.head_width),
        llm=LLMConfig(path=scale.llm, dtype=scale.dtype, max_text_tokens=text_length),
        vision=vision_config(scale),
        fusion=fusion,
    )
    with torch.device(device):
        module.build(DataSpec())
    return module.to(device)  # open_clip hands its tower back on the CPU


def vision_config(scale: Scale) -> VisionConfig:
    return VisionConfig(name=scale.vision, weights=None, dtype=scale.dtype)


def prompts(count: int, text_length: int) -> list[str]:
    """Prompts of at least `text_length` tokens, which the tokenizer cuts to exactly that many."""
    descriptions = (" ".join(_WORDS[(i + j) % len(_WORDS)] for j in range(text_length)) for i in range(count))
    return [fill_template(PAPER_TEMPLATE, DESCRIPTION, description) for description in descriptions]


def synthetic_batch(module: MiTModule, scale: Scale, batch_size: int, text_length: int,
                    device: torch.device) -> dict[str, Any]:
    """A batch as the data module delivers it (uint8 images and masks), already on the device."""
    generator = torch.Generator().manual_seed(batch_size)
    size = module.image_size
    return {
        "prompt": prompts(batch_size, text_length),
        "image": torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, generator=generator).to(device),
        "mask": torch.randint(0, 2, (batch_size, scale.mask_size, scale.mask_size), dtype=torch.uint8,
                              generator=generator).to(device),
        "index": torch.arange(batch_size, device=device),
    }


# --- measuring ------------------------------------------------------------------------------------
def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> int | None:
    """The current resident size in KiB, after resetting the kernel's peak (Linux); None where impossible.

    Memory freed by earlier cases is handed back to the system first (glibc keeps it otherwise), so
    that a case's own allocations raise the resident size again.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return None
    return _status_kib("VmRSS")


class PeakMemory:
    """Peak memory during a block, in MiB (see the module docstring for what it means per device)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mib: float | None = None
        self._start_kib: int | None = None

    @property
    def measure(self) -> str:
        return "cuda_max_memory_allocated" if self.device.type == "cuda" else "cpu_peak_rss_rise"

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            _synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._start_kib = _reset_peak_rss()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.device.type == "cuda":
            self.mib = torch.cuda.max_memory_allocated(self.device) / MIB
            return
        peak = _status_kib("VmHWM")
        if self._start_kib is not None and peak is not None:
            self.mib = max(peak - self._start_kib, 0) / 1024


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(step: Callable[[], Any], *, steps: int, warmup: int, device: torch.device) -> dict[str, Any]:
    """Median milliseconds of `steps` timed calls after `warmup` calls, and the peak memory of them all."""
    times = []
    memory = PeakMemory(device)
    try:
        with memory:
            for _ in range(warmup):
                step()
            for _ in range(steps):
                _synchronize(device)
                start = time.perf_counter()
                step()
                _synchronize(device)
                times.append(time.perf_counter() - start)
    except torch.OutOfMemoryError:
        _release(device)
        return {"ms": None, "peak_memory_mib": None, "memory_measure": memory.measure, "error": "out of memory"}
    return {"ms": 1000 * statistics.median(times), "peak_memory_mib": memory.mib, "memory_measure": memory.measure}


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# --- the steps ------------------------------------------------------------------------------------
@contextmanager
def graph_from_layer(module: MiTModule, layer: int) -> Iterator[None]:
    """Make the hidden state entering decoder layer `layer` (1-based) a leaf that requires grad."""

    def start_graph(_layer: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (args[0].detach().requires_grad_(), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach().requires_grad_()}

    handle = module.llm.layers[layer - 1].register_forward_pre_hook(start_graph, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def floor_step(module: MiTModule, batch: dict[str, Any]) -> None:
    """The frozen backbones' share of a step; run it inside `graph_from_layer`."""
    with _autocast(module.device):
        module.encode_modalities(batch)
        input_ids, attention_mask = module.llm.tokenize(batch["prompt"], module.device)
        feature = last_token(module.llm(attention_mask, input_ids=input_ids), attention_mask)
    feature.float().sum().backward()


def training_step(module: MiTModule, optimizer: torch.optim.Optimizer, batch: dict[str, Any]) -> None:
    optimizer.zero_grad(set_to_none=True)
    with _autocast(module.device):
        loss = module.training_step(batch, 0)
    loss.backward()
    optimizer.step()


def inference_step(module: MiTModule, batch: dict[str, Any]) -> None:
    with torch.inference_mode(), _autocast(module.device):
        module(batch)


# --- the run --------------------------------------------------------------------------------------
class Report:
    """Prints one JSON line per case (and writes it to `output`), keeping the records for the ratios."""

    def __init__(self, scale: str, device: torch.device, text_length: int, steps: int, output: TextIO | None) -> None:
        self.common = {"scale": scale, "device": device.type}
        self.text_length = text_length
        self.steps = steps
        self.output = output
        self.records: dict[tuple[str, int], dict[str, Any]] = {}

    def emit(self, line: dict[str, Any]) -> None:
        text = json.dumps(line)
        print(text, flush=True)
        if self.output is not None:
            self.output.write(text + "\n")
            self.output.flush()

    def case(self, case: str, batch: int, measured: dict[str, Any]) -> None:
        ms = measured["ms"]
        record = {
            "case": case, **self.common, "batch": batch, "text_length": self.text_length,
            "ms": _rounded(ms), "samples_per_s": _rounded(batch * 1000 / ms if ms else None),
            **{key: _rounded(value) for key, value in measured.items() if key != "ms"}, "steps": self.steps,
        }
        self.records[case, batch] = record
        self.emit(record)

    def value(self, case: str, batch: int, key: str) -> float | None:
        return self.records.get((case, batch), {}).get(key)

    def ratio(self, numerator: str, denominator: str, batch: int, key: str = "ms") -> float | None:
        top, bottom = self.value(numerator, batch, key), self.value(denominator, batch, key)
        return _rounded(top / bottom) if top is not None and bottom else None


def _rounded(value: Any) -> Any:
    return round(value, 3) if isinstance(value, float) else value


def run_module_cases(report: Report, scale: Scale, args: argparse.Namespace, device: torch.device) -> None:
    """floor, mit_train and mit_inference on one MiT model, then concat_train on a second one."""
    module = build_module(scale, partial(MiT, layers=scale.layers), args.text_length, device)
    run_training_cases(report, module, "mit_train", scale, args, floor_from=min(scale.layers))
    module.eval()
    for batch_size in sorted({1, *args.batch_sizes}):
        batch = synthetic_batch(module, scale, batch_size, args.text_length, device)
        measured = measure(lambda: inference_step(module, batch), **_timing(args, device))
        report.case("mit_inference", batch_size, measured)
    del module, batch
    _release(device)
    module = build_module(scale, TokenConcat, args.text_length, device)
    run_training_cases(report, module, "concat_train", scale, args)
    del module
    _release(device)


def run_training_cases(report: Report, module: MiTModule, case: str, scale: Scale, args: argparse.Namespace,
                       floor_from: int | None = None) -> None:
    """Training steps at every batch size, each after the floor when `floor_from` names the first infused layer."""
    optimizer = module.configure_optimizers()["optimizer"]
    timing = _timing(args, module.device)
    module.train()
    for batch_size in args.batch_sizes:
        batch = synthetic_batch(module, scale, batch_size, args.text_length, module.device)
        if floor_from is not None:
            with graph_from_layer(module, floor_from):
                report.case("floor", batch_size, measure(lambda: floor_step(module, batch), **timing))
        report.case(case, batch_size, measure(lambda: training_step(module, optimizer, batch), **timing))


def _timing(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    return dict(steps=args.steps, warmup=args.warmup, device=device)


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


def ratios(report: Report, scale_name: str, device: torch.device, batch_sizes: Sequence[int]) -> dict[str, Any]:
    per_batch = {
        "mit_over_floor": {b: report.ratio("mit_train", "floor", b) for b in batch_sizes},
        "concat_over_mit": {b: report.ratio("concat_train", "mit_train", b) for b in batch_sizes},
        "mit_over_concat_memory": {b: report.ratio("mit_train", "concat_train", b, "peak_memory_mib")
                                   for b in batch_sizes},
        "mit_inference_ms": {b: report.value("mit_inference", b, "ms") for b in sorted({1, *batch_sizes})},
        "mit_train_samples_per_s": {b: report.value("mit_train", b, "samples_per_s") for b in batch_sizes},
    }
    line: dict[str, Any] = {"case": "ratios", **report.common, "text_length": report.text_length,
                            "machine": _machine(device)}
    line.update({key: {str(b): value for b, value in values.items()} for key, values in per_batch.items()})
    line["targets"] = check_targets(per_batch) if scale_name == "7b" and device.type == "cuda" else None
    return line


def check_targets(per_batch: dict[str, dict[int, float | None]]) -> dict[str, dict[str, Any] | None]:
    """The figures MiT is meant to reach at 7B shapes on one H100; None where a case was not measured."""
    checked: dict[str, dict[str, Any] | None] = {}
    for name, key, batch, limit, at_most in TARGETS:
        value = per_batch[key].get(batch)
        met = None if value is None else (value <= limit if at_most else value >= limit)
        checked[name] = None if value is None else {"value": value, "limit": limit, "met": met}
    return checked


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {os.cpu_count()} cores, torch {torch.__version__}"


def _device(name: str | None, scale: str) -> torch.device:
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU; use --device cpu (--scale tiny).")
    if scale == "7b" and name != "cuda":
        raise UserError("--scale 7b needs a CUDA GPU (token concatenation alone takes about 33 GiB at batch 8); "
                        "on a CPU, use --scale tiny.")
    return torch.device(name)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mit bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="tiny",
                        help="tiny: the tiny presets (CPU); 7b: LLaMA-2-7B and CLIP ViT-L/14-336 shapes, random, "
                             "bf16 (GPU)")
    parser.add_argument("--batch-sizes", type=_positive, nargs="+", default=[8, 32])
    parser.add_argument("--text-length", type=_positive, default=48, help="prompt length in tokens")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    parser.add_argument("--steps", type=_positive, default=10, help="timed steps per case (median reported)")
    parser.add_argument("--warmup", type=_non_negative, default=3, help="untimed steps before them")
    parser.add_argument("--workers", type=_non_negative, default=min(8, os.cpu_count() or 1),
                        help="DataLoader workers of the data-loading case")
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON lines to this file")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    args.batch_sizes = sorted(set(args.batch_sizes))
    device = _device(args.device, args.scale)
    scale = SCALES[args.scale]
    output = open(args.output, "w") if args.output is not None else None
    try:
        report = Report(args.scale, device, args.text_length, args.steps, output)
        with warnings.catch_warnings():
            # training_step logs its loss; without a Trainer, Lightning only warns that nothing is logged
            warnings.filterwarnings("ignore", message=r".*self\.log\(\)` but the `self\.trainer` reference")
            with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.type == "cuda" else []):
                torch.manual_seed(0)  # the trainable parts' initial weights; the caller's RNG is left alone
                run_module_cases(report, scale, args, device)
        run_data_loading(report, scale, args, device)
        report.emit(ratios(report, args.scale, device, args.batch_sizes))
    finally:
        if output is not None:
            output.close()
