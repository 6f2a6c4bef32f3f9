"""configs/ablations/release_recipe.yaml: the release's Table 1 set-up on the paper configs and the demo."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from helpers.cli_helpers import small_run
from mit_lightning.cli import cli_main, parse_run_config
from mit_lightning.heads.release_decoders import CLIPSegDecoder
from mit_lightning.release_evaluation import RESULTS_FILE, ReleaseEvaluation, sentence_draws

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "configs" / "ablations" / "release_recipe.yaml")
EVALUATION = REPO / "configs" / "ablations" / "release_evaluation.yaml"
#: the release's instruction prompt, verbatim ("a object" included), with the dataset's placeholder
RELEASE_PROMPT = (
    "Below is a text that describes a object. \n Segment the object according to the text.\n\n ### Text:\n"
    "{description}\n\n### Segmentation:"
)


@pytest.mark.parametrize("dataset_overlay", [[], ["datasets/refcoco+.yaml"], ["datasets/refcocog.yaml"]])
def test_the_overlay_gives_the_release_set_up_on_every_paper_config(dataset_overlay: list[str]):
    configs = ["refcoco.yaml", *dataset_overlay]
    config = parse_run_config([*(arg for name in configs for arg in ("--config", str(REPO / "configs" / name))),
                               "--config", RECIPE])
    variant = yaml.safe_load((REPO / "configs" / "ablations" / "release_variant.yaml").read_text())
    assert vars(config.model.fusion.init_args).items() >= variant["model"]["fusion"]["init_args"].items()
    head = config.model.head.init_args
    assert (head.decoder, head.width, head.heads, head.mlp_width, head.loss) == ("clipseg", 64, 4, 2048, "ce")
    assert (head.class_weights, head.align_corners, head.clipseg_init_depth) == ([0.9, 1.1], True, "vision")
    assert config.data.init_args.sentence_field == "raw"
    # their effective batch 16 (2 GPUs × 8) as 8 × 2 accumulated; no autocast: trainables in fp32, backbones bf16
    assert (config.data.init_args.batch_size, config.trainer.accumulate_grad_batches) == (8, 2)
    assert config.trainer.precision == "32-true" and config.model.llm.dtype == "bfloat16"
    assert head.vision_blocks == [18, 12, 6]  # the paper config's, untouched
    assert config.model.head_lr_scale == 0.1 and config.model.optimizer.init_args.lr == 4.0e-05
    assert (config.trainer.gradient_clip_val, config.trainer.gradient_clip_algorithm) == (1.0, "value")
    assert config.data.init_args.prompt_template == RELEASE_PROMPT
    assert config.data.init_args.prompt_template.count("\n") == 6  # real newlines, not backslashes


@pytest.fixture(scope="module")
def release_run(tmp_path_factory):
    """The demo with the recipe and the release's evaluation (the demo's splits: val and test), backbones in bf16."""
    tmp_path = tmp_path_factory.mktemp("release")
    evaluation = yaml.safe_load(EVALUATION.read_text())
    evaluation["trainer"]["callbacks+"][0]["init_args"]["splits"] = ["val", "test"]
    (tmp_path / "evaluation.yaml").write_text(yaml.safe_dump(evaluation))
    return cli_main(["fit", *small_run(tmp_path, "--config", RECIPE, "--config", str(tmp_path / "evaluation.yaml"),
                                       "--model.fusion.init_args.layers", "[2, 3, 4]", "--model.llm.dtype", "bfloat16",
                                       "--model.vision.dtype", "bfloat16", "--trainer.max_epochs", "2",
                                       "--test_after_fit", "true")])


def test_the_overlay_trains_and_tests_on_the_demo_data(release_run):
    cli = release_run
    assert isinstance(cli.model.head.decoder, CLIPSegDecoder) and cli.model.head.loss_name == "ce"
    assert {infusion.form for infusion in cli.model.fusion.infusions.values()} == {"release"}
    assert (cli.trainer.gradient_clip_val, cli.trainer.gradient_clip_algorithm) == (1.0, "value")
    assert [(group["name"], group["initial_lr"]) for group in cli.trainer.optimizers[0].param_groups] == [
        ("other", pytest.approx(1e-3)), ("head", pytest.approx(1e-4))
    ]
    assert cli.datamodule.prompt_format.template == RELEASE_PROMPT
    metrics = json.loads((Path(cli.trainer.log_dir) / "test_metrics.json").read_text())
    assert 0.0 <= metrics["test/oIoU"] <= 1.0


def test_the_prompt_is_filled_with_the_raw_sentence(release_run):
    sample = release_run.datamodule.train_dataset[(0, 0)]
    assert sample["prompt"] == RELEASE_PROMPT.format(description=sample["sentence"])
    assert any(character.isupper() for character in sample["sentence"] + "".join(
        release_run.datamodule.train_dataset[(index, 0)]["sentence"] for index in range(8)))  # as typed, not lower-cased


def test_two_accumulated_batches_make_one_optimizer_step(release_run):
    batches = math.ceil(len(release_run.datamodule.train_dataset) / 8)
    assert release_run.trainer.global_step == 2 * math.ceil(batches / 2)  # two epochs


def test_the_trainable_parts_compute_in_float32_beside_bf16_backbones(release_run):
    model = release_run.model
    seen = {}

    def record(name):
        def hook(_module, _args, output) -> None:
            seen.setdefault(name, (output[0] if isinstance(output, tuple) else output).dtype)
        return hook

    hooks = [model.head.decoder.register_forward_hook(record("decoder")),
             model.fusion.infusions["2"].key_maps.register_forward_hook(record("maps")),
             model.llm.layers[0].register_forward_hook(record("llm"))]
    batch = next(iter(release_run.datamodule.val_dataloader()[0]))
    with torch.no_grad(), release_run.trainer.precision_plugin.forward_context():
        model(batch)
    for hook in hooks:
        hook.remove()
    assert seen == {"decoder": torch.float32, "maps": torch.float32, "llm": torch.bfloat16}


def test_the_release_evaluation_keeps_each_splits_best_epoch_on_its_own_score(release_run):
    results = json.loads((Path(release_run.trainer.log_dir) / RESULTS_FILE).read_text())
    assert [entry["epoch"] for entry in results["epochs"]] == [0, 1]
    for split in ("val", "test"):
        scores = [entry[split] for entry in results["epochs"]]
        best = max(range(2), key=lambda epoch: (scores[epoch]["oIoU"], -epoch))
        assert results["best"][split] == {"epoch": best, **scores[best]}
        assert all(0 <= score["mIoU"] <= 1 for score in scores)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(release_run.trainer.log_dir))
    events.Reload()
    assert {"release_eval/val/oIoU", "release_eval/test/mIoU"} <= set(events.Tags()["scalars"])


def test_the_release_evaluation_scores_one_random_sentence_per_ref(release_run):
    callback = next(c for c in release_run.trainer.callbacks if isinstance(c, ReleaseEvaluation))
    dataset = callback._datasets["test"]
    assert len(dataset) == len(dataset.objects)  # one sample per ref, not per sentence
    draws = sentence_draws(len(dataset), 0, 1, "test")
    assert draws == sentence_draws(len(dataset), 0, 1, "test") != sentence_draws(len(dataset), 0, 0, "test")
    chosen = {dataset[(index, draw)]["sent_id"] for index, draw in enumerate(draws)}
    assert len(chosen) == len(dataset)
    assert any(dataset[(index, draw)]["sent_id"] != dataset.objects[index].sentences[0].sent_id
               for index, draw in enumerate(draws))  # not always the first sentence


def test_the_release_evaluation_needs_referring_segmentation_data(tmp_path):
    from mit_lightning.errors import UserError

    class Trainer:
        datamodule = object()

    with pytest.raises(UserError, match="ReleaseEvaluation scores referring segmentation"):
        ReleaseEvaluation().setup(Trainer(), None, "fit")
