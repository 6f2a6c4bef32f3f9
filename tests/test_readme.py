"""The README's examples, read from the README itself: what they name exists, they run, and they answer what
they say (the expression names an object of the image sent; the trained demo finds it)."""

from __future__ import annotations

import glob
import json
import os
import pickle
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient
from pycocotools import mask as mask_utils

from helpers.adapter_fixtures import DEMO
from mit_lightning.data.refer import segmentation_to_rle
from mit_lightning.data.synthetic import write_synthetic_refer

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
DEMO_DATA = "data/demo"


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, re.MULTILINE | re.DOTALL)


def curl_examples() -> list[dict]:
    """Each `curl` command of the README: its form fields and its URL."""
    examples = []
    for block in code_blocks("bash"):
        for command in re.findall(r"^curl .*?(?<!\\)$", block, re.MULTILINE | re.DOTALL):
            words = shlex.split(command.replace("\\\n", " "))
            fields = [words[i + 1].split("=", 1) for i, word in enumerate(words) if word == "-F"]
            examples.append({"fields": fields, "url": words[-1]})
    return examples


def python_example() -> str:
    (block,) = [block for block in code_blocks("python") if "load_model" in block]
    return block


def asked(example: str) -> tuple[str, str]:
    """(image path, text) of the example's `model.predict(image=..., text=...)`."""
    match = re.search(r'model\.predict\(image="([^"]+)", text="([^"]+)"\)', example)
    assert match, "the Python example calls model.predict(image=..., text=...)"
    return match[1], match[2]


def examples() -> list[tuple[str, str]]:
    """Every (image path, expression) pair the README sends to the demo model."""
    pairs = [asked(python_example())]
    for curl in curl_examples():
        fields = dict(curl["fields"])
        pairs.append((fields["image"].lstrip("@"), fields["expression"]))
    return pairs


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    """The demo's dataset as `make demo` writes it (configs/demo.yaml's settings)."""
    settings = yaml.safe_load(Path(DEMO).read_text())["data"]["init_args"]
    generator = {key: value for key, value in settings.items() if key not in ("root", "batch_size", "num_workers")}
    return write_synthetic_refer(tmp_path_factory.mktemp("readme") / "demo", **generator)


def true_mask(data: Path, image_path: str, expression: str) -> tuple[str, np.ndarray]:
    """The split and the mask of the object of `image_path` that `expression` names in the demo's refs."""
    file_name = Path(image_path).name
    instances = json.loads((data / "refcoco" / "instances.json").read_text())
    image = next(image for image in instances["images"] if image["file_name"] == file_name)
    with open(data / "refcoco" / "refs(unc).p", "rb") as file:
        refs = [ref for ref in pickle.load(file) if ref["image_id"] == image["id"]]
    words = " ".join(re.findall(r"[a-z]+", expression.lower()))
    named = [ref for ref in refs if words in {sentence["sent"] for sentence in ref["sentences"]}]
    assert len(named) == 1, f"'{expression}' names {len(named)} objects of {file_name}: {[r['sentences'] for r in refs]}"
    annotation = next(ann for ann in instances["annotations"] if ann["id"] == named[0]["ann_id"])
    rle = segmentation_to_rle(annotation["segmentation"], image["height"], image["width"])
    return named[0]["split"], mask_utils.decode(rle).astype(bool)


# --- what the README names exists ---------------------------------------------------------------------
def test_every_make_target_and_config_file_the_readme_names_exists():
    rules = re.findall(r"^([a-z0-9%-]+):", (ROOT / "Makefile").read_text(), re.MULTILINE)
    targets = [re.compile(re.escape(rule).replace("%", ".+")) for rule in rules]  # pattern rules match by their %
    named_targets = set(re.findall(r"(?:^|`)make ([a-z0-9-]+)", README, re.MULTILINE))
    unknown = {name for name in named_targets if not any(target.fullmatch(name) for target in targets)}
    assert named_targets and not unknown, unknown
    configs = set(re.findall(r"configs/[\w+./*-]+\.yaml", README))
    missing = [config for config in configs if not glob.glob(str(ROOT / config))]
    assert len(configs) > 20 and not missing, missing


