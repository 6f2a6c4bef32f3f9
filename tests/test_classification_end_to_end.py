"""`mit fit` then `mit test --ckpt_path` with configs/food101.yaml and configs/snli_ve.yaml.

The paper's configs run unchanged apart from tiny backbones (`TINY_LLM_AND_CLIP`), on fixtures in the real
on-disk formats: quoted CSV titles, an SNLI line without a gold label, a listed image that is
missing and one that does not decode.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers.cli_helpers import TINY_LLM_AND_CLIP, fails_at_once
from helpers.classification_fixtures import Fixture, write_food101, write_snli_ve
from mit_lightning.cli import MiTCLI, cli_main
from mit_lightning.metrics.names import metric_name

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
#: dataset → (fixture writer, evaluation splits of its config, extra overrides)
DATASETS = {
    "food101": (write_food101, ("val", "test"), ["--data.val_size", "4"]),  # 16 train images in the fixture
    "snli_ve": (write_snli_ve, ("dev", "test"), []),
}


@dataclass
class Run:
    dataset: str
    fixture: Fixture
    fit: MiTCLI
    test: MiTCLI
    checkpoint: Path
    metrics: dict[str, float]
    warnings: list[str]  # raised during `mit test`
    fit_logs: list[str]
    test_logs: list[str]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _logged(run) -> tuple[object, list[str]]:
    handler = _Records()
    logger = logging.getLogger("mit_lightning")
    logger.addHandler(handler)
    try:
        return run(), handler.messages
    finally:
        logger.removeHandler(handler)


@pytest.fixture(scope="module", params=sorted(DATASETS))
def run(request, tmp_path_factory) -> Run:
    """One fit of the dataset's config, then `mit test --ckpt_path <best>` with nothing else."""
    name = request.param
    writer, _, extra = DATASETS[name]
    tmp_path = tmp_path_factory.mktemp(name)
    fixture = writer(tmp_path / "data")
    runs = str(tmp_path / "runs")
    fit, fit_logs = _logged(lambda: cli_main([
        "fit", "--config", str(CONFIGS / f"{name}.yaml"), *TINY_LLM_AND_CLIP, *extra, "--data.root", str(fixture.root),
        "--trainer.default_root_dir", runs, "--trainer.logger.init_args.save_dir", runs,
    ]))
    checkpoint = Path(fit.trainer.checkpoint_callback.best_model_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        test, test_logs = _logged(lambda: cli_main(["test", "--ckpt_path", str(checkpoint)]))
    metrics = json.loads((Path(test.trainer.log_dir) / "test_metrics.json").read_text())
    return Run(name, fixture, fit, test, checkpoint, metrics, [str(w.message) for w in caught], fit_logs, test_logs)


def test_fit_selects_the_checkpoint_on_validation_accuracy(run: Run):
    callback = run.fit.trainer.checkpoint_callback
    assert callback.monitor == "val/accuracy" and callback.mode == "max"
    assert run.checkpoint.is_file() and callback.best_model_score is not None
    assert {"val/accuracy", "val/macro_f1", "val/loss"} <= set(run.fit.trainer.callback_metrics)


def test_mit_test_writes_accuracy_and_macro_f1_for_every_split(run: Run):
    splits = DATASETS[run.dataset][1]
    expected = {metric_name("test", split, metric) for split in splits for metric in ("accuracy", "macro_f1")}
    assert expected <= set(run.metrics)
    assert all(0.0 <= run.metrics[name] <= 1.0 for name in expected)
    assert Path(run.test.trainer.log_dir) != Path(run.fit.trainer.log_dir)


def test_mit_test_draws_a_confusion_matrix_per_split_in_tensorboard(run: Run):
    events = EventAccumulator(run.test.trainer.log_dir, size_guidance={"images": 0})
    events.Reload()
    splits = DATASETS[run.dataset][1]
    assert {metric_name("test", split, "confusion_matrix") for split in splits} <= set(events.Tags()["images"])
    image = events.Images("test/confusion_matrix")[0]
    cell = 512 // 3  # three classes in both fixtures: a 3×3 grid of square cells
    assert (image.height, image.width) == (3 * cell, 3 * cell)


def test_an_undecodable_image_is_reported_and_skipped(run: Run):
    corrupt = str(run.fixture.corrupt[0])
    reports = [message for message in run.warnings if corrupt in message]
    assert reports and "skipped because their image could not be read" in reports[0]
    assert "test/accuracy" in run.metrics  # the run went on


def test_a_missing_image_is_excluded_with_a_log_line(run: Run):
    missing = str(run.fixture.missing[0])
    assert any(missing in message and "missing" in message for message in run.test_logs)


@pytest.mark.parametrize("run", ["snli_ve"], indirect=True)
def test_snli_lines_without_a_gold_label_are_counted(run: Run):
    assert any("dev" in message and "skipped 1 lines" in message for message in run.fit_logs)


@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_missing_data_stops_the_run_with_one_clear_message(dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MIT_DATA_ROOT", str(tmp_path / "nowhere"))  # the config's ${MIT_DATA_ROOT:-data}/<dataset>
    error = fails_at_once(monkeypatch, capsys, "fit", "--config", str(CONFIGS / f"{dataset}.yaml"), *TINY_LLM_AND_CLIP)
    assert f"Data root not found: expected a directory at '{tmp_path / 'nowhere' / dataset}'" in error


def test_missing_clip_weights_stop_the_run_with_one_clear_message(tmp_path, monkeypatch, capsys):
    write_food101(tmp_path / "food101")
    monkeypatch.setenv("MIT_DATA_ROOT", str(tmp_path))
    monkeypatch.setenv("MIT_CLIP_PATH", str(tmp_path / "ViT-L-14-336.pt"))  # the config's ${MIT_CLIP_PATH:-...}
    error = fails_at_once(monkeypatch, capsys, "fit", "--config", str(CONFIGS / "food101.yaml"),
                          "--model.llm.path", "tiny", "--data.val_size", "4")
    assert f"CLIP weights not found: expected a file at '{tmp_path / 'ViT-L-14-336.pt'}'" in error
