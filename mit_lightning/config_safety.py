"""A config read from a file the user did not write (a checkpoint's stored config) must not run code.

jsonargparse imports whatever a ``class_path`` — or any value typed as a callable — names. A
checkpoint is a file anyone can hand over, so the config stored in it may only name classes and
functions that this project ships, PyTorch or Lightning ones, or ones the user names themselves on
the command line or in a config file. Anything else is refused before it is imported.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

from mit_lightning.errors import UserError

#: packages whose classes a stored config may name
TRUSTED_PACKAGES = ("mit_lightning", "torch", "torchmetrics", "lightning", "pytorch_lightning", "lightning_fabric")
_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def _importable_name(text: str) -> bool:
    """A dotted name whose top-level package exists: jsonargparse could import it."""
    if not _DOTTED.match(text):
        return False
    try:
        return importlib.util.find_spec(text.split(".", 1)[0]) is not None
    except (ImportError, ValueError):
        return False


def _trusted(name: str) -> bool:
    return name.split(".", 1)[0] in TRUSTED_PACKAGES


def option_values(args: Sequence[str], option: str) -> Iterator[str]:
    """Each value given to `option` on a command line, as `--option value` or `--option=value`."""
    for position, arg in enumerate(args):
        if arg == option and position + 1 < len(args):
            yield args[position + 1]
        elif arg.startswith(option + "="):
            yield arg.split("=", 1)[1]


def user_given_text(args: Sequence[str]) -> str:
    """Everything the user wrote: the command line and the config files it names."""
    texts = list(args)
    for value in option_values(args, "--config"):
        if value and Path(value).is_file():
            texts.append(Path(value).read_text(errors="replace"))
    return "\n".join(texts)


def check_stored_config(stored: dict[str, Any], source: Path, args: Sequence[str]) -> None:
    """Refuse a stored config naming anything importable outside the trusted packages and the user's own files."""
    importable = {text for text in _strings(stored) if _importable_name(text)}
    foreign = sorted(name for name in importable if not _trusted(name))
    if not foreign:
        return
    given = user_given_text(args)
    refused = [name for name in foreign if name not in given]
    if refused:
        raise UserError(
            f"The config stored in '{source}' names {', '.join(refused)}, which is neither part of mit-lightning, "
            "PyTorch or Lightning nor named by you; it was not loaded, because importing it could run code. If you "
            "trust that class, name it yourself in a --config file or on the command line."
        )

