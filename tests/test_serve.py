"""`mit serve`'s HTTP API in process (FastAPI's TestClient): three tasks on one loaded backbone, every bad
request answered with a clear 4xx while the server keeps serving, and concurrent requests batched."""

from __future__ import annotations

import base64
import io
import json
import re
import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from helpers.adapter_fixtures import CLASS_NAMES, shapes_image
from helpers.cli_helpers import fails_at_once
from mit_lightning.inference import load_adapters
from mit_lightning.serve.app import create_app

SEQUENCES = {"audio": np.linspace(-1, 1, 30).reshape(6, 5).tolist(), "facial": np.ones((4, 20)).tolist()}


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))


@pytest.fixture(scope="module")
def predictors(demo_run, task_checkpoints):
    return load_adapters([("shapes", demo_run.checkpoint), task_checkpoints["classification"],
                          task_checkpoints["sentiment"]], device="cpu")


@pytest.fixture(scope="module")
def client(predictors):
    with TestClient(create_app(predictors, max_batch_size=4, max_wait_ms=100, max_upload_mb=1)) as client:
        yield client


def segment(client, image_bytes: bytes, *expressions: str, adapter: str = "shapes"):
    return client.post(f"/adapters/{adapter}/segment", files={"image": ("shapes.png", image_bytes, "image/png")},
                       data={"expression": list(expressions)})


# --- every task -----------------------------------------------------------------------------------
def test_the_adapters_are_listed_with_their_task_and_inputs(client):
    listed = {adapter["name"]: adapter for adapter in client.get("/adapters").json()["adapters"]}
    assert {name: adapter["task"] for name, adapter in listed.items()} == {
        "shapes": "segmentation", "classification": "classification", "sentiment": "sentiment"}
    assert listed["shapes"]["image_size"] == 64 and listed["shapes"]["fusion"] == "MiT"
    assert listed["classification"]["classes"] == CLASS_NAMES
    assert listed["sentiment"]["sequences"] == {"audio": 5, "facial": 20} and listed["sentiment"]["image"] is False


def test_segmentation_answers_masks_and_overlays_at_the_images_size(client, predictors):
    image, _ = shapes_image(64)
    wide = image.resize((96, 48))
    response = segment(client, png_bytes(wide), "the red circle", "the blue square")
    assert response.status_code == 200
    answer = response.json()
    assert (answer["width"], answer["height"]) == (96, 48) and len(answer["results"]) == 2
    for result in answer["results"]:
        mask = decode(result["mask_png"])
        expected = predictors["shapes"].predict(image=wide, text=result["expression"])
        assert mask.shape == (48, 96) and set(np.unique(mask)) <= {0, 255}
        assert np.array_equal(mask > 0, expected["mask"])  # the very mask the Python API gives
        assert result["foreground"] == pytest.approx(expected["mask"].mean())
        assert decode(result["overlay_png"]).shape == (48, 96, 3)
        assert result["prompt"] == expected["prompt"]


def test_a_mask_comes_with_its_confidence_and_on_request_its_probability_map(client, predictors):
    image, _ = shapes_image(64)
    plain = segment(client, png_bytes(image), "the red circle").json()["results"][0]
    assert "probability_png" not in plain
    response = client.post("/adapters/shapes/segment", files={"image": ("shapes.png", png_bytes(image), "image/png")},
                           data={"expression": ["the red circle"], "probability_map": "true"})
    result = response.json()["results"][0]
    expected = predictors["shapes"].predict(image=image, text="the red circle")
    probability = expected["probability"]
    assert probability.shape == (64, 64) and probability.dtype == np.float32
    assert np.array_equal(expected["mask"], probability > 0.5)
    mean_inside = probability[expected["mask"]].mean() if expected["mask"].any() else 0.0
    assert result["confidence"] == plain["confidence"] == pytest.approx(mean_inside)
    assert np.abs(decode(result["probability_png"]) / 255.0 - probability).max() <= 0.5 / 255 + 1e-6


