"""`mit inspect --ckpt_path X`: a trained MiT model's own quantities, drawn as PNG charts.

Over a bounded number of samples of a split of the run's data (its first validation split by default) it
records per infused layer and head the gate σ(L') and the relative size of the infusion of K, V and the FFN
activation (`MiT.observe`), prints their summary and writes the charts TensorBoard shows during training
(`mit_lightning.insight`): `gates.png` and `infusion_sizes.png`.
"""

from __future__ import annotations

import argparse
import copy
from typing import Any, Sequence

import numpy as np
import torch

from mit_lightning import insight
from mit_lightning.adapters import Adapter, read_adapter
from mit_lightning.data.base import collate
from mit_lightning.data.configured import build_datamodule
from mit_lightning.errors import UserError, make_folder
from mit_lightning.experiments import config_args
from mit_lightning.fusion import MiT
from mit_lightning.registry import registered_class
from mit_lightning.tensorboard import close_figure


def parser() -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(
        prog="mit inspect",
        description="Draw a trained MiT model's gates σ(L') per infused layer and head, and the size of its "
                    "infusion of K, V and the FFN activation, over samples of its data, as PNG charts.",
    )
    result.add_argument("--ckpt_path", required=True,
                        help="a checkpoint of `mit fit`, or best / last of the newest run of --config")
    result.add_argument("--config", action="append", default=[],
                        help="the run's config file (to find best / last; its data replaces the checkpoint's); "
                             "repeatable")
    result.add_argument("--output", default=None,
                        help="folder for the charts (default: inspect-<checkpoint name> beside the checkpoint)")
    result.add_argument("--split", default=None, help="the data split read (default: the first validation split)")
    result.add_argument("--samples", type=int, default=64, help="samples read, spread over the split (default 64)")
    result.add_argument("--batch_size", type=int, default=8, help="samples per forward pass (default 8)")
    result.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    return result


def main(args: Sequence[str]) -> None:
    from mit_lightning.cli import find_checkpoint, parse_run_config  # the CLI module imports this one's siblings
    from mit_lightning.inference import load_adapters, precision_context

    options = parser().parse_args(args)
    if options.samples < 1 or options.batch_size < 1:
        parser().error("--samples and --batch_size must be at least 1")
    source = find_checkpoint(options.ckpt_path, options.config)
    adapter = read_adapter(source, user_args=args)
    check_mit(adapter)
    data = parse_run_config(config_args(options.config)).data.as_dict() if options.config else adapter.data
    if not data:
        raise UserError(f"'{source}' records no data config: give the run's --config to read its data.")
    predictor = next(iter(load_adapters([adapter], device=options.device, user_args=args).values()))
    dataset, split = split_dataset(data, options.split, predictor.module.image_size)
    with precision_context(adapter.precision, predictor.module.device):
        summary = observe(predictor.module, dataset, options.samples, options.batch_size)
    output = make_folder(options.output or source.parent / f"inspect-{source.stem}", "The output folder",
                         "Choose another with --output.")
    print(f"{source}: MiT over {min(options.samples, len(dataset))} samples of '{split}'")
    for line in summary_lines(summary):
        print(f"  {line}")
    for name, draw in (("gates", insight.gate_figure), ("infusion_sizes", insight.size_figure)):
        figure = draw(summary)
        figure.savefig(output / f"{name}.png", dpi=100)
        close_figure(figure)
        print(f"  chart: {output / f'{name}.png'}")


def check_mit(adapter: Adapter) -> None:
    """Only MiT has gates and infusions to draw: another fusion is refused before any backbone is loaded."""
    fusion = (adapter.model.get("fusion") or {}).get("class_path")
    cls = registered_class(fusion)
    if cls is None or not issubclass(cls, MiT):
        raise UserError(f"'{adapter.source}' was trained with the {fusion} fusion, not MiT: `mit inspect` draws MiT's "
                        "gates and infusion sizes, which other fusions do not have.")


def split_dataset(data: dict[str, Any], split: str | None, image_size: int | None):
    """The evaluation dataset of `split` (default: the first validation split) of the data config, and its name."""
    data = copy.deepcopy(data)
    init_args = data.setdefault("init_args", {})
    if split is not None:
        init_args["val_splits"] = [split]
    datamodule = build_datamodule(data, image_size)
    datamodule.setup("validate")
    name = datamodule.val_splits[0]
    return datamodule.datasets[name], name


@torch.no_grad()
def observe(module, dataset, samples: int, batch_size: int) -> dict[str, dict[str, torch.Tensor]]:
    """`insight.summarise` of what MiT records over `samples` samples spread evenly over the dataset."""
    indices = list(dict.fromkeys(np.linspace(0, len(dataset) - 1, min(samples, len(dataset))).round().astype(int)))
    with module.fusion.observe() as observed:
        for start in range(0, len(indices), batch_size):
            batch = collate([dataset[int(index)] for index in indices[start:start + batch_size]])
            if batch["prompt"]:  # a batch whose images all fail to decode holds nothing to run
                module({key: value.to(module.device) if isinstance(value, torch.Tensor) else value
                        for key, value in batch.items()})
    summary = insight.summarise(observed)
    if not summary:
        raise UserError("No sample of the split could be read (their images do not decode): nothing to draw.")
    return {layer: {name: values.float().cpu() for name, values in quantities.items()}
            for layer, quantities in summary.items()}


def summary_lines(summary: dict[str, dict[str, torch.Tensor]]) -> list[str]:
    """Per layer: the mean gate per head and the median size of each infusion."""
    lines = []
    for layer, quantities in summary.items():
        parts = []
        if "gate" in quantities:
            gates = " ".join(f"{value:.2f}" for value in quantities["gate"].mean(dim=0).tolist())
            parts.append(f"mean gate per head {gates}")
        parts += [f"{name} {float(quantities[name].median()):.4f}" for name in ("key", "value", "ffn")
                  if name in quantities]
        lines.append(f"layer {layer}: " + "; ".join(parts))
    return lines
