"""float32 master copies of bf16 trainable weights, which the optimizer updates.

Why: under bf16 autocast, float32 trainable weights are cast to bf16 in every forward pass and their
gradients cast back in every backward pass, one copy (a kernel launch on a GPU) per weight each way.
Weights kept in bf16 need neither; but an optimizer updating bf16 weights loses every update smaller
than bf16's resolution (2⁻⁸ of the weight: Adam's steps of about the learning rate vanish against a
scale of 1). So the optimizer updates float32 copies instead, and the model gets them back rounded to
bf16 after each step, all weights in one operation each way.

The model's weights are the copies rounded: a forward pass computes with exactly what autocast would
have cast the copies to. Gradients of several accumulated micro-batches add up in bf16 on the model's
weights before they move to the copies (under DDP they must: the all-reduce works on the model's).
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn


class MasterWeights:
    """float32 copies of the parameters in `named_parameters` that are not float32; `initial`: their
    full-precision values by name where the parameters hold only their rounding (a checkpoint's)."""

    def __init__(self, named_parameters: Iterable[tuple[str, nn.Parameter]],
                 initial: Mapping[str, torch.Tensor] | None = None) -> None:
        initial = initial or {}
        self.parameters: dict[str, nn.Parameter] = {}
        self.masters: dict[str, nn.Parameter] = {}
        for name, parameter in named_parameters:
            if parameter.dtype == torch.float32:
                continue
            value = initial.get(name, parameter.detach())
            self.parameters[name] = parameter
            self.masters[name] = nn.Parameter(value.to(parameter.device, torch.float32, copy=True))
        self._by_id = {id(self.parameters[name]): master for name, master in self.masters.items()}
        self._hook = None

    def optimized(self, parameter: nn.Parameter) -> nn.Parameter:
        """What the optimizer updates for `parameter`: its master copy, or itself if it is float32."""
        return self._by_id.get(id(parameter), parameter)

    def optimized_groups(self, groups: list) -> list:
        """An optimizer's parameter list or groups (dicts with "params") with `optimized` parameters."""
        if groups and isinstance(groups[0], dict):
            return [{**group, "params": [self.optimized(p) for p in group["params"]]} for group in groups]
        return [self.optimized(p) for p in groups]

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Give the model the updated copies after every step of `optimizer` (built over `optimized` parameters)."""
        self.detach()
        self._hook = optimizer.register_step_post_hook(lambda *_: self.copy_to_model())

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def take_gradients(self) -> None:
        """Move the model's gradients to the copies (as float32), before clipping and the optimizer step."""
        names = [name for name, parameter in self.parameters.items() if parameter.grad is not None]
        for name, master in self.masters.items():
            master.grad = None
        if not names:
            return
        grads = [self.parameters[name].grad for name in names]
        for name in names:
            self.masters[name].grad = torch.empty_like(self.masters[name])
        torch._foreach_copy_([self.masters[name].grad for name in names], grads)  # one cast for all
        for name in names:
            self.parameters[name].grad = None

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """The model's weights become the copies rounded to their dtype."""
        if self.masters:
            torch._foreach_copy_(list(self.parameters.values()), list(self.masters.values()))

    def state(self) -> dict[str, torch.Tensor]:
        """The full-precision values by name: what a checkpoint stores for these weights."""
        return {name: master.detach() for name, master in self.masters.items()}