def test_adapters_name_their_source_without_its_local_folders_unless_the_server_says_so(client, predictors):
    listed = {adapter["name"]: adapter["source"] for adapter in client.get("/adapters").json()["adapters"]}
    assert listed["shapes"] == predictors["shapes"].source.name and "/" not in "".join(listed.values())
    with TestClient(create_app(predictors, show_paths=True)) as revealing:
        shown = {adapter["name"]: adapter["source"] for adapter in revealing.get("/adapters").json()["adapters"]}
    assert shown["shapes"] == str(predictors["shapes"].source)


def test_the_api_docs_need_no_internet():
    from fastapi_offline import FastAPIOffline  # noqa: F401  (the package the docs' files come from)

    with TestClient(create_app({})) as client:
        docs = client.get("/docs")
        assets = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", docs.text)
        assert docs.status_code == 200 and assets and all(asset.startswith("/") for asset in assets), assets
        assert all(client.get(asset).status_code == 200 for asset in assets)
        assert client.get("/openapi.json").json()["info"]["title"] == "mit-lightning"


def test_the_overlay_stands_out_from_the_object_it_covers():
    from mit_lightning.data.images import contrasting_colour, overlay

    image, circle = shapes_image(64)  # a red circle
    drawn = np.asarray(overlay(image, circle, colour=contrasting_colour(image, circle)), dtype=float)
    change = np.abs(drawn - np.asarray(image, dtype=float))[circle].sum(axis=-1).mean()
    assert change > 150  # red over red would change nothing; cyan over red changes a lot
    grey = ~circle & (np.asarray(image)[..., 1] == 128)
    assert list(contrasting_colour(image, grey)) == [230, 25, 25]  # red where red shows


def test_classification_answers_the_label_and_every_probability(client, predictors):
    image, _ = shapes_image(64)
    response = client.post("/adapters/classification/classify", files={"image": png_bytes(image)},
                           data={"text": "Churros with sugar"})
    answer = response.json()
    expected = predictors["classification"].predict(image=image, text="Churros with sugar")
    assert response.status_code == 200 and answer["label"] == expected["label"]
    probabilities = [item["probability"] for item in answer["probabilities"]]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) == pytest.approx(1.0)
    assert {item["label"]: item["probability"] for item in answer["probabilities"]} == pytest.approx(
        expected["probabilities"])


def test_sentiment_answers_the_score(client, predictors):
    response = client.post("/adapters/sentiment/sentiment", json={"text": "I loved it", "sequences": SEQUENCES})
    expected = predictors["sentiment"].predict(text="I loved it", **SEQUENCES)
    assert response.status_code == 200 and response.json()["score"] == pytest.approx(expected["score"], rel=1e-5)


def test_the_page_and_its_files_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and '<script src="/static/app.js">' in page.text
    assert client.get("/static/app.js").status_code == 200 and client.get("/static/style.css").status_code == 200


