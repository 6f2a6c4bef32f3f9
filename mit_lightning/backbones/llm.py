"""The frozen decoder-only LLM: loading, tokenising and reading the last-token feature.

Any HuggingFace decoder of the LLaMA family works (LLaMA-2/3, Mistral, Qwen2, ...): what MiT needs
is a stack of decoder layers with `self_attn` (k/v projections) and a gated `mlp.down_proj`.
Only the base model is loaded (no LM head): MiT reads hidden states, never logits. It comes from a
HuggingFace folder, a GGUF file (`gguf.py`) or a preset, and may be quantised as it loads
(`quantization.py`): MiT trains only modules beside it, so a 4-bit base costs nothing in what trains.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from mit_lightning.backbones.lora import set_lora_training
from mit_lightning.backbones.presets import LLM_PRESETS, preset_llm_config, seeded_init, tiny_tokenizer
from mit_lightning.backbones.fingerprint import WEIGHT_SUFFIXES
from mit_lightning.backbones.gguf import GGUF_SUFFIX, check_gguf_file, gguf_loading
from mit_lightning.backbones.quantization import (
    Quantization,
    check_quantization,
    keep_differentiable,
    quantization_options,
    quantize_through_folder,
)
from mit_lightning.checkpoints import WEIGHT_FILE_ERRORS, is_broken_file, unreadable_weights
from mit_lightning.errors import UserError, check_choice, expand_env

#: dtypes the frozen weights may be kept in
DType = Literal["bfloat16", "float16", "float32"]
#: a HuggingFace tokenizer is saved as one of these (LLaMA-2/Mistral: tokenizer.model; Qwen2: vocab.json + merges.txt)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def torch_dtype(name: DType) -> torch.dtype:
    check_choice("dtype", name, DType)
    return getattr(torch, name)


#: transformers' built-in attention implementations
Attention = Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"]


@dataclass
class LLMConfig:
    """Which LLM to load and how.

    Args:
        path: local HuggingFace model folder (config.json, weights, tokenizer files), a GGUF file
            (read through transformers' GGUF support, tokenizer included, dequantised into `dtype`), or a preset
            built locally with random weights: tiny (LLaMA), tiny-mistral, tiny-qwen2 (tests, demo),
            random-llama-2-7b, random-llama-2-13b, random-llama-16x1024 (benchmarks).
        dtype: dtype of the frozen weights (bfloat16 in the paper).
        attention: the attention kernel the infused layers keep using (transformers' implementations; a choice,
            so a config can never name a kernel to fetch from elsewhere).
        padding_side: where the tokenizer pads; the last-token feature is correct for both.
        max_text_tokens: prompts longer than this are cut from the left (the task suffix is kept).
        seed: seed of a preset's random weights (frozen weights are rebuilt, not saved).
        activation_checkpointing: recompute each decoder layer during backward instead of keeping its
            activations: less memory (long prompts, big batches, token-concatenation baselines) for
            about one more forward of the layers that backward reaches (those from the first infused one).
        quantization: the frozen decoder layers' linear weights stored in 8 bits (int8, LLM.int8) or 4 bits
            (nf4, QLoRA's NormalFloat) through bitsandbytes, computing in `dtype`; embeddings and norms stay in
            `dtype`. Needs the bitsandbytes package; runs on CPU and CUDA.
    """

    path: str = "${MIT_LLM_PATH:-checkpoints/Llama-2-7b-hf}"
    dtype: DType = "bfloat16"
    attention: Attention = "sdpa"
    padding_side: Literal["left", "right"] = "right"
    max_text_tokens: int = 128
    seed: int = 0
    activation_checkpointing: bool = False
    quantization: Quantization = "none"

    def __post_init__(self) -> None:
        check_choice("model.llm.attention", self.attention, Attention)
        check_choice("model.llm.quantization", self.quantization, Quantization)

    @property
    def preset(self) -> str | None:
        """The preset name, when `path` (after ${VAR} expansion) names one."""
        name = expand_env(self.path)
        return name if name in LLM_PRESETS else None

    @property
    def is_gguf(self) -> bool:
        return expand_env(self.path).lower().endswith(GGUF_SUFFIX)

    def local_path(self) -> Path:
        """The model folder or GGUF file, checked: a clear message instead of a hub lookup or a traceback."""
        path = Path(expand_env(self.path))
        if self.is_gguf:
            check_gguf_file(path)
            return path
        hint = (
            "Set model.llm.path (or the MIT_LLM_PATH environment variable) to a local HuggingFace model folder or "
            "a .gguf file, e.g. the LLaMA-2-7B weights converted to HF format; see README.md. Use 'tiny' for a random "
            "test model."
        )
        if not path.is_dir():
            raise UserError(f"LLM weights not found: expected a model folder at '{path}'. {hint}")
        if not (path / "config.json").is_file():
            raise UserError(f"LLM folder '{path}' has no config.json, so it is not a HuggingFace model folder. {hint}")
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise UserError(f"LLM folder '{path}' has no tokenizer (none of {', '.join(TOKENIZER_FILES)}). Copy the "
                            "tokenizer files of the model's download into it.")
        return path

    def hf_config(self):
        """The model's configuration, read without loading weights (to size the trainable parts)."""
        if self.preset:
            return preset_llm_config(self.preset, len(tiny_tokenizer()))
        from transformers import AutoConfig

        path = self.local_path()
        if self.is_gguf:
            with gguf_loading(path, "its model configuration"):
                return AutoConfig.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
        _check_config_json(path / "config.json")
        try:
            return AutoConfig.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as error:
            raise UserError(f"Cannot read the model config '{path / 'config.json'}': {_first_line(error)} "
                            "Restore the model's original config.json.") from error


def _check_config_json(file: Path) -> None:
    """The two ways a hand-edited config.json usually breaks, named before transformers reports them at length."""
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise UserError(f"'{file}' is not valid JSON ({error}). Restore the model's original config.json.") from error
    if not isinstance(config, dict) or "model_type" not in config:
        raise UserError(f"'{file}' has no model_type, so it does not say which architecture it describes (e.g. "
                        "\"llama\"). Restore the model's original config.json.")


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


@dataclass(frozen=True)
class LLMShape:
    """The sizes of a decoder that infusion modules are built against."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int

    @classmethod
    def from_hf_config(cls, config) -> "LLMShape":
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        missing = [name for name in required if getattr(text, name, None) is None]
        if missing:
            raise UserError(
                f"{type(config).__name__} does not describe a LLaMA-family decoder MiT can infuse (no {', '.join(missing)}). "
                "Use a LLaMA, Mistral, Qwen2 or similar decoder-only model."
            )
        heads = text.num_attention_heads
        return cls(
            hidden_size=text.hidden_size,
            num_layers=text.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            intermediate_size=text.intermediate_size,
        )


def _set_pad_token(tokenizer) -> None:
    """LLaMA tokenizers ship without a pad token; any id works since padding is masked out."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    if tokenizer.pad_token is None:
        raise UserError("The tokenizer has no pad, unk or eos token to pad with; add a pad token to its files.")


class FrozenLLM(nn.Module):
    """A frozen, eval-mode decoder plus its tokenizer; returns hidden states of every token."""

    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        self.config = config
        check_quantization(config.quantization, torch.get_default_device())
        self.tokenizer = self._load_tokenizer()
        self.cut_prompts = 0  # prompts cut to max_text_tokens since `take_cut_prompts` last asked
        self.model = self._load_model()
        keep_differentiable(self.model)
        self.model.requires_grad_(False)
        self.model.eval()
        self.shape = LLMShape.from_hf_config(self.model.config)
        _check_structure(self.model)
        if config.activation_checkpointing:
            _enable_activation_checkpointing(self.model)

    def _load_tokenizer(self):
        if self.config.preset:
            tokenizer = tiny_tokenizer()
        else:
            from transformers import AutoTokenizer

            path = self.config.local_path()
            if self.config.is_gguf:
                with gguf_loading(path, "its tokenizer"):
                    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
            else:
                tokenizer = self._load_folder_tokenizer(path)
        _set_pad_token(tokenizer)
        tokenizer.padding_side = self.config.padding_side
        tokenizer.truncation_side = "left"
        return tokenizer

    @staticmethod
    def _load_folder_tokenizer(path: Path):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as error:
            raise UserError(f"Cannot load the tokenizer of '{path}': {_first_line(error)} Copy the tokenizer "
                            "files of the model's download into it.") from error

    def _load_model(self) -> nn.Module:
        from transformers import AutoModel

        dtype = torch_dtype(self.config.dtype)
        options = dict(dtype=dtype, attn_implementation=self.config.attention)
        quantized = quantization_options(self.config.quantization, dtype)
        if self.config.preset:
            with seeded_init(self.config.seed):
                model = AutoModel.from_config(self.config.hf_config(), **options)
            return quantize_through_folder(model, {**options, **quantized}) if quantized else model
        path = self.config.local_path()
        if self.config.is_gguf:
            with gguf_loading(path, "its weights"):
                model = AutoModel.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True, **options)
            return quantize_through_folder(model, {**options, **quantized}) if quantized else model
        try:
            return AutoModel.from_pretrained(path, local_files_only=True, **options, **quantized)
        except WEIGHT_FILE_ERRORS as error:
            if not is_broken_file(error):
                raise
            weights = [file for file in sorted(path.iterdir()) if file.suffix in WEIGHT_SUFFIXES]
            raise unreadable_weights(weights[0] if len(weights) == 1 else path, "LLM weights", error) from None

    def train(self, mode: bool = True) -> "FrozenLLM":
        """Stay in eval mode: the frozen model has no dropout to train (and Lightning calls train()).

        With activation checkpointing, the decoder layers alone follow `mode`: HF layers checkpoint only
        while `training` is set, and their submodules (attention, MLP) stay in eval mode. Adapters a
        fusion method added (LoRA) follow `mode` too, so that their dropout acts while training.
        """
        super().train(False)
        set_lora_training(self.model, mode)
        if self.config.activation_checkpointing:
            from transformers.modeling_layers import GradientCheckpointingLayer

            for module in self.model.modules():
                if isinstance(module, GradientCheckpointingLayer):
                    module.training = mode
        return self

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def tokenize(self, prompts: list[str], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        limit = self.config.max_text_tokens
        encoded = self.tokenizer(prompts, padding=True, truncation=True, max_length=limit)  # lists: no tensor to read
        at_limit = [prompt for prompt, mask in zip(prompts, encoded["attention_mask"]) if sum(mask) >= limit]
        if at_limit:  # rare: only prompts that fill the limit are tokenized again, whole, to see if they were cut
            self.cut_prompts += sum(len(ids) > limit for ids in self.tokenizer(at_limit, verbose=False)["input_ids"])
        return (_to_device(torch.tensor(encoded["input_ids"]), device),
                _to_device(torch.tensor(encoded["attention_mask"]), device))

    def take_cut_prompts(self) -> int:
        """How many prompts lost their beginning to max_text_tokens since the last call."""
        count, self.cut_prompts = self.cut_prompts, 0
        return count

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def forward(
        self,
        attention_mask: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **layer_kwargs: Any,
    ) -> torch.Tensor:
        """Hidden states (B, T, d) after the final norm; `layer_kwargs` reach every attention call.

        Position ids count real tokens only, so left- and right-padded batches give the same features.
        """
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        output = self.model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            **layer_kwargs,
        )
        return output.last_hidden_state


def _to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A copy from pageable memory to a GPU waits until the GPU is idle; a pinned, non-blocking one does not."""
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _enable_activation_checkpointing(model: nn.Module) -> None:
    """HF's per-layer checkpointing, non-reentrant so that keyword arguments (the payload) are replayed.

    transformers 5 also makes the input embeddings require grad, which would build a graph through
    every layer below the first infused one; MiT's graph starts inside the infused layers, so that
    hook is removed again.
    """
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.disable_input_require_grads()
    else:  # transformers 4
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def last_token(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The hidden state of each sequence's last non-padding token (left or right padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (positions * attention_mask.long()).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def _check_structure(model: nn.Module) -> None:
    """Fail at load time, not mid-training, when the model is not a LLaMA-style decoder."""
    layers = getattr(model, "layers", None)
    problem = None
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        problem = "it has no `layers` list of decoder layers"
    else:
        layer = layers[0]
        attention = getattr(layer, "self_attn", None)
        if attention is None or not hasattr(attention, "layer_idx"):
            problem = "its decoder layers have no `self_attn` with a `layer_idx`"
        elif not hasattr(getattr(layer, "mlp", None), "down_proj"):
            problem = "its decoder layers have no gated MLP with `down_proj`"
    if problem:
        raise UserError(
            f"{type(model).__name__} is not a LLaMA-family decoder MiT can infuse: {problem}. "
            "Use a LLaMA, Mistral, Qwen2 or similar decoder-only model."
        )
