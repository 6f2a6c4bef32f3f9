"""Multimodal Infusion Tuning (MiT), paper section 3.1, Eq. 1–7.

In each chosen decoder layer, the global vector I of the other modalities (B, d_I) is infused into
every text token:

    I_d^k = I·W_d^k + b_d^k,   I_a^k = I·W_a^k + b_a^k   (and the same for V)        Eq. 1
    K' = K ⊙ I_d^k + I_a^k,    V' = V ⊙ I_d^v + I_a^v                                 Eq. 2, 3
    L' = L + cos(V, I_a^v)   per head                                                Eq. 4
    K^r = K + σ(L') ⊙ (K' − K),   V^r = V + σ(L') ⊙ (V' − V)     (form="gated")      Eq. 5
    attention(Q, K^r, V^r) as usual                                                  Eq. 6
    H' = H ⊙ (I·W^f + b^f)   on the gated-MLP activation act(gate(x)) ⊙ up(x)         Eq. 7

Choices where the paper cannot be taken literally (see docs in README):
- Eq. 4 compares V with I_a^v, the value add-embedding of the same head (same size as V), and
  pools over the sample's real tokens: cos(flatten_t V_h, repeat_t I_a,h) — one value per head
  and sample, like the authors' release.
- Eq. 5, `form`:
  "gated" (default) gates the *change*, so freshly initialised infusion (W=0, b_d=1, b_a=0,
  b^f=1) leaves the LLM exactly as it was ("progressive infusion");
  "paper" is Eq. 5 literally, K^r = K' ⊙ σ(L') (not the identity at initialisation);
  "release" is the authors' code, K^r = K + (K ⊙ I_d + I_a) ⊙ σ(L'), with PyTorch's default init.
  One difference remains in every form: the authors' code takes Eq. 4's cosine over all positions,
  padding included, so its output for a sample depends on how much its batch is padded; here the
  cosine covers the sample's real tokens only.
- K is infused after the rotary embedding (the attention extension point sees post-RoPE keys;
  the release does the same). With grouped-query attention, K/V have `num_kv_heads` heads and
  the maps are sized accordingly.
- Layers are 1-based like the paper: [13, 17, 21, 25, 29, 32] for a 32-layer LLM.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

import torch
from torch import nn

from mit_lightning.backbones.llm import FrozenLLM, LLMShape, last_token
from mit_lightning.backbones.taps import PAYLOAD_KWARG, LayerTap, TapPayload, check_reached, tap_layer
from mit_lightning.errors import UserError, check_choice
from mit_lightning.fusion.base import Fusion, FusionInputs, ModelDims

PAPER_LAYERS = (13, 17, 21, 25, 29, 32)
#: Eq. 5 as this project gates it (identity at init), literally as the paper writes it, or as the authors' code does
Form = Literal["gated", "paper", "release"]
#: the infusion maps' initialisation: the paper's identity or PyTorch's default (the authors' code)
Init = Literal["identity", "default"]


@dataclass
class InfusionPayload(TapPayload):
    """Per-batch inputs every infused layer reads: the vector I and which tokens are real."""

    vector: torch.Tensor  # (B, d_I), in the maps' compute dtype
    token_mask: torch.Tensor  # (B, T) float32, 1 = real token


def head_cosine(value: torch.Tensor, add: torch.Tensor, token_mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """cos(V_h flattened over real tokens, I_a,h repeated over them) → (B, H).

    value: (B, H, T, d); add: (B, H, 1, d); token_mask: (B, T). The dot product is taken as
    (Σ_t m_t V_t) · I_a, so the (B, H, T, d) values are read twice (a masked sum and squared norms)
    rather than once per product term.
    """
    with torch.autocast(value.device.type, enabled=False):  # float32 throughout: autocast would cast back for einsum
        value, add = value.float(), add.float().squeeze(2)
        mask = token_mask.to(torch.float32)
        dot = (torch.einsum("bt,bhtd->bhd", mask, value) * add).sum(dim=-1)
        value_norm = torch.einsum("bt,bht->bh", mask, value.square().sum(dim=-1)).sqrt()
        repeated_add_norm = add.norm(dim=-1) * mask.sum(dim=-1, keepdim=True).sqrt()
        return dot / (value_norm * repeated_add_norm).clamp_min(eps)


def relative_change(new: torch.Tensor, old: torch.Tensor, token_mask: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """|new − old| / |old| per sample and head over the sample's real tokens: (B, H, T, d) → (B, H)."""
    mask = token_mask[:, None, :, None].to(old.dtype)
    change = ((new.float() - old.float()) * mask).square().sum(dim=(2, 3)).sqrt()
    return change / ((old.float() * mask).square().sum(dim=(2, 3)).sqrt() + eps)


