"""A trained model's own part, an *adapter*: read from a `mit fit` checkpoint or an export folder, and exported.

A checkpoint holds the trainable weights, the run's config and the backbones it was trained on. An
export folder (`mit export`, laid out like peft's adapter folders) holds only what is needed to use
the model, in files anyone can read without running code:

    adapter_config.json    the model config (backbones, fusion, head), the data spec (class names,
                           feature sizes, prompt format), the backbones' paths and fingerprints,
                           the precision it was trained in
    adapter.safetensors    the trainable weights (their SHA-256 is in adapter_config.json: a file damaged
                           or changed after export is refused, not loaded with other weights)
    README.md              a model card: backbones, model, data, the run's test metrics, how to load it

Both are read into the same `Adapter`; `mit_lightning.inference` rebuilds the model from it. Every
class path a file names is checked before anything is imported (`check_stored_config`).

"Adapter" means this, a trained model's own part, throughout the project; peft's weights inside the LLM are
"LoRA weights" (`backbones.lora`), and PILL's and ModeX's modules keep their papers' names (SwiGLU adapters,
MEC-Adapters) inside `fusion.pill` and `fusion.modex`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from mit_lightning.checkpoints import (
    BACKBONES_ENTRY,
    DATA_SPEC_ENTRY,
    WEIGHT_FILE_ERRORS,
    load_weights_file,
    recorded_backbones,
    recorded_data_spec,
    stored_run_config,
    unreadable_weights,
)
from mit_lightning.config_safety import check_stored_config
from mit_lightning.data.base import DataSpec
from mit_lightning.errors import UserError, make_folder
from mit_lightning.registry import registered_class

EXPORT_CONFIG = "adapter_config.json"
EXPORT_WEIGHTS = "adapter.safetensors"
EXPORT_CARD = "README.md"
EXPORT_FORMAT = "mit-lightning-adapter"
EXPORT_VERSION = 1
#: the folders a run's checkpoints sit in below its root folder (logger name, version, checkpoints)
RUN_SUBFOLDERS = re.compile(r"^(checkpoints|version_\d+|tensorboard|lightning_logs)$")
#: model settings that only concern training: not needed, and not kept, to use a model
TRAINING_ONLY = ("optimizer", "lr_scheduler", "allow_other_backbones")
#: data settings that say where the files were on the training machine, or how they were loaded: not exported
LOCAL_DATA_SETTINGS = ("root", "batch_size", "eval_batch_size", "num_workers")


@dataclass
class Adapter:
    """What a trained model adds to the frozen backbones, and how to rebuild the rest.

    `model` is the run's `model` config (class paths checked, training-only settings dropped);
    `backbones` the recorded paths and fingerprints of the frozen LLM and CLIP it was trained on.
    """

    source: Path
    model: dict[str, Any]
    data_spec: DataSpec
    backbones: dict[str, Any]
    weights: dict[str, torch.Tensor]
    precision: str | None = None
    data: dict[str, Any] | None = None  # the run's data config (class path, settings), for the model card

    @property
    def name(self) -> str:
        """A default name: the export folder's; for a run's checkpoint, the run's root folder
        (``runs/demo/tensorboard/version_0/checkpoints/best.ckpt`` → ``demo``); else the file's."""
        if self.source.is_dir():
            return self.source.name
        if self.source.parent.name != "checkpoints":
            return self.source.stem
        for folder in self.source.absolute().parents:
            if not RUN_SUBFOLDERS.match(folder.name):
                return folder.name or self.source.stem
        return self.source.stem

    @property
    def parameter_count(self) -> int:
        return sum(tensor.numel() for tensor in self.weights.values())

    @property
    def task(self) -> str | None:
        """The head's task (segmentation, classification, sentiment), read from its registered class."""
        return getattr(registered_class((self.model.get("head") or {}).get("class_path")), "task", None)


