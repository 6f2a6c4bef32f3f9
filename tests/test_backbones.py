"""The real loading code of the frozen backbones, exercised with small models saved to disk."""

from __future__ import annotations

import json
from types import SimpleNamespace

import open_clip
import pytest
import torch

from mit_lightning.backbones import gguf
from mit_lightning.backbones.llm import FrozenLLM, LLMConfig, last_token
from mit_lightning.backbones.quantization import check_quantization
from mit_lightning.backbones.presets import TINY_CLIP, tiny_tokenizer
from mit_lightning.backbones.vision import FrozenCLIP, VisionConfig
from mit_lightning.errors import UserError

PROMPTS = ["the red circle", "a longer prompt about the blue square"]


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A tiny LLaMA saved like a HuggingFace checkpoint, with a tokenizer that has no pad token."""
    folder = tmp_path_factory.mktemp("llama")
    preset = FrozenLLM(LLMConfig(path="tiny", dtype="float32"))
    preset.model.save_pretrained(folder)
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(folder)
    return folder, preset


def test_a_local_huggingface_folder_loads_frozen_in_the_requested_dtype(llama_folder):
    folder, preset = llama_folder
    llm = FrozenLLM(LLMConfig(path=str(folder), dtype="bfloat16"))
    assert all(not p.requires_grad and p.dtype == torch.bfloat16 for p in llm.parameters())
    assert not llm.model.training
    llm.train()
    assert not llm.model.training  # stays in eval mode when Lightning switches to training
    assert llm.tokenizer.pad_token is not None  # set sensibly when the tokenizer has none
    assert llm.shape == preset.shape


def test_the_loaded_model_computes_what_the_saved_one_did(llama_folder):
    folder, preset = llama_folder
    llm = FrozenLLM(LLMConfig(path=str(folder), dtype="float32"))
    ids, mask = llm.tokenize(PROMPTS, "cpu")
    expected_ids, expected_mask = preset.tokenize(PROMPTS, "cpu")
    torch.testing.assert_close(ids[mask.bool()], expected_ids[expected_mask.bool()])
    torch.testing.assert_close(
        last_token(llm(mask, input_ids=ids), mask), last_token(preset(expected_mask, input_ids=expected_ids), expected_mask)
    )


def test_the_llm_path_may_come_from_the_environment(llama_folder, monkeypatch):
    folder, _ = llama_folder
    monkeypatch.setenv("MIT_LLM_PATH", str(folder))
    assert LLMConfig(path="${MIT_LLM_PATH:-nowhere}").local_path() == folder
    monkeypatch.delenv("MIT_LLM_PATH")
    with pytest.raises(UserError, match="LLM weights not found.*nowhere"):
        LLMConfig(path="${MIT_LLM_PATH:-nowhere}").hf_config()


def test_a_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        LLMConfig(path=str(tmp_path)).hf_config()


def test_a_model_that_is_not_a_llama_style_decoder_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2Model

    GPT2Model(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(UserError, match="LLaMA-family decoder MiT can infuse"):
        FrozenLLM(LLMConfig(path=str(tmp_path), dtype="float32"))


def test_last_token_is_right_for_left_and_right_padding():
    hidden = torch.arange(2 * 4, dtype=torch.float32).view(2, 4, 1)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert last_token(hidden, right).flatten().tolist() == [1.0, 7.0]
    assert last_token(hidden, left).flatten().tolist() == [3.0, 7.0]


def test_presets_are_rebuilt_identically():
    first, second = FrozenLLM(LLMConfig(path="tiny", dtype="float32")), FrozenLLM(LLMConfig(path="tiny", dtype="float32"))
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    other_seed = FrozenLLM(LLMConfig(path="tiny", dtype="float32", seed=1))
    assert not torch.equal(other_seed.model.embed_tokens.weight, first.model.embed_tokens.weight)


@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory):
    """A small open_clip architecture registered by name, and its weights saved as a state dict."""
    folder = tmp_path_factory.mktemp("clip")
    (folder / "mit-test-vit.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder / "mit-test-vit.json")
    torch.manual_seed(3)
    model = open_clip.create_model("mit-test-vit")
    torch.save(model.state_dict(), folder / "weights.pt")
    return folder / "weights.pt", model


def test_clip_weights_load_from_a_local_file(clip_checkpoint):
    path, saved = clip_checkpoint
    clip = FrozenCLIP(VisionConfig(name="mit-test-vit", weights=str(path), dtype="float32", quick_gelu=False))
    assert all(not p.requires_grad for p in clip.parameters())
    for name, value in saved.visual.state_dict().items():
        torch.testing.assert_close(clip.visual.state_dict()[name], value)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    output = clip(images, blocks=[4, 2])
    assert output.embedding.shape == (2, TINY_CLIP["embed_dim"])
    assert output.tokens[2].shape == (2, 64, TINY_CLIP["vision_cfg"]["width"])  # 8×8 patches, class token dropped
    pixels = clip.normalize(images)
    torch.testing.assert_close(output.embedding, saved.visual(pixels))


def test_block_tokens_are_that_block_output_split_into_class_token_and_patches(tiny_clip):
    outputs = {}
    hooks = [
        tiny_clip.visual.transformer.resblocks[block - 1].register_forward_hook(
            lambda module, args, output, block=block: outputs.__setitem__(block, output)
        )
        for block in (2, 4)
    ]
    try:
        vision = tiny_clip(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8), blocks=[4, 2])
    finally:
        for hook in hooks:
            hook.remove()
    for block in (2, 4):
        torch.testing.assert_close(vision.class_tokens[block], outputs[block][:, :1], rtol=0, atol=0)
        torch.testing.assert_close(vision.tokens[block], outputs[block][:, 1:], rtol=0, atol=0)
    assert vision.class_tokens[2].shape == (2, 1, TINY_CLIP["vision_cfg"]["width"])


def test_vision_errors_are_clear(tiny_clip, tmp_path):
    with pytest.raises(UserError, match="CLIP weights not found"):
        VisionConfig(name="ViT-B-16", weights=str(tmp_path / "missing.pt")).weights_path()
    with pytest.raises(UserError, match="Unknown open_clip model"):
        VisionConfig(name="ViT-Nope").architecture()
    with pytest.raises(UserError, match="outside"):
        tiny_clip(torch.zeros(1, 3, 64, 64, dtype=torch.uint8), blocks=[5])
    with pytest.raises(UserError, match="expects 64"):
        tiny_clip(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_weights_of_another_architecture_are_a_clear_error(clip_checkpoint):
    path, _ = clip_checkpoint
    with pytest.raises(UserError, match="do not fit.*ViT-B-16"):
        FrozenCLIP(VisionConfig(name="ViT-B-16", weights=str(path), dtype="float32"))


def test_a_loaded_tower_of_another_shape_than_its_name_is_refused(monkeypatch):
    """E.g. an OpenAI TorchScript archive of ViT-B/16 given with name ViT-L-14-336."""
    from open_clip.model import CLIP

    other = CLIP(embed_dim=32, vision_cfg=dict(image_size=64, patch_size=16, width=64, layers=2),
                 text_cfg=dict(context_length=16, vocab_size=64, width=32, heads=2, layers=1)).visual
    monkeypatch.setattr(FrozenCLIP, "_load", lambda self: other)
    with pytest.raises(UserError, match="Set model.vision.name"):
        FrozenCLIP(VisionConfig(name="tiny", dtype="float32"))


def test_an_llm_fingerprint_follows_the_files_not_their_folder(llama_folder, tmp_path):
    import shutil

    from mit_lightning.backbones.fingerprint import llm_fingerprint

    llama_folder, _ = llama_folder
    original = llm_fingerprint(LLMConfig(path=str(llama_folder)))
    assert original["path"] == str(llama_folder.resolve())
    assert original["fingerprint"]["weights"] and len(original["fingerprint"]["config_sha256"]) == 16
    moved = shutil.copytree(llama_folder, tmp_path / "elsewhere")
    assert llm_fingerprint(LLMConfig(path=str(moved)))["fingerprint"] == original["fingerprint"]
    config = moved / "config.json"
    config.write_text(config.read_text().replace("{", '{"rope_theta": 123.0,', 1))
    assert llm_fingerprint(LLMConfig(path=str(moved)))["fingerprint"] != original["fingerprint"]


class _PickledCall:
    def __reduce__(self):
        return (print, ("code from a weight file ran",))


def break_weights(path, kind: str, state_dict: dict) -> None:
    """Write `path` as an empty, truncated or object-carrying weight file."""
    if kind == "pickled object":
        torch.save({**state_dict, "extra": _PickledCall()}, path)
    else:
        torch.save(state_dict, path)
        path.write_bytes(b"" if kind == "empty" else path.read_bytes()[:3000])


BROKEN = [("empty", "empty (0 bytes)"), ("truncated", "truncated or corrupted"),
          ("pickled object", "could run code, so it was refused")]


@pytest.mark.parametrize("kind, expected", BROKEN)
def test_broken_clip_weights_are_one_line_naming_the_file(clip_checkpoint, tmp_path, kind, expected):
    path, model = clip_checkpoint
    broken = tmp_path / "broken.pt"
    break_weights(broken, kind, model.state_dict())
    with pytest.raises(UserError) as error:
        FrozenCLIP(VisionConfig(name="mit-test-vit", weights=str(broken), dtype="float32"))
    assert str(broken) in str(error.value) and expected in str(error.value)


@pytest.mark.parametrize("kind, expected", BROKEN)
def test_broken_llm_weights_are_one_line_naming_the_file(llama_folder, tmp_path, kind, expected):
    import shutil

    folder, preset = llama_folder
    copy = shutil.copytree(folder, tmp_path / "llm")
    (copy / "model.safetensors").unlink()
    break_weights(copy / "pytorch_model.bin", kind, preset.model.state_dict())
    with pytest.raises(UserError) as error:
        FrozenLLM(LLMConfig(path=str(copy), dtype="float32"))
    assert str(copy / "pytorch_model.bin") in str(error.value) and expected in str(error.value)


@pytest.mark.parametrize("content", [b"hello, not a model", b"GGUF\x03\x00\x00\x00\x10"])
def test_a_foreign_or_truncated_gguf_file_is_one_line_naming_it(tmp_path, content):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(UserError, match=r"Cannot read .* from the GGUF file '.*model\.gguf'.*truncated") as error:
        LLMConfig(path=str(path)).hf_config()
    assert "\n" not in str(error.value)


def test_a_missing_gguf_file_or_package_is_named_before_anything_loads(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="expected a GGUF file at"):
        LLMConfig(path=str(tmp_path / "absent.gguf")).hf_config()
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    monkeypatch.setattr(gguf, "importlib", SimpleNamespace(util=SimpleNamespace(find_spec=lambda name: None)))
    with pytest.raises(UserError, match="needs the gguf package"):
        FrozenLLM(LLMConfig(path=str(tmp_path / "model.gguf")))


def test_a_quantization_the_device_cannot_run_is_refused_before_loading():
    with pytest.raises(UserError, match="cannot run on mps"):
        check_quantization("nf4", torch.device("mps"))
