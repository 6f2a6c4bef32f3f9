"""`mit check-data`: each split's counts, labels and setup exclusions printed, and a montage of samples per split."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.classification_fixtures import write_food101
from helpers.cli_helpers import fails_at_once
from helpers.headless_chromium import Chromium
from helpers.mmsa_fixtures import write_mmsa
from mit_lightning.check_data import score_summary
from mit_lightning.cli import cli_main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEMO_SIZES = ["--data.train_images", "6", "--data.val_images", "2", "--data.test_images", "3"]


def check_data(tmp_path: Path, capsys, config: str, *args: str) -> tuple[str, Path]:
    output = tmp_path / "montages"
    cli_main(["check-data", "--config", str(CONFIGS / config), "--output", str(output), *args])
    return capsys.readouterr().out, output


def assert_montages(output: Path, splits: list[str]) -> None:
    """One PNG per split, with something drawn on it (not one flat colour)."""
    assert sorted(path.stem for path in output.glob("*.png")) == sorted(splits)
    for split in splits:
        with Image.open(output / f"{split}.png") as image:
            assert image.format == "PNG" and image.width > 300
            assert np.asarray(image.convert("L")).std() > 10


def test_demo_counts_and_montages(tmp_path, capsys):
    out, output = check_data(tmp_path, capsys, "demo.yaml", "--data.root", str(tmp_path / "demo"), *DEMO_SIZES)
    # the synthetic generator: 6/2/3 images; the counts printed are the refs, sentences and images written
    assert "train: 20 samples; 20 refs, 51 sentences, 6 images" in out
    assert "val: 14 samples; 6 refs, 14 sentences, 2 images" in out
    assert "test: 15 samples; 6 refs, 15 sentences, 3 images" in out
    assert "Nothing was excluded or repaired at setup." in out
    assert_montages(output, ["train", "val", "test"])


def test_food101_classes_and_what_setup_excluded(tmp_path, capsys):
    fixture = write_food101(tmp_path / "food101")
    out, output = check_data(tmp_path, capsys, "food101.yaml", "--data.root", str(fixture.root),
                             "--data.val_size", "3", "--data.image_size", "64")
    assert "val: 3 samples in 3 classes: apple_pie 1, beignets 1, churros 1" in out
    # test: 2 per class, plus a missing image (excluded at setup) and a truncated one (skipped when drawn)
    assert "test: 7 samples in 3 classes: apple_pie 2, beignets 3, churros 2" in out
    assert "samples whose image file is missing: 1 excluded" in out and "apple_pie_9.jpg" in out
    assert "1 drawn samples skipped: their image does not decode" in out
    assert_montages(output, ["train", "val", "test"])


def test_mmsa_scores_and_repaired_features(tmp_path, capsys):
    data = write_mmsa(tmp_path, "MOSI", aligned=False)
    out, output = check_data(tmp_path, capsys, "mosi.yaml", "--data.root", str(tmp_path))
    assert f"valid: {len(data['valid']['id'])} clips; scores mean" in out
    assert "non-finite feature values replaced by 0" in out
    assert_montages(output, ["train", "valid", "test"])


def test_score_summary_counts_the_seven_classes():
    summary = score_summary(np.array([-3.0, -2.6, 0.0, 0.4, 1.5, 2.9], dtype=np.float32))
    assert "negative 2, neutral 1, positive 3" in summary
    assert "rounded -3:2 -2:0 -1:0 +0:2 +1:0 +2:1 +3:1" in summary


def test_a_missing_data_root_is_one_line(tmp_path, monkeypatch, capsys):
    message = fails_at_once(monkeypatch, capsys, "check-data", "--config", str(CONFIGS / "food101.yaml"),
                            "--data.root", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out"))
    assert "nowhere" in message and not (tmp_path / "out").exists()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium)")
def test_a_montage_shows_in_a_browser(tmp_path, capsys):
    """The montage opens as an image in headless Chromium; the screenshot is kept beside it to look at."""
    _, output = check_data(tmp_path, capsys, "demo.yaml", "--data.root", str(tmp_path / "demo"), *DEMO_SIZES,
                           "--samples", "4")
    with Chromium(CHROMIUM, tmp_path / "profile") as browser:
        page = browser.open((output / "train.png").as_uri(), width=1300, height=420)
        page.wait_for("document.images.length === 1 && document.images[0].complete")
        width = page.evaluate("document.images[0].naturalWidth")
        screenshot = page.screenshot(output / "train.screenshot.png")
    with Image.open(output / "train.png") as montage, Image.open(screenshot) as shown:
        assert width == montage.width
        assert np.asarray(shown.convert("L")).std() > 10  # the picture, not a blank or error page