def read_adapter(path: str | os.PathLike, user_args: Sequence[str] = ()) -> Adapter:
    """A checkpoint file or an export folder. `user_args`: the user's command line (with the config files it
    names), whose class names a stored config may use besides the project's own (`check_stored_config`)."""
    path = Path(path).expanduser()
    if path.is_dir():
        return read_export(path, user_args)
    if not path.exists():
        raise UserError(f"No checkpoint or export at '{path}': give a .ckpt file written by `mit fit` or a folder "
                        "written by `mit export`.")
    return read_checkpoint(path, user_args)


def read_checkpoint(path: Path, user_args: Sequence[str] = ()) -> Adapter:
    checkpoint = load_weights_file(path)
    stored = stored_run_config(checkpoint, path, user_args)
    if not stored or "model" not in stored or "state_dict" not in checkpoint:
        raise UserError(f"'{path}' holds no trained MiT model with its run config: use a checkpoint written by "
                        "`mit fit`.")
    spec = checkpoint.get(DATA_SPEC_ENTRY)
    return Adapter(
        source=path,
        model=_usable(stored["model"]),
        data_spec=recorded_data_spec(spec, path) if spec is not None else spec_from_data_config(stored.get("data"), path),
        backbones=recorded_backbones(checkpoint, path) or {},
        weights=checkpoint["state_dict"],
        precision=(stored.get("trainer") or {}).get("precision"),
        data=stored.get("data"),
    )


def spec_from_data_config(data: dict[str, Any] | None, path: Path) -> DataSpec:
    """For checkpoints written before data specs were recorded: ask the data module the run was trained with.

    That needs the data it reads (class names, feature sizes); the config was checked before.
    """
    from mit_lightning.data.configured import build_datamodule

    if not data:
        raise UserError(f"'{path}' records neither its data spec nor its data config; it cannot be used on new inputs.")
    try:
        return build_datamodule(data).spec
    except UserError as error:
        reason = error
    raise UserError(f"'{path}' predates recorded data specs, so the data it was trained on is read for its classes, "
                    f"feature sizes and prompt, and that failed: {str(reason).splitlines()[0]} Make that data "
                    "available, or use a checkpoint written by a newer `mit fit`.")


def _usable(model: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in model.items() if key not in TRAINING_ONLY}


# --- exports ------------------------------------------------------------------------------------------
def read_export(folder: Path, user_args: Sequence[str] = ()) -> Adapter:
    config_path, weights_path = folder / EXPORT_CONFIG, folder / EXPORT_WEIGHTS
    missing = [path.name for path in (config_path, weights_path) if not path.is_file()]
    if missing:
        raise UserError(f"'{folder}' is not an export of `mit export`: it lacks {' and '.join(missing)}.")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise UserError(f"'{config_path}' is not valid JSON ({error}). Export the checkpoint again.") from None
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        raise UserError(f"'{config_path}' is not a mit-lightning adapter config (format '{EXPORT_FORMAT}').")
    if config.get("version") != EXPORT_VERSION:
        raise UserError(f"'{config_path}' is version {config.get('version')} of the export format; this mit-lightning "
                        f"reads version {EXPORT_VERSION}. Export the checkpoint again with this version.")
    check_stored_config({"model": config.get("model"), **({"data": config["data"]} if config.get("data") else {})},
                        config_path, user_args)
    weights = _load_safetensors(weights_path)  # an unreadable file says so first; safetensors runs no code
    _check_checksum(weights_path, config.get("weights_sha256"), config_path)
    return Adapter(
        source=folder,
        model=config["model"],
        data_spec=recorded_data_spec(config.get("data_spec"), config_path),
        backbones=recorded_backbones({BACKBONES_ENTRY: config.get("backbones")}, config_path) or {},
        weights=weights,
        precision=config.get("precision"),
        data=config.get("data"),
    )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_checksum(weights_path: Path, recorded: Any, config_path: Path) -> None:
    """The weights file is the one exported with the config (exports written before checksums carry none)."""
    if recorded is None:
        return
    if not isinstance(recorded, str) or not re.fullmatch(r"[0-9a-f]{64}", recorded):
        raise UserError(f"'{config_path}' records no valid SHA-256 for the weights (weights_sha256 must be 64 "
                        "hexadecimal digits). Export the checkpoint again.")
    if file_sha256(weights_path) != recorded:
        raise UserError(f"'{weights_path}' is not the weights file exported with '{config_path.name}' (its SHA-256 "
                        "differs from the one recorded there): it was damaged or changed after export. Export the "
                        "checkpoint again.")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (*WEIGHT_FILE_ERRORS, OSError) as error:
        raise unreadable_weights(path, "adapter weights", error) from None


