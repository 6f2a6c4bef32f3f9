"""What `mit serve` and `load_model` answer for inputs a careless or hostile client sends: a clear 4xx, never a
200 carrying a null or a made-up answer, and never a traceback; and an upright photo gets an upright mask."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from helpers.adapter_fixtures import shapes_image
from mit_lightning.data.images import UnreadableImage, read_rgb
from mit_lightning.inference import InputError, NonFiniteOutput, Sample, load_adapters, read_image
from mit_lightning.serve.app import create_app

SEQUENCES = {"audio": np.zeros((4, 5)).tolist(), "facial": np.ones((3, 20)).tolist()}


@pytest.fixture(scope="module")
def predictors(demo_run, task_checkpoints):
    return load_adapters([("shapes", demo_run.checkpoint), ("food", task_checkpoints["classification"]),
                          ("mood", task_checkpoints["sentiment"])], device="cpu")


@pytest.fixture(scope="module")
def client(predictors):
    with TestClient(create_app(predictors, max_batch_size=4, max_wait_ms=5, max_upload_mb=2)) as client:
        yield client


def encoded(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=options.pop("format", "PNG"), **options)
    return buffer.getvalue()


def sentiment(client, sequences: dict):
    return client.post("/adapters/mood/sentiment", content=json.dumps({"text": "so good", "sequences": sequences}),
                       headers={"content-type": "application/json"})


@pytest.mark.parametrize("value", [1e30, 3e38, -1e30, 1e20], ids=["1e30", "3e38", "-1e30", "1e20"])
def test_features_so_large_the_score_is_not_finite_are_a_400_never_a_null_score(client, value):
    response = sentiment(client, {"audio": np.full((4, 5), value).tolist(), "facial": np.full((3, 20), value).tolist()})
    if response.status_code == 200:  # a finite score is a real answer
        assert np.isfinite(response.json()["score"])
    else:
        assert response.status_code == 400 and "not a finite number" in response.json()["error"]


def test_one_sample_without_a_finite_output_fails_alone_in_its_batch(predictors):
    mood = predictors["mood"]
    extreme = {"audio": np.full((4, 5), 3e38, np.float32), "facial": np.full((3, 20), 3e38, np.float32)}
    usual = {name: np.asarray(value, np.float32) for name, value in SEQUENCES.items()}
    results = mood.run([mood.check(Sample("ok", sequences=usual)), mood.check(Sample("ok", sequences=extreme))])
    assert np.isfinite(results[0]["score"])
    assert isinstance(results[1], NonFiniteOutput)
    with pytest.raises(InputError, match="not a finite number"):
        mood.predict(text="ok", **extreme)


@pytest.mark.parametrize("adapter", ["shapes", "food"])
def test_a_model_output_that_is_not_finite_is_never_answered_as_a_result(predictors, client, monkeypatch, adapter):
    """Whatever makes it so (weights, an input far off): no mask of all background, no made-up label."""
    module = predictors[adapter].module
    forward = module.forward
    monkeypatch.setattr(module, "forward", lambda batch: forward(batch) * float("nan"))
    image = encoded(shapes_image()[0])
    if adapter == "shapes":
        response = client.post("/adapters/shapes/segment", files={"image": ("a.png", image, "image/png")},
                               data={"expression": ["the red circle"]})
    else:
        response = client.post("/adapters/food/classify", files={"image": ("a.png", image, "image/png")},
                               data={"text": "apple pie"})
    assert response.status_code == 400 and "not a finite number" in response.json()["error"]
    with pytest.raises(InputError, match="not a finite number"):
        predictors[adapter].predict(image=shapes_image()[0], text="x")


@pytest.mark.parametrize("audio, message", [
    ([["1.5"] * 5], "not an array of numbers"),
    ([[True] * 5], "not an array of numbers"),
    ([[None] * 5], "not an array of numbers"),
    ([[{"a": 1}] * 5], "not an array of numbers"),
    ([[10**400] * 5], "not an array of numbers"),
    ([[1e39] * 5], "beyond ±3.4e38"),
    ([[1] * 5, [1] * 4], "not an array of numbers"),
    ([], "at least one step"),
    (None, "not an array of numbers"),
    ([[[1] * 5]], "expected (steps, 5)"),
    ([[0] * 100_000], "expected (steps, 5)"),
], ids=["text-numbers", "booleans", "nulls", "objects", "huge-integer", "beyond-float32", "ragged", "empty", "null",
        "three-dimensional", "wide"])
def test_feature_sequences_that_are_not_numbers_of_the_right_shape_are_a_400(client, audio, message):
    response = sentiment(client, {"audio": audio, "facial": SEQUENCES["facial"]})
    assert response.status_code == 400 and message in response.json()["error"]


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("size", [(30_000, 30_000), (15_000, 15_000), (7_000, 7_000)], ids=["900MP", "225MP", "49MP"])
def test_an_image_header_declaring_a_decompression_bomb_is_a_413(client, size):
    response = client.post("/adapters/shapes/segment", files={"image": ("a.png", _png_header(*size), "image/png")},
                           data={"expression": ["x"]})
    assert response.status_code == 413


def test_a_dataset_image_declaring_a_decompression_bomb_is_skipped_like_any_unreadable_image(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header(30_000, 30_000))
    assert isinstance(read_rgb(path), UnreadableImage)


@pytest.mark.parametrize("mode, extension", [("I;16", "PNG"), ("CMYK", "JPEG"), ("P", "PNG"), ("LA", "PNG"),
                                             ("RGBA", "WEBP"), ("RGB", "TIFF"), ("RGB", "BMP"), ("L", "GIF")])
def test_images_of_every_common_mode_and_format_are_segmented_at_their_size(client, mode, extension):
    image = Image.new(mode, (21, 13))
    response = client.post("/adapters/shapes/segment", data={"expression": ["the red circle"]},
                           files={"image": (f"a.{extension.lower()}", encoded(image, format=extension), "image/x")})
    assert response.status_code == 200 and (response.json()["width"], response.json()["height"]) == (21, 13)


@pytest.mark.parametrize("array", [np.zeros((8, 8, 2), np.uint8), np.zeros((0, 0, 3), np.uint8),
                                   np.zeros((8, 8, 5), np.uint8), np.zeros((8, 8, 3), np.float32),
                                   np.zeros((2, 8, 8, 3), np.uint8)],
                         ids=["two-channels", "empty", "five-channels", "float", "batch"])
def test_an_image_array_of_another_form_is_one_line(array):
    with pytest.raises(InputError, match="An image array must be uint8"):
        read_image(array)


def _turned_photo(orientation: int) -> bytes:
    """A 30×20 photo stored sideways (20×30) with the EXIF orientation that turns it upright, as phones write."""
    upright, _ = shapes_image(30)
    upright = upright.resize((30, 20))
    stored = upright.transpose({6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(stored, format="JPEG", exif=exif.tobytes())


@pytest.mark.parametrize("orientation", [6, 8])
def test_a_photo_with_an_exif_orientation_gets_its_mask_upright_as_shown(client, predictors, tmp_path, orientation):
    photo = _turned_photo(orientation)
    response = client.post("/adapters/shapes/segment", files={"image": ("a.jpg", photo, "image/jpeg")},
                           data={"expression": ["the red circle"]})
    assert (response.json()["width"], response.json()["height"]) == (30, 20)
    (tmp_path / "a.jpg").write_bytes(photo)
    assert predictors["shapes"].predict(image=str(tmp_path / "a.jpg"), text="the red circle")["mask"].shape == (20, 30)
    assert predictors["shapes"].predict(image=photo, text="the red circle")["mask"].shape == (20, 30)
