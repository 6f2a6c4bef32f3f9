"""Which frozen backbones a checkpoint was trained on, so it is never evaluated on others by mistake.

A checkpoint holds only the trainable weights; the frozen LLM and CLIP are rebuilt from paths. A
config that reads ``${MIT_LLM_PATH}`` can silently point at another model on another machine, and
infusion trained on one LLM means nothing on another. So a checkpoint records, per backbone, where
it was loaded from and a fingerprint read cheaply from its files (never the weights themselves):

- LLM folder: a hash of config.json and the names and sizes of the weight files;
- LLM GGUF file: its name and size;
- a quantised LLM: also its quantization (a base quantised otherwise gives other activations);
- CLIP file: its name and size; the architecture name;
- random presets: the preset name and seed (their weights are a function of both).

Paths are recorded for the reader but not compared: the same files moved elsewhere still match.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from mit_lightning.errors import UserError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def _file_entry(path: Path) -> list:
    return [path.name, path.stat().st_size]


def llm_fingerprint(config) -> dict[str, Any]:
    """`config` is an `LLMConfig`. An unquantised LLM's entry has no quantization (as before it could be)."""
    quantization = {} if config.quantization == "none" else {"quantization": config.quantization}
    if config.preset:
        return {"path": config.preset, "fingerprint": {"preset": config.preset, "seed": config.seed, **quantization}}
    path = config.local_path().resolve()
    if config.is_gguf:
        return {"path": str(path), "fingerprint": {"gguf": _file_entry(path), **quantization}}
    weights = sorted(_file_entry(file) for file in path.iterdir() if file.suffix in WEIGHT_SUFFIXES)
    config_hash = hashlib.sha256((path / "config.json").read_bytes()).hexdigest()[:16]
    return {"path": str(path), "fingerprint": {"config_sha256": config_hash, "weights": weights, **quantization}}


def vision_fingerprint(config) -> dict[str, Any] | None:
    """`config` is a `VisionConfig` (or None without a vision tower)."""
    if config is None:
        return None
    path = config.weights_path()
    if path is None:
        return {"path": None, "fingerprint": {"name": config.name, "random_seed": config.seed}}
    path = path.resolve()
    return {"path": str(path), "fingerprint": {"name": config.name, "weights": _file_entry(path)}}


DEFAULT_HINT = ("Load the backbones it was trained on (model.llm.path, model.vision.name/weights), or set "
                "--model.allow_other_backbones true to use it on these deliberately.")


def check_same_backbones(recorded: dict[str, Any], current: dict[str, Any], source: str, hint: str = DEFAULT_HINT) -> None:
    """Refuse a checkpoint trained on other backbones, naming what differs on each side; `hint` says what to do."""
    differences = []
    for part, label in (("llm", "LLM"), ("vision", "vision tower")):
        before, now = recorded.get(part), current.get(part)
        if (before or {}).get("fingerprint") != (now or {}).get("fingerprint"):
            differences.append(f"{label}: trained on {_describe(before)}, now {_describe(now)}")
    if differences:
        raise UserError(f"{source} was trained on other frozen backbones ({'; '.join(differences)}). {hint}")


def _describe(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "none"
    return f"{entry.get('path')} {entry.get('fingerprint')}"
