"""Speed, memory and scale on a CPU: no graph and no fp32 copy where none is needed, SDPA kept, no
host sync in our step code, activation checkpointing that really recomputes, and the DDP / FSDP
trainer overlays (FSDP itself needs GPUs: Lightning refuses it on a CPU, so its set-up is checked here
piece by piece: the parsed strategy, the units its wrap policy makes, its checkpointing policy)."""

from __future__ import annotations

import dataclasses
import sys
from functools import partial
from pathlib import Path
from typing import Union

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser, Namespace
from lightning.pytorch.strategies import FSDPStrategy, Strategy
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (  # FSDP's wrapper; torch has no public path
    CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper)
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.overrides import TorchFunctionMode
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

import mit_lightning
from mit_lightning import scales
from mit_lightning.backbones.llm import FrozenLLM, LLMConfig
from mit_lightning.backbones.sequence import SequenceEncoder
from mit_lightning.backbones.vision import FrozenCLIP
from mit_lightning.cli import parse_run_config
from mit_lightning.data.base import DataSpec
from mit_lightning.errors import UserError
from mit_lightning.fusion import FusionInputs, MiT, ModelDims, TokenConcat
from mit_lightning.fusion.base import Fusion
from mit_lightning.heads import ReferringSegmentation
from mit_lightning.heads.base import TaskHead
from mit_lightning.metrics.segmentation import OverallIoU
from mit_lightning.module import MiTModule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
#: the task configs (dataset overlays live in configs/datasets/)
TASK_CONFIGS = sorted(CONFIGS.glob("*.yaml"))
DDP, FSDP = CONFIGS / "trainer" / "ddp_2gpu_bf16.yaml", CONFIGS / "trainer" / "fsdp.yaml"
CPU = torch.device("cpu")
TINY = scales.SCALES["tiny"]

# training_step logs its loss; without a Trainer, Lightning warns that nothing is logged
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


def tiny_module(layers=(2, 3, 4), dtype: str = "float32") -> MiTModule:
    return scales.build_module(dataclasses.replace(TINY, dtype=dtype), partial(MiT, layers=layers), 16, CPU)


def hidden_entering_layers(llm: FrozenLLM) -> list[torch.Tensor]:
    """Records the hidden state each decoder layer receives."""
    entering: list[torch.Tensor] = []
    for layer in llm.layers:
        layer.register_forward_pre_hook(lambda _, args: entering.append(args[0]))
    return entering


def train_step(module: MiTModule, optimizer: torch.optim.Optimizer, batch: dict) -> None:
    optimizer.zero_grad(set_to_none=True)
    module.training_step(batch, 0).backward()
    optimizer.step()


# --- what backward builds ------------------------------------------------------------------------
def test_training_builds_no_graph_below_the_first_infused_layer():
    module = tiny_module(layers=(3, 4))
    module.train()
    entering = hidden_entering_layers(module.llm)
    module.training_step(scales.synthetic_batch(module, TINY, 2, 16, CPU), 0).backward()
    assert [hidden.requires_grad for hidden in entering] == [False, False, False, True]


def test_frozen_weights_stay_bf16_and_only_trainable_ones_get_optimizer_state():
    module = tiny_module(dtype="bfloat16")
    frozen = {name: p for name, p in module.named_parameters() if name.startswith(("llm.", "vision."))}
    trainable = module.trainable_parameters()
    assert all(p.dtype == torch.bfloat16 for p in frozen.values())
    assert all(p.dtype == torch.float32 for p in trainable)  # master weights of what trains
    assert sum(p.numel() * p.element_size() for p in frozen.values()) == 2 * sum(p.numel() for p in frozen.values())
    optimizer = module.configure_optimizers()["optimizer"]
    module.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what precision: bf16-mixed does
        train_step(module, optimizer, scales.synthetic_batch(module, TINY, 2, 8, CPU))
    assert {id(p) for p in optimizer.state} == {id(p) for p in trainable}
    assert all(p.grad is None for p in frozen.values())


@pytest.mark.parametrize("padded", [False, True])
def test_attention_stays_on_sdpa(monkeypatch, padded):
    module = tiny_module()
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append((kwargs.get("attn_mask"), kwargs.get("is_causal")))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    batch = scales.synthetic_batch(module, TINY, 2, 16, CPU)
    if padded:
        batch["prompt"] = ["the red circle", batch["prompt"][1]]
    module(batch)
    assert module.llm.model.config._attn_implementation == "mit_sdpa"
    assert len(calls) == module.llm_shape.num_layers
    # without padding: no mask and is_causal, so a GPU can take the flash kernel; with padding: a mask
    assert all((mask is not None) == padded and is_causal == (not padded) for mask, is_causal in calls)


