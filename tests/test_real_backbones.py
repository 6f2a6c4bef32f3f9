"""MiT on a pretrained LLM: SmolLM2-135M-Instruct (LLaMA architecture, 30 layers) from its GGUF file, in fp32
and quantised (8-bit, NF4) on the CPU. Real weights, a real tokenizer and vocabulary, tied embeddings.

Kept short: late layers are infused (backward runs through three of the 30), batches are tiny, and the
GGUF file is read once per module, then saved as a HuggingFace folder the other tests load in a second.
"""

from __future__ import annotations

import json
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.adapter_fixtures import fit_demo, shapes_image
from mit_lightning import load_model
from mit_lightning.backbones.fingerprint import check_same_backbones, llm_fingerprint
from mit_lightning.backbones.llm import FrozenLLM, LLMConfig, LLMShape, last_token
from mit_lightning.backbones.quantization import save_model_folder
from mit_lightning.backbones.vision import VisionConfig
from mit_lightning.cli import cli_main
from mit_lightning.data.base import DataSpec
from mit_lightning.errors import UserError
from mit_lightning.fusion import FusionInputs, MiT, ModelDims
from mit_lightning.heads import ReferringSegmentation
from mit_lightning.module import MiTModule
from mit_lightning.scales import SCALES, synthetic_batch
from helpers.real_backbones import needs_smollm2, smollm2_gguf
from test_infusion import perturb, vectors

pytestmark = [pytest.mark.slow, needs_smollm2]
PROMPTS = ["the red circle", "Segment the small blue square on the left according to the text. #Segmentation:"]
LAYERS = [28, 30]


@pytest.fixture(scope="module")
def gguf_llm() -> FrozenLLM:
    return FrozenLLM(LLMConfig(path=str(smollm2_gguf()), dtype="float32"))


@pytest.fixture(scope="module")
def smollm2_folder(gguf_llm, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("smollm2")
    save_model_folder(gguf_llm.model, folder)
    gguf_llm.tokenizer.save_pretrained(folder)
    return folder


def infused(llm: FrozenLLM, prompts: list[str], mit: MiT, rows: slice = slice(None)) -> torch.Tensor:
    """The text features of `prompts`, each infused with its row of the same image vectors."""
    ids, mask = llm.tokenize(prompts, "cpu")
    return mit(llm, ids, mask, FusionInputs(vectors={"image": vectors().vectors["image"][rows]}))


def test_a_gguf_file_is_the_pretrained_model_and_mit_starts_as_its_identity(gguf_llm):
    assert gguf_llm.shape == LLMShape(hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                                      intermediate_size=1536)
    assert len(gguf_llm.tokenizer) == 49152 and gguf_llm.tokenizer.tokenize("crimson")  # the real vocabulary
    ids, mask = gguf_llm.tokenize(PROMPTS, "cpu")
    frozen = last_token(gguf_llm(mask, input_ids=ids), mask)
    mit = MiT(ModelDims(llm=gguf_llm.shape, vectors={"image": 24}), layers=LAYERS)
    mit.attach(gguf_llm)
    torch.testing.assert_close(infused(gguf_llm, PROMPTS, mit), frozen, rtol=0, atol=1e-5)
    perturb(mit, scale=0.05)
    assert (infused(gguf_llm, PROMPTS, mit) - frozen).abs().max() > 1e-2


def test_left_and_right_padding_give_the_same_text_feature(smollm2_folder):
    features = {}
    for side in ("left", "right"):
        llm = FrozenLLM(LLMConfig(path=str(smollm2_folder), dtype="float32", padding_side=side))
        assert llm.tokenize(PROMPTS, "cpu")[1][0].min() == 0  # the short prompt is padded
        torch.manual_seed(0)
        mit = MiT(ModelDims(llm=llm.shape, vectors={"image": 24}), layers=LAYERS)
        mit.attach(llm)
        perturb(mit, scale=0.05)
        features[side] = infused(llm, PROMPTS, mit)
        alone = infused(llm, PROMPTS[:1], mit, rows=slice(0, 1))  # not padded at all
        torch.testing.assert_close(features[side][:1], alone, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(features["left"], features["right"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quantization", ["none", "int8", "nf4"])
def test_on_a_quantised_base_mit_starts_as_its_identity_and_a_short_fit_lowers_the_loss(smollm2_folder, quantization):
    llm = FrozenLLM(LLMConfig(path=str(smollm2_folder), dtype="float32", quantization=quantization))
    module = MiTModule(head=partial(ReferringSegmentation, vision_blocks=(4, 3, 2), width=32), llm=llm.config,
                       vision=VisionConfig(name="tiny", weights=None, dtype="float32"), fusion=partial(MiT, layers=LAYERS))
    ids, mask = llm.tokenize(PROMPTS, "cpu")
    frozen = last_token(llm(mask, input_ids=ids), mask)
    torch.manual_seed(0)
    module.build(DataSpec(), llm=llm)
    image_vectors = vectors(size=module.dims(DataSpec()).vectors["image"])
    torch.testing.assert_close(module.fusion(llm, ids, mask, image_vectors), frozen, rtol=0, atol=1e-5)

    batch = synthetic_batch(module, SCALES["tiny"], 2, 8, torch.device("cpu"))
    optimizer = torch.optim.Adam(module.trainable_parameters(), lr=3e-3)
    losses = []
    module.train()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*self\.log\(\)` but the `self\.trainer` reference")
        for _ in range(4):
            optimizer.zero_grad()
            loss = module.training_step(batch, 0)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert all(parameter.grad.abs().sum() > 0 for parameter in module.fusion.parameters())  # through the base


def test_a_checkpoint_is_refused_on_a_base_quantised_otherwise(smollm2_folder):
    trained = llm_fingerprint(LLMConfig(path=str(smollm2_folder), quantization="nf4"))
    for other in ("none", "int8"):
        now = llm_fingerprint(LLMConfig(path=str(smollm2_folder), quantization=other))
        with pytest.raises(UserError, match="quantization"):
            check_same_backbones({"llm": trained}, {"llm": now}, "'run.ckpt'")
    check_same_backbones({"llm": trained}, {"llm": trained}, "'run.ckpt'")


def test_a_run_on_the_pretrained_llm_predicts_exports_and_loads(smollm2_folder, tmp_path):
    model = {"llm": {"path": str(smollm2_folder), "dtype": "float32"},
             "fusion": {"class_path": "mit_lightning.fusion.MiT", "init_args": {"layers": [30]}}}
    run = fit_demo(tmp_path, model=model, train_images=4)
    image, _ = shapes_image()
    mask = load_model(run.checkpoint, device="cpu").predict(image=image, text="the red circle")["mask"]
    assert mask.shape == (64, 64) and mask.dtype == bool

    cli_main(["export", "--ckpt_path", str(run.checkpoint), str(tmp_path / "export")])
    exported = load_model(tmp_path / "export", device="cpu").predict(image=image, text="the red circle")["mask"]
    np.testing.assert_array_equal(exported, mask)

    cli = cli_main(["predict", "--ckpt_path", str(run.checkpoint), "--trainer.enable_progress_bar", "false"])
    rows = (Path(cli.trainer.log_dir) / "predictions" / "predictions.rank0.jsonl").read_text().splitlines()
    assert rows and all("iou" in json.loads(row) for row in rows)
