"""Files from elsewhere — data pickles, checkpoints, exports — are read as data and end, when they are
wrong, in one line naming the file: never a MemoryError, an exhausted machine, a traceback, or a model
whose weights are garbage answering as if nothing were wrong."""

from __future__ import annotations

import pickle
import random
import struct
import tracemalloc
from pathlib import Path

import pytest
import torch

from helpers.cli_helpers import DEMO, fails_at_once
from mit_lightning.adapters import read_adapter, write_export
from mit_lightning.backbones.vision import DEFAULT_WEIGHTS, VisionConfig
from mit_lightning.checkpoints import check_lightning_entries, load_weights_file
from mit_lightning.cli import with_checkpoint_config
from mit_lightning.errors import UserError
from mit_lightning.inference import load_model
from mit_lightning.resume import best_checkpoint
from mit_lightning.safe_pickle import load_data_pickle

TB = 2**40


def _declared(opcode: bytes, fmt: str, value: int, protocol: int = 4) -> bytes:
    return b"\x80" + bytes([protocol]) + opcode + struct.pack(fmt, value) + b"abc."


#: (file content, what the message says): each a few bytes that declare far more than they hold
HOSTILE_PICKLES = {
    "binbytes8-1TB": (_declared(b"\x8e", "<Q", TB), "declares a value of 1,099,511,627,776 bytes"),
    "binunicode8-1TB": (_declared(b"\x8d", "<Q", TB), "declares a value of 1,099,511,627,776 bytes"),
    "bytearray8-1TB": (_declared(b"\x96", "<Q", TB, protocol=5), "declares a value of 1,099,511,627,776 bytes"),
    "binbytes-4GB": (_declared(b"B", "<I", 2**32 - 1, protocol=3), "declares a value of 4,294,967,295 bytes"),
    "binunicode-4GB": (_declared(b"X", "<I", 2**32 - 1), "declares a value of 4,294,967,295 bytes"),
    "long4-2GB": (_declared(b"\x8b", "<i", 2**31 - 1, protocol=2), "declares a value of 2,147,483,647 bytes"),
    "binstring-negative": (b"T" + struct.pack("<i", -5) + b"abc.", "declares a value of -5 bytes"),
    "frame-1TB": (b"\x80\x04\x95" + struct.pack("<Q", TB) + b"N.", "declares a frame of 1,099,511,627,776 bytes"),
    "long-binput-2G": (b"\x80\x02]r" + struct.pack("<I", 2**31) + b".", "memo index 2,147,483,648"),
    "binput-after-one-op": (b"\x80\x02]q\xff.", "memo index 255"),
    "text-put-2G": (b"(lp2147483648\n.", "memo index 2,147,483,648"),
    "text-put-not-a-number": (b"(lpx\n.", "not a number"),
    "truncated": (pickle.dumps(list(range(100)), protocol=2)[:50], "truncated"),
    "empty": (b"", "truncated"),
    "text-file": (b"hello world\n", "not a pickle"),
    "unsupported-protocol": (b"\x80\x09N.", "unsupported pickle protocol"),
    "huge-decimal-int": (b"I" + b"9" * 100_000 + b"\n.", "not a valid pickle"),
    "out-of-band-buffer": (b"\x80\x05\x97.", "out-of-band"),
    "line-without-end": (b"S'abc", "ends inside the text argument"),
}


@pytest.mark.parametrize("content, message", HOSTILE_PICKLES.values(), ids=HOSTILE_PICKLES.keys())
@pytest.mark.parametrize("allow_numpy", [False, True], ids=["refs", "features"])
def test_a_pickle_declaring_more_than_it_holds_is_one_line_before_anything_is_allocated(tmp_path, content, message,
                                                                                         allow_numpy):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(content)
    tracemalloc.start()
    try:
        with pytest.raises(UserError, match=str(path).replace("(", r"\(").replace(")", r"\)")) as error:
            load_data_pickle(path, allow_numpy=allow_numpy)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert message in str(error.value) and "\n" not in str(error.value)
    assert peak < 4 * 2**20