def write_export(adapter: Adapter, folder: str | os.PathLike, overwrite: bool = False,
                 dtype: torch.dtype | None = None) -> Path:
    """Write `adapter` as an export folder; a folder that already holds files is refused unless `overwrite`.

    `dtype` stores the floating-point weights in another precision (bfloat16 halves the files; they are
    cast back to the model's parameters' dtype on loading).

    With `overwrite`, only the export's own files are replaced. Each file is written beside its final
    name and renamed over it, so an interrupted export never leaves a half-written file in place. The files
    are readable by others as the umask allows (an export is made to be shared), and name no absolute local path
    but the backbones' (which loading falls back on).
    """
    hint = "Give a new or empty folder to export into."
    folder = make_folder(folder, "The export folder", hint)
    if any(folder.iterdir()) and not overwrite:
        raise UserError(f"'{folder}' is not empty; export into a new or empty folder, or add --overwrite to replace "
                        "an earlier export there.")
    weights = {name: (tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor)
               .detach().contiguous().clone() for name, tensor in adapter.weights.items()}
    data = without_local_settings(adapter.data)
    config = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "task": adapter.task,
        "exported_from": shareable_path(adapter.source),
        "parameters": adapter.parameter_count,
        "precision": adapter.precision,
        "backbones": adapter.backbones,
        "data_spec": adapter.data_spec.to_record(),
        "data": data,
        "model": adapter.model,
    }
    try:
        _write_files(adapter, folder, weights, config, data)
    except OSError as error:
        raise UserError(f"Cannot write the export into '{folder}' ({error.strerror or error}). {hint}") from None
    return folder


def _write_files(adapter: Adapter, folder: Path, weights: dict[str, torch.Tensor], config: dict[str, Any],
                 data: dict[str, Any] | None) -> None:
    from safetensors.torch import save_file

    from mit_lightning.model_card import model_card, run_metrics

    def write_weights(partial: Path) -> None:
        save_file(weights, partial, metadata={"format": "pt"})
        config["weights_sha256"] = file_sha256(partial)

    _replace(folder / EXPORT_WEIGHTS, write_weights)
    text = json.dumps(config, indent=2) + "\n"
    _replace(folder / EXPORT_CONFIG, lambda partial: partial.write_text(text, encoding="utf-8"))
    card = model_card(adapter, folder.name, data, run_metrics(adapter.source))
    _replace(folder / EXPORT_CARD, lambda partial: partial.write_text(card, encoding="utf-8"))


def _replace(path: Path, write) -> None:
    """`write(partial)` beside `path`, then renamed over it, readable as a file created under the umask is."""
    partial = path.with_name(f".{path.name}.partial")
    write(partial)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(partial, 0o666 & ~umask)
    os.replace(partial, path)


def without_local_settings(data: dict[str, Any] | None) -> dict[str, Any] | None:
    """The run's data config without where its files were on the training machine, nor how they were loaded."""
    if not isinstance(data, dict):
        return None
    settings = {key: value for key, value in (data.get("init_args") or {}).items() if key not in LOCAL_DATA_SETTINGS}
    return {"class_path": data.get("class_path"), "init_args": settings}


def shareable_path(path: Path) -> str:
    """Where an export came from, without the local folders above: relative to the working folder when inside it
    (``runs/demo/.../best-epoch=11.ckpt``), else the file or folder name."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.name