def test_every_example_names_an_object_of_a_test_image_it_sends(demo_data):
    pairs = examples()
    assert len(pairs) >= 2  # the Python example and the curl example
    for image_path, expression in pairs:
        assert image_path.startswith(DEMO_DATA + "/")
        assert (demo_data / Path(image_path).relative_to(DEMO_DATA)).is_file(), image_path
        split, mask = true_mask(demo_data, image_path, expression)
        assert split == "test" and mask.any()  # an image the demo never trained on


# --- the examples run -------------------------------------------------------------------------------
@pytest.fixture
def readme_folder(demo_run, demo_data, tmp_path, monkeypatch) -> Path:
    """A working folder as after `make demo` (shrunk): configs/demo.yaml finds a trained run, data/demo holds the
    demo's images."""
    config = yaml.safe_load(Path(DEMO).read_text())
    overlay = yaml.safe_load(Path(demo_run.configs[1]).read_text())
    config["trainer"].update(default_root_dir=overlay["trainer"]["default_root_dir"])
    config["trainer"]["logger"]["init_args"].update(overlay["trainer"]["logger"]["init_args"])
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "demo.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "data").mkdir()
    os.symlink(demo_data, tmp_path / DEMO_DATA)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_python_example_runs_as_written_and_answers_a_mask_at_the_images_size(readme_folder):
    namespace: dict = {}
    exec(compile(python_example(), "README.md", "exec"), namespace)  # noqa: S102  (the project's own README)
    mask = namespace["result"]["mask"]
    image_path, _ = asked(python_example())
    from PIL import Image

    with Image.open(image_path) as image:
        assert isinstance(mask, np.ndarray) and mask.dtype == bool and mask.shape == (image.height, image.width)


def test_the_curl_example_gets_the_answer_the_api_table_lists(readme_folder):
    from mit_lightning.inference import load_adapters
    from mit_lightning.serve.app import create_app

    (curl,) = curl_examples()
    adapter = re.fullmatch(r"http://127\.0\.0\.1:8000/adapters/(\w+)/segment", curl["url"])[1]
    predictors = load_adapters([(adapter, load_model_source())], device="cpu")
    files, data = {}, {}
    for name, value in curl["fields"]:
        if value.startswith("@"):
            files[name] = (Path(value[1:]).name, Path(value[1:]).read_bytes(), "image/jpeg")
        else:
            data.setdefault(name, []).append(value)
    with TestClient(create_app(predictors)) as client:
        response = client.post(f"/adapters/{adapter}/segment", files=files, data=data)
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    row = next(line for line in README.splitlines() if line.startswith("| `POST /adapters/<name>/segment`"))
    for field in re.findall(r"`(\w+)`", row.split("|")[3]):
        if field not in ("probability_map", "probability_png"):  # the map comes only when asked
            assert field in result, field


def load_model_source() -> Path:
    from mit_lightning.cli import find_checkpoint

    return find_checkpoint("best", ["configs/demo.yaml"])


# --- the trained demo answers what the README says --------------------------------------------------------
TRAINED = ROOT / "runs" / "demo"


@pytest.mark.skipif(not (TRAINED.is_dir() and (ROOT / DEMO_DATA).is_dir()), reason="no `make demo` run here")
def test_the_trained_demo_finds_the_object_the_examples_name(monkeypatch):
    from mit_lightning import load_model

    monkeypatch.chdir(ROOT)
    model = load_model("best", config="configs/demo.yaml", device="cpu")
    for image_path, expression in examples():
        _, truth = true_mask(ROOT / DEMO_DATA, image_path, expression)
        mask = model.predict(image=image_path, text=expression)["mask"]
        iou = (mask & truth).sum() / (mask | truth).sum()
        assert iou > 0.5, f"{expression} on {image_path}: IoU {iou:.2f}"