def test_a_folder_given_as_a_pickle_is_one_line(tmp_path):
    with pytest.raises(UserError, match="Cannot read"):
        load_data_pickle(tmp_path)


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_every_protocol_of_plain_data_with_memo_and_frames_still_loads(tmp_path, protocol):
    shared = {"sent": "the dog", "raw": b"caf\xc3\xa9".decode()}
    data = [{"ref_id": index, "sentences": [shared, shared], "big": "x" * 70_000, "n": 2**70} for index in range(300)]
    path = tmp_path / "refs.p"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    assert load_data_pickle(path) == data


# === checkpoints and exports ========================================================================
#: every way a checkpoint is read before (or instead of) Lightning: each must load or refuse in one line
READERS = {
    "load": load_weights_file,
    "adapter": read_adapter,
    "command line": lambda path: with_checkpoint_config(["test", "--ckpt_path", str(path)]),
    "best": best_checkpoint,
}


def reads_or_refuses_in_one_line(path: Path) -> int:
    """Every reader either reads `path` or raises one `UserError` naming it; returns how many refused."""
    refused = 0
    for name, reader in READERS.items():
        try:
            reader(path)
        except UserError as error:
            assert str(path) in str(error), (name, str(error))
            assert name == "command line" or "\n" not in str(error), (name, str(error))
            refused += 1
    return refused


@pytest.fixture(scope="module")
def checkpoint(task_checkpoints) -> dict:
    return torch.load(task_checkpoints["classification"], weights_only=True)


@pytest.fixture(scope="module")
def checkpoint_bytes(task_checkpoints) -> bytes:
    return task_checkpoints["classification"].read_bytes()


@pytest.mark.parametrize("fraction", [0, 1e-5, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.9999])
def test_a_truncated_checkpoint_is_refused_by_every_reader(tmp_path, checkpoint_bytes, fraction):
    path = tmp_path / "model.ckpt"
    path.write_bytes(checkpoint_bytes[:int(len(checkpoint_bytes) * fraction)])
    assert reads_or_refuses_in_one_line(path) == len(READERS)


@pytest.mark.parametrize("seed", range(16))
def test_a_checkpoint_with_damaged_bytes_is_refused_by_its_checksums(tmp_path, checkpoint_bytes, seed):
    """torch itself reads a damaged zip record without a word: the weights would silently change."""
    rng = random.Random(seed)
    damaged = bytearray(checkpoint_bytes)
    for _ in range(rng.choice([1, 4, 32])):
        position = rng.randrange(len(damaged))
        damaged[position] = (damaged[position] + rng.randrange(1, 256)) % 256
    path = tmp_path / "model.ckpt"
    path.write_bytes(bytes(damaged))
    assert reads_or_refuses_in_one_line(path) == len(READERS)


@pytest.mark.parametrize("content", [b"hello\n", b"", b"PK\x03\x04" + b"\0" * 40, b"\x80\x02}q\x00.",
                                     "step,loss\n1,0.5\n".encode(), bytes(range(256))],
                         ids=["text", "empty", "zip-header-only", "plain-pickle", "csv", "binary"])
def test_a_file_that_is_no_checkpoint_is_refused_by_every_reader(tmp_path, content):
    path = tmp_path / "model.ckpt"
    path.write_bytes(content)
    assert reads_or_refuses_in_one_line(path) >= 3  # a plain pickle of {} is a readable (empty) file


ODD_VALUES = [None, 0, 1.5, "text", [], {}, [1, 2], {"a": 1}, torch.zeros(2), True]
ENTRIES = ["state_dict", "mit_config", "mit_backbones", "mit_data_spec", "callbacks"]


@pytest.mark.parametrize("value", ODD_VALUES, ids=[f"{type(value).__name__}{index}" for index, value in
                                                   enumerate(ODD_VALUES)])
@pytest.mark.parametrize("entry", ENTRIES)
def test_an_entry_of_another_type_is_read_or_refused_in_one_line(tmp_path, checkpoint, entry, value):
    path = tmp_path / "model.ckpt"
    torch.save({**checkpoint, entry: value}, path)
    reads_or_refuses_in_one_line(path)


