"""`mit export`: a checkpoint's trained part as a folder (safetensors + JSON) that serves like the checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers.adapter_fixtures import shapes_image
from helpers.cli_helpers import fails_at_once
from mit_lightning import load_model
from mit_lightning.adapters import EXPORT_CARD, EXPORT_CONFIG, EXPORT_WEIGHTS, read_adapter
from mit_lightning.cli import cli_main
from mit_lightning.errors import UserError
from mit_lightning.resume import best_checkpoint


@pytest.fixture(scope="module")
def exported(demo_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export") / "demo-adapter"
    cli_main(["export", "--ckpt_path", str(demo_run.checkpoint), str(folder)])
    return folder


def test_the_export_holds_the_trainable_weights_and_what_rebuilds_the_rest(demo_run, exported):
    assert sorted(path.name for path in exported.iterdir()) == sorted([EXPORT_CONFIG, EXPORT_WEIGHTS, EXPORT_CARD])
    checkpoint = torch.load(demo_run.checkpoint, weights_only=True)
    weights = load_file(exported / EXPORT_WEIGHTS)
    assert set(weights) == set(checkpoint["state_dict"])
    for name, value in weights.items():
        torch.testing.assert_close(value, checkpoint["state_dict"][name], rtol=0, atol=0)
    config = json.loads((exported / EXPORT_CONFIG).read_text())
    assert config["format"] == "mit-lightning-adapter" and config["task"] == "segmentation"
    assert config["backbones"]["llm"] == {"path": "tiny", "fingerprint": {"preset": "tiny", "seed": 0}}
    assert config["backbones"]["vision"]["fingerprint"] == {"name": "tiny", "random_seed": 0}
    assert config["model"]["fusion"]["class_path"] == "mit_lightning.fusion.MiT"
    assert "optimizer" not in config["model"] and "lr_scheduler" not in config["model"]
    assert config["data_spec"]["prompt"]["template"] == "Segment the {description} according to the text. #Segmentation:"
    assert config["parameters"] == sum(value.numel() for value in weights.values())
    # the weights file is the trainable parameters and a small header: nothing frozen travels
    assert (exported / EXPORT_WEIGHTS).stat().st_size < 4 * config["parameters"] + 16_384


def test_an_export_can_be_shared_readable_files_no_local_path_and_a_model_card(demo_run, tmp_path, monkeypatch):
    run = tmp_path / "work" / "runs" / "demo" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    checkpoint = run / "checkpoints" / "best-epoch=0.ckpt"
    shutil.copy(demo_run.checkpoint, checkpoint)
    (run / "test_metrics.json").write_text(json.dumps({"test/test/oIoU": 0.6461, "test/mIoU": 0.7243}))
    monkeypatch.chdir(tmp_path / "work")
    old_umask = os.umask(0o022)
    try:
        cli_main(["export", "--ckpt_path", str(checkpoint), str(tmp_path / "shared")])
    finally:
        os.umask(old_umask)
    folder = tmp_path / "shared"
    assert {path.name: stat.S_IMODE(path.stat().st_mode) for path in folder.iterdir()} == {
        EXPORT_WEIGHTS: 0o644, EXPORT_CONFIG: 0o644, EXPORT_CARD: 0o644}
    config_text = (folder / EXPORT_CONFIG).read_text()
    config = json.loads(config_text)
    assert config["exported_from"] == "runs/demo/version_0/checkpoints/best-epoch=0.ckpt"
    assert str(tmp_path) not in config_text  # the data root and every other local path stay home
    assert config["data"]["class_path"] == "mit_lightning.data.SyntheticRefCOCODataModule"
    card = (folder / EXPORT_CARD).read_text()
    assert card.startswith("# shared\n") and "**segmentation** adapter" in card and "71,751 parameters" in card
    assert "- LLM: `tiny` (fingerprint" in card and "`SyntheticRefCOCODataModule` (train_images 16" in card
    assert "| test/oIoU | 0.6461 |" in card and "| test/mIoU | 0.7243 |" in card
    assert 'load_model("shared")' in card and str(tmp_path) not in card
    assert read_adapter(folder).data == config["data"]  # read back, and carried on by a re-export


def test_an_export_predicts_exactly_as_its_checkpoint(demo_run, exported):
    image, _ = shapes_image()
    from_checkpoint = load_model(demo_run.checkpoint, device="cpu").predict(image=image, text="the red circle")
    from_export = load_model(exported, device="cpu").predict(image=image, text="the red circle")
    assert np.array_equal(from_export["mask"], from_checkpoint["mask"])
    assert load_model(exported, device="cpu").name == "demo-adapter"


def test_an_export_in_bfloat16_is_half_the_size_and_loads_into_the_models_precision(demo_run, exported, tmp_path):
    cli_main(["export", "--ckpt_path", str(demo_run.checkpoint), str(tmp_path / "half"), "--dtype", "bfloat16"])
    half = load_file(tmp_path / "half" / EXPORT_WEIGHTS)
    assert {value.dtype for value in half.values()} == {torch.bfloat16}
    assert (tmp_path / "half" / EXPORT_WEIGHTS).stat().st_size < 0.55 * (exported / EXPORT_WEIGHTS).stat().st_size
    model = load_model(tmp_path / "half", device="cpu")
    parameter = next(model.module.head.parameters())
    assert parameter.dtype == torch.float32
    name = next(name for name, value in model.module.named_parameters() if value is parameter)
    torch.testing.assert_close(parameter, half[name].float(), rtol=0, atol=0)


def test_export_finds_the_best_checkpoint_of_a_config(demo_run, tmp_path, capsys):
    last = demo_run.checkpoint.parent / "last.ckpt"
    assert best_checkpoint(last) == demo_run.checkpoint  # last.ckpt records the best its epoch saved
    configs = [arg for config in demo_run.configs for arg in ("--config", config)]
    cli_main(["export", *configs, "--ckpt_path", "best", str(tmp_path / "best")])
    printed = capsys.readouterr().out
    assert f"Exported '{demo_run.checkpoint}' (segmentation, 71,751 trainable parameters" in printed
    assert (tmp_path / "best" / EXPORT_WEIGHTS).is_file()


def test_a_folder_that_holds_files_is_never_overwritten_unless_asked(demo_run, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "taken"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    error = fails_at_once(monkeypatch, capsys, "export", "--ckpt_path", str(demo_run.checkpoint), str(folder))
    assert "is not empty" in error and "--overwrite" in error
    assert [path.name for path in folder.iterdir()] == ["notes.txt"]
    cli_main(["export", "--ckpt_path", str(demo_run.checkpoint), str(folder), "--overwrite"])
    assert sorted(path.name for path in folder.iterdir()) == sorted([EXPORT_CONFIG, EXPORT_WEIGHTS, EXPORT_CARD,
                                                                     "notes.txt"])
    assert (folder / "notes.txt").read_text() == "mine"


def test_exporting_a_broken_checkpoint_is_one_clear_message(tmp_path, monkeypatch, capsys):
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"PK\x03\x04 not a whole file")
    error = fails_at_once(monkeypatch, capsys, "export", "--ckpt_path", str(broken), str(tmp_path / "out"))
    assert "Cannot load the checkpoint" in error and "truncated or corrupted" in error
    assert not (tmp_path / "out").exists()


def test_an_export_naming_foreign_code_or_with_broken_weights_is_refused(exported, tmp_path):
    import shutil

    tampered = tmp_path / "tampered"
    shutil.copytree(exported, tampered)
    config = json.loads((tampered / EXPORT_CONFIG).read_text())
    config["model"]["head"]["class_path"] = "subprocess.Popen"
    (tampered / EXPORT_CONFIG).write_text(json.dumps(config))
    with pytest.raises(UserError, match="model.head.class_path names .subprocess.Popen.*Nothing it names was imported"):
        read_adapter(tampered)
    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    (broken / EXPORT_WEIGHTS).write_bytes((broken / EXPORT_WEIGHTS).read_bytes()[:100])
    with pytest.raises(UserError, match="Cannot load the adapter weights .*adapter.safetensors"):
        read_adapter(broken)
    config["version"] = 99
    (broken / EXPORT_CONFIG).write_text(json.dumps(config))
    with pytest.raises(UserError, match="version 99 of the export format"):
        read_adapter(broken)


def test_a_weights_file_changed_after_export_is_refused_not_loaded_with_other_weights(exported, tmp_path):
    config = json.loads((exported / EXPORT_CONFIG).read_text())
    assert config["weights_sha256"] == hashlib.sha256((exported / EXPORT_WEIGHTS).read_bytes()).hexdigest()
    assert read_adapter(exported).weights  # as exported: loads
    data = bytearray((exported / EXPORT_WEIGHTS).read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    for offset in (header, header + (len(data) - header) // 2, len(data) - 1):  # a byte inside the tensors
        changed = tmp_path / f"changed-{offset}"
        shutil.copytree(exported, changed)
        flipped = bytearray(data)
        flipped[offset] ^= 0x01
        (changed / EXPORT_WEIGHTS).write_bytes(bytes(flipped))
        assert load_file(changed / EXPORT_WEIGHTS)  # still a readable safetensors file, with other weights
        with pytest.raises(UserError, match="is not the weights file exported with 'adapter_config.json'.*damaged or "
                                            "changed after export"):
            read_adapter(changed)
    # the weights of another export under this config: refused just the same
    other = tmp_path / "other"
    shutil.copytree(exported, other)
    weights = load_file(exported / EXPORT_WEIGHTS)
    save_file({name: value + 1 for name, value in weights.items()}, other / EXPORT_WEIGHTS)
    with pytest.raises(UserError, match="SHA-256 differs"):
        read_adapter(other)


@pytest.mark.parametrize("recorded, loads", [(None, True), ("not a digest", False), (7, False)])
def test_an_export_without_a_valid_checksum_loads_only_if_it_records_none(exported, tmp_path, recorded, loads):
    folder = tmp_path / "export"
    shutil.copytree(exported, folder)
    config = json.loads((folder / EXPORT_CONFIG).read_text())
    config["weights_sha256"] = recorded
    if recorded is None:  # written before exports carried checksums
        del config["weights_sha256"]
    (folder / EXPORT_CONFIG).write_text(json.dumps(config))
    if loads:
        assert read_adapter(folder).weights
    else:
        with pytest.raises(UserError, match="records no valid SHA-256"):
            read_adapter(folder)


def test_mit_export_help_lists_its_options(capsys):
    with pytest.raises(SystemExit):
        cli_main(["export", "--help"])
    assert "--overwrite" in capsys.readouterr().out
