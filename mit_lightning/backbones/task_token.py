"""The learnable task token of the paper's section 5.2 (a <SEG> / <CLS> token), as an alternative to
reading the text feature at the prompt's last token.

One token is appended after every prompt's last real token (left or right padding alike), so every
fusion method reads the text feature where it always does — at the last non-padding token — and
now finds the task token there. Its id lies just past the frozen embedding table (`token_id`), which
has no row for it: hooks on the LLM's input-embedding module look it up in this module's trainable
embedding instead. Every way into the LLM (token ids, or `embed()` for methods that build their own
input embeddings) passes through that module, so no fusion method needs to know about the token.

Cost: the token's embedding trains, so backward runs through every decoder layer, not only from the
first infused one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class TaskToken(nn.Module):
    """A trainable input embedding appended to every prompt; initialised to the mean embedding row, so it
    starts as an average token of the frozen vocabulary.

    Args:
        embeddings: the frozen LLM's input-embedding module (read once, then only hooked).
    """

    def __init__(self, embeddings: nn.Embedding) -> None:
        super().__init__()
        self.token_id = embeddings.num_embeddings
        self.embedding = nn.Parameter(embeddings.weight.detach().float().mean(dim=0))
        self._is_task: torch.Tensor | None = None  # where the current lookup holds the token
        self._handles: list = []
        self.attach(embeddings)

    def attach(self, embeddings: nn.Embedding) -> None:
        """Hook the embedding module (again, after `detach`: models sharing one LLM take turns)."""
        if not self._handles:
            self._handles = [
                embeddings.register_forward_pre_hook(_LookUpElsewhere(self)),
                embeddings.register_forward_hook(_PutTaskEmbedding(self)),
            ]

    def detach(self) -> None:
        """Take the hooks out of the embedding module again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def append(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) ids and mask → (B, T + 1), the task token right after each sequence's last real token."""
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        after_last = (positions * attention_mask.long()).argmax(dim=1, keepdim=True) + 1
        input_ids = torch.cat([input_ids, input_ids[:, -1:]], dim=1).scatter(1, after_last, self.token_id)
        attention_mask = torch.cat([attention_mask, torch.zeros_like(attention_mask[:, -1:])], dim=1)
        return input_ids, attention_mask.scatter(1, after_last, 1)


class _LookUpElsewhere:
    """Pre-hook: the frozen table has no row for the task token; look up row 0 there and note where."""

    def __init__(self, token: TaskToken) -> None:
        self.token = token

    def __call__(self, _module: nn.Module, args: tuple) -> tuple:
        input_ids = args[0]
        self.token._is_task = input_ids == self.token.token_id
        return (input_ids.masked_fill(self.token._is_task, 0), *args[1:])


class _PutTaskEmbedding:
    """Forward hook: the trainable embedding where the task token stands."""

    def __init__(self, token: TaskToken) -> None:
        self.token = token

    def __call__(self, _module: nn.Module, _args: tuple, output: torch.Tensor) -> Any:
        is_task, self.token._is_task = self.token._is_task, None
        return torch.where(is_task[..., None], self.token.embedding.to(output.dtype), output)
