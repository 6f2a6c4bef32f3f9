"""The trainable encoder of acoustic and facial feature sequences (paper section 3.2, sentiment).

MiT infuses one global vector per modality. For MOSI/MOSEI the COVAREP (audio) and FACET (facial)
frame sequences become that vector through a small transformer trained with the infusion: input
projection, learned positions, a 3-layer pre-norm encoder that never attends to padding, then a
mean over the real steps and a LayerNorm.
"""

from __future__ import annotations

import torch
from torch import nn

from mit_lightning.errors import UserError


class SequenceEncoder(nn.Module):
    """(B, T, input_dim) features and a (B, T) real-step mask → a (B, width) global vector.

    Padding-aware: padded steps are zeroed before the encoder, masked out as attention keys and left
    out of the mean, so a sample's vector does not depend on what its padding holds (even -inf/NaN).
    A row without any real step is read through its first step, the same rule the MMSA data module
    applies to zero-length clips, so attention never sees an all-masked row.
    """

    def __init__(
        self,
        input_dim: int,
        width: int = 128,
        layers: int = 3,
        heads: int = 4,
        dropout: float = 0.1,
        max_length: int = 1024,
    ) -> None:
        super().__init__()
        if width % heads:
            raise UserError(f"SequenceEncoder: width ({width}) must be divisible by heads ({heads}).")
        self.max_length = max_length
        self.out_dim = width
        self.input_proj = nn.Linear(input_dim, width)
        self.position = nn.Embedding(max_length, width)
        nn.init.normal_(self.position.weight, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d_model=width,
            nhead=heads,
            dim_feedforward=4 * width,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        # nested tensors do not support pre-norm layers; disabling them avoids a warning per build
        self.encoder = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`features` (B, T, input_dim); `mask` (B, T) bool, True = real step (None: all real)."""
        batch, length, _ = features.shape
        if length > self.max_length:
            raise UserError(
                f"A feature sequence has {length} steps but the encoder's max_length is {self.max_length}; "
                "raise max_length or truncate the data (data.max_sequence_length)."
            )
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.bool, device=features.device)
        mask = mask.bool()
        mask = torch.cat([mask[:, :1] | ~mask.any(dim=1, keepdim=True), mask[:, 1:]], dim=1)
        real = mask.unsqueeze(-1)
        hidden = self.input_proj(features.masked_fill(~real, 0.0))
        hidden = hidden + self.position.weight[:length]
        hidden = self.encoder(hidden, src_key_padding_mask=~mask)
        pooled = hidden.masked_fill(~real, 0.0).sum(dim=1) / real.sum(dim=1).to(hidden.dtype)
        return self.norm(pooled)
