"""Trained models on new inputs (`mit_lightning.load_model`, `load_adapters`) on the tiny backbones.

What matters: inputs are read exactly as the data modules read a dataset's samples, masks come back
as the test scores them, several adapters on one loaded backbone answer as each does alone, and
what cannot be served correctly is refused with one clear message.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.adapter_fixtures import CLASS_NAMES, MODELS, SPECS, build_adapter, shapes_image, write_checkpoint
from mit_lightning import load_model
from mit_lightning.adapters import read_adapter
from mit_lightning.data.base import collate
from mit_lightning.data.classification import ImageTextDataset, ImageTextRecord
from mit_lightning.data.mmsa import MMSADataModule
from mit_lightning.data.synthetic import SyntheticRefCOCODataModule
from mit_lightning.errors import UserError
from mit_lightning.fusion import TextOnly
from mit_lightning.inference import InputError, InputTooLarge, load_adapters
from mit_lightning.checkpoints import DATA_SPEC_ENTRY
from helpers.mmsa_fixtures import write_mmsa


def forward(predictor, items: list[dict]) -> torch.Tensor:
    """The model's output on dataset items, batched as the dataloaders batch them."""
    batch = {key: value.to(predictor.module.device) if isinstance(value, torch.Tensor) else value
             for key, value in collate(items).items()}
    with torch.no_grad():
        predictor.backbones.activate(predictor.module)
        return predictor.module(batch)


# --- reading inputs as the data modules do --------------------------------------------------------
def test_segmentation_reads_as_the_dataset_and_returns_the_masks_the_test_scores(demo_run):
    model = load_model(demo_run.checkpoint, device="cpu")
    assert model.task == "segmentation" and model.image_size == 64
    data = SyntheticRefCOCODataModule(root=str(demo_run.data_root), train_images=16, val_images=4, test_images=4,
                                      image_size=64, eval_at_original_size=True, num_workers=0)
    data.setup("test")
    dataset = data.datasets["test"]
    items = [dataset[index] for index in range(4)]
    expected = model.module.head.masks(forward(model, items), [item["mask"] for item in items])
    for index, (item, mask) in enumerate(zip(items, expected)):
        obj, sentence = dataset.samples[index]
        text = dataset.objects[obj].sentences[sentence].sent  # the form the model was trained on
        result = model.predict(image=item["image_path"], text=text.upper())
        assert result["prompt"] == item["prompt"]  # the run's template, lower-cased like RefCOCO's `sent`
        assert result["mask"].dtype == bool and np.array_equal(result["mask"], mask.numpy())


def test_a_batch_call_answers_each_input_as_predict_does_in_order(demo_run):
    model = load_model(demo_run.checkpoint, device="cpu")
    image, _ = shapes_image(64)
    inputs = [{"image": image, "text": text} for text in ("the red circle", "the blue square", "the square", "circle")]
    batched = model.predict_batch(inputs, batch_size=3)
    assert [result["prompt"] for result in batched] == [model.predict(**item)["prompt"] for item in inputs]
    for item, result in zip(inputs, batched):
        assert np.array_equal(result["mask"], model.predict(**item)["mask"])
    with pytest.raises(InputError, match="The text is empty"):
        model.predict_batch([inputs[0], {"image": image, "text": " "}])


def test_best_and_last_of_a_config_load_as_the_command_finds_them(demo_run):
    best = load_model("best", config=demo_run.configs, device="cpu")
    assert best.source == demo_run.checkpoint
    assert load_model("last", config=demo_run.configs, device="cpu").source.name == "last.ckpt"
    with pytest.raises(UserError, match="needs the run's --config"):
        load_model("best")


def test_masks_come_back_at_the_images_own_size(demo_run):
    model = load_model(demo_run.checkpoint, device="cpu")
    image, _ = shapes_image(64)
    wide = image.resize((100, 60))
    result = model.predict(image=np.asarray(wide), text="the red circle")
    assert result["mask"].shape == (60, 100)
    square = model.predict(image=wide.resize((64, 64), Image.Resampling.BICUBIC), text="the red circle")
    # the model sees both at 64×64: the wide mask is the square one's logits upsampled to 60×100
    assert abs(result["mask"].mean() - square["mask"].mean()) < 0.1


