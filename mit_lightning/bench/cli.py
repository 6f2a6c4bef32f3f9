"""`mit bench` arguments: which scale, device, batch sizes and strategies; then the run."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Sequence, get_args

import psutil
import torch

import mit_lightning.bench as package
from mit_lightning.backbones.llm import DType
from mit_lightning.bench.cases import Precision, default_precision, run_data_loading, run_module_cases
from mit_lightning.bench.report import Report, ratios, target_lines
from mit_lightning.bench.strategies import PEERS, read_strategies
from mit_lightning.bench.weights import weight_memory_lines
from mit_lightning.compiling import Compile
from mit_lightning.errors import UserError
from mit_lightning.measuring import positive_int
from mit_lightning.module import TrainableDType
from mit_lightning.scales import SCALES, Scale


#: what a 7B-structure MiT model (bf16 LLaMA-2-7B and ViT-L/14-336, float32 trainable parts with Adam's state) and
#: its training step at batch 8 hold in host memory, measured on a CPU: 18 GiB, with some room
CPU_7B_MEMORY_GIB = 20


def _device(name: str | None, scale: str) -> torch.device:
    if name is None and scale == "7b" and not torch.cuda.is_available():
        raise UserError("--scale 7b measures the 7B targets on a CUDA GPU, and there is none here: nothing was "
                        "measured and no target can be checked. On a CPU, use --scale small (or tiny), or --scale 7b "
                        "--device cpu to count the casts and operator calls of MiT's steps at the 7B structure.")
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU; use --device cpu "
                        "(--scale tiny or small).")
    return torch.device(name)


def _counting_7b_on_cpu(scale: Scale, args: argparse.Namespace) -> Scale:
    """The 7B scale on a CPU counts what a GPU run would launch: MiT only (token concatenation alone needs about
    33 GiB at batch 8), under bf16 autocast like the GPU run, and unless told otherwise eager, at batch 8, one timed
    step per case."""
    others = [name for name in args.strategies or () if name != "mit"]
    if others:
        raise UserError(f"--scale 7b --device cpu measures MiT only, not {others}: the peers' steps at the 7B structure "
                        "need more host memory than a counting run should take (token concatenation about 33 GiB at "
                        "batch 8). Leave out --strategies, or use --scale small for the peers.")
    available = psutil.virtual_memory().available / 2**30
    if available < CPU_7B_MEMORY_GIB:
        raise UserError(f"--scale 7b --device cpu needs about {CPU_7B_MEMORY_GIB} GiB of free memory for the bf16 7B model "
                        f"and its training step; {available:.1f} GiB are free. Use --scale small, or a machine with more "
                        "memory.")
    args.strategies = ["mit"]
    args.precision = args.precision or "bf16-mixed"
    return dataclasses.replace(scale, batch_sizes=(8,), steps=1, warmup=1, compile=("none",))


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mit bench", description=package.__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=list(SCALES), default="tiny",
                        help="tiny: the tiny presets (CPU); small: a 16-layer 1024-wide LLaMA shape and CLIP ViT-B/16 "
                             "at 224, random, fp32 (CPU: the frozen backbones dominate a step); 7b: LLaMA-2-7B and CLIP "
                             "ViT-L/14-336 shapes, random, bf16 (GPU; with --device cpu: MiT's casts and "
                             "operator calls at this structure, one step per case, about 20 GiB of memory)")
    parser.add_argument("--strategies", nargs="+", default=None,
                        help="fusion strategies whose training step is measured, by overlay name in --peers (and "
                             "pill_stage2_all_patches: PILL on every patch token); mit always is, every ratio refers "
                             "to it; default: all")
    parser.add_argument("--peers", type=Path, default=PEERS,
                        help=f"the strategy overlays, as mit compare reads them (default {PEERS})")
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", default=None,
                        help="default: 8 32 (small: 8)")
    parser.add_argument("--text-length", type=positive_int, default=48, help="prompt length in tokens")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="timed steps per case, median reported (default 10; small: 5)")
    parser.add_argument("--warmup", type=_non_negative, default=None,
                        help="untimed steps before them (default 3; small: 1)")
    parser.add_argument("--workers", type=_non_negative, default=min(8, os.cpu_count() or 1),
                        help="DataLoader workers of the data-loading case")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads of the measured steps (default: torch's choice); 1 keeps timings steady on a "
                             "busy machine, where threads of one operation wait on each other")
    parser.add_argument("--compile", nargs="+", choices=get_args(Compile), default=None,
                        help="MiT's floor, training and inference cases once per mode (model.compile), compiled "
                             "cases named <case>@<mode>; peers run eagerly. Default: none (7b: none reduce-overhead)")
    parser.add_argument("--precision", choices=get_args(Precision), default=None,
                        help="bf16-mixed: steps under bf16 autocast, like precision: bf16-mixed; 32: in the weights' "
                             "dtypes. Default: bf16-mixed on a GPU, 32 on a CPU")
    parser.add_argument("--dtype", choices=get_args(DType), default=None,
                        help="dtype of the frozen backbones (default: the scale's; tiny and small float32, 7b "
                             "bfloat16); e.g. --scale tiny --dtype bfloat16 --precision bf16-mixed counts a bf16 "
                             "run's casts on a CPU")
    parser.add_argument("--trainable-dtype", choices=get_args(TrainableDType), default="float32",
                        help="model.trainable_dtype: bfloat16 keeps the trainable weights in bf16 with float32 copies in "
                             "the optimizer (needs --precision bf16-mixed)")
    parser.add_argument("--no-data-loading", dest="data_loading", action="store_false",
                        help="skip the data-loading case")
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON lines to this file")
    parser.add_argument("--weight-memory", action="store_true",
                        help="only print the frozen LLM's weight memory at LLaMA-2 7B, 13B and 70B shapes under "
                             "model.llm.quantization none, int8 and nf4 (computed on the meta device; no GPU needed)")
    return parser


def _print_lines(lines: list[dict], output: Path | None) -> None:
    text = "".join(json.dumps(line) + "\n" for line in lines)
    print(text, end="", flush=True)
    if output is not None:
        output.write_text(text)


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.weight_memory:
        _print_lines(weight_memory_lines(), args.output)
        return
    scale = SCALES[args.scale]
    if args.dtype is not None:
        scale = dataclasses.replace(scale, dtype=args.dtype)
    device = _device(args.device, args.scale)
    if args.scale == "7b" and device.type == "cpu":
        scale = _counting_7b_on_cpu(scale, args)
    args.batch_sizes = sorted(set(args.batch_sizes or scale.batch_sizes))
    args.steps = args.steps or scale.steps
    args.warmup = scale.warmup if args.warmup is None else args.warmup
    strategies = read_strategies(args.peers)
    unknown = [name for name in args.strategies or () if name not in strategies]
    if unknown:
        raise UserError(f"Unknown strategies {unknown}; those in '{args.peers}': {', '.join(strategies)}.")
    args.strategies = ["mit", *(name for name in dict.fromkeys(args.strategies or strategies) if name != "mit")]
    args.compile = list(dict.fromkeys(args.compile or scale.compile))
    args.precision = args.precision or default_precision(device)
    if args.trainable_dtype != "float32" and args.precision != "bf16-mixed":
        raise UserError(f"--trainable-dtype {args.trainable_dtype} runs under bf16 autocast: add --precision bf16-mixed.")
    output = open(args.output, "w") if args.output is not None else None
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        report = Report(args.scale, device, args.text_length, args.steps, output, args.precision, args.trainable_dtype)
        with warnings.catch_warnings():
            # training_step logs its loss; without a Trainer, Lightning only warns that nothing is logged
            warnings.filterwarnings("ignore", message=r".*self\.log\(\)` but the `self\.trainer` reference")
            with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.type == "cuda" else []):
                torch.manual_seed(0)  # the trainable parts' initial weights; the caller's RNG is left alone
                run_module_cases(report, scale, args, device, strategies)
        if args.data_loading:
            run_data_loading(report, scale, args, device)
        line = ratios(report, args.strategies, args.batch_sizes, with_targets=args.scale == "7b" and device.type == "cuda",
                      device=device, compile_modes=args.compile)
        report.emit(line)
        if line["targets"] is not None:
            print("\n".join(target_lines(line["targets"])), file=sys.stderr, flush=True)
    finally:
        torch.set_num_threads(threads)
        if output is not None:
            output.close()
