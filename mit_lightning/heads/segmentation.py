"""Referring segmentation: a light 3-stage decoder conditioned on the infused text feature.

The decoder reads patch tokens of several CLIP blocks (deepest first; the authors' release reads
blocks 18, 12 and 6 of ViT-L/14). Each stage adds one level's tokens, modulates the features with
the text (FiLM), convolves and upsamples ×2; the mask logits are the dot product of every pixel's
feature with a kernel predicted from the text, so the text decides which pixels light up.
Loss: DICE (Eq. 8) by default; BCE, 2-class CE and DICE+BCE are selectable. The decoders of the
authors' release (`release_decoders.py`) are selectable too.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics import MetricCollection

from mit_lightning.batch import Batch
from mit_lightning.errors import UserError, check_choice
from mit_lightning.fusion.base import FusionInputs, ModelDims
from mit_lightning.heads.base import TaskHead
from mit_lightning.heads.release_decoders import CLIPSegDecoder, ConvDecoder
from mit_lightning.metrics.segmentation import (
    MeanIoU,
    OverallIoU,
    PrecisionAtIoU,
    WholeImageIoU,
    mask_statistics,
    per_sample_iou,
)

Loss = Literal["dice", "bce", "ce", "dice+bce"]
Decoder = Literal["film", "clipseg", "cnn"]
#: what scales the clipseg decoder's initialisation: its own layers, or the CLIP encoder's depth (the release)
InitDepth = Literal["decoder", "vision"]
#: the decoder's width when none is set: film's first stage, clipseg's reduced width, cnn's conv width
DEFAULT_WIDTHS = {"film": 256, "clipseg": 64, "cnn": 512}


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

    reads_class_token = False

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
        width: decoder channels; null takes the decoder's default. film: the first stage (halved at each
            following stage; 256); clipseg: the reduced token width (64); cnn: the convolutions' width (512).
        loss: "dice" (paper, Eq. 8), "bce", "ce" (two logits, argmax decision) or "dice+bce".
        decoder: "film" (this project's FiLM + dynamic-kernel decoder), or the authors' release's
            "clipseg" (their default) or "cnn" (see release_decoders.py).
        heads: attention heads of the clipseg decoder (must divide its width).
        mlp_width: MLP width of the clipseg decoder's transformer layers.
        cnn_size: side in pixels to which the cnn decoder upsamples its second stage, doubled at each
            later stage (the release: 64, then 128).
        class_weights: with loss "ce", the weights of the background and foreground classes (the release:
            [0.9, 1.1]); None = unweighted.
        align_corners: of the bilinear resizes of the logits to the mask size (loss, metrics, predictions) and
            inside the cnn decoder; the release resizes with True.
        clipseg_init_depth: the depth scaling the clipseg decoder's CLIP-style initialisation: "decoder" (its
            own layers) or "vision" (the CLIP encoder's depth, as the release has it).
    """

    task = "segmentation"
    summary_metrics = ("oIoU", "mIoU")

    def __init__(
        self, dims: ModelDims, vision_blocks: Sequence[int] = (18, 12, 6), width: int | None = None,
        loss: Loss = "dice", decoder: Decoder = "film", heads: int = 4, mlp_width: int = 2048, cnn_size: int = 64,
        class_weights: Sequence[float] | None = None, align_corners: bool = False,
        clipseg_init_depth: InitDepth = "decoder",
    ) -> None:
        super().__init__()
        check_choice("Segmentation loss", loss, Loss)
        check_choice("Segmentation decoder", decoder, Decoder)
        check_choice("Segmentation clipseg_init_depth", clipseg_init_depth, InitDepth)
        if class_weights is not None and (loss != "ce" or len(class_weights) != 2 or min(class_weights) <= 0):
            raise UserError(f"Segmentation class_weights {list(class_weights)} need loss: ce and two positive weights "
                            "(background, foreground), e.g. [0.9, 1.1].")
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
        self.align_corners = align_corners
        self.register_buffer("class_weights", None if class_weights is None else torch.tensor(class_weights),
                             persistent=False)
        sizes = dict(
            text_dim=dims.llm.hidden_size,
            token_width=dims.vision_width,
            grid=dims.vision_grid,
            levels=len(vision_blocks),
            width=DEFAULT_WIDTHS[decoder] if width is None else width,
            num_logits=2 if loss == "ce" else 1,
        )
        if decoder == "clipseg":
            init_depth = dims.vision_depth if clipseg_init_depth == "vision" else None
            self.decoder = CLIPSegDecoder(**sizes, patch=dims.vision_patch, heads=heads, mlp_width=mlp_width,
                                          init_depth=init_depth)
        elif decoder == "cnn":
            self.decoder = ConvDecoder(**sizes, upsampled_size=cnn_size, align_corners=align_corners)
        else:
            self.decoder = SegmentationDecoder(**sizes)

    def forward(self, text: torch.Tensor, inputs: FusionInputs) -> torch.Tensor:
        return self.decoder(text, [self._tokens(inputs, block).float() for block in self.vision_blocks])

    def _tokens(self, inputs: FusionInputs, block: int) -> torch.Tensor:
        """A block's patch tokens, after its class token for decoders that read it."""
        if self.decoder.reads_class_token:
            return torch.cat([inputs.vision_class_tokens[block], inputs.vision_tokens[block]], dim=1)
        return inputs.vision_tokens[block]

    def foreground_probability(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        return logits.softmax(dim=1)[:, 1] if logits.shape[1] == 2 else logits[:, 0].sigmoid()

    def loss(self, output: torch.Tensor, batch: Batch) -> torch.Tensor:
        target = batch["mask"]
        if not isinstance(target, torch.Tensor):  # masks at their images' sizes: each sample's loss at its own size
            return torch.stack([self._loss(logits[None], mask[None]) for logits, mask in zip(output, target)]).mean()
        return self._loss(output, target)

    def _loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = F.interpolate(output.float(), size=target.shape[-2:], mode="bilinear", align_corners=self.align_corners)
        if self.loss_name == "ce":
            return F.cross_entropy(logits, target.long(), weight=self.class_weights)
        bce = F.binary_cross_entropy_with_logits(logits[:, 0], target.float()) if "bce" in self.loss_name else 0.0
        dice = dice_loss(logits[:, 0].sigmoid(), target) if "dice" in self.loss_name else 0.0
        return dice + bce

    def masks(self, output: torch.Tensor, targets) -> list[torch.Tensor] | torch.Tensor:
        """Binary masks at each target's size (argmax for 2 logits, sigmoid > 0.5 for 1)."""
        if isinstance(targets, torch.Tensor):
            return self._binary(output, targets.shape[-2:])
        return self.masks_at(output, [target.shape[-2:] for target in targets])

    def masks_at(self, output: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """One binary mask per sample at its (H, W), e.g. its image's original size, by the rule evaluation uses."""
        return [probability > 0.5 for probability in self.probabilities_at(output, sizes)]

    def probabilities_at(self, output: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """Each sample's foreground probability per pixel at its (H, W); the mask is where it exceeds 0.5."""
        return [self._probability(logits[None], size)[0] for logits, size in zip(output, sizes)]

    def _probability(self, logits: torch.Tensor, size) -> torch.Tensor:
        logits = F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=self.align_corners)
        return self.foreground_probability(logits)

    def _binary(self, logits: torch.Tensor, size) -> torch.Tensor:
        return self._probability(logits, size) > 0.5

    def make_metrics(self) -> MetricCollection:
        return MetricCollection(
            {"oIoU": OverallIoU(), "mIoU": MeanIoU(), "prec": PrecisionAtIoU(), "oIoU_whole_image": WholeImageIoU()},
            compute_groups=False,
        )

    def update_metrics(self, metrics: MetricCollection, output: torch.Tensor, batch: Batch) -> None:
        metrics.update(self.masks(output, batch["mask"]), batch["mask"], batch["index"])

    def predict(self, output: torch.Tensor, batch: Batch) -> dict[str, Any]:
        """The binary masks exactly as evaluation scores them (same size, same decision), and their IoU."""
        targets = batch["mask"]
        masks = self.masks(output, targets)
        ious = per_sample_iou(mask_statistics(masks, targets)).tolist()  # the mIoU rule
        return {"mask": [mask.cpu() for mask in masks], "iou": ious}

    def answers(self, output: torch.Tensor, *, image_sizes: Sequence[tuple[int, int]] | None = None,
                class_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """At each image's (H, W): the mask (probability > 0.5, as evaluated), the probability map, and the mask's
        confidence, the mean foreground probability over its pixels (0 for an empty mask)."""
        if image_sizes is None:
            raise ValueError("Segmentation answers need each image's size.")
        results = []
        for probability in self.probabilities_at(output, image_sizes):
            mask = probability > 0.5
            confidence = float(probability[mask].mean()) if mask.any() else 0.0
            results.append({"mask": mask.cpu().numpy(), "confidence": confidence, "probability": probability.cpu().numpy()})
        return results
