"""Reading weight files safely: checkpoints, CLIP and LLM weights never run code, and never end in a traceback.

Every file goes through `torch.load(weights_only=True)` (tensors and plain data only). A file that is
empty, truncated, not a torch file, or carries pickled objects is refused with one message naming it
— never torch's advice to retry with ``weights_only=False``, which would run whatever the file holds.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from mit_lightning.errors import UserError


#: what torch, safetensors and the libraries calling them raise for a file that is not a complete weight file
WEIGHT_FILE_ERRORS = (pickle.UnpicklingError, EOFError, RuntimeError, zipfile.BadZipFile, SafetensorError)


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
        return torch.load(path, map_location="cpu", weights_only=True)
    except (*WEIGHT_FILE_ERRORS, ValueError, OSError) as error:
        raise unreadable_weights(path, what, error) from None
