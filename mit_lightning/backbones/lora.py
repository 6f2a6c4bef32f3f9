"""LoRA inside the frozen LLM, made by peft.

LoRA is an option of the token-based fusion methods: token concatenation + LoRA is the usual
LLaVA-style tuning. peft wraps the targeted linear layers of the frozen decoder, so the LoRA weights
live inside the frozen model; `lora_parameter_names` finds them by structure (peft's tuner layers
and their LoRA sub-layers), which is how they train and are saved while the frozen weights are not.

peft is imported only when LoRA is used: without it imported, a model holds no peft layer.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from torch import nn

from mit_lightning.errors import UserError

_TUNERS_MODULE = "peft.tuners.tuners_utils"


@dataclass
class LoRA:
    """LoRA on linear layers of the frozen LLM (peft's LoraConfig; B starts at 0, so the LLM is unchanged at first).

    Args:
        rank: r, the rank of the update B·A.
        alpha: the update is scaled by alpha / rank.
        target_modules: names of the decoder's linear layers to adapt (q_proj, k_proj, v_proj, o_proj,
            gate_proj, up_proj, down_proj in LLaMA-family models).
        dropout: dropout on the LoRA input while training.
    """

    rank: int = 16
    alpha: float = 32.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise UserError(f"LoRA rank must be a positive integer; got {self.rank} (lora.rank).")
        if not self.target_modules:
            raise UserError("LoRA needs at least one target module (lora.target_modules), e.g. [q_proj, k_proj, v_proj].")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"LoRA dropout must be in [0, 1); got {self.dropout} (lora.dropout).")


def add_lora(model: nn.Module, lora: LoRA) -> None:
    """Wrap the target layers of `model` with LoRA, in place; the adapters are kept in float32.

    float32 adapters on a bf16 model: peft casts each layer's input to the adapter's dtype and the
    sum back, so the frozen weights stay bf16 while what trains keeps full-precision weights.
    """
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import cast_adapter_dtype

    config = LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.target_modules), lora_dropout=lora.dropout,
        bias="none",
    )
    try:
        inject_adapter_in_model(config, model)
    except ValueError as error:
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)})
        raise UserError(
            f"LoRA target modules {list(lora.target_modules)} do not match the LLM's layers ({str(error).splitlines()[0]}). "
            f"Its linear layers are named {linear}."
        ) from None
    cast_adapter_dtype(model, "default")


def remove_lora(model: nn.Module) -> None:
    """Put the original layers back in place of peft's wrappers (their LoRA weights are dropped)."""
    for name, layer in lora_layers(model):
        model.set_submodule(name, layer.get_base_layer())


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """peft's tuner layers inside `model`, by name (outermost first)."""
    tuners = sys.modules.get(_TUNERS_MODULE)
    if tuners is None:
        return []
    return [(name, module) for name, module in model.named_modules() if isinstance(module, tuners.BaseTunerLayer)]


def lora_parameter_names(model: nn.Module, prefix: str = "") -> set[str]:
    """Names (as in `model.named_parameters(prefix)`) of the LoRA weights peft added to `model`."""
    names: set[str] = set()
    for name, layer in lora_layers(model):
        for attribute in layer.adapter_layer_names:
            part = getattr(layer, attribute, None)
            if isinstance(part, nn.Module):
                path = ".".join(piece for piece in (prefix, name, attribute) if piece)
                names.update(parameter for parameter, _ in part.named_parameters(prefix=path))
    return names


def set_lora_training(model: nn.Module, mode: bool) -> None:
    """LoRA layers follow `mode` (their dropout acts while training); the layers they wrap stay in eval mode."""
    for _, layer in lora_layers(model):
        layer.train(mode)
        layer.get_base_layer().train(False)