@pytest.mark.parametrize("state", [None, 3, "text", [], {"best_model_path": 3}, {"best_model_path": ["a"]}])
def test_a_recorded_best_checkpoint_of_another_type_is_one_line(tmp_path, checkpoint, state):
    path = tmp_path / "last.ckpt"
    torch.save({**checkpoint, "callbacks": {"ModelCheckpoint{'monitor': 'val/acc'}": state}}, path)
    reads_or_refuses_in_one_line(path)


@pytest.mark.parametrize("top", [[1, 2], "text", 3, None, torch.zeros(3)], ids=["list", "str", "int", "none", "tensor"])
def test_a_torch_file_holding_no_mapping_is_refused_as_a_model(tmp_path, top):
    path = tmp_path / "model.ckpt"
    torch.save(top, path)
    reads_or_refuses_in_one_line(path)
    with pytest.raises(UserError, match="holds no trained MiT model"):
        read_adapter(path)


def _cast(dtype):
    return lambda tensor: tensor.to(dtype)


def _fill(value):
    return lambda tensor: torch.full_like(tensor, value)


def _one_nan(tensor):
    tensor = tensor.clone()
    tensor.view(-1)[0] = float("nan")
    return tensor


DAMAGED_WEIGHTS = {
    "int64": (_cast(torch.int64), "another kind"), "int8": (_cast(torch.int8), "another kind"),
    "uint8": (_cast(torch.uint8), "another kind"), "bool": (_cast(torch.bool), "another kind"),
    "complex": (_cast(torch.complex64), "another kind"), "all-nan": (_fill(float("nan")), "NaN or infinite"),
    "all-inf": (_fill(float("inf")), "NaN or infinite"), "minus-inf": (_fill(float("-inf")), "NaN or infinite"),
    "one-nan": (_one_nan, "NaN or infinite"),
}


@pytest.mark.parametrize("damage, message", DAMAGED_WEIGHTS.values(), ids=DAMAGED_WEIGHTS.keys())
@pytest.mark.parametrize("form", ["checkpoint", "export"])
def test_weights_cast_to_integers_or_not_finite_are_refused_before_predicting(tmp_path, checkpoint, task_checkpoints,
                                                                             damage, message, form):
    weights = {name: damage(tensor) for name, tensor in checkpoint["state_dict"].items()}
    path = tmp_path / "model.ckpt"
    torch.save({**checkpoint, "state_dict": weights}, path)
    if form == "export":
        adapter = read_adapter(task_checkpoints["classification"])
        adapter.weights = weights
        path = write_export(adapter, tmp_path / "export")
    with pytest.raises(UserError, match=message):
        load_model(path, device="cpu")


def test_weights_stored_in_another_float_precision_still_load(tmp_path, task_checkpoints):
    adapter = read_adapter(task_checkpoints["classification"])
    export = write_export(adapter, tmp_path / "export", dtype=torch.bfloat16)
    assert load_model(export, device="cpu").task == "classification"


@pytest.mark.parametrize("command", ["test", "predict", "validate", "fit"])
def test_a_text_file_given_as_ckpt_path_is_one_line(tmp_path, monkeypatch, capsys, command):
    path = tmp_path / "notes.ckpt"
    path.write_text("these are my notes, not a checkpoint\n")
    error = fails_at_once(monkeypatch, capsys, command, "--config", DEMO, "--ckpt_path", str(path),
                          "--trainer.default_root_dir", str(tmp_path / "runs"), "--data.root", str(tmp_path / "data"))
    assert str(path) in error and "not a readable torch file" in error


LIGHTNING_DAMAGE = {
    "version-none": ("pytorch-lightning_version", None), "version-text": ("pytorch-lightning_version", "text"),
    "version-list": ("pytorch-lightning_version", []), "version-number": ("pytorch-lightning_version", -1),
    "state-dict-none": ("state_dict", None), "state-dict-list": ("state_dict", []),
    "state-dict-of-text": ("state_dict", {"head.weight": "text"}), "loops-text": ("loops", "text"),
    "loops-list": ("loops", []), "loops-empty": ("loops", {}), "loop-entry-number": ("loops", {"fit_loop": 3}),
    "callbacks-list": ("callbacks", []), "callback-entry-text": ("callbacks", {"LatestCheckpoint": "text"}),
    "optimizers-dict": ("optimizer_states", {}), "optimizer-entry-text": ("optimizer_states", ["text"]),
    "schedulers-text": ("lr_schedulers", "text"), "epoch-text": ("epoch", "text"), "step-list": ("global_step", []),
    "epoch-bool": ("epoch", True), "hparams-list": ("hyper_parameters", [1]),
}


