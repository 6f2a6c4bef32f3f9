"""MiTModule: what trains, what the optimizer sees, how batches and checkpoints are handled."""

from __future__ import annotations

import pytest
import torch

from mit_lightning.backbones.llm import LLMConfig
from mit_lightning.backbones.vision import VisionConfig
from mit_lightning.data.base import DataSpec
from mit_lightning.errors import UserError
from mit_lightning.fusion import MiT
from mit_lightning.heads import ReferringSegmentation
from mit_lightning.module import MiTModule, is_trainable_key

SPEC = DataSpec(eval_splits={"validate": ["val"], "test": ["testA", "testB"], "predict": ["testA"]})


def segmentation_module(**kwargs) -> MiTModule:
    module = MiTModule(
        head=lambda dims: ReferringSegmentation(dims, vision_blocks=(4, 2), width=32),
        llm=LLMConfig(path="tiny", dtype="float32"),
        vision=VisionConfig(name="tiny", weights=None, dtype="float32"),
        fusion=lambda dims: MiT(dims, layers=[2, 4]),
        **kwargs,
    )
    module.build(SPEC)
    return module


def batch(size: int = 3) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {
        "prompt": [f"Segment the object {i} according to the text. #Segmentation:" for i in range(size)],
        "index": torch.arange(size),
        "image": torch.randint(0, 256, (size, 3, 64, 64), dtype=torch.uint8, generator=generator),
        "mask": (torch.rand(size, 32, 32, generator=generator) > 0.5).to(torch.uint8),
    }


def test_a_training_step_sends_gradients_only_to_trainable_parts():
    module = segmentation_module()
    module.training_step(batch(), 0).backward()
    for name, parameter in module.named_parameters():
        if is_trainable_key(name):
            assert parameter.requires_grad and parameter.grad is not None, name
        else:
            assert not parameter.requires_grad and parameter.grad is None, name
    assert any(name.startswith("fusion.") for name, _ in module.named_parameters())


def test_the_optimizer_holds_exactly_the_trainable_parameters_with_the_paper_defaults():
    module = segmentation_module()
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for name, p in module.named_parameters() if not name.startswith(("llm.", "vision."))}
    assert in_optimizer == trainable
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.param_groups[0]["lr"] == pytest.approx(4e-5)
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR) and scheduler.step_size == 10 and scheduler.gamma == 0.1
    assert config["lr_scheduler"]["interval"] == "epoch"


def test_a_head_learning_rate_scale_gives_the_head_its_own_group_for_any_optimizer_and_scheduler():
    module = segmentation_module(
        head_lr_scale=0.1,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.5, momentum=0.9),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
    )
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    groups = {group["name"]: group for group in optimizer.param_groups}
    assert list(groups) == ["other", "head"]
    assert {id(p) for p in groups["head"]["params"]} == {id(p) for p in module.head.parameters()}
    assert {id(p) for p in groups["other"]["params"]} == {id(p) for p in module.fusion.parameters()}
    assert groups["other"]["lr"] == pytest.approx(0.5) and groups["head"]["lr"] == pytest.approx(0.05)
    assert groups["head"]["momentum"] == 0.9  # the optimizer's other settings reach both groups
    assert scheduler.base_lrs == pytest.approx([0.5, 0.05])
    optimizer.step()
    scheduler.step()
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([0.25, 0.025])


def test_the_head_learning_rate_scale_must_be_positive():
    with pytest.raises(UserError, match="head_lr_scale must be a positive"):
        segmentation_module(head_lr_scale=0.0)


def test_parameter_counts_split_frozen_and_trainable():
    module = segmentation_module()
    trainable, total = module.parameter_counts()
    frozen = sum(p.numel() for p in module.llm.parameters()) + sum(p.numel() for p in module.vision.parameters())
    assert total == trainable + frozen and 0 < trainable < total


def test_a_batch_emptied_by_unreadable_images_is_skipped_and_reported_once():
    module = segmentation_module()
    empty = {"prompt": [], "index": torch.zeros(0, dtype=torch.long), "skipped": ["a.jpg", "b.jpg"]}
    assert module.training_step(empty, 0) is None
    with pytest.warns(UserWarning, match="2 training samples were skipped.*a.jpg"):
        module.on_train_epoch_end()
    assert module._skipped == []


def test_metric_names_per_split():
    module = segmentation_module()
    assert module._metric_name("validate", 0, "oIoU") == "val/oIoU"
    assert module._metric_name("test", 1, "oIoU") == "test/testB/oIoU"
    assert set(module.eval_metrics) == {"validate_0", "test_0", "test_1"}


def test_sequence_modalities_must_come_from_the_data():
    module = MiTModule(
        head=lambda dims: ReferringSegmentation(dims, vision_blocks=(4,), width=32),
        llm=LLMConfig(path="tiny", dtype="float32"),
        vision=VisionConfig(name="tiny", weights=None, dtype="float32"),
        fusion=lambda dims: MiT(dims, layers=[2]),
        sequence_modalities=["audio"],
    )
    with pytest.raises(UserError, match=r"asks for \['audio'\]"):
        module.build(DataSpec())


def test_a_bad_fusion_setting_fails_when_the_module_is_created_before_any_weight_loads():
    with pytest.raises(UserError, match="outside the LLM's 4 layers"):
        MiTModule(
            head=lambda dims: ReferringSegmentation(dims),
            llm=LLMConfig(path="tiny", dtype="float32"),
            fusion=lambda dims: MiT(dims, layers=[5]),
        )


def test_checkpoint_filtering_and_the_fit_check():
    module = segmentation_module()
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and all(is_trainable_key(k) for k in checkpoint["state_dict"])
    module.on_load_checkpoint(checkpoint)  # fits: no error
    broken = dict(checkpoint["state_dict"])
    broken.pop(next(iter(broken)))
    with pytest.raises(UserError, match="missing"):
        module.on_load_checkpoint({"state_dict": broken})
