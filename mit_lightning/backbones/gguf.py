"""A GGUF file (llama.cpp's single-file format) as the frozen LLM, read through transformers' GGUF support.

transformers dequantises the file's tensors into the requested dtype and builds the tokenizer from
the file's vocabulary, so a GGUF model runs like a folder's. What can go wrong is said in one line
naming the file: a missing `gguf` package, a truncated or foreign file, an architecture transformers
cannot read from GGUF.
"""

from __future__ import annotations

import importlib.util
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from mit_lightning.errors import UserError

GGUF_SUFFIX = ".gguf"


def check_gguf_file(path: Path) -> None:
    """Before anything loads: the file is there and the package that reads it is installed."""
    if not path.is_file():
        raise UserError(f"LLM weights not found: expected a GGUF file at '{path}'. Set model.llm.path (or the "
                        "MIT_LLM_PATH environment variable) to a local .gguf file or HuggingFace model folder.")
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"Reading the GGUF file '{path}' needs the gguf package: pip install gguf")


@contextmanager
def gguf_loading(path: Path, what: str) -> Iterator[None]:
    """transformers' and gguf's errors while reading `path`, as one line naming it."""
    try:
        yield
    except (ValueError, KeyError, IndexError, OSError, struct.error) as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"Cannot read {what} from the GGUF file '{path}': {detail}. The file may be truncated or "
                        "damaged (copy it again), or hold an architecture transformers cannot read from GGUF "
                        "(use a LLaMA-family model).") from None
