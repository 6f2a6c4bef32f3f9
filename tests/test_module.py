"""MiTModule: what trains, what the optimizer sees, how batches and checkpoints are handled."""

from __future__ import annotations

import warnings
from functools import partial

import pytest
import torch

from mit_lightning.backbones.llm import LLMConfig
from mit_lightning.backbones.lora import LoRA
from mit_lightning.backbones.vision import VisionConfig
from mit_lightning.data.base import DataSpec
from mit_lightning.errors import UserError
from mit_lightning.fusion import PILL, MiT, ModeX, TokenConcat
from mit_lightning.heads import ImageTextClassification, ReferringSegmentation
from mit_lightning.module import MiTModule, is_trainable_key

SPEC = DataSpec(eval_splits={"validate": ["val"], "test": ["testA", "testB"], "predict": ["testA"]})


def segmentation_module(fusion=partial(MiT, layers=[2, 4]), **kwargs) -> MiTModule:
    module = MiTModule(
        head=partial(ReferringSegmentation, vision_blocks=(4, 2), width=32),
        vision=VisionConfig(name="tiny", weights=None, dtype="float32"),
        fusion=fusion,
        **{"llm": LLMConfig(path="tiny", dtype="float32"), **kwargs},
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
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module.on_train_epoch_end()  # reported, so the next epoch starts with none


def test_prompts_cut_to_the_token_limit_are_counted_and_reported_once_per_stage():
    limit = 8
    module = segmentation_module(llm=LLMConfig(path="tiny", dtype="float32", max_text_tokens=limit))
    tokenizer = module.llm.tokenizer
    words = "the small red circle on the left next to a big blue square above the green triangle".split()
    prompts = [" ".join(words[:count]) for count in range(1, 16)]
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    assert limit in lengths and min(lengths) < limit < max(lengths)  # below, at and over the limit
    cut = sum(length > limit for length in lengths)

    input_ids, attention_mask = module.llm.tokenize(prompts, "cpu")
    assert input_ids.shape[1] == limit
    longest = tokenizer(prompts[-1])["input_ids"]  # a cut prompt keeps its end, loses its beginning
    assert input_ids[-1][attention_mask[-1].bool()].tolist()[-3:] == longest[-3:]
    assert module.llm.take_cut_prompts() == cut and module.llm.take_cut_prompts() == 0

    module.eval()
    with torch.no_grad():
        module({**batch(len(prompts)), "prompt": prompts})
    module.train()
    with torch.no_grad():
        module({**batch(2), "prompt": prompts[-2:]})  # two more cut in training, reported apart
    with pytest.warns(UserWarning, match=f"{cut} validation prompts were longer than model.llm.max_text_tokens "
                                         r"\(8 tokens\) and lost their beginning"):
        module._log_eval_metrics("validate")
    with pytest.warns(UserWarning, match="2 training prompts were longer"):
        module.on_train_epoch_end()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module.on_train_epoch_end()  # reported, so the next epoch starts with none
        module._log_eval_metrics("test")


# The names metrics are logged under ("val/oIoU" for the first validation split, "test/<split>/oIoU")
# are checked where they are logged: test_cli.py (validate) and test_bad_input.py (test on two splits).
def test_one_metric_collection_per_evaluated_split():
    assert set(segmentation_module().eval_metrics) == {"validate_0", "test_0", "test_1"}


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


def moved(module: MiTModule) -> MiTModule:
    """Infusion away from its identity initialisation, so that losing it would change the outputs."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in module.fusion.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return module.eval()


@pytest.mark.parametrize("fusion", [partial(MiT, layers=[2, 4]), partial(PILL, rank=4),
                                    partial(TokenConcat, lora=LoRA(rank=2))], ids=["mit", "pill", "concat_lora"])
@pytest.mark.parametrize("copy_kind", ["deepcopy", "pickle"])
def test_copies_of_the_module_keep_their_own_working_infusion(copy_kind, fusion):
    import copy
    import pickle

    module = moved(segmentation_module(fusion))
    copied = copy.deepcopy(module) if copy_kind == "deepcopy" else pickle.loads(pickle.dumps(module))
    with torch.no_grad():
        original = module(batch())
        torch.testing.assert_close(copied(batch()), original, rtol=0, atol=1e-6)
        # the copy's taps point at the copy's infusion, not at the original's
        for parameter in copied.fusion.parameters():
            parameter.mul_(0.0)
        assert (copied(batch()) - original).abs().max() > 1e-3
        torch.testing.assert_close(module(batch()), original, rtol=0, atol=0)


def test_an_llm_without_the_taps_fails_loudly_instead_of_running_text_only():
    module = moved(segmentation_module())
    module.llm.model.set_attn_implementation("sdpa")  # routed around the tapped attention
    with pytest.raises(RuntimeError, match="did not reach layer 2 kv, layer 4 kv"):
        module(batch())


def test_bad_head_settings_fail_before_any_backbone_is_loaded(monkeypatch):
    import mit_lightning.module as module_file

    def no_loading(*_args, **_kwargs):
        raise AssertionError("a backbone was loaded before the head's settings were checked")

    monkeypatch.setattr(module_file, "FrozenLLM", no_loading)
    monkeypatch.setattr(module_file, "FrozenCLIP", no_loading)
    with pytest.raises(UserError, match=r"vision_blocks \[9\]"):
        MiTModule(
            head=partial(ReferringSegmentation, vision_blocks=(9,), width=32),
            llm=LLMConfig(path="tiny", dtype="float32"),
            vision=VisionConfig(name="tiny", weights=None, dtype="float32"),
            fusion=partial(MiT, layers=[2, 4]),
        )


# --- LoRA, starting weights, token methods -------------------------------------------------------------
LORA_CONCAT = partial(TokenConcat, projector="linear", lora=LoRA(rank=2, target_modules=["q_proj", "v_proj"], dropout=0.1))


def test_lora_weights_train_and_are_saved_while_the_frozen_ones_are_not():
    module = segmentation_module(LORA_CONCAT)
    lora = {name for name, _ in module.llm.named_parameters(prefix="llm") if ".lora_" in name}
    assert module.lora_names() == lora and len(lora) == 4 * 2 * 2  # A and B of q and v in 4 layers
    assert not any(is_trainable_key(name) for name in lora) and all(is_trainable_key(name, lora) for name in lora)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    own = {name for name in module.state_dict() if name.startswith(("fusion.", "head."))}
    assert set(checkpoint["state_dict"]) == own | lora
    module.on_load_checkpoint(checkpoint)  # fits
    optimizer = module.configure_optimizers()["optimizer"]
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in module.parameters() if p.requires_grad}
    assert {id(p) for name, p in module.named_parameters() if name in lora} <= in_optimizer
    assert all(p.dtype == torch.float32 for name, p in module.named_parameters() if name in lora)


def test_lora_dropout_follows_the_training_mode_and_the_frozen_layers_stay_in_eval():
    module = segmentation_module(LORA_CONCAT)
    wrapped = module.llm.layers[0].self_attn.q_proj
    module.train()
    assert wrapped.lora_dropout["default"].training and not wrapped.base_layer.training
    assert not module.llm.layers[0].mlp.training
    module.eval()
    assert not wrapped.lora_dropout["default"].training


def test_a_run_can_start_from_the_trainable_weights_of_a_checkpoint(tmp_path):
    source = moved(segmentation_module(partial(PILL, stage=1, rank=4)))
    path = tmp_path / "stage1.ckpt"
    torch.save({"state_dict": source.trainable_state(), "epoch": 3}, path)
    target = segmentation_module(partial(PILL, stage=2, rank=4))
    target.load_trainable_weights(str(path))
    restored = target.state_dict()
    assert all(torch.equal(restored[name], value) for name, value in source.trainable_state().items())
    torch.save({"weights": {}}, tmp_path / "plain.pt")
    with pytest.raises(UserError, match="holds no state_dict"):
        target.load_trainable_weights(str(tmp_path / "plain.pt"))
    with pytest.raises(UserError, match="stage1.ckpt' does not fit this model"):
        segmentation_module().load_trainable_weights(str(path))


def test_token_methods_read_the_frames_and_build_no_sequence_encoder():
    spec = DataSpec(sequence_dims={"audio": 5})
    built = {}
    for name, fusion in (("mit", partial(MiT, layers=[2])), ("concat", TokenConcat)):
        module = MiTModule(head=partial(ReferringSegmentation, vision_blocks=(4,), width=32),
                           llm=LLMConfig(path="tiny", dtype="float32"),
                           vision=VisionConfig(name="tiny", weights=None, dtype="float32"),
                           fusion=fusion, sequence_modalities=["audio"])
        module.build(spec)
        built[name] = module
    assert list(built["mit"].sequence_encoders) == ["audio"] and len(built["concat"].sequence_encoders) == 0
    assert list(built["concat"].fusion.tokens.projectors) == ["image", "audio"]
    frames = {"audio": torch.randn(3, 6, 5), "audio_mask": torch.ones(3, 6, dtype=torch.bool)}
    inputs = built["concat"].encode_modalities({**batch(), **frames})
    assert inputs.sequences["audio"] is frames["audio"] and inputs.sequence_masks["audio"] is frames["audio_mask"]
    assert set(inputs.vectors) == {"image"}
    assert built["concat"]({**batch(), **frames}).shape[0] == 3


@pytest.mark.parametrize("fusion", [TokenConcat, partial(PILL, rank=4), partial(ModeX, rank=4)], ids=["concat", "pill", "modex"])
def test_token_methods_train_the_classification_head_with_the_image_vector(fusion):
    module = MiTModule(head=partial(ImageTextClassification, hidden=16), llm=LLMConfig(path="tiny", dtype="float32"),
                       vision=VisionConfig(name="tiny", weights=None, dtype="float32"), fusion=fusion)
    module.build(DataSpec(num_classes=5))
    classification_batch = {**batch(), "label": torch.tensor([0, 3, 4])}
    module.training_step(classification_batch, 0).backward()
    assert module(classification_batch).shape == (3, 5)
    assert all(p.grad is not None for p in module.head.parameters())
    assert all(p.grad is not None for p in module.fusion.tokens.parameters())
