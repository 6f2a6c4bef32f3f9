"""`mit serve --ckpt_path A [--ckpt_path B ...]`: trained models on one loaded backbone, over HTTP, with a page.

    mit serve --config configs/demo.yaml --ckpt_path best        # the demo's best checkpoint (make serve)
    mit serve --ckpt_path seg=runs/refcoco/.../best.ckpt --ckpt_path food=exports/food101

Every checkpoint or export becomes an adapter, named after its run or export folder (or NAME= before
its path). They must share the frozen backbones: a checkpoint trained on others is refused.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Sequence, get_args

from mit_lightning.cli import find_checkpoint
from mit_lightning.compiling import Compile
from mit_lightning.errors import UserError

#: NAME=PATH gives an adapter its name (a URL-safe word)
_NAMED = re.compile(r"^(?P<name>[A-Za-z0-9._-]+)=(?P<path>.+)$")


def parser() -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(
        prog="mit serve",
        description="Serve trained models (checkpoints of `mit fit` or folders of `mit export`) over HTTP, several "
                    "tasks on one loaded LLM and CLIP, with a web page at / to try them.",
    )
    result.add_argument("--ckpt_path", action="append", required=True, metavar="[NAME=]PATH",
                        help="a checkpoint, an export folder, or best / last of the newest run of --config; "
                             "repeat it to serve several adapters")
    result.add_argument("--config", action="append", default=[],
                        help="the run's config file (to find --ckpt_path best / last); repeatable")
    result.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: this machine only; 0.0.0.0 opens it to the network, "
                             "without any authentication)")
    result.add_argument("--port", type=int, default=8000)
    result.add_argument("--device", default=None, help="cuda, cpu, cuda:1, ... (default: cuda if available)")
    result.add_argument("--max_batch_size", type=int, default=8, help="samples run in one forward pass at most")
    result.add_argument("--max_wait_ms", type=float, default=10.0,
                        help="how long a request waits for others to join its batch")
    result.add_argument("--max_upload_mb", type=float, default=10.0, help="largest request body accepted")
    result.add_argument("--llm_path", default=None,
                        help="read the frozen LLM from here instead of the path the models were trained with")
    result.add_argument("--clip_weights", default=None,
                        help="read the CLIP weights from here instead of the path the models were trained with")
    result.add_argument("--compile", choices=get_args(Compile), default=None,
                        help="torch.compile the models (model.compile): default, reduce-overhead (CUDA graphs: "
                             "fastest at small batches on a GPU), max-autotune or none; default: as trained. The "
                             "first requests of each batch size and text bucket wait for the compilation")
    result.add_argument("--access_log", action="store_true",
                        help="print one line per request (client, method, path, status)")
    result.add_argument("--show_paths", action="store_true",
                        help="GET /adapters gives the adapters' local paths (by default only their file or folder names)")
    result.add_argument("--allow_other_backbones", action="store_true",
                        help="use models on backbones other than those they were trained on (by fingerprint)")
    return result


def sources(paths: Sequence[str], configs: Sequence[str]) -> list[tuple[str | None, Path]]:
    """(name or None, path) per --ckpt_path."""
    named = []
    for given in paths:
        match = _NAMED.match(given)
        if match and not Path(given).expanduser().exists():
            named.append((match["name"], find_checkpoint(match["path"], configs)))
        else:
            named.append((None, find_checkpoint(given, configs)))
    return named


def main(args: Sequence[str]) -> None:
    options = parser().parse_args(args)
    if options.max_batch_size < 1 or options.max_wait_ms < 0 or options.max_upload_mb <= 0:
        raise UserError("--max_batch_size must be at least 1, --max_wait_ms at least 0 and --max_upload_mb above 0.")
    import uvicorn

    from mit_lightning.inference import load_adapters
    from mit_lightning.serve.app import create_app

    predictors = load_adapters(
        sources(options.ckpt_path, options.config), device=options.device, llm_path=options.llm_path,
        clip_weights=options.clip_weights, allow_other_backbones=options.allow_other_backbones,
        compile=options.compile, user_args=args,
    )
    app = create_app(predictors, max_batch_size=options.max_batch_size, max_wait_ms=options.max_wait_ms,
                     max_upload_mb=options.max_upload_mb, show_paths=options.show_paths)
    for name, predictor in predictors.items():
        print(f"  {name}: {predictor.task} ({type(predictor.module.fusion).__name__}) from {predictor.source}")
    print(f"Open http://{options.host}:{options.port}/ in a browser (API: /adapters, /docs). Ctrl+C stops.",
          flush=True)
    uvicorn.run(app, host=options.host, port=options.port, log_level="info" if options.access_log else "warning",
                access_log=options.access_log)
