"""What TensorBoard shows: previews of the answers, MiT's gates and infusion sizes, the learning rate, hparams."""

from __future__ import annotations

import math
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers.cli_helpers import small_run
from mit_lightning import insight
from mit_lightning.backbones.llm import FrozenLLM, LLMConfig, LLMShape
from mit_lightning.cli import cli_main
from mit_lightning.fusion.base import FusionInputs, ModelDims
from mit_lightning.fusion.mit import MiT, relative_change


@pytest.fixture(scope="module")
def events(tmp_path_factory) -> EventAccumulator:
    folder = tmp_path_factory.mktemp("tensorboard")
    cli = cli_main(["fit", *small_run(folder, "--trainer.max_epochs", "2")])
    accumulator = EventAccumulator(cli.trainer.log_dir, size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def test_each_validation_epoch_draws_previews_and_mits_gates(events):
    images = events.Tags()["images"]
    assert {"previews/segmentation", "mit/gates", "mit/infusion_size"} <= set(images)
    assert len(events.Images("previews/segmentation")) == 2  # one per epoch, the sanity check left out
    assert events.Images("mit/gates")[-1].width > 300


def test_gates_and_infusion_sizes_are_histograms_and_curves_per_layer_and_head(events):
    histograms = set(events.Tags()["histograms"])
    heads = LLMShape.from_hf_config(LLMConfig(path="tiny", dtype="float32").hf_config()).num_kv_heads
    for layer in (2, 3, 4):  # the demo's infused layers
        assert {f"mit/gate/layer{layer}/head{head}" for head in range(heads)} <= histograms
        assert {f"mit/infusion_{name}/layer{layer}" for name in ("key", "value", "ffn")} <= histograms
        gate = events.Scalars(f"mit/gate_mean/layer{layer}")
        assert len(gate) == 2 and all(0 < point.value < 1 for point in gate)


def test_the_learning_rate_and_the_final_metrics_beside_the_settings(events):
    scalars = set(events.Tags()["scalars"])
    assert any(tag.startswith("lr-") for tag in scalars)
    assert "final/val/oIoU" in scalars and not any(tag.startswith("params/") for tag in scalars)
    assert "hp_metric" not in scalars


def test_a_fresh_mit_reports_gates_and_no_change_at_all():
    """At identity initialisation the gated form changes nothing: every recorded size is exactly 0."""
    llm = FrozenLLM(LLMConfig(path="tiny", dtype="float32"))
    dims = ModelDims(llm=LLMShape.from_hf_config(llm.config.hf_config()), vectors={"image": 8})
    fusion = MiT(dims, layers=[2, 4])
    fusion.attach(llm)
    ids, mask = llm.tokenize(["the red circle", "a square"], torch.device("cpu"))
    with fusion.observe() as observed, torch.no_grad():
        fusion(llm, ids, mask, FusionInputs(vectors={"image": torch.randn(2, 8)}))
    summary = insight.summarise(observed)
    assert set(summary) == {"2", "4"}
    for quantities in summary.values():
        assert quantities["gate"].shape == (2, dims.llm.num_kv_heads)
        assert ((quantities["gate"] > 0) & (quantities["gate"] < 1)).all()
        for name in ("key", "value", "ffn"):
            assert torch.equal(quantities[name], torch.zeros_like(quantities[name]))
    assert all(infusion.observed is None for infusion in fusion.infusions.values())  # recording stops with the block


def test_the_relative_change_counts_real_tokens_only():
    old = torch.ones(1, 1, 3, 2)
    new = old.clone()
    new[..., 2, :] += 100.0  # a padding position
    new[..., 0, :] += 1.0
    change = relative_change(new, old, torch.tensor([[1, 1, 0]]))
    assert change.item() == pytest.approx(math.sqrt(2) / 2)


# --- seen in a browser ---------------------------------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def tensorboard_url(events):
    """TensorBoard itself serving the run, on a free port of this machine."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(Path(events.path).parent),
                               "--host", "127.0.0.1", "--port", str(port), "--load_fast", "false"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url + "data/runs", timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail("TensorBoard did not start")
            time.sleep(0.5)
    yield url
    server.terminate()
    server.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium)")
@pytest.mark.parametrize("tags, cards", [("mit/gates|mit/infusion_size", ["mit/gates", "mit/infusion_size"])])
def test_tensorboard_shows_the_pictures_in_a_browser(tensorboard_url, tmp_path, tags, cards):
    """TensorBoard's time series filtered to the panels; a screenshot of each is kept in the test's folder."""
    from helpers.headless_chromium import Chromium
    from PIL import Image

    search = "document.querySelector('input[placeholder=\"Filter tags (regex)\"]')"
    with Chromium(CHROMIUM, tmp_path / "profile") as browser:
        page = browser.open(f"{tensorboard_url}#timeseries", height=1100)
        page.wait_for(search, timeout=90)
        typed = f"({search}.value = {tags!r}, {search}.dispatchEvent(new Event('input', {{bubbles: true}})))"
        for card in cards:  # typed again while waiting: the filter typed before the runs load is dropped
            page.wait_for(f"{typed} && document.body.innerText.includes({card!r})", timeout=180)
        time.sleep(5)  # the pictures load after their titles
        screenshot = Image.open(page.screenshot(tmp_path / f"{cards[0].replace('/', '_')}.png"))
    assert np.asarray(screenshot.convert("L")).std() > 20
