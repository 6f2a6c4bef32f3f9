"""Shared fixtures: tiny frozen backbones built once per session, trained models, a guard against runs."""

from __future__ import annotations

import os
import subprocess

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from mit_lightning.backbones.llm import FrozenLLM, LLMConfig  # noqa: E402
from mit_lightning.backbones.vision import FrozenCLIP, VisionConfig  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llm_factory():
    """Build (and cache) tiny LLMs; a fresh one per key so tapping one does not affect another test."""
    built: dict[tuple, FrozenLLM] = {}

    def build(preset: str = "tiny", attention: str = "sdpa", key: str = "") -> FrozenLLM:
        cache_key = (preset, attention, key)
        if cache_key not in built:
            built[cache_key] = FrozenLLM(LLMConfig(path=preset, dtype="float32", attention=attention))
        return built[cache_key]

    return build


@pytest.fixture(scope="session")
def tiny_clip() -> FrozenCLIP:
    return FrozenCLIP(VisionConfig(name="tiny", weights=None, dtype="float32"))


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """A real `mit fit` of the demo config, shrunk to seconds (segmentation; see adapter_fixtures)."""
    from helpers.adapter_fixtures import fit_demo

    return fit_demo(tmp_path_factory.mktemp("demo_run"))


@pytest.fixture(scope="session")
def task_checkpoints(tmp_path_factory) -> dict:
    """Classification and sentiment checkpoints in `mit fit`'s format, by task (see adapter_fixtures)."""
    from helpers.adapter_fixtures import write_checkpoint

    folder = tmp_path_factory.mktemp("task_checkpoints")
    return {task: write_checkpoint(task, folder / f"{task}.ckpt", seed) for seed, task in enumerate(
        ("classification", "sentiment"), start=1)}


@pytest.fixture
def no_training(monkeypatch):
    """A test that must stop before any run starts fails if one does (`mit compare`, `mit reproduce`)."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a run was started: {args}")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)
