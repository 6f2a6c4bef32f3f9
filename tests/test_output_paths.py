"""Where results are written and read back — export folders, prediction folders, earlier runs' test metrics —
a path that cannot be used ends in one line naming it, never a traceback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from helpers.cli_helpers import fails_at_once
from mit_lightning.adapters import read_adapter, write_export
from mit_lightning.errors import UserError, make_folder
from mit_lightning.experiments import RESULTS_FILE, find_results


def _dangling_link(path: Path) -> None:
    path.symlink_to(path.parent / "gone")


def _a_file(path: Path) -> None:
    path.write_text("notes\n")


def _link_to_a_file(path: Path) -> None:
    (path.parent / "notes.txt").write_text("notes\n")
    path.symlink_to(path.parent / "notes.txt")


def _below_a_file(path: Path) -> Path:
    (path.parent / "notes.txt").write_text("notes\n")
    return path.parent / "notes.txt" / "out"


def _link_loop(path: Path) -> None:
    path.symlink_to(path)


#: what is in the way of a folder to write, and what the message says
BLOCKED = {
    "dangling-symlink": (_dangling_link, "symbolic link to"),
    "a-file": (_a_file, "is a file, not a folder"),
    "symlink-to-a-file": (_link_to_a_file, "is a file, not a folder"),
    "below-a-file": (_below_a_file, "Cannot create"),
    "symlink-loop": (_link_loop, "symbolic link to"),
}


def blocked(tmp_path: Path, make) -> Path:
    path = tmp_path / "out"
    return make(path) or path


@pytest.mark.parametrize("make, message", BLOCKED.values(), ids=BLOCKED.keys())
def test_a_folder_that_cannot_be_created_is_one_line(tmp_path, make, message):
    path = blocked(tmp_path, make)
    with pytest.raises(UserError, match=message) as error:
        make_folder(path, "The folder", "Choose another.")
    assert str(path) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("make, message", BLOCKED.values(), ids=BLOCKED.keys())
def test_mit_export_to_a_path_that_is_no_folder_is_one_line(tmp_path, task_checkpoints, monkeypatch, capsys, make,
                                                           message):
    path = blocked(tmp_path, make)
    error = fails_at_once(monkeypatch, capsys, "export", "--ckpt_path", str(task_checkpoints["sentiment"]), str(path))
    assert message in error and str(path) in error


def test_an_export_whose_weights_file_is_a_folder_is_one_line_with_overwrite(tmp_path, task_checkpoints):
    adapter = read_adapter(task_checkpoints["sentiment"])
    (tmp_path / "out" / "adapter.safetensors").mkdir(parents=True)
    with pytest.raises(UserError, match="Cannot write the export into"):
        write_export(adapter, tmp_path / "out", overwrite=True)


@pytest.mark.skipif(os.geteuid() == 0, reason="permissions do not bind root")
def test_an_export_into_a_read_only_folder_is_one_line(tmp_path, task_checkpoints):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(UserError, match="Cannot"):
            write_export(read_adapter(task_checkpoints["sentiment"]), folder / "out")
    finally:
        folder.chmod(0o700)


@pytest.mark.parametrize("make, message", [BLOCKED["a-file"], BLOCKED["dangling-symlink"]],
                         ids=["a-file", "dangling-symlink"])
@pytest.mark.parametrize("writer", ["default", "configured"])
def test_mit_predict_into_a_predictions_folder_that_is_no_folder_is_one_line(demo_run, tmp_path, monkeypatch, capsys,
                                                                            make, message, writer):
    if writer == "default":  # <run folder>/predictions; without a logger the run folder is default_root_dir
        path = tmp_path / "predictions"
        make(path)
        extra = ["--trainer.logger", "false"]
    else:
        path = blocked(tmp_path, make)
        extra = ["--trainer.callbacks+=mit_lightning.callbacks.PredictionWriter",
                 "--trainer.callbacks.output_dir", str(path)]
    error = fails_at_once(monkeypatch, capsys, "predict", "--ckpt_path", str(demo_run.checkpoint),
                          "--trainer.default_root_dir", str(tmp_path), "--data.root", str(demo_run.data_root),
                          "--data.num_workers", "0", "--trainer.enable_progress_bar", "false", *extra)
    assert message in error and str(path) in error


# --- earlier runs' results ---------------------------------------------------------------------------
def _directory_named_like_results(folder: Path) -> None:
    (folder / RESULTS_FILE).mkdir()


DAMAGED_RESULTS = {
    "not-json": b"test/oIoU: 0.5\n",
    "cut-short": b'{"test/test/oIoU": 0.5',
    "empty": b"",
    "a-list": b"[0.5, 0.6]",
    "a-number": b"0.5",
    "text-values": b'{"test/test/oIoU": "0.5"}',
    "boolean-value": b'{"test/test/oIoU": true}',
    "null-value": b'{"test/test/oIoU": null}',
    "nested": b'{"test": {"oIoU": 0.5}}',
    "not-utf8": '{"test/test/oIoU": 0.5, "caf\u00e9": 1}'.encode("latin-1"),
}


@pytest.mark.parametrize("content", DAMAGED_RESULTS.values(), ids=DAMAGED_RESULTS.keys())
def test_a_damaged_test_metrics_file_is_one_line_naming_it(tmp_path, content):
    path = tmp_path / "tensorboard" / "version_0" / RESULTS_FILE
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(UserError, match="Delete it to run that experiment again") as error:
        find_results(tmp_path)
    assert str(path) in str(error.value)


def test_a_folder_named_like_the_results_is_not_read_as_results(tmp_path):
    _directory_named_like_results(tmp_path)
    assert find_results(tmp_path) is None


def test_metrics_written_by_a_run_are_read_back_whole(tmp_path):
    results = {"test/oIoU": 0.5, "test/count": 3, "test/diverged": float("nan")}
    (tmp_path / RESULTS_FILE).write_text(json.dumps(results))
    found = find_results(tmp_path)
    assert found["test/oIoU"] == 0.5 and found["test/count"] == 3 and found["test/diverged"] != found["test/diverged"]


def test_mit_reproduce_over_a_damaged_test_metrics_file_is_one_line(tmp_path, monkeypatch, capsys, no_training):
    from mit_lightning import reproduce

    monkeypatch.setattr(reproduce, "preflight", lambda table, extra: [])
    table = reproduce.paper_tables()["table2"]
    path = reproduce.run_directory(table.experiments[0], tmp_path / "runs") / "tensorboard" / "version_0" / RESULTS_FILE
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    error = fails_at_once(monkeypatch, capsys, "reproduce", "table2", "--runs", str(tmp_path / "runs"))
    assert str(path) in error and "not the JSON a run writes" in error


@pytest.mark.parametrize("prediction, probabilities", [(float("nan"), None), (float("inf"), None),
                                                       (1, [0.5, float("nan")])], ids=["nan", "inf", "probability"])
def test_a_prediction_that_is_not_finite_is_written_as_null_with_an_error_and_counted(tmp_path, prediction,
                                                                                       probabilities):
    import torch

    from mit_lightning.callbacks import PredictionWriter

    writer = PredictionWriter(str(tmp_path))
    batch = {"index": torch.tensor([0, 1]), "prediction": torch.tensor([prediction, 0.5][:2])}
    if probabilities is not None:
        batch = {"index": torch.tensor([0]), "prediction": torch.tensor([prediction]),
                 "probabilities": torch.tensor([probabilities])}
    rows = [writer._finite(writer._row(batch, position, "test")) for position in range(len(batch["index"]))]
    text = "\n".join(json.dumps(row, allow_nan=False) for row in rows)  # valid JSON throughout
    assert rows[0]["prediction"] is None and rows[0]["error"] and writer.not_finite == ["test #0"]
    assert "NaN" not in text and "Infinity" not in text


def test_a_results_file_nested_beyond_reading_is_one_line(tmp_path):
    (tmp_path / RESULTS_FILE).write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(UserError, match="nests too deeply"):
        find_results(tmp_path)


def test_mit_export_beside_a_damaged_test_metrics_file_is_one_line(tmp_path, demo_run, monkeypatch, capsys):
    """The export's model card reads the run's test metrics: a damaged file there is named, not a traceback."""
    import shutil

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    checkpoint = Path(shutil.copy(demo_run.checkpoint, run / "checkpoints" / "best.ckpt"))
    (run / RESULTS_FILE).write_text("{oops")
    error = fails_at_once(monkeypatch, capsys, "export", "--ckpt_path", str(checkpoint), str(tmp_path / "out"))
    assert str(run / RESULTS_FILE) in error