class InfusionLayer(nn.Module):
    """The trainable part of one infused decoder layer (Eq. 1–5 and 7)."""

    def __init__(
        self,
        in_dim: int,
        shape: LLMShape,
        *,
        kv: bool,
        ffn: bool,
        rescale: bool,
        form: Form,
        init: Init,
        head_scale_init: float,
    ) -> None:
        super().__init__()
        check_choice("MiT form", form, Form)
        check_choice("MiT init", init, Init)
        self.num_kv_heads, self.head_dim = shape.num_kv_heads, shape.head_dim
        self.form = form
        kv_size = shape.num_kv_heads * shape.head_dim
        # each map outputs [multiply | add] (Eq. 1); one matmul instead of two
        self.key_maps = nn.Linear(in_dim, 2 * kv_size) if kv else None
        self.value_maps = nn.Linear(in_dim, 2 * kv_size) if kv else None
        self.head_scale = nn.Parameter(torch.full((shape.num_kv_heads,), float(head_scale_init))) if kv and rescale else None
        self.ffn_map = nn.Linear(in_dim, shape.intermediate_size) if ffn else None
        #: set to a dict to record, per batch, the gate σ(L') and the relative size of each infusion (`observe`)
        self.observed: dict[str, list[torch.Tensor]] | None = None
        if init == "identity":
            self._init_identity(kv_size)

    @torch.no_grad()
    def _init_identity(self, kv_size: int) -> None:
        """Added terms start at 0 and multiplied terms at 1 (paper, "progressive infusion")."""
        for maps in (self.key_maps, self.value_maps):
            if maps is not None:
                maps.weight.zero_()
                maps.bias[:kv_size].fill_(1.0)
                maps.bias[kv_size:].zero_()
        if self.ffn_map is not None:
            self.ffn_map.weight.zero_()
            self.ffn_map.bias.fill_(1.0)

    def _multiply_add(self, maps: nn.Linear, vector: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, d_I) → multiply and add terms shaped (B, H, 1, d) to broadcast over tokens."""
        terms = maps(vector)
        multiply, add = terms.view(vector.shape[0], 2, self.num_kv_heads, 1, self.head_dim).unbind(dim=1)
        return multiply, add

    def _scale_shift(self, multiply: torch.Tensor, add: torch.Tensor,
                     gate: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 2–5 of each form as K^r = K ⊙ scale + shift, with scale and shift (B, H, 1, d).

        gated: K + σ(K ⊙ m + a − K) = K ⊙ (1 + σ(m − 1)) + σa; paper: σ(K ⊙ m + a) = K ⊙ σm + σa;
        release: K + σ(K ⊙ m + a) = K ⊙ (1 + σm) + σa (σ the per-head gate σ(L'), 1 without
        rescaling, where the gated form is K' itself and release K + K'). Only these small
        terms are combined; the (B, H, T, d) keys and values are touched by one multiply-add. At
        identity initialisation (m = 1, a = 0) the gated scale is exactly 1 and the shift exactly 0.
        """
        if gate is None:
            return (1 + multiply if self.form == "release" else multiply), add
        if self.form == "release":
            scale = 1 + multiply * gate
        elif self.form == "paper":
            scale = multiply * gate
        else:
            scale = 1 + gate * (multiply - 1)
        return scale, add * gate

    def infuse_kv(self, key: torch.Tensor, value: torch.Tensor, payload: InfusionPayload):
        """Eq. 1–5 on post-RoPE keys and values (B, H_kv, T, d)."""
        key_multiply, key_add = self._multiply_add(self.key_maps, payload.vector)
        value_multiply, value_add = self._multiply_add(self.value_maps, payload.vector)
        gate = None
        if self.head_scale is not None:
            similarity = head_cosine(value, value_add, payload.token_mask)  # in float32: a sum over T·d terms
            # in the maps' dtype (bf16 under autocast): the small terms combine without a cast per operation
            gate = torch.sigmoid(self.head_scale + similarity)[:, :, None, None].to(key_multiply.dtype)
        key_scale, key_shift = self._scale_shift(key_multiply, key_add, gate)
        value_scale, value_shift = self._scale_shift(value_multiply, value_add, gate)
        new_key = torch.addcmul(key_shift, key, key_scale)
        new_value = torch.addcmul(value_shift, value, value_scale)
        if self.observed is not None:
            if gate is not None:
                self._record("gate", gate[:, :, 0, 0])
            self._record("key", relative_change(new_key, key, payload.token_mask))
            self._record("value", relative_change(new_value, value, payload.token_mask))
        return new_key.to(key.dtype), new_value.to(value.dtype)

    def infuse_ffn(self, activation: torch.Tensor, payload: InfusionPayload) -> torch.Tensor:
        """Eq. 7 on the gated-MLP activation (B, T, d_ff)."""
        scale = self.ffn_map(payload.vector)
        infused = activation * scale[:, None, :]
        if self.observed is not None:
            self._record("ffn", relative_change(infused[:, None], activation[:, None], payload.token_mask))
        return infused.to(activation.dtype)

    def _record(self, name: str, values: torch.Tensor) -> None:
        self.observed.setdefault(name, []).append(values.detach().float().cpu())