# --- host syncs ----------------------------------------------------------------------------------
_TENSOR = torch.Tensor
#: calls that make the host wait for the GPU (a value or a data-dependent shape read back)
SYNCING = {_TENSOR.item, _TENSOR.tolist, _TENSOR.__bool__, _TENSOR.__int__, _TENSOR.__float__, _TENSOR.__index__,
           _TENSOR.nonzero, torch.nonzero, _TENSOR.cpu, _TENSOR.numpy, _TENSOR.unique, torch.unique,
           _TENSOR.masked_select, torch.masked_select}
PACKAGE = str(Path(mit_lightning.__file__).parent)


class HostSyncAudit(TorchFunctionMode):
    """Records syncing calls made directly by our package (the nearest caller outside torch is ours)."""

    def __init__(self) -> None:
        super().__init__()
        self.ours: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in SYNCING or (func is _TENSOR.__getitem__ and _has_bool_index(args[1])):
            caller = sys._getframe(1)
            while caller is not None and "/torch/" in caller.f_code.co_filename:
                caller = caller.f_back
            if caller is not None and caller.f_code.co_filename.startswith(PACKAGE):
                self.ours.append(f"{func.__name__} in {caller.f_code.co_filename}:{caller.f_lineno}")
        return func(*args, **(kwargs or {}))


def _has_bool_index(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(part, torch.Tensor) and part.dtype == torch.bool for part in parts)


def test_training_and_evaluation_steps_make_no_host_sync_in_our_code():
    """transformers' mask code reads one value per LLM call and Adam its CPU step counters: not ours."""
    module = tiny_module()
    optimizer = module.configure_optimizers()["optimizer"]
    batch = scales.synthetic_batch(module, TINY, 3, 16, CPU)
    batch["prompt"][0] = "the red circle"  # padding too
    module.train()
    train_step(module, optimizer, batch)  # Adam creates its state outside the audit
    with HostSyncAudit() as audit:
        train_step(module, optimizer, batch)
        module.eval()
        with torch.no_grad():
            module.validation_step(batch, 0)
    assert audit.ours == []


def test_the_audit_sees_a_sync_in_our_code():
    metric = OverallIoU()
    metric.update(torch.ones(1, 2, 2, dtype=torch.bool), torch.ones(1, 2, 2, dtype=torch.bool), torch.tensor([0]))
    with HostSyncAudit() as audit:
        metric.compute()  # once per epoch, where reading the score back is the point
    assert any("metrics/segmentation.py" in call for call in audit.ours)


# --- activation checkpointing ---------------------------------------------------------------------
def checkpointing_run(llm: FrozenLLM, training: bool) -> tuple[int, dict[str, torch.Tensor], list[bool]]:
    """How often the last layer's MLP ran during forward + backward, the MiT gradients, the graph per layer."""
    mit = MiT(ModelDims(llm=llm.shape, vectors={"image": 24}), layers=[3, 4])
    mit.attach(llm)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in mit.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    llm.train(training)
    calls = []
    llm.layers[3].mlp.down_proj.register_forward_pre_hook(lambda *_: calls.append(1))
    entering = hidden_entering_layers(llm)
    ids, mask = llm.tokenize(["the red circle", "the small blue square on the left"], "cpu")
    vectors = FusionInputs(vectors={"image": torch.randn(2, 24, generator=generator)})
    mit(llm, ids, mask, vectors).square().sum().backward()
    return len(calls), {name: p.grad for name, p in mit.named_parameters()}, [h.requires_grad for h in entering]


def fresh_llm(**options) -> FrozenLLM:
    return FrozenLLM(LLMConfig(path="tiny", dtype="float32", **options))


@pytest.mark.parametrize("training, runs", [(True, 2), (False, 1)])
def test_activation_checkpointing_recomputes_the_layers_with_their_payload(training, runs):
    _, plain, _ = checkpointing_run(fresh_llm(), training)
    llm = fresh_llm(activation_checkpointing=True)
    calls, checkpointed, entering = checkpointing_run(llm, training)
    assert calls == runs  # recomputed in backward while training, never in evaluation
    for name, gradient in plain.items():
        torch.testing.assert_close(checkpointed[name], gradient, atol=1e-6, rtol=1e-5)
    assert entering == [False, False, False, True]  # still no graph below the first infused layer
    assert not any(module.training for layer in llm.layers for module in layer.children())  # no dropout


def test_fsdp_checkpointing_policy_recomputes_the_layers_with_their_payload():
    _, plain, _ = checkpointing_run(fresh_llm(), True)
    llm = fresh_llm()
    policy = ModuleWrapPolicy(fsdp_settings().activation_checkpointing_policy)
    wrapper = partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT)  # what FSDPStrategy applies
    apply_activation_checkpointing(llm.model, checkpoint_wrapper_fn=wrapper, auto_wrap_policy=policy)
    calls, checkpointed, _ = checkpointing_run(llm, True)
    assert calls == 2  # FSDP's wrapper checkpoints whatever the layer's mode
    for name, gradient in plain.items():
        torch.testing.assert_close(checkpointed[name], gradient, atol=1e-6, rtol=1e-5)


