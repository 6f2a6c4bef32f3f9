"""The page of `mit serve` in a real headless Chromium (Debian's package): choose an image, type an
expression, see the mask. Skipped where no Chromium is installed (`apt-get install chromium`)."""

from __future__ import annotations

import base64
import io
import shutil
import socket
import threading
import time

import numpy as np
import pytest
import uvicorn
from PIL import Image

from helpers.adapter_fixtures import shapes_image
from helpers.headless_chromium import Chromium
from mit_lightning.inference import load_adapters
from mit_lightning.serve.app import create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium)")


@pytest.fixture(scope="module")
def served(demo_run):
    """`mit serve` of the demo checkpoint, on a free port of this machine, in a thread."""
    predictors = load_adapters([("shapes", demo_run.checkpoint)], device="cpu")
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(predictors), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listening]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{listening.getsockname()[1]}/", predictors["shapes"]
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def page(served, tmp_path):
    with Chromium(CHROMIUM, tmp_path / "profile") as browser:
        page = browser.open(served[0])
        page.wait_for("document.querySelectorAll('#adapter option').length === 1")
        yield page


def test_the_page_segments_the_shape_it_is_told(page, served, tmp_path):
    image, _ = shapes_image(64)
    image.save(tmp_path / "shapes.png")
    assert page.evaluate("document.getElementById('adapter').value") == "shapes"
    assert page.evaluate("document.getElementById('adapter-info').textContent").startswith("segmentation · MiT")
    assert page.evaluate("document.getElementById('text-field').hidden")  # segmentation asks for expressions
    page.set_files("#image-input", tmp_path / "shapes.png")
    page.wait_for("!document.getElementById('preview').hidden")
    page.evaluate("document.getElementById('expressions').value = 'the red circle\\nthe blue square';"
                  "document.getElementById('run').click()")
    page.wait_for("document.querySelectorAll('#results img.mask').length === 2")
    shown = page.evaluate("[...document.querySelectorAll('#results img.mask')].map(image => image.src)")
    captions = page.evaluate("[...document.querySelectorAll('#results h2')].map(title => title.textContent)")
    screenshot = Image.open(page.screenshot(tmp_path / "page.png"))
    assert captions == ["“the red circle”", "“the blue square”"]
    for source, expression in zip(shown, ("the red circle", "the blue square")):
        mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1])))) > 0
        assert np.array_equal(mask, served[1].predict(image=image, text=expression)["mask"])
    assert screenshot.size == (1280, 860) and np.asarray(screenshot.convert("L")).std() > 10
    assert page.evaluate("document.getElementById('error').hidden")


def test_an_unreadable_image_clears_the_previous_answer(page, tmp_path):
    shapes_image(64)[0].save(tmp_path / "shapes.png")
    page.set_files("#image-input", tmp_path / "shapes.png")
    page.wait_for("!document.getElementById('preview').hidden")
    page.evaluate("document.getElementById('expressions').value = 'the red circle';"
                  "document.getElementById('probability-map').checked = true;"
                  "document.getElementById('run').click()")
    page.wait_for("document.querySelectorAll('#results img.mask').length === 2")  # the mask and its probabilities
    captions = page.evaluate("[...document.querySelectorAll('#results figcaption')].map(c => c.textContent)")
    assert "confidence" in captions[1] and captions[2] == "foreground probability (white: 1)"
    (tmp_path / "broken.png").write_bytes((tmp_path / "shapes.png").read_bytes()[:40])
    page.set_files("#image-input", tmp_path / "broken.png")
    page.evaluate("document.getElementById('run').click()")
    page.wait_for("!document.getElementById('error').hidden")
    error = page.evaluate("document.getElementById('error').textContent")
    assert "not an image that can be read" in error and " at 0x" not in error
    assert page.evaluate("document.querySelectorAll('#results .result').length") == 0


def test_the_page_shows_what_was_wrong(page, tmp_path):
    page.evaluate("document.getElementById('expressions').value = 'the red circle';"
                  "document.getElementById('run').click()")
    page.wait_for("!document.getElementById('error').hidden")
    assert "Choose an image first" in page.evaluate("document.getElementById('error').textContent")
    (tmp_path / "notes.png").write_text("not an image at all")
    page.set_files("#image-input", tmp_path / "notes.png")
    page.evaluate("document.getElementById('run').click()")
    page.wait_for("document.getElementById('error').textContent.includes('not an image')")
    assert page.evaluate("document.querySelectorAll('#results .result').length") == 0