def test_classification_reads_as_the_dataset(task_checkpoints, tmp_path):
    model = load_model(task_checkpoints["classification"], device="cpu")
    path = tmp_path / "dish.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(path)
    record = ImageTextRecord(str(path), "Grilled {lemon} chicken, \"crispy\"", 1)
    item = ImageTextDataset([record], SPECS["classification"].prompt, model.image_size)[0]
    expected = forward(model, [item]).float().softmax(-1)[0]
    result = model.predict(image=str(path), text=record.text)
    assert result["prompt"] == item["prompt"]
    assert list(result["probabilities"]) == CLASS_NAMES
    assert list(result["probabilities"].values()) == pytest.approx(expected.tolist(), abs=1e-6)
    assert result["label"] == CLASS_NAMES[int(expected.argmax())] and result["label_index"] == int(expected.argmax())


def test_sentiment_reads_as_the_dataset_without_its_padding(task_checkpoints, tmp_path):
    model = load_model(task_checkpoints["sentiment"], device="cpu")
    write_mmsa(tmp_path, "MOSI", aligned=False)
    data = MMSADataModule(str(tmp_path), aligned=False, prompt_template=SPECS["sentiment"].prompt.template,
                          num_workers=0)
    data.setup("test")
    items = [data.datasets["test"][index] for index in range(4)]
    expected = forward(model, items)
    for item, score in zip(items, expected):
        steps = {name: int(item[f"{name}_mask"].sum()) for name in ("audio", "facial")}
        assert min(steps.values()) < max(item["audio"].shape[0], item["facial"].shape[0])  # padding was there
        result = model.predict(text=item["text"], **{name: item[name][:count].numpy() for name, count in steps.items()})
        assert result["prompt"] == item["prompt"]
        assert result["score"] == pytest.approx(float(score), rel=1e-5, abs=1e-5)


# --- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("call, error, message", [
    (dict(image="missing.png", text="the red circle"), InputError, "'missing.png' is not an image"),
    (dict(image=b"not an image", text="the red circle"), InputError, "is not an image that can be read"),
    (dict(image=np.zeros((8, 8, 3), dtype=np.float32), text="x"), InputError, "must be uint8"),
    (dict(image=np.zeros((8, 8, 3), dtype=np.uint8), text="   "), InputError, "The text is empty"),
    (dict(image=None, text="the red circle"), InputError, "reads an image with the text"),
    (dict(image=np.zeros((8, 8, 3), dtype=np.uint8), text="x" * 5000), InputTooLarge, "5,000 characters"),
    (dict(image=np.zeros((8, 8, 3), dtype=np.uint8), text="x", audio=[[0.0]]), InputError, "unknown: audio"),
])
def test_bad_input_is_one_clear_error(demo_run, call, error, message):
    model = load_model(demo_run.checkpoint, device="cpu")
    with pytest.raises(error, match=message):
        model.predict(**call)


@pytest.mark.parametrize("sequences, message", [
    ({"audio": np.zeros((3, 5))}, "missing: facial"),
    ({"audio": np.zeros((3, 4)), "facial": np.zeros((3, 20))}, r"'audio' has shape \(3, 4\); expected \(steps, 5\)"),
    ({"audio": np.zeros((0, 5)), "facial": np.zeros((3, 20))}, "at least one step"),
    ({"audio": [[0.0] * 5, [0.0]], "facial": np.zeros((3, 20))}, "'audio' is not an array of numbers"),
    ({"audio": np.full((2, 5), np.nan), "facial": np.zeros((3, 20))}, "NaN or infinite"),
])
def test_wrong_feature_sequences_are_one_clear_error(task_checkpoints, sequences, message):
    model = load_model(task_checkpoints["sentiment"], device="cpu")
    with pytest.raises(InputError, match=message):
        model.predict(text="it was great", **sequences)
    with pytest.raises(InputError, match="reads no image"):
        model.predict(image=np.zeros((8, 8, 3), dtype=np.uint8), text="x", audio=np.zeros((1, 5)),
                      facial=np.zeros((1, 20)))