# --- trainer overlays ------------------------------------------------------------------------------
def parsed(*configs: Path):
    """The run config of `configs`, parsed as `mit fit` parses it; nothing is built."""
    return parse_run_config([arg for config in configs for arg in ("--config", str(config))])


@pytest.mark.parametrize("task", TASK_CONFIGS, ids=lambda path: path.stem)
def test_trainer_overlays_compose_with_every_task_config(task):
    alone = parsed(task)
    ddp = parsed(task, DDP)
    assert (ddp.trainer.devices, ddp.trainer.strategy, ddp.trainer.precision) == (2, "ddp", "bf16-mixed")
    assert ddp.data.init_args.batch_size == 8 and ddp.data.class_path == alone.data.class_path
    assert ddp.model == alone.model and ddp.trainer.callbacks == alone.trainer.callbacks
    fsdp = parsed(task, FSDP)
    assert fsdp.trainer.strategy.class_path == "lightning.pytorch.strategies.FSDPStrategy"
    assert fsdp.model == alone.model and fsdp.data == alone.data


def fsdp_settings():
    """The FSDP overlay's strategy arguments, as `mit fit` parses them."""
    return parsed(CONFIGS / "refcoco.yaml", FSDP).trainer.strategy.init_args


def fsdp_strategy() -> FSDPStrategy:
    """The strategy of the FSDP overlay, rebuilt from the config as a checkpoint stores it."""
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Union[str, Strategy])
    stored = yaml.safe_load(parser.dump(Namespace(strategy=parsed(CONFIGS / "refcoco.yaml", FSDP).trainer.strategy)))
    return parser.instantiate(parser.parse_object(stored)).strategy


def wraps(policy: ModuleWrapPolicy, module: torch.nn.Module) -> bool:
    """Whether `policy` makes `module` a unit of its own (the callable form FSDP accepts as a policy)."""
    return policy(module, recurse=False, nonwrapped_numel=0)


def test_fsdp_overlay_builds_the_strategy_it_documents():
    settings = fsdp_settings()
    assert settings.state_dict_type == "full"
    assert settings.auto_wrap_policy == {LlamaDecoderLayer, FrozenCLIP, SequenceEncoder, Fusion, TaskHead}
    assert settings.activation_checkpointing_policy == {LlamaDecoderLayer}
    strategy = fsdp_strategy()
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["use_orig_params"] is True  # frozen and trainable weights may share a unit
    layer = fresh_llm().layers[0]  # the policy the strategy holds is the one the overlay states
    assert wraps(strategy.kwargs["auto_wrap_policy"], layer) and not wraps(strategy.kwargs["auto_wrap_policy"], layer.self_attn)
    precision = strategy.mixed_precision
    assert (precision.param_dtype, precision.reduce_dtype, precision.buffer_dtype) == (
        torch.bfloat16, torch.float32, torch.float32)


@pytest.mark.parametrize("fusion", [partial(MiT, layers=(2, 4)), TokenConcat], ids=["mit", "concat"])
def test_fsdp_units_each_hold_one_dtype(fusion):
    """FSDP flattens a unit into one tensor: bf16 frozen and fp32 trainable weights must not share one."""
    module = MiTModule(
        head=partial(ReferringSegmentation, vision_blocks=(4, 2), width=32),
        llm=LLMConfig(path="tiny", dtype="bfloat16"),
        vision=scales.vision_config(dataclasses.replace(TINY, dtype="bfloat16")),
        fusion=fusion, sequence_modalities=["audio"],
    )
    module.build(DataSpec(sequence_dims={"audio": 8}))
    policy: ModuleWrapPolicy = fsdp_strategy().kwargs["auto_wrap_policy"]
    units = [module, *(unit for unit in module.modules() if unit is not module and wraps(policy, unit))]
    expected = {*module.llm.layers, module.vision, module.fusion, module.head, *module.sequence_encoders.values()}
    assert expected <= set(units)
    for unit in units:
        inner = {id(p) for other in units if other is not unit and _contains(unit, other) for p in other.parameters()}
        assert len({p.dtype for p in unit.parameters() if id(p) not in inner}) <= 1, type(unit).__name__


def _contains(outer: torch.nn.Module, module: torch.nn.Module) -> bool:
    return any(candidate is module for candidate in outer.modules())


def test_a_checkpoint_whose_weights_the_strategy_loaded_passes_and_others_are_still_checked():
    module = tiny_module()
    module.on_load_checkpoint({"epoch": 0})  # FSDP took the state dict out of it before this hook
    with pytest.raises(UserError, match="does not fit this model"):
        module.on_load_checkpoint({"state_dict": {}})
