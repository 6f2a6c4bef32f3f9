"""The checkpoint format, and reading weight files safely: nothing in a file runs code or ends in a traceback.

A `mit fit` checkpoint is Lightning's, plus three entries of this project's:

- ``mit_config``: the run's config (``seed_everything``, ``trainer``, ``model``, ``data``), so that
  ``mit test --ckpt_path X`` needs nothing else. It is *data*: `stored_run_config` checks it against
  the closed class registry (`mit_lightning.config_safety`) before any parser sees it;
- ``mit_backbones``: the frozen LLM and CLIP it was trained on (paths and fingerprints);
- ``mit_data_spec``: what the data told the model (class names, feature sizes, prompt format).

Every file goes through `torch.load(weights_only=True)` (tensors and plain data only). A file that is
empty, truncated, not a torch file, or carries pickled objects is refused with one message naming it
— never torch's advice to retry with ``weights_only=False``, which would run whatever the file holds.
torch does not check the CRC-32 its zip archives carry, so a damaged copy would load with other weights:
`load_weights_file` checks them first. Trainable weights must moreover be numbers a model can hold
(`check_trainable_fit`): floating point where the model's are, and finite.
"""

from __future__ import annotations

import pickle
import struct
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from safetensors import SafetensorError

from mit_lightning.backbones.fingerprint import check_same_backbones
from mit_lightning.config_safety import STORED_KEYS, check_stored_config
from mit_lightning.errors import UserError

if TYPE_CHECKING:
    from mit_lightning.data.base import DataSpec

#: the run's config (the parts `STORED_KEYS` that rebuild and evaluate its model)
CONFIG_ENTRY = "mit_config"
#: the frozen backbones' paths and fingerprints
BACKBONES_ENTRY = "mit_backbones"
#: the data's spec (class names, feature sizes, prompt format), for using the model on new inputs
DATA_SPEC_ENTRY = "mit_data_spec"

#: what torch, safetensors and the libraries calling them raise for a file that is not a complete weight file
WEIGHT_FILE_ERRORS = (pickle.UnpicklingError, EOFError, RuntimeError, zipfile.BadZipFile, SafetensorError)
#: what else torch's reader of the legacy (pre-zip) format raises on bytes that are no torch file at all
NOT_A_TORCH_FILE = (KeyError, IndexError, TypeError, AttributeError, struct.error)


def is_broken_file(error: BaseException) -> bool:
    """Whether an error raised while loading weights says the file itself is broken (not, e.g., out of memory)."""
    if isinstance(error, RuntimeError):
        return "PytorchStreamReader" in str(error)
    return isinstance(error, WEIGHT_FILE_ERRORS)


def unreadable_weights(path: str | Path, what: str, error: BaseException) -> UserError:
    """The one-line error for a weight file torch could not read, by what went wrong."""
    path = Path(path)
    size = path.stat().st_size if path.is_file() else None
    if size == 0:
        reason = "it is empty (0 bytes): it was not written completely. Use a complete copy"
    elif isinstance(error, pickle.UnpicklingError) and "unsupported global" in str(error).lower():
        reason = ("it holds pickled Python objects besides tensors and plain data, which could run code, so it was "
                  "refused. Only load files from a source you trust, written by the tool that made them")
    elif isinstance(error, (EOFError, zipfile.BadZipFile, SafetensorError)) or "PytorchStreamReader" in str(error):
        reason = f"it is truncated or corrupted ({size:,} bytes). Use a complete copy"
    else:
        reason = (f"it is not a readable torch file ({type(error).__name__}: {str(error).splitlines()[0][:120]}). "
                  "Check the path")
    return UserError(f"Cannot load the {what} '{path}': {reason}.")


