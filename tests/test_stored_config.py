"""A checkpoint's run config is data: every class it names comes from the closed registry, or nothing is imported.

Each class-typed key of a real run config is given every hostile spelling an attacker could write —
a dotted name, JSON or YAML text, the path of a config file, a function, a look-alike name — with a
module in the working folder (and on the import path) that records being imported.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers.cli_helpers import DEMO, fails_at_once
from mit_lightning.checkpoints import CONFIG_ENTRY, run_config_entry
from mit_lightning.config_safety import RefusedConfig, check_stored_config, class_settings
from mit_lightning.registry import CLASS_PATHS, registered_classes

MARKER_MODULE = """\
from pathlib import Path
Path("IMPORTED").write_text("imported")

class Evil:
    def __init__(self, *args, **kwargs):
        Path("INSTANTIATED").write_text("instantiated")

def make(*args, **kwargs):
    Path("CALLED").write_text("called")
"""
EVIL = "evil_marker.Evil"


@pytest.fixture(scope="module")
def demo_stored() -> dict:
    """The run config `mit fit --config configs/demo.yaml` stores in its checkpoints."""
    from mit_lightning.cli import parse_run_config, _ParseOnly

    assert parse_run_config  # the same parse a real run makes
    cli = _ParseOnly(args=["--config", DEMO], run=False)
    return run_config_entry(yaml.safe_load(cli.parser.dump(cli.config, skip_unset=False)))


@pytest.fixture
def hostile_folder(tmp_path, monkeypatch):
    """A working folder whose module, and a config file naming it, an attacker wants read."""
    (tmp_path / "evil_marker.py").write_text(MARKER_MODULE)
    (tmp_path / "evil.yaml").write_text(f"class_path: {EVIL}\n")
    (tmp_path / "hubconf.py").write_text(MARKER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    yield tmp_path
    sys.modules.pop("evil_marker", None)
    sys.modules.pop("hubconf", None)


def assert_nothing_ran(folder: Path) -> None:
    assert "evil_marker" not in sys.modules and "hubconf" not in sys.modules
    assert not any((folder / name).exists() for name in ("IMPORTED", "INSTANTIATED", "CALLED"))


def hostile_values(folder: Path) -> dict[str, object]:
    return {
        "dotted name": EVIL,
        "JSON text": '{"class_path": "%s"}' % EVIL,
        "YAML text": f"class_path: {EVIL}",
        "config file (relative)": "evil.yaml",
        "config file (absolute)": str(folder / "evil.yaml"),
        "mapping": {"class_path": EVIL},
        "function": {"class_path": "evil_marker.make"},
        "function under torch": {"class_path": "torch.hub.load",
                                 "init_args": {"repo_or_dir": str(folder), "model": "make", "source": "local"}},
        "builtin function": {"class_path": "builtins.eval", "init_args": {"source": "1"}},
        "module of torch": {"class_path": "torch.optim"},
        "look-alike (fullwidth)": {"class_path": "mit_lightning.fusion.\uff2diT"},
        "look-alike (zero width)": {"class_path": "mit_lightning.fusion.MiT\u200b"},
        "look-alike (space)": {"class_path": "mit_lightning.fusion.MiT "},
        "look-alike (case)": {"class_path": "Mit_lightning.fusion.MiT"},
        "init_args as a file": {"class_path": "mit_lightning.fusion.MiT", "init_args": "evil.yaml"},
        "include beside the class": {"class_path": "mit_lightning.fusion.MiT", "__path__": "evil.yaml"},
        "class path as a list": {"class_path": [EVIL]},
    }


def with_value(stored: dict, key: str, value: object) -> dict:
    """A copy of `stored` with `value` at `key` (``a.b[1].c``)."""
    crafted = copy.deepcopy(stored)
    parts = key.replace("]", "").replace("[", ".").split(".")
    target = crafted
    for part in parts[:-1]:
        target = target[int(part)] if isinstance(target, list) else target[part]
    last = parts[-1]
    if isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return crafted


def test_every_config_the_project_ships_is_accepted_as_stored(demo_stored):
    assert check_stored_config(demo_stored, "run.ckpt") is demo_stored
    keys = class_settings(demo_stored)
    for expected in ("model.head", "model.fusion", "model.optimizer", "model.lr_scheduler", "data", "trainer.logger",
                     "trainer.callbacks[0]", "trainer.strategy", "trainer.accelerator", "trainer.profiler",
                     "trainer.plugins"):
        assert expected in keys


def test_every_class_typed_key_refuses_every_hostile_spelling(demo_stored, hostile_folder):
    keys = class_settings(demo_stored)
    refused = 0
    for key in keys:
        for kind, value in hostile_values(hostile_folder).items():
            with pytest.raises(RefusedConfig) as error:
                check_stored_config(with_value(demo_stored, key, value), "crafted.ckpt", ["test", "--ckpt_path", "x"])
            message = str(error.value)
            assert "\n" not in message and "crafted.ckpt" in message, (key, kind, message)
            assert key in message, (key, kind, message)
            refused += 1
    assert refused == len(keys) * len(hostile_values(hostile_folder)) > 200
    assert_nothing_ran(hostile_folder)


@pytest.mark.parametrize("key, value", [
    ("config", "evil.yaml"),  # an include at the top
    ("model.config", "evil.yaml"),
    ("model", "evil.yaml"),  # a path where a mapping is expected
    ("model.llm", '{"path": "tiny"}'),
    ("model.llm.extra", 1),
    ("trainer.logger.init_args.comment", '{"class_path": "evil_marker.Evil"}'),  # untyped: plain data only
    ("trainer.model_registry", {"class_path": "evil_marker.Evil"}),
    ("trainer.max_time", {"class_path": "evil_marker.Evil"}),
    ("data.init_args.root", {"class_path": "evil_marker.Evil"}),
    ("data.init_args.kwargs", {"a": 1}),
    ("model.fusion.init_args.layers", "[2, 3]"),
    ("model.text_feature", "evil_marker.Evil"),  # a choice, not a class
    ("model.head", {"class_path": "mit_lightning.data.synthetic.SyntheticRefCOCODataModule"}),  # a class, wrong kind
    ("trainer.callbacks[0].dict_kwargs", {"x": "evil_marker.Evil"}),
])
def test_values_that_do_not_fit_their_key_are_refused_naming_it(demo_stored, hostile_folder, key, value):
    with pytest.raises(RefusedConfig) as error:
        check_stored_config(with_value(demo_stored, key, value), "crafted.ckpt")
    assert key.split("[")[0].rsplit(".", 1)[0] in str(error.value)
    assert_nothing_ran(hostile_folder)


def test_a_stored_config_that_is_no_mapping_is_refused(hostile_folder):
    for stored in ("evil.yaml", [EVIL], 3):
        with pytest.raises(RefusedConfig, match="not a mapping"):
            check_stored_config(stored, "crafted.ckpt")
    assert_nothing_ran(hostile_folder)


def crafted_checkpoint(folder: Path, stored: dict) -> Path:
    path = folder / "crafted.ckpt"
    torch.save({"state_dict": {}, CONFIG_ENTRY: stored}, path)
    return path


@pytest.mark.parametrize("kind", ["dotted name", "JSON text", "config file (relative)", "function under torch",
                                  "look-alike (fullwidth)"])
def test_mit_test_on_a_crafted_checkpoint_stops_in_one_line_and_imports_nothing(
        demo_stored, hostile_folder, monkeypatch, capsys, kind):
    value = hostile_values(hostile_folder)[kind]
    checkpoint = crafted_checkpoint(hostile_folder, with_value(demo_stored, "model.optimizer", value))
    error = fails_at_once(monkeypatch, capsys, "test", "--ckpt_path", str(checkpoint))
    assert "model.optimizer" in error and "Nothing it names was imported" in error
    assert_nothing_ran(hostile_folder)


@pytest.mark.parametrize("command", ["predict", "validate"])
def test_every_evaluation_command_checks_the_stored_config(demo_stored, hostile_folder, monkeypatch, capsys, command):
    checkpoint = crafted_checkpoint(hostile_folder, with_value(demo_stored, "data", "evil.yaml"))
    assert "data" in fails_at_once(monkeypatch, capsys, command, "--ckpt_path", str(checkpoint))
    assert_nothing_ran(hostile_folder)


def test_export_serve_and_load_model_check_the_stored_config(demo_stored, hostile_folder, monkeypatch, capsys):
    from mit_lightning import load_model

    stored = with_value(demo_stored, "model.head", {"class_path": EVIL})
    checkpoint = crafted_checkpoint(hostile_folder, stored)
    assert "model.head" in fails_at_once(monkeypatch, capsys, "export", "--ckpt_path", str(checkpoint), "out")
    assert "model.head" in fails_at_once(monkeypatch, capsys, "serve", "--ckpt_path", str(checkpoint))
    with pytest.raises(RefusedConfig, match="model.head"):
        load_model(checkpoint)
    export = hostile_folder / "export"
    export.mkdir()
    (export / "adapter_config.json").write_text(
        '{"format": "mit-lightning-adapter", "version": 1, "data_spec": {}, "model": {"head": "%s"}}' % EVIL)
    (export / "adapter.safetensors").write_bytes(b"")
    with pytest.raises(RefusedConfig, match="model.head"):
        load_model(export)
    assert_nothing_ran(hostile_folder)


def test_a_class_the_user_names_is_theirs_to_trust(hostile_folder, demo_stored):
    (hostile_folder / "user_fusion.py").write_text(
        "from mit_lightning.fusion import TextOnly\n\nclass MyFusion(TextOnly):\n    pass\n")
    stored = with_value(demo_stored, "model.fusion", {"class_path": "user_fusion.MyFusion", "init_args": {}})
    with pytest.raises(RefusedConfig, match="model.fusion.class_path"):
        check_stored_config(stored, "x.ckpt", ["test", "--ckpt_path", "x.ckpt"])
    assert "user_fusion" not in sys.modules
    overlay = hostile_folder / "mine.yaml"
    overlay.write_text("model:\n  fusion:\n    class_path: user_fusion.MyFusion\n")
    try:
        check_stored_config(stored, "x.ckpt", ["test", "--config", str(overlay), "--ckpt_path", "x.ckpt"])
        check_stored_config(stored, "x.ckpt", ["test", "--model.fusion=user_fusion.MyFusion", "--ckpt_path", "x"])
    finally:
        sys.modules.pop("user_fusion", None)
    # naming one class trusts that class only: the same file's other names stay refused
    with pytest.raises(RefusedConfig, match="model.head"):
        check_stored_config(with_value(stored, "model.head", {"class_path": EVIL}), "x.ckpt",
                            ["test", "--config", str(overlay)])
    assert_nothing_ran(hostile_folder)


def test_every_registered_class_is_a_class_reachable_by_its_public_path():
    classes = registered_classes()
    for path in CLASS_PATHS:
        cls = classes[path]
        assert isinstance(cls, type)
        assert classes[f"{cls.__module__}.{cls.__qualname__}"] is cls


def test_every_configurable_class_of_the_project_is_registered():
    """A new fusion, head, data module, schedule or callback must be added to the registry, or its runs' checkpoints
    could not be tested."""
    import importlib
    import pkgutil

    import lightning as L
    from torch.optim.lr_scheduler import LRScheduler

    import mit_lightning
    from mit_lightning.data.base import MiTDataModule
    from mit_lightning.fusion.base import Fusion
    from mit_lightning.heads.base import TaskHead
    from mit_lightning.data.classification import ImageTextClassificationDataModule
    from mit_lightning.fusion.tokens import TokenFusion

    bases = (Fusion, TaskHead, MiTDataModule, LRScheduler, L.Callback)
    shared_bases = {Fusion, TaskHead, MiTDataModule, ImageTextClassificationDataModule, TokenFusion}
    registered = set(registered_classes().values())
    for info in pkgutil.walk_packages(mit_lightning.__path__, "mit_lightning."):
        if info.name.startswith("mit_lightning.serve") or info.name.endswith("__main__"):
            continue  # serving builds nothing from configs; __main__ runs the command
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if (isinstance(value, type) and value.__module__ == module.__name__ and issubclass(value, bases)
                    and not value.__name__.startswith("_") and value not in shared_bases
                    and value.__module__ != "mit_lightning.cli"):
                assert value in registered, f"{value.__module__}.{value.__qualname__} is not in mit_lightning.registry"


def test_a_stored_config_that_refers_to_itself_is_refused_in_one_line(demo_stored, hostile_folder):
    loop: list = []
    loop.append(loop)  # pickles (and so checkpoints) can hold such a list
    crafted = with_value(demo_stored, "trainer.logger.init_args.comment", loop)
    with pytest.raises(RefusedConfig, match="refers to itself"):
        check_stored_config(crafted, "crafted.ckpt")


@pytest.mark.parametrize("entry, value, expected", [
    ("mit_data_spec", "evil.yaml", "data spec"),
    ("mit_data_spec", {"prompt": "not a mapping"}, "data spec"),
    ("mit_data_spec", {"sequence_dims": {"audio": "many"}}, "data spec"),
    ("mit_backbones", ["evil"], "backbones"),
    ("mit_backbones", {"llm": {"path": {"class_path": EVIL}}}, "backbones"),
])
def test_altered_format_entries_end_in_one_line(demo_run, hostile_folder, entry, value, expected):
    from mit_lightning import load_model
    from mit_lightning.errors import UserError

    checkpoint = torch.load(demo_run.checkpoint, weights_only=True)
    checkpoint[entry] = value
    path = hostile_folder / "altered.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(UserError, match=expected) as error:
        load_model(path)
    assert "\n" not in str(error.value) and "altered.ckpt" in str(error.value)
    assert_nothing_ran(hostile_folder)


def test_the_attention_kernel_is_a_choice_so_a_config_cannot_name_one_to_fetch(demo_stored):
    from mit_lightning.backbones.llm import LLMConfig
    from mit_lightning.errors import UserError

    with pytest.raises(RefusedConfig, match="model.llm.attention"):
        check_stored_config(with_value(demo_stored, "model.llm.attention", "kernels-community/flash-attn"), "x.ckpt")
    with pytest.raises(UserError, match="model.llm.attention"):
        LLMConfig(path="tiny", attention="kernels-community/flash-attn")
