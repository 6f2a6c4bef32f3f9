"""Pre-emption: a run killed mid-epoch (SIGTERM or SIGKILL) and resumed with `--ckpt_path last` ends exactly
where an uninterrupted run ends; the latest checkpoint is always complete; the training order is resumable."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers.cli_helpers import fails_at_once
from mit_lightning.data.sampling import EpochShuffle
from mit_lightning.errors import UserError
from mit_lightning.resume import (
    LatestCheckpoint,
    capture_rng_state,
    check_resumed_data,
    follow_moved_run,
    latest_checkpoint,
    lock_run_folder,
    restore_rng_state,
)

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")
CALLBACKS = """\
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {monitor: val/oIoU, mode: max, filename: "best-{epoch}"}
    - class_path: mit_lightning.resume.LatestCheckpoint
      init_args: {every_n_train_steps: 2}
"""


# --- the training order ---------------------------------------------------------------------------
def test_the_order_depends_only_on_seed_and_epoch_and_resumes_mid_epoch():
    sampler = EpochShuffle(50, seed=7, with_draws=True)
    sampler.set_epoch(3)
    epoch3 = list(sampler)
    assert sorted(index for index, _ in epoch3) == list(range(50))
    assert list(sampler) == epoch3  # the same epoch twice: the same order and draws
    sampler.set_epoch(4)
    assert list(sampler) != epoch3
    sampler.set_epoch(3)
    sampler.resume_at(20)
    assert len(sampler) == 50  # Lightning counts a resumed epoch's batches from its start
    assert list(sampler) == epoch3[20:]
    assert list(sampler) == epoch3  # the skip applies to one pass only


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    path = tmp_path / "rng.pt"
    torch.save(capture_rng_state(), path)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_state(torch.load(path, weights_only=True))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_a_failed_write_leaves_the_previous_latest_checkpoint_intact(tmp_path):
    class Trainer:
        is_global_zero, current_epoch, global_step, checkpoint_callbacks, loggers = True, 0, 5, [], []
        default_root_dir = str(tmp_path)

        def save_checkpoint(self, path, weights_only=None):
            Path(path).write_bytes(b"half a checkpo")
            raise OSError(errno.ENOSPC, "No space left on device")

    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"the previous checkpoint")
    with pytest.raises(UserError, match="No space left on device.*previous one .*last.ckpt. is intact"):
        LatestCheckpoint().save(Trainer())
    assert last.read_bytes() == b"the previous checkpoint"
    assert sorted(path.name for path in last.parent.iterdir()) == ["last.ckpt"]  # no partial file left behind


def test_a_run_folder_is_trained_by_one_process_at_a_time(tmp_path):
    held = lock_run_folder(tmp_path / "checkpoints")
    with pytest.raises(UserError, match=f"in use by another training process \\(PID {os.getpid()}\\)"):
        lock_run_folder(tmp_path / "checkpoints")
    held.close()
    lock_run_folder(tmp_path / "checkpoints").close()  # free again once the holder ends


# --- killed and resumed ---------------------------------------------------------------------------
def run(tmp_path: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    """`mit fit` of a tiny demo in a fresh process (as a cluster job runs it)."""
    overlay = tmp_path / "callbacks.yaml"
    overlay.write_text(CALLBACKS)
    folder = str(tmp_path / name)
    command = [
        sys.executable, "-m", "mit_lightning", "fit", "--config", DEMO, "--config", str(overlay),
        "--trainer.default_root_dir", folder, "--trainer.logger.init_args.save_dir", folder,
        "--trainer.max_epochs", "3", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--test_after_fit", "true",
        "--model.lr_scheduler.init_args.step_size", "1",  # a schedule that moves every epoch
        "--data.root", str(tmp_path / "data"), "--data.train_images", "16", "--data.val_images", "4",
        "--data.test_images", "4", "--data.batch_size", "16", "--data.num_workers", "0", *extra,
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env,
                          start_new_session=True)  # its own process group, like a cluster job


def final_state(tmp_path: Path, name: str) -> dict:
    runs = sorted((tmp_path / name / "tensorboard").iterdir())
    assert [run.name for run in runs] == ["version_0"], "a resumed run continues in its own folder"
    checkpoint = torch.load(runs[0] / "checkpoints" / "last.ckpt", weights_only=True)
    metrics = (runs[0] / "test_metrics.json").read_text()
    return {"checkpoint": checkpoint, "metrics": metrics, "folder": runs[0]}


def assert_same_training_state(resumed: dict, reference: dict) -> None:
    got, expected = resumed["checkpoint"], reference["checkpoint"]
    assert (got["epoch"], got["global_step"]) == (expected["epoch"], expected["global_step"])
    assert got["state_dict"].keys() == expected["state_dict"].keys()
    for key, tensor in expected["state_dict"].items():
        assert torch.equal(got["state_dict"][key], tensor), key
    for got_optimizer, expected_optimizer in zip(got["optimizer_states"], expected["optimizer_states"]):
        for index, state in expected_optimizer["state"].items():
            for name, value in state.items():
                assert torch.equal(torch.as_tensor(got_optimizer["state"][index][name]), torch.as_tensor(value))
    assert got["lr_schedulers"] == expected["lr_schedulers"]
    assert resumed["metrics"] == reference["metrics"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("resume")
    result = run(tmp_path, "uninterrupted")
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path, final_state(tmp_path, "uninterrupted")


@pytest.mark.slow
@pytest.mark.parametrize("signal_name, step, exit_code", [("TERM", 6, 143), ("KILL", 7, -9)])
def test_a_run_killed_mid_epoch_resumes_exactly(uninterrupted, signal_name, step, exit_code):
    tmp_path, reference = uninterrupted
    name = f"killed_{signal_name}"
    killed = run(tmp_path, name, "--trainer.callbacks+=helpers.signal_helpers.SignalAtStep", "--trainer.callbacks.step",
                 str(step), "--trainer.callbacks.signal_name", signal_name)
    assert killed.returncode == exit_code, killed.stderr[-3000:]
    if signal_name == "TERM":  # saved on the way out, and says how to go on
        assert f"epoch 1, step {step}" in killed.stderr and "--ckpt_path last" in killed.stderr
    resumed = run(tmp_path, name, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not resumable" not in resumed.stderr
    state = final_state(tmp_path, name)
    assert_same_training_state(state, reference)
    assert (state["folder"] / "config.yaml").is_file() and (state["folder"] / "config.resume-1.yaml").is_file()
    assert len(list(state["folder"].glob("events.out.tfevents.*"))) >= 2  # the same TensorBoard run, continued


#: where the sweep stops one run, again and again: (signal, moment, step, times sent, exit status, step saved)
STOPS = [
    ("INT", "validation", 4, 1, 130, 4),  # Ctrl-C during the epoch-end validation: the epoch just trained counts
    ("TERM", "save", 6, 2, 143, 6),  # twice, while a step checkpoint is being written
    ("TERM", "train", 9, 1, 143, 9),  # mid-epoch
]


@pytest.mark.slow
def test_a_run_stopped_again_and_again_exits_at_once_each_time_and_ends_as_the_uninterrupted_one(uninterrupted):
    """Each stop reaches the whole process group, DataLoader workers included, which must not keep it alive."""
    tmp_path, reference = uninterrupted
    workers = ["--data.num_workers", "2"]
    resume: list[str] = []
    for signal_name, during, step, times, exit_code, saved in STOPS:
        start = time.monotonic()
        stopped = run(tmp_path, "sweep", *workers, *resume, "--trainer.callbacks+=helpers.signal_helpers.SignalAtStep",
                      "--trainer.callbacks.step", str(step), "--trainer.callbacks.signal_name", signal_name,
                      "--trainer.callbacks.during", during, "--trainer.callbacks.times", str(times),
                      "--trainer.callbacks.whole_group", "true")
        assert stopped.returncode == exit_code, stopped.stderr[-3000:]
        assert f"Stopped by SIG{signal_name}" in stopped.stderr and f"step {saved})" in stopped.stderr
        assert "Traceback" not in stopped.stderr
        assert time.monotonic() - start < 150  # it exits (the training workers once kept it alive for ever)
        resume = ["--ckpt_path", "last"]
    resumed = run(tmp_path, "sweep", *workers, *resume)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_training_state(final_state(tmp_path, "sweep"), reference)


#: validation twice an epoch (7 steps of 8 samples: after steps 3 and 6 of each), each followed by a best checkpoint
MID_EPOCH_VALIDATION = ["--trainer.val_check_interval", "0.5", "--data.batch_size", "8"]
#: stops of one such run, as STOPS: in a mid-epoch validation, twice inside the best checkpoint written after one,
#: Ctrl-C in the epoch's second validation, then mid-epoch training
MID_EPOCH_STOPS = [
    ("TERM", "validation", 3, 1, 143, 3),
    ("TERM", "save", 10, 2, 143, 10),
    ("INT", "validation", 13, 1, 130, 13),
    ("TERM", "train", 17, 1, 143, 17),
]


@pytest.mark.slow
def test_a_run_validating_mid_epoch_stopped_anywhere_ends_as_the_uninterrupted_one(tmp_path):
    reference = run(tmp_path, "reference", *MID_EPOCH_VALIDATION)
    assert reference.returncode == 0, reference.stderr[-3000:]
    resume: list[str] = []
    for signal_name, during, step, times, exit_code, saved in MID_EPOCH_STOPS:
        stopped = run(tmp_path, "stopped", *MID_EPOCH_VALIDATION, *resume,
                      "--trainer.callbacks+=helpers.signal_helpers.SignalAtStep", "--trainer.callbacks.step", str(step),
                      "--trainer.callbacks.signal_name", signal_name, "--trainer.callbacks.during", during,
                      "--trainer.callbacks.times", str(times))
        assert stopped.returncode == exit_code, stopped.stderr[-3000:]
        assert f"Stopped by SIG{signal_name}" in stopped.stderr and f"step {saved})" in stopped.stderr
        resume = ["--ckpt_path", "last"]
    resumed = run(tmp_path, "stopped", *MID_EPOCH_VALIDATION, *resume)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_training_state(final_state(tmp_path, "stopped"), final_state(tmp_path, "reference"))


@pytest.mark.slow
def test_a_job_whose_whole_process_group_is_terminated_stops_cleanly_and_resumes_exactly(uninterrupted):
    """Schedulers signal every process of a job: the dataloader workers leave SIGTERM to the main process."""
    tmp_path, reference = uninterrupted
    workers = ["--data.num_workers", "2"]  # the reference ran without workers: the order must not depend on them
    killed = run(tmp_path, "group", *workers, "--trainer.callbacks+=helpers.signal_helpers.SignalAtStep",
                 "--trainer.callbacks.step", "6", "--trainer.callbacks.whole_group", "true")
    assert killed.returncode == 143, killed.stderr[-3000:]
    assert "Traceback" not in killed.stderr and "Logging error" not in killed.stderr
    resumed = run(tmp_path, "group", *workers, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_training_state(final_state(tmp_path, "group"), reference)


# --- checkpoint shortcuts and start-up checks -------------------------------------------------------
def test_evaluating_best_or_last_before_any_run_is_one_clear_message(monkeypatch, capsys, tmp_path):
    for shortcut in ("best", "last"):
        error = fails_at_once(monkeypatch, capsys, "test", "--config", DEMO, "--trainer.default_root_dir",
                              str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path), "--ckpt_path",
                              shortcut, "--data.root", str(tmp_path / "data"))
        assert "has no run with a checkpoint yet" in error


def test_a_missing_or_broken_checkpoint_to_resume_fails_before_the_model_is_built(monkeypatch, capsys, tmp_path):
    error = fails_at_once(monkeypatch, capsys, "fit", "--config", DEMO, "--ckpt_path", str(tmp_path / "missing.ckpt"),
                          "--model.llm.path", str(tmp_path / "no-llm-here"))
    assert "Checkpoint not found" in error
    empty = tmp_path / "empty.ckpt"
    empty.touch()
    error = fails_at_once(monkeypatch, capsys, "fit", "--config", DEMO, "--ckpt_path", str(empty),
                          "--trainer.default_root_dir", str(tmp_path), "--data.root", str(tmp_path / "data"))
    assert "empty (0 bytes)" in error


def stopped_checkpoint(path: Path, batch_size: int, mid_epoch: bool) -> Path:
    """A checkpoint as `mit fit` writes it, as far as resuming its data reads it."""
    data = {"class_path": "mit_lightning.data.synthetic.SyntheticRefCOCODataModule",
            "init_args": {"root": "elsewhere", "train_images": 16, "batch_size": batch_size, "num_workers": 2}}
    progress = {"current": {"processed": 2 if mid_epoch else 4}, "is_last_batch": not mid_epoch}
    loops = {"fit_loop": {"epoch_loop.batch_progress": progress}, "validate_loop": {}, "test_loop": {}, "predict_loop": {}}
    torch.save({"pytorch-lightning_version": "2.6.6", "state_dict": {}, "mit_config": {"data": data}, "loops": loops}, path)
    return path


def test_resuming_mid_epoch_with_another_batch_size_or_data_is_refused_saying_why(monkeypatch, capsys, tmp_path):
    mid_epoch = stopped_checkpoint(tmp_path / "mid.ckpt", batch_size=16, mid_epoch=True)
    common = ["fit", "--config", DEMO, "--ckpt_path", str(mid_epoch), "--trainer.default_root_dir", str(tmp_path),
              "--data.root", str(tmp_path / "data"), "--data.num_workers", "0", "--data.train_images", "16"]
    error = fails_at_once(monkeypatch, capsys, *common, "--data.batch_size", "8")
    assert "data.batch_size 16 → 8" in error and "twice" in error and "--model.init_weights" in error
    error = fails_at_once(monkeypatch, capsys, *common[:-1], "12", "--data.batch_size", "16")
    assert "data.train_images 16 → 12" in error and "batch_size" not in error
    # where data is read from (moved to local disk) and how fast is free to change
    checkpoint = torch.load(mid_epoch, weights_only=True)
    check_resumed_data(checkpoint, {**checkpoint["mit_config"]["data"], "init_args": {
        **checkpoint["mit_config"]["data"]["init_args"], "root": "/scratch/data", "num_workers": 8}}, mid_epoch)


def test_resuming_at_an_epoch_end_with_another_batch_size_warns(tmp_path):
    path = stopped_checkpoint(tmp_path / "end.ckpt", batch_size=16, mid_epoch=False)
    checkpoint = torch.load(path, weights_only=True)
    data = checkpoint["mit_config"]["data"]
    with pytest.warns(UserWarning, match="data.batch_size 16 → 8.*epoch end"):
        check_resumed_data(checkpoint, {**data, "init_args": {**data["init_args"], "batch_size": 8}}, path)


def test_an_unwritable_run_folder_is_one_clear_message(monkeypatch, capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    error = fails_at_once(monkeypatch, capsys, "fit", "--config", DEMO, "--trainer.default_root_dir",
                          str(blocker / "runs"), "--data.root", str(tmp_path / "data"))
    assert "Cannot write the run folder" in error


def test_a_moved_run_folder_is_written_where_it_is_now(tmp_path):
    def stored(save_dir: str) -> dict:
        logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                  "init_args": {"save_dir": save_dir, "name": "tensorboard"}}
        return {"trainer": {"default_root_dir": save_dir, "logger": logger}}

    checkpoint = tmp_path / "moved" / "runs" / "tensorboard" / "version_0" / "checkpoints" / "best.ckpt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.touch()
    config = stored("/old/place/runs")
    follow_moved_run(config, checkpoint)
    here = str(tmp_path / "moved" / "runs")
    assert config == stored(here)
    follow_moved_run(config, checkpoint)
    assert config == stored(here)  # where it was trained: unchanged
    unknown_layout = tmp_path / "elsewhere" / "best.ckpt"
    config = stored("/old/place/runs")
    follow_moved_run(config, unknown_layout)
    assert config == stored("/old/place/runs")


def test_a_newer_resumable_step_checkpoint_counts_as_last(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    trainer_config = {"default_root_dir": str(tmp_path), "logger": False}
    resumable = {"loops": {}, "optimizer_states": [{"state": {}}], "state_dict": {}}
    torch.save(resumable, folder / "last.ckpt")
    torch.save({"state_dict": {}}, folder / "weights-only.ckpt")  # newer, but cannot be resumed
    (folder / "last.ckpt.partial").write_bytes(b"half")
    assert latest_checkpoint(trainer_config) == folder / "last.ckpt"
    time.sleep(0.01)
    torch.save(resumable, folder / "epoch=1-step=57.ckpt")
    assert latest_checkpoint(trainer_config) == folder / "epoch=1-step=57.ckpt"


def test_resuming_mid_epoch_on_a_dataset_of_another_size_is_refused():
    from mit_lightning.data.sampling import ResumableLoader

    def loader(length: int, position: int) -> ResumableLoader:
        sampler = EpochShuffle(length, seed=0)
        sampler.resume_at(position)
        return ResumableLoader(list(range(length)), sampler=sampler, batch_size=4)

    saved = {"seed": 0, "length": 49}
    loader(49, 8).load_state_dict(saved)  # the same data: goes on
    with pytest.raises(UserError, match="49.*51.*twice"):
        loader(51, 8).load_state_dict(saved)
    with pytest.warns(UserWarning, match="epoch end"):
        loader(51, 0).load_state_dict(saved)
