"""The frozen open_clip vision tower: global image feature and multi-level patch tokens.

One forward pass gives both what MiT infuses (the pooled, projected embedding, d_I = 768 for
ViT-L/14) and what a decoder or a token-concatenation method reads (patch tokens of chosen blocks).
Images arrive as uint8 and are normalised here with the tower's own mean/std.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from mit_lightning.backbones.llm import DType, torch_dtype
from mit_lightning.backbones.presets import TINY_CLIP, seeded_init
from mit_lightning.checkpoints import WEIGHT_FILE_ERRORS, is_broken_file, unreadable_weights
from mit_lightning.errors import UserError, expand_env


#: where the paper's CLIP weights are looked for unless configured otherwise
DEFAULT_WEIGHTS = "${MIT_CLIP_PATH:-checkpoints/ViT-L-14-336.pt}"


@dataclass
class VisionConfig:
    """Which CLIP vision tower to load.

    Args:
        name: an open_clip model name (the paper: ViT-L-14-336) or "tiny" (random, built locally).
        weights: local open_clip checkpoint (.safetensors/.bin/.pt state dict, or OpenAI's TorchScript
            .pt); None builds random weights (benchmarks only).
        dtype: dtype of the frozen weights.
        quick_gelu: the activation OpenAI's CLIP weights were trained with (true for OpenAI weights).
        normalize: L2-normalise the global feature (an option of the authors' release).
        seed: seed of random weights (tiny preset or weights=None).
    """

    name: str = "ViT-L-14-336"
    weights: str | None = DEFAULT_WEIGHTS
    dtype: DType = "bfloat16"
    quick_gelu: bool = True
    normalize: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.is_tiny and self.weights not in (None, DEFAULT_WEIGHTS):
            raise UserError(f"model.vision.name 'tiny' builds a random test tower and reads no weights, but "
                            f"model.vision.weights is '{self.weights}'. Set model.vision.name to the architecture of "
                            "those weights (e.g. ViT-L-14-336), or model.vision.weights to null.")

    @property
    def is_tiny(self) -> bool:
        return self.name == "tiny"

    def architecture(self) -> dict:
        """The open_clip model config (sizes), read without building the model."""
        if self.is_tiny:
            return TINY_CLIP
        import open_clip

        config = open_clip.get_model_config(self.name)
        if config is None:
            raise UserError(
                f"Unknown open_clip model '{self.name}'. Known names include ViT-B-16, ViT-L-14, ViT-L-14-336; "
                "see open_clip.list_models()."
            )
        return config

    def weights_path(self) -> Path | None:
        if self.is_tiny or self.weights is None:
            return None
        path = Path(expand_env(self.weights))
        if not path.is_file():
            raise UserError(
                f"CLIP weights not found: expected a file at '{path}'. Set model.vision.weights (or the MIT_CLIP_PATH "
                f"environment variable) to a local open_clip checkpoint of {self.name}; see README.md."
            )
        return path


@dataclass(frozen=True)
class VisionShape:
    embed_dim: int  # d_I, the projected global feature
    width: int  # patch-token width
    depth: int  # number of transformer blocks
    image_size: int
    patch_size: int

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_architecture(cls, architecture: dict) -> "VisionShape":
        vision = architecture["vision_cfg"]
        if "timm_model_name" in vision or not isinstance(vision.get("layers"), int):
            raise UserError("Only open_clip ViT towers (vision_cfg with integer 'layers') are supported.")
        size = vision["image_size"]
        return cls(
            embed_dim=architecture["embed_dim"],
            width=vision["width"],
            depth=vision["layers"],
            image_size=size if isinstance(size, int) else size[0],
            patch_size=vision["patch_size"],
        )


@dataclass
class VisionOutput:
    embedding: torch.Tensor  # (B, d_I)
    tokens: dict[int, torch.Tensor] = field(default_factory=dict)  # 1-based block -> (B, N, width) patches
    class_tokens: dict[int, torch.Tensor] = field(default_factory=dict)  # 1-based block -> (B, 1, width)


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") for name in archive.namelist())


class FrozenCLIP(nn.Module):
    """A frozen, eval-mode open_clip ViT; the text tower is dropped after loading."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.shape = VisionShape.from_architecture(config.architecture())
        self.visual = self._load().to(torch_dtype(config.dtype))
        self._check_architecture()
        self.visual.requires_grad_(False)
        self.visual.eval()
        mean, std = self._mean_std()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def _load(self) -> nn.Module:
        import open_clip

        path = self.config.weights_path()
        if self.config.is_tiny:
            with seeded_init(self.config.seed):
                return open_clip.CLIP(**TINY_CLIP).visual
        if path is not None and _is_torchscript_archive(path):
            return open_clip.load_openai_model(str(path), precision="fp32", device="cpu").visual
        with seeded_init(self.config.seed):
            try:
                model = open_clip.create_model(
                    self.config.name, pretrained=str(path) if path else None, force_quick_gelu=self.config.quick_gelu,
                    device=torch.get_default_device(),  # where Lightning builds the model (its device context)
                )
            except (*WEIGHT_FILE_ERRORS, AssertionError, KeyError, ValueError) as error:
                if path is None:
                    raise
                if is_broken_file(error):
                    raise unreadable_weights(path, "CLIP weights", error) from None
                raise UserError(
                    f"The CLIP weights '{path}' do not fit the architecture model.vision.name='{self.config.name}'. "
                    f"Set the name of the architecture they were trained with ({str(error).splitlines()[0] if str(error) else type(error).__name__})."
                ) from error
        return model.visual

    def _check_architecture(self) -> None:
        """Weights built another architecture than `name` describes (e.g. an OpenAI archive of another size)."""
        visual = self.visual
        found = VisionShape(
            embed_dim=visual.proj.shape[1] if getattr(visual, "proj", None) is not None else self.shape.embed_dim,
            width=visual.transformer.width,
            depth=len(visual.transformer.resblocks),
            image_size=visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size,
            patch_size=visual.patch_size[0] if isinstance(visual.patch_size, (tuple, list)) else visual.patch_size,
        )
        if found != self.shape:
            raise UserError(
                f"The CLIP weights '{self.config.weights}' are a {found} tower, but model.vision.name "
                f"'{self.config.name}' is {self.shape}. Set model.vision.name to the weights' architecture."
            )

    def _mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        mean = getattr(self.visual, "image_mean", None) or OPENAI_DATASET_MEAN
        std = getattr(self.visual, "image_std", None) or OPENAI_DATASET_STD
        return tuple(mean), tuple(std)

    def train(self, mode: bool = True) -> "FrozenCLIP":
        return super().train(False)

    @property
    def image_size(self) -> int:
        return self.shape.image_size

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, S, S) → normalised float in the tower's dtype."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise UserError(
                f"Images are {tuple(images.shape[-2:])} but the vision tower {self.config.name} expects "
                f"{self.image_size}×{self.image_size}; set data.image_size to {self.image_size} (or leave it unset)."
            )
        pixels = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        return ((pixels - self.mean) / self.std).to(self.visual_dtype)

    @property
    def visual_dtype(self) -> torch.dtype:
        return next(self.visual.parameters()).dtype

    @torch.no_grad()
    def forward(self, images: torch.Tensor, blocks: Sequence[int] = ()) -> VisionOutput:
        """Global embedding plus the patch tokens and, apart, the class token of the 1-based `blocks`.

        The class tokens are slices of the same block outputs, so providing them costs nothing.
        """
        pixels = self.normalize(images)
        blocks = sorted(set(blocks))
        outside = [block for block in blocks if not 1 <= block <= self.shape.depth]
        if outside:
            raise UserError(f"Vision blocks {outside} are outside {self.config.name}'s {self.shape.depth} blocks (1-based).")
        if blocks:
            output = self.visual.forward_intermediates(
                pixels, indices=[block - 1 for block in blocks], output_fmt="NLC", intermediates_only=False,
                output_extra_tokens=True,
            )
            embedding, tokens = output["image_features"], dict(zip(blocks, output["image_intermediates"]))
            class_tokens = dict(zip(blocks, output["image_intermediates_prefix"]))
        else:
            embedding, tokens, class_tokens = self.visual(pixels), {}, {}
        if self.config.normalize:
            embedding = nn.functional.normalize(embedding, dim=-1)
        return VisionOutput(embedding=embedding, tokens=tokens, class_tokens=class_tokens)