class MiT(Fusion):
    """Infuses the modality vectors into K/V and FFN of the chosen layers of the frozen LLM.

    Args:
        layers: 1-based indices of the infused decoder layers (paper: 13,17,21,25,29,32 of 32).
        kv: infuse keys and values (Eq. 1–3).
        ffn: infuse the feed-forward activation (Eq. 7).
        rescale: adaptive per-head rescaling (Eq. 4–5); only acts with kv.
        form: "gated" (identity at init, default), "paper" (Eq. 5 literally) or "release" (authors' code).
        init: "identity" (paper: added terms 0, multiplied 1) or "default" (PyTorch init);
            None picks "default" for form="release" and "identity" otherwise.
        head_scale_init: initial value of the per-head vector L.
        modalities: which modality vectors are infused (concatenated, in this order); None = all, sorted.
    """

    def __init__(
        self,
        dims: ModelDims,
        layers: Sequence[int] = PAPER_LAYERS,
        kv: bool = True,
        ffn: bool = True,
        rescale: bool = True,
        form: Form = "gated",
        init: Init | None = None,
        head_scale_init: float = 1.0,
        modalities: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if not (kv or ffn):
            raise UserError("MiT with kv=false and ffn=false infuses nothing; use mit_lightning.fusion.TextOnly instead.")
        self.layer_numbers = _check_layers(layers, dims.llm.num_layers)
        self.modalities = _check_modalities(modalities, dims.vectors)
        in_dim = sum(dims.vectors[name] for name in self.modalities)
        init = init or ("default" if form == "release" else "identity")
        self.infusions = nn.ModuleDict(
            {
                str(number): InfusionLayer(
                    in_dim, dims.llm, kv=kv, ffn=ffn, rescale=rescale, form=form, init=init,
                    head_scale_init=head_scale_init,
                )
                for number in self.layer_numbers
            }
        )
        self._taps: list[LayerTap] = []

    def attach(self, llm: FrozenLLM) -> None:
        self.detach()
        self._taps = [
            tap_layer(
                llm.model,
                int(number) - 1,
                kv=infusion.infuse_kv if infusion.key_maps is not None else None,
                ffn_activation=infusion.infuse_ffn if infusion.ffn_map is not None else None,
            )
            for number, infusion in self.infusions.items()
        ]

    def detach(self) -> None:
        for tap in self._taps:
            tap.remove()
        self._taps = []

    @contextmanager
    def observe(self) -> Iterator[dict[str, dict[str, list[torch.Tensor]]]]:
        """Within the block, every forward pass records per infused layer (by its 1-based number) the gate σ(L')
        per sample and head ("gate", (B, H)) and the relative size of each infusion, |K^r − K| / |K| ("key"),
        the same for V ("value", (B, H)) and for the FFN activation ("ffn", (B, 1)): what the method does, drawn
        by `mit_lightning.insight`."""
        observed = {number: {} for number in self.infusions}
        for number, infusion in self.infusions.items():
            infusion.observed = observed[number]
        try:
            yield observed
        finally:
            for infusion in self.infusions.values():
                infusion.observed = None

    def forward(self, llm: FrozenLLM, input_ids, attention_mask, inputs: FusionInputs) -> torch.Tensor:
        vector = torch.cat([inputs.vectors[name] for name in self.modalities], dim=-1)
        # cast once per call, not in every layer: to autocast's dtype (the maps' inputs would be cast to it) or the maps'
        device = vector.device.type
        dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                 else next(self.infusions.parameters()).dtype)
        payload = InfusionPayload(vector=vector.to(dtype), token_mask=attention_mask.to(torch.float32))
        hidden = llm(attention_mask, input_ids=input_ids, **{PAYLOAD_KWARG: payload})
        check_reached(payload, self._taps, "MiT")
        return last_token(hidden, attention_mask)


def _check_layers(layers: Sequence[int], depth: int) -> tuple[int, ...]:
    numbers = tuple(sorted(set(int(number) for number in layers)))
    if not numbers:
        raise UserError("MiT needs at least one layer to infuse (fusion.init_args.layers).")
    outside = [number for number in numbers if not 1 <= number <= depth]
    if outside:
        raise UserError(
            f"MiT layer indices {outside} are outside the LLM's {depth} layers. Layers are 1-based like the paper "
            f"(1..{depth}); e.g. the paper's 13,17,21,25,29,32 needs a 32-layer LLM."
        )
    return numbers


def _check_modalities(modalities: Sequence[str] | None, available: dict[str, int]) -> tuple[str, ...]:
    chosen = tuple(sorted(available)) if modalities is None else tuple(modalities)
    if not chosen:
        raise UserError("MiT has no modality vector to infuse: configure a vision tower or sequence modalities.")
    unknown = [name for name in chosen if name not in available]
    if unknown:
        raise UserError(f"MiT modalities {unknown} are not produced by the model; available: {sorted(available)}.")
    return chosen
