"""The other modalities as tokens in the LLM sequence: what token concatenation, PILL and ModeX share.

Unlike MiT's one global vector, these methods put *tokens* before the text: the CLIP patch tokens of
one block and, for sentiment, the acoustic and facial frames, each source projected to the LLM width
by its own trainable projector. The frozen LLM then reads [modality tokens | text] (`inputs_embeds`);
padded frames are masked out like padded text, and position ids count real tokens only.

`TokenFusion` is the base of those methods: it builds the token prefix, optionally adds LoRA to the
frozen LLM (peft), installs a subclass's per-layer transforms at the tap sites of
`mit_lightning.backbones.taps`, and reads the feature of the last text token.
"""

from __future__ import annotations

import math
from typing import Callable, Literal, Sequence

import torch
from torch import nn

from mit_lightning.backbones.llm import FrozenLLM, last_token
from mit_lightning.backbones.lora import LoRA, add_lora, remove_lora
from mit_lightning.backbones.taps import PAYLOAD_KWARG, LayerTap, TapPayload, check_reached, tap_layer
from mit_lightning.errors import UserError, check_choice
from mit_lightning.fusion.base import Fusion, FusionInputs, ModelDims

IMAGE = "image"
#: how each token source is mapped to the LLM width
Projector = Literal["linear", "mlp"]


def make_projector(kind: Projector, in_dim: int, out_dim: int, bias: bool = True) -> nn.Module:
    """"linear", or "mlp": two layers with GELU (LLaVA-1.5's connector)."""
    check_choice("projector", kind, Projector)
    if kind == "linear":
        return nn.Linear(in_dim, out_dim, bias=bias)
    return nn.Sequential(nn.Linear(in_dim, out_dim, bias=bias), nn.GELU(), nn.Linear(out_dim, out_dim, bias=bias))


