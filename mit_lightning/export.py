"""`mit export --ckpt_path X OUT/`: a trained model's own part as a folder to share.

The folder holds the trainable weights (``adapter.safetensors``) and what rebuilds the rest
(``adapter_config.json``: backbones by path and fingerprint, fusion, head, data spec); see
`mit_lightning.adapters`. `mit serve` and `mit_lightning.load_model` read it like a checkpoint.
"""

from __future__ import annotations

import argparse
from typing import Sequence, get_args

from mit_lightning.adapters import EXPORT_WEIGHTS, read_adapter, write_export
from mit_lightning.cli import find_checkpoint
from mit_lightning.backbones.llm import DType, torch_dtype



def parser() -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(
        prog="mit export",
        description="Write a checkpoint's trainable weights (safetensors) and the config that rebuilds the model "
                    "(JSON) into a folder, to share or to serve with `mit serve --ckpt_path OUT`.",
    )
    result.add_argument("output", help="the folder to write (new or empty)")
    result.add_argument("--ckpt_path", required=True,
                        help="a checkpoint of `mit fit`, or best / last of the newest run of --config")
    result.add_argument("--config", action="append", default=[],
                        help="the run's config file (to find --ckpt_path best / last); repeatable")
    result.add_argument("--overwrite", action="store_true", help="replace an earlier export in the folder")
    result.add_argument("--dtype", choices=sorted(get_args(DType)), default=None,
                        help="store the weights in this precision (default: as trained; bfloat16 halves the size)")
    return result


def main(args: Sequence[str]) -> None:
    options = parser().parse_args(args)
    source = find_checkpoint(options.ckpt_path, options.config)
    adapter = read_adapter(source, user_args=args)
    dtype = torch_dtype(options.dtype) if options.dtype else None
    folder = write_export(adapter, options.output, overwrite=options.overwrite, dtype=dtype)
    size = (folder / EXPORT_WEIGHTS).stat().st_size
    print(f"Exported '{source}' ({adapter.task}, {adapter.parameter_count:,} trainable parameters, "
          f"{size / 1e6:.2f} MB of weights) to {folder}/")