def load_weights_file(path: str | Path, what: str = "checkpoint") -> Any:
    """`torch.load` on the CPU with ``weights_only=True``; every failure is one `UserError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"The {what} '{path}' does not exist (or is not a file).")
    try:
        damaged = _damaged_record(path)
        if damaged:
            raise UserError(f"Cannot load the {what} '{path}': its record '{damaged}' fails its checksum, so the copy is "
                            "damaged (its weights would load changed). Use a complete, undamaged copy.")
        return torch.load(path, map_location="cpu", weights_only=True)
    except (*WEIGHT_FILE_ERRORS, *NOT_A_TORCH_FILE, ValueError, OSError) as error:
        raise unreadable_weights(path, what, error) from None


def _damaged_record(path: Path) -> str | None:
    """The first record of a torch zip archive whose CRC-32 does not match its bytes; None for other files."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        return archive.testzip()


#: Lightning's entries of a checkpoint and the type each must have for Lightning to read it (None: any)
LIGHTNING_ENTRIES = {"pytorch-lightning_version": str, "state_dict": dict, "epoch": int, "global_step": int,
                     "loops": dict, "callbacks": dict, "optimizer_states": list, "lr_schedulers": list,
                     "hyper_parameters": dict}
#: the loops whose state Lightning keeps (and reads back) under 'loops'
LIGHTNING_LOOPS = ("fit_loop", "validate_loop", "test_loop", "predict_loop")


def check_lightning_entries(checkpoint: Any, source: str | Path) -> None:
    """What Lightning reads of a checkpoint, in the form Lightning writes it: a checkpoint altered by hand (or not
    written by Lightning) is one line here, not a traceback from deep inside Lightning's restore."""
    from packaging.version import InvalidVersion, Version

    def refuse(reason: str) -> UserError:
        return UserError(f"'{source}' is not a checkpoint as `mit fit` writes it: {reason}. Use the file as it was "
                         "written (or `mit export` / load_model for the trained weights alone).")

    if not isinstance(checkpoint, dict):
        raise refuse(f"it holds a {type(checkpoint).__name__}, not a mapping")
    for required in ("pytorch-lightning_version", "state_dict"):
        if checkpoint.get(required) is None:
            raise refuse(f"it has no '{required}'")
    for key, kind in LIGHTNING_ENTRIES.items():
        value = checkpoint.get(key)
        if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            raise refuse(f"its '{key}' is a {type(value).__name__}, not a {kind.__name__}")
    try:
        Version(checkpoint["pytorch-lightning_version"])
    except InvalidVersion:
        raise refuse(f"its 'pytorch-lightning_version' {checkpoint['pytorch-lightning_version'][:40]!r} is no "
                     "version") from None
    absent = [loop for loop in LIGHTNING_LOOPS if "loops" in checkpoint and loop not in checkpoint["loops"]]
    if absent:
        raise refuse(f"its 'loops' lack {', '.join(absent)}")
    nested = [(key, name) for key in ("loops", "callbacks") for name, value in (checkpoint.get(key) or {}).items()
              if not isinstance(value, dict)]
    nested += [(key, str(index)) for key in ("optimizer_states", "lr_schedulers")
               for index, value in enumerate(checkpoint.get(key) or []) if not isinstance(value, dict)]
    if nested:
        raise refuse(f"its {nested[0][0]} entry '{nested[0][1]}' is not a mapping")
    if not all(isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in checkpoint["state_dict"].items()):
        raise refuse("its 'state_dict' is not a mapping of names to tensors")


def stored_run_config(checkpoint: Any, source: str | Path, user_args: Sequence[str] = ()) -> dict[str, Any] | None:
    """The run config a checkpoint carries, checked as data (`check_stored_config`); None if it carries none.

    `user_args`: the user's command line; the classes it and its --config files name are the user's to trust.
    """
    stored = checkpoint.get(CONFIG_ENTRY) if isinstance(checkpoint, dict) else None
    if stored is None:
        return None
    if not isinstance(stored, dict):
        raise UserError(f"'{source}' stores its run config ({CONFIG_ENTRY}) as a {type(stored).__name__}, not the "
                        "mapping mit-lightning writes; the file was altered. Use the checkpoint as `mit fit` wrote it.")
    return check_stored_config(stored, source, user_args) if stored else None


