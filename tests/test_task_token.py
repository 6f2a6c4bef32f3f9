"""The learnable task token (paper section 5.2) as the place the text feature is read."""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path

import pytest
import torch

from mit_lightning import scales
from mit_lightning.backbones.llm import FrozenLLM, LLMConfig, last_token
from mit_lightning.backbones.task_token import TaskToken
from mit_lightning.cli import cli_main
from mit_lightning.fusion import FusionInputs, MiT, ModelDims, TextOnly, TokenConcat

PROMPTS = ["the red circle", "Segment the small blue square on the left according to the text. #Segmentation:"]
TINY = scales.SCALES["tiny"]
CPU = torch.device("cpu")

# training_step logs its loss; without a Trainer, Lightning warns that nothing is logged
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


def llm_with_token(padding_side: str = "right") -> tuple[FrozenLLM, TaskToken]:
    llm = FrozenLLM(LLMConfig(path="tiny", dtype="float32", padding_side=padding_side))
    return llm, TaskToken(llm.model.get_input_embeddings())


def test_the_token_goes_right_after_each_prompts_last_real_token():
    token = TaskToken(torch.nn.Embedding(10, 4))
    ids = torch.tensor([[5, 6, 7], [5, 0, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    new_ids, new_mask = token.append(ids, mask)
    assert new_ids.tolist() == [[5, 6, 7, 10], [5, 10, 0, 0]]
    assert new_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    left_ids, left_mask = token.append(torch.tensor([[0, 0, 5]]), torch.tensor([[0, 0, 1]]))
    assert left_ids.tolist() == [[0, 0, 5, 10]] and left_mask.tolist() == [[0, 0, 1, 1]]


def test_the_feature_is_the_tokens_own_and_the_same_for_either_padding():
    features = {}
    for side in ("right", "left"):
        llm, token = llm_with_token(side)
        ids, mask = token.append(*llm.tokenize(PROMPTS, "cpu"))
        features[side] = TextOnly(ModelDims(llm=llm.shape))(llm, ids, mask, FusionInputs(vectors={}))
    torch.testing.assert_close(features["left"], features["right"], atol=1e-5, rtol=1e-5)
    llm, _ = llm_with_token()
    plain_ids, plain_mask = llm.tokenize(PROMPTS, "cpu")
    plain = last_token(llm(plain_mask, input_ids=plain_ids), plain_mask)
    assert (features["right"] - plain).abs().max() > 1e-3  # another token, another feature


def test_fresh_mit_is_still_the_identity_with_the_task_token():
    llm, token = llm_with_token()
    ids, mask = token.append(*llm.tokenize(PROMPTS, "cpu"))
    frozen = TextOnly(ModelDims(llm=llm.shape))(llm, ids, mask, FusionInputs(vectors={}))
    mit = MiT(ModelDims(llm=llm.shape, vectors={"image": 24}), layers=[1, 3, 4])
    mit.attach(llm)
    infused = mit(llm, ids, mask, FusionInputs(vectors={"image": torch.randn(2, 24)}))
    torch.testing.assert_close(infused, frozen, rtol=0, atol=1e-6)


@pytest.mark.parametrize("fusion", [partial(MiT, layers=(2, 3, 4)), TokenConcat], ids=["mit", "concat"])
def test_the_token_embedding_trains_and_frozen_weights_do_not(fusion):
    module = scales.build_module(TINY, fusion, 16, CPU, text_feature="task_token")
    module.train()
    module.training_step(scales.synthetic_batch(module, TINY, 2, 16, CPU), 0).backward()
    assert module.task_token.embedding.grad is not None and module.task_token.embedding.grad.abs().sum() > 0
    assert any(p is module.task_token.embedding for p in module.trainable_parameters())
    assert all(p.grad is None for name, p in module.named_parameters() if name.startswith(("llm.", "vision.")))


def test_a_copy_of_the_model_reads_its_own_token():
    module = scales.build_module(TINY, partial(MiT, layers=(2, 3, 4)), 16, CPU, text_feature="task_token")
    module.eval()
    batch = scales.synthetic_batch(module, TINY, 2, 16, CPU)
    before = module(batch)
    twin = copy.deepcopy(module)
    with torch.no_grad():
        twin.task_token.embedding.add_(1.0)
    assert (twin(batch) - before).abs().max() > 1e-4
    torch.testing.assert_close(module(batch), before)


def test_detach_gives_the_embedding_its_plain_lookups_back():
    embeddings = torch.nn.Embedding(10, 4)
    token = TaskToken(embeddings)
    token.detach()
    ids = torch.tensor([[1, 2]])
    torch.testing.assert_close(embeddings(ids), embeddings.weight[ids])
    with pytest.raises(IndexError):
        embeddings(torch.tensor([[token.token_id]]))


def test_fit_saves_the_token_and_a_fresh_model_takes_it_back(tmp_path: Path):
    demo = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    args = ["--config", demo, "--model.text_feature", "task_token", "--test_after_fit", "false",
            "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.logger.init_args.save_dir",
            str(tmp_path / "runs"), "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--data.root", str(tmp_path / "data"), "--data.train_images", "4", "--data.val_images", "1",
            "--data.test_images", "1", "--data.batch_size", "4", "--data.num_workers", "0"]
    fitted = cli_main(["fit", *args])
    checkpoint = Path(fitted.trainer.checkpoint_callback.best_model_path)
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    initial = fitted.model.llm.model.get_input_embeddings().weight.float().mean(dim=0)
    assert (saved["task_token.embedding"] - initial).abs().max() > 0  # it trained
    # the demo's model: tiny backbones, MiT on layers 2-4, decoder on CLIP blocks 4, 3, 2
    fresh = scales.build_module(TINY, partial(MiT, layers=(2, 3, 4)), 16, CPU, text_feature="task_token")
    fresh.on_load_checkpoint({"state_dict": saved})  # raises if a trainable weight is missing or unexpected
    fresh.load_state_dict(saved, strict=False)
    torch.testing.assert_close(fresh.task_token.embedding.detach(), saved["task_token.embedding"])