@pytest.mark.parametrize("entry, value", LIGHTNING_DAMAGE.values(), ids=LIGHTNING_DAMAGE.keys())
def test_what_lightning_reads_of_a_checkpoint_is_checked_first(demo_run, tmp_path, entry, value):
    checkpoint = torch.load(demo_run.checkpoint, weights_only=True)
    check_lightning_entries(checkpoint, "ok.ckpt")
    with pytest.raises(UserError, match="is not a checkpoint as `mit fit` writes it"):
        check_lightning_entries({**checkpoint, entry: value}, "altered.ckpt")


@pytest.mark.parametrize("entry, value", [("loops", "text"), ("pytorch-lightning_version", None),
                                          ("callbacks", {"LatestCheckpoint": {"rng": "text"}})],
                         ids=["loops", "version", "rng-state"])
def test_mit_test_and_resume_on_a_checkpoint_lightning_cannot_read_are_one_line(demo_run, tmp_path, monkeypatch, capsys,
                                                                              entry, value):
    checkpoint = torch.load(demo_run.checkpoint, weights_only=True)
    path = tmp_path / "altered.ckpt"
    torch.save({**checkpoint, entry: value}, path)
    common = ["--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.logger", "false",
              "--data.root", str(demo_run.data_root), "--data.num_workers", "0", "--trainer.enable_progress_bar", "false"]
    if entry == "callbacks":
        error = fails_at_once(monkeypatch, capsys, "fit", *[a for c in demo_run.configs for a in ("--config", c)],
                              "--ckpt_path", str(path), "--trainer.max_epochs", "2", *common)
        assert "random number states" in error
    else:
        error = fails_at_once(monkeypatch, capsys, "test", "--ckpt_path", str(path), *common)
        assert str(path) in error and "is not a checkpoint as `mit fit` writes it" in error


# === weights named but not read =====================================================================


@pytest.mark.parametrize("weights", ["checkpoints/ViT-L-14-336.pt", "/models/clip.pt", "${MIT_CLIP_PATH}"])
def test_explicit_clip_weights_with_the_tiny_random_tower_are_refused(weights):
    with pytest.raises(UserError, match="reads no weights"):
        VisionConfig(name="tiny", weights=weights)


@pytest.mark.parametrize("weights", [None, DEFAULT_WEIGHTS], ids=["none", "default"])
def test_the_tiny_tower_without_weights_of_its_own_is_built(weights, monkeypatch):
    monkeypatch.setenv("MIT_CLIP_PATH", "/models/clip.pt")
    assert VisionConfig(name="tiny", weights=weights).weights_path() is None


def test_mit_fit_with_clip_weights_and_the_tiny_tower_is_one_line(tmp_path, monkeypatch, capsys):
    error = fails_at_once(monkeypatch, capsys, "fit", "--config", DEMO, "--model.vision.weights", str(tmp_path / "c.pt"),
                          "--trainer.default_root_dir", str(tmp_path / "runs"), "--data.root", str(tmp_path / "data"))
    assert "reads no weights" in error


def test_an_export_config_nested_beyond_reading_is_one_line(tmp_path, task_checkpoints):
    export = write_export(read_adapter(task_checkpoints["sentiment"]), tmp_path / "export")
    (export / "adapter_config.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(UserError, match="is not valid JSON"):
        read_adapter(export)


def test_an_llm_config_nested_beyond_reading_is_one_line(tmp_path):
    from mit_lightning.backbones.llm import _check_config_json

    path = tmp_path / "config.json"
    path.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(UserError, match="is not valid JSON"):
        _check_config_json(path)
