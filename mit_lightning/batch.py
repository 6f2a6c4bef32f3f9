"""The batch contract: what a dataloader yields and the model, its fusion and its head read.

Plain typing and torch, so the method code (heads, fusions) can name it without depending on Lightning;
`mit_lightning.data.base.collate` produces it."""

from __future__ import annotations

from typing import TypedDict

import torch


class Batch(TypedDict, total=False):
    """What a dataloader yields and the model reads. Always present: ``prompt``, ``index``, ``skipped``.

    Sequence modalities add two keys each, named after the modality: ``<name>`` float (B, T, D) and
    ``<name>_mask`` bool (B, T), True = a real step (e.g. ``audio``/``audio_mask``).
    """

    #: the task prompt with the sample's text filled in (tokenised by the model: data stays LLM-independent)
    prompt: list[str]
    #: the sample's position in its split; metrics use it to count every evaluation sample once under DDP
    index: torch.Tensor
    #: paths of samples dropped because their image could not be decoded (usually empty); a batch whose
    #: samples were all dropped holds only ``index`` (empty), ``prompt`` ([]) and ``skipped``
    skipped: list[str]
    #: uint8 (B, 3, S, S) at the vision tower's input size; normalised on the device
    image: torch.Tensor
    #: segmentation target: uint8 (B, H, W), or a list of (H_i, W_i) masks at the images' original sizes
    mask: torch.Tensor | list[torch.Tensor]
    #: classification: long (B,); sentiment: float (B,)
    label: torch.Tensor
    #: ids and texts that join a sample back to its dataset (present where the dataset has them)
    ref_id: torch.Tensor
    sent_id: torch.Tensor
    id: list[str]
    image_path: list[str]
    sentence: list[str]
    text: list[str]
