"""The frozen LLM quantised as it loads (bitsandbytes through transformers' quantization configs).

MiT trains only small modules beside the frozen LLM, so its decoder layers' linear weights can be
stored in 8 bits (LLM.int8) or 4 bits (NF4, as in QLoRA) at no cost in what trains: LLaMA-2-70B's
weights take about 35 GB in NF4. The taps still see each layer's own key, value and FFN
activations, now those of the quantised model, so the gated infusion is still the identity at
initialisation relative to it. transformers quantises only while loading from files, so a model
built in memory (a random preset, a dequantised GGUF file) passes through a temporary folder.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch

from mit_lightning.errors import UserError

#: how the decoder layers' linear weights are stored
Quantization = Literal["none", "int8", "nf4"]
#: devices bitsandbytes runs these on
QUANTIZED_DEVICES = ("cpu", "cuda")


def check_quantization(quantization: Quantization, device: torch.device) -> None:
    """Before anything loads: the backend is installed and runs on `device`."""
    if quantization == "none":
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"model.llm.quantization {quantization} needs the bitsandbytes package: pip install bitsandbytes")
    if device.type not in QUANTIZED_DEVICES:
        raise UserError(f"model.llm.quantization {quantization} (bitsandbytes) cannot run on {device.type}; it runs on "
                        f"{' and '.join(QUANTIZED_DEVICES)}. Use model.llm.quantization none there.")


def quantization_options(quantization: Quantization, dtype: torch.dtype) -> dict[str, Any]:
    """`from_pretrained` arguments loading the weights quantised onto the current default device (none: {})."""
    if quantization == "none":
        return {}
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    # placed by the loader, never cast by a later .to(dtype)
    return {"quantization_config": config, "device_map": {"": torch.get_default_device()}}


def save_model_folder(model: torch.nn.Module, folder: str | Path) -> None:
    """A model built in memory as a HuggingFace folder (config.json, model.safetensors) that loads from files."""
    from safetensors.torch import save_file

    config = model.config
    if getattr(config, "quantization_config", None) is not None:  # a GGUF model's record of its file
        del config.quantization_config
    config.save_pretrained(folder)
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()},
              str(Path(folder) / "model.safetensors"), metadata={"format": "pt"})


def quantize_through_folder(model: torch.nn.Module, options: dict[str, Any]) -> torch.nn.Module:
    """`model` (built in memory) saved to a temporary folder and loaded back with `options` (quantising ones)."""
    from transformers import AutoModel

    with tempfile.TemporaryDirectory(prefix="mit-quantize-") as folder:
        save_model_folder(model, folder)
        del model
        return AutoModel.from_pretrained(folder, local_files_only=True, **options)


def keep_differentiable(model: torch.nn.Module) -> None:
    """Keep bitsandbytes' 4-bit layers on their autograd path on a CPU.

    In eval mode (the frozen LLM always is) a 4-bit layer that once sees an input without grad repacks
    its weights for a CPU kernel that has no backward, after which gradients through it are silently
    zero: every layer after the first infused one would stop passing the infusion's gradient down.
    """
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
