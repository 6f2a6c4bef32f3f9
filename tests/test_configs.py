"""Every config the project ships parses and builds; typed choices are checked by the parser.

Each base config (configs/*.yaml) and each overlay (configs/<group>/*.yaml, on the base it is written
for) is instantiated — model, data module and trainer — with its real settings: the paper's 7B shapes
(a random LLaMA-2-7B preset, read from its config only, never built), CLIP weight files that exist,
and small fixtures in every dataset's real format under MIT_DATA_ROOT. Trainer overlays that need
GPUs are parsed only.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from classification_fixtures import write_food101, write_snli_ve
from cli_helpers import fails_at_once
from mit_lightning.cli import MiTCLI, parse_run_config
from mmsa_fixtures import write_mmsa
from refer_fixtures import write_refer_fixture

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
#: overlays beside the base configs: the other RefCOCO datasets on refcoco.yaml
DATASET_OVERLAYS = {"refcoco+.yaml": "refcoco.yaml", "refcocog.yaml": "refcoco.yaml"}
BASES = sorted(path.name for path in CONFIGS.glob("*.yaml") if path.name not in DATASET_OVERLAYS)
OVERLAYS = sorted([*DATASET_OVERLAYS, *(str(path.relative_to(CONFIGS)) for path in CONFIGS.glob("*/*.yaml"))])
#: the base an overlay is written for, by its folder and the start of its name
OVERLAY_BASES = {("ablations", "refcoco_"): "refcoco.yaml", ("ablations", "release_"): "refcoco.yaml",
                 ("ablations", "mosi_"): "mosi.yaml", ("peers", ""): "demo.yaml", ("trainer", ""): "demo.yaml"}
#: overlays that ask for hardware this machine may not have: parsed, not instantiated
PARSE_ONLY = ("trainer/",)


@pytest.fixture(scope="module")
def environment(tmp_path_factory):
    """Dataset fixtures in their real layouts and weight files where the configs look for them."""
    root = tmp_path_factory.mktemp("configs")
    data = root / "data"
    for dataset, split_by in (("refcoco", "unc"), ("refcoco+", "unc"), ("refcocog", "umd")):
        write_refer_fixture(data, dataset=dataset, split_by=split_by)
    write_food101(data / "food101")
    write_snli_ve(data / "snli_ve")
    write_mmsa(data, "MOSI", aligned=False)
    write_mmsa(data, "MOSEI", aligned=False)
    clip = root / "clip.pt"
    clip.write_bytes(b"")  # only its existence is checked before the model is built
    return {"MIT_DATA_ROOT": str(data), "MIT_LLM_PATH": "random-llama-2-7b", "MIT_CLIP_PATH": str(clip),
            "MIT_CLIP_B16_PATH": str(clip), "MIT_CLIP_L14_PATH": str(clip)}


def base_of(overlay: str) -> str:
    if overlay in DATASET_OVERLAYS:
        return DATASET_OVERLAYS[overlay]
    group, name = overlay.split("/", 1)
    for (folder, prefix), base in OVERLAY_BASES.items():
        if folder == group and name.startswith(prefix):
            return base
    raise AssertionError(f"configs/{overlay}: say in OVERLAY_BASES which base config it is written for.")


def instantiate(environment, monkeypatch, tmp_path, *configs: str) -> MiTCLI:
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)  # run folders named in the configs are relative
    args = [arg for config in configs for arg in ("--config", str(CONFIGS / config))]
    return MiTCLI(args=[*args, "--trainer.accelerator", "cpu", "--trainer.devices", "1"], run=False)


@pytest.mark.parametrize("config", BASES)
def test_every_base_config_builds(environment, monkeypatch, tmp_path, config):
    cli = instantiate(environment, monkeypatch, tmp_path, config)
    assert cli.model is not None and cli.datamodule is not None and cli.trainer is not None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_builds_on_its_base(environment, monkeypatch, tmp_path, overlay):
    base = base_of(overlay)
    if overlay.startswith(PARSE_ONLY):
        config = parse_run_config(["--config", str(CONFIGS / base), "--config", str(CONFIGS / overlay)])
        assert config.trainer is not None
        return
    cli = instantiate(environment, monkeypatch, tmp_path, base, overlay)
    assert cli.model is not None and cli.datamodule is not None


@pytest.mark.parametrize("option, value, choices", [
    ("--model.llm.dtype", "float64", "bfloat16, float16, float32"),
    ("--model.llm.padding_side", "middle", "left, right"),
    ("--data.dataset", "refclef2", "refcoco, refcoco+, refcocog, refclef"),
    ("--data.train_sentences", "some", "one_per_ref, all"),
])
def test_a_choice_outside_its_type_is_refused_listing_the_choices(monkeypatch, capsys, option, value, choices):
    error = fails_at_once(monkeypatch, capsys, "fit", "--config", str(CONFIGS / "refcoco.yaml"), option, value)
    assert value in error
    assert all(choice.strip() in error for choice in choices.split(","))
