"""Referring segmentation: a light 3-stage decoder conditioned on the infused text feature.

The decoder reads patch tokens of several CLIP blocks (deepest first; the authors' release reads
blocks 18, 12 and 6 of ViT-L/14). Each stage adds one level's tokens, modulates the features with
the text (FiLM), convolves and upsamples ×2; the mask logits are the dot product of every pixel's
feature with a kernel predicted from the text, so the text decides which pixels light up.
Loss: DICE (Eq. 8) by default; BCE, 2-class CE and DICE+BCE are selectable.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics import MetricCollection

from mit_lightning.errors import UserError
from mit_lightning.fusion.base import FusionInputs, ModelDims
from mit_lightning.heads.base import TaskHead
from mit_lightning.metrics.segmentation import MeanIoU, OverallIoU, PrecisionAtIoU, WholeImageIoU

LOSSES = ("dice", "bce", "ce", "dice+bce")


class _Stage(nn.Module):
    """conv3×3 → GroupNorm → FiLM(text) → GELU → ×2 upsampling."""

    def __init__(self, in_width: int, out_width: int, text_width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_width, out_width, kernel_size=3, padding=1)
        self.norm = nn.GroupNorm(min(32, out_width // 4) or 1, out_width)
        self.film = nn.Linear(text_width, 2 * out_width)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(text)[:, :, None, None].chunk(2, dim=1)
        features = self.norm(self.conv(features)) * (1 + scale) + shift
        return F.interpolate(F.gelu(features), scale_factor=2.0, mode="bilinear", align_corners=False)


class SegmentationDecoder(nn.Module):
    """Multi-level CLIP tokens + text feature → mask logits at 2^levels × the patch grid."""

    def __init__(self, text_dim: int, token_width: int, grid: int, levels: int, width: int, num_logits: int) -> None:
        super().__init__()
        self.grid = grid
        widths = [max(width // 2**level, 16) for level in range(levels)]
        self.text = nn.Sequential(nn.Linear(text_dim, width), nn.GELU())
        self.token_projections = nn.ModuleList(nn.Linear(token_width, w) for w in widths)
        self.stages = nn.ModuleList(
            _Stage(widths[i], widths[i + 1] if i + 1 < levels else widths[i], width) for i in range(levels)
        )
        self.kernel = nn.Linear(width, num_logits * (widths[-1] + 1))
        self.num_logits = num_logits

    def forward(self, text: torch.Tensor, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        text = self.text(text)
        features = None
        for projection, stage, tokens in zip(self.token_projections, self.stages, levels):
            level = projection(tokens).transpose(1, 2).unflatten(2, (self.grid, self.grid))
            if features is not None:
                level = F.interpolate(level, size=features.shape[-2:], mode="bilinear", align_corners=False)
                features = features + level
            else:
                features = level
            features = stage(features, text)
        kernel = self.kernel(text).view(text.shape[0], self.num_logits, -1)
        weight, bias = kernel[:, :, :-1], kernel[:, :, -1]
        return torch.einsum("bchw,bkc->bkhw", features, weight) + bias[:, :, None, None]


def dice_loss(probability: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Eq. 8: 1 − (2|P∩G| + s) / (|P| + |G| + s), per sample, averaged."""
    probability, target = probability.flatten(1), target.flatten(1).to(probability.dtype)
    overlap = (probability * target).sum(1)
    return (1 - (2 * overlap + smooth) / (probability.sum(1) + target.sum(1) + smooth)).mean()


class ReferringSegmentation(TaskHead):
    """Mask prediction for referring expressions.

    Args:
        vision_blocks: 1-based CLIP blocks the decoder reads, deepest first (release: 18, 12, 6 of 24).
        width: channels of the first decoder stage (halved at each following stage).
        loss: "dice" (paper, Eq. 8), "bce", "ce" (two logits, argmax decision) or "dice+bce".
    """

    selection_metric = "oIoU"
    selection_mode = "max"
    summary_metrics = ("oIoU", "mIoU")

    def __init__(
        self, dims: ModelDims, vision_blocks: Sequence[int] = (18, 12, 6), width: int = 256, loss: str = "dice"
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise UserError(f"Unknown segmentation loss '{loss}'; use one of {LOSSES}.")
        if dims.vision_depth is None:
            raise UserError("ReferringSegmentation needs a vision tower (model.vision).")
        outside = [block for block in vision_blocks if not 1 <= block <= dims.vision_depth]
        if outside or not vision_blocks:
            raise UserError(
                f"Decoder vision_blocks {list(vision_blocks)} must be 1-based blocks of the vision tower "
                f"(1..{dims.vision_depth})."
            )
        self.vision_blocks = tuple(vision_blocks)
        self.loss_name = loss
        self.decoder = SegmentationDecoder(
            text_dim=dims.llm.hidden_size,
            token_width=dims.vision_width,
            grid=dims.vision_grid,
            levels=len(vision_blocks),
            width=width,
            num_logits=2 if loss == "ce" else 1,
        )

    def forward(self, text: torch.Tensor, inputs: FusionInputs) -> torch.Tensor:
        levels = [inputs.vision_tokens[block].float() for block in self.vision_blocks]
        return self.decoder(text, levels)

    def foreground_probability(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        return logits.softmax(dim=1)[:, 1] if logits.shape[1] == 2 else logits[:, 0].sigmoid()

    def loss(self, output: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        target = batch["mask"]
        if not isinstance(target, torch.Tensor):
            raise UserError("Training needs masks of one size: keep data.eval_at_original_size for evaluation only.")
        logits = F.interpolate(output.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
        if self.loss_name == "ce":
            return F.cross_entropy(logits, target.long())
        bce = F.binary_cross_entropy_with_logits(logits[:, 0], target.float()) if "bce" in self.loss_name else 0.0
        dice = dice_loss(logits[:, 0].sigmoid(), target) if "dice" in self.loss_name else 0.0
        return dice + bce

    def masks(self, output: torch.Tensor, targets) -> list[torch.Tensor] | torch.Tensor:
        """Binary masks at each target's size (argmax for 2 logits, sigmoid > 0.5 for 1)."""
        if isinstance(targets, torch.Tensor):
            return self._binary(output, targets.shape[-2:])
        return [self._binary(logits[None], target.shape[-2:])[0] for logits, target in zip(output, targets)]

    def _binary(self, logits: torch.Tensor, size) -> torch.Tensor:
        logits = F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False)
        return self.foreground_probability(logits) > 0.5

    def make_metrics(self) -> MetricCollection:
        return MetricCollection(
            {"oIoU": OverallIoU(), "mIoU": MeanIoU(), "prec": PrecisionAtIoU(), "oIoU_whole_image": WholeImageIoU()},
            compute_groups=False,
        )

    def update_metrics(self, metrics: MetricCollection, output: torch.Tensor, batch: dict[str, Any]) -> None:
        metrics.update(self.masks(output, batch["mask"]), batch["mask"], batch["index"])

    def predict(self, output: torch.Tensor, batch: dict[str, Any]) -> dict[str, Any]:
        """Foreground probability at decoder resolution as uint8 (0–255): compact on the host."""
        probability = self.foreground_probability(output)
        return {
            "mask_probability": (probability * 255).round().to(torch.uint8).cpu(),
            "image_path": batch.get("image_path"),
            "sentence": batch.get("sentence"),
            "index": batch["index"].cpu(),
        }