def test_an_oversized_image_is_refused_from_its_header(tmp_path, demo_run):
    from mit_lightning.inference import read_image

    path = tmp_path / "huge.png"
    Image.new("L", (3000, 2000)).save(path)
    with pytest.raises(InputTooLarge, match="3000×2000 pixels, more than the 1,000,000"):
        read_image(str(path), max_pixels=1_000_000)


# --- several adapters on one backbone -------------------------------------------------------------
def test_adapters_share_one_backbone_and_answer_as_each_does_alone(demo_run, task_checkpoints, tmp_path):
    other = write_checkpoint("classification", tmp_path / "other.ckpt", seed=7)
    sources = [demo_run.checkpoint, task_checkpoints["classification"], other, task_checkpoints["sentiment"]]
    image, _ = shapes_image(64)
    sequences = {"audio": np.ones((4, 5)), "facial": np.ones((6, 20))}
    inputs = [dict(image=image, text="the red circle"), dict(image=image, text="Churros"),
              dict(image=image, text="Churros"), dict(text="I loved it", **sequences)]
    alone = [load_model(source, device="cpu").predict(**call) for source, call in zip(sources, inputs)]
    shared = list(load_adapters(sources, device="cpu").values())
    assert [predictor.name for predictor in shared] == ["runs", "classification", "other", "sentiment"]
    assert len({id(predictor.module.llm) for predictor in shared}) == 1  # the LLM is loaded once
    assert len({id(predictor.module.vision) for predictor in shared if predictor.image_size}) == 1
    assert alone[1]["probabilities"] != pytest.approx(alone[2]["probabilities"], abs=1e-3)  # which one runs matters
    for predictor, call, expected in [*zip(shared, inputs, alone), *zip(shared[::-1], inputs[::-1], alone[::-1])]:
        result = predictor.predict(**call)  # each call swaps the installed fusion
        for key, value in expected.items():
            if isinstance(value, np.ndarray):
                assert np.array_equal(result[key], value)
            elif isinstance(value, (float, dict)):
                assert result[key] == pytest.approx(value, abs=1e-5)
            else:
                assert result[key] == value


def test_task_token_adapters_share_one_backbone_and_answer_as_each_does_alone(task_checkpoints, tmp_path):
    model = copy.deepcopy(MODELS["classification"])
    model["text_feature"] = "task_token"
    sources = [build_adapter("classification", seed, tmp_path / f"token{seed}.ckpt", model=model) for seed in (5, 6)]
    sources.append(build_adapter("classification", 7, tmp_path / "last_token.ckpt"))
    image, _ = shapes_image(64)
    alone = [load_adapters([source], device="cpu")[source.source.stem].predict(image=image, text="Churros")
             for source in sources]
    assert alone[0]["probabilities"] != pytest.approx(alone[1]["probabilities"], abs=1e-3)  # the token matters
    shared = list(load_adapters(sources, device="cpu").values())
    for predictor, expected in [*zip(shared, alone), *zip(shared[::-1], alone[::-1])]:
        assert predictor.predict(image=image, text="Churros")["probabilities"] == pytest.approx(
            expected["probabilities"], abs=1e-5)


class LeavesAHook(TextOnly):
    """A fusion that changes the LLM itself and cannot take the change out again (like merged LoRA weights)."""

    def attach(self, llm) -> None:
        llm.model.layers[0].register_forward_hook(lambda *_: None)


def test_a_fusion_that_changes_the_llm_is_served_only_alone(tmp_path):
    model = copy.deepcopy(MODELS["classification"])
    model["fusion"] = {"class_path": f"{__name__}.LeavesAHook"}
    changing = build_adapter("classification", 3, tmp_path / "changing.ckpt", model=model)
    assert load_adapters([changing], device="cpu")["changing"].predict(image=shapes_image()[0], text="x")["label"]
    ordinary = build_adapter("classification", 4, tmp_path / "ordinary.ckpt")
    with pytest.raises(UserError, match="'changing' uses LeavesAHook, which changes the frozen LLM itself.*Serve it alone"):
        load_adapters([ordinary, changing], device="cpu")