# --- bad requests -----------------------------------------------------------------------------------
def bad_requests():
    image = png_bytes(shapes_image(64)[0])
    huge = png_bytes(Image.new("L", (8000, 6000)))  # small file, 48 megapixels
    return {
        "not an image": (lambda c: segment(c, b"GIF89a, or so it says", "the red circle"), 400,
                         "The upload is not an image that can be read (PNG, JPEG, ...): its format is not recognised."),
        "a truncated image": (lambda c: segment(c, image[:60], "the red circle"), 400,
                              "The upload is not an image that can be read"),
        "empty expression": (lambda c: segment(c, image, "   "), 400, "The text is empty"),
        "no expression": (lambda c: c.post("/adapters/shapes/segment", files={"image": image}), 422,
                          "expression: Field required"),
        "no image": (lambda c: c.post("/adapters/shapes/segment", data={"expression": "the red circle"}), 422,
                     "image: Field required"),
        "too many expressions": (lambda c: segment(c, image, *["the red circle"] * 33), 413, "send at most 32"),
        "oversized upload": (lambda c: segment(c, b"\x89PNG" + bytes(2 * 2**20), "the red circle"), 413,
                             "larger than the 1.0 MiB"),
        "oversized chunked upload": (lambda c: c.post("/adapters/shapes/segment", content=iter([bytes(2**19)] * 3),
                                                      headers={"content-type": "multipart/form-data; boundary=x"}),
                                     413, "larger than the 1.0 MiB"),
        "too many pixels": (lambda c: segment(c, huge, "the red circle"), 413, "8000×6000 pixels"),
        "unknown adapter": (lambda c: segment(c, image, "the red circle", adapter="nope"), 404,
                            "No adapter 'nope'; loaded: shapes, classification, sentiment"),
        "wrong task": (lambda c: c.post("/adapters/shapes/classify", files={"image": image}, data={"text": "x"}),
                       400, "'shapes' does segmentation, not classification: POST /adapters/shapes/segment"),
        "empty classification text": (lambda c: c.post("/adapters/classification/classify", files={"image": image},
                                                       data={"text": " "}), 400, "The text is empty"),
        "wrong array shape": (lambda c: c.post("/adapters/sentiment/sentiment", json={
            "text": "fine", "sequences": {**SEQUENCES, "audio": [[0.0] * 4] * 3}}), 400,
                              r"'audio' has shape (3, 4); expected (steps, 5)"),
        "missing modality": (lambda c: c.post("/adapters/sentiment/sentiment", json={
            "text": "fine", "sequences": {"audio": SEQUENCES["audio"]}}), 400, "missing: facial"),
        "ragged array": (lambda c: c.post("/adapters/sentiment/sentiment", json={
            "text": "fine", "sequences": {**SEQUENCES, "facial": [[0.0] * 20, [1.0]]}}), 400,
                         "'facial' is not an array of numbers"),
        "not finite": (lambda c: c.post("/adapters/sentiment/sentiment", content=json.dumps(
            {"text": "fine", "sequences": {**SEQUENCES, "audio": [[float("nan")] * 5]}}),
            headers={"content-type": "application/json"}), 400, "NaN or infinite"),
        "no text": (lambda c: c.post("/adapters/sentiment/sentiment", json={"sequences": SEQUENCES}), 422,
                    "text: Field required"),
        "not JSON": (lambda c: c.post("/adapters/sentiment/sentiment", content=b"{text",
                                      headers={"content-type": "application/json"}), 422, "JSON decode error"),
    }


@pytest.mark.parametrize("case", sorted(bad_requests()))
def test_a_bad_request_gets_a_clear_4xx_and_the_server_keeps_serving(client, case):
    send, status, message = bad_requests()[case]
    response = send(client)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert " at 0x" not in response.json()["error"]  # words, never a Python object's repr
    assert segment(client, png_bytes(shapes_image(64)[0]), "the red circle").status_code == 200


# --- batching -------------------------------------------------------------------------------------------
def test_concurrent_requests_run_in_shared_batches(client):
    before = client.get("/stats").json()
    image = png_bytes(shapes_image(64)[0])
    statuses: list[int] = []

    def ask(expression: str) -> None:
        statuses.append(segment(client, image, expression).status_code)

    threads = [threading.Thread(target=ask, args=(f"the {colour} circle",)) for colour in ("red", "blue", "green", "red")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = client.get("/stats").json()
    assert statuses == [200] * 4
    assert after["samples"] - before["samples"] == 4
    assert after["batches"] - before["batches"] < 4  # at least two requests shared a forward pass
    assert after["largest_batch"] <= 4  # never above --max_batch_size


def test_serve_refuses_bad_settings_in_one_line(monkeypatch, capsys):
    error = fails_at_once(monkeypatch, capsys, "serve", "--ckpt_path", "x.ckpt", "--max_batch_size", "0")
    assert "--max_batch_size must be at least 1" in error
    error = fails_at_once(monkeypatch, capsys, "serve", "--ckpt_path", "best")
    assert "--ckpt_path best needs the run's --config" in error


@pytest.mark.parametrize("flag, logged", [([], False), (["--access_log"], True)])
def test_requests_are_logged_only_when_asked(demo_run, monkeypatch, capsys, flag, logged):
    import uvicorn

    from mit_lightning.cli import cli_main

    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **settings: started.update(settings))
    cli_main(["serve", "--ckpt_path", str(demo_run.checkpoint), *flag])
    assert started["access_log"] is logged and started["log_level"] == ("info" if logged else "warning")