def run_config_entry(full_config: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint keeps of a run's dumped config."""
    return {key: full_config[key] for key in STORED_KEYS if key in full_config}


def recorded_backbones(checkpoint: dict[str, Any], source: str | Path) -> dict[str, Any] | None:
    """The frozen backbones a checkpoint records (``{"llm": {"path", "fingerprint"}, "vision": ...}``), checked as
    data; None if it records none."""
    entry = checkpoint.get(BACKBONES_ENTRY)
    if entry is None:
        return None
    parts_ok = isinstance(entry, dict) and all(
        isinstance(part, str) and (value is None or (isinstance(value, dict) and isinstance(value.get("path"), (
            str, type(None))))) for part, value in entry.items())
    if not parts_ok:
        raise UserError(f"'{source}' records its backbones ({BACKBONES_ENTRY}) in a form mit-lightning never writes; "
                        "the file was altered. Use the checkpoint as `mit fit` wrote it.")
    return entry


def check_recorded_backbones(checkpoint: dict[str, Any], current: dict[str, Any], source: str,
                             allow_other: bool = False) -> None:
    """The checkpoint was trained on the backbones loaded now, when it records them (unless `allow_other`)."""
    recorded = recorded_backbones(checkpoint, source)
    if recorded is not None and not allow_other:
        check_same_backbones(recorded, current, source)


def recorded_data_spec(record: Any, source: str | Path) -> "DataSpec":
    """The data spec a checkpoint or export records (class names, feature sizes, prompt format), checked as data."""
    from mit_lightning.data.base import DataSpec

    try:
        if not isinstance(record, dict):
            raise TypeError(f"a {type(record).__name__}, not a mapping")
        return DataSpec.from_record(record)
    except (TypeError, ValueError, AttributeError) as error:
        raise UserError(f"'{source}' records its data spec in a form mit-lightning never writes ({error}); the file "
                        "was altered. Use the file as mit-lightning wrote it.") from None


def check_trainable_fit(saved: Any, expected: dict[str, torch.Tensor], source: str) -> None:
    """Saved trainable weights must be exactly a model's (`expected`), key for key and shape for shape, and hold
    values it can use (`check_trainable_values`)."""
    if not isinstance(saved, dict) or not all(isinstance(value, torch.Tensor) for value in saved.values()):
        raise UserError(f"{source} holds no trainable weights as mit-lightning writes them (a mapping of tensors).")
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    mismatched = sorted(k for k in set(saved) & set(expected) if saved[k].shape != expected[k].shape)
    if missing or unexpected or mismatched:
        details = "; ".join(
            f"{label}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", mismatched))
            if keys
        )
        raise UserError(
            f"{source} does not fit this model ({details}). It was trained with another model configuration: "
            "evaluate it with the config stored in it (mit test --ckpt_path ... without changing model.*), or "
            "start from it only with the same model.fusion, model.head and encoders."
        )
    check_trainable_values(saved, expected, source)


def check_trainable_values(saved: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str) -> None:
    """Floating-point weights stay floating point and finite: integers (a cast that rounded them), booleans,
    complex numbers, NaN or infinities load without a word and give answers that mean nothing."""
    def kind(tensor: torch.Tensor) -> str:
        return "complex" if tensor.is_complex() else "floating point" if tensor.is_floating_point() else "integer"

    other_kind = sorted(key for key in expected if kind(saved[key]) != kind(expected[key]))
    if other_kind:
        key = other_kind[0]
        raise UserError(f"{source} holds {len(other_kind)} trainable tensors of another kind than the model's (e.g. "
                        f"'{key}' is {saved[key].dtype}, the model's is {expected[key].dtype}): the weights were cast "
                        "and lost their values. Use the file as mit-lightning wrote it.")
    not_finite = {key: int((~torch.isfinite(saved[key])).sum()) for key in expected
                  if saved[key].is_floating_point() or saved[key].is_complex()}
    not_finite = {key: count for key, count in not_finite.items() if count}
    if not_finite:
        key = next(iter(not_finite))
        raise UserError(f"{source} holds {sum(not_finite.values()):,} NaN or infinite values in {len(not_finite)} "
                        f"trainable tensors (e.g. '{key}': {not_finite[key]:,} of {saved[key].numel():,}): a model with "
                        "them predicts nothing meaningful. Train again from the last checkpoint whose weights are finite.")