def test_a_checkpoint_trained_on_other_backbones_is_refused_unless_allowed(task_checkpoints, tmp_path):
    checkpoint = torch.load(task_checkpoints["classification"], weights_only=True)
    checkpoint["mit_backbones"]["llm"]["fingerprint"]["seed"] = 1
    path = tmp_path / "elsewhere.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(UserError, match=r"trained on other frozen backbones \(LLM: trained on tiny .*'seed': 1.*--llm_path"):
        load_model(path, device="cpu")
    assert load_model(path, device="cpu", allow_other_backbones=True).task == "classification"


def test_adapters_needing_the_backbone_set_up_otherwise_are_refused(tmp_path):
    model = copy.deepcopy(MODELS["classification"])
    model["llm"]["max_text_tokens"] = 16
    short = build_adapter("classification", 5, tmp_path / "short.ckpt", model=model)
    usual = build_adapter("classification", 6, tmp_path / "usual.ckpt")
    with pytest.raises(UserError, match=r"'short' was trained with the LLM set up otherwise.*max_text_tokens=16 "
                                        r"\(loaded: 128\)"):
        load_adapters([usual, short], device="cpu")


def test_a_checkpoint_without_a_recorded_data_spec_reads_its_data_config(demo_run, tmp_path):
    checkpoint = torch.load(demo_run.checkpoint, weights_only=True)
    assert checkpoint[DATA_SPEC_ENTRY]["prompt"]["placeholder"] == "{description}"
    del checkpoint[DATA_SPEC_ENTRY]  # as written before data specs were recorded
    path = tmp_path / "older.ckpt"
    torch.save(checkpoint, path)
    assert read_adapter(path).data_spec.prompt == read_adapter(demo_run.checkpoint).data_spec.prompt
    checkpoint["mit_config"]["data"] = {"class_path": "mit_lightning.data.mmsa.MMSADataModule",
                                        "init_args": {"root": str(tmp_path / "nowhere")}}
    torch.save(checkpoint, path)
    with pytest.raises(UserError, match="predates recorded data specs.*MOSI feature file not found"):
        read_adapter(path)


def test_a_file_that_is_not_a_trained_model_is_one_clear_error(tmp_path):
    path = tmp_path / "weights.ckpt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(UserError, match="holds no trained MiT model"):
        load_model(path)
    with pytest.raises(UserError, match="No checkpoint or export at"):
        load_model(tmp_path / "nothing.ckpt")


def test_the_library_leaves_the_command_and_the_warning_filters_alone():
    """`load_model` from a notebook imports no command-line code and changes no global warning filter."""
    import subprocess
    import sys

    script = ("import sys, warnings; from mit_lightning import load_model; "
              "import mit_lightning.adapters, mit_lightning.inference; "
              "ours = [f for f in warnings.filters if f[1] is not None and any(p in f[1].pattern for p in "
              "('eval mode', 'dirpath', 'LightningCLI'))]; "
              "print('mit_lightning.cli' in sys.modules, len(ours))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "0"]


def test_load_model_compiles_what_it_is_told(tmp_path):
    """`compile` replaces the stored setting: the decoder layers are compiled (compilation itself happens at the
    first call; inductor's own output is compared with eager in test_compiling.py)."""
    path = write_checkpoint("classification", tmp_path / "model.ckpt")
    eager = load_model(path, device="cpu")
    compiled = load_model(path, device="cpu", compile="default")
    assert eager.module.compile_mode == "none" and compiled.module.compile_mode == "default"
    layers = compiled.module.llm.layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    assert all(layer._compiled_call_impl is None for layer in eager.module.llm.layers)
    with pytest.raises(UserError, match="model.compile"):
        load_model(path, device="cpu", compile="fast")
