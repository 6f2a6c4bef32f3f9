"""configs/ablations/release_recipe.yaml: the release's Table 1 set-up on the paper configs and the demo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cli_helpers import small_run
from mit_lightning.cli import cli_main, parse_run_config
from mit_lightning.heads.release_decoders import CLIPSegDecoder

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "configs" / "ablations" / "release_recipe.yaml")
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
    assert head.vision_blocks == [18, 12, 6]  # the paper config's, untouched
    assert config.model.head_lr_scale == 0.1 and config.model.optimizer.init_args.lr == 4.0e-05
    assert (config.trainer.gradient_clip_val, config.trainer.gradient_clip_algorithm) == (1.0, "value")
    assert config.data.init_args.prompt_template == RELEASE_PROMPT
    assert config.data.init_args.prompt_template.count("\n") == 6  # real newlines, not backslashes


def test_the_overlay_trains_and_tests_on_the_demo_data(tmp_path):
    cli = cli_main(["fit", *small_run(tmp_path, "--config", RECIPE, "--model.fusion.init_args.layers", "[2, 3, 4]",
                                      "--test_after_fit", "true")])
    assert isinstance(cli.model.head.decoder, CLIPSegDecoder) and cli.model.head.loss_name == "ce"
    assert {infusion.form for infusion in cli.model.fusion.infusions.values()} == {"release"}
    assert (cli.trainer.gradient_clip_val, cli.trainer.gradient_clip_algorithm) == (1.0, "value")
    assert [(group["name"], group["initial_lr"]) for group in cli.trainer.optimizers[0].param_groups] == [
        ("other", pytest.approx(1e-3)), ("head", pytest.approx(1e-4))
    ]
    assert cli.datamodule.prompt_format.template == RELEASE_PROMPT
    metrics = json.loads((Path(cli.trainer.log_dir) / "test_metrics.json").read_text())
    assert 0.0 <= metrics["test/oIoU"] <= 1.0
