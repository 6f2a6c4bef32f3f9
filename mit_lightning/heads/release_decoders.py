"""The two segmentation decoders of the authors' public release, to run Table 1 as they did.

Both read the tokens of several CLIP blocks (deepest first; blocks 18, 12, 6 of ViT-L/14 in the
release) and the infused text feature, and return mask logits at their own resolution: the head
resizes them to the masks (bilinear), as for the project's own decoder.

- `CLIPSegDecoder`, the release's default: tokens (class token included) reduced to a small width,
  conditioned on the text once (FiLM), mixed by one transformer layer per level, then upsampled by
  transposed convolutions.
- `ConvDecoder`: the text feature broadcast over the patch grid and three double-convolution stages.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from mit_lightning.errors import UserError


def _clip_init(layer: nn.TransformerEncoderLayer, width: int, depth: int) -> None:
    """CLIP's initialisation: normal weights with std scaled by width and depth, biases 0, LayerNorm 1/0.

    q/k/v: width^-½ (2·depth)^-½; attention output: width^-½; first MLP layer: (2·width)^-½;
    second MLP layer: width^-½ (2·depth)^-½ (depth: the decoder's number of layers, or, as the release
    has it, the CLIP encoder's: 24 at ViT-L/14, std 0.018 at width 64 instead of 0.051 with 3 layers).
    """
    residual_std = width**-0.5 * (2 * depth) ** -0.5
    nn.init.normal_(layer.self_attn.in_proj_weight, std=residual_std)
    nn.init.normal_(layer.self_attn.out_proj.weight, std=width**-0.5)
    nn.init.normal_(layer.linear1.weight, std=(2 * width) ** -0.5)
    nn.init.normal_(layer.linear2.weight, std=residual_std)
    for bias in (layer.self_attn.in_proj_bias, layer.self_attn.out_proj.bias, layer.linear1.bias, layer.linear2.bias):
        nn.init.zeros_(bias)
    for norm in (layer.norm1, layer.norm2):
        nn.init.ones_(norm.weight)
        nn.init.zeros_(norm.bias)


class CLIPSegDecoder(nn.Module):
    """CLIPSeg-style decoder: reduce, FiLM at the first level, a post-norm transformer layer per level.

    For each level, deepest first: out = Linear(tokens) + out; at the first level
    out = Linear_mul(t) ⊙ out + Linear_add(t); then one post-norm transformer layer (self-attention
    with bias and an MLP with ReLU, each followed by residual and LayerNorm eps 1e-6; no dropout).
    The class token is then dropped, the patches laid on the grid, and Conv3x3 + ReLU,
    ConvTranspose(width → width/2, kernel = stride = patch/4) + ReLU and ConvTranspose(→ logits,
    the same) give logits at grid · (patch // 4)² pixels (216 for ViT-L/14-336).

    The release's default of 6 heads does not divide the width 64 (PyTorch refuses it); 4 is used.
    `init_depth` scales the initialisation (`_clip_init`); None = the decoder's own number of layers.

    Parameters at ViT-L/14-336 (width 1024, patch 14), a 4096-wide LLM, width 64, MLP 2048, 2 logits:
    reductions 3·(1024·64 + 64) = 196,800; FiLM 2·(4096·64 + 64) = 524,416; three layers of
    attention 4·64·64 + 4·64 = 16,640, MLP 2·64·2048 + 2048 + 64 = 264,256 and two LayerNorms 256,
    843,456 in all; Conv3x3 64·64·9 + 64 = 36,928; ConvTranspose 64·32·9 + 32 = 18,464;
    ConvTranspose 32·2·9 + 2 = 578: 1,620,642.
    """

    reads_class_token = True

    def __init__(
        self, text_dim: int, token_width: int, grid: int, levels: int, width: int, num_logits: int, *, patch: int,
        heads: int = 4, mlp_width: int = 2048, init_depth: int | None = None,
    ) -> None:
        super().__init__()
        if width % heads:
            raise UserError(f"The clipseg decoder's width {width} is not divisible by its {heads} heads; "
                            "set model.head.init_args.heads to a divisor of the width (e.g. 4 or 8 for 64).")
        if patch < 4:
            raise UserError(f"The clipseg decoder upsamples by patch/4 twice, so it needs a patch of 4 pixels or more "
                            f"(the vision tower's is {patch}); use another decoder.")
        self.grid = grid
        self.reductions = nn.ModuleList(nn.Linear(token_width, width) for _ in range(levels))
        self.film_mul = nn.Linear(text_dim, width)
        self.film_add = nn.Linear(text_dim, width)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, mlp_width, dropout=0.0, activation="relu", layer_norm_eps=1e-6,
                                       batch_first=True)
            for _ in range(levels)
        )
        kernel = patch // 4
        self.upsample = nn.Sequential(
            nn.Conv2d(width, width, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(width, width // 2, kernel_size=kernel, stride=kernel),
            nn.ReLU(),
            nn.ConvTranspose2d(width // 2, num_logits, kernel_size=kernel, stride=kernel),
        )
        for linear in (*self.reductions, self.film_mul, self.film_add):
            nn.init.zeros_(linear.bias)
        for layer in self.layers:
            _clip_init(layer, width, init_depth or levels)

    def forward(self, text: torch.Tensor, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        """text (B, d_T); levels: (B, 1 + grid², C) tokens, class token first, deepest level first."""
        out = 0
        for index, (reduce, layer, tokens) in enumerate(zip(self.reductions, self.layers, levels)):
            out = out + reduce(tokens)
            if index == 0:
                out = self.film_mul(text)[:, None] * out + self.film_add(text)[:, None]
            out = layer(out)
        patches = out[:, 1:].transpose(1, 2).unflatten(2, (self.grid, self.grid))
        return self.upsample(patches)


def _double_conv(in_width: int, width: int) -> nn.Sequential:
    """[Conv3x3 (no bias: BatchNorm follows) → BatchNorm → ReLU] × 2."""
    layers: list[nn.Module] = []
    for channels in (in_width, width):
        layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    return nn.Sequential(*layers)


class ConvDecoder(nn.Module):
    """The release's convolutional decoder: text broadcast over the grid, one double conv per level.

    Stage 1 convolves [text feature broadcast over the patch grid ; deepest level's patches]. Each
    following stage upsamples the features (bilinear) to `upsampled_size` pixels, doubled at each
    later stage (the release: 64, then 128), concatenates the next level's patches resized to that
    size and convolves; a 1×1 conv gives the logits (128 × 128 with three levels). Every stage is
    [Conv3x3 - BatchNorm - ReLU] × 2. `align_corners` is that of every bilinear resize (the release: True).

    Parameters at ViT-L/14-336 (width 1024), a 4096-wide LLM, width 512, 2 logits: stage 1
    (4096 + 1024)·512·9 + 512·512·9 = 25,952,256; stages 2 and 3 (512 + 1024)·512·9 + 512·512·9 =
    9,437,184 each; six BatchNorms 6·2·512 = 6,144; the 1×1 conv 512·2 + 2 = 1,026: 44,833,794.
    """

    reads_class_token = False

    def __init__(
        self, text_dim: int, token_width: int, grid: int, levels: int, width: int, num_logits: int, *,
        upsampled_size: int = 64, align_corners: bool = False,
    ) -> None:
        super().__init__()
        if upsampled_size < 1:
            raise UserError(f"The cnn decoder's upsampled size must be a positive number of pixels, "
                            f"got {upsampled_size}.")
        self.grid = grid
        self.upsampled_size = upsampled_size
        self.align_corners = align_corners
        self.stages = nn.ModuleList(
            _double_conv((text_dim if level == 0 else width) + token_width, width) for level in range(levels)
        )
        self.classifier = nn.Conv2d(width, num_logits, kernel_size=1)

    def forward(self, text: torch.Tensor, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        """text (B, d_T); levels: (B, grid², C) patch tokens, deepest level first."""
        patches = [tokens.transpose(1, 2).unflatten(2, (self.grid, self.grid)) for tokens in levels]
        features = text[:, :, None, None].expand(-1, -1, self.grid, self.grid)
        for index, (stage, level) in enumerate(zip(self.stages, patches)):
            if index > 0:
                size = self.upsampled_size * 2 ** (index - 1)
                features = F.interpolate(features, size=(size, size), mode="bilinear", align_corners=self.align_corners)
                level = F.interpolate(level, size=(size, size), mode="bilinear", align_corners=self.align_corners)
            features = stage(torch.cat([features, level], dim=1))
        return self.classifier(features)