class Resampler(nn.Module):
    """A fixed token budget: `tokens` learned queries attend to a source's tokens (one pre-norm
    cross-attention), giving `tokens` tokens whatever the number of patches or frames, as PILL's
    Q-Former gives its 32. Works in the source's width, before the projector; padded positions are
    not attended to, and a sample without any real token gets masked (False) outputs."""

    def __init__(self, width: int, tokens: int) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(tokens, width) * width**-0.5)
        self.norm = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, math.gcd(width, 8), batch_first=True)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, C) features and (B, N) mask (True = real) → (B, tokens, C) and (B, tokens)."""
        real = mask.any(dim=1)
        padding = ~mask
        padding[:, 0] &= real  # an all-padded sample attends to its (zeroed) first position, not to nothing
        keys = self.norm(features)
        queries = self.queries.expand(features.shape[0], -1, -1)
        resampled, _ = self.attention(queries, keys, keys, key_padding_mask=padding, need_weights=False)
        return resampled, real[:, None].expand(-1, self.queries.shape[0])


class ModalityTokens(nn.Module):
    """Projects each token source to the LLM width: CLIP patch tokens ("image") and raw feature sequences.

    Args:
        dims: model sizes.
        method: the fusion method's name, for messages.
        vision_block: 1-based CLIP block whose patch tokens are used; None = the penultimate block (LLaVA).
        projector: "linear" or "mlp".
        bias: whether the projector's layers have a bias.
        modalities: the sources, in sequence order ("image" and/or sequence modalities); None = every
            source the model has (the image first, then the sequences by name).
        tokens: a token budget per source: a learned-query `Resampler` gives this many tokens of each
            (PILL's Q-Former: 32); None = every patch or frame (576 patches at ViT-L/14-336).
    """

    def __init__(
        self,
        dims: ModelDims,
        method: str,
        vision_block: int | None = None,
        projector: Projector = "mlp",
        bias: bool = True,
        modalities: Sequence[str] | None = None,
        tokens: int | None = None,
    ) -> None:
        super().__init__()
        if tokens is not None and tokens < 1:
            raise UserError(f"{method} token budget must be a positive number of tokens or null (all); got {tokens}.")
        widths = {**({IMAGE: dims.vision_width} if dims.vision_width is not None else {}), **dict(sorted(dims.sequences.items()))}
        chosen = list(widths) if modalities is None else list(modalities)
        if not chosen:
            raise UserError(
                f"{method} puts the other modalities into the LLM sequence as tokens, but this model has none: "
                "configure a vision tower (model.vision) or sequence modalities (model.sequence_modalities)."
            )
        unknown = [name for name in chosen if name not in widths]
        if unknown:
            raise UserError(f"{method} modalities {unknown} give no tokens in this model; available: {list(widths)}.")
        self.vision_block: int | None = None
        if IMAGE in chosen:
            block = vision_block if vision_block is not None else max(dims.vision_depth - 1, 1)
            if not 1 <= block <= dims.vision_depth:
                raise UserError(f"{method} vision_block {block} is outside the vision tower's {dims.vision_depth} blocks.")
            self.vision_block = block
        self.projectors = nn.ModuleDict(
            {name: make_projector(projector, widths[name], dims.llm.hidden_size, bias) for name in chosen}
        )
        self.resamplers = nn.ModuleDict({name: Resampler(widths[name], tokens) for name in chosen} if tokens else {})

    @property
    def vision_blocks(self) -> tuple[int, ...]:
        return (self.vision_block,) if self.vision_block is not None else ()

    def forward(self, inputs: FusionInputs, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, d) tokens in `dtype` and their (B, N) bool mask, True = real (padded frames are False)."""
        tokens, masks = [], []
        for name, projector in self.projectors.items():
            if name == IMAGE:
                features = inputs.vision_tokens[self.vision_block]
                mask = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
            else:
                mask = inputs.sequence_masks[name].bool()
                # padding may hold anything (even -inf): zeroed, so masked positions stay finite
                features = inputs.sequences[name].masked_fill(~mask[..., None], 0.0)
            weight = next(projector.parameters())
            if name in self.resamplers:
                features, mask = self.resamplers[name](features.to(weight.dtype), mask)
            tokens.append(projector(features.to(weight.dtype)).to(dtype))
            masks.append(mask)
        return torch.cat(tokens, dim=1), torch.cat(masks, dim=1)


class TokenFusion(Fusion):
    """Base of the methods that put modality tokens before the text in the frozen LLM's sequence.

    Subclasses add per-layer transforms (`layer_transforms`) and, where those need per-call data,
    their own payload (`make_payload`); every call carries the (B, L) mask of modality-token positions.

    Args:
        dims: model sizes.
        vision_block, projector, modalities, tokens: see `ModalityTokens`.
        projector_bias: whether the projector has biases.
        lora: LoRA on the frozen LLM (peft); None = the LLM's weights are left as they are.
    """

    method = "Token fusion"
    needs_sequence_vectors = False

    def __init__(
        self,
        dims: ModelDims,
        vision_block: int | None = None,
        projector: Projector = "mlp",
        modalities: Sequence[str] | None = None,
        lora: LoRA | None = None,
        projector_bias: bool = True,
        tokens: int | None = None,
    ) -> None:
        super().__init__()
        self.tokens = ModalityTokens(dims, self.method, vision_block, projector, projector_bias, modalities, tokens)
        self.vision_blocks = self.tokens.vision_blocks
        self.lora = lora
        self._taps: list[LayerTap] = []
        self._lora_model: list[nn.Module] = []  # the decoder LoRA was added to (a list: not a submodule)

    def layer_transforms(self, layer_index: int) -> dict[str, Callable]:
        """The transforms of decoder layer `layer_index` (0-based), by tap site; none by default."""
        return {}

    def make_payload(self, modality: torch.Tensor) -> TapPayload:
        """The per-call data of the transforms; `modality` is (B, L) bool, True at modality-token positions."""
        return TapPayload()

    def attach(self, llm: FrozenLLM) -> None:
        """LoRA first, so that taps on a wrapped layer (o_proj) see its output with the LoRA update."""
        self.detach()
        if self.lora is not None:
            add_lora(llm.model, self.lora)
            self._lora_model = [llm.model]
        transforms = {index: self.layer_transforms(index) for index in range(llm.shape.num_layers)}
        self._taps = [tap_layer(llm.model, index, **sites) for index, sites in transforms.items() if sites]

    def detach(self) -> None:
        for tap in self._taps:
            tap.remove()
        self._taps = []
        for model in self._lora_model:
            remove_lora(model)
        self._lora_model = []

    def forward(self, llm: FrozenLLM, input_ids, attention_mask, inputs: FusionInputs) -> torch.Tensor:
        text = llm.embed(input_ids)
        tokens, token_mask = self.tokens(inputs, text.dtype)
        embeds = torch.cat([tokens, text], dim=1)
        mask = torch.cat([token_mask.to(attention_mask.dtype), attention_mask], dim=1)
        if not self._taps:
            return last_token(llm(mask, inputs_embeds=embeds), mask)
        modality = torch.cat([torch.ones_like(token_mask), torch.zeros_like(attention_mask, dtype=torch.bool)], dim=1)
        payload = self.make_payload(modality)
        hidden = llm(mask, inputs_embeds=embeds, **{PAYLOAD_KWARG: payload})
        check_reached(payload, self._taps, self.method)
        return last_token(hidden, mask)
