"""The interface every fusion method implements, and the sizes they are built against."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from mit_lightning.backbones.llm import FrozenLLM, LLMShape


@dataclass(frozen=True)
class ModelDims:
    """Sizes known before any weight is loaded (from model configs and the data spec).

    `vectors` maps each modality to the size of its global vector (image: CLIP's projected
    embedding d_I; audio/facial: the trainable encoder's width). `sequences` maps each sequence
    modality to the feature size of its raw frames (read from the data), for methods that read the
    frames as tokens. `vision_*` describe the CLIP tokens (width, number of blocks, patch grid
    side, patch side in pixels) for methods and heads that read them.
    """

    llm: LLMShape
    vectors: dict[str, int] = field(default_factory=dict)
    sequences: dict[str, int] = field(default_factory=dict)
    vision_width: int | None = None
    vision_depth: int | None = None
    vision_grid: int | None = None
    vision_patch: int | None = None
    num_classes: int | None = None


@dataclass
class FusionInputs:
    """What the encoders produced for a batch."""

    vectors: dict[str, torch.Tensor]  # modality -> (B, d_m) global vector
    vision_tokens: dict[int, torch.Tensor] = field(default_factory=dict)  # CLIP block (1-based) -> (B, N, C) patches
    vision_class_tokens: dict[int, torch.Tensor] = field(default_factory=dict)  # CLIP block -> (B, 1, C)
    sequences: dict[str, torch.Tensor] = field(default_factory=dict)  # sequence modality -> (B, T, D) raw frames
    sequence_masks: dict[str, torch.Tensor] = field(default_factory=dict)  # sequence modality -> (B, T) bool, True = real


class Fusion(nn.Module):
    """Runs the frozen LLM on the prompt with the other modalities fused in; returns (B, d_T).

    `attach` is called once, after the frozen LLM is built, to install whatever the method needs
    inside it. `vision_blocks` lists the CLIP blocks whose patch tokens the method reads.
    `needs_sequence_vectors` says whether it reads the global vectors of the sequence modalities
    (acoustic, facial): their trainable encoders are built only then.
    """

    vision_blocks: tuple[int, ...] = ()
    needs_sequence_vectors: bool = True

    def attach(self, llm: FrozenLLM) -> None:
        """Install hooks into the frozen LLM; methods that only change the input need nothing."""

    def detach(self) -> None:
        """Take out what `attach` installed, leaving the LLM as it was loaded."""

    def forward(
        self, llm: FrozenLLM, input_ids: torch.Tensor, attention_mask: torch.Tensor, inputs: FusionInputs
    ) -> torch.Tensor:
        raise NotImplementedError
