"""CMU-MOSI end to end (configs/mosi.yaml on MMSA pickles) and the Table 6 modality configs.

The configs run unchanged apart from the tiny LLM (`TINY_LLM`). The MMSA fixtures carry -inf audio
values and, unaligned, sequences of their own lengths (one clip without audio frames).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mit_lightning.backbones import taps
from mit_lightning.backbones.llm import last_token
from mit_lightning.cli import MiTCLI, cli_main
from mit_lightning.data.mmsa import MMSADataModule
from mit_lightning.fusion import LateAddition, MiT, TextOnly
from mit_lightning.metrics.sentiment import SENTIMENT_METRIC_NAMES
from mit_lightning.module import MiTModule
from helpers.cli_helpers import TINY_LLM, fails_at_once
from helpers.mmsa_fixtures import write_mmsa

REPO = Path(__file__).resolve().parents[1]
MOSI = str(REPO / "configs" / "mosi.yaml")
ENCODER_WIDTH = 128  # model.sequence_encoder.width in configs/mosi.yaml


def run_dirs(path: Path) -> list[str]:
    return ["--trainer.default_root_dir", str(path), "--trainer.logger.init_args.save_dir", str(path)]


# --- mit fit / mit test ----------------------------------------------------------------------------
@dataclass
class Run:
    aligned: bool
    fit: MiTCLI
    test: MiTCLI
    metrics: dict[str, float]


@pytest.fixture(scope="module", params=[True, False], ids=["aligned", "unaligned"])
def run(request, tmp_path_factory) -> Run:
    """`mit fit --config configs/mosi.yaml`, then `mit test` on the best checkpoint: aligned with the
    checkpoint alone, unaligned as `mit test --config configs/mosi.yaml ... --ckpt_path`."""
    aligned = request.param
    tmp_path = tmp_path_factory.mktemp("aligned" if aligned else "unaligned")
    write_mmsa(tmp_path / "data", "MOSI", aligned=aligned)
    data = ["--data.root", str(tmp_path / "data"), "--data.aligned", str(aligned).lower()]
    fit = cli_main(["fit", "--config", MOSI, *TINY_LLM, *data, *run_dirs(tmp_path / "runs")])
    checkpoint = fit.trainer.checkpoint_callback.best_model_path
    if aligned:
        test = cli_main(["test", "--ckpt_path", checkpoint])
    else:
        runs = run_dirs(tmp_path / "runs")
        test = cli_main(["test", "--config", MOSI, *TINY_LLM, *data, *runs, "--ckpt_path", checkpoint])
    metrics = json.loads((Path(test.trainer.log_dir) / "test_metrics.json").read_text())
    return Run(aligned, fit, test, metrics)


def test_fit_selects_the_checkpoint_on_validation_loss(run: Run):
    callback = run.fit.trainer.checkpoint_callback
    assert callback.monitor == "val/loss" and callback.mode == "min"
    assert Path(callback.best_model_path).is_file()
    assert math.isfinite(float(run.fit.trainer.callback_metrics["train/loss"]))  # -inf audio was cleaned


def test_mit_test_reports_every_sentiment_metric(run: Run):
    expected = {f"test/{name}" for name in SENTIMENT_METRIC_NAMES}
    assert expected <= set(run.metrics)
    assert all(math.isfinite(run.metrics[name]) for name in expected)
    fractions = [name for name in SENTIMENT_METRIC_NAMES if name.startswith(("Acc", "F1"))]
    assert all(0.0 <= run.metrics[f"test/{name}"] <= 1.0 for name in fractions)


def test_the_test_run_reads_the_file_it_was_trained_on(run: Run):
    assert run.test.datamodule.aligned is run.aligned
    assert run.test.datamodule.path.name == ("aligned_50.pkl" if run.aligned else "unaligned_50.pkl")
    assert run.test.model.sequence_modalities == ["audio", "facial"]


@pytest.mark.parametrize("dataset, configs", [("MOSI", ["mosi.yaml"]), ("MOSEI", ["mosi.yaml", "datasets/mosei.yaml"])])
def test_missing_features_stop_the_run_with_one_clear_message(dataset, configs, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MIT_DATA_ROOT", str(tmp_path / "nowhere"))  # the config's ${MIT_DATA_ROOT:-data}
    config_args = [arg for config in configs for arg in ("--config", str(REPO / "configs" / config))]
    error = fails_at_once(monkeypatch, capsys, "fit", *config_args, *TINY_LLM)
    expected = tmp_path / "nowhere" / dataset / "Processed" / "unaligned_50.pkl"
    assert f"{dataset} feature file not found: expected a file at '{expected}'" in error


def test_missing_llm_stops_the_run_with_one_clear_message(tmp_path, monkeypatch, capsys):
    write_mmsa(tmp_path / "data", "MOSI", aligned=False)
    monkeypatch.setenv("MIT_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("MIT_LLM_PATH", str(tmp_path / "llama"))  # the config's ${MIT_LLM_PATH:-...}
    error = fails_at_once(monkeypatch, capsys, "fit", "--config", MOSI)
    assert f"LLM weights not found: expected a model folder at '{tmp_path / 'llama'}'" in error


# --- Table 6: which modalities are infused ---------------------------------------------------------
ROWS = {  # config in configs/ablations/ → (modalities, fusion)
    "mosi_text": ((), TextOnly),
    "mosi_text_audio": (("audio",), MiT),
    "mosi_text_facial": (("facial",), MiT),
    "mosi_text_audio_facial": (("audio", "facial"), MiT),
    "mosi_late_addition": (("audio", "facial"), LateAddition),
}


@pytest.fixture(scope="module")
def mosi_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mosi")
    write_mmsa(root, "MOSI", aligned=True)
    return root


@pytest.fixture(scope="module")
def batch(mosi_root: Path) -> dict:
    """A test batch carrying both sequences, whatever the model reads."""
    data = MMSADataModule(str(mosi_root), aligned=True, modalities=["audio", "facial"], num_workers=0)
    data.setup("test")
    return next(iter(data.test_dataloader()[0]))


@dataclass
class Row:
    name: str
    model: MiTModule
    data: MMSADataModule


@pytest.fixture(scope="module", params=sorted(ROWS))
def row(request, mosi_root: Path, tmp_path_factory) -> Row:
    """The model a user gets from `mit fit --config configs/mosi.yaml --config configs/ablations/<name>.yaml`
    (the tiny LLM given before the overlay, so that the overlay decides the fusion method), with its
    fusion weights moved away from the identity initialisation, as training would."""
    name = request.param
    cli = MiTCLI(
        args=[
            "--config", MOSI, *TINY_LLM, "--config", str(REPO / "configs" / "ablations" / f"{name}.yaml"),
            "--data.root", str(mosi_root), "--data.aligned", "true", *run_dirs(tmp_path_factory.mktemp(name)),
        ],
        run=False,
    )
    cli.model.build(cli.datamodule.spec)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in cli.model.fusion.parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
    return Row(name, cli.model.eval(), cli.datamodule)


def test_each_table6_config_builds_its_row(row: Row):
    modalities, fusion = ROWS[row.name]
    model = row.model
    assert type(model.fusion) is fusion
    assert sorted(model.sequence_encoders) == list(modalities)
    assert row.data.modalities == list(modalities)  # nothing is read that is not used
    if fusion is MiT:
        assert model.fusion.modalities == modalities
        for infusion in model.fusion.infusions.values():
            assert infusion.key_maps.in_features == ENCODER_WIDTH * len(modalities)
            assert infusion.ffn_map.in_features == ENCODER_WIDTH * len(modalities)


def test_changing_a_modality_changes_the_prediction_only_when_it_is_used(row: Row, batch: dict):
    modalities, _ = ROWS[row.name]
    with torch.no_grad():
        reference = row.model(batch)
        for modality in ("audio", "facial"):
            changed = {**batch, modality: batch[modality] + torch.randn_like(batch[modality])}
            moved = not torch.allclose(row.model(changed), reference, atol=1e-6)
            assert moved is (modality in modalities), f"{row.name}: changing {modality}"


@pytest.mark.parametrize("row", ["mosi_late_addition"], indirect=True)
def test_late_addition_leaves_the_llm_untouched_and_adds_after_it(row: Row, batch: dict):
    model = row.model
    assert taps.tapped_layers(model.llm.model) == []
    assert not model.llm.model.config._attn_implementation.startswith(taps.TAPPED_PREFIX)
    seen: list[torch.Tensor] = []
    features: list[torch.Tensor] = []
    hooks = [
        model.llm.register_forward_hook(lambda _module, _args, hidden: seen.append(hidden)),
        model.fusion.register_forward_hook(lambda _module, _args, text: features.append(text)),
    ]
    changed = {**batch, "audio": batch["audio"] + 1.0, "facial": batch["facial"] - 1.0}
    with torch.no_grad():
        model(batch)
        model(changed)
        _, attention_mask = model.llm.tokenize(batch["prompt"], "cpu")
        vectors = model.encode_modalities(batch).vectors
        added = sum(projection(vectors[name]) for name, projection in model.fusion.projections.items())
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(seen[0], seen[1], rtol=0, atol=0)  # the LLM never sees the other modalities
    assert not torch.allclose(features[0], features[1])
    torch.testing.assert_close(features[0], last_token(seen[0], attention_mask) + added)
